"""The depth study's report, from its MLflow runs: the paper's table and figure for our numbers.

    python -m monitoring.report --study digits_depth              # by study name (newest parent)
    python -m monitoring.report --study 3f2a...e1 --out runs/reports/x --tracking-uri http://mlflow:5000

Writes ``figure.png`` (Figure 4/6 layout), ``table.md`` (Table 2/6 layout, and Table 3 for ImageNet ResNets)
and ``report.md`` into the output folder, logs them as artifacts of the study's parent run (under ``report/``), and prints the
table.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from monitoring.figures import plot_depth_curves
from monitoring.paper import table_for
from monitoring.tables import Table, comparison_table, member_summary, table3
from pipeline.tracking.study_runs import StudyNotFound, StudyRuns, load_study


@dataclass
class Report:
    study: StudyRuns
    table: Table
    out_dir: Path
    figure: Path
    page: Path
    table_file: Path
    table3: Table | None = None  # Table 3's layout, when the study has ImageNet ResNets with a row in it


def _page(study: StudyRuns, tables: list[Table], members: Table, figure: Path) -> str:
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
            "Thin: training error; bold: validation error. Plain networks left, ResNets right.",
            "",
            f"![{fig_name} layout]({figure.name})",
            "",
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
    figure = plot_depth_curves(
        runs.members, out / "figure.png", title=f"{runs.name}: top-1 error, thin = train, bold = val"
    )
    table_file = out / "table.md"
    table_file.write_text("\n".join(t.markdown() for t in tables))
    page = out / "report.md"
    page.write_text(_page(runs, tables, member_summary(runs.members), figure))
    if log_artifacts:
        for f in (figure, table_file, page):
            client.log_artifact(runs.parent_run_id, str(f), "report")  # type: ignore[attr-defined]
    return Report(study=runs, table=table, out_dir=out, figure=figure, page=page, table_file=table_file, table3=t3)


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
        help="print where everything went as one JSON object (for programs such as pipeline.demo) instead of the table",
    )
    args = p.parse_args(argv)

    from mlflow import MlflowClient

    from pipeline.tracking import resolve_uri

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
                    "table": report.table.text(),
                    **({"table3": report.table3.text()} if report.table3 else {}),
                }
            )
        )
        return 0
    print(report.table.text())
    if report.table3:
        print(report.table3.text())
    print(f"figure: {report.figure.resolve()}")
    print(f"report: {report.page.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
