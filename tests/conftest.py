"""The suite's surroundings: GPU tests skipped where torch sees no CUDA device; caches kept out of the user's home.

A test marked `gpu` is skipped, with its reason, where there is no CUDA device.
Tests marked `slurm` run only when selected (`-m slurm`, against a cluster:
`bash scripts/slurm_local.sh start`); selected where `sbatch` is missing, they
are skipped, except in CI (CI set), where they fail instead.
The image index (and any other cache under XDG_CACHE_HOME) goes to a folder of
this test run's own, which subprocesses inherit through the environment.

In parallel (pytest-xdist, `-n auto`), each worker is one process among as many
as there are cores: its torch runs one thread (and so do the subprocesses it
starts), where each would otherwise take every core and the workers fight over
them. The longest tests (LONGEST, from `--durations`) are started first, then
the other `slow` ones, spread over the workers, so that no long test starts last
and leaves one worker running alone at the end. The order changes nothing else.
"""

from __future__ import annotations

import os

import pytest

# The longest tests, longest first (from the suite's --durations): started first, one per worker in turn.
LONGEST = (
    "test_gpu_check.py::test_the_cpu_dry_run_passes_every_step_and_summarises_them",
    "test_rescue.py::test_quick_rescue_prints_both_epochs_and_its_verdict",
    "test_torchrun.py::test_two_processes_train_and_resume_like_one_unbroken_run",
    "test_rescue.py::test_the_long_study_runs_end_to_end_at_toy_size",
    "test_vision_study.py::test_canvas_study_sets_the_wide_fcn_on_a_larger_image",
    "test_executor.py::test_sigterm_stops_every_local_process_after_a_checkpoint_and_the_same_command_resumes_them",
    "test_rescue.py::test_parallel_runs_match_one_process_and_wait_for_their_guide",
    "test_crash_safety.py::test_sigkill_mid_epoch_then_resume_gives_the_same_weights",
    "test_vision_study.py::test_run_vision_quick_writes_tables",
    "test_tracking.py::test_a_run_killed_and_resumed_continues_its_tracker_runs_each_step_once",
    "test_bench_loader.py::test_the_measurement_writes_its_numbers_and_command",
    "test_lightning_example.py::test_ddp_logs_the_global_batch_guidance_loss",
    "test_tune.py::test_a_study_killed_mid_trial_finishes_with_its_trials_and_no_duplicate",
)

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"  # inherited by subprocesses
    import torch

    torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _cache_home(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    _slurm_items(config, items)
    def order(item: pytest.Item) -> tuple[int, int]:
        name = item.nodeid.rsplit("/", 1)[-1].split("[")[0]  # every parameter of a long test
        if name in LONGEST:
            return (0, LONGEST.index(name))
        return (1 if item.get_closest_marker("slow") is not None else 2, 0)

    items.sort(key=order)  # stable: within a group, file order
    # xdist's worksteal hands each worker one contiguous block and an idle worker takes the tail of a busy one's:
    # dealt round-robin into the blocks, every worker starts on long tests and ends on short ones.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        items[:] = [item for k in range(workers) for item in items[k::workers]]
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    import torch  # only where a GPU test was collected

    if torch.cuda.is_available():
        return
    build = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", a CPU build")
    skip = pytest.mark.skip(reason=f"needs a CUDA device ({build}, none visible)")
    for item in gpu_items:
        item.add_marker(skip)


def _slurm_items(config: pytest.Config, items: list[pytest.Item]) -> None:
    import shutil

    slurm_items = [item for item in items if item.get_closest_marker("slurm") is not None]
    if not slurm_items:
        return
    if "slurm" not in (config.getoption("markexpr") or ""):
        reason = "needs a SLURM cluster: run with -m slurm (bash scripts/slurm_local.sh start gives one)"
    elif shutil.which("sbatch") is None and not os.environ.get("CI"):
        reason = "sbatch not found: start a one-node cluster with bash scripts/slurm_local.sh start"
    else:
        return  # selected, and in CI they run (and fail without sbatch)
    for item in slurm_items:
        item.add_marker(pytest.mark.skip(reason=reason))
