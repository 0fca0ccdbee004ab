"""The benchmark and the scaling study run end to end in their quick modes (numbers are not checked)."""

from __future__ import annotations

import pytest
import torch

from untrainable.bench import VARIANTS, authors_cka, format_results, run_bench, write_results
from untrainable.bench.cost_scaling import run_scaling, write_scaling
from untrainable.similarity import linear_cka, sample_space_is_cheaper


def test_authors_cka_agrees_with_linear_cka():
    x, y = torch.randn(20, 7, dtype=torch.float64), torch.randn(20, 5, dtype=torch.float64)
    assert torch.allclose(authors_cka(x, y), linear_cka(x, y), atol=1e-10)


@pytest.mark.slow
def test_quick_bench_writes_a_table(tmp_path):
    threads = torch.get_num_threads()
    results = run_bench(quick=True, device="cpu", log=lambda line: None, threads=1)
    assert torch.get_num_threads() == threads
    assert results["rows"] and results["kernels"]
    for row in results["rows"]:
        assert all(row[v]["ms"] > 0 for v in VARIANTS)
        # Peak memory comes from another process on a CPU; the floor from the case's shapes.
        assert all(row[v]["peak_mib"] is not None for v in VARIANTS)
        assert row["products"]["gmacs"] > 0 and row["floor_ms"] > row["+guide"]["ms"]
    write_results(results, tmp_path)
    table = (tmp_path / "table.md").read_text()
    assert all(ratio in table for ratio in ("c/b", "c/floor", "d/c", "e/c")) and format_results(results) in table


@pytest.mark.slow
def test_quick_scaling_writes_tables_and_a_figure(tmp_path):
    results = run_scaling(quick=True, log=lambda line: None)
    assert [r["batch"] for r in results["by_batch"]] == [64, 128]
    assert [r["pairs"] for r in results["by_pairs"]] == [1, 2]
    assert all(k["sample_ms"] > 0 and k["feature_ms"] > 0 for k in results["kernels"])
    # The cost model's switch point is where sample_space_is_cheaper turns false.
    for c in results["crossovers"]:
        assert sample_space_is_cheaper(c["model_n"] - 1, c["d_target"], c["d_guide"])
        assert not sample_space_is_cheaper(c["model_n"], c["d_target"], c["d_guide"])
    write_scaling(results, tmp_path)
    assert (tmp_path / "scaling.png").stat().st_size > 0
    assert "cost model switches" in (tmp_path / "scaling.md").read_text()
