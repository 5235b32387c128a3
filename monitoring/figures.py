"""The Figure 4 / Figure 6 layout: error against iterations, plain nets left, ResNets right.

As in the paper, thin curves are training error and bold curves validation error, one colour per
depth (the same depth has the same colour in both panels).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a display

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from pipeline.tracking.study_runs import MemberRun  # noqa: E402

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


def plot_depth_curves(members: list[MemberRun], path: str | Path, *, title: str = "") -> Path:
    """Write the two-panel figure to ``path`` (PNG) and return it."""
    path = Path(path)
    depths = sorted({m.depth for m in members})
    color = {d: _COLORS[i % len(_COLORS)] for i, d in enumerate(depths)}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True)
    for ax, residual, name in ((axes[0], False, "plain"), (axes[1], True, "ResNet")):
        panel = sorted((m for m in members if m.residual == residual), key=lambda m: m.depth)
        handles = []
        for m in panel:
            c = color[m.depth]
            train = m.curves.get("train_top1_error", [])
            val = m.curves.get("val_top1_error", [])
            if train:
                ax.plot(*zip(*train, strict=True), color=c, linewidth=0.8, alpha=0.75)
            if val:
                ax.plot(
                    *zip(*val, strict=True), color=c, linewidth=2.4, marker="o" if len(val) < 4 else None, markersize=4
                )
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
            Line2D([], [], color="0.3", linewidth=0.8, label="train (thin)"),
            Line2D([], [], color="0.3", linewidth=2.4, label="val (bold)"),
        ]
        if handles:
            ax.legend(handles=handles[::-1] + style, loc="upper right", fontsize=8, frameon=True)
    axes[0].set_ylabel("error (%)")
    axes[0].set_ylim(*_ylim(members))
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
