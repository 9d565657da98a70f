"""The structure of the package: imports flow one way, no module reaches into another's private
names, no class into another's private names in one module (the time budget drives the trainer
through its public steps), and the configuration knows no method (read from the source with ``ast``;
nothing runs)."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "deepclust"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict[str, tuple[Path, ast.Module]]:
    return {_module_name(p): (p, ast.parse(p.read_text())) for p in sorted(PACKAGE.rglob("*.py"))}


def _imported(module: str, path: Path, node: ast.ImportFrom | ast.Import) -> list[str]:
    """Package modules an import statement names (relative imports resolved)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.startswith("deepclust")]
    if node.level == 0:
        base = node.module or ""
    else:
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
    if not base.startswith("deepclust"):
        return []
    return [f"{base}.{a.name}" for a in node.names] + [base]


def _graph() -> dict[str, set[str]]:
    sources = _sources()
    graph: dict[str, set[str]] = {m: set() for m in sources}
    for module, (path, tree) in sources.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                targets = _imported(module, path, node)
                if isinstance(node, ast.ImportFrom) and all(t in sources for t in targets[:-1]):
                    targets = targets[:-1]  # `from . import budget` imports the submodule, not the package's names
                graph[module] |= {t for t in targets if t in sources and t != module}
    return graph


def _reaches(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_imports_have_no_cycle_and_flow_down():
    graph = _graph()
    cycles = sorted(m for m in graph if m in _reaches(graph, m) and m != "deepclust")
    assert not cycles, f"modules that import themselves through others: {cycles}"
    below_methods = ("deepclust.config", "deepclust.errors", "deepclust.io", "deepclust.memory", "deepclust.nets",
                     "deepclust.views", "deepclust.evaluate", "deepclust.heads", "deepclust.durations",
                     "deepclust.schedules")
    for module in below_methods:
        up = sorted(m for m in _reaches(graph, module) if m.startswith(("deepclust.methods", "deepclust.train")))
        assert not up, f"{module} reaches {up} (imports flow errors <- config <- ... <- methods <- train)"
    for module in ("deepclust.train", "deepclust.calibration", "deepclust.budget", "deepclust.resolution",
                   "deepclust.scoring"):
        assert module in graph, module
        up = sorted(m for m in _reaches(graph, module) if m in ("deepclust.runs", "deepclust.cli", "deepclust.inference"))
        assert not up, f"{module} reaches {up}"
    up = sorted(m for m in _reaches(graph, "deepclust.train") if m in ("deepclust.calibration", "deepclust.budget"))
    assert not up, f"the trainer reaches {up}: the budget times the trainer, never the other way"


def _private_definitions(tree: ast.Module) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def _private_uses(tree: ast.Module, own: set[str], project: set[str], scripts: frozenset = frozenset()) -> list[str]:
    """Imports of private names, ``x._name`` where ``_name`` is another project module's private
    (x not self / cls / super()), and ``object.__new__`` (an instance made without its constructor)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("deepclust")
                                                 or node.module in scripts):
            found += [f"line {node.lineno}: imports {a.name}" for a in node.names
                      if a.name.startswith("_") and not a.name.startswith("__")]
        elif isinstance(node, ast.Attribute) and node.attr in project - own:
            base = node.value
            if not (isinstance(base, ast.Name) and base.id in ("self", "cls")):
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.Call) and ast.unparse(node.func) == "object.__new__":
            found.append(f"line {node.lineno}: object.__new__")
    return found


def test_no_module_uses_another_modules_private_names():
    files = sorted(PACKAGE.rglob("*.py")) + sorted((ROOT / "benchmarks").glob("*.py")) + [ROOT / "tests" / "conftest.py"]
    trees = {p: ast.parse(p.read_text()) for p in files}
    project = set().union(*(_private_definitions(t) for t in trees.values()))  # the package's and the benchmarks'
    scripts = frozenset(p.stem for p in files if p.parent.name == "benchmarks")  # they import each other
    bad = {str(p.relative_to(ROOT)): uses for p, t in trees.items()
           if (uses := _private_uses(t, _private_definitions(t), project, scripts))}
    assert not bad, f"private names used across modules: {bad}"


def _class_privates(cls: ast.ClassDef) -> set[str]:
    """Private names a class defines: its methods and nested classes, ``self._x`` / ``cls._x`` it
    assigns, names bound in its body."""
    names = set()
    for node in ast.walk(cls):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node is not cls:
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and isinstance(node.value, ast.Name) \
                and node.value.id in ("self", "cls"):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def _cross_class_uses(tree: ast.Module) -> list[str]:
    """``x._name`` (x not self / cls) where ``_name`` is a private name of a class of this module and
    the code using it is not in that class: one class driving another through its private names."""
    owned = {c.name: _class_privates(c) for c in ast.walk(tree) if isinstance(c, ast.ClassDef)}
    privates = set().union(*owned.values()) if owned else set()
    found = []

    def visit(node: ast.AST, enclosing: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                visit(child, child.name)
                continue
            if isinstance(child, ast.Attribute) and child.attr in privates - owned.get(enclosing, set()) \
                    and not (isinstance(child.value, ast.Name) and child.value.id in ("self", "cls")):
                found.append(f"line {child.lineno}: {ast.unparse(child)}")
            visit(child, enclosing)

    visit(tree, None)
    return found


def test_no_class_uses_another_classes_private_names():
    files = sorted(PACKAGE.rglob("*.py")) + sorted((ROOT / "benchmarks").glob("*.py"))
    bad = {str(p.relative_to(ROOT)): uses for p in files if (uses := _cross_class_uses(ast.parse(p.read_text())))}
    assert not bad, f"private names used across classes: {bad}"


# A probe that times the trainer through its private steps: what the two rules above refuse,
# whether it lives in the trainer's module or in another.
_PROBE = """
class Trainer:
    def _step(self, batch):
        return batch

    def step(self, batch):
        return self._step(batch)


class Probe:
    def __init__(self, trainer):
        self.trainer = trainer

    def time_step(self, batch):
        return self.trainer._step(batch)
"""


def test_the_private_name_rules_catch_a_probe_reaching_into_the_trainer():
    def used(found: list[str]) -> list[str]:
        return [f.split(": ", 1)[1] for f in found]

    assert used(_cross_class_uses(ast.parse(_PROBE))) == ["self.trainer._step"]  # in the trainer's module
    trainer_module = ast.parse(_PROBE.split("class Probe")[0])
    probe_module = ast.parse("class Probe" + _PROBE.split("class Probe")[1])  # in a module of its own
    project = _private_definitions(trainer_module) | _private_definitions(probe_module)
    assert used(_private_uses(probe_module, _private_definitions(probe_module), project)) == ["self.trainer._step"]
    public = ast.parse(_PROBE.replace("self.trainer._step(batch)", "self.trainer.step(batch)"))
    assert _cross_class_uses(public) == []


def test_the_configuration_knows_no_method():
    """Importing the configuration imports no method (the registry is asked explicitly, by name)."""
    code = ("import sys; import deepclust.config; "
            "print(sorted(m for m in sys.modules if m.startswith('deepclust.methods') or m == 'torch'))")
    env_path = str(ROOT / "src")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "[]"
