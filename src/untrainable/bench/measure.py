"""Timing and memory: median seconds per step in a round-robin, peak memory apart, the CKA kernel alone.

Timing runs with the allocator as it is; peak memory is measured apart
(another process on a CPU, a pass after the timing on a GPU), and the
similarity kernel alone is timed against its matrix products.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import platform
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable

import torch

from untrainable.bench.cases import Case
from untrainable.bench.variants import VARIANTS, case_steps
from untrainable.similarity import linear_cka, sample_space_is_cheaper

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


# ---------------------------------------------------------------- timing


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
    return step_peaks({name: steps[name] for name in VARIANTS}, device)


def step_peaks(steps: dict[str, Callable[[], None]], device: torch.device) -> dict[str, float | None]:
    """Peak memory (MiB) of one call of each step above the memory in use before it, after a warm-up call.

    On a CPU this fixes glibc's mmap threshold for the rest of the process
    (see `_Memory`), which slows steps down: call it where nothing is timed
    afterwards (`peak_memory` runs it in a fresh process).
    """
    memory = _Memory(device)
    peaks = {}
    for name, step in steps.items():
        step()  # warm-up: optimiser state and caches are not part of a step's peak
        _sync(device)
        memory.begin()
        step()
        _sync(device)
        peaks[name] = memory.peak_mib()
    return peaks


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- the kernel


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


# ---------------------------------------------------------------- the machine


def cpu_model() -> tuple[str, int]:
    """The CPU's model name and logical core count, from /proc/cpuinfo (0 cores where it cannot be read)."""
    model, cores = platform.processor() or "unknown CPU", 0
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                cores += 1
    except OSError:
        pass
    return model, cores


def machine() -> str:
    """CPU model and core count from /proc/cpuinfo, and the GPU if used."""
    model, cores = cpu_model()
    text = f"{model}, {cores} logical cores, torch {torch.__version__}, {torch.get_num_threads()} intra-op threads"
    if torch.cuda.is_available():
        text += f", GPU {torch.cuda.get_device_name()}"
    return text
