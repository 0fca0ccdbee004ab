"""What guidance costs: step time and peak memory of unguided, guided and the authors' guided step.

One run measures, on the same machine and the same batches:

- (a) `target`: the target's training step alone;
- (b) `+guide`: (a) plus the guide's forward, no alignment;
- (c) `guided`: the full guided step (`Guidance`: one target forward,
  hooks registered once, the guide's layers reduced to centred Gram
  matrices as they finish);
- (e) `cached`: (c) with the guide's activations read from a filled
  `GuideCache` instead of running the guide;
- (d) `authors`: a re-implementation of the authors' step: the target
  forwards twice (task loss, then again inside a feature extractor that
  registers hooks on every module of a fixed list of types at every step),
  biased CKA with explicit n x n centring matrices H = I - 11^T / n;
- the floor: (b) plus the matrix products that the similarity cannot avoid
  on the case's shapes, timed on the same machine in the same rotation.

(a), (b), (c) and (e) run `step.train_step`, the step the trainer takes,
so what is timed is what trains, its checks included: that the inputs, the
loss terms and the gradients' norm are finite (a few reductions per step and,
on a GPU, a wait for their results). (d) has no such checks, as the authors'
step has none.

Timing runs with the allocator as it is; peak memory is measured apart
(another process on a CPU, a pass after the timing on a GPU), and the
similarity kernel alone is timed against its matrix products.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import multiprocessing
import platform
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from untrainable import distributed
from untrainable.capture import as_activation, named_layers
from untrainable.guidance import Guidance
from untrainable.guide_cache import GuideCache
from untrainable.models import create_model
from untrainable.similarity import linear_cka, sample_space_is_cheaper
from untrainable.step import StepParts, train_step
from untrainable.tasks import get_task

VARIANTS = ("target", "+guide", "guided", "cached", "authors")
PRODUCTS = "products"  # the similarity's unavoidable matrix products, timed beside the variants


@dataclass
class Case:
    """One target/guide pair at one input size and batch size."""

    name: str
    target: str
    target_args: dict[str, Any]
    guide: str
    guide_args: dict[str, Any]
    batch: int
    input_shape: tuple[int, ...]  # one example; token inputs are (length,)
    tokens: bool = False
    num_classes: int = 10
    repeats: int = 5
    note: str = ""
    target_layers: tuple[str, ...] | None = None  # None: the library's default layers
    guide_layers: tuple[str, ...] | None = None


def cases(quick: bool = False) -> list[Case]:
    """The benchmark's pairs. Widths of the guide are reduced to fit a CPU; each case says so."""
    return _quick_cases() if quick else _mnist_cases() + _imagenet_cases() + [_sequence_case()]


def _quick_cases() -> list[Case]:
    """Tiny versions of an image pair and a sequence pair: seconds, numbers not meaningful."""
    mnist = (1, 28, 28)
    tiny_fcn = {"input_shape": mnist, "depth": 4, "width": 32}
    tiny_rnn = {"hidden": 8, "embed_dim": 8, "layers": 1}
    tiny_transformer = {"dim": 8, "depth": 1, "heads": 2, "max_len": 16}
    return [
        Case(
            "deep_fcn<-resnet18 28x28 (tiny)",
            "deep_fcn",
            tiny_fcn,
            "resnet18",
            {"input_shape": mnist, "width": 2},
            8,
            mnist,
            repeats=1,
        ),
        Case(
            "rnn<-transformer L=16 (tiny)",
            "rnn",
            tiny_rnn,
            "causal_transformer",
            tiny_transformer,
            4,
            (16,),
            tokens=True,
            num_classes=16,
            repeats=1,
        ),
    ]


def _mnist_cases() -> list[Case]:
    """Deep FCN guided by ResNet-18 on 28 x 28 inputs: at two batch sizes, and the rescue study's pair."""
    mnist = (1, 28, 28)
    found = [
        Case(
            f"deep_fcn<-resnet18 28x28 b{batch}",
            "deep_fcn",
            {"input_shape": mnist},
            "resnet18",
            {"input_shape": mnist, "width": 16},
            batch,
            mnist,
            repeats=5,
            note="ResNet-18 at width 16 of 64",
        )
        for batch in (64, 256)
    ]
    found.append(
        Case(
            "deep_fcn 48x1024<-resnet18 blocks 28x28 b64",
            "deep_fcn",
            {"input_shape": mnist, "depth": 48, "width": 1024},
            "resnet18",
            {"input_shape": mnist, "width": 8, "stem": "small"},
            64,
            mnist,
            repeats=5,
            note="the rescue study's pair: ResNet-18 at width 8 of 64, its 8 block outputs",
            target_layers=("layers.*.linear",),
            guide_layers=("layer*.*",),
        )
    )
    return found


def _imagenet_cases() -> list[Case]:
    """Deep FCN guided by ResNet-18 on 224 x 224 inputs at two batch sizes."""
    imagenet = (3, 224, 224)
    return [
        Case(
            f"deep_fcn<-resnet18 224x224 b{batch}",
            "deep_fcn",
            {"input_shape": imagenet},
            "resnet18",
            {"input_shape": imagenet, "width": 8, "stem": "imagenet"},
            batch,
            imagenet,
            repeats=3,
            note="ResNet-18 at width 8 of 64",
        )
        for batch in (64, 256)
    ]


def _sequence_case() -> Case:
    """An RNN guided by a causal transformer on token sequences of length 256."""
    return Case(
        "rnn<-transformer L=256 b64",
        "rnn",
        {},
        "causal_transformer",
        {"max_len": 256},
        64,
        (256,),
        tokens=True,
        num_classes=16,
        repeats=5,
    )


# ---------------------------------------------------------------- memory


class _Memory:
    """Peak memory of a block of code above the memory in use when it starts.

    GPU: torch.cuda.max_memory_allocated (tensors only). CPU: the peak
    resident set size (VmHWM of /proc/self/status, reset through
    /proc/self/clear_refs) minus the resident size at the start, with
    glibc's mmap threshold fixed at 128 KiB so that every tensor larger than
    that is returned to the system when freed; it counts tensors, allocator
    and library scratch space, so it is an upper bound on the tensors alone.
    None where neither is available. The mmap setting slows a CPU step down,
    so it is made only in the process that measures memory, never where
    steps are timed.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu_ok = False
        if device.type == "cpu":
            try:
                libc = ctypes.CDLL("libc.so.6")
                libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: also stops its dynamic growth
                self._trim = lambda: libc.malloc_trim(0)
                self._reset_hwm()
                self.cpu_ok = True
            except OSError:
                self.cpu_ok = False
        self.start = 0

    @staticmethod
    def _status(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise OSError(f"{key} not in /proc/self/status")

    @staticmethod
    def _reset_hwm() -> None:
        Path("/proc/self/clear_refs").write_text("5")

    def begin(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        elif self.cpu_ok:
            self._trim()
            self.start = self._status("VmRSS")
            self._reset_hwm()

    def peak_mib(self) -> float | None:
        if self.device.type == "cuda":
            return (torch.cuda.max_memory_allocated(self.device) - self.start) / 2**20
        if self.cpu_ok:
            return max(0, self._status("VmHWM") - self.start) / 2**20
        return None


# ---------------------------------------------------------------- the authors' step

AUTHORS_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv2d,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.ReLU,
    nn.RNN,
    nn.LSTM,
    nn.MultiheadAttention,
)


def authors_features(
    model: nn.Module, x: Tensor, types: tuple[type[nn.Module], ...] = AUTHORS_TYPES
) -> dict[str, Tensor]:
    """Forward x once more with a hook on every module of `types`, registered now and removed after.

    Layers are named by position (`Linear_3`), as in the authors' extractor.
    """
    features: dict[str, Tensor] = {}
    handles = []
    counts: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, types):
            kind = type(module).__name__
            name = f"{kind}_{counts.get(kind, 0)}"
            counts[kind] = counts.get(kind, 0) + 1

            def hook(_m: nn.Module, _i: tuple, output: Any, name: str = name) -> None:
                features[name] = as_activation(output)

            handles.append(module.register_forward_hook(hook))
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    return features


def positional_names(model: nn.Module, types: tuple[type[nn.Module], ...] = AUTHORS_TYPES) -> dict[int, str]:
    """id(module) -> its positional name in `authors_features`."""
    names, counts = {}, {}
    for module in model.modules():
        if isinstance(module, types):
            kind = type(module).__name__
            names[id(module)] = f"{kind}_{counts.get(kind, 0)}"
            counts[kind] = counts.get(kind, 0) + 1
    return names


def _authors_centering(k: Tensor) -> Tensor:
    n = k.shape[0]
    h = torch.eye(n, dtype=k.dtype, device=k.device) - torch.ones(n, n, dtype=k.dtype, device=k.device) / n
    return h @ k @ h


def _authors_hsic(x: Tensor, y: Tensor) -> Tensor:
    return (_authors_centering(x @ x.T) * _authors_centering(y @ y.T)).sum()


def authors_cka(x: Tensor, y: Tensor) -> Tensor:
    """Biased linear CKA as the authors compute it: explicit centring matrices, no epsilon."""
    x, y = x.flatten(1), y.flatten(1)
    return _authors_hsic(x, y) / (torch.sqrt(_authors_hsic(x, x)) * torch.sqrt(_authors_hsic(y, y)))


# ---------------------------------------------------------------- the steps


def _task_loss(output: Tensor, y: Tensor) -> Tensor:
    if output.dim() == 3:
        return F.cross_entropy(output.flatten(0, 1), y.flatten())
    return F.cross_entropy(output, y)


def build_case(case: Case, device: torch.device) -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    target_args = dict(case.target_args)
    guide_args = dict(case.guide_args)
    target_args.setdefault("num_classes", case.num_classes)
    guide_args.setdefault("num_classes", case.num_classes)
    target = create_model(case.target, **target_args).to(device).train()
    guide = create_model(case.guide, **guide_args).to(device)
    if case.tokens:
        x = torch.randint(1, case.num_classes, (case.batch, *case.input_shape), device=device)
        y = torch.randint(0, case.num_classes, (case.batch, *case.input_shape), device=device)
    else:
        x = torch.randn(case.batch, *case.input_shape, device=device)
        y = torch.randint(0, case.num_classes, (case.batch,), device=device)
    return target, guide, x, y


class _WithGuideForward(nn.Module):
    """Variant (b)'s forward: the target's, then the guide's under no_grad, with no alignment between them."""

    def __init__(self, target: nn.Module, guide: nn.Module) -> None:
        super().__init__()
        self.target = target
        self._guide = [guide]  # not a submodule: the guide stays as Guidance froze it

    def forward(self, x: Tensor) -> Tensor:
        output = self.target(x)
        with torch.no_grad():
            self._guide[0](x)
        return output


def _authors_pairs(guidance: Guidance) -> tuple[tuple[type[nn.Module], ...], list[tuple[str, str, float]]]:
    """The types the authors' extractor hooks and the pairs by positional name.

    The fixed list, plus the classes of the paired layers (a model's own
    attention class, a ResNet block), as the authors list the types their
    models use.
    """
    modules_t, modules_g = named_layers(guidance.target), named_layers(guidance.guide)
    paired = {type(modules_t[p.target]) for p in guidance.pairs} | {type(modules_g[p.guide]) for p in guidance.pairs}
    types = AUTHORS_TYPES + tuple(sorted(paired - set(AUTHORS_TYPES), key=lambda t: t.__name__))
    pos_t, pos_g = positional_names(guidance.target, types), positional_names(guidance.guide, types)
    pairs = [(pos_t[id(modules_t[p.target])], pos_g[id(modules_g[p.guide])], p.weight) for p in guidance.pairs]
    return types, pairs


def case_steps(
    case: Case, device: torch.device, pairs: list[tuple[str, str]] | None = None
) -> tuple[dict[str, Callable[[], None]], dict[str, Any]]:
    """One closure per variant, each doing one full optimisation step on the same batch, and the products' closure.

    (a), (b), (c) and (e) run the trainer's step, `step.train_step`; (d) its
    own. `pairs` replaces the case's layers and the default spread.
    """
    target, guide, x, y = build_case(case, device)
    optimizer = torch.optim.Adam(target.parameters(), lr=1e-4)
    layers = {"target_layers": case.target_layers, "guide_layers": case.guide_layers} if pairs is None else {}
    guidance = Guidance(target, guide, pairs=pairs, **layers).train()
    cache = GuideCache(case.batch, "memory")
    index = torch.arange(case.batch)
    cache.activations(index, x, guidance.run_guide)  # filled once, as after the first epoch
    types, authors_pairs = _authors_pairs(guidance)
    products, counted = unavoidable_products(guidance, x)
    numbers = itertools.count(1)

    def trainer_step(batch: tuple[Tensor, ...], model: nn.Module = target, **terms: Any) -> Callable[[], None]:
        """The trainer's own step (`step.train_step`) on `batch`, with the given loss terms."""
        parts = StepParts(
            model=model,
            target=target,
            optimizer=optimizer,
            task=get_task("tokens" if case.tokens else "classification"),
            device=device,
            dist_info=distributed.DistInfo(0, 1, 0, torch.device("cpu")),  # one process, as the trainer's
            scaler=torch.amp.GradScaler("cuda", enabled=False),
            **terms,
        )

        def step() -> None:
            train_step(parts, batch, next(numbers))

        return step

    def step_authors() -> None:
        loss = _task_loss(target(x), y)
        target_features = authors_features(target, x, types)
        with torch.no_grad():
            guide_features = authors_features(guide, x, types)
        for t_name, g_name, weight in authors_pairs:
            loss = loss + weight * (1.0 - authors_cka(target_features[t_name], guide_features[g_name]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    steps = {
        "target": trainer_step((x, y)),
        "+guide": trainer_step((x, y), model=_WithGuideForward(target, guide)),
        "guided": trainer_step((x, y), guidance=guidance),
        "cached": trainer_step((x, y, index), guidance=guidance, guide_cache=cache),
        "authors": step_authors,
        PRODUCTS: products,
    }
    info = {"pairs": len(guidance.pairs), "cache_mib": cache.nbytes() / 2**20 / case.batch, "products": counted}
    return steps, info


# ---------------------------------------------------------------- the floor


def unavoidable_products(guidance: Guidance, x: Tensor) -> tuple[Callable[[], None], dict[str, float]]:
    """The matrix products no implementation of the guided step's CKA can avoid, on this batch's shapes.

    Per guide layer compared in sample space, its Gram matrix Y Y^T (n^2 d2
    multiply-adds); per target layer with sample-space pairs, its Gram
    matrix X X^T and the gradient's (n, n) @ (n, d1) product (2 n^2 d1);
    per pair in feature space, Y^T X, X^T X, Y^T Y and the gradient's
    Y (Y^T X)^T and X (X^T X). The space is chosen as `Guidance` chooses it.
    Returns a closure running them on random tensors of those shapes, and
    the multiply-add count (`gmacs`).
    """
    with torch.no_grad():
        _, target_acts = guidance.target_capture.run(x)
        guide_acts = guidance.run_guide(x)
    n = x.shape[0]
    width = {name: act[0].numel() for name, act in {**target_acts, **guide_acts}.items()}
    sample_guides = {
        g
        for g in {p.guide for p in guidance.pairs}
        if all(sample_space_is_cheaper(n, width[p.target], width[g]) for p in guidance.pairs if p.guide == g)
    }
    sample_targets = {p.target for p in guidance.pairs if p.guide in sample_guides}
    feature_pairs = [(width[p.target], width[p.guide]) for p in guidance.pairs if p.guide not in sample_guides]
    device = x.device
    grams = [torch.randn(n, width[g], device=device) for g in sorted(sample_guides)]
    sides = [
        (torch.randn(n, width[t], device=device), torch.randn(n, n, device=device)) for t in sorted(sample_targets)
    ]
    features = [(torch.randn(n, d1, device=device), torch.randn(n, d2, device=device)) for d1, d2 in feature_pairs]
    macs = sum(n * n * a.shape[1] for a in grams) + sum(2 * n * n * a.shape[1] for a, _ in sides)
    macs += sum(n * (2 * d1 * d2 + 2 * d1 * d1 + d2 * d2) for d1, d2 in feature_pairs)

    def run() -> None:
        with torch.no_grad():
            for y in grams:
                y @ y.T
            for a, m in sides:
                a @ a.T
                m @ a
            for a, y in features:
                cross, own = y.T @ a, a.T @ a
                y.T @ y
                y @ cross
                a @ own

    return run, {"gmacs": macs / 1e9, "sample_guide_layers": len(grams), "feature_pairs": len(features)}


# ---------------------------------------------------------------- timing and memory


class _Timer:
    """Seconds of one call: CUDA events on a GPU (no host stall inside the step), perf_counter on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self, fn: Callable[[], None]) -> float:
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        started = time.perf_counter()
        fn()
        return time.perf_counter() - started


def time_variants(steps: dict[Any, Callable[[], None]], repeats: int, device: torch.device) -> dict[Any, float]:
    """Median seconds per step of each variant.

    After one warm-up step of each, the variants take turns (round-robin)
    `repeats` times, so that load from other processes on a shared machine
    falls on all of them alike.
    """
    timer = _Timer(device)
    for step in steps.values():
        step()  # warm-up: allocates optimiser state, fills caches
    _sync(device)
    times: dict[Any, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            times[name].append(timer(step))
    return {name: statistics.median(values) for name, values in times.items()}


def peak_memory(case: Case, device: torch.device, threads: int | None) -> dict[str, float | None]:
    """Peak memory (MiB) of one step of each variant above the memory in use before it.

    On a CPU in a fresh process, where glibc's mmap threshold can be fixed
    without slowing down the timed steps; on a GPU in this process.
    """
    if device.type == "cuda":
        return _case_peaks(case, str(device), threads)
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_case_peaks, case, str(device), threads).result()


def _case_peaks(case: Case, device_name: str, threads: int | None) -> dict[str, float | None]:
    if threads is not None:
        torch.set_num_threads(threads)
    device = torch.device(device_name)
    steps, _ = case_steps(case, device)
    memory = _Memory(device)
    peaks = {}
    for name in VARIANTS:
        steps[name]()  # warm-up: optimiser state and caches are not part of a step's peak
        _sync(device)
        memory.begin()
        steps[name]()
        _sync(device)
        peaks[name] = memory.peak_mib()
    return peaks


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- the kernel


def kernel_shapes(quick: bool) -> list[tuple[int, int, int]]:
    """(n, d_target, d_guide) of typical pairs: an FCN layer against conv maps and a sequence layer."""
    if quick:
        return [(8, 32, 2 * 28 * 28)]
    return [(64, 256, 32 * 28 * 28), (256, 256, 32 * 28 * 28), (256, 256, 16 * 56 * 56), (64, 256 * 128, 256 * 64)]


def time_kernel(n: int, d1: int, d2: int, repeats: int, device: torch.device) -> dict[str, float]:
    """linear_cka forward + backward against the products it cannot avoid.

    Unavoidable in sample space: the two Gram matrices x x^T (n^2 d1) and
    y y^T (n^2 d2) and, for the gradient, one (n, n) @ (n, d1) product. In
    feature space (taken when cheaper): y^T x, x^T x, y^T y and the gradient's
    products of the same size. The two take turns, as the steps do.
    """
    torch.manual_seed(0)
    x = torch.randn(n, d1, device=device, requires_grad=True)
    y = torch.randn(n, d2, device=device)
    m = torch.randn(n, n, device=device)

    def cka() -> None:
        linear_cka(x, y).backward()

    def floor() -> None:
        with torch.no_grad():
            if sample_space_is_cheaper(n, d1, d2):
                x @ x.T
                y @ y.T
                m @ x
            else:
                c = y.T @ x
                s = x.T @ x
                y.T @ y
                y @ c
                x @ s

    medians = time_variants({"kernel": cka, "products": floor}, repeats, device)
    kernel, products = medians["kernel"], medians["products"]
    return {
        "n": n,
        "d_target": d1,
        "d_guide": d2,
        "kernel_ms": kernel * 1e3,
        "products_ms": products * 1e3,
        "ratio": kernel / products,
    }


# ---------------------------------------------------------------- the run


def machine() -> str:
    """CPU model and core count from /proc/cpuinfo, and the GPU if used."""
    model, cores = platform.processor() or "unknown CPU", 0
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                cores += 1
    except OSError:
        pass
    text = f"{model}, {cores} logical cores, torch {torch.__version__}, {torch.get_num_threads()} intra-op threads"
    if torch.cuda.is_available():
        text += f", GPU {torch.cuda.get_device_name()}"
    return text


def run_bench(
    quick: bool = False, device: str = "auto", log: Callable[[str], None] = print, threads: int | None = None
) -> dict[str, Any]:
    """Measure every case and variant and the similarity kernel; returns the results as a dict.

    `threads` sets torch's intra-op threads (on a CPU shared with other
    work, 1 avoids the stalls of OpenMP threads waiting for a busy core).
    """
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(quick, device, log, threads)
    finally:
        torch.set_num_threads(previous)


def measure_case(case: Case, dev: torch.device, threads: int | None) -> dict[str, Any]:
    """One row: every variant's median ms and peak MiB, the floor and the ratios."""
    steps, info = case_steps(case, dev)
    timing = time_variants(steps, case.repeats, dev)
    del steps
    peaks = peak_memory(case, dev, threads)
    row: dict[str, Any] = {
        "case": case.name,
        "note": case.note,
        "pairs": info["pairs"],
        "cache_mib_per_example": info["cache_mib"],
    }
    for variant in VARIANTS:
        row[variant] = {"ms": timing[variant] * 1e3, "peak_mib": peaks[variant]}
    row["products"] = {"ms": timing[PRODUCTS] * 1e3, **info["products"]}
    row["floor_ms"] = row["+guide"]["ms"] + row["products"]["ms"]
    guided = row["guided"]["ms"]
    row.update({"c/b": guided / row["+guide"]["ms"], "c/floor": guided / row["floor_ms"]})
    row.update({"d/c": row["authors"]["ms"] / guided, "e/c": row["cached"]["ms"] / guided})
    return row


def _run(quick: bool, device: str, log: Callable[[str], None], threads: int | None) -> dict[str, Any]:
    dev = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    )
    rows: list[dict[str, Any]] = []
    for case in cases(quick):
        row = measure_case(case, dev, threads)
        for variant in VARIANTS:
            log(
                f"{case.name:<44} {variant:<8} {row[variant]['ms']:9.1f} ms  peak {_fmt_mem(row[variant]['peak_mib'])} MiB"
            )
        log(
            f"{case.name:<44} floor    {row['floor_ms']:9.1f} ms  (products {row['products']['ms']:.1f} ms)  c/floor {row['c/floor']:.2f}"
        )
        rows.append(row)
    kernels = []
    for n, d1, d2 in kernel_shapes(quick):
        result = time_kernel(n, d1, d2, 2 if quick else 7, dev)
        kernels.append(result)
        log(
            f"kernel n={n} d1={d1} d2={d2}: {result['kernel_ms']:.2f} ms vs products {result['products_ms']:.2f} ms ({result['ratio']:.2f}x)"
        )
    timing = "CUDA events" if dev.type == "cuda" else "perf_counter"
    return {
        "machine": machine(),
        "device": str(dev),
        "timing": timing,
        "quick": quick,
        "rows": rows,
        "kernels": kernels,
    }


def _fmt_mem(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def format_results(results: dict[str, Any]) -> str:
    """The step table and the kernel table in Markdown."""
    head = (
        "| case | pairs | (a) target ms | (b) +guide ms | (c) guided ms | floor ms | (e) cached ms | (d) authors ms "
        "| c/b | c/floor | d/c | e/c | peak MiB a / b / c / e / d |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in results["rows"]:
        ms = [f"{row[v]['ms']:.1f}" for v in ("target", "+guide", "guided")] + [f"{row['floor_ms']:.1f}"]
        ms += [f"{row[v]['ms']:.1f}" for v in ("cached", "authors")]
        ratios = [f"{row[r]:.2f}" for r in ("c/b", "c/floor", "d/c", "e/c")]
        mem = " / ".join(_fmt_mem(row[v]["peak_mib"]) for v in ("target", "+guide", "guided", "cached", "authors"))
        name = row["case"] + (f" ({row['note']})" if row["note"] else "")
        lines.append(f"| {name} | {row['pairs']} | " + " | ".join(ms + ratios) + f" | {mem} |")
    lines += [
        "",
        "| n | d target | d guide | CKA fwd+bwd ms | unavoidable products ms | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for k in results["kernels"]:
        lines.append(
            f"| {k['n']} | {k['d_target']} | {k['d_guide']} | {k['kernel_ms']:.2f} | {k['products_ms']:.2f} | {k['ratio']:.2f} |"
        )
    return "\n".join(lines)


def write_results(results: dict[str, Any], out: str | Path) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "table.md").write_text(f"Machine: {results['machine']} ({results['timing']})\n\n{format_results(results)}\n")
    return out
