"""A Markdown table of the finished runs (those with a result.json) under a study folder, one row per run.

    python scripts/finished_runs.py runs/rescue-distances

For a study stopped before an experiment finished, when no table.md was written:
each run's validation accuracy at its best epoch (the selection criterion), its
test accuracy there and at the last epoch, and its training seconds.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def rows(root: Path) -> list[str]:
    lines = [
        "| experiment | arm | seed | steps | val acc (best epoch) | test acc (best val epoch) | test acc (last epoch) "
        "| best epoch | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for result in sorted(root.rglob("result.json")):
        run = json.loads(result.read_text())
        seed_dir = result.parent
        best = run.get("best", {})
        lines.append(
            f"| {seed_dir.parent.parent.name} | {seed_dir.parent.name} | {seed_dir.name.removeprefix('seed')} "
            f"| {run['steps']} | {best.get('val', {}).get('accuracy', float('nan')):.3f} "
            f"| {best.get('test', {}).get('accuracy', float('nan')):.4f} | {run['test']['accuracy']:.4f} "
            f"| {best.get('epoch', '')} | {run['seconds']:.0f} |"
        )
    return lines


if __name__ == "__main__":
    print("\n".join(rows(Path(sys.argv[1]))))
