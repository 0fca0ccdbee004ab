"""One run of the benchmark: its options checked, then every case's variants and the CKA kernel measured."""

from __future__ import annotations

from typing import Any, Callable

import torch

from untrainable.bench.cases import Case, cases, kernel_shapes
from untrainable.bench.measure import machine, peak_memory, time_kernel, time_variants
from untrainable.bench.report import format_mib
from untrainable.bench.variants import PRODUCTS, VARIANTS, case_steps
from untrainable.config import ConfigError

DEVICES = "auto, cpu, cuda or cuda:N"


def bench_device(device: str) -> torch.device:
    """The device `device` names ("auto": CUDA where there is one, else the CPU); a ConfigError if it cannot be used here."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"--device {device}: not a device torch knows; expected {DEVICES}") from None
    if dev.type == "cuda":
        _check_cuda(device, dev)
    return dev


def _check_cuda(device: str, dev: torch.device) -> None:
    """Refuse a CUDA device this torch or this machine lacks, before any model is built."""
    build = f"torch {torch.__version__}"
    if not torch.cuda.is_available():
        if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
            raise ConfigError(
                f"--device {device}: this torch has no CUDA ({build}); use --device cpu or install a CUDA build of torch"
            )
        raise ConfigError(
            f"--device {device}: no CUDA device is visible ({build}); "
            "use --device cpu, or check the GPU driver and CUDA_VISIBLE_DEVICES"
        )
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise ConfigError(
            f"--device {device}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}; "
            "use one of them or --device cuda"
        )


def check_threads(threads: int | None) -> None:
    """Refuse a thread count torch cannot take (None: torch's choice)."""
    if threads is None:
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ConfigError(
            f"--threads {threads}: expected a whole number of torch intra-op threads, 1 or more; "
            "use --threads 1 (or more), or leave it out for torch's choice"
        )


def run_bench(
    quick: bool = False, device: str = "auto", log: Callable[[str], None] = print, threads: int | None = None
) -> dict[str, Any]:
    """Measure every case and variant and the similarity kernel; returns the results as a dict.

    `threads` sets torch's intra-op threads (on a CPU shared with other
    work, 1 avoids the stalls of OpenMP threads waiting for a busy core).
    A device or thread count that cannot be used is refused with a
    ConfigError before anything is built.
    """
    check_threads(threads)
    dev = bench_device(device)
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(quick, dev, log, threads)
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


def _run(quick: bool, dev: torch.device, log: Callable[[str], None], threads: int | None) -> dict[str, Any]:
    """Every case's row and every kernel shape on `dev`, each logged as it is measured, with the machine."""
    rows: list[dict[str, Any]] = []
    for case in cases(quick):
        row = measure_case(case, dev, threads)
        for variant in VARIANTS:
            log(
                f"{case.name:<44} {variant:<8} {row[variant]['ms']:9.1f} ms  peak {format_mib(row[variant]['peak_mib'])} MiB"
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
