"""User-facing errors.

Everything a user can get wrong (a missing path, an unknown name, K > N, a bad option value) raises a
subclass of :class:`DeepclustError` with a one-line message. The CLI prints that line on stderr and
exits non-zero; library users catch the exception. Anything else is a bug and keeps its traceback.
"""


class DeepclustError(Exception):
    """A problem with the user's input, reported as one line."""


class ConfigError(DeepclustError, ValueError):
    """An option has an unknown name or a value of the wrong type or range."""


class DataError(DeepclustError, ValueError):
    """A data source cannot be read: missing path, unknown dataset, no images, mixed sizes, ..."""


class WriteError(DeepclustError):
    """A file of the run could not be written (no space, quota, permission, read-only file system):
    the message names the path and the errno; the file's previous content, if any, is unchanged."""

    def __init__(self, path, error: OSError):
        import errno as _errno

        code = _errno.errorcode.get(error.errno, "?") if error.errno is not None else "no errno"
        reason = error.strerror or str(error) or type(error).__name__
        super().__init__(f"cannot write {path}: {reason} (errno {error.errno}, {code})")
        self.path, self.errno = str(path), error.errno
