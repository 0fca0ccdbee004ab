"""Tiers the hardware decides: a test marked `gpu` is skipped, with its reason, where torch sees no CUDA device."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
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
