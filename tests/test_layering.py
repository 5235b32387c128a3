"""Which package may import which, read from the source with ``ast`` (no import side effects).

The report (monitoring/) reads the pipeline's runs; the pipeline runs the report as a program
(``python -m monitoring.report``), never as a module. The offline dataset tools (pipeline/tools/) are
what training calls at start-up at most: they must not pull in the trainer, the engine or the DALI loader.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``, relative ones resolved."""
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join([*base, node.module] if node.module else base)
            found += [(node.lineno, f"{module}.{a.name}") for a in node.names]
    return found


def _offending(folder: str, forbidden: tuple[str, ...]) -> list[str]:
    return [
        f"{path.relative_to(REPO)}:{line}: {name}"
        for path in sorted((REPO / folder).rglob("*.py"))
        for line, name in _imports(path)
        if name.startswith(forbidden)
    ]


def test_pipeline_never_imports_monitoring() -> None:
    assert _offending("pipeline", ("monitoring.",)) == []


def test_dataset_tools_stay_offline() -> None:
    forbidden = (
        "pipeline.trainer",
        "pipeline.runtime.engine",
        "pipeline.train.",
        "pipeline.data.loader",
        "pipeline.data.pipelines",
        "pipeline.data.source",
        "nvidia.dali.plugin",
    )
    assert _offending("pipeline/tools", forbidden) == []


def test_the_check_sees_imports() -> None:
    names = [name for _, name in _imports(REPO / "pipeline" / "tools" / "prepare.py")]
    assert "pipeline.tools.ilsvrc.iter_val_images" in names  # relative imports resolved
    assert any(name.startswith("monitoring.") for _, name in _imports(REPO / "monitoring" / "report.py"))
