"""The paper's figures for a study's runs: Figure 4 / Figure 6 (error against iterations, plain nets left,
ResNets right) and Figure 7 (std of each 3x3 layer's response, in layer order and sorted by magnitude).

As in the paper, training error is dashed and validation (test) error solid and bold, one colour per depth
(the same depth has the same colour in both panels and in both figures); where a run follows the paper's
recipe, the paper's number is a star at the run's last step.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a display

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from pipeline.study.runs import MemberRun  # noqa: E402

_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#17becf", "#e377c2"]


def _ylim(members: list[MemberRun]) -> tuple[float, float]:
    """0 to just above the curves once the first 5% of training is past (the start would flatten the rest)."""
    values = []
    for m in members:
        for key in ("train_top1_error", "val_top1_error"):
            pts = m.curves.get(key, [])
            if not pts:
                continue
            cut = pts[-1][0] * 0.05
            values += [v for s, v in pts if s >= cut] or [v for _, v in pts]
    top = max(values, default=100.0)
    return 0.0, min(100.0, max(5.0, top * 1.1))


def _depth_colors(members: list[MemberRun]) -> dict[int, str]:
    depths = sorted({m.depth for m in members})
    return {d: _COLORS[i % len(_COLORS)] for i, d in enumerate(depths)}


def plot_depth_curves(
    members: list[MemberRun],
    path: str | Path,
    *,
    title: str = "",
    paper: dict[str, float] | None = None,
    heldout: str = "val",
) -> Path:
    """Write the two-panel figure to ``path`` (PNG) and return it. ``paper``: member name -> the paper's error
    for it, only for members whose recipe matches (drawn as a star); ``heldout``: what the solid curve is
    called ("val", or "test" for CIFAR-10)."""
    return _save(depth_curves_figure(members, title=title, paper=paper, heldout=heldout), path)


def _save(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def depth_curves_figure(
    members: list[MemberRun], *, title: str = "", paper: dict[str, float] | None = None, heldout: str = "val"
) -> plt.Figure:
    """The Figure 4/6 layout as a matplotlib figure (see :func:`plot_depth_curves`)."""
    paper = paper or {}
    color = _depth_colors(members)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True)
    for ax, residual, name in ((axes[0], False, "plain"), (axes[1], True, "ResNet")):
        panel = sorted((m for m in members if m.residual == residual), key=lambda m: m.depth)
        handles = []
        for m in panel:
            c = color[m.depth]
            train = m.curves.get("train_top1_error", [])
            val = m.curves.get("val_top1_error", [])
            if train:
                ax.plot(*zip(*train, strict=True), color=c, linewidth=1.0, linestyle="--", alpha=0.8)
            if val:
                ax.plot(
                    *zip(*val, strict=True), color=c, linewidth=2.4, marker="o" if len(val) < 4 else None, markersize=4
                )
            last = max((s for s, _ in train + val), default=0)
            if m.name in paper and last:
                ax.plot([last], [paper[m.name]], marker="*", markersize=13, color=c, markeredgecolor="k", zorder=5)
            handles.append(Line2D([], [], color=c, linewidth=2.4, label=f"{name}-{m.depth}"))
        if not panel:
            ax.text(
                0.5,
                0.5,
                f"no {name} members in this study",
                ha="center",
                va="center",
                transform=ax.transAxes,
                color="0.4",
            )
        ax.set_title("plain networks" if not residual else "ResNets")
        ax.set_xlabel("iter.")
        ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 3))
        ax.grid(True, linewidth=0.3, alpha=0.5)
        style = [
            Line2D([], [], color="0.3", linewidth=1.0, linestyle="--", label="train (dashed)"),
            Line2D([], [], color="0.3", linewidth=2.4, label=f"{heldout} (bold)"),
        ]
        if any(m.name in paper for m in panel):
            style.append(Line2D([], [], color="0.3", marker="*", markersize=11, linestyle="", label="paper"))
        if handles:
            ax.legend(handles=handles[::-1] + style, loc="upper right", fontsize=8, frameon=True)
    axes[0].set_ylabel("error (%)")
    axes[0].set_ylim(*_ylim(members))
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def plot_response_std(
    members: list[MemberRun],
    stds: dict[str, list[float]],
    path: str | Path,
    *,
    title: str = "",
    per_channel: dict[str, list[float]] | None = None,
    branch: dict[str, list[float]] | None = None,
) -> Path:
    """Figure 7's layout: each member's 3x3-layer response std (``stds``: member name -> values in layer order,
    over all elements) against the layer index, top in layer order and below sorted by magnitude; then, where
    given, the per-channel std (``per_channel``) in layer order and the bottleneck branch outputs (``branch``).
    Plain nets dashed, ResNets solid, one colour per depth. Writes ``path`` (PNG) and returns it."""
    color = _depth_colors(members)
    panels = [
        (stds, False, "layer index (original)", "std (all elements)"),
        (stds, True, "layer index (sorted by magnitude)", "std (all elements)"),
    ]
    if per_channel:
        panels.append((per_channel, False, "layer index (original)", "std per channel, averaged"))
    if branch:
        panels.append((branch, False, "block index (bottleneck branch output, bn3)", "std (all elements)"))
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 3.6 * len(panels)), squeeze=False)
    for ax, (values_of, ordered, xlabel, ylabel) in zip(axes[:, 0], panels, strict=True):
        for m in sorted(members, key=lambda m: (m.residual, m.depth)):
            values = values_of.get(m.name)
            if not values:
                continue
            style = {"color": color[m.depth], "linestyle": "-" if m.residual else "--", "linewidth": 1.4}
            ax.plot(
                range(1, len(values) + 1), sorted(values, reverse=True) if ordered else values, label=m.label, **style
            )
        ax.set_xlabel(xlabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # layers are counted, not measured
        ax.set_ylabel(ylabel)
        ax.grid(True, linewidth=0.3, alpha=0.5)
        ax.set_ylim(bottom=0)
        ax.legend(loc="best", fontsize=8, frameon=True)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _save(fig, path)
