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
from monitoring.finding import degradation_finding
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


MEASURES = ("layers", "per_channel", "branch")  # what a response_std.json holds (pipeline.runtime.diagnostics)


def response_stds(client: object, members: list[MemberRun]) -> dict[str, dict[str, list[float]]]:
    """Measure ("layers": over all elements, the paper's; "per_channel"; "branch": bottleneck outputs) -> member
    name -> its final response stds in layer order (``RESPONSE_STD_ARTIFACT``), for the members that logged one."""
    folder, name = RESPONSE_STD_ARTIFACT.rsplit("/", 1)
    # A few small JSON files: MLflow's per-download progress bars would only clutter the report's output.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    out: dict[str, dict[str, list[float]]] = {measure: {} for measure in MEASURES}
    with tempfile.TemporaryDirectory() as tmp:
        for m in members:
            listed = {a.path for a in client.list_artifacts(m.run_id, folder)}  # type: ignore[attr-defined]
            if RESPONSE_STD_ARTIFACT not in listed:
                continue
            local = client.download_artifacts(m.run_id, RESPONSE_STD_ARTIFACT, tmp)  # type: ignore[attr-defined]
            text = Path(local).read_text()
            for measure in MEASURES:
                values = list(read_response_std(text, measure=measure).values())
                if values:
                    out[measure][m.name] = values
    return out


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def residual_vs_plain(members: list[MemberRun], stds: dict[str, list[float]]) -> str:
    """Whether the ResNets' responses come out smaller than the plain nets' of the same depth, as in the paper's
    Figure 7, with the mean std over layers of each pair."""
    by = {(m.residual, m.depth): m for m in members if stds.get(m.name)}
    pairs = sorted(d for r, d in by if not r and (True, d) in by)
    if not pairs:
        return "No depth has both a plain and a residual net measured, so the paper's comparison cannot be made."
    last = max((s for m in by.values() for s, _ in m.curves.get("train_top1_error", [])), default=0)
    at = f" after {last} iterations" if last else ""
    said = []
    for d in pairs:
        plain, res = _mean(stds[by[(False, d)].name]), _mean(stds[by[(True, d)].name])
        said.append(f"{d} layers: ResNet {res:.3f} {'<' if res < plain else '>='} plain {plain:.3f}")
    smaller = [d for d in pairs if _mean(stds[by[(True, d)].name]) < _mean(stds[by[(False, d)].name])]
    verdict = (
        "smaller than the plain nets' at every depth, as in the paper"
        if len(smaller) == len(pairs)
        else "not smaller than the plain nets' at every depth, unlike the paper"
        if smaller
        else "not smaller than the plain nets' at any depth, unlike the paper"
    )
    return f"The ResNets' responses are {verdict}{at} (mean std over layers; " + "; ".join(said) + ")."


def _figure7_section(study: StudyRuns, measures: dict[str, dict[str, list[float]]], figure7: Path | None) -> list[str]:
    if figure7 is None:
        return []
    stds = measures.get("layers", {})
    means = ", ".join(f"{m.label} {_mean(stds[m.name]):.3f}" for m in study.members if stds.get(m.name))
    branch = (
        " Bottleneck nets: the last panel is each block's branch output (bn3, the response that meets the addition)."
        if measures.get("branch")
        else ""
    )
    return [
        "## Layer responses (Figure 7 layout)",
        "",
        "Std of each 3x3 layer's response (the output of its BN, before the addition and ReLU) at the end of "
        "training, on a fixed, class-stratified set of validation images (the first files of every class, the "
        "same for every net); top in layer order, then sorted by magnitude: the std over all N·C·H·W elements "
        "of a response (believed to be the paper's); the bottom panel takes the std per channel, then averages "
        f"over the channels (without the spread between the channels' BN offsets).{branch} Plain networks dashed, "
        "ResNets solid. The paper finds the ResNets' responses generally smaller than the plain nets'. "
        f"{residual_vs_plain(study.members, stds)} Mean over layers: {means}.",
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
    stds: dict[str, dict[str, list[float]]] | None = None,
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
            *([f"**{finding}**", ""] if (finding := degradation_finding(study.members)) else []),
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
    if stds["layers"]:
        figure7 = plot_response_std(
            runs.members,
            stds["layers"],
            out / "figure7.png",
            title=f"{runs.name}: std of the 3x3 layers' responses",
            per_channel=stds["per_channel"],
            branch=stds["branch"],
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
    finding = degradation_finding(report.study.members)
    if args.json:
        print(
            json.dumps(
                {
                    "finding": finding,
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
    if finding:
        print(finding)
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
