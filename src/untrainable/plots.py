"""Matplotlib figures saved as PNG: training curves and similarity matrices."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # files only; no display is needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _mean_curve(histories: list[list[dict[str, Any]]], key: str) -> tuple[np.ndarray, np.ndarray] | None:
    runs = [[entry.get(key) for entry in h] for h in histories if h and key in h[0]]
    if not runs:
        return None
    length = min(len(r) for r in runs)
    values = np.array([r[:length] for r in runs], dtype=float)
    return np.arange(1, length + 1), values.mean(axis=0)


def plot_curves(
    histories: dict[str, list[list[dict[str, Any]]]], path: str | Path, metric: str = "accuracy", title: str = ""
) -> Path:
    """Train (solid) and validation (dashed) loss and `metric` per epoch, mean over seeds, one colour per arm.

    Args:
        histories: arm -> one per-epoch history per seed (dicts with
            `train_loss`, `val_loss`, `train_<metric>`, `val_<metric>`).
    """
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (arm, runs) in enumerate(histories.items()):
        colour = colours[i % len(colours)]
        for ax, key in zip(axes, ("loss", metric)):
            for split, style in (("train", "-"), ("val", "--")):
                curve = _mean_curve(runs, f"{split}_{key}")
                if curve is not None:
                    ax.plot(*curve, style, color=colour, label=f"{arm} ({split})")
    for ax, key in zip(axes, ("loss", metric)):
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    # Log scale: a diverging arm's early loss (thousands) would flatten every other curve.
    if all(y > 0 for line in axes[0].get_lines() for y in line.get_ydata()):
        axes[0].set_yscale("log")
    axes[0].set_title("loss (solid: train, dashed: validation)")
    axes[1].set_title(metric)
    axes[1].legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_matrix(
    matrix: np.ndarray,
    rows: Sequence[str],
    cols: Sequence[str],
    path: str | Path,
    title: str = "",
    vmin: float | None = None,
    vmax: float | None = None,
    annotate: bool = True,
) -> Path:
    """A labelled heatmap (similarity of layers, error consistency of models)."""
    matrix = np.asarray(matrix, dtype=float)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 + 0.6 * len(cols)), 1.2 + 0.45 * len(rows)))
    image = ax.imshow(matrix, cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    if annotate and matrix.size <= 400:
        for (r, c), value in np.ndenumerate(matrix):
            ax.text(
                c,
                r,
                f"{value:.2f}",
                ha="center",
                va="center",
                fontsize=6,
                color="white" if value < np.nanmean(matrix) else "black",
            )
    fig.colorbar(image, ax=ax)
    if title:
        ax.set_title("\n".join(textwrap.wrap(title, 50)), fontsize=9)
    return _save(fig, path)


def plot_loss_curves(
    histories: Mapping[str, Sequence[Sequence[Mapping[str, Any]]]], path: str | Path, title: str = ""
) -> Path:
    """Train and validation loss per epoch, one panel per arm: mean over seeds, band from min to max.

    `plots.plot_curves` draws every arm in one panel; with many arms the
    train/validation gap of each row is easier to read in a panel of its own.
    """

    from untrainable import plots  # noqa: F401  (selects the file-only backend)

    arms = list(histories)
    cols = min(4, len(arms))
    rows = -(-len(arms) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False, sharey=True)
    for ax, arm in zip(axes.flat, arms):
        for split, colour in (("train", "tab:blue"), ("val", "tab:orange")):
            runs = [[entry[f"{split}_loss"] for entry in h] for h in histories[arm] if h and f"{split}_loss" in h[0]]
            if not runs:
                continue
            length = min(len(r) for r in runs)
            values = np.array([r[:length] for r in runs], dtype=float)
            epochs = np.arange(1, length + 1)
            ax.plot(epochs, values.mean(axis=0), color=colour, label=split)
            ax.fill_between(epochs, values.min(axis=0), values.max(axis=0), color=colour, alpha=0.2)
        ax.set_title(arm, fontsize=8)
        ax.set_xlabel("epoch", fontsize=7)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(arms) :]:
        ax.axis("off")
    axes[0, 0].set_ylabel("loss", fontsize=7)
    axes[0, 0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path, dpi=110)


def plot_by_step(
    histories: dict[str, list[list[dict[str, Any]]]],
    key: str,
    path: str | Path,
    marks: Mapping[str, float] | None = None,
    title: str = "",
) -> Path:
    """One per-epoch metric against the training step, mean ± std band over seeds, one colour per arm.

    `histories`: arm -> one per-epoch history per seed (dicts with `step` and
    `key`); `marks`: label -> step, drawn as vertical dashed lines.
    """
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for arm, runs in histories.items():
        runs = [h for h in runs if h and key in h[0]]
        if not runs:
            continue
        length = min(len(h) for h in runs)
        steps = np.array([entry["step"] for entry in runs[0][:length]], dtype=float)
        values = np.array([[entry[key] for entry in h[:length]] for h in runs], dtype=float)
        mean, std = values.mean(axis=0), values.std(axis=0)
        (line,) = ax.plot(steps, mean, marker="o", markersize=3, label=arm)
        ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.15)
    _marks(ax, marks)
    _label_steps(ax, key.replace("_", " "), title)
    return _save(fig, path)


def _marks(ax: Any, marks: Mapping[str, float] | None) -> None:
    """Vertical dashed lines at the steps of `marks` (label -> step)."""
    for i, (label, step) in enumerate((marks or {}).items()):
        ax.axvline(step, color="grey", linestyle=["--", ":", "-."][i % 3], label=label)


def plot_depth_map(
    depths: Sequence[int], curves: Mapping[str, Sequence[tuple[float, float]]], path: str | Path, title: str = ""
) -> Path:
    """Test accuracy (mean ± std over seeds) against depth, one line per arm kind."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, points in curves.items():
        mean = np.array([p[0] for p in points], dtype=float)
        std = np.array([p[1] for p in points], dtype=float)
        ax.errorbar(depths, mean, yerr=std, marker="o", capsize=3, label=label)
    ax.axhline(0.1, color="grey", linestyle=":", label="chance")
    ax.set_xlabel("depth (blocks)")
    ax.set_ylabel("test accuracy")
    ax.set_xticks(list(depths))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path)


def plot_grad_norms(norms: Mapping[str, Mapping[int, Sequence[float]]], path: str | Path, title: str = "") -> Path:
    """Per-layer gradient norms (log scale) against layer index: one panel per kind, one line per step."""
    fig, axes = plt.subplots(1, len(norms), figsize=(6 * len(norms), 4.2), sharey=True, squeeze=False)
    for ax, (kind, steps) in zip(axes[0], norms.items()):
        for step, values in steps.items():
            ax.semilogy(range(len(values)), values, marker=".", label=f"step {step}")
        ax.set_title(kind)
        ax.set_xlabel("linear layer (input side = 0)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("gradient norm of the weight")
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_per_step(
    series: Mapping[str, Sequence[Sequence[float]]],
    path: str | Path,
    ylabel: str,
    title: str = "",
    marks: Mapping[str, float] | None = None,
    log_y: bool = False,
    smooth: int = 1,
) -> Path:
    """A value logged every step (alpha, a loss), one line per arm: mean over runs, band from min to max.

    `series`: arm -> one list per run of the value at steps 1, 2, ...;
    `marks`: label -> step (dashed lines); `smooth`: a running mean over that many steps.
    """
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for arm, runs in series.items():
        if not runs or min(len(r) for r in runs) < smooth:
            continue
        length = min(len(r) for r in runs)
        values = np.array([r[:length] for r in runs], dtype=float)
        if smooth > 1:
            kernel = np.ones(smooth) / smooth
            values = np.array([np.convolve(v, kernel, mode="valid") for v in values])
        steps = np.arange(smooth, length + 1)
        # Drawn as steps: a value holds from its step to the next (an adaptive alpha between measurements).
        (line,) = ax.plot(steps, values.mean(axis=0), drawstyle="steps-post", label=arm)
        ax.fill_between(steps, values.min(axis=0), values.max(axis=0), step="post", color=line.get_color(), alpha=0.2)
    _marks(ax, marks)
    if log_y:
        ax.set_yscale("log")
    _label_steps(ax, ylabel, title)
    return _save(fig, path)


def _label_steps(ax: Any, ylabel: str, title: str) -> None:
    """Axis labels, grid, legend and wrapped title of a plot against the training step."""
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    if title:
        ax.set_title("\n".join(textwrap.wrap(title, 80)), fontsize=10)


def _save(fig: Any, path: str | Path, dpi: int = 120) -> Path:
    """Lay out, write the PNG and free the figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return Path(path)


def plot_study(study: Any, folder: str | Path, title: str = "") -> list[Path]:
    """An Optuna study's optimisation history and (with two complete trials or more) parameter importances, as PNGs."""
    import warnings

    import optuna
    from optuna.visualization import matplotlib as optuna_plots

    folder = Path(folder)
    written = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        ax = optuna_plots.plot_optimization_history(study)
        ax.set_title("", loc="left")
        ax.set_title(f"{title}: optimisation history" if title else "optimisation history", fontsize=10)
        written.append(_save(ax.figure, folder / "optimisation_history.png"))
        complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
        if len(complete) >= 2 and any(len({repr(t.params.get(k)) for t in complete}) > 1 for k in complete[0].params):
            ax = optuna_plots.plot_param_importances(study)
            ax.set_title("", loc="left")  # Optuna's own title, drawn at the left, would overlap ours
            ax.set_title(f"{title}: parameter importances" if title else "parameter importances", fontsize=10)
            written.append(_save(ax.figure, folder / "param_importances.png"))
    return written
