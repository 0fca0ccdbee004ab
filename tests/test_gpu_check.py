"""scripts/gpu_check.sh: the dry run on a CPU passes every step, a failed step is reported and the check goes on."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from untrainable.bench.gpu_check import Check, gpu_test_files, junit_counts, run_processes

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
# The steps of the GPU check, in order, as their lines number and name them.
STEPS = [
    ("1", "environment"),
    ("2", "gpu-tests"),
    ("3", "bench"),
    ("4a", "paper-deep-fcn"),
    ("4b", "paper-wide-fcn"),
    ("4c", "paper-plain50"),
    ("5a", "rescue-alone"),
    ("5b", "rescue-guided"),
    ("6", "summary"),
]


def _check(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict, str]:
    out = tmp_path / "check"
    done = subprocess.run(
        ["bash", str(SCRIPT), "--out", str(out), *args], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
    markdown = (out / "summary.md").read_text() if (out / "summary.md").exists() else ""
    return done, summary, markdown


def _lines(stdout: str) -> dict[str, str]:
    """Step name -> its status, from the lines `gpu-check NUMBER NAME STATUS SECONDS s  NUMBERS`."""
    found = re.findall(r"^gpu-check (\S+)\s+(\S+)\s+(ok|failed|skipped)\s+[\d.]+ s  \S", stdout, flags=re.M)
    return {name: status for _, name, status in found}


@pytest.mark.slow
def test_the_cpu_dry_run_passes_every_step_and_summarises_them(tmp_path):
    started = time.monotonic()
    done, summary, markdown = _check(tmp_path, "--device", "cpu", "--tiny")
    seconds = time.monotonic() - started
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    statuses = _lines(done.stdout)
    assert list(statuses) == [name for _, name in STEPS], done.stdout
    # On a CPU every GPU test skips: reported as skipped, never failed; everything else passes.
    assert statuses.pop("gpu-tests") == "skipped"
    assert set(statuses.values()) == {"ok"}, statuses
    assert [(s["number"], s["name"]) for s in summary["steps"]] == STEPS
    assert summary["failed"] == [] and summary["tiny"] and summary["device"] == "cpu"
    for number, name in STEPS:
        assert f"| {number} {name} |" in markdown, name
    by_name = {s["name"]: s for s in summary["steps"]}
    tests = by_name["gpu-tests"]["details"]
    assert "test_gpu.py" in tests["files"] and "test_gpu_check.py" not in tests["files"]
    assert tests["passed"] == tests["failed"] == 0 and tests["skipped"] > 0, "only the gpu-marked tests ran"
    assert by_name["bench"]["details"]["rows"], "the bench's rows are in the summary"
    for name in ("paper-deep-fcn", "paper-wide-fcn", "paper-plain50"):
        paper = by_name[name]["details"]
        assert paper["precision"] == "bf16" and paper["ms"]["guided"] > 0 and paper["estimate"]["ms"]
    for name in ("rescue-alone", "rescue-guided"):
        arm = by_name[name]["details"]
        assert arm["train_images"] == 200 and arm["epochs_done"] == 1 and 0 <= arm["test_accuracy"] <= 1
    assert seconds < 300  # measured: about 45 s on 2 busy CPU cores; the check is meant to take under 2 minutes


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the failures where no GPU is visible")
def test_asked_for_cuda_without_a_gpu_every_step_fails_and_the_later_ones_are_not_started(tmp_path):
    done, summary, markdown = _check(tmp_path, "--device", "cuda", "--tiny")
    assert done.returncode == 1
    statuses = _lines(done.stdout)
    assert list(statuses) == [name for _, name in STEPS], done.stdout
    assert statuses.pop("summary") == "ok"
    assert set(statuses.values()) == {"failed"}, statuses
    assert len(summary["failed"]) == len(STEPS) - 1 and "| 1 environment | failed |" in markdown
    by_name = {s["name"]: s for s in summary["steps"]}
    assert "no CUDA" in by_name["environment"]["summary"] or "not visible" in by_name["environment"]["summary"]
    assert all(Path(tmp_path / "check" / log).exists() for s in summary["steps"] for log in s["files"])
    # Every later step would fail on the missing CUDA: none is started, each names step 1 in its line and its log.
    later = [s for s in summary["steps"] if s["name"] not in ("environment", "summary")]
    assert all(s["summary"].startswith("not run: step 1 (environment) failed: ") for s in later), later
    assert all(s["seconds"] == 0.0 and s["files"] for s in later)


def _check_in(tmp_path: Path) -> Check:
    return Check(tmp_path, "cpu", True, 1, None, {"PATH": "/usr/bin:/bin"})


def test_a_command_past_its_budget_is_stopped_and_reported(tmp_path):
    check = _check_in(tmp_path)
    started = time.monotonic()
    hung = [sys.executable, "-c", "import time; time.sleep(60)"]
    ended = run_processes({"quick": ["true"], "hung": hung}, check, 1)
    assert time.monotonic() - started < 20
    assert ended["quick"][0] == 0 and ended["hung"][0] is None
    assert "stopped at its budget of 1 s" in (tmp_path / "logs" / "hung.log").read_text()


def test_only_the_files_with_gpu_marks_are_given_to_pytest(tmp_path):
    mark = "@pytest.mark." + "gpu"  # spelled apart, so that this file holds no mark of its own
    (tmp_path / "test_marked.py").write_text(f"import pytest\n\n\n{mark}\ndef test_a():\n    pass\n")
    (tmp_path / "test_module.py").write_text("import pytest\n\npytestmark = pytest.mark." + "gpu\n")
    (tmp_path / "test_mentions.py").write_text('"""Runs the ' + mark + ' tests in a subprocess."""\n')
    (tmp_path / "test_plain.py").write_text("def test_b():\n    pass\n")
    assert [p.name for p in gpu_test_files(tmp_path)] == ["test_marked.py", "test_module.py"]
    assert "test_gpu_check.py" not in [p.name for p in gpu_test_files(ROOT / "tests")]


def test_junit_counts_tell_passed_failed_and_skipped_apart(tmp_path):
    (tmp_path / "report.xml").write_text(
        '<testsuites><testsuite tests="4">'
        '<testcase classname="test_gpu" name="test_a"/>'
        '<testcase classname="test_gpu" name="test_b"><failure message="boom"/></testcase>'
        '<testcase classname="test_gpu" name="test_c"><error message="setup"/></testcase>'
        '<testcase classname="test_gpu" name="test_d"><skipped message="needs a CUDA device"/></testcase>'
        "</testsuite></testsuites>"
    )
    counts = junit_counts(tmp_path / "report.xml")
    assert (counts["passed"], counts["failed"], counts["skipped"]) == (1, 2, 1)
    assert counts["failures"] == ["test_gpu::test_b", "test_gpu::test_c"]
    assert counts["skip_reasons"] == ["needs a CUDA device"]
    assert junit_counts(tmp_path / "missing.xml") is None


def test_the_dry_run_keeps_the_rescue_results_but_not_its_weights(tmp_path, monkeypatch):
    from untrainable.bench import gpu_check

    check = _check_in(tmp_path)
    for arm in ("alone", "guided"):
        folder = tmp_path / "rescue" / arm
        (folder / "checkpoints").mkdir(parents=True)
        (folder / "checkpoints" / "step-000000010.pt").write_bytes(b"w" * 1000)
        for name in ("model.pt", "model.safetensors"):
            (folder / name).write_bytes(b"w" * 1000)
        (folder / "history.json").write_text(json.dumps([{"epoch": 1}]))
        (folder / "result.json").write_text(json.dumps({"test": {"accuracy": 0.5}, "seconds": 1.0, "steps": 10}))
    monkeypatch.setattr(gpu_check, "rescue_commands", lambda check: {"rescue-alone": [], "rescue-guided": []})
    monkeypatch.setattr(gpu_check, "run_processes", lambda commands, check, budget: {n: (0, 1.0) for n in commands})
    results = gpu_check.rescue(check)
    assert [r.status for r in results] == ["ok", "ok"]
    for arm in ("alone", "guided"):
        folder = tmp_path / "rescue" / arm
        assert not list(folder.rglob("*.pt")) and not list(folder.rglob("*.safetensors")), "weights left behind"
        assert (folder / "result.json").exists() and (folder / "history.json").exists()
    assert all(r.details["weights_removed"] == 3000 for r in results)
