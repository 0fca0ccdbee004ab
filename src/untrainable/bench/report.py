"""The bench's report: the step and kernel tables in Markdown, written with the raw results as table.md and bench.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def format_mib(value: float | None) -> str:
    """A peak in MiB, rounded, or "n/a" where it could not be measured."""
    return "n/a" if value is None else f"{value:.0f}"


def format_number(value: float | None, digits: int = 1) -> str:
    """A number for a table: `digits` decimals from 1 up, three significant figures below (toy sizes), n/a for None."""
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}" if abs(value) >= 1 or value == 0 else f"{value:.3g}"


def format_results(results: dict[str, Any]) -> str:
    """The step table and the kernel table in Markdown."""
    head = (
        "| case | pairs | (a) target ms | (b) +guide ms | (c) guided ms | floor ms | (e) cached ms | (d) authors ms "
        "| c/b | c/floor | d/c | e/c | peak MiB a / b / c / e / d |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in results["rows"]:
        ms = [f"{row[v]['ms']:.1f}" for v in ("target", "+guide", "guided")] + [f"{row['floor_ms']:.1f}"]
        ms += [f"{row[v]['ms']:.1f}" for v in ("cached", "authors")]
        ratios = [f"{row[r]:.2f}" for r in ("c/b", "c/floor", "d/c", "e/c")]
        mem = " / ".join(format_mib(row[v]["peak_mib"]) for v in ("target", "+guide", "guided", "cached", "authors"))
        name = row["case"] + (f" ({row['note']})" if row["note"] else "")
        lines.append(f"| {name} | {row['pairs']} | " + " | ".join(ms + ratios) + f" | {mem} |")
    lines += [
        "",
        "| n | d target | d guide | CKA fwd+bwd ms | unavoidable products ms | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for k in results["kernels"]:
        lines.append(
            f"| {k['n']} | {k['d_target']} | {k['d_guide']} | {k['kernel_ms']:.2f} | {k['products_ms']:.2f} | {k['ratio']:.2f} |"
        )
    return "\n".join(lines)


def write_results(results: dict[str, Any], out: str | Path) -> Path:
    """Write `out`/bench.json (the results) and `out`/table.md (the machine and the tables); returns `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "table.md").write_text(f"Machine: {results['machine']} ({results['timing']})\n\n{format_results(results)}\n")
    return out
