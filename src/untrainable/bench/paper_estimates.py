"""Estimated memory and time of one step of the paper-scale configs on one GPU, from shapes alone.

No GPU is needed or used. The target and the guide are built as fake tensors
(shapes and dtypes, no storage) and run one bf16-autocast step: the target's
forward and backward, the guide's forward without gradients, the optimiser's
update. Every op is counted: its FLOPs (torch's formulas for matrix products,
convolutions and attention) and the bytes it reads and writes. The CKA terms
cannot run on fake tensors (they read scalars), so each pair runs once on real
random activations of the same shapes. An op's time is the longer of its FLOPs
at a share of the GPU's dense bf16 peak and its bytes at a share of its memory
bandwidth (a roofline); kernel launches and the data loader are not counted.

Memory: fp32 weights, gradients and Adam's two moments (16 bytes per target
parameter), the guide's fp32 weights, and what autograd keeps for the backward
pass at the end of the forward (activations, autocast's bf16 weight copies,
the CKA terms' saved tensors), plus the guide activations the CKA needs (its
(n, n) Gram matrix where that is smaller). Temporary buffers come on top.

    python -m untrainable.bench.paper_estimates    # the table in README.md, "Paper-scale runs"
"""

from __future__ import annotations

import argparse
import dataclasses
from importlib import resources
from typing import Any, Iterable

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from untrainable.build import build_guidance, build_model, build_optimizer
from untrainable.config import RunConfig, load_config
from untrainable.data import DataSplits
from untrainable.step import autocast, grad_norm
from untrainable.tasks import get_task

# Dense bf16 peak (FLOP/s) and memory bandwidth (bytes/s) from the vendors' data sheets.
GPUS = {"H100 SXM": (989e12, 3.35e12), "A100 SXM": (312e12, 2.04e12)}
COMPUTE_SHARE = 0.4  # of the peak, sustained by matrix products and convolutions
BANDWIDTH_SHARE = 0.7  # of the bandwidth, sustained by everything else
BATCH = 64
IMAGENET_CLASSES = 1000
TEXT_VOCAB = 256  # characters assumed in a text file's vocabulary (the data set counts the real ones)
PAPER_CONFIGS = (
    "paper_resnet18",
    "paper_deep_fcn",
    "paper_deep_fcn_trained",
    "paper_wide_fcn",
    "paper_resnet50",
    "paper_plain50",
    "paper_transformer_lm",
    "paper_rnn_lm",
)
GIB = 2**30
aten = torch.ops.aten
# Ops whose tensor arguments give only a shape: they write their output and read nothing.
ALLOCATIONS = {aten.empty, aten.empty_like, aten.empty_strided, aten.new_empty, aten.new_empty_strided}
FACTORIES = {aten.zeros_like, aten.ones_like, aten.full_like, aten.new_zeros, aten.new_ones, aten.new_full}


def _nbytes(x: Any) -> int:
    return x.numel() * x.element_size() if isinstance(x, Tensor) else 0


class OpCost(TorchDispatchMode):
    """Within the block, each op's FLOPs and bytes moved (inputs read, outputs or in-place arguments written)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[float, float]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 (torch's protocol)
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.is_view or func._overloadpacket in ALLOCATIONS:
            return out
        schema = func._schema
        written = 0
        for i, arg in enumerate(schema.arguments):
            if arg.alias_info is not None and arg.alias_info.is_write:
                written += sum(
                    _nbytes(x) for x in pytree.tree_leaves(args[i] if i < len(args) else kwargs.get(arg.name))
                )
        if not any(r.alias_info is not None for r in schema.returns):
            written += sum(_nbytes(x) for x in pytree.tree_leaves(out))
        if not written:
            return out  # queries of metadata (a device, a size) and empty allocations move no data
        packet = func._overloadpacket
        read = 0 if packet in FACTORIES else sum(_nbytes(x) for x in pytree.tree_leaves((args, kwargs)))
        flops = flop_registry[packet](*args, **kwargs, out_val=out) if packet in flop_registry else 0
        self.ops.append((float(flops), float(read + written)))
        return out

    @property
    def flops(self) -> float:
        return sum(f for f, _ in self.ops)

    def seconds(self, flop_rate: float, byte_rate: float) -> float:
        """The ops' total time, each the longer of its compute at `flop_rate` and its traffic at `byte_rate`."""
        return sum(max(f / flop_rate, b / byte_rate) for f, b in self.ops)


class Kept(TorchDispatchMode):
    """Within the block, the distinct storages alive at the end of a forward for its backward, less `ignore`'s.

    Those are the tensors autograd saves, and autocast's low-precision copies
    of `weights`, cached until its block ends (some of which are saved too).
    """

    def __init__(self, weights: Iterable[Tensor] = (), ignore: Iterable[Tensor] = ()) -> None:
        super().__init__()
        self.weights = {id(t.untyped_storage()) for t in weights}
        self.ignore = self.weights | {id(t.untyped_storage()) for t in ignore}
        self.storages: dict[int, Any] = {}  # kept alive, so that an id is not reused

    def _keep(self, t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if id(storage) not in self.ignore:
            self.storages[id(storage)] = storage
        return t

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 (torch's protocol)
        out = func(*args, **(kwargs or {}))
        if func._overloadpacket is aten._to_copy and id(args[0].untyped_storage()) in self.weights:
            self._keep(out)
        return out

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.storages.values())

    def __enter__(self) -> "Kept":
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._keep, lambda t: t)
        self._hooks.__enter__()
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        self._hooks.__exit__(*exc)


@dataclasses.dataclass
class Estimate:
    """One config's step at batch `batch`: parameter counts, GFLOPs, GiB and seconds per GPU."""

    name: str
    batch: int
    target_params: int
    guide_params: int
    gflops: dict[str, float]  # target (forward and backward), guide (forward), cka, optimizer
    gib: dict[str, float]  # states (weights, gradients, Adam moments), kept (for the backward)
    seconds: dict[str, dict[str, float]]  # by GPU, then by part (target, guide, cka, optimizer)

    def total_seconds(self, gpu: str) -> float:
        return sum(self.seconds[gpu].values())


def _shapes_only(config: RunConfig) -> DataSplits:
    """A data set with no examples and the shapes the config's data would have (ImageNet classes; a text's vocab)."""
    args = config.data.args
    if config.data.name == "image_folder":
        size = int(args.get("image_size", 224))
        return DataSplits([], [], [], input_shape=(3, size, size), num_classes=IMAGENET_CLASSES)
    if config.data.name == "text_file":
        meta = {"vocab_size": TEXT_VOCAB, "pad_id": 0}
        return DataSplits([], [], [], input_shape=(int(args.get("seq_len", 128)),), num_classes=TEXT_VOCAB, meta=meta)
    raise ValueError(f"data.name: estimates cover image_folder and text_file data, not {config.data.name!r}")


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def estimate(config: RunConfig, batch: int = BATCH) -> Estimate:
    """Estimated cost of one training step of `config` at `batch` examples on each GPU of GPUS."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    data = _shapes_only(config)
    cpu = torch.device("cpu")  # fake tensors claim the CPU; autocast there has the same bf16 op lists for these nets
    task = get_task(config.train.task)
    costs = {name: OpCost() for name in ("target", "guide", "cka", "optimizer")}
    with FakeTensorMode():
        target = build_model(dataclasses.replace(config.model, checkpoint=None), data, config.train.seed)
        guide = None
        if config.guide is not None:
            guide = build_model(dataclasses.replace(config.guide, checkpoint=None), data, config.train.seed + 1)
        if len(data.input_shape) == 1:
            x = torch.randint(2, TEXT_VOCAB, (batch, *data.input_shape))
            y = torch.randint(2, TEXT_VOCAB, (batch, *data.input_shape))
        else:
            x, y = torch.randn(batch, *data.input_shape), torch.randint(0, data.num_classes, (batch,))
        guidance = build_guidance(config, target, guide) if guide is not None else None
        with costs["target"], Kept(weights=target.parameters()) as kept:
            with autocast(cpu, config.train.precision):
                output, target_acts = guidance.target_capture.run(x) if guidance else (target(x), {})
                loss = task.loss(output, y)
            loss.backward()
        guide_acts: dict[str, Tensor] = {}
        if guidance is not None:
            with costs["guide"], autocast(cpu, config.train.precision):
                guide_acts = guidance.run_guide(x)
        optimizer = build_optimizer(config, target.parameters())
        optimizer.step()  # the first step creates Adam's moments; the steps after it are counted
        with costs["optimizer"]:
            grad_norm(list(target.parameters()))  # the step's finite-gradient check
            if config.optim.grad_clip:
                nn.utils.clip_grad_norm_(target.parameters(), config.optim.grad_clip)
            optimizer.step()
        shapes = {name: (act.shape, act.dtype) for name, act in {**target_acts, **guide_acts}.items()}
        target_params, guide_params = _params(target), _params(guide) if guide is not None else 0
        guide_bytes = sum(b.numel() * b.element_size() for b in guide.buffers()) if guide is not None else 0

    cka_kept = 0
    guide_kept = 0
    if guidance is not None:
        mask = torch.ones(batch, data.input_shape[0], dtype=torch.bool) if len(data.input_shape) == 1 else None
        for name in {pair.guide for pair in guidance.pairs}:
            shape, dtype = shapes[name]
            # An image layer is kept as its (n, n) fp32 Gram matrix where that is smaller; a sequence layer whole.
            whole = shape.numel() * dtype.itemsize
            guide_kept += whole if len(shape) == 3 else min(whole, batch * batch * 4)
        for pair in guidance.pairs:
            (t_shape, t_dtype), (g_shape, g_dtype) = shapes[pair.target], shapes[pair.guide]
            target_act = torch.randn(t_shape, dtype=t_dtype, requires_grad=True)
            guide_act = torch.randn(g_shape, dtype=g_dtype)
            with costs["cka"], Kept(ignore=[target_act]) as kept_cka:
                (1 - guidance.pair_similarity(target_act, guide_act, mask)).backward()
            cka_kept += kept_cka.nbytes
        guidance.remove_hooks()

    states = 16 * target_params + 4 * guide_params + guide_bytes
    return Estimate(
        name=config.name,
        batch=batch,
        target_params=target_params,
        guide_params=guide_params,
        gflops={name: cost.flops / 1e9 for name, cost in costs.items()},
        gib={"states": states / GIB, "kept": (kept.nbytes + cka_kept + guide_kept) / GIB},
        seconds={
            gpu: {name: cost.seconds(COMPUTE_SHARE * peak, BANDWIDTH_SHARE * bandwidth) for name, cost in costs.items()}
            for gpu, (peak, bandwidth) in GPUS.items()
        },
    )


def paper_config(name: str, overrides: dict[str, Any] | None = None) -> RunConfig:
    """A shipped paper-scale config as far as its shapes go: the guide's checkpoint (which may not exist yet) left out.

    `overrides` are dotted keys, as `--set` gives them (`{"model.args.width": 64}`).
    """
    path = resources.files("untrainable") / "configs" / f"{name}.toml"
    unguided = {"guide.checkpoint": None} if "[guide]" in path.read_text() else {}
    return load_config(path, {**unguided, **(overrides or {})})


def format_table(estimates: list[Estimate]) -> str:
    """A Markdown table of estimates, one row per config."""
    first, *others = GPUS
    lines = [
        "| config | params (M): target / guide | GFLOP: target fwd+bwd / guide fwd / CKA "
        "| GiB: states + kept | "
        + f"ms/step {first}: total (target / guide / CKA / Adam) | "
        + " | ".join(f"ms/step {gpu}" for gpu in others)
        + " |",
        "|" + "---|" * (5 + len(others)),
    ]
    for e in estimates:
        g, parts = e.gflops, e.seconds[first]
        lines.append(
            f"| {e.name} | {e.target_params / 1e6:.1f} / {e.guide_params / 1e6:.1f} "
            f"| {g['target']:.0f} / {g['guide']:.0f} / {g['cka']:.1f} "
            f"| {e.gib['states']:.1f} + {e.gib['kept']:.1f} "
            f"| {1e3 * e.total_seconds(first):.1f} ("
            + " / ".join(f"{1e3 * parts[name]:.1f}" for name in ("target", "guide", "cka", "optimizer"))
            + ") | "
            + " | ".join(f"{1e3 * e.total_seconds(gpu):.1f}" for gpu in others)
            + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="*", default=list(PAPER_CONFIGS), help="shipped config names")
    parser.add_argument("--batch", type=int, default=BATCH, help=f"examples per step (default: {BATCH})")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    print(format_table([estimate(paper_config(name), args.batch) for name in args.configs]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
