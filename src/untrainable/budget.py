"""How a comparison's verdict depends on its budget, its seeds and its compute.

Budget curves (Dodge et al. 2019, "Show Your Work"): the expected best
validation value after n trials, n = 1..N. From N independent draws (the
random or quasi-random sampler) it is Tang et al.'s (2020) estimator, the
expected maximum of n values drawn without replacement from the N observed,

    E[max of n] = sum_i v_(i) * C(i - 1, n - 1) / C(N, n)    (v_(1) <= ... <= v_(N)),

with a bootstrap band (the N values resampled with replacement). TPE's and
GP's trials are not independent draws: their curve is each repeat's best so
far, the band the spread over repeats. Paired seeds: both arms' best configs
train on the same seeds; the differences get a bootstrap 95% interval and a
count of wins.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import numpy as np

INDEPENDENT = ("random", "qmc")  # samplers whose trials are independent draws
BOOTSTRAP = 2000


def expected_best(values: list[float], maximize: bool = True) -> list[float]:
    """E[best of n draws without replacement from `values`], n = 1..N (Tang et al. 2020), in O(N^2) exact arithmetic."""
    v = sorted(values) if maximize else sorted(values, reverse=True)  # v[i-1] is v_(i): the best n lie at the end
    big_n = len(v)
    out = []
    for n in range(1, big_n + 1):
        total = math.comb(big_n, n)
        out.append(sum(v[i - 1] * math.comb(i - 1, n - 1) for i in range(n, big_n + 1)) / total)
    return out


def bootstrap_band(
    values: list[float], maximize: bool = True, reps: int = BOOTSTRAP, seed: int = 0
) -> tuple[list[float], list[float]]:
    """The 2.5% and 97.5% quantiles, at each n, of the curve over `values` resampled with replacement."""
    rng = np.random.default_rng(seed)
    curves = np.array([expected_best(list(rng.choice(values, len(values))), maximize) for _ in range(reps)])
    return list(np.quantile(curves, 0.025, axis=0)), list(np.quantile(curves, 0.975, axis=0))


def best_so_far(values: list[float], maximize: bool = True) -> list[float]:
    """The best of the first n values, n = 1..N (a sequential search's curve)."""
    best = math.inf * (-1 if maximize else 1)
    out = []
    for value in values:
        best = max(best, value) if maximize else min(best, value)
        out.append(best)
    return out


def paired(a: list[float], b: list[float], reps: int = BOOTSTRAP * 5, seed: int = 0) -> dict[str, Any]:
    """b − a seed by seed: the mean difference, its bootstrap 95% interval (seeds resampled), and b's wins k/n."""
    d = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    rng = np.random.default_rng(seed)
    means = rng.choice(d, (reps, len(d))).mean(axis=1)
    return {
        "differences": d.tolist(),
        "mean": float(d.mean()),
        "ci95": [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))],
        "wins": int((d > 0).sum()),
        "n": len(d),
    }


# ---------------------------------------------------------------- a comparison's folder


def trial_records(study_dir: Path) -> list[dict[str, Any]]:
    """The finished trials of a study folder in order: number, value (a pruned trial's at the epochs it trained),
    enqueued source, seconds, epochs (from trials.json and each trial.json)."""
    out = []
    for row in json.loads((study_dir / "trials.json").read_text()):
        if row["state"] not in ("complete", "pruned"):
            continue
        path = study_dir / "trials" / str(row["folder"]) / "trial.json"
        note = json.loads(path.read_text()) if path.exists() else {}
        value = row["value"] if row["value"] is not None else note.get("value_at_prune")
        out.append(
            {
                "number": row["number"],
                "state": row["state"],
                "value": value,
                "enqueued": row.get("enqueued"),
                "seconds": note.get("seconds"),
                "epochs": note.get("epochs"),
            }
        )
    return out


def arm_curve(records: list[list[dict[str, Any]]], sampler: str, maximize: bool) -> dict[str, Any]:
    """One arm's budget curve from its repeats' trial records."""
    if sampler in INDEPENDENT:
        values = [r["value"] for rep in records for r in rep if not r["enqueued"] and r["value"] is not None]
        low, high = bootstrap_band(values, maximize) if len(values) > 1 else (values, values)
        return {
            "kind": "expected best of n independent draws, without replacement (Tang et al. 2020); "
            "band: 95% bootstrap",
            "values": values,
            "enqueued": [r["value"] for rep in records for r in rep if r["enqueued"]],
            "expected_best": expected_best(values, maximize),
            "band": [low, high],
        }
    worst = -math.inf if maximize else math.inf
    curves = [best_so_far([worst if r["value"] is None else r["value"] for r in rep], maximize) for rep in records]
    n = min(map(len, curves))
    curves = [c[:n] for c in curves]
    mean = [statistics.fmean(c[i] for c in curves) for i in range(n)]
    band: list[list[float]] | None = [
        [min(c[i] for c in curves) for i in range(n)],
        [max(c[i] for c in curves) for i in range(n)],
    ]
    if len(curves) < 2:
        band = None  # one sequential search: no spread to read a lead against
    return {
        "kind": f"best so far of each repeat's sequential {sampler} search (not independent draws); "
        f"curve: mean over {len(curves)} repeat(s), band: their range",
        "values": [[r["value"] for r in rep] for rep in records],
        "enqueued_trials": [[r["number"] for r in rep if r["enqueued"]] for rep in records],
        "repeats": curves,
        "expected_best": mean,
        "band": band,
    }


def leads(curves: dict[str, dict[str, Any]], maximize: bool) -> dict[str, list[int]]:
    """The budgets n at which one arm's band lies wholly above (below, for a loss) the other's."""
    alone, guided = curves["alone"]["band"], curves["guided"]["band"]
    n = min(len(curves["alone"]["expected_best"]), len(curves["guided"]["expected_best"]))
    if alone is None or guided is None:
        return {"guided": [], "alone": [], "budgets": [n], "no_band": [1]}
    sign = 1 if maximize else -1
    guided_leads = [k + 1 for k in range(n) if sign * guided[0 if maximize else 1][k] > sign * alone[1 if maximize else 0][k]]
    alone_leads = [k + 1 for k in range(n) if sign * alone[0 if maximize else 1][k] > sign * guided[1 if maximize else 0][k]]
    return {"guided": guided_leads, "alone": alone_leads, "budgets": [n]}


def spans(ns: list[int]) -> str:
    """[1, 2, 3, 7] -> "1-3, 7"."""
    parts: list[str] = []
    for n in ns:
        if parts and int(parts[-1].split("-")[-1]) == n - 1:
            parts[-1] = f"{parts[-1].split('-')[0]}-{n}"
        else:
            parts.append(str(n))
    return ", ".join(parts)


def budget_sentence(lead: dict[str, list[int]]) -> str:
    n = lead["budgets"][0]
    if lead.get("no_band"):
        return (
            f"Budget curves (1 to {n} trials): one repeat of a sequential search has no band, so no lead is read "
            "from them (use --repeats, or --sampler random for independent draws)."
        )
    if not lead["guided"] and not lead["alone"]:
        return f"Budget curves: at no budget from 1 to {n} trials does one arm lead by more than the band."
    said = [f"the {arm} arm leads by more than the band at {spans(lead[arm])} trial(s)" for arm in ("guided", "alone")
            if lead[arm]]  # fmt: skip
    return f"Budget curves (1 to {n} trials): " + "; ".join(said) + "; elsewhere the bands overlap."


def add_analysis(table: dict[str, Any], out: Path, repeat_dirs: list[Path]) -> None:
    """Add to a comparison's table: paired seeds, costs, budget curves (writing budget.json and budget.png)."""
    maximize = bool(table.get("higher_is_better", table["metric"] == "accuracy"))
    rows = {row["arm"]: row for row in table["rows"]}
    table["paired"] = {
        label: paired(rows["alone"][key], rows["guided"][key])
        for label, key in (("last", "per_seed_test"), ("best", "per_seed_best"))
        if rows["alone"].get(key) and rows["guided"].get(key)
    }
    for label, p in table["paired"].items():
        sign = 1 if maximize else -1
        wins = sum(1 for d in p["differences"] if sign * d > 0)
        table["notes"].append(
            f"Paired seeds, guided − alone at the {'last' if label == 'last' else 'best validation'} epoch: "
            f"{p['mean']:+.3f} (95% bootstrap interval {p['ci95'][0]:+.3f} to {p['ci95'][1]:+.3f}); guided better "
            f"on {wins}/{p['n']} seeds."
        )
    sampler = json.loads((repeat_dirs[0] / "alone" / "study.json").read_text())["settings"].get("sampler", "tpe")
    records = {arm: [trial_records(d / arm) for d in repeat_dirs] for arm in ("alone", "guided")}
    cost: dict[str, Any] = {}
    for arm, reps in records.items():
        seconds = sum(r["seconds"] or 0.0 for rep in reps for r in rep)
        epochs = sum(r["epochs"] or 0 for rep in reps for r in rep)
        cost[arm] = {"trial_seconds": seconds, "epochs": epochs, "seconds_per_epoch": seconds / epochs if epochs else None}
    a, g = cost["alone"]["seconds_per_epoch"], cost["guided"]["seconds_per_epoch"]
    cost["guided_overhead"] = g / a - 1 if a and g else None
    table["cost"] = cost
    table["notes"].append(
        f"Cost: trial seconds alone {cost['alone']['trial_seconds']:.0f} s ({cost['alone']['epochs']} epochs), "
        f"guided {cost['guided']['trial_seconds']:.0f} s ({cost['guided']['epochs']} epochs); the guided step costs "
        + ("—" if cost["guided_overhead"] is None else f"{100 * cost['guided_overhead']:+.0f}%")
        + " per epoch against the step alone (wall time, shared cores)."
    )
    table["budget_verdict"] = write_curves(out, records, sampler, table["metric"], maximize)


def write_curves(
    out: Path, records: dict[str, list[list[dict[str, Any]]]], sampler: str, metric: str, maximize: bool
) -> str:
    """Write budget.json and budget.png for both arms' trial records (per repeat); return the budget sentence."""
    curves = {arm: arm_curve(reps, sampler, maximize) for arm, reps in records.items()}
    lead = leads(curves, maximize)
    data = {"metric": f"validation {metric}", "maximize": maximize, "sampler": sampler, "arms": curves, "leads": lead}
    from untrainable.checkpoint import write_atomic

    write_atomic(out / "budget.json", json.dumps(data, indent=2) + "\n")
    plot_budget(data, out / "budget.png")
    return budget_sentence(lead)


def plot_budget(data: dict[str, Any], path: Path) -> Path:
    """Both arms' budget curves with their bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, curve in data["arms"].items():
        n = np.arange(1, len(curve["expected_best"]) + 1)
        (line,) = ax.plot(n, curve["expected_best"], label=arm)
        if curve["band"] is not None:
            ax.fill_between(n, curve["band"][0], curve["band"][1], color=line.get_color(), alpha=0.2)
    kind = data["arms"]["alone"]["kind"].split(";")[0]
    ax.set_xlabel("trials (n)")
    ax.set_ylabel(f"best {data['metric']}")
    ax.set_title(f"{data['sampler']} sampler: {kind}", fontsize=8)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
