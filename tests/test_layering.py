"""Which package may import which, read from the source with ``ast`` (no import side effects).

``pipeline/`` is grouped by role, and the folders are the layers (README, "Layout"): ``core`` at the bottom
knows nothing of training; ``models`` and ``config`` sit on it; the components (``data``, ``checkpoint``,
``tracking``) build on those; ``runtime`` holds the parts the trainer drives; the entry points and the loop
(``train``, ``evaluate``, ``wiring``, ``trainer``) sit on top. Beside them, ``tools`` (offline dataset tools) and
``study`` (which runs training as processes) use only the layers below and are never imported by the runtime.
The report (monitoring/) reads the pipeline's runs; the pipeline runs the report as a program
(``python -m monitoring.report``), never as a module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted((REPO / "pipeline").rglob("*.py"))

# Each package of pipeline/ and the packages it may import besides itself. "top" is the modules directly in
# pipeline/ (the entry points and the loop).
MAY_IMPORT: dict[str, set[str]] = {
    "core": set(),
    "models": {"core"},
    "config": {"core", "models"},
    "data": {"core", "config"},
    "checkpoint": {"core", "config"},
    "tracking": {"core", "config", "data"},
    "runtime": {"core", "config", "models", "data", "checkpoint", "tracking"},
    "tools": {"core", "config", "data"},
    "study": {"core", "config", "tracking"},
    "top": {"core", "config", "models", "data", "checkpoint", "tracking", "runtime"},
}
MAX_LINES = 600


def _module(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package_of(path: Path) -> str:
    """The dotted package a relative import in ``path`` is resolved against."""
    return ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])


def _imports(path: Path, *, top_level_only: bool = False) -> list[tuple[int, str]]:
    """(line, absolute name) of every import in ``path``, relative ones resolved; names imported from a module
    are listed as ``module.name``. ``top_level_only``: what runs when the module is imported (not inside a
    function), the edges an import cycle is made of."""
    package = _package_of(path)
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = _outside_functions(tree) if top_level_only else ast.walk(tree)
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join([*base, node.module] if node.module else base)
            found += [(node.lineno, f"{module}.{a.name}") for a in node.names]
    return found


def _outside_functions(tree: ast.AST) -> list[ast.AST]:
    found, todo = [], [tree]
    while todo:
        node = todo.pop()
        found.append(node)
        todo += [c for c in ast.iter_child_nodes(node) if not isinstance(c, ast.FunctionDef | ast.AsyncFunctionDef)]
    return found


def _function_imports(path: Path) -> list[tuple[int, str]]:
    top = set(_imports(path, top_level_only=True))
    return [item for item in _imports(path) if item not in top]


def _layer(name: str) -> str | None:
    """The package of pipeline/ that a module or imported name belongs to (None outside pipeline/)."""
    parts = name.split(".")
    if parts[0] != "pipeline":
        return None
    if len(parts) > 1 and parts[1] in MAY_IMPORT:
        return parts[1]
    return "top"


def _offending(folder: str, forbidden: tuple[str, ...]) -> list[str]:
    return [
        f"{path.relative_to(REPO)}:{line}: {name}"
        for path in sorted((REPO / folder).rglob("*.py"))
        for line, name in _imports(path)
        if name.startswith(forbidden)
    ]


def test_pipeline_never_imports_monitoring() -> None:
    assert _offending("pipeline", ("monitoring.",)) == []


def test_every_package_imports_only_the_layers_below_it() -> None:
    assert {_layer(_module(p)) for p in SOURCES} == set(MAY_IMPORT), "a package of pipeline/ has no rule here"
    wrong = []
    for path in SOURCES:
        me = _layer(_module(path))
        for line, name in _imports(path):
            them = _layer(name)
            if them is not None and them != me and them not in MAY_IMPORT[me]:
                wrong.append(f"{path.relative_to(REPO)}:{line}: {me} imports {them} ({name})")
    assert wrong == []


def test_the_runtime_never_imports_an_offline_tool() -> None:
    wrong = [
        f"{path.relative_to(REPO)}:{line}: {name}"
        for path in SOURCES
        if _layer(_module(path)) != "tools"
        for line, name in _imports(path)
        if name.startswith("pipeline.tools")
    ]
    assert wrong == []


def test_dataset_tools_stay_offline() -> None:
    forbidden = (
        "pipeline.trainer",
        "pipeline.runtime.",
        "pipeline.train.",
        "pipeline.data.loader",
        "pipeline.data.pipelines",
        "pipeline.data.source",
        "nvidia.dali.plugin",
    )
    assert _offending("pipeline/tools", forbidden) == []


def test_no_private_name_crosses_modules() -> None:
    wrong = []
    for path in SOURCES:
        for line, name in _imports(path):
            module, _, leaf = name.rpartition(".")
            if name.startswith("pipeline.") and leaf.startswith("_") and not leaf.startswith("__"):
                wrong.append(f"{path.relative_to(REPO)}:{line}: {leaf} from {module}")
    assert wrong == []


def test_the_project_imports_its_own_modules_at_the_top() -> None:
    """So the import graph a reader sees is the real one; heavy optional third-party imports may stay lazy."""
    wrong = [
        f"{path.relative_to(REPO)}:{line}: {name}"
        for path in SOURCES
        for line, name in _function_imports(path)
        if name.startswith(("pipeline.", "monitoring."))
    ]
    assert wrong == []


def test_no_import_cycle() -> None:
    modules = {_module(p): p for p in SOURCES}

    def target(name: str) -> str | None:
        while name and name not in modules:  # `pipeline.data.folder.SplitIndex` is an edge to pipeline.data.folder
            name = name.rpartition(".")[0]
        return name or None

    graph = {
        m: {t for _, n in _imports(p, top_level_only=True) if (t := target(n)) and t != m} for m, p in modules.items()
    }
    cycles, done = [], set()

    def visit(m: str, trail: list[str]) -> None:
        if m in trail:
            cycles.append(" -> ".join([*trail[trail.index(m) :], m]))
            return
        if m in done:
            return
        for t in sorted(graph[m]):
            visit(t, [*trail, m])
        done.add(m)

    for m in sorted(graph):
        visit(m, [])
    assert cycles == []


@pytest.mark.parametrize("path", SOURCES, ids=[str(p.relative_to(REPO)) for p in SOURCES])
def test_no_module_is_longer_than_a_reader_holds(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(REPO)} has {lines} lines; split it along its seam"


def test_the_check_sees_imports() -> None:
    names = [name for _, name in _imports(REPO / "pipeline" / "data" / "archive.py")]
    assert "pipeline.data.errors.DataError" in names
    relative = REPO / "pipeline" / "models" / "__init__.py"
    assert any(n.startswith("pipeline.models.") for _, n in _imports(relative))  # relative imports resolved too
    assert any(name.startswith("monitoring.") for _, name in _imports(REPO / "monitoring" / "report.py"))
    lazy = [n for _, n in _function_imports(REPO / "pipeline" / "tools" / "cifar10.py")]
    assert "pickle" in lazy and "pipeline.core.storage.Storage" not in lazy
