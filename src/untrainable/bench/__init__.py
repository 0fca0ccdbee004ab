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

    untrainable bench [--quick] [--device auto|cpu|cuda|cuda:N] [--threads N] [--out results/bench]

`cases.py` holds the pairs and sizes, `variants.py` the steps, `measure.py`
timing and memory, `report.py` the tables, `run.py` one run. Beside it, none
imported here: `cost_scaling.py` (`python -m untrainable.bench.cost_scaling`,
how the cost grows with batch and pairs), `paper_estimates.py`
(`python -m untrainable.bench.paper_estimates`, the paper-scale configs'
estimated step cost), `paper_measure.py` (one paper-scale config's step
measured on a device, beside its estimate) and `gpu_check.py` with
`gpu_report.py` and `gpu_steps.py` (`bash scripts/gpu_check.sh`: the GPU
check in one command).
"""

from untrainable.bench.cases import Case, build_case, cases, kernel_shapes
from untrainable.bench.measure import machine, peak_memory, step_peaks, time_kernel, time_variants
from untrainable.bench.report import format_mib, format_number, format_results, write_results
from untrainable.bench.run import bench_device, check_threads, measure_case, run_bench
from untrainable.bench.variants import (
    AUTHORS_TYPES,
    PRODUCTS,
    VARIANTS,
    authors_cka,
    authors_features,
    case_steps,
    positional_names,
    unavoidable_products,
)

__all__ = [
    "AUTHORS_TYPES",
    "PRODUCTS",
    "VARIANTS",
    "Case",
    "authors_cka",
    "authors_features",
    "bench_device",
    "build_case",
    "case_steps",
    "cases",
    "check_threads",
    "format_mib",
    "format_number",
    "format_results",
    "kernel_shapes",
    "machine",
    "measure_case",
    "peak_memory",
    "positional_names",
    "run_bench",
    "step_peaks",
    "time_kernel",
    "time_variants",
    "unavoidable_products",
    "write_results",
]
