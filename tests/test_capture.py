"""Layer capture with hooks: names, globs, types, tuple outputs, wrapper prefixes, errors."""

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from untrainable.capture import LayerCapture, canonical_name, default_layers, resolve_layers


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(4, 4), nn.ReLU()) for _ in range(3))
        self.inner = nn.Module()
        self.inner.deep = nn.Sequential(nn.Linear(4, 4))
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(self.inner.deep(x))


class Recurrent(nn.Module):
    def __init__(self, pack=False):
        super().__init__()
        self.rnn = nn.LSTM(3, 5, batch_first=True)
        self.attn = nn.MultiheadAttention(5, 1, batch_first=True)
        self.head = nn.Linear(5, 2)
        self.pack = pack

    def forward(self, x, lengths=None):
        if self.pack:
            seq, _ = self.rnn(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
            seq, _ = nn.utils.rnn.pad_packed_sequence(seq, batch_first=True)
        else:
            seq, _ = self.rnn(x)
        out, _ = self.attn(seq, seq, seq)
        return self.head(out)


def test_nested_names_globs_and_types():
    model = Nested()
    assert resolve_layers(model, ["inner.deep.0"]) == ["inner.deep.0"]
    assert resolve_layers(model, ["blocks.*.0"]) == ["blocks.0.0", "blocks.1.0", "blocks.2.0"]
    assert resolve_layers(model, ["**.0"]) == ["blocks.0", "blocks.0.0", "blocks.1.0", "blocks.2.0", "inner.deep.0"]
    assert resolve_layers(model, types=["ReLU"]) == ["blocks.0.1", "blocks.1.1", "blocks.2.1"]
    assert resolve_layers(model, types=[nn.Linear])[-1] == "head"


def test_capture_records_nested_outputs_once_registered():
    model = Nested()
    capture = LayerCapture(model, ["blocks.*.1", "inner.deep.0"])
    hooks_before = sum(len(m._forward_hooks) for m in model.modules())
    x = torch.randn(6, 4)
    for _ in range(3):
        with capture.recording():
            model(x)
    assert sum(len(m._forward_hooks) for m in model.modules()) == hooks_before == 4
    acts = capture.activations
    assert list(acts) == ["blocks.0.1", "blocks.1.1", "blocks.2.1", "inner.deep.0"]
    expected = model.blocks[0](x)
    assert torch.allclose(acts["blocks.0.1"], expected)
    model(x)  # outside recording: nothing kept
    capture.clear()
    model(x)
    assert capture.activations == {}
    capture.remove()
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0


def test_tuple_and_attention_outputs():
    model = Recurrent()
    capture = LayerCapture(model, ["rnn", "attn"])
    with capture.recording():
        model(torch.randn(4, 7, 3))
    assert capture.activations["rnn"].shape == (4, 7, 5)
    assert capture.activations["attn"].shape == (4, 7, 5)


def test_packed_sequence_output_is_padded():
    model = Recurrent(pack=True)
    capture = LayerCapture(model, ["rnn"])
    x = torch.randn(3, 6, 3)
    lengths = torch.tensor([6, 4, 2])
    with capture.recording():
        model(x, lengths)
    act = capture.activations["rnn"]
    assert act.shape == (3, 6, 5)
    assert torch.all(act[2, 2:] == 0) and torch.any(act[2, :2] != 0)


def test_wrong_name_lists_valid_ones():
    with pytest.raises(KeyError) as err:
        resolve_layers(Nested(), ["blocks.9.0"])
    message = str(err.value)
    assert "blocks.9.0" in message and "blocks.0.0" in message and "inner.deep.0" in message and "head" in message
    with pytest.raises(KeyError, match="valid layers"):
        resolve_layers(Nested(), ["nothing.*"])
    with pytest.raises(KeyError, match="types present"):
        resolve_layers(Nested(), types=["Conv2d"])


def test_ddp_and_compile_prefixes_resolve():
    assert canonical_name("module._orig_mod.blocks.0") == "blocks.0"
    assert canonical_name("_orig_mod.module.head") == "head"

    class Wrapper(nn.Module):  # stands in for DDP: the model under `module`
        def __init__(self, model):
            super().__init__()
            self.module = model

        def forward(self, x):
            return self.module(x)

    wrapped = Wrapper(Nested())
    assert resolve_layers(wrapped, ["module.blocks.0.0"]) == ["blocks.0.0"]
    assert resolve_layers(wrapped, ["blocks.0.0"]) == ["blocks.0.0"]
    compiled = torch.compile(Nested())
    assert resolve_layers(compiled, ["_orig_mod.inner.deep.0"]) == ["inner.deep.0"]
    assert resolve_layers(compiled, ["blocks.*.0"]) == ["blocks.0.0", "blocks.1.0", "blocks.2.0"]


def test_default_layers_skip_output_layer_and_nested():
    assert default_layers(Nested()) == ["blocks.0.0", "blocks.1.0", "blocks.2.0", "inner.deep.0"]
    assert default_layers(Recurrent()) == ["rnn", "attn"]


def test_time_first_modules_are_captured_batch_first():
    class TimeFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(3, 5)  # batch_first=False: (time, batch, features)
            self.head = nn.Linear(5, 2)

        def forward(self, x):  # x: (batch, time, 3)
            seq, _ = self.rnn(x.transpose(0, 1))
            return self.head(seq[-1])

    model = TimeFirst()
    capture = LayerCapture(model, ["rnn"])
    x = torch.randn(4, 9, 3)
    with capture.recording():
        model(x)
    expected, _ = model.rnn(x.transpose(0, 1))
    assert capture.activations["rnn"].shape == (4, 9, 5)
    assert torch.allclose(capture.activations["rnn"], expected.transpose(0, 1))


def test_run_returns_output_and_activations_and_names_missing_layers():
    model = Nested()
    capture = LayerCapture(model, ["blocks.*.1", "inner.deep.0"])
    x = torch.randn(5, 4)
    output, acts = capture.run(x)
    assert torch.allclose(output, model(x)) and list(acts) == capture.names
    assert capture.activations == {}  # nothing kept on the capture after the call
    _, sums = capture.run(x, transform=lambda name, act: act.sum())
    assert all(sums[name].dim() == 0 and torch.allclose(sums[name], acts[name].sum()) for name in acts)

    class Skips(Nested):
        def forward(self, x):
            return self.head(self.inner.deep(x))

    with pytest.raises(ValueError, match=r"blocks.0.1.*of Skips did not run"):
        LayerCapture(Skips(), ["blocks.0.1"]).run(x)
