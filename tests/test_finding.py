"""monitoring.finding: the sentence a study's training errors support, and the plain word when they do not."""

from __future__ import annotations

import pytest

from monitoring.finding import degradation_finding, final_train_error
from pipeline.study.runs import MemberRun


def _member(depth: int, residual: bool, end: float) -> MemberRun:
    # 100 logged steps: the error falls to `end`, with the last 10% of steps wandering +-1 around it.
    curve = [(s, 90.0 - (90.0 - end) * s / 90) for s in range(1, 91)]
    curve += [(s, end + (1.0 if s % 2 else -1.0)) for s in range(91, 101)]
    return MemberRun(
        name=f"{'resnet' if residual else 'plain'}{depth}",
        run_id="0" * 32,
        status="FINISHED",
        depth=depth,
        residual=residual,
        shortcut="A" if residual else "none",
        dataset="digits",
        stem="cifar",
        params={},
        tags={},
        final={},
        curves={"train_top1_error": curve},
    )


def test_the_end_of_a_curve_is_its_last_tenth_averaged() -> None:
    assert final_train_error(_member(20, False, 12.0)) == pytest.approx(12.0)


@pytest.mark.parametrize(
    "plain20, plain56, resnet56, says",
    [
        (
            5.0,
            30.0,
            3.0,
            "plain-56 ends at 30.0% training error, plain-20 at 5.0%: the deeper plain net is worse, the "
            "degradation problem. ResNet-56 ends at 3.0%: the shortcuts remove it.",
        ),
        (5.0, 30.0, 29.5, "ResNet-56 ends at 29.5%, no better: this run does not show the shortcuts' cure."),
        (5.0, 5.5, 3.0, "the deeper plain net is not worse, so this run does not show the degradation problem."),
        (5.0, 3.0, 3.0, "plain-56 ends at 3.0% training error, plain-20 at 5.0%: the deeper plain net is not worse"),
    ],
)
def test_the_sentence_says_what_the_errors_show_and_only_that(
    plain20: float, plain56: float, resnet56: float, says: str
) -> None:
    members = [
        _member(20, False, plain20),
        _member(56, False, plain56),
        _member(20, True, 4.0),
        _member(56, True, resnet56),
    ]
    assert says in (degradation_finding(members) or "")


def test_one_plain_depth_supports_no_sentence() -> None:
    assert degradation_finding([_member(20, False, 5.0), _member(20, True, 4.0)]) is None
