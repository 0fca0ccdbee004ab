"""The benchmark runs end to end in its quick mode (numbers are not checked)."""

from __future__ import annotations

import torch

from untrainable.bench import VARIANTS, authors_cka, format_results, run_bench, write_results
from untrainable.similarity import linear_cka


def test_authors_cka_agrees_with_linear_cka():
    x, y = torch.randn(20, 7, dtype=torch.float64), torch.randn(20, 5, dtype=torch.float64)
    assert torch.allclose(authors_cka(x, y), linear_cka(x, y), atol=1e-10)


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
