"""The report's figures drawn as the paper draws them: Figure 4/6 (training error dashed, held-out error solid,
the paper's number as a star where the recipe matches) and Figure 7 (3x3 response std, in layer order and
sorted). In-memory runs; tests/test_diagnostics.py reads a real study's Figure 7 back from a real mlflow server."""

from __future__ import annotations

from pathlib import Path

from test_report import CIFAR_RECIPE
from test_report import _member as report_member

from monitoring.figures import depth_curves_figure, plot_response_std
from monitoring.report import paper_marks
from pipeline.study.runs import MemberRun


def _member(depth: int, residual: bool, params: dict[str, str]) -> MemberRun:
    """test_report's in-memory member on one rank, with a training and a test curve."""
    curve = [(s, 50.0 - s / 2000) for s in range(4000, 64001, 4000)]
    m = report_member(depth, residual, top1=curve[-1][1], top5=0.0, dataset="cifar", params=params, stem="cifar")
    m.tags["world_size"] = "1"
    m.curves = {"train_top1_error": [(s, v - 5) for s, v in curve], "val_top1_error": curve}
    return m


def test_paper_numbers_mark_only_the_runs_that_follow_the_recipe() -> None:
    off_recipe = dict(CIFAR_RECIPE, **{"optim.lr": "0.4"})
    members = [
        _member(20, False, CIFAR_RECIPE),  # the paper gives no plain number in Table 6
        _member(20, True, CIFAR_RECIPE),
        _member(56, True, off_recipe),
    ]
    assert paper_marks(members) == {"resnet20": 8.75}


def test_figure6_draws_training_dashed_heldout_solid_and_the_paper_star() -> None:
    members = [_member(20, False, CIFAR_RECIPE), _member(20, True, CIFAR_RECIPE)]
    fig = depth_curves_figure(members, paper={"resnet20": 8.75}, heldout="test")
    plain, resnet = fig.axes
    styles = [(line.get_linestyle(), line.get_marker()) for line in resnet.lines]
    assert ("--", "None") in styles and ("-", "None") in styles  # train dashed, test solid
    (star,) = [line for line in resnet.lines if line.get_marker() == "*"]
    assert list(star.get_xdata()) == [64000] and list(star.get_ydata()) == [8.75]
    assert not [line for line in plain.lines if line.get_marker() == "*"]
    labels = [t.get_text() for t in resnet.get_legend().get_texts()]
    assert {"train (dashed)", "test (bold)", "paper"} <= set(labels)


def test_figure7_has_the_layer_order_and_the_sorted_panel(tmp_path: Path) -> None:
    members = [_member(20, False, CIFAR_RECIPE), _member(20, True, CIFAR_RECIPE)]
    stds = {"plain20": [1.0, 3.0, 2.0], "resnet20": [0.5, 0.7, 0.6]}
    path = plot_response_std(members, stds, tmp_path / "f7.png")
    assert path.stat().st_size > 5_000


def test_figure7_draws_per_channel_and_bottleneck_branch_panels_when_recorded(tmp_path: Path) -> None:
    from monitoring.report import residual_vs_plain

    members = [_member(20, False, CIFAR_RECIPE), _member(20, True, CIFAR_RECIPE)]
    stds = {"plain20": [1.0, 3.0, 2.0], "resnet20": [0.5, 0.7, 0.6]}
    per_channel = {"plain20": [0.9, 1.0, 1.1], "resnet20": [0.4, 0.5, 0.5]}
    path = plot_response_std(members, stds, tmp_path / "f7.png", per_channel=per_channel, branch={"resnet20": [0.3]})
    assert path.stat().st_size > 5_000
    said = residual_vs_plain(members, stds)
    assert said.startswith("The ResNets' responses are smaller than the plain nets' at every depth, as in the paper")
    assert "after 64000 iterations" in said and "ResNet 0.600 < plain 2.000" in said
    flipped = residual_vs_plain(members, {"plain20": [0.5], "resnet20": [1.0]})
    assert "not smaller than the plain nets' at any depth, unlike the paper" in flipped
    assert "cannot be made" in residual_vs_plain(members[:1], stds)
