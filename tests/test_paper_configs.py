"""Every config in configs/ against the paper: the paper configs build the paper's networks (Table 1's
multiply-adds, the stride on the first 1x1) and pass the report's recipe check with the params a run of them would
log; the modern (v1.5, rrc, cosine) and CPU demo configs are flagged, each with what differs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from monitoring.paper import (
    CIFAR10_SHA256,
    TABLE2,
    TABLE3,
    TABLE6,
    Params,
    describe_recipe,
    recipe_deviations,
    recipe_differences,
    tables_for_params,
)
from pipeline.config import TrainConfig, flatten, load_config
from pipeline.models import build_model, model_spec
from pipeline.models.flops import count_macs
from pipeline.study.runner import member_config, read_study
from pipeline.tracking.datasets import dataset_name

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"


def _files(folder: str) -> list[Path]:
    return sorted(p for p in (CONFIGS / folder).glob("*.toml") if not p.name.startswith("_"))


PAPER = _files("imagenet") + _files("cifar10")
MODERN = _files("imagenet/modern")
CPU = _files("cpu")

# Table 1's multiply-adds (x 1e9) of the ImageNet networks the paper costs.
TABLE1_GMACS = {"resnet18": 1.8, "resnet34": 3.6, "resnet50": 3.8, "resnet101": 7.6, "resnet152": 11.3}


def intended_world_size(path: Path) -> int:
    """The ranks each config is sized for (its first comment): ImageNet one 8-GPU node (ResNet-152 four), else 1."""
    if path.parent.name == "cpu" or path.parent.name == "cifar10":
        return 1
    return 32 if path.stem == "resnet152" else 8


def run_params(cfg: TrainConfig, *, world_size: int) -> dict[str, str]:
    """The params a run of ``cfg`` on ``world_size`` ranks logs (pipeline.wiring: flatten(cfg) plus identity)."""
    spec = model_spec(cfg.model.name, num_classes=cfg.model.num_classes, **cfg.model.overrides())
    global_batch = cfg.data.batch_size * cfg.distributed.grad_accum * world_size
    identity = {
        **spec.tags(),
        "dataset": dataset_name(cfg.data),
        "global_batch": str(global_batch),
        "world_size": str(world_size),
    }
    return {**flatten(cfg), **identity}


def _differences(params: dict[str, str]) -> dict[str, list[str]]:
    return {t.key: [d.run for d in recipe_differences(t, params)] for t in tables_for_params(params)}


@pytest.mark.parametrize("path", PAPER, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_paper_configs_follow_the_papers_recipe(path: Path) -> None:
    params = run_params(load_config(path), world_size=intended_world_size(path))
    diffs = _differences(params)
    assert diffs and all(not d for d in diffs.values()), f"{path.name}: {diffs}"


@pytest.mark.parametrize("path", MODERN + CPU, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_modern_and_cpu_configs_are_flagged(path: Path) -> None:
    params = run_params(load_config(path), world_size=intended_world_size(path))
    diffs = _differences(params)
    assert diffs and all(diffs.values()), f"{path.name} passes the recipe check: {diffs}"


def test_what_the_check_says_for_the_modern_recipe() -> None:
    params = run_params(load_config(CONFIGS / "imagenet/modern/resnet50.toml"), world_size=8)
    text = describe_recipe(recipe_differences(TABLE3, params))
    assert text.startswith("paper recipe except: ")
    for what in ("rrc augmentation", "lighting 0.0", "cosine schedule", "no weight decay on BN and biases", "v1.5"):
        assert what in text, text
    digits = run_params(load_config(CONFIGS / "cpu/digits_resnet20.toml"), world_size=1)
    assert "digits data" in describe_recipe(recipe_differences(TABLE6, digits))
    # The same network on the paper's recipe but at another batch without the linear rule: flagged.
    off = run_params(load_config(CONFIGS / "imagenet/resnet34.toml", ["optim.reference_batch=512"]), world_size=8)
    assert [d.run for d in recipe_differences(TABLE2, off)] == ["lr 0.05 per 256 images"]


@pytest.mark.parametrize("path", _files("study"), ids=lambda p: p.name)
def test_study_members_are_checked_like_their_configs(path: Path) -> None:
    study = read_study(path)
    for member in study.members:
        cfg = member_config(study, member)
        params = run_params(cfg, world_size=member.nproc or study.nproc)
        diffs = _differences(params)
        if study.name.startswith("digits_") or study.name.endswith("_cpu"):  # CPU demos and cut schedules
            assert all(diffs.values()), member.name
        else:
            assert not any(diffs.values()), f"{study.name}/{member.name}: {diffs}"


@pytest.mark.parametrize("path", [p for p in PAPER if p.stem in TABLE1_GMACS], ids=lambda p: p.stem)
def test_paper_imagenet_configs_cost_what_table1_says(path: Path) -> None:
    cfg = load_config(path)
    with torch.device("meta"):
        model = build_model(cfg.model.name, num_classes=cfg.model.num_classes, **cfg.model.overrides())
    gmacs = count_macs(model, (3, cfg.data.image_size, cfg.data.image_size)) / 1e9
    paper = TABLE1_GMACS[cfg.model.name]
    assert abs(gmacs - paper) <= 0.03 * paper, f"{path.name}: {gmacs:.2f} G multiply-adds, Table 1 says {paper}"
    spec = model_spec(cfg.model.name, **cfg.model.overrides())
    if spec.block == "bottleneck":
        assert spec.stride_in == "1x1", f"{path.name}: the paper's bottleneck strides on the first 1x1"
        modern = load_config(CONFIGS / "imagenet/modern" / path.name)
        assert model_spec(modern.model.name, **modern.model.overrides()).stride_in == "3x3"  # v1.5, named so


def test_paper_tables_hold_the_papers_numbers() -> None:
    assert [TABLE2.depth_top1(r, d) for r, d in ((False, 18), (False, 34), (True, 18), (True, 34))] == [
        "27.94",
        "28.54",
        "27.88",
        "25.03",
    ]
    assert list(TABLE3.top1.values()) == ["25.03", "24.52", "24.19", "22.85", "21.75", "21.43"]
    assert list(TABLE3.top5.values()) == ["7.76", "7.46", "7.40", "6.71", "6.05", "5.71"]
    assert TABLE6.depth_top1(True, 1202) == "7.93"


@pytest.mark.parametrize("path", _files("cifar10"), ids=lambda p: p.stem)
def test_cifar_paper_configs_start_residual_branches_small_and_plain_nets_as_the_paper(path: Path) -> None:
    """The fix that lets ResNet-44/56/110 train at lr 0.1 from step 0 (benchmarks/RESULTS.md): the BN that closes
    each residual branch starts in [0, 1), every other BN at 1; a plain net is the paper's start, bit for bit
    (same weights as bn_weight_init = "ones" from the same seed). The ImageNet configs keep torchvision's start."""
    cfg = load_config(path, [])
    assert cfg.model.bn_weight_init == "uniform_residual"
    overrides = cfg.model.overrides()
    torch.manual_seed(0)
    model = build_model(cfg.model.name, num_classes=cfg.model.num_classes, **overrides)
    last = {id(b.last_bn()) for b in model.blocks()} if model.spec.residual else set()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    closing = torch.cat([m.weight.detach() for m in bns if id(m) in last] or [torch.zeros(0)])
    others = torch.cat([m.weight.detach() for m in bns if id(m) not in last])
    assert (others == 1).all()
    if model.spec.residual:
        assert 0 <= closing.min() and closing.max() < 1 and 0.4 < closing.mean() < 0.6, closing.mean()
    else:
        torch.manual_seed(0)
        paper = build_model(
            cfg.model.name, num_classes=cfg.model.num_classes, **{**overrides, "bn_weight_init": "ones"}
        )
        assert all(
            torch.equal(a, b) for a, b in zip(model.state_dict().values(), paper.state_dict().values(), strict=True)
        )


@pytest.mark.parametrize("path", _files("imagenet") + MODERN, ids=lambda p: p.stem)
def test_imagenet_configs_start_bn_scales_at_one(path: Path) -> None:
    assert load_config(path, []).model.bn_weight_init == "ones"


# Each override of a paper config that changes the experiment, and what the report then says it did instead.
RECIPE_HOLES = [
    ("cifar10/cifar_resnet56.toml", 1, ["optim.nesterov=true"], "Nesterov momentum"),
    ("cifar10/cifar_resnet56.toml", 1, ["optim.grad_clip=1"], "gradient norm clipped at 1.0"),
    ("cifar10/cifar_resnet56.toml", 1, ["model.zero_init_residual=true"], "zero-initialised last BN"),
    ("cifar10/cifar_resnet56.toml", 1, ['data.val_dir="train"'], "error measured on the training split"),
    ("cifar10/cifar_resnet56.toml", 1, ['data.root_sha256=""'], "CIFAR-10 data not identified"),
    ("cifar10/cifar_resnet56.toml", 1, ["schedule.warmup_until_error=80"], "warm-up until error 80.0"),
    ("cifar10/cifar_resnet110.toml", 1, ["schedule.warmup_until_error=99"], "warm-up until error 99.0"),
    ("cifar10/cifar_resnet110.toml", 1, ["schedule.warmup_until_error=1"], "warm-up until error 1.0"),
    ("cifar10/cifar_resnet110.toml", 1, ["schedule.warmup_until_error=0"], "no warm-up"),
    ("imagenet/resnet50.toml", 256, ["schedule.warmup=5"], "global batch 8192"),
    ("imagenet/resnet50.toml", 8, ["data.batch_size=256", "schedule.warmup=5"], "global batch 2048"),
    ("imagenet/resnet34.toml", 4, ["schedule.warmup=0"], "global batch 128"),
]


@pytest.mark.parametrize(("path", "world", "overrides", "said"), RECIPE_HOLES, ids=lambda v: str(v))
def test_every_key_that_changes_the_experiment_is_named(path: str, world: int, overrides: list[str], said: str) -> None:
    params = run_params(load_config(CONFIGS / path, overrides), world_size=world)
    (table,) = tables_for_params(params)[-1:]
    text = describe_recipe(recipe_differences(table, params))
    assert text.startswith("paper recipe except: ") and said in text, text


def test_a_cifar_subset_or_another_copy_of_cifar10_is_told_by_its_sizes() -> None:
    cfg = load_config(CONFIGS / "cifar10/cifar_resnet56.toml", ['data.root_sha256=""'])
    params = run_params(cfg, world_size=1)
    # Another copy of CIFAR-10 (no known sha256): its logged split sizes say it is CIFAR-10 ...
    assert not recipe_differences(TABLE6, {**params, "train_samples": "50000", "val_samples": "10000"})
    # ... and a 45,000-image training subset is not, whatever archive it came from.
    for extra in ({"train_samples": "45000", "val_samples": "5000"}, {"train_samples": "45000"}):
        subset = {**params, "data.root_sha256": CIFAR10_SHA256, **extra}
        text = describe_recipe(recipe_differences(TABLE6, subset))
        assert "45,000 train" in text and "images" in text and "CIFAR-10 data" not in text, text


def test_the_known_cifar10_archive_is_the_one_the_paper_configs_read() -> None:
    assert load_config(CONFIGS / "cifar10/cifar_resnet20.toml").data.root_sha256 == CIFAR10_SHA256


@pytest.mark.parametrize("kind", ["multistep", "step"])
def test_step_schedule_is_the_papers_multistep(kind: str) -> None:
    for path, world in (("cifar10/cifar_resnet20.toml", 1), ("imagenet/resnet34.toml", 8)):
        params = run_params(load_config(CONFIGS / path, [f'schedule.kind="{kind}"']), world_size=world)
        assert not any(d for d in _differences(params).values()), (path, _differences(params))


@pytest.mark.parametrize("path", PAPER, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_paper_configs_state_their_deliberate_deviations(path: Path) -> None:
    """What the paper configs do differently on purpose passes the check, but the report states it, and the
    config's first comment says so too."""
    params = run_params(load_config(path), world_size=intended_world_size(path))
    (table,) = tables_for_params(params)[-1:]
    deviations = recipe_deviations(table, params)
    assert any("bf16 autocast" in d for d in deviations) and any("fan_out" in d for d in deviations)
    assert any("per-channel mean/std" in d for d in deviations) != bool(load_config(path).data.mean_image)
    if table is TABLE6:
        # the BN-scale start is a deviation only where there is a residual branch: a plain net starts as the paper
        assert any("U[0, 1)" in d for d in deviations) == Params(params).residual
        assert any("BN statistics" in d for d in deviations)
    base = (path.parent / "_paper.toml").read_text().split("\n\n")[0].lower()
    for said in ("bf16", "fan_out", "per-pixel mean") + (("u[0, 1)", "2 gpus x 64") if table is TABLE6 else ()):
        assert said in base, f"{path.parent.name}/_paper.toml's first comment does not state {said!r}"


def test_resnet110_seed_replicas_are_compared_with_the_papers_mean() -> None:
    from test_report import CIFAR_RECIPE
    from test_report import _member as report_member

    from monitoring.tables import comparison_table
    from pipeline.study.runs import StudyRuns

    params = dict(CIFAR_RECIPE, **{"schedule.warmup_until_error": "80.0"})
    replicas = []
    for seed, err in enumerate((6.5, 6.7, 6.9)):
        m = report_member(110, True, top1=err, top5=0.0, dataset="cifar", params=params, stem="cifar")
        m.name, m.tags["world_size"] = f"resnet110_s{seed}", "1"
        replicas.append(m)
    table = comparison_table(StudyRuns("t6", "p", "1", "uri", replicas))
    assert table.rows == [["110", "—", "6.70±0.20 (n=3)", "6.61±0.16 (mean of 5)"]]
    one = comparison_table(StudyRuns("t6", "p", "1", "uri", replicas[:1]))
    assert one.rows == [["110", "—", "6.50", "6.43 (best of 5)"]]
