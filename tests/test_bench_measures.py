"""`untrainable bench --measures` and the measures' table in `untrainable list` run end to end (numbers not checked)."""

import json

import torch

from untrainable.bench.measures import UNGUIDED, format_measures, run_measures
from untrainable.cli import main
from untrainable.similarity import list_similarities


def test_quick_measure_bench_times_every_measure_against_the_unguided_step():
    results = run_measures(quick=True, device=torch.device("cpu"))
    names = [row["measure"] for row in results["rows"]]
    assert names == [UNGUIDED, *list_similarities()]
    assert all(row["ms"] > 0 for row in results["rows"])
    cka = next(row for row in results["rows"] if row["measure"] == "cka")
    assert cka["x_cka"] == 1.0
    assert "| procrustes |" in format_measures(results)


def test_bench_measures_writes_its_table(tmp_path, capsys):
    assert main(["bench", "--measures", "--quick", "--device", "cpu", "--threads", "1", "--out", str(tmp_path)]) == 0
    assert "| cka_rbf |" in (tmp_path / "measures.md").read_text()
    assert json.loads((tmp_path / "measures.json").read_text())["rows"][0]["measure"] == UNGUIDED


def test_list_shows_each_measures_range_and_invariances(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.strip().startswith("procrustes"))
    assert "[0, 1]" in line and "rotation" in line and "arccos" in line
