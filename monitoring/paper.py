"""The paper's numbers (He et al. 2015) and the recipes they were measured with.

A paper number is shown next to ours only when the run followed the paper's recipe for that table;
otherwise the report says which part differs, so nobody compares a 3-minute CPU run with Table 6.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pipeline.tracking.study_runs import MemberRun


@dataclass(frozen=True)
class PaperTable:
    key: str  # "table2" or "table6"
    title: str
    metric: str  # what the paper's column measures
    note: str  # how it differs from what we measure
    top1: dict[tuple[bool, int], str]  # (residual, depth) -> the paper's top-1 error, as printed
    plain_note: str = ""  # shown in the plain column when the paper gives no number

    def paper_top1(self, member: MemberRun) -> str | None:
        return self.top1.get((member.residual, member.depth))


# Table 2: top-1 error (%, 10-crop testing) on ImageNet validation.
TABLE2 = PaperTable(
    key="table2",
    title="Table 2 (ImageNet, top-1 error %)",
    metric="paper, 10-crop",
    note="the paper tests 10 crops; our validation is one 224 center crop, which reads about 1-2 points higher",
    top1={(False, 18): "27.94", (False, 34): "28.54", (True, 18): "27.88", (True, 34): "25.03"},
)

# Table 6: classification error (%) on the CIFAR-10 test set; 110 also as mean±std of 5 runs.
TABLE6 = PaperTable(
    key="table6",
    title="Table 6 (CIFAR-10, test error %)",
    metric="paper",
    note="the paper reports the final test error after 64k iterations",
    top1={
        (True, 20): "8.75",
        (True, 32): "7.51",
        (True, 44): "7.17",
        (True, 56): "6.97",
        (True, 110): "6.43 (6.61±0.16)",
        (True, 1202): "7.93",
    },
    plain_note="the paper gives no numbers for them in Table 6, only the curves of Fig. 6",
)


def _global_batch(m: MemberRun) -> int:
    world = int(m.tags.get("world_size", "1"))
    return int(m.param("data.batch_size", 0)) * int(m.param("distributed.grad_accum", 1)) * world


def _effective_lr(m: MemberRun) -> float:
    return float(m.param("optim.lr", 0.0)) * _global_batch(m) / float(m.param("optim.reference_batch", 256))


Check = tuple[str, Callable[[MemberRun], bool]]

_COMMON: list[Check] = [
    ("SGD momentum 0.9", lambda m: abs(float(m.param("optim.momentum", 0)) - 0.9) < 1e-9),
    ("weight decay 1e-4", lambda m: abs(float(m.param("optim.weight_decay", 0)) - 1e-4) < 1e-12),
    ("option A shortcuts (zero-padding)", lambda m: not m.residual or m.shortcut == "A"),
]

_CIFAR: list[Check] = [
    ("CIFAR-10", lambda m: m.dataset == "cifar" and int(m.param("model.num_classes", 0)) == 10),
    ("batch 128 at lr 0.1", lambda m: _global_batch(m) == 128 and abs(_effective_lr(m) - 0.1) < 1e-9),
    (
        "64k iterations, lr /10 at 32k and 48k",
        lambda m: (
            int(m.param("schedule.max_steps", 0)) == 64000
            and m.param("schedule.unit") == "step"
            and list(m.param("schedule.milestones", [])) == [32000, 48000]
        ),
    ),
    (
        "ResNet-110 warm-up at lr 0.01 until train error < 80%",
        lambda m: m.depth < 110 or float(m.param("schedule.warmup_until_error", 0)) > 0,
    ),
]

_IMAGENET: list[Check] = [
    ("ImageNet (1000 classes)", lambda m: m.dataset == "imagenet" and int(m.param("model.num_classes", 0)) == 1000),
    (
        "lr 0.1 per 256 images",
        lambda m: _global_batch(m) > 0 and abs(_effective_lr(m) * 256 / _global_batch(m) - 0.1) < 1e-9,
    ),
    (
        "about 60e4 iterations at batch 256 (>= 100 epochs)",
        lambda m: (
            int(m.param("schedule.max_steps", 0)) * _global_batch(m) >= 0.9 * 60e4 * 256
            or int(m.param("schedule.epochs", 0)) >= 100
        ),
    ),
]


def table_for(members: list[MemberRun]) -> PaperTable:
    """Which of the paper's tables the study has the shape of: ImageNet networks -> Table 2."""
    return TABLE2 if any(m.stem == "imagenet" for m in members) else TABLE6


def recipe_mismatches(table: PaperTable, m: MemberRun) -> list[str]:
    """The parts of the paper's recipe this run does not follow (empty: the paper's number applies)."""
    checks = (_IMAGENET if table is TABLE2 else _CIFAR) + _COMMON
    return [what for what, ok in checks if not _safe(ok, m)]


def _safe(ok: Callable[[MemberRun], bool], m: MemberRun) -> bool:
    try:
        return bool(ok(m))
    except (TypeError, ValueError):
        return False
