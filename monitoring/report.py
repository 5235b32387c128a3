"""The depth study's report, from its MLflow runs: the paper's table and figure for our numbers.

    python -m monitoring.report --study digits_depth              # by study name (newest parent)
    python -m monitoring.report --study 3f2a...e1 --out runs/reports/x --tracking-uri http://mlflow:5000

Writes ``figure.png`` (Figure 4/6 layout), ``table.md`` (Table 2/6 layout, and Table 3 for ImageNet ResNets),
``figure7.png`` (Figure 7 layout, when the members measured their response std: ``diagnostics.response_std``),
``report.md`` and ``report.html`` (the same page with its figures inline, for MLflow's artifact viewer) into the
output folder, logs them as artifacts of the study's parent run (under ``report/``),
and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from monitoring.figures import plot_depth_curves, plot_response_std
from monitoring.html import markdown_page_html
from monitoring.paper import recipe_mismatches, table_for
from monitoring.tables import Table, comparison_table, member_summary, table3
from pipeline.runtime.diagnostics import RESPONSE_STD_ARTIFACT, read_response_std
from pipeline.study.runs import MemberRun, StudyNotFound, StudyRuns, load_study
from pipeline.tracking import resolve_uri


@dataclass
class Report:
    study: StudyRuns
    table: Table
    out_dir: Path
    figure: Path
    page: Path
    table_file: Path
    table3: Table | None = None  # Table 3's layout, when the study has ImageNet ResNets with a row in it
    figure7: Path | None = None  # Figure 7 layout; None when no member measured its response std
    html: Path | None = None  # the page as HTML with its figures inline (what MLflow's artifact viewer shows)

    @property
    def figures(self) -> list[Path]:
        """Every figure the report wrote, in the page's order."""
        return [f for f in (self.figure, self.figure7) if f is not None]


def paper_marks(members: list[MemberRun]) -> dict[str, float]:
    """Member name -> the paper's top-1 error for it, for the members whose run follows the paper's recipe."""
    table = table_for(members)
    out = {}
    for m in members:
        printed = table.paper_top1(m)
        if printed and not recipe_mismatches(table, m):
            out[m.name] = float(printed.split()[0])  # "6.43 (6.61±0.16)": the first number is the best run's
    return out


def response_stds(client: object, members: list[MemberRun]) -> dict[str, list[float]]:
    """Member name -> its final 3x3-layer response std in layer order (``RESPONSE_STD_ARTIFACT``), for the
    members that logged one."""
    folder, name = RESPONSE_STD_ARTIFACT.rsplit("/", 1)
    # A few small JSON files: MLflow's per-download progress bars would only clutter the report's output.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for m in members:
            listed = {a.path for a in client.list_artifacts(m.run_id, folder)}  # type: ignore[attr-defined]
            if RESPONSE_STD_ARTIFACT not in listed:
                continue
            local = client.download_artifacts(m.run_id, RESPONSE_STD_ARTIFACT, tmp)  # type: ignore[attr-defined]
            out[m.name] = list(read_response_std(Path(local).read_text()).values())
    return out


def _figure7_section(study: StudyRuns, stds: dict[str, list[float]], figure7: Path | None) -> list[str]:
    if figure7 is None:
        return []
    means = ", ".join(
        f"{m.label} {sum(stds[m.name]) / len(stds[m.name]):.3f}" for m in study.members if stds.get(m.name)
    )
    return [
        "## Layer responses (Figure 7 layout)",
        "",
        "Std of each 3x3 layer's response (the output of its BN, before the addition and ReLU) on one fixed "
        "validation batch at the end of training; top in layer order, bottom sorted by magnitude. Plain "
        "networks dashed, ResNets solid. The paper finds the ResNets' responses generally smaller than the "
        f"plain nets'. Mean over layers: {means}.",
        "",
        f"![Figure 7 layout]({figure7.name})",
        "",
    ]


def _page(
    study: StudyRuns,
    tables: list[Table],
    members: Table,
    figure: Path,
    *,
    stds: dict[str, list[float]] | None = None,
    figure7: Path | None = None,
) -> str:
    paper = table_for(study.members)
    fig_name = "Figure 4" if paper.key == "table2" else "Figure 6"
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join(
        [
            f"# Depth study `{study.name}`",
            "",
            f"Parent run `{study.parent_run_id}` (experiment {study.experiment_id}) at `{study.tracking_uri}`; "
            f"generated {when}.",
            "",
            *(t.markdown() for t in tables),
            f"## Training curves ({fig_name} layout)",
            "",
            "Dashed: training error; bold: validation (test) error; a star: the paper's number, for runs that "
            "follow its recipe. Plain networks left, ResNets right.",
            "",
            f"![{fig_name} layout]({figure.name})",
            "",
            *_figure7_section(study, stds or {}, figure7),
            "## Member runs",
            "",
            members.markdown(),
        ]
    )


def build_report(
    client: object,
    study: str,
    *,
    out_dir: str | Path | None = None,
    experiment: str | None = None,
    log_artifacts: bool = True,
) -> Report:
    """Fetch the study, write figure, table and page, and (by default) log them to the parent run."""
    runs = load_study(client, study, experiment=experiment)
    if not runs.members:
        raise StudyNotFound(
            f"study {runs.name!r} (parent run {runs.parent_run_id}) has no member runs with results yet"
        )
    out = Path(out_dir) if out_dir else Path("runs/reports") / runs.name
    out.mkdir(parents=True, exist_ok=True)
    table = comparison_table(runs)
    t3 = table3(runs)
    tables = [table] + ([t3] if t3 else [])
    heldout = "test" if runs.datasets == {"cifar"} else "val"
    figure = plot_depth_curves(
        runs.members,
        out / "figure.png",
        title=f"{runs.name}: top-1 error, dashed = train, bold = {heldout}",
        paper=paper_marks(runs.members),
        heldout=heldout,
    )
    stds = response_stds(client, runs.members)
    figure7 = None
    if stds:
        figure7 = plot_response_std(
            runs.members, stds, out / "figure7.png", title=f"{runs.name}: std of the 3x3 layers' responses"
        )
    table_file = out / "table.md"
    table_file.write_text("\n".join(t.markdown() for t in tables))
    page = out / "report.md"
    markdown = _page(runs, tables, member_summary(runs.members), figure, stds=stds, figure7=figure7)
    page.write_text(markdown)
    # MLflow's artifact viewer shows markdown as text, image links included: the HTML page shows the figures.
    html_page = out / "report.html"
    html_page.write_text(markdown_page_html(markdown, title=f"Depth study {runs.name}", folder=out))
    if log_artifacts:
        for f in (figure, figure7, table_file, page, html_page):
            if f is not None:
                client.log_artifact(runs.parent_run_id, str(f), "report")  # type: ignore[attr-defined]
    return Report(
        study=runs,
        table=table,
        out_dir=out,
        figure=figure,
        page=page,
        table_file=table_file,
        table3=t3,
        figure7=figure7,
        html=html_page,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", required=True, help="the study's parent run id, or the study's name")
    p.add_argument("--experiment", help="look for the study by name in this experiment only")
    p.add_argument("--tracking-uri", default="", help="MLflow URI; default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    p.add_argument("--out", help="output folder (default runs/reports/<study>)")
    p.add_argument("--no-log", action="store_true", help="do not log the report as artifacts of the parent run")
    p.add_argument(
        "--json",
        action="store_true",
        help="print where everything went as one JSON object (for programs such as pipeline.study.demo) instead of the table",
    )
    args = p.parse_args(argv)

    from mlflow import MlflowClient  # heavy: loaded only when the report reads MLflow

    client = MlflowClient(resolve_uri(uri=args.tracking_uri))
    try:
        report = build_report(
            client, args.study, out_dir=args.out, experiment=args.experiment, log_artifacts=not args.no_log
        )
    except StudyNotFound as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(
            json.dumps(
                {
                    "parent_run_id": report.study.parent_run_id,
                    "page": str(report.page.resolve()),
                    "figure": str(report.figure.resolve()),
                    "figure7": str(report.figure7.resolve()) if report.figure7 else None,
                    "figures": [str(f.resolve()) for f in report.figures],
                    "html": str(report.html.resolve()) if report.html else None,
                    "table": report.table.text(),
                    **({"table3": report.table3.text()} if report.table3 else {}),
                }
            )
        )
        return 0
    print(report.table.text())
    if report.table3:
        print(report.table3.text())
    for f in report.figures:
        print(f"figure: {f.resolve()}")
    print(f"report: {report.page.resolve()}")
    if report.html is not None:
        print(f"report (HTML, figures inline; also the parent run's report/report.html): {report.html.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
