"""The GPU check's summary: one table of every step, then each step's numbers, as summary.md and summary.json."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from untrainable.bench.gpu_steps import Check, StepResult
from untrainable.bench.report import format_number as _number


def _by_name(results: list[StepResult]) -> dict[str, StepResult]:
    return {result.name: result for result in results}


def _title(check: Check, results: list[StepResult]) -> str:
    env = _by_name(results).get("environment")
    info = env.details if env is not None else {}
    gpus = ", ".join(sorted({g["name"] for g in info.get("gpus", [])})) or "no GPU"
    kind = "dry run at toy sizes" if check.tiny else "measured"
    return f"# GPU check: {info.get('host', 'unknown host')}, {gpus} ({check.device}, {kind})"


def _steps_table(results: list[StepResult]) -> list[str]:
    lines = ["| step | result | seconds | budget s | key numbers |", "|---|---|---|---|---|"]
    for r in results:
        summary = r.summary.replace("|", "/")
        lines.append(f"| {r.number} {r.name} | {r.status} | {r.seconds:.1f} | {r.budget_s:.0f} | {summary} |")
    return lines


def _environment(result: StepResult) -> list[str]:
    d = result.details
    if not d:
        return []
    lines = ["## 1. Environment", ""]
    for key in ("host", "python", "torch", "cuda_build", "cudnn", "driver", "nccl_available", "nccl", "bf16"):
        if key in d:
            lines.append(f"- {key}: {d[key]}")
    for i, gpu in enumerate(d.get("gpus", [])):
        lines.append(f"- GPU {i}: {gpu['name']}, {gpu['memory_gib']:.1f} GiB, compute capability {gpu['capability']}")
    return lines + [""]


def _gpu_tests(result: StepResult) -> list[str]:
    d = result.details
    if "passed" not in d:
        return []
    lines = ["## 2. GPU tests", "", f"`pytest -m gpu` on {', '.join(d['files'])}: {result.summary}.", ""]
    lines += [f"- failed: {name}" for name in d["failures"]]
    lines += [f"- skipped ({n}): {reason}" for reason, n in _counted(d["skip_reasons"])]
    return lines + [""]


def _counted(items: list[str]) -> list[tuple[str, int]]:
    counts: dict[str, int] = {}
    for item in items:
        counts[item] = counts.get(item, 0) + 1
    return sorted(counts.items())


def _bench(result: StepResult) -> list[str]:
    d = result.details
    if "rows" not in d:
        return []
    lines = ["## 3. Bench", "", f"{d['machine']} ({d['timing']}); every variant in `bench/table.md`.", ""]
    lines += ["| case | (c) guided ms | c/floor | d/c | e/c | peak MiB c vs d |", "|---|---|---|---|---|---|"]
    for row in d["rows"]:
        peaks = f"{_number(row['peak_mib_guided'], 0)} vs {_number(row['peak_mib_authors'], 0)}"
        lines.append(
            f"| {row['case']} | {_number(row['guided_ms'])} | {row['c/floor']:.2f} | {row['d/c']:.2f} "
            f"| {row['e/c']:.2f} | {peaks} |"
        )
    return lines + [""]


def _paper(results: list[StepResult]) -> list[str]:
    measured = [r for r in results if r.name.startswith("paper-") and "ms" in r.details]
    if not measured:
        return []
    gpus = list(measured[0].details["estimate"]["ms"])
    lines = [
        "## 4. Paper-scale steps, measured beside the estimates",
        "",
        "Synthetic inputs, untrained weights, the bench's (a) target and (c) guided steps "
        "(`step.train_step`, autocast), median of the timed steps. Step GiB: in use between steps "
        "less the bench's own buffers, plus the guided step's peak (GPU only); peak: above what is in use "
        "(on a CPU the resident set's growth); estimate: states + kept.",
        "",
        "| config | batch, precision, image | steps | ms/step (a) / (c) | peak MiB (a) / (c) | step GiB | "
        + " | ".join(f"estimated ms {gpu}" for gpu in gpus)
        + " | estimated GiB |",
        "|" + "---|" * (7 + len(gpus)),
    ]
    for r in measured:
        d = r.details
        est = d["estimate"]
        lines.append(
            f"| {d['config']} | {d['batch']}, {d['precision']}, {d['image_size']} | {d['steps']} "
            f"| {_number(d['ms']['target'])} / {_number(d['ms']['guided'])} "
            f"| {_number(d['peak_mib']['target'], 0)} / {_number(d['peak_mib']['guided'], 0)} "
            f"| {_number(d['gib']['step'])} | "
            + " | ".join(_number(est["ms"][gpu]) for gpu in gpus)
            + f" | {_number(est['gib']['states'] + est['gib']['kept'])} |"
        )
    return lines + [""]


def _rescue(results: list[StepResult]) -> list[str]:
    arms = [r for r in results if r.name.startswith("rescue")]
    if not arms:
        return []
    lines = [
        "## 5. The rescue on Fashion-MNIST",
        "",
        "48 x 256 Deep FCN, Adam 1e-3, seed 0, alone and guided by an untrained ResNet-18 (width 8); "
        "the two arms ran at the same time on the same device.",
        "",
        "| arm | result | train images | epochs done | test accuracy | wall s | training s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in arms:
        d = r.details
        accuracy = f"{d['test_accuracy']:.3f}" if "test_accuracy" in d else "n/a"
        lines.append(
            f"| {r.name} | {r.status} | {d.get('train_images', 'n/a')} | {d.get('epochs_done', 0)} of "
            f"{d.get('epochs', '?')} | {accuracy} | {r.seconds:.0f} | {_number(d.get('train_s'), 0)} |"
        )
    return lines + [""]


def format_summary(check: Check, results: list[StepResult], seconds: float) -> str:
    """summary.md: the title, the command, the table of steps, then each step's numbers."""
    failed = sum(r.status == "failed" for r in results)
    lines = [_title(check, results), "", f"`{check.command}`, {time.strftime('%Y-%m-%d %H:%M %Z')}, {seconds:.0f} s, "]
    lines[-1] += f"{failed} step(s) failed (exit code {1 if failed else 0})."
    if check.tiny:
        lines += ["", "Toy sizes: these numbers say that every step's code runs, nothing about speed or accuracy."]
    lines += ["", *_steps_table(results), ""]
    by_name = _by_name(results)
    for name, part in (("environment", _environment), ("gpu-tests", _gpu_tests), ("bench", _bench)):
        if name in by_name:
            lines += part(by_name[name])
    lines += _paper(results) + _rescue(results)
    lines.append("Logs of every step: `logs/`; raw numbers: `summary.json`.")
    return "\n".join(lines) + "\n"


def write_summary(check: Check, results: list[StepResult], seconds: float) -> tuple[Path, Path]:
    """Write summary.md and summary.json into the check's folder; returns their paths."""
    md, js = check.out / "summary.md", check.out / "summary.json"
    md.write_text(format_summary(check, results, seconds))
    record = {
        "command": check.command,
        "device": check.device,
        "tiny": check.tiny,
        "threads": check.threads,
        "seconds": seconds,
        "failed": [r.name for r in results if r.status == "failed"],
        "steps": [dataclasses.asdict(r) for r in results],
    }
    js.write_text(json.dumps(record, indent=1, default=str) + "\n")
    return md, js
