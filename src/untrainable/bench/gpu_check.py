"""The GPU check in one command: environment, the GPU tests, the bench, the paper-scale steps, the rescue, a summary.

    bash scripts/gpu_check.sh --out DIR [--device cuda|cpu] [--tiny]
    python -m untrainable.bench.gpu_check --out DIR [--device cuda|cpu] [--tiny] [--tests tests/]

Steps, numbered:

1. `environment`: torch, CUDA, cuDNN and driver versions, each GPU's name
   and memory, bf16 support, nccl; nothing is installed.
2. `gpu-tests`: `pytest -m gpu -p no:cacheprovider` on the test files that
   hold GPU tests (only those: never the whole suite); skipped tests are
   reported as skipped, which is what every one of them is on a CPU.
3. `bench`: `untrainable bench --device DEV --out DIR/bench` (`--quick` when tiny).
4. `paper-deep-fcn`, `paper-wide-fcn`, `paper-plain50`:
   `python -m untrainable.bench.paper_measure` on each guided paper-scale
   config at full size (bf16, batch 64, synthetic 224 x 224 inputs, 200
   steps): ms per step and peak memory beside `paper_estimates`' numbers.
5. `rescue-alone`, `rescue-guided`: `untrainable train` on
   configs/rescue_deep_fcn.toml at width 256, alone (Adam 1e-3) and guided
   by the untrained ResNet-18, 1 seed, 10 epochs on all of Fashion-MNIST's
   training images less the 1,000 that validate (59,000); the two arms run
   at the same time, on the same device. Test accuracy and wall time.
6. `summary`: DIR/summary.md and DIR/summary.json (`gpu_report`).

Every step but the first runs in its own process under a time budget
(`gpu_steps.BUDGETS`), its output kept in DIR/logs/STEP.log: a crash, a hang or an
out-of-memory error is that step's failure, and the next step runs. Asked
for CUDA where the environment step finds none, the later steps are not
started: each fails at once, naming step 1. Each
step prints one line: its result (ok, failed, skipped), seconds, and its key
numbers. The exit code is 1 when any step failed, else 0. A rerun into the
same DIR replaces the earlier run's files.

Budgets assume one H200 or H100-class GPU with 16 CPU cores (none of them
measured yet): about 10 ms a Deep FCN step, 35 ms a Wide FCN step and 25 ms a
plain-50 step at batch 64 (the estimates, with room for launch overhead),
5 to 10 s to build the Wide FCN's 1.4 billion weights on the CPU, and a
rescue step of at most 20 ms guided (48 blocks: launch-bound), so 10 epochs
of 921 steps fit 195 s. Their sum is 470 s, within 8 minutes with the
check's own start and summary. With `--device cpu` every process sees no GPU
(CUDA_VISIBLE_DEVICES is emptied) and runs with `--threads` torch threads
(default 1 on a CPU: the dry run shares its cores). `--tiny` runs the same
code at toy sizes (the bench's `--quick`, paper_measure's `--tiny`, 200
training images and 1 epoch for the rescue): under 2 minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from untrainable.bench.gpu_report import write_summary
from untrainable.bench.gpu_steps import Check, StepResult

PAPER = {"paper-deep-fcn": "paper_deep_fcn", "paper-wide-fcn": "paper_wide_fcn", "paper-plain50": "paper_plain50"}
RESCUE_WIDTH, RESCUE_EPOCHS = 256, 10
TINY_RESCUE = {"data.args.train_size": 200, "data.args.val_size": 100, "train.epochs": 1}
FASHION_MNIST_TRAIN = 60_000  # Fashion-MNIST's training split; validation is carved from it
GPU_MARK = re.compile(r"^\s*(@pytest\.mark\.gpu\b|pytestmark\s*=.*\bpytest\.mark\.gpu\b)", re.M)
STOP_GRACE_S = 5  # after SIGTERM at the budget, before SIGKILL
STATUSES = ("ok", "failed", "skipped")


# ---------------------------------------------------------------- processes


def run_processes(commands: dict[str, list[str]], check: Check, budget: float) -> dict[str, tuple[int | None, float]]:
    """Run the commands at once, each with its output in its log; per command (exit code, seconds).

    The exit code is None for a command stopped at `budget` seconds (SIGTERM
    to its process group, SIGKILL STOP_GRACE_S later).
    """
    started = time.monotonic()
    running: dict[str, tuple[subprocess.Popen, Any]] = {}
    for name, command in commands.items():
        log = check.log(name).open("w")
        log.write(f"$ {shlex.join(command)}\n")
        log.flush()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=check.env, start_new_session=True)
        running[name] = (process, log)
    done: dict[str, tuple[int | None, float]] = {}
    try:
        while len(done) < len(running):
            for name, (process, log) in running.items():
                if name not in done and process.poll() is not None:
                    done[name] = (process.returncode, time.monotonic() - started)
                    log.close()
            if len(done) < len(running) and time.monotonic() - started > budget:
                for name, (process, log) in running.items():
                    if name not in done:
                        _stop(process)
                        log.write(f"\ngpu-check: stopped at its budget of {budget:.0f} s\n")
                        log.close()
                        done[name] = (None, time.monotonic() - started)
            time.sleep(0.1)
    except BaseException:
        # Ctrl-C reaches this process only (each command has its own session): end the commands too.
        for name, (process, _) in running.items():
            if name not in done:
                _stop(process)
        raise
    return done


def run_one(name: str, command: list[str], check: Check, budget: float) -> int | None:
    """One command's exit code, None when it was stopped at `budget` seconds (see `run_processes`)."""
    return run_processes({name: command}, check, budget)[name][0]


def _stop(process: subprocess.Popen) -> None:
    """End a process this check started, and its children (its own session): SIGTERM, then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=STOP_GRACE_S)
            return
        except subprocess.TimeoutExpired:
            continue


def _python(*args: str) -> list[str]:
    return [sys.executable, *args]


def _threads(check: Check) -> list[str]:
    return ["--threads", str(check.threads)] if check.threads is not None else []


def _ended(rc: int | None, budget: float, log: str) -> str:
    """Why a process failed, for the step's line."""
    if rc is None:
        return f"stopped at its budget of {budget:.0f} s (see {log})"
    return f"exit code {rc} (see {log})"


# ---------------------------------------------------------------- 1. environment


def environment(check: Check) -> tuple[str, str, dict[str, Any]]:
    """torch, CUDA, cuDNN and driver versions, the GPUs, bf16 and nccl; failed when CUDA is wanted and missing."""
    import platform

    import torch
    import torch.distributed as dist

    info: dict[str, Any] = {
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_build": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cuda_available": torch.cuda.is_available(),
        "driver": _driver(),
        "nccl_available": dist.is_available() and dist.is_nccl_available(),
        "nccl": None,
        "gpus": [],
        "cpu_threads": torch.get_num_threads(),
    }
    if info["nccl_available"]:
        try:
            info["nccl"] = ".".join(str(v) for v in torch.cuda.nccl.version())
        except (RuntimeError, AttributeError, TypeError):
            info["nccl"] = None
    if info["cuda_available"]:
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            info["gpus"].append(
                {
                    "name": props.name,
                    "memory_gib": props.total_memory / 2**30,
                    "capability": f"{props.major}.{props.minor}",
                }
            )
        info["bf16"] = torch.cuda.is_bf16_supported()
    build = f"torch {info['torch']}" + (f", CUDA {info['cuda_build']}" if info["cuda_build"] else ", a CPU build")
    if info["gpus"]:
        gpus = ", ".join(f"{g['name']} {g['memory_gib']:.0f} GiB" for g in info["gpus"])
        nccl = f"nccl {info['nccl']}" if info["nccl_available"] else "no nccl"
        return "ok", f"{build}, driver {info['driver']}, {len(info['gpus'])} GPU: {gpus}, {nccl}", info
    if check.device.startswith("cuda"):
        why = "this torch has no CUDA: install a CUDA build" if not info["cuda_build"] else "no CUDA device is visible"
        return "failed", f"{build}; {why}", info
    nccl = "nccl available" if info["nccl_available"] else "no nccl"
    return "ok", f"{build}, no GPU used (--device cpu), {nccl}", info


def _driver() -> str | None:
    """The NVIDIA driver's version from nvidia-smi, None without one."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else None


# ---------------------------------------------------------------- 2. the GPU tests


def gpu_test_files(tests: Path) -> list[Path]:
    """The test files that mark a test, or all of theirs, `gpu`."""
    return sorted(path for path in tests.glob("test_*.py") if GPU_MARK.search(path.read_text()))


def gpu_tests(check: Check) -> tuple[str, str, dict[str, Any]]:
    """`pytest -m gpu` on the GPU test files; skipped where every test skipped for want of a GPU."""
    if check.tests is None or not check.tests.is_dir():
        return "skipped", f"no tests folder ({check.tests}): run from a checkout, or give --tests", {}
    files = gpu_test_files(check.tests)
    if not files:
        return "failed", f"no test in {check.tests} is marked gpu", {}
    report = check.out / "gpu-tests.xml"
    # -n 0: in one process (the suite's default is a worker per core; the GPU tests share one device).
    command = _python(
        "-m", "pytest", "-m", "gpu", "-n", "0", "-p", "no:cacheprovider", "-q", "-rs", f"--junitxml={report}"
    )
    command += [str(path) for path in files]
    budget = check.budget("gpu-tests")
    rc = run_one("gpu-tests", command + ["--rootdir", str(check.tests.parent)], check, budget)
    counts = junit_counts(report)
    details = {"files": [path.name for path in files], "exit_code": rc, **(counts or {})}
    log = check.relative(check.log("gpu-tests"))
    if counts is None:
        return "failed", f"pytest wrote no report: {_ended(rc, budget, log)}", details
    text = f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped"
    if rc != 0 or counts["failed"]:
        names = ", ".join(counts["failures"][:3]) + (" ..." if len(counts["failures"]) > 3 else "")
        return "failed", f"{text}: {names or _ended(rc, budget, log)}", details
    if counts["passed"] == 0:
        reasons = sorted(set(counts["skip_reasons"]))
        return ("skipped" if check.device == "cpu" else "failed"), f"{text} ({'; '.join(reasons)[:120]})", details
    return "ok", text, details


def junit_counts(path: Path) -> dict[str, Any] | None:
    """passed, failed (failures and errors), skipped, the failed tests' names and skip reasons from a JUnit XML report."""
    import xml.etree.ElementTree as ElementTree

    try:
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError):
        return None
    failures, skips, total = [], [], 0
    for case in root.iter("testcase"):
        total += 1
        name = f"{case.get('classname', '').rpartition('.')[2]}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            failures.append(name)
        skipped = case.find("skipped")
        if skipped is not None:
            skips.append(skipped.get("message", "").removeprefix("Skipped: "))
    return {
        "passed": total - len(failures) - len(skips),
        "failed": len(failures),
        "skipped": len(skips),
        "failures": failures,
        "skip_reasons": skips,
    }


# ---------------------------------------------------------------- 3. the bench


def bench(check: Check) -> tuple[str, str, dict[str, Any]]:
    """`untrainable bench` on the device; the ratios and peaks of bench.json."""
    folder = check.out / "bench"
    command = _python("-m", "untrainable", "bench", "--device", check.device, "--out", str(folder), *_threads(check))
    command += ["--quick"] if check.tiny else []
    budget = check.budget("bench")
    rc = run_one("bench", command, check, budget)
    if rc != 0 or not (folder / "bench.json").exists():
        return "failed", _ended(rc, budget, check.relative(check.log("bench"))), {}
    results = json.loads((folder / "bench.json").read_text())
    rows = [
        {
            "case": row["case"],
            "c/floor": row["c/floor"],
            "d/c": row["d/c"],
            "e/c": row["e/c"],
            "guided_ms": row["guided"]["ms"],
            "peak_mib_guided": row["guided"]["peak_mib"],
            "peak_mib_authors": row["authors"]["peak_mib"],
        }
        for row in results["rows"]
    ]
    details = {"machine": results["machine"], "timing": results["timing"], "rows": rows, "folder": "bench"}
    spans = [f"{key} {_span([row[key] for row in rows])}" for key in ("c/floor", "d/c")]
    return "ok", f"{len(rows)} cases ({results['timing']}): " + ", ".join(spans), details


def _span(values: list[float]) -> str:
    return f"{min(values):.2f} to {max(values):.2f}" if values else "none"


# ---------------------------------------------------------------- 4. the paper-scale steps


def paper_step(name: str) -> Callable[[Check], tuple[str, str, dict[str, Any]]]:
    """The step measuring one paper-scale config with `paper_measure`, in its own process."""

    def step(check: Check) -> tuple[str, str, dict[str, Any]]:
        from untrainable.bench.paper_measure import describe

        result_file = check.out / "paper" / f"{PAPER[name]}.json"
        result_file.unlink(missing_ok=True)
        command = _python("-m", "untrainable.bench.paper_measure", PAPER[name], "--device", check.device)
        command += ["--out", str(result_file), *_threads(check)] + (["--tiny"] if check.tiny else [])
        budget = check.budget(name)
        rc = run_one(name, command, check, budget)
        if rc != 0 or not result_file.exists():
            return "failed", _ended(rc, budget, check.relative(check.log(name))), {}
        result = json.loads(result_file.read_text())
        return "ok", describe(result), result

    return step


# ---------------------------------------------------------------- 5. the rescue


def rescue_commands(check: Check) -> dict[str, list[str]]:
    """`untrainable train` of the rescue's two arms: 48 x 256 alone and guided by the untrained ResNet-18."""
    config = resources.files("untrainable") / "configs" / "rescue_deep_fcn.toml"
    sets = {"model.args.width": RESCUE_WIDTH, "data.args.train_size": None, "train.epochs": RESCUE_EPOCHS}
    sets |= {"train.device": check.device} | (TINY_RESCUE if check.tiny else {})
    arms = {"rescue-alone": {"guide": None}, "rescue-guided": {}}
    commands = {}
    for name, more in arms.items():
        folder = check.out / "rescue" / name.removeprefix("rescue-")
        if folder.exists():
            shutil.rmtree(folder)  # this check's own run of an earlier try: `train` refuses a folder with a run
        command = _python("-m", "untrainable", "train", "--config", str(config), "--out", str(folder))
        for key, value in {**sets, **more}.items():
            command += ["--set", f"{key}={json.dumps(value)}"]
        commands[name] = command
    return commands


def rescue(check: Check) -> list[StepResult]:
    """Both arms at once on the device; one result each: test accuracy, wall time, training time."""
    budget = check.budget("rescue")
    commands = rescue_commands(check)
    ended = run_processes(commands, check, budget)
    results = []
    for name in commands:  # in step order, whichever arm ended first
        rc, seconds = ended[name]
        folder = check.out / "rescue" / name.removeprefix("rescue-")
        log = check.relative(check.log(name))
        details = {"folder": check.relative(folder), "wall_s": seconds, "exit_code": rc, **_rescue_setup(check)}
        history = folder / "history.json"
        details["epochs_done"] = len(json.loads(history.read_text())) if history.exists() else 0
        if rc != 0 or not (folder / "result.json").exists():
            status, summary = "failed", f"{_ended(rc, budget, log)}; {details['epochs_done']} epochs done"
        else:
            final = json.loads((folder / "result.json").read_text())
            details.update(test_accuracy=final["test"]["accuracy"], train_s=final["seconds"], steps=final["steps"])
            status = "ok"
            summary = (
                f"test accuracy {final['test']['accuracy']:.3f}, {details['epochs_done']} of {details['epochs']} epochs "
                f"({final['steps']} steps), wall {seconds:.0f} s (training {final['seconds']:.0f} s)"
            )
        if check.tiny:  # a dry run checks that the arms train; its weights (over 100 MB) are of no use
            details["weights_removed"] = drop_weights(folder)
        results.append(StepResult("5" + "ab"[len(results)], name, status, seconds, budget, summary, details, [log]))
    return results


def drop_weights(folder: Path) -> int:
    """Delete a run folder's checkpoints and final weights (its logs and results stay); returns the bytes freed."""
    paths = [p for p in (folder / "checkpoints").glob("*") if p.is_file()]
    paths += [p for pattern in ("model*.pt", "model*.safetensors") for p in folder.glob(pattern)]
    freed = 0
    for path in paths:
        freed += path.stat().st_size
        path.unlink()
    return freed


def _rescue_setup(check: Check) -> dict[str, Any]:
    """The arms' data and length, as the step's details say them."""
    from untrainable.config import shipped_config

    args = shipped_config("rescue_deep_fcn").data.args
    val = TINY_RESCUE["data.args.val_size"] if check.tiny else args["val_size"]
    train = TINY_RESCUE["data.args.train_size"] if check.tiny else FASHION_MNIST_TRAIN - val
    epochs = TINY_RESCUE["train.epochs"] if check.tiny else RESCUE_EPOCHS
    return {"train_images": train, "val_images": val, "epochs": epochs, "width": RESCUE_WIDTH, "concurrent": True}


# ---------------------------------------------------------------- the check


def timed(number: str, name: str, step: Callable[[Check], tuple[str, str, dict[str, Any]]], check: Check) -> StepResult:
    """Run one step, catching what it raises (a step's failure, never the check's), with its seconds."""
    started = time.monotonic()
    try:
        status, summary, details = step(check)
    except Exception as err:  # noqa: BLE001 (a step's error is its failure, reported; the next step runs)
        status, summary, details = "failed", f"{type(err).__name__}: {err}", {}
    logs = [check.relative(check.log(name))] if check.log(name).exists() else []
    return StepResult(number, name, status, time.monotonic() - started, check.budget(name), summary, details, logs)


def not_run(number: str, name: str, check: Check, why: str) -> StepResult:
    """A step not started because an earlier one showed it cannot work; its log says why."""
    log = check.log(name)
    log.write_text(why + "\n")
    budget = check.budget(name.split("-")[0] if name.startswith("rescue-") else name)
    return StepResult(number, name, "failed", 0.0, budget, why, {}, [check.relative(log)])


def run_check(check: Check, show: Callable[[str], None] = print) -> list[StepResult]:
    """Every step in order, each line shown as it ends; the summary written last."""
    started = time.monotonic()
    plan: list[tuple[str, str, Callable[[Check], tuple[str, str, dict[str, Any]]]]] = [
        ("1", "environment", environment),
        ("2", "gpu-tests", gpu_tests),
        ("3", "bench", bench),
        *((f"4{'abc'[i]}", name, paper_step(name)) for i, name in enumerate(PAPER)),
    ]
    results: list[StepResult] = []
    missing = None  # CUDA wanted and not there: every later step would fail on it, minutes of a lent GPU apiece
    for number, name, step in plan:
        results.append(not_run(number, name, check, missing) if missing else timed(number, name, step, check))
        show(results[-1].line())
        if name == "environment" and results[-1].status == "failed" and check.device.startswith("cuda"):
            missing = f"not run: step 1 (environment) failed: {results[-1].summary}"
    try:
        arms = (
            [not_run(f"5{x}", f"rescue-{arm}", check, missing) for x, arm in (("a", "alone"), ("b", "guided"))]
            if missing
            else rescue(check)
        )
    except Exception as err:  # noqa: BLE001 (as in `timed`)
        arms = [StepResult("5", "rescue", "failed", 0.0, check.budget("rescue"), f"{type(err).__name__}: {err}")]
    for arm in arms:
        results.append(arm)
        show(arm.line())
    written = StepResult("6", "summary", "ok", 0.0, 0, f"{check.out / 'summary.md'} and summary.json")
    write_summary(check, [*results, written], time.monotonic() - started)
    show(written.line())
    return [*results, written]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for every step's files and summary.md/summary.json")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default: cuda)")
    parser.add_argument("--tiny", action="store_true", help="every step at toy sizes: a dry run of the script")
    parser.add_argument("--threads", type=int, help="torch threads per process (default: 1 on a CPU, torch's on a GPU)")
    default_tests = Path(__file__).resolve().parents[3] / "tests"
    parser.add_argument("--tests", type=Path, default=default_tests, help=f"the test folder (default: {default_tests})")
    args = parser.parse_args(argv)
    command = shlex.join(["python", "-m", "untrainable.bench.gpu_check", *(sys.argv[1:] if argv is None else argv)])
    if not (args.device == "cpu" or re.fullmatch(r"cuda(:\d+)?", args.device)):
        parser.error(f"--device {args.device}: expected cuda, cuda:N or cpu")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads {args.threads}: expected 1 or more")
    threads = args.threads if args.threads is not None else (1 if args.device == "cpu" else None)
    env = dict(os.environ)
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # a dry run on the CPU, even on a machine with GPUs
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before this process first asks CUDA (the environment step)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    check = Check(out, args.device, args.tiny, threads, args.tests.resolve() if args.tests else None, env, command)
    results = run_check(check)
    return 1 if any(result.status == "failed" for result in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
