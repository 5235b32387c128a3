"""Config loading: every bad key, type or combination fails before any work, naming the key."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from pipeline.config import ConfigError, TrainConfig, describe, flatten, load_config, to_toml

ROOT = Path(__file__).resolve().parent.parent
ALL_CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.toml") if "study" not in p.parts)


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "exp.toml"
    p.write_text(text)
    return p


def test_defaults_are_valid_and_named_after_file(tmp_path):
    cfg = load_config(write(tmp_path, ""))
    assert isinstance(cfg, TrainConfig)
    assert cfg.name == "exp"


def test_dotted_overrides_parse_values(tmp_path):
    cfg = load_config(write(tmp_path, "[optim]\nlr = 0.1\n"),
                      ["--optim.lr=0.4", "--schedule.milestones=[3, 6]", "--data.flip=false",
                       "--model.name=cifar_plain20", "--name=x"])
    assert cfg.optim.lr == 0.4 and cfg.schedule.milestones == [3, 6]
    assert cfg.data.flip is False and cfg.model.name == "cifar_plain20" and cfg.name == "x"


def test_int_is_accepted_for_float(tmp_path):
    assert load_config(write(tmp_path, "[optim]\nlr = 1\n")).optim.lr == 1.0


@pytest.mark.parametrize("text, overrides, needle", [
    ("[optim]\nlrr = 0.1\n", [], "unknown config key 'optim.lrr'"),
    ("", ["--optm.lr=1"], "unknown config key 'optm'"),
    ("[optim]\nlr = 'fast'\n", [], "optim.lr = 'fast'"),
    ("[data]\nbatch_size = 1.5\n", [], "data.batch_size = 1.5: expected an integer"),
    ("[precision]\ndtype = 'fp16'\n", [], "allowed values: 'fp32', 'bf16'"),
    ("[model]\nname = 'resnet19'\n", [], "model.name = 'resnet19' is not a registered model"),
    ("[model]\nshortcut = 'D'\n", [], "model.shortcut = 'D' is not allowed"),
    ("[model]\nname = 'cifar_plain20'\nshortcut = 'B'\n", [], "model:"),
    ("[distributed]\nzero_stage = 3\n", [], "distributed.zero_stage = 3: allowed values are 0 and 1"),
    ("[schedule]\nepochs = 10\nmilestones = [5, 3]\n", [], "strictly increasing"),
    ("[schedule]\nepochs = 10\nmilestones = [12]\n", [], "inside (0, 10)"),
    ("[data]\nsource = 'folder'\n", [], "data.root is empty"),
    ("[model]\nname = 'cifar_resnet20'\n[data]\nstyle = 'imagenet'\n", [], "CIFAR network"),
    ("optim = 3\n", [], "optim must be a table"),
    ("[optim\n", [], "not valid TOML"),
    ("", ["--optim.lr"], "has no '='"),
])
def test_bad_input_names_the_key(tmp_path, text, overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text), overrides)
    assert needle in str(e.value)


def test_missing_file_names_it(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, ""), ["--optim.lr=0.3", "--schedule.milestones=[2]"])
    again = load_config(write(tmp_path, to_toml(cfg)))
    assert again.to_dict() == cfg.to_dict() and again.hash() == cfg.hash()


def test_every_key_is_documented():
    lines = describe().splitlines()
    assert len(lines) == len(flatten(TrainConfig()))
    undocumented = [line for line in lines if line.endswith("# ")]
    assert not undocumented, undocumented


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_config_file_loads_and_builds_its_model(path):
    from pipeline.models import build_model

    tomllib.loads(path.read_text())
    cfg = load_config(path)
    model = build_model(cfg.model.name, num_classes=cfg.model.num_classes, **cfg.model.overrides())
    assert sum(p.numel() for p in model.parameters()) > 0
