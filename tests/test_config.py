"""Config loading: every bad key, type or combination fails before any work, naming the key."""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
import tomllib
import typing
from pathlib import Path

import pytest

from pipeline.config import (
    ConfigError,
    DataConfig,
    TrainConfig,
    config_from_dict,
    describe,
    describe_path,
    flatten,
    load_config,
    to_toml,
)

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
    cfg = load_config(
        write(tmp_path, "[optim]\nlr = 0.1\n"),
        [
            "--optim.lr=0.4",
            "--schedule.milestones=[3, 6]",
            "--data.flip=false",
            "--model.name=cifar_plain20",
            "--name=x",
        ],
    )
    assert cfg.optim.lr == 0.4 and cfg.schedule.milestones == [3, 6]
    assert cfg.data.flip is False and cfg.model.name == "cifar_plain20" and cfg.name == "x"


def test_int_is_accepted_for_float(tmp_path):
    assert load_config(write(tmp_path, "[optim]\nlr = 1\n")).optim.lr == 1.0


@pytest.mark.parametrize(
    "text, overrides, needle",
    [
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
    ],
)
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


def test_every_toml_under_configs_is_valid_toml():
    for path in (ROOT / "configs").rglob("*.toml"):
        tomllib.loads(path.read_text())


def _significant_lines(path: Path) -> list[str]:
    """The file's lines without blank lines, comments and trailing comments (a '#' in a string stays)."""
    out = []
    for line in path.read_text().splitlines():
        quote, code = "", line
        for i, c in enumerate(line):
            if quote:
                quote = "" if c == quote else quote
            elif c in "\"'":
                quote = c
            elif c == "#":
                code = line[:i]
                break
        if code.strip():
            out.append(code.strip())
    return out


def test_no_two_config_files_share_six_lines():
    """A recipe lives in one base file; a config repeats none of it (the test that keeps it that way)."""
    run = 6
    seen: dict[tuple[str, ...], Path] = {}
    shared = []
    for path in sorted((ROOT / "configs").rglob("*.toml")):
        lines = _significant_lines(path)
        windows = {tuple(lines[i : i + run]) for i in range(len(lines) - run + 1)}
        for w in windows:
            if w in seen:
                shared.append(f"{seen[w].relative_to(ROOT)} and {path.relative_to(ROOT)} share:\n  " + "\n  ".join(w))
            else:
                seen[w] = path
    assert not shared, "move the shared lines into a base file (base = ...):\n" + "\n".join(shared[:3])


def test_bases_chain_merge_tables_and_never_name_the_run(tmp_path):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "_root.toml").write_text(
        'name = "root"\nlog_every = 3\n[optim]\nlr = 0.2\nmomentum = 0.8\n[schedule]\nepochs = 20\n'
        "milestones = [5, 10]\n"
    )
    (tmp_path / "recipes" / "_mid.toml").write_text('base = "_root.toml"\nname = "mid"\n[optim]\nlr = 0.3\n')
    child = tmp_path / "exp.toml"
    child.write_text('base = "recipes/_mid.toml"\n[schedule]\nmilestones = [15]\n[data]\nflip = false\n')
    cfg = load_config(child, ["--optim.momentum=0.7"])
    assert cfg.name == "exp"  # the file given names the run, never a base
    assert (cfg.log_every, cfg.optim.lr, cfg.optim.momentum) == (3, 0.3, 0.7)
    assert (cfg.schedule.epochs, cfg.schedule.milestones, cfg.data.flip) == (20, [15], False)  # a list is replaced
    child.write_text('base = "recipes/_mid.toml"\nname = "mine"\n')
    assert load_config(child).name == "mine"


@pytest.mark.parametrize(
    "files, needle",
    [
        ({"exp.toml": 'base = "nope.toml"\n'}, "names base = 'nope.toml'"),
        ({"exp.toml": 'base = "b.toml"\n', "b.toml": "[optim\n"}, "is not valid TOML"),
        ({"exp.toml": 'base = "b.toml"\n', "b.toml": 'base = "exp.toml"\n'}, "a cycle"),
        ({"exp.toml": 'base = "exp.toml"\n'}, "a cycle"),
        ({"exp.toml": "base = 3\n"}, "base = 3"),
    ],
)
def test_bad_base_names_both_files(tmp_path, files, needle):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "exp.toml")
    assert needle in str(e.value) and "exp.toml" in str(e.value)
    if len(files) > 1:
        assert "b.toml" in str(e.value)


def test_configs_built_in_code_are_validated():
    with pytest.raises(ConfigError, match="data.batch_size = 0"):
        DataConfig(batch_size=0)
    with pytest.raises(ConfigError, match="data.root is empty"):
        TrainConfig(data=DataConfig(source="folder"))
    with pytest.raises(ConfigError, match="schedule.gamma"):
        dataclasses.replace(TrainConfig().schedule, gamma=2.0)
    DataConfig(source="folder")  # the data layer takes the root from its caller: a run checks it


def test_help_config_is_a_toml_file_of_the_defaults(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(
        [sys.executable, "-m", "pipeline.train", "--help-config"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == describe()
    path = tmp_path / "x.toml"
    path.write_text(r.stdout)
    assert load_config(path).to_dict() == TrainConfig().to_dict()


# -- ranges and finiteness (issue 15, item 7): every value is checked when the config is built ----------------
@pytest.mark.parametrize(
    "override, needle",
    [
        ("--schedule.max_steps=-5", "schedule.max_steps = -5: must be >= 0"),
        ("--schedule.epochs=-1", "schedule.epochs = -1: must be >= 0"),
        ("--optim.lr=nan", "optim.lr = nan: must be a finite number"),
        ("--optim.lr=inf", "optim.lr = inf: must be a finite number"),
        ("--optim.weight_decay=nan", "optim.weight_decay = nan"),
        ("--optim.momentum=-inf", "optim.momentum = -inf"),
        ("--data.num_threads=0", "data.num_threads = 0: must be >= 1"),
        ("--data.prefetch=0", "data.prefetch = 0: must be >= 1"),
        ("--data.std=[nan, 1, 1]", "data.std = [nan, 1.0, 1.0]: must be a finite number"),
        ("--distributed.timeout_s=0", "distributed.timeout_s = 0: must be >= 1"),
        ("--tracking.flush_interval_s=-1", "tracking.flush_interval_s = -1.0: must be > 0"),
        ("--checkpoint.every_minutes=nan", "checkpoint.every_minutes = nan"),
        ("--seed=-3", "seed = -3: must be >= 0"),
        ("--data.val_resize=0", "data.val_resize = 0: must be >= 1"),
    ],
)
def test_out_of_range_values_are_refused_naming_the_key(tmp_path, override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, ""), [override])
    assert needle in str(e.value)
    assert "\n" not in str(e.value)  # one line


def test_an_imagenet_centre_crop_must_fit_its_resize():
    with pytest.raises(ConfigError, match="data.val_resize = 200 is below data.image_size = 224"):
        load_config(ROOT / "configs/imagenet/resnet18.toml", ["--data.val_resize=200"])


def _numeric_keys() -> list[tuple[str, type]]:
    """Every int or float key of the config, dotted (lists aside: their entries have their own checks)."""
    keys = []
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += [
                (f"{f.name}.{name}", tp)
                for name, tp in typing.get_type_hints(hints[f.name]).items()
                if tp in (int, float)
            ]
        elif hints[f.name] in (int, float):
            keys.append((f.name, hints[f.name]))
    return keys


@pytest.mark.parametrize("key, tp", _numeric_keys(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_numeric_key_refuses_negative_and_non_finite_values(key, tp):
    """No key takes a negative value (counts, sizes, intervals, timeouts, rates), and no float is NaN or
    infinite: a key added without its check fails here."""
    section, _, name = key.rpartition(".")
    bad = [-1] + ([math.nan, math.inf] if tp is float else [])
    for value in bad:
        data = {section: {name: value}} if section else {name: value}
        with pytest.raises(ConfigError) as e:
            config_from_dict(data)
        assert key in str(e.value), (value, str(e.value))


def test_a_path_of_the_wrong_kind_says_what_it_is(tmp_path):
    with pytest.raises(ConfigError, match=r"config file .* is a directory; pass an existing TOML file"):
        load_config(tmp_path)
    (tmp_path / "base_dir").mkdir()
    with pytest.raises(ConfigError, match="base_dir' is a directory, expected a TOML file"):
        load_config(write(tmp_path, 'base = "base_dir"\n'))
    assert describe_path(tmp_path / "exp.toml") == "is a file"
    assert describe_path(tmp_path / "nope") == "does not exist"
