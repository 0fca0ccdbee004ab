"""The rescue at a long horizon: the 48-block Deep FCN alone and guided, both arms tuned over the horizon reported.

`untrainable run rescue` is a study of three experiments at width 256
(`rescue-tune`, `rescue-tune-first`, `rescue-long`) and `untrainable run
rescue-128` the same at width 128 (the main job's width); `rescue --quick`
(the main job) runs three arms of `rescue-128` with the choices that study
made. Every run trains LONG_EPOCHS epochs (1,240 steps on 2,000 images) and
keeps its best validation epoch (early stopping), so each table gives the
test accuracy at the last epoch and at the best validation epoch.

- `rescue-tune`: seeds TUNE_SEEDS, the FCN alone under every ALONE_GRID
  setting (Adam at three rates, constant or with cosine decay, warm-up and
  gradient clipping; SGD with momentum) and guided by an untrained ResNet-18
  under every GUIDED_GRID setting (Adam rate, alpha).
- `rescue-tune-first`: guidance for the first N steps only (FIRST_GRID), at
  the guided arm's chosen setting.
- `rescue-long`: 5 seeds, each arm at its choice (the best mean validation
  accuracy at the best epoch, early stopping's criterion; the FCN alone also
  at the best last-epoch validation choice when that differs), with the
  controls: a trained guide, the first 300 steps, the guide fed noise,
  distillation from the untrained and the trained guide, the guide alone.
  The tuning seeds' runs are reused (selection read validation only).

`rescue-1024`: the paper's width, the FCN alone at two rates (the better one
by validation is the baseline) and guided, 3 seeds, the same horizon.
`rescue-short` (recipes/rescue_short.py) keeps the earlier 15-epoch study.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from untrainable.config import RunConfig, shipped_config
from untrainable.experiment import Arm, Experiment, effect, register_experiment
from untrainable.trainer import RunResult

LONG_EPOCHS = 40
WIDTH = 256
QUICK_WIDTH = 128
SEEDS = (0, 1, 2, 3, 4)
TUNE_SEEDS = (0, 1)
WIDE_SEEDS = (0, 1, 2)
WARMUP_STEPS, GRAD_CLIP = 100, 1.0
# (optimiser, lr, stabilised): stabilised = cosine decay, WARMUP_STEPS of warm-up, gradient clipping at GRAD_CLIP.
ALONE_GRID = tuple(
    [("adam", lr, stable) for lr in (3e-4, 1e-3, 3e-3) for stable in (False, True)]
    + [("sgd", lr, True) for lr in (1e-2, 1e-1)]
)
GUIDED_GRID = tuple((lr, alpha) for lr in (1e-3, 3e-3) for alpha in (1.0, 3.0))  # Adam, constant rate
FIRST_GRID = (300, 600, 900)
CONTROL_FIRST = 300
GUIDED = "deep-fcn+untrained-resnet18"


def alone_name(optimiser: str, lr: float, stable: bool) -> str:
    return f"deep-fcn-{optimiser}-lr{lr:g}" + ("-cosine-warmup-clip" if stable else "")


def guided_name(lr: float, alpha: float) -> str:
    return f"{GUIDED}-lr{lr:g}-alpha{alpha:g}"


def _with_optimiser(config: RunConfig, optimiser: str, lr: float, stable: bool = False) -> RunConfig:
    config = config.with_section("optim", name=optimiser, lr=lr, fused=optimiser != "sgd")
    if stable:
        config = config.with_section("optim", lr_schedule="cosine", warmup_steps=WARMUP_STEPS, grad_clip=GRAD_CLIP)
    return config


def _first(config: RunConfig, steps: int) -> RunConfig:
    return config.with_section("guidance", schedule="first_steps", steps=steps)


def _resnet(guided: RunConfig) -> RunConfig:
    """The guide's architecture trained alone: the trained guide (Adam 1e-3, constant, the FCN's data and length)."""
    return guided.replace(model=guided.guide, guide=None).with_section(
        "optim", name="adam", lr=1e-3, fused=False, lr_schedule="constant", warmup_steps=0, grad_clip=None
    )


def _kd(guided: RunConfig) -> RunConfig:
    """Distillation from the guide's logits instead of guidance (alpha 0): the paper's contrast."""
    return guided.with_section("guidance", alpha=0.0).with_section("distill", weight=1.0, temperature=4.0)


def base_config(width: int) -> RunConfig:
    """48 x `width`, guided by an untrained ResNet-18, LONG_EPOCHS epochs, early stopping on."""
    return (
        shipped_config("rescue_deep_fcn")
        .with_args("model", width=width)
        .with_section("train", epochs=LONG_EPOCHS, early_stopping=True)
    )


def _guided(base: RunConfig, lr: float, alpha: float) -> RunConfig:
    return _with_optimiser(base, "adam", lr).with_section("guidance", alpha=alpha)


def _shape(config: RunConfig) -> str:
    a = config.model.args
    return f"{a['depth']} blocks x {a['width']}"


def _setup(config: RunConfig) -> str:
    return (
        f"Fashion-MNIST ({config.data.args['train_size']} training images, {config.data.args['val_size']} validation, "
        f"batch {config.data.batch_size}, {config.train.epochs} epochs), Deep FCN {_shape(config)} (BatchNorm, "
        f"dropout 0.1); guide ResNet-18 (width {config.guide.args['width']}, small stem), linear CKA between the FCN's "
        "linear outputs and the ResNet's block outputs, even spread. Test top-1 accuracy at the last epoch and at the "
        "best validation epoch (early stopping), mean ± std over seeds."
    )


def tune_experiment(width: int = WIDTH, seeds: tuple[int, ...] = TUNE_SEEDS) -> Experiment:
    """Every ALONE_GRID and GUIDED_GRID setting at `width`, over the full horizon, on the tuning seeds."""
    base = base_config(width)
    arms = [Arm(alone_name(*s), _with_optimiser(base.replace(guide=None), *s)) for s in ALONE_GRID]
    arms += [Arm(guided_name(lr, alpha), _guided(base, lr, alpha)) for lr, alpha in GUIDED_GRID]
    return Experiment(
        name=_name("rescue-tune", width),
        description=_setup(base)
        + f" Tuning on validation: the FCN alone under Adam and SGD (momentum 0.9), constant rate or cosine decay "
        f"with {WARMUP_STEPS} warm-up steps and gradient clipping at {GRAD_CLIP:g}; guided with Adam at two rates "
        "and two alphas.",
        arms=arms,
        seeds=seeds,
    )


def _name(name: str, width: int) -> str:
    return name if width == WIDTH else f"{name}-{width}"


def choose(table: dict[str, Any], arms: list[str], key: str = "best_val_accuracy") -> str:
    """The arm among `arms` with the highest mean `key` (first wins ties): how every setting is chosen."""
    rows = {row["arm"]: row for row in table["rows"]}
    return max(arms, key=lambda arm: rows[arm][key][0])


def guided_choice(tune: dict[str, Any]) -> tuple[float, float]:
    """(lr, alpha) of the guided setting with the best validation accuracy at its best epoch."""
    chosen = choose(tune, [guided_name(lr, alpha) for lr, alpha in GUIDED_GRID])
    return next((lr, alpha) for lr, alpha in GUIDED_GRID if guided_name(lr, alpha) == chosen)


def first_experiment(tune: dict[str, Any], width: int = WIDTH, seeds: tuple[int, ...] = TUNE_SEEDS) -> Experiment:
    """Guidance for the first N steps only (FIRST_GRID), at the guided arm's chosen setting, on the tuning seeds."""
    lr, alpha = guided_choice(tune)
    guided = _guided(base_config(width), lr, alpha)
    return Experiment(
        name=_name("rescue-tune-first", width),
        description=_setup(guided)
        + f" Guided (Adam lr {lr:g}, alpha {alpha:g}, the tuned setting) for the first N steps only, then alone.",
        arms=[Arm(f"{GUIDED}-first{n}", _first(guided, n)) for n in FIRST_GRID],
        seeds=seeds,
    )


def long_experiment(
    tune: dict[str, Any], first: dict[str, Any], width: int = WIDTH, seeds: tuple[int, ...] = SEEDS
) -> Experiment:
    """Every arm at its tuned setting, with the controls; the tuning runs are reused for their seeds."""
    base = base_config(width)
    tune_name, first_name = _name("rescue-tune", width), _name("rescue-tune-first", width)
    settings = {alone_name(*s): s for s in ALONE_GRID}
    alone = choose(tune, list(settings))
    alone_last = choose(tune, list(settings), key="val_accuracy")
    lr, alpha = guided_choice(tune)
    guided = _guided(base, lr, alpha)
    n = int(choose(first, [f"{GUIDED}-first{n}" for n in FIRST_GRID]).rsplit("first", 1)[1])
    arms = [
        Arm("deep-fcn", _with_optimiser(base.replace(guide=None), *settings[alone]), runs_in=f"{tune_name}/{alone}"),
    ]
    if alone_last != alone:
        arms.append(
            Arm(
                "deep-fcn-tuned-for-last-epoch",
                _with_optimiser(base.replace(guide=None), *settings[alone_last]),
                runs_in=f"{tune_name}/{alone_last}",
            )
        )
    arms += [
        Arm("resnet18", _resnet(guided)),
        Arm(GUIDED, guided, runs_in=f"{tune_name}/{guided_name(lr, alpha)}"),
        Arm("deep-fcn+trained-resnet18", guided, guide_from="resnet18"),
    ]
    arms += [
        Arm(f"{GUIDED}-first{k}", _first(guided, k), runs_in=f"{first_name}/{GUIDED}-first{k}")
        for k in sorted({n, CONTROL_FIRST})
    ]
    arms += [
        Arm("deep-fcn+noise-untrained-resnet18", guided.with_section("guidance", guide_input="noise", cache="none")),
        Arm("deep-fcn+kd-untrained-resnet18", _kd(guided)),
        Arm("deep-fcn+kd-trained-resnet18", _kd(guided), guide_from="resnet18"),
    ]
    experiment = Experiment(
        name=_name("rescue-long", width),
        description=_setup(base)
        + f" Each arm at its choice on validation (seeds {', '.join(map(str, TUNE_SEEDS))}, best validation accuracy "
        f"at the best epoch): `deep-fcn` alone, `{alone}`"
        + (
            f"; `deep-fcn-tuned-for-last-epoch`, the best at the last epoch, `{alone_last}`"
            if alone_last != alone
            else ""
        )
        + f"; guided arms Adam lr {lr:g}, alpha {alpha:g}; `firstN`: guided for the first N steps only, then alone "
        f"(N = {n} chosen from {', '.join(map(str, FIRST_GRID))}). `noise`: the guide sees Gaussian noise of the "
        "images' shape. `kd`: no guidance; distillation from the ResNet's logits (temperature 4, weight 1). "
        "`resnet18`: the guide trained alone (Adam 1e-3), the trained guide. Δ / std: difference to `deep-fcn` in "
        "pooled seed standard deviations (more than 2 counts as an effect). The tuning seeds' runs are reused.",
        arms=arms,
        seeds=seeds,
        baseline="deep-fcn",
    )
    experiment.after = curves_after(experiment.name, tuple(sorted({n, CONTROL_FIRST})))
    return experiment


def study(width: int = WIDTH) -> list[Any]:
    """The three steps at `width`: tune both arms, tune the first-N arm, then every arm over 5 seeds."""
    tune, first = _name("rescue-tune", width), _name("rescue-tune-first", width)
    return [
        tune_experiment(width),
        lambda tables: first_experiment(tables[tune], width),
        lambda tables: long_experiment(tables[tune], tables[first], width),
    ]


# The main job's choices, from `untrainable run rescue-128` (results/rescue/rescue-tune-128/): the FCN
# alone and the guided arm at their best validation settings (best epoch); the first 600 steps (of 1,240).
QUICK_ALONE = ("adam", 1e-3, True)
QUICK_GUIDED = (3e-3, 3.0)
QUICK_FIRST = 600
QUICK_SEEDS = (0, 1)
# The rescue the main job looks for: a guided arm minus the FCN alone, test accuracy (at each epoch reported).
QUICK_MARGIN = 0.15


def quick_experiment() -> Experiment:
    """The main job: 48 x 128, LONG_EPOCHS epochs, 2 seeds: alone (tuned), guided, guided for the first 600 steps."""
    base = base_config(QUICK_WIDTH)
    guided = _guided(base, *QUICK_GUIDED)
    experiment = Experiment(
        name="rescue-quick",
        description=_setup(base)
        + f" Each arm at the choice of `rescue-128` on validation: `deep-fcn` alone `{alone_name(*QUICK_ALONE)}`; "
        f"guided Adam lr {QUICK_GUIDED[0]:g}, alpha {QUICK_GUIDED[1]:g}; `first{QUICK_FIRST}`: guided for the first "
        f"{QUICK_FIRST} steps only, then alone. Δ / std: difference to `deep-fcn` in pooled seed standard deviations.",
        arms=[
            Arm("deep-fcn", _with_optimiser(base.replace(guide=None), *QUICK_ALONE)),
            Arm(GUIDED, guided),
            Arm(f"{GUIDED}-first{QUICK_FIRST}", _first(guided, QUICK_FIRST)),
        ],
        seeds=QUICK_SEEDS,
        baseline="deep-fcn",
    )
    curves = curves_after(experiment.name, (QUICK_FIRST,))

    def after(out: Path, table: dict[str, Any], results: dict[str, list[RunResult]]) -> None:
        curves(out, table, results)
        table["notes"].extend(verdict(table))

    experiment.after = after
    return experiment


def verdict(table: dict[str, Any]) -> list[str]:
    """One line per guided arm: its gain over the FCN alone at the best validation epoch, then at the last epoch.

    The best validation epoch comes first: it is the standard protocol (both arms stop early on validation). A gain
    above QUICK_MARGIN counts as rescued; each gain is also given in pooled seed stds.
    """
    rows = {row["arm"]: row for row in table["rows"]}
    alone = rows["deep-fcn"]
    lines = []
    for arm, row in rows.items():
        if arm == "deep-fcn":
            continue
        parts = []
        for label, key in (("best validation epoch", "best_accuracy"), ("last epoch", "test_accuracy")):
            if key not in row or key not in alone:
                parts.append(f"at the {label}: not measured")
                continue
            gain, sds = effect(row[key], alone[key])
            spread = "" if sds is None else f" ({sds:+.1f} stds)"
            held = (
                f"rescued (more than +{QUICK_MARGIN:g})"
                if gain > QUICK_MARGIN
                else f"NOT rescued (less than +{QUICK_MARGIN:g})"
            )
            parts.append(f"at the {label} {gain:+.3f}{spread}, {held}")
        lines.append(f"Rescue by `{arm}`, test accuracy minus `deep-fcn` alone: " + "; ".join(parts) + ".")
    return lines


def curves_after(
    name: str, first: tuple[int, ...]
) -> Callable[[Path, dict[str, Any], dict[str, list[RunResult]]], None]:
    """rescue_curves.png (validation accuracy per step, disconnects marked) and first_loss.png (training loss)."""

    def after(out: Path, table: dict[str, Any], results: dict[str, list[RunResult]]) -> None:
        from untrainable.plots import plot_by_step, plot_per_step

        fcn_arms = {arm: [r.history for r in runs] for arm, runs in results.items() if arm.startswith("deep-fcn")}
        marks = {f"guide disconnected (first{n})": n for n in first}
        plot_by_step(
            fcn_arms,
            "val_accuracy",
            out / "rescue_curves.png",
            marks=marks,
            title=f"{name}: validation accuracy per epoch, mean ± std over seeds",
        )
        losses = {
            arm: [task_loss_by_step(r.folder) for r in runs]
            for arm, runs in results.items()
            if arm == "deep-fcn" or any(arm.endswith(f"-first{n}") for n in first)
        }
        plot_per_step(
            losses,
            out / "first_loss.png",
            "task loss (training batch)",
            title=f"{name}: training task loss per step, alone and after the guide is disconnected",
            marks=marks,
            log_y=True,
            smooth=25,
        )
        table["after_disconnect"] = after_disconnect(losses, first)
        table["notes"].append(
            "Validation curves with the step where each `firstN` guide is disconnected: rescue_curves.png; the training "
            "task loss per step of the first-N arms against the FCN alone: first_loss.png. "
            + disconnect_note(table["after_disconnect"])
        )

    return after


def task_loss_by_step(folder: Path) -> list[float]:
    """The training task loss of every step of a run, in step order (from its metrics.jsonl)."""
    import json

    records = [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()]
    return [r["task_loss"] for r in sorted((r for r in records if "kind" not in r), key=lambda r: r["step"])]


def _window(runs: list[list[float]], start: int, width: int = 50) -> float | None:
    """Mean task loss over steps start+1 .. start+width, averaged over runs (None past the runs' end)."""
    values = [sum(run[start : start + width]) / width for run in runs if len(run) >= start + width]
    return sum(values) / len(values) if values else None


def after_disconnect(losses: dict[str, list[list[float]]], first: tuple[int, ...]) -> dict[str, Any]:
    """For each first-N arm: its training task loss (mean of 50 steps) just after N and at the end, beside alone's."""
    alone = losses.get("deep-fcn", [])
    end = min((len(run) for runs in losses.values() for run in runs), default=0) - 50
    out = {}
    for arm, runs in losses.items():
        n = next((k for k in first if arm.endswith(f"-first{k}")), None)
        if n is None or end < n:
            continue
        out[arm] = {
            "steps": n,
            "after": _window(runs, n),
            "end": _window(runs, end),
            "alone_after": _window(alone, n),
            "alone_end": _window(alone, end),
            "end_step": end + 50,
        }
    return out


def disconnect_note(rows: dict[str, Any]) -> str:
    cells = [
        f"`{arm}` {r['after']:.3f} just after step {r['steps']} -> {r['end']:.3f} at step {r['end_step']} "
        f"(alone {r['alone_after']:.3f} -> {r['alone_end']:.3f})"
        for arm, r in rows.items()
        if None not in (r["after"], r["end"], r["alone_after"], r["alone_end"])
    ]
    return ("Training task loss, mean of 50 steps: " + "; ".join(cells) + ".") if cells else ""


@register_experiment("rescue")
def rescue(quick: bool = False) -> Experiment | list[Any]:
    """The 48 x 256 Deep FCN at 1,240 steps: both arms tuned, then every arm and control over 5 seeds."""
    if quick:
        return quick_experiment()
    return study(WIDTH)


@register_experiment("rescue-128")
def rescue_128(quick: bool = False) -> list[Any]:
    """The long-horizon rescue study at width 128: the choices behind the main job (`rescue --quick`)."""
    return study(QUICK_WIDTH)


def wide_experiments() -> list[Any]:
    """Width 1024, 3 seeds: the FCN alone at Adam 1e-3 and 3e-3, the better on validation as baseline, and guided."""
    base = base_config(1024)
    rates = (1e-3, 3e-3)
    alone = Experiment(
        name="rescue-1024-alone",
        description=_setup(base) + " The FCN alone, Adam at two constant rates.",
        arms=[
            Arm(alone_name("adam", lr, False), _with_optimiser(base.replace(guide=None), "adam", lr)) for lr in rates
        ],
        seeds=WIDE_SEEDS,
    )

    def headline(tables: dict[str, dict[str, Any]]) -> Experiment:
        chosen = choose(tables[alone.name], [arm.name for arm in alone.arms])
        lr = next(lr for lr in rates if alone_name("adam", lr, False) == chosen)
        return Experiment(
            name="rescue-1024",
            description=_setup(base)
            + f" `deep-fcn`: alone, Adam lr {lr:g} (the better of {rates} on validation); guided: Adam lr 1e-3, alpha 1.",
            arms=[
                Arm(
                    "deep-fcn", _with_optimiser(base.replace(guide=None), "adam", lr), runs_in=f"{alone.name}/{chosen}"
                ),
                Arm(GUIDED, _guided(base, 1e-3, 1.0)),
            ],
            seeds=WIDE_SEEDS,
            baseline="deep-fcn",
        )

    return [alone, headline]


@register_experiment("rescue-1024")
def rescue_1024(quick: bool = False) -> list[Any]:
    """The paper's width, 48 x 1024, at the long horizon: the FCN alone at its better rate, and guided."""
    return wide_experiments()
