"""Durations: "10m", "90s", "1h30m" -> seconds (``train.budget``). Parsing only, so that the
configuration can check a budget without importing the training machinery (``budget.py``)."""

from __future__ import annotations

import math
import os
import re
import time
from typing import Any

from .errors import ConfigError

_IMPORTED = time.perf_counter()  # imported first by the package (__init__.py): deepclust's first line
_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(hours?|hrs?|h|minutes?|mins?|m|seconds?|secs?|s)", re.IGNORECASE)


def parse_budget(text: Any, where: str = "train.budget") -> float:
    """Seconds in a duration like "10m", "90s", "1h30m", "1.5h", "2h 15m" (units h, m, s, each at
    most once, largest first). Anything else -- no unit, an unknown unit, zero, a negative or
    repeated part -- raises ConfigError with one line."""
    hint = f"{where}: expected a duration such as 10m, 90s or 1h30m, got {text!r}"
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(hint)
    s = text.strip()
    if s.startswith("-"):
        raise ConfigError(f"{where}: a budget must be positive, got {text!r}")
    pos, total, seen = 0, 0.0, []
    while pos < len(s):
        if s[pos].isspace():
            pos += 1
            continue
        m = _PART.match(s, pos)
        if m is None:
            raise ConfigError(hint)
        unit = m.group(2)[0].lower()
        if seen and "hms".index(unit) <= "hms".index(seen[-1]):
            raise ConfigError(hint)
        seen.append(unit)
        total += float(m.group(1)) * _UNITS[unit]
        pos = m.end()
        if pos < len(s) and s[pos].isalpha():  # e.g. "10mx" or "5ms"
            raise ConfigError(hint)
    if not seen or not math.isfinite(total) or total <= 0:
        raise ConfigError(hint)
    return total


def format_seconds(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.2f}h"


def entry_started() -> float:
    """The ``time.perf_counter()`` reading when deepclust's first line ran (the package's import, before
    torch's and Lightning's): what a command's time budget counts from, the imports being part of the
    time the user gave. Not the process's start: a shell that ends in ``exec`` (``bash -c "a && b &&
    deepclust fit ..."``) hands its own start time to the command, and its earlier work would count."""
    return _IMPORTED
