"""The suite's surroundings: GPU tests skipped where torch sees no CUDA device; caches kept out of the user's home.

A test marked `gpu` is skipped, with its reason, where there is no CUDA device.
Tests marked `slurm` run only when selected (`-m slurm`, against a cluster:
`bash scripts/slurm_local.sh start`); selected where `sbatch` is missing, they
are skipped, except in CI (CI set), where they fail instead.
The image index (and any other cache under XDG_CACHE_HOME) goes to a folder of
this session's own, which subprocesses inherit through the environment.

In parallel (pytest-xdist, `-n auto`), each worker is one process among as many
as there are cores: its torch runs one thread (and so do the subprocesses it
starts), where each would otherwise take every core and the workers fight over
them. Tests marked `slow` are handed out first, so that the longest ones do not
start last and leave one worker running alone at the end.
"""

from __future__ import annotations

import os

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"  # inherited by subprocesses
    import torch

    torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _cache_home(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    _slurm_items(config, items)
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: slow first, in file order
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
