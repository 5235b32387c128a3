"""The Table 2 / Table 6 comparison (final error per depth, plain and residual side by side) and Table 3
(ImageNet ResNets by shortcut option and depth, top-1 and top-5, beside the paper's)."""

from __future__ import annotations

from dataclasses import dataclass, field

from monitoring.paper import (
    TABLE2,
    TABLE3,
    PaperTable,
    describe_recipe,
    member_params,
    recipe_differences,
    recipe_mismatches,
    table_for,
)
from pipeline.study.runs import MemberRun, StudyRuns


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        lines = ([f"**{self.title}**", ""] if self.title else []) + [
            "| " + " | ".join(self.columns) + " |",
            "|" + "|".join("---:" for _ in self.columns) + "|",
        ]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        if self.notes:
            lines += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"

    def text(self) -> str:
        """Aligned columns for the terminal."""
        widths = [
            max(len(c), *(len(r[i]) for r in self.rows)) if self.rows else len(c) for i, c in enumerate(self.columns)
        ]
        fmt = "  ".join(f"{{:>{w}}}" for w in widths)
        lines = ([self.title] if self.title else []) + [fmt.format(*self.columns), "  ".join("-" * w for w in widths)]
        lines += [fmt.format(*r) for r in self.rows]
        lines += [f"  {n}" for n in self.notes]
        return "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


# The evaluations `python -m pipeline.evaluate` logs to the run it evaluated, best first: the paper's own tests.
EVAL_MODES = (("10crop", "10-crop"), ("multiscale", "multi-scale"))


def final_errors(m: MemberRun) -> tuple[float | None, float | None, str]:
    """The member's top-1 and top-5 error (%) and how they were measured: a 10-crop or multi-scale evaluation
    when the run has one, else the centre-crop validation logged during training ("")."""
    for mode, label in EVAL_MODES:
        if f"eval_{mode}_top1_error" in m.final:
            return m.final[f"eval_{mode}_top1_error"], m.final.get(f"eval_{mode}_top5_error"), label
    return m.final.get("val_top1_error"), m.final.get("val_top5_error"), ""


def _marked(value: float | None, test: str) -> str:
    return _fmt(value) + (f" ({test})" if test and value is not None else "")


def _comparison_notes(
    study: StudyRuns,
    paper: PaperTable,
    *,
    depths: list[int],
    matching: dict[tuple[bool, int], bool],
    show_paper: dict[bool, bool],
    differs: list[str],
    unfinished: list[str],
) -> list[str]:
    """The notes under the comparison table: where its paper numbers come from, or why there are none, and which
    runs had not finished."""
    notes: list[str] = []
    if any(show_paper.values()):
        notes.append(f"Paper column: {paper.note}.")
    if paper.plain_note and any(matching.get((False, d)) for d in depths):
        notes.append(f"Plain nets: {paper.plain_note}.")
    if differs:
        notes.append(
            "Paper numbers not compared where the recipe differs from the paper's: " + "; ".join(differs) + "."
        )
    if not any(show_paper.values()) and not differs:
        datasets = ", ".join(sorted(study.datasets)) or "unknown"
        notes.append(f"No paper numbers: the paper has none for this dataset ({datasets}) and depths.")
    if unfinished:
        notes.append("* not finished: " + ", ".join(unfinished) + "; the last logged value is shown.")
    return notes


def comparison_table(study: StudyRuns) -> Table:
    members = study.members
    paper = table_for(members)
    with_top5 = paper is TABLE2  # top-5 is reported for ImageNet only, as in the paper
    by_key = {(m.residual, m.depth): m for m in members}
    depths = sorted({m.depth for m in members})

    # The paper's number goes next to ours only for runs that followed the paper's recipe.
    matching: dict[tuple[bool, int], bool] = {}
    differs: list[str] = []
    for m in members:
        miss = recipe_mismatches(paper, m)
        matching[(m.residual, m.depth)] = not miss
        if miss and paper.depth_top1(m.residual, m.depth) is not None:
            differs.append(f"{m.label}: {', '.join(miss)}")
    arches = [(False, "plain"), (True, "ResNet")]
    show_paper = {res: any(matching.get((res, d)) and paper.depth_top1(res, d) for d in depths) for res, _ in arches}

    columns = ["layers"]
    for res, name in arches:
        columns.append(f"{name} top-1")
        if with_top5:
            columns.append(f"{name} top-5")
        if show_paper[res]:
            columns.append(f"{name} top-1 ({paper.metric})")
    rows = []
    unfinished = []
    for d in depths:
        row = [str(d)]
        for res, _ in arches:
            m = by_key.get((res, d))
            top1, top5, test = final_errors(m) if m else (None, None, "")
            mark = ""
            if m is not None and m.status != "FINISHED":
                mark = "*"
                unfinished.append(f"{m.label} ({m.status.lower()})")
            row.append(_marked(top1, test) + mark)
            if with_top5:
                row.append(_marked(top5, test) + mark)
            if show_paper[res]:
                value = paper.depth_top1(res, d) if m is not None and matching.get((res, d)) else None
                row.append(value or "—")
        rows.append(row)

    notes = _comparison_notes(
        study, paper, depths=depths, matching=matching, show_paper=show_paper, differs=differs, unfinished=unfinished
    )
    title = f"{paper.title.split(' (')[0]} layout: {study.name}, final validation error (%)"
    return Table(title=title, columns=columns, rows=rows, notes=notes)


def table3(study: StudyRuns) -> Table | None:
    """Table 3's layout for the study's ImageNet ResNets that have a row in it (34 A/B/C, 50, 101, 152): our top-1
    and top-5, how they were tested, the paper's, and the recipe beside them. None when no member has a row."""
    members = [m for m in study.members if m.stem == "imagenet" and TABLE3.paper_top1(m) is not None]
    if not members:
        return None
    order = list(TABLE3.top1)
    members.sort(key=lambda m: order.index(TABLE3.net(m)))
    rows = []
    for m in members:
        top1, top5, test = final_errors(m)
        diffs = recipe_differences(TABLE3, member_params(m))
        unfinished = "" if m.status == "FINISHED" else f" ({m.status.lower()})"
        rows.append(
            [
                f"{m.label} {m.shortcut}" + unfinished,
                _fmt(top1),
                _fmt(top5),
                test or "center crop",
                TABLE3.paper_top1(m) or "—",
                TABLE3.paper_top5(m) or "—",
                describe_recipe(diffs),
            ]
        )
    notes = [
        f"Paper columns: {TABLE3.note}.",
        'The paper\'s numbers are ours to compare only where the recipe column says "paper recipe"; otherwise '
        "it lists what this run did differently.",
    ]
    return Table(
        title=f"Table 3 layout: {study.name}, ImageNet validation error (%)",
        columns=["network", "top-1", "top-5", "test", "paper top-1 (10-crop)", "paper top-5 (10-crop)", "recipe"],
        rows=rows,
        notes=notes,
    )


def member_summary(members: list[MemberRun]) -> Table:
    """One line per member run, for the page: what ran, how far, and where to find it."""
    rows = []
    for m in members:
        steps = max((s for s, _ in m.curves.get("train_top1_error", [])), default=0)
        rows.append(
            [
                m.name,
                m.label,
                m.shortcut,
                m.dataset,
                m.tags.get("world_size", "?"),
                str(steps),
                _fmt(m.final.get("val_top1_error")),
                m.status.lower(),
                m.run_id,
            ]
        )
    return Table(
        title="",
        columns=["member", "network", "shortcut", "dataset", "ranks", "iterations", "val top-1", "status", "run id"],
        rows=rows,
    )
