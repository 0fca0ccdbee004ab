"""What guidance costs: step time and peak memory of unguided, guided and the authors' guided step.

One run measures, on the same machine and the same batches:

- (a) `target`: the target's training step alone;
- (b) `+guide`: (a) plus the guide's forward, no alignment;
- (c) `guided`: the full guided step (`Guidance`: one target forward,
  hooks registered once, CKA in sample or feature space);
- (e) `cached`: (c) with the guide's activations read from a filled
  `GuideCache` instead of running the guide;
- (d) `authors`: a re-implementation of the authors' step: the target
  forwards twice (task loss, then again inside a feature extractor that
  registers hooks on every module of a fixed list of types at every step),
  biased CKA with explicit n x n centring matrices H = I - 11^T / n.

and the similarity kernel alone (forward + backward) against the matrix
products it cannot avoid on the same shapes.
"""

from __future__ import annotations

import ctypes
import json
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from untrainable.capture import as_activation, named_layers
from untrainable.guidance import Guidance
from untrainable.guide_cache import GuideCache
from untrainable.models import create_model
from untrainable.similarity import linear_cka

VARIANTS = ("target", "+guide", "guided", "cached", "authors")


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


@dataclass
class Measurement:
    case: str
    variant: str
    seconds: float  # median seconds per step
    peak_mib: float | None  # peak memory of a step above the memory before it
    extra: dict[str, Any] = field(default_factory=dict)


def cases(quick: bool = False) -> list[Case]:
    """The benchmark's pairs. Widths of the guide are reduced to fit a CPU; each case says so."""
    if quick:
        return [
            Case("deep_fcn<-resnet18 28x28 (tiny)", "deep_fcn", {"input_shape": (1, 28, 28), "depth": 4, "width": 32}, "resnet18", {"input_shape": (1, 28, 28), "width": 2}, 8, (1, 28, 28), repeats=1),
            Case("rnn<-transformer L=16 (tiny)", "rnn", {"hidden": 8, "embed_dim": 8, "layers": 1}, "causal_transformer", {"dim": 8, "depth": 1, "heads": 2, "max_len": 16}, 4, (16,), tokens=True, num_classes=16, repeats=1),
        ]
    found = []
    for batch in (64, 256):
        found.append(Case(f"deep_fcn<-resnet18 28x28 b{batch}", "deep_fcn", {"input_shape": (1, 28, 28)}, "resnet18", {"input_shape": (1, 28, 28), "width": 16}, batch, (1, 28, 28), repeats=3, note="ResNet-18 at width 16 of 64"))
    for batch in (64, 256):
        found.append(Case(f"deep_fcn<-resnet18 224x224 b{batch}", "deep_fcn", {"input_shape": (3, 224, 224)}, "resnet18", {"input_shape": (3, 224, 224), "width": 8, "stem": "imagenet"}, batch, (3, 224, 224), repeats=3 if batch == 64 else 2, note="ResNet-18 at width 8 of 64"))
    found.append(Case("rnn<-transformer L=256 b64", "rnn", {}, "causal_transformer", {"max_len": 256}, 64, (256,), tokens=True, num_classes=16, repeats=3))
    return found


# ---------------------------------------------------------------- memory


class _Memory:
    """Peak memory of a block of code above the memory in use when it starts.

    GPU: torch.cuda.max_memory_allocated (tensors only). CPU: the peak
    resident set size (VmHWM of /proc/self/status, reset through
    /proc/self/clear_refs) minus the resident size at the start, with
    glibc's mmap threshold fixed at 128 KiB so that every tensor larger than
    that is returned to the system when freed; it counts tensors, allocator
    and library scratch space, so it is an upper bound on the tensors alone.
    None where neither is available.
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

AUTHORS_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU, nn.RNN, nn.LSTM, nn.MultiheadAttention)


def authors_features(model: nn.Module, x: Tensor, types: tuple[type[nn.Module], ...] = AUTHORS_TYPES) -> dict[str, Tensor]:
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


def _build(case: Case, device: torch.device) -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
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


def _steps(case: Case, device: torch.device) -> tuple[dict[str, Callable[[], None]], dict[str, Any]]:
    """One closure per variant, each doing one full optimisation step on the same batch."""
    target, guide, x, y = _build(case, device)
    optimizer = torch.optim.Adam(target.parameters(), lr=1e-4)
    guidance = Guidance(target, guide).train()
    cache = GuideCache(case.batch, "memory")
    index = torch.arange(case.batch)
    cache.activations(index, x, guidance.run_guide)  # filled once, as after the first epoch

    modules_t, modules_g = named_layers(target), named_layers(guide)
    # The fixed list, plus the classes of the paired layers (a model's own
    # attention class), as the authors list the types their models use.
    paired = {type(modules_t[p.target]) for p in guidance.pairs} | {type(modules_g[p.guide]) for p in guidance.pairs}
    types = AUTHORS_TYPES + tuple(sorted(paired - set(AUTHORS_TYPES), key=lambda t: t.__name__))
    pos_t, pos_g = positional_names(target, types), positional_names(guide, types)
    authors_pairs = [(pos_t[id(modules_t[p.target])], pos_g[id(modules_g[p.guide])], p.weight) for p in guidance.pairs]

    def finish(loss: Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def step_target() -> None:
        finish(_task_loss(target(x), y))

    def step_guide_forward() -> None:
        output = target(x)
        with torch.no_grad():
            guide(x)
        finish(_task_loss(output, y))

    def step_guided() -> None:
        out = guidance(x)
        finish(_task_loss(out.output, y) + out.guidance_loss)

    def step_cached() -> None:
        out = guidance(x, guide_activations=cache.activations(index, x, guidance.run_guide))
        finish(_task_loss(out.output, y) + out.guidance_loss)

    def step_authors() -> None:
        loss = _task_loss(target(x), y)
        target_features = authors_features(target, x, types)
        with torch.no_grad():
            guide_features = authors_features(guide, x, types)
        for t_name, g_name, weight in authors_pairs:
            loss = loss + weight * (1.0 - authors_cka(target_features[t_name], guide_features[g_name]))
        finish(loss)

    steps = {"target": step_target, "+guide": step_guide_forward, "guided": step_guided, "cached": step_cached, "authors": step_authors}
    info = {"pairs": len(guidance.pairs), "cache_mib": cache.nbytes() / 2**20 / case.batch}
    return steps, info


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_variants(steps: dict[str, Callable[[], None]], repeats: int, device: torch.device, memory: _Memory) -> dict[str, tuple[float, float | None]]:
    """Median seconds per step of each variant, and its peak memory above the start of a step.

    After one warm-up step of each, the variants take turns (round-robin)
    `repeats` times, so that load from other processes on a shared machine
    falls on all of them alike. Memory is measured on one separate step each.
    """
    peaks = {}
    for name, step in steps.items():
        step()  # warm-up: allocates optimiser state, fills caches
        _sync(device)
        memory.begin()
        step()
        _sync(device)
        peaks[name] = memory.peak_mib()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            started = time.perf_counter()
            step()
            _sync(device)
            times[name].append(time.perf_counter() - started)
    return {name: (statistics.median(times[name]), peaks[name]) for name in steps}


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
    products of the same size. The smaller of the two is the floor.
    """
    torch.manual_seed(0)
    x = torch.randn(n, d1, device=device, requires_grad=True)
    y = torch.randn(n, d2, device=device)

    def cka() -> None:
        linear_cka(x, y).backward()

    def floor() -> None:
        with torch.no_grad():
            if n * (d1 + d2) + 3 * n * n < d1 * d2 + d1 * d1 + d2 * d2:
                k = x @ x.T
                y @ y.T
                k @ x
            else:
                c = y.T @ x
                s = x.T @ x
                y.T @ y
                y @ c
                x @ s

    def median(fn: Callable[[], None]) -> float:
        fn()
        _sync(device)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    kernel, products = median(cka), median(floor)
    return {"n": n, "d_target": d1, "d_guide": d2, "kernel_ms": kernel * 1e3, "products_ms": products * 1e3, "ratio": kernel / products}


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


def run_bench(quick: bool = False, device: str = "auto", log: Callable[[str], None] = print, threads: int | None = None) -> dict[str, Any]:
    """Measure every case and variant and the similarity kernel; returns the results as a dict.

    `threads` sets torch's intra-op threads (on a CPU shared with other
    work, 1 avoids the stalls of OpenMP threads waiting for a busy core).
    """
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(quick, device, log)
    finally:
        torch.set_num_threads(previous)


def _run(quick: bool, device: str, log: Callable[[str], None]) -> dict[str, Any]:
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    memory = _Memory(dev)
    rows: list[dict[str, Any]] = []
    for case in cases(quick):
        steps, info = _steps(case, dev)
        row: dict[str, Any] = {"case": case.name, "note": case.note, "pairs": info["pairs"], "cache_mib_per_example": info["cache_mib"]}
        timing = time_variants(steps, case.repeats, dev, memory)
        for variant in VARIANTS:
            seconds, peak = timing[variant]
            row[variant] = {"ms": seconds * 1e3, "peak_mib": peak}
            log(f"{case.name:<36} {variant:<8} {seconds * 1e3:9.1f} ms  peak {peak if peak is None else round(peak, 1)} MiB")
        row["c/b"] = row["guided"]["ms"] / row["+guide"]["ms"]
        row["d/c"] = row["authors"]["ms"] / row["guided"]["ms"]
        row["e/c"] = row["cached"]["ms"] / row["guided"]["ms"]
        rows.append(row)
        del steps
    kernels = []
    for n, d1, d2 in kernel_shapes(quick):
        result = time_kernel(n, d1, d2, 2 if quick else 5, dev)
        kernels.append(result)
        log(f"kernel n={n} d1={d1} d2={d2}: {result['kernel_ms']:.2f} ms vs products {result['products_ms']:.2f} ms ({result['ratio']:.2f}x)")
    return {"machine": machine(), "device": str(dev), "quick": quick, "rows": rows, "kernels": kernels}


def _fmt_mem(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def format_results(results: dict[str, Any]) -> str:
    """The step table and the kernel table in Markdown."""
    head = "| case | pairs | (a) target ms | (b) +guide ms | (c) guided ms | (e) cached ms | (d) authors ms | c/b | d/c | e/c | peak MiB a / b / c / e / d |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in results["rows"]:
        ms = [f"{row[v]['ms']:.1f}" for v in ("target", "+guide", "guided", "cached", "authors")]
        mem = " / ".join(_fmt_mem(row[v]["peak_mib"]) for v in ("target", "+guide", "guided", "cached", "authors"))
        name = row["case"] + (f" ({row['note']})" if row["note"] else "")
        lines.append(f"| {name} | {row['pairs']} | " + " | ".join(ms) + f" | {row['c/b']:.2f} | {row['d/c']:.2f} | {row['e/c']:.2f} | {mem} |")
    lines += ["", "| n | d target | d guide | CKA fwd+bwd ms | unavoidable products ms | ratio |", "|---|---|---|---|---|---|"]
    for k in results["kernels"]:
        lines.append(f"| {k['n']} | {k['d_target']} | {k['d_guide']} | {k['kernel_ms']:.2f} | {k['products_ms']:.2f} | {k['ratio']:.2f} |")
    return "\n".join(lines)


def write_results(results: dict[str, Any], out: str | Path) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "table.md").write_text(f"Machine: {results['machine']}\n\n{format_results(results)}\n")
    return out
