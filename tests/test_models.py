"""Model zoo: names, shapes, parameter counts, torchvision parity, plainness, MACs.

The machine running these is small and shared: structure-only checks build on
the meta device (no memory, no arithmetic) and real forwards use tiny inputs.
"""

from __future__ import annotations

import operator
import re

import pytest
import torch
import torchvision
from torch import fx, nn

from pipeline.models import ModelSpec, ResNet, ZeroPadShortcut, build_model, count_macs, list_models, model_spec

IMAGENET_DEPTHS = (18, 34, 50, 101, 152)
CIFAR_DEPTHS = (20, 32, 44, 56, 110, 1202)

# From the issue. ResNet option-B counts equal torchvision's; option A is
# parameter-free, so option-A and plain nets share a count.
PINNED_PARAMS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "plain18": 11_515_688,
    "plain152": 57_416_232,
    "cifar_resnet20": 269_722,
    "cifar_resnet32": 464_154,
    "cifar_resnet44": 658_586,
    "cifar_resnet56": 853_018,
    "cifar_resnet110": 1_727_962,
    "cifar_resnet1202": 19_421_274,
    "cifar_plain20": 269_722,
    "cifar_plain32": 464_154,
    "cifar_plain44": 658_586,
    "cifar_plain56": 853_018,
    "cifar_plain110": 1_727_962,
}


def meta_model(name: str, **kwargs) -> ResNet:
    with torch.device("meta"):
        return build_model(name, **kwargs)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def add_nodes(model: nn.Module) -> list[fx.Node]:
    """Every addition in the traced graph, whatever spelling the code used."""
    graph = fx.symbolic_trace(model).graph
    return [
        node
        for node in graph.nodes
        if (node.op == "call_function" and node.target in (operator.add, operator.iadd, torch.add))
        or (node.op == "call_method" and node.target in ("add", "add_", "__add__", "__iadd__"))
    ]


def test_list_models_has_every_network_of_the_study():
    expected = (
        {f"resnet{d}" for d in IMAGENET_DEPTHS}
        | {f"plain{d}" for d in IMAGENET_DEPTHS}
        | {f"cifar_resnet{d}" for d in CIFAR_DEPTHS}
        | {f"cifar_plain{d}" for d in CIFAR_DEPTHS if d != 1202}
    )
    names = list_models()
    assert expected <= set(names)
    assert len(names) == len(set(names))


@pytest.mark.parametrize("name", list_models())
def test_builds_and_forwards(name):
    spec = model_spec(name)
    # Train mode, as the nets are used: in eval mode untrained BN stats are the
    # identity, so each residual addition roughly doubles the activations' variance and
    # cifar_resnet1202's ~600 additions overflow to NaN.
    model = build_model(name).train()
    assert isinstance(model, ResNet) and model.spec == spec
    if spec.stem == "imagenet":
        assert spec.num_classes == 1000 and spec.input_size == (3, 224, 224)
        # Fully convolutional up to the adaptive pool, so 64x64 exercises every
        # layer at 1/12 of the cost of 224x224 (and still leaves 2x2 for BN).
        x = torch.randn(1, 3, 64, 64)
    else:
        assert spec.num_classes == 10 and spec.input_size == (3, 32, 32)
        x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (x.shape[0], spec.num_classes)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", list_models())
def test_depth_matches_name(name):
    assert model_spec(name).depth == int(re.search(r"\d+$", name).group())


@pytest.mark.parametrize("name", sorted(PINNED_PARAMS))
def test_parameter_count(name):
    assert n_params(meta_model(name)) == PINNED_PARAMS[name]


def test_option_a_resnet18_has_plain18_parameter_count():
    assert n_params(meta_model("resnet18", shortcut="A")) == 11_515_688


@pytest.mark.parametrize("depth", IMAGENET_DEPTHS)
def test_plain_equals_option_a_equals_b_minus_projections(depth):
    resnet_b = meta_model(f"resnet{depth}")
    projections = sum(n_params(b.downsample) for b in resnet_b.blocks() if b.downsample is not None)
    expected = n_params(resnet_b) - projections
    assert n_params(meta_model(f"plain{depth}")) == expected
    assert n_params(meta_model(f"resnet{depth}", shortcut="A")) == expected


@pytest.mark.parametrize("name", ["resnet18", "plain50", "cifar_resnet20"])
def test_num_classes_override(name):
    model = build_model(name, num_classes=7).eval()
    assert model.spec.num_classes == 7 and model.fc.out_features == 7
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 7)


@pytest.mark.parametrize("depth", IMAGENET_DEPTHS)
def test_state_dict_layout_matches_torchvision(depth):
    with torch.device("meta"):
        tv = getattr(torchvision.models, f"resnet{depth}")()
    ours = meta_model(f"resnet{depth}", shortcut="B")
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in tv.state_dict().items()}


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_loads_torchvision_weights_and_matches_outputs(name):
    torch.manual_seed(0)
    tv = getattr(torchvision.models, name)()
    # Fresh BN layers are the identity in eval mode, which would hide a BN
    # wired to the wrong conv; randomise them so every layer matters.
    for m in tv.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.normal_(m.bias)
    ours = build_model(name, shortcut="B")
    ours.load_state_dict(tv.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = tv.eval()(x)
        actual = ours.eval()(x)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


PLAIN = [n for n in list_models() if "plain" in n]


@pytest.mark.parametrize("name", PLAIN)
def test_plain_network_has_no_addition(name):
    model = meta_model(name)
    assert add_nodes(model) == []
    assert all(b.downsample is None for b in model.blocks())


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("resnet18", {}),
        ("resnet18", {"shortcut": "A"}),
        ("resnet34", {"shortcut": "C"}),
        ("resnet50", {}),
        ("resnet50", {"shortcut": "A", "stride_in": "1x1"}),
        ("cifar_resnet20", {}),
        ("cifar_resnet20", {"shortcut": "B"}),
        ("plain18", {"residual": True}),
    ],
)
def test_residual_network_adds_once_per_block(name, overrides):
    model = meta_model(name, **overrides)
    assert len(add_nodes(model)) == len(model.blocks()) == sum(model.spec.layers)


def test_residual_false_turns_a_resnet_plain():
    spec = model_spec("resnet34", residual=False)
    assert spec == model_spec("plain34")
    assert spec.shortcut is None and spec.tags()["shortcut"] == "none"


def test_plain_with_residual_true_gets_family_default_shortcut():
    assert model_spec("plain50", residual=True) == model_spec("resnet50")
    assert model_spec("cifar_plain20", residual=True) == model_spec("cifar_resnet20")


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "cifar_resnet20"])
def test_shortcut_c_projects_in_every_block(name):
    model = meta_model(name, shortcut="C")
    for block in model.blocks():
        assert isinstance(block.downsample, nn.Sequential)
        conv, bn = block.downsample
        assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1)
        assert isinstance(bn, nn.BatchNorm2d)


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "cifar_resnet20"])
def test_shortcut_b_projects_only_where_shape_changes(name):
    for block in meta_model(name, shortcut="B").blocks():
        changes_shape = block.stride != 1 or block.conv1.in_channels != block.last_bn().num_features
        assert isinstance(block.downsample, nn.Sequential) == changes_shape
        assert (block.downsample is None) == (not changes_shape)


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "cifar_resnet20"])
def test_shortcut_a_is_parameter_free_and_only_where_shape_changes(name):
    model = meta_model(name, shortcut="A")
    for block in model.blocks():
        changes_shape = block.stride != 1 or block.conv1.in_channels != block.last_bn().num_features
        assert isinstance(block.downsample, ZeroPadShortcut) == changes_shape
        assert (block.downsample is None) == (not changes_shape)
    # Bottleneck layer1 widens 64 -> 256 at stride 1, so A pads there too.
    if name == "resnet50":
        first = model.layer1[0].downsample
        assert isinstance(first, ZeroPadShortcut) and first.stride == 1 and first.pad == 192


def test_zero_pad_shortcut_subsamples_and_pads_with_zeros():
    x = torch.randn(2, 3, 5, 5)
    y = ZeroPadShortcut(3, 8, stride=2)(x)
    assert y.shape == (2, 8, 3, 3)
    torch.testing.assert_close(y[:, :3], x[:, :, ::2, ::2], rtol=0, atol=0)
    assert not y[:, 3:].any()
    assert not list(ZeroPadShortcut(3, 8, stride=2).parameters())


def test_option_a_bottleneck_net_forwards():
    model = build_model("resnet50", shortcut="A").eval()
    with torch.no_grad():
        # 50x50 gives odd feature maps (13 -> 7 -> 4 -> 2), where a misaligned
        # subsample would no longer match the strided conv.
        assert model(torch.randn(1, 3, 50, 50)).shape == (1, 1000)


@pytest.mark.parametrize("name", ["resnet50", "cifar_resnet56", "plain18"])
def test_bn_weight_init_uniform(name):
    """bn_weight_init="uniform": every BN scale in [0, 1) (PyTorch < 1.2's start), shifts at 0; zero_init_residual
    still zeroes each branch's last BN on top of it."""
    torch.manual_seed(0)
    model = build_model(name, bn_weight_init="uniform")
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    scales = torch.cat([m.weight.detach() for m in bns])
    assert 0 <= scales.min() and scales.max() < 1 and 0.45 < scales.mean() < 0.55
    assert not torch.cat([m.bias.detach() for m in bns]).any()
    if model.spec.residual:
        both = build_model(name, bn_weight_init="uniform", zero_init_residual=True)
        assert all(not b.last_bn().weight.any() for b in both.blocks())
        assert (both.bn1.weight < 1).all() and both.bn1.weight.any()


@pytest.mark.parametrize("name", ["resnet50", "cifar_resnet56", "plain18", "cifar_plain20"])
def test_bn_weight_init_uniform_residual(name):
    """bn_weight_init="uniform_residual": only the BN that closes each residual branch starts in [0, 1); every other
    BN at 1; a plain net, which has no branch, gets exactly the weights of "ones" from the same seed."""
    torch.manual_seed(0)
    model = build_model(name, bn_weight_init="uniform_residual")
    last = {id(b.last_bn()) for b in model.blocks()} if model.spec.residual else set()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert not m.bias.any()
            if id(m) in last:
                assert 0 <= m.weight.min() and m.weight.max() < 1
            else:
                assert (m.weight == 1).all()
    torch.manual_seed(0)
    ones = build_model(name, bn_weight_init="ones")
    same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ones.state_dict().values(), strict=True))
    assert same == (not model.spec.residual)


@pytest.mark.parametrize("name", ["resnet50", "cifar_resnet20"])
def test_zero_init_residual(name):
    model = build_model(name, zero_init_residual=True)
    for block in model.blocks():
        last = block.last_bn()
        assert not last.weight.any()
        others = [m for m in block.modules() if isinstance(m, nn.BatchNorm2d) and m is not last]
        assert all((m.weight == 1).all() for m in others)
    default = build_model(name)
    assert all((b.last_bn().weight == 1).all() for b in default.blocks())

    # With the branch zeroed a block is relu(shortcut(x)).
    block = model.blocks()[0].eval()
    x = torch.randn(1, block.conv1.in_channels, 8, 8)
    shortcut = block.downsample if block.downsample is not None else nn.Identity()
    with torch.no_grad():
        torch.testing.assert_close(block(x.clone()), torch.relu(shortcut(x)))


def test_stride_in_1x1_strides_the_first_bottleneck_conv():
    paper = meta_model("resnet50", stride_in="1x1")
    v15 = meta_model("resnet50")
    for name in ("layer2", "layer3", "layer4"):
        first = getattr(paper, name)[0]
        assert first.conv1.stride == (2, 2) and first.conv2.stride == (1, 1)
        first = getattr(v15, name)[0]
        assert first.conv1.stride == (1, 1) and first.conv2.stride == (2, 2)
    # Same weights, only placement differs.
    assert n_params(paper) == n_params(v15)
    assert model_spec("resnet50", stride_in="1x1").tags()["stride_in"] == "1x1"


def test_resnet152_macs_match_the_paper():
    # The paper's 11.3e9 "FLOPs" are multiply-adds with the stride on the 1x1
    # conv; torchvision's v1.5 layout reports 11.51 GMACs.
    assert count_macs(meta_model("resnet152")) == pytest.approx(11.5e9, rel=0.02)
    assert count_macs(meta_model("resnet152", stride_in="1x1")) == pytest.approx(11.3e9, rel=0.02)


def test_resnet34_and_plain34_macs_match_the_paper():
    # Table 1 / figure 3: 3.6e9 for both; projections add only ~0.5%.
    assert count_macs(meta_model("resnet34")) == pytest.approx(3.6e9, rel=0.02)
    assert count_macs(meta_model("plain34")) == pytest.approx(3.6e9, rel=0.02)


def test_count_macs_by_hand():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    assert count_macs(model, input_size=(3, 4, 4)) == 8 * 4 * 4 * 3 * 9 + 128 * 10


def test_count_macs_leaves_training_state_alone():
    model = build_model("cifar_resnet20").train()
    model.fc.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert count_macs(model, input_size=model.spec.input_size) == 40_551_040
    assert model.training and not model.fc.training and model.layer1.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("name", ["nonexistent", "resnet20", "cifar_plain1202"])
def test_unknown_model_is_named_with_the_alternatives(name):
    with pytest.raises(ValueError, match=rf"'{name}'.*resnet18.*cifar_resnet20"):
        build_model(name)


@pytest.mark.parametrize(
    "name, overrides, message",
    [
        ("resnet18", {"depth": 20}, r"'depth'.*residual, shortcut, stride_in, zero_init_residual"),
        ("resnet18", {"shortcut": "D"}, r"shortcut='D'.*'A', 'B', 'C'"),
        ("resnet50", {"stride_in": "x"}, r"stride_in='x'.*'3x3', '1x1'"),
        ("resnet18", {"stride_in": "1x1"}, r"stride_in='1x1'.*basic blocks"),
        ("resnet18", {"residual": "yes"}, r"residual='yes'.*True, False"),
        ("resnet18", {"residual": 1}, r"residual=1.*True, False"),
        ("resnet18", {"zero_init_residual": None}, r"zero_init_residual=None.*True, False"),
        ("resnet18", {"shortcut": None}, r"shortcut=None.*'A', 'B', 'C'"),
        ("plain18", {"shortcut": "B"}, r"shortcut='B'.*residual=False"),
        ("resnet18", {"residual": False, "shortcut": "A"}, r"shortcut='A'.*residual=False"),
        ("plain18", {"zero_init_residual": True}, r"zero_init_residual=True.*residual=False"),
        ("resnet18", {"bn_weight_init": "normal"}, r"bn_weight_init='normal'.*'ones', 'uniform', 'uniform_residual'"),
        ("cifar_resnet20", {"num_classes": 0}, r"num_classes=0"),
    ],
)
def test_bad_overrides_name_the_key_and_allowed_values(name, overrides, message):
    with pytest.raises(ValueError, match=message):
        build_model(name, **overrides)
    with pytest.raises(ValueError, match=message):
        model_spec(name, **overrides)


def test_model_spec_is_data():
    spec = model_spec("resnet50")
    assert spec == ModelSpec(
        block="bottleneck",
        layers=(3, 4, 6, 3),
        widths=(64, 128, 256, 512),
        stem="imagenet",
        residual=True,
        shortcut="B",
    )
    assert spec.tags() == {
        "depth": "50",
        "block": "bottleneck",
        "layers": "3-4-6-3",
        "stem": "imagenet",
        "residual": "true",
        "shortcut": "B",
        "stride_in": "3x3",
        "zero_init_residual": "false",
        "bn_weight_init": "ones",
    }
    cifar = model_spec("cifar_resnet110")
    assert (cifar.layers, cifar.widths, cifar.shortcut, cifar.input_size) == (
        (18, 18, 18),
        (16, 32, 64),
        "A",
        (3, 32, 32),
    )
    # A spec built by hand goes straight into the generic class.
    custom = ModelSpec(
        block="basic", layers=[1, 1], widths=[8, 16], stem="cifar", residual=True, shortcut="A", num_classes=3
    )
    with torch.no_grad():
        assert ResNet(custom).eval()(torch.randn(1, 3, 16, 16)).shape == (1, 3)
