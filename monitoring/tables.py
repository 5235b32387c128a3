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
    recipe_deviations,
    recipe_differences,
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


def _replica_cell(values: list[float]) -> str:
    """Seed replicas of one network as the paper gives its ResNet-110: mean ± sample std (n runs)."""
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{mean:.2f}±{std:.2f} (n={len(values)})"


def _paper_cell(paper: PaperTable, group: list[MemberRun]) -> str:
    """The paper's number for a row: its mean ± std where we have seed replicas and it has one, else its number
    (for Table 6's ResNet-110 marked as the best of its 5 runs, which one run of ours is compared with)."""
    printed = paper.paper_top1(group[0]) or "—"
    mean = paper.paper_mean(group[0])
    if mean is None:
        return printed
    return f"{mean} (mean of 5)" if len(group) > 1 else f"{printed} (best of 5)"


def _deviation_note(paper: PaperTable, members: list[MemberRun]) -> list[str]:
    """The deliberate deviations (monitoring.paper's) of the runs compared with the paper, stated once each."""
    deviations = dict.fromkeys(d for m in members for d in recipe_deviations(paper, member_params(m)))
    if not deviations:
        return []
    return ["Deliberate deviations from the paper's recipe in the compared runs: " + "; ".join(deviations) + "."]


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
    """The notes under the comparison table: where its paper numbers come from, or why there are none, the
    deliberate deviations of the runs they are compared with, and which runs had not finished."""
    notes: list[str] = []
    if any(show_paper.values()):
        notes.append(f"Paper column: {paper.note}.")
        notes += _deviation_note(paper, [m for m in study.members if matching.get((m.residual, m.depth))])
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


def _our_cells(group: list[MemberRun], *, with_top5: bool, unfinished: list[str]) -> list[str]:
    """Our top-1 (and top-5) for one network: one run's, or the mean ± std of its seed replicas."""
    mark = ""
    for m in group:
        if m.status != "FINISHED":
            mark = "*"
            unfinished.append(f"{m.label} ({m.status.lower()})")
    if not group:
        return ["—"] * (2 if with_top5 else 1)
    results = [final_errors(m) for m in group]
    if len(group) == 1:
        top1, top5, test = results[0]
        return [_marked(top1, test) + mark] + ([_marked(top5, test) + mark] if with_top5 else [])
    cells = []
    for k in (0, 1) if with_top5 else (0,):
        values = [r[k] for r in results if r[k] is not None]
        cells.append((_replica_cell(values) if len(values) > 1 else _fmt(values[0] if values else None)) + mark)
    return cells


def comparison_table(study: StudyRuns) -> Table:
    members = study.members
    paper = table_for(members)
    with_top5 = paper is TABLE2  # top-5 is reported for ImageNet only, as in the paper
    # Members of the same network (seed replicas: the same member config with another `seed`) share a row.
    groups: dict[tuple[bool, int], list[MemberRun]] = {}
    for m in members:
        groups.setdefault((m.residual, m.depth), []).append(m)
    depths = sorted({m.depth for m in members})

    # The paper's number goes next to ours only for runs that followed the paper's recipe.
    matching: dict[tuple[bool, int], bool] = {}
    differs: list[str] = []
    for key, group in groups.items():
        misses = {m.name: recipe_differences(paper, member_params(m)) for m in group}
        matching[key] = not any(misses.values())
        if paper.depth_top1(*key) is not None:
            differs += [f"{group[0].label}: {describe_recipe(d)}" for d in misses.values() if d][:1]
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
    unfinished: list[str] = []
    for d in depths:
        row = [str(d)]
        for res, _ in arches:
            group = groups.get((res, d), [])
            row += _our_cells(group, with_top5=with_top5, unfinished=unfinished)
            if show_paper[res]:
                row.append(_paper_cell(paper, group) if group and matching.get((res, d)) else "—")
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
        *_deviation_note(TABLE3, members),
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
