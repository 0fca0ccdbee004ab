"""How the guided step's cost grows with the batch and the number of pairs, and where CKA's two spaces cross over.

    python -m untrainable.bench.cost_scaling --threads 1 --out results/bench

writes `scaling.md`, `scaling.json` and `scaling.png`. Three measurements, on
the bench's first pair (the 24 x 256 Deep FCN guided by ResNet-18 at width
16 on 28x28 inputs); the steps of all the points of a sweep take turns in
one round-robin, 5 rounds, medians:

- batch 64 to 1024 with the 20 default pairs: (a), (b), (c) and the floor;
- 1 to 40 pairs at batch 256 (a 48-block target, its linear layers spread
  over the guide's 20 convolutions, several target layers per guide layer
  beyond 20 pairs);
- the CKA kernel alone (forward + backward) forced into sample space and into
  feature space as the batch grows, beside the batch at which
  `similarity.sample_space_is_cheaper` switches.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable

import torch

from untrainable.bench.cases import Case, build_case
from untrainable.bench.measure import machine, time_variants
from untrainable.bench.variants import PRODUCTS, case_steps
from untrainable.capture import default_layers
from untrainable.similarity import linear_cka, sample_space_is_cheaper

BATCHES = (64, 128, 256, 512, 1024)
PAIR_COUNTS = (1, 2, 5, 10, 20, 30, 40)
KERNEL_WIDTHS = ((256, 2048), (1024, 1024))  # (d target, d guide)
KERNEL_BATCHES = (64, 128, 256, 512, 1024, 1536, 2048, 3072, 4096)
STEPS = ("target", "+guide", "guided", PRODUCTS)


def _case(batch: int, depth: int = 24) -> Case:
    mnist = (1, 28, 28)
    target_args = {"input_shape": mnist, "depth": depth}
    guide_args = {"input_shape": mnist, "width": 16}
    return Case(f"b{batch}", "deep_fcn", target_args, "resnet18", guide_args, batch, mnist)


def _spread_pairs(case: Case, count: int) -> list[tuple[str, str]]:
    """`count` pairs: target linear layers spread over the whole depth, each with the guide conv at its relative depth."""
    target, guide, _, _ = build_case(case, torch.device("cpu"))
    targets = [f"layers.{i}.linear" for i in range(case.target_args["depth"])]
    guides = default_layers(guide)
    if count == 1:
        return [(targets[-1], guides[-1])]
    return [
        (targets[round(i * (len(targets) - 1) / (count - 1))], guides[round(i * (len(guides) - 1) / (count - 1))])
        for i in range(count)
    ]


def sweep(
    points: list[tuple[Case, list[tuple[str, str]] | None]], device: torch.device, repeats: int
) -> list[dict[str, Any]]:
    """One row per (case, pairs): (a), (b), (c) and the floor, every point's steps taking turns in one rotation.

    One rotation for the whole sweep, so that load from other processes
    falls on every point alike.
    """
    steps, infos = {}, []
    for i, (case, pairs) in enumerate(points):
        point_steps, info = case_steps(case, device, pairs)
        steps.update({(i, name): point_steps[name] for name in STEPS})
        infos.append(info)
    timing = time_variants(steps, repeats, device)
    rows = []
    for i, (case, _) in enumerate(points):
        ms = {name: timing[(i, name)] * 1e3 for name in STEPS}
        floor = ms["+guide"] + ms[PRODUCTS]
        rows.append(
            {
                "batch": case.batch,
                "pairs": infos[i]["pairs"],
                "target_ms": ms["target"],
                "guide_ms": ms["+guide"],
                "guided_ms": ms["guided"],
                "floor_ms": floor,
                "c/b": ms["guided"] / ms["+guide"],
                "c/floor": ms["guided"] / floor,
                "feature_pairs": infos[i]["products"]["feature_pairs"],
            }
        )
    return rows


def kernel_crossover(
    d1: int, d2: int, device: torch.device, repeats: int = 3, batches: tuple[int, ...] = KERNEL_BATCHES
) -> list[dict[str, Any]]:
    """CKA forward + backward in each space, as n grows, for a (n, d1) target against a (n, d2) guide."""
    rows = []
    for n in batches:
        torch.manual_seed(0)
        x = torch.randn(n, d1, device=device, requires_grad=True)
        y = torch.randn(n, d2, device=device)

        def run(space: str) -> Callable[[], None]:
            return lambda: linear_cka(x, y, space=space).backward()

        timing = time_variants({"sample": run("sample"), "feature": run("feature")}, repeats, device)
        rows.append(
            {
                "n": n,
                "d_target": d1,
                "d_guide": d2,
                "sample_ms": timing["sample"] * 1e3,
                "feature_ms": timing["feature"] * 1e3,
                "model_picks": "sample" if sample_space_is_cheaper(n, d1, d2) else "feature",
            }
        )
    return rows


def crossover(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """The batch where feature space becomes faster (measured, linear between points) and where the model switches."""
    measured = None
    for before, after in zip(rows, rows[1:]):
        gap0, gap1 = before["sample_ms"] - before["feature_ms"], after["sample_ms"] - after["feature_ms"]
        if gap0 < 0 <= gap1:
            measured = before["n"] + (after["n"] - before["n"]) * (-gap0) / (gap1 - gap0)
            break
    d1, d2 = rows[0]["d_target"], rows[0]["d_guide"]
    model = next((n for n in range(2, 1 << 16) if not sample_space_is_cheaper(n, d1, d2)), None)
    return {"d_target": d1, "d_guide": d2, "measured_n": measured, "model_n": model}


def run_scaling(device: str = "cpu", log: Callable[[str], None] = print, quick: bool = False) -> dict[str, Any]:
    """All three measurements as one dict (`quick`: two points each, tiny repeats, for tests)."""
    dev = torch.device(device)
    batches, counts = (BATCHES[:2], PAIR_COUNTS[:2]) if quick else (BATCHES, PAIR_COUNTS)
    repeats = 1 if quick else 5
    by_batch = sweep([(_case(batch), None) for batch in batches], dev, repeats)
    log(f"by batch: {by_batch}")
    pair_case = _case(64 if quick else 256, depth=48)
    by_pairs = sweep([(pair_case, _spread_pairs(pair_case, count)) for count in counts], dev, repeats)
    log(f"by pairs: {by_pairs}")
    kernels, crossovers = [], []
    for d1, d2 in KERNEL_WIDTHS[:1] if quick else KERNEL_WIDTHS:
        rows = kernel_crossover(d1, d2, dev, 1 if quick else 3, KERNEL_BATCHES[:3] if quick else KERNEL_BATCHES)
        kernels.extend(rows)
        crossovers.append(crossover(rows))
        log(f"crossover {crossovers[-1]}")
    return {
        "machine": machine(),
        "by_batch": by_batch,
        "by_pairs": by_pairs,
        "kernels": kernels,
        "crossovers": crossovers,
    }


def format_scaling(results: dict[str, Any]) -> str:
    """The three tables in Markdown."""
    head = "| batch | pairs | (a) target ms | (b) +guide ms | (c) guided ms | floor ms | c/b | c/floor | pairs in feature space |"
    lines = ["Guided step against batch size (20 pairs):", "", head, "|" + "---|" * 9]
    for r in results["by_batch"]:
        lines.append(
            f"| {r['batch']} | {r['pairs']} | {r['target_ms']:.1f} | {r['guide_ms']:.1f} | {r['guided_ms']:.1f} "
            f"| {r['floor_ms']:.1f} | {r['c/b']:.2f} | {r['c/floor']:.2f} | {r['feature_pairs']} |"
        )
    lines += ["", "Guided step against the number of pairs (batch 256, 48-block target):", "", head, "|" + "---|" * 9]
    for r in results["by_pairs"]:
        lines.append(
            f"| {r['batch']} | {r['pairs']} | {r['target_ms']:.1f} | {r['guide_ms']:.1f} | {r['guided_ms']:.1f} "
            f"| {r['floor_ms']:.1f} | {r['c/b']:.2f} | {r['c/floor']:.2f} | {r['feature_pairs']} |"
        )
    lines += ["", "CKA forward + backward in each space:", ""]
    lines += ["| n | d target | d guide | sample ms | feature ms | cost model picks |", "|---|---|---|---|---|---|"]
    for k in results["kernels"]:
        lines.append(
            f"| {k['n']} | {k['d_target']} | {k['d_guide']} | {k['sample_ms']:.2f} | {k['feature_ms']:.2f} "
            f"| {k['model_picks']} |"
        )
    lines += ["", "| d target | d guide | feature space faster from n = (measured) | cost model switches at n = |"]
    lines += ["|---|---|---|---|"]
    for c in results["crossovers"]:
        measured = "not within the range" if c["measured_n"] is None else f"{c['measured_n']:.0f}"
        lines.append(f"| {c['d_target']} | {c['d_guide']} | {measured} | {c['model_n']} |")
    return "\n".join(lines)


def plot_scaling(results: dict[str, Any], path: str | Path) -> Path:
    """Three panels: step time against batch, against pairs, and the kernel in each space against n."""
    import matplotlib

    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for ax, rows, key, label in (
        (axes[0], results["by_batch"], "batch", "batch size (20 pairs)"),
        (axes[1], results["by_pairs"], "pairs", "pairs (batch 256)"),
    ):
        xs = [r[key] for r in rows]
        for column, name, style in (
            ("target_ms", "(a) target", ":"),
            ("guide_ms", "(b) + guide forward", "--"),
            ("floor_ms", "floor: (b) + unavoidable products", "-."),
            ("guided_ms", "(c) guided", "-"),
        ):
            ax.plot(xs, [r[column] for r in rows], style, marker="o", label=name)
        ax.set_xlabel(label)
        ax.set_ylabel("ms per step")
        ax.grid(alpha=0.3)
    axes[0].set_xscale("log", base=2)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    ax = axes[2]
    for c in results["crossovers"]:
        rows = [k for k in results["kernels"] if (k["d_target"], k["d_guide"]) == (c["d_target"], c["d_guide"])]
        ns = [k["n"] for k in rows]
        shape = f"d {c['d_target']} vs {c['d_guide']}"
        line = ax.plot(ns, [k["sample_ms"] for k in rows], "-", marker="o", label=f"sample space, {shape}")[0]
        ax.plot(
            ns,
            [k["feature_ms"] for k in rows],
            "--",
            marker="s",
            color=line.get_color(),
            label=f"feature space, {shape}",
        )
        if c["model_n"] is not None:
            ax.axvline(c["model_n"], color=line.get_color(), alpha=0.4, lw=1)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("n (vertical lines: where the cost model switches)")
    ax.set_ylabel("CKA forward + backward, ms")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.suptitle(results["machine"], fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_scaling(results: dict[str, Any], out: str | Path) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "scaling.md").write_text(f"Machine: {results['machine']}\n\n{format_scaling(results)}\n")
    plot_scaling(results, out / "scaling.png")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m untrainable.bench.cost_scaling", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--out", default="results/bench", help="folder for scaling.md, scaling.json, scaling.png")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    results = run_scaling(args.device)
    print(f"\n{format_scaling(results)}\n\nWritten to {write_scaling(results, args.out)}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
