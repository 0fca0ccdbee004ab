"""The suite's surroundings: GPU tests skipped where torch sees no CUDA device; caches kept out of the user's home.

A test marked `gpu` is skipped, with its reason, where there is no CUDA device.
Tests marked `slurm` run only when selected (`-m slurm`, against a cluster:
`bash scripts/slurm_local.sh start`); selected where `sbatch` is missing, they
are skipped, except in CI (CI set), where they fail instead.
The image index (and any other cache under XDG_CACHE_HOME) goes to a folder of
this session's own, which subprocesses inherit through the environment.
"""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _cache_home(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    _slurm_items(config, items)
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
