"""ResNets, plain nets and the small ViT: shapes, gradients, hook paths, skip connections."""

from __future__ import annotations

import pytest
import torch

from untrainable.models import resnet, vit  # noqa: F401  (registration)
from untrainable.models.registry import create_model, list_models

CONV_NETS = ["resnet18", "resnet34", "resnet50", "plain18", "plain34", "plain50"]


@pytest.mark.parametrize("name", CONV_NETS)
def test_conv_net_forward_backward(name):
    torch.manual_seed(0)
    model = create_model(name, input_shape=(1, 28, 28), num_classes=7, width=4)
    x = torch.randn(2, 1, 28, 28)
    logits = model(x)
    assert logits.shape == (2, 7)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_imagenet_stem_shrinks_by_four():
    model = create_model("resnet18", input_shape=(3, 64, 64), width=4, stem="imagenet")
    seen = {}
    model.stem.register_forward_hook(lambda m, i, o: seen.update(stem=o.shape))
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)
    assert seen["stem"] == (1, 4, 16, 16)


def test_vit_forward_backward():
    torch.manual_seed(0)
    model = create_model("vit_tiny", input_shape=(1, 28, 28), num_classes=5, dim=16, depth=2, heads=2)
    logits = model(torch.randn(2, 1, 28, 28))
    assert logits.shape == (2, 5)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_all_registered():
    assert set(CONV_NETS + ["vit_tiny"]) <= set(list_models())


@pytest.mark.parametrize(
    "name, paths",
    [
        ("resnet18", ["stem", "layer1.0", "layer1.0.conv1", "layer2.0.shortcut", "pool", "fc"]),
        ("plain50", ["stem", "layer1.0.conv3", "layer3.5", "pool", "fc"]),
        ("vit_tiny", ["patch_embed", "blocks.0", "blocks.0.attn", "blocks.0.mlp", "norm", "head"]),
    ],
)
def test_hook_paths_exist(name, paths):
    kwargs = {"input_shape": (1, 28, 28)} | ({} if name == "vit_tiny" else {"width": 4})
    modules = dict(create_model(name, **kwargs).named_modules())
    assert all(path in modules for path in paths)


def test_attention_hook_gives_tokens():
    model = create_model("vit_tiny", input_shape=(1, 28, 28), dim=16, depth=1, heads=2)
    seen = {}
    model.blocks[0].attn.register_forward_hook(lambda m, i, o: seen.update(attn=o))
    model(torch.randn(3, 1, 28, 28))
    assert isinstance(seen["attn"], torch.Tensor)
    assert seen["attn"].shape == (3, 1 + 7 * 7, 16)


def test_plain_nets_have_no_shortcuts():
    residual = dict(create_model("resnet18", width=4).named_modules())
    plain = dict(create_model("plain18", width=4).named_modules())
    assert any(name.endswith("shortcut") for name in residual)
    assert not any(name.endswith("shortcut") for name in plain)
    # Same layers apart from the three projection shortcuts (conv + bn + their Sequential each).
    assert len(residual) - len(plain) == 3 * 3


@pytest.mark.parametrize("block_type", [resnet.BasicBlock, resnet.Bottleneck])
def test_zeroed_block_passes_input_only_with_skip(block_type):
    # With its last BatchNorm zeroed the residual branch outputs 0: a residual
    # block then returns relu(x), a plain block returns 0.
    channels = 4 * block_type.expansion
    x = torch.randn(2, channels, 5, 5)
    for residual in (True, False):
        block = block_type(channels, 4, residual=residual).eval()
        last_bn = block.bn3 if block_type is resnet.Bottleneck else block.bn2
        torch.nn.init.zeros_(last_bn.weight)
        torch.nn.init.zeros_(last_bn.bias)
        expected = torch.relu(x) if residual else torch.zeros_like(x)
        torch.testing.assert_close(block(x), expected)


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("resnet18", {"stem": "cifar"}),
        ("resnet34", {"width": 0}),
        ("plain50", {"input_shape": (28, 28)}),
        ("resnet18", {"num_classes": 0}),
        ("vit_tiny", {"patch_size": 5}),
        ("vit_tiny", {"dim": 10, "heads": 4}),
        ("vit_tiny", {"depth": 0}),
    ],
)
def test_bad_arguments_raise(name, kwargs):
    with pytest.raises(ValueError):
        create_model(name, **kwargs)
