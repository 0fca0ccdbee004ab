"""Sequence study: RNNs and Transformers guiding each other on copy-paste, parity and Shakespeare.

Three experiments, each a shipped single-run config (`configs/sequence_*.toml`,
the target guided by an untrained guide) varied into four arms:

- copy-paste (accuracy on the copied symbols): RNN alone, RNN + untrained
  Transformer, RNN + trained Transformer, Transformer alone for reference;
- parity (accuracy; the `long` column holds longer, never-trained lengths):
  Transformer encoder alone, + trained RNN, + untrained RNN, RNN alone;
- character-level language modelling on Shakespeare (perplexity, lower is
  better; bits per character in the notes): RNN alone, + trained
  Transformer, + untrained Transformer, Transformer alone.

RNN `layers.*` are paired with Transformer `blocks.*` (the residual stream),
spread evenly as on images. Copy-paste and parity compare activations token by
token (position t of one network with position t of the other, under the
padding mask), since each position has its own role there; language modelling
treats every token as a sample, since its positions are interchangeable and
one CKA per pair is much cheaper than one per position.
"""

from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path
from typing import Any

from untrainable.config import RunConfig, shipped_config
from untrainable.experiment import Arm, Experiment, register_experiment
from untrainable.trainer import RunResult


def _guide_alone(guided: RunConfig, lr: float) -> RunConfig:
    """The guide's architecture trained alone on the task: the trained guide and the reference row."""
    return guided.replace(model=dataclasses.replace(guided.guide, seed=None), guide=None).with_section("optim", lr=lr)


def _quick(config: RunConfig, **data_args: Any) -> RunConfig:
    data = dataclasses.replace(config.data, args={**config.data.args, **data_args}, train_eval_size=64)
    return config.replace(data=data).with_section("train", epochs=1)


# A quick run is a smoke test of the whole pipeline, not a result.
QUICK_SEEDS = (0, 1)
SEEDS = (0, 1, 2)

# Learning rates of the guide architectures when trained alone (the target's
# own is in its config file): high enough that each learns within about 100
# steps, checked on the validation split only.
TRANSFORMER_LR = 3e-3
RNN_LR = 3e-3


def copy_paste(quick: bool = False) -> Experiment:
    """Copy-paste: RNN alone; + untrained Transformer; + trained Transformer; Transformer alone."""
    guided = shipped_config("sequence_copy_paste")
    if quick:
        guided = _quick(guided, train_size=192, val_size=64, test_size=64)
    alone = guided.replace(guide=None)
    transformer = _guide_alone(guided, TRANSFORMER_LR)
    return Experiment(
        name="copy-paste" + ("-quick" if quick else ""),
        description=(
            "Copy-paste (symbols 1-10, lengths 3-6, 1600 training rows): per-symbol accuracy of the copied half (mean ± std over seeds) "
            "of a 2-layer tanh RNN alone and guided by a 2-block causal Transformer, untrained (seeded) or trained "
            "(the transformer arm of the same seed); linear CKA token by token under the padding mask, alpha 1."
        ),
        arms=[
            Arm("transformer", transformer),
            Arm("rnn", alone),
            Arm("rnn+untrained-transformer", guided),
            Arm("rnn+trained-transformer", guided, guide_from="transformer"),
        ],
        seeds=QUICK_SEEDS if quick else SEEDS,
    )


def parity(quick: bool = False) -> Experiment:
    """Parity: Transformer encoder alone; + trained RNN; + untrained RNN; RNN alone."""
    guided = shipped_config("sequence_parity")
    if quick:
        guided = _quick(guided, train_size=192, val_size=64, test_size=64)
    alone = guided.replace(guide=None)
    rnn = _guide_alone(guided, RNN_LR)
    return Experiment(
        name="parity" + ("-quick" if quick else ""),
        description=(
            "Parity of bitstrings of lengths 2-10 (the `long` column: unseen lengths 11-16): accuracy (mean ± std "
            "over seeds) of a 2-block Transformer encoder alone and guided by a 2-layer tanh RNN, trained (the rnn "
            "arm of the same seed) or untrained (seeded); linear CKA token by token under the padding mask, alpha 1."
        ),
        arms=[
            Arm("rnn", rnn),
            Arm("transformer", alone),
            Arm("transformer+trained-rnn", guided, guide_from="rnn"),
            Arm("transformer+untrained-rnn", guided),
        ],
        seeds=QUICK_SEEDS if quick else SEEDS,
    )


def _bits_per_character(out: Path, table: dict[str, Any], results: dict[str, list[RunResult]]) -> None:
    """Add test bits per character (mean ± std over seeds) to the table and its notes."""
    lines = []
    for row in table["rows"]:
        bpc = [r.final["test"]["bpc"] for r in results[row["arm"]]]
        mean, std = statistics.fmean(bpc), statistics.stdev(bpc) if len(bpc) > 1 else 0.0
        row["test_bpc"] = (mean, std)
        lines.append(f"{row['arm']} {mean:.3f} ± {std:.3f}")
    # table["notes"] is the experiment's own list, so the note reaches table.md too.
    table["notes"].append("test bits per character: " + "; ".join(lines))


def language_model(quick: bool = False) -> Experiment:
    """Shakespeare, character level: RNN alone; + trained Transformer; + untrained Transformer; Transformer alone."""
    guided = shipped_config("sequence_lm")
    if quick:
        guided = _quick(guided, max_chars=6_000)
    alone = guided.replace(guide=None)
    transformer = _guide_alone(guided, TRANSFORMER_LR)
    chars = guided.data.args.get("max_chars")
    return Experiment(
        name="lm" + ("-quick" if quick else ""),
        description=(
            f"Character-level Shakespeare (the first {chars} characters of each split; whole plays held out for "
            "validation and test): test perplexity per character (mean ± std over seeds, lower is better) of a "
            "2-layer tanh RNN alone and guided by a 2-block causal Transformer, trained (the transformer arm of the "
            "same seed) or untrained (seeded); linear CKA over all tokens as samples, alpha 1."
        ),
        arms=[
            Arm("transformer", transformer),
            Arm("rnn", alone),
            Arm("rnn+trained-transformer", guided, guide_from="transformer"),
            Arm("rnn+untrained-transformer", guided),
        ],
        metric="perplexity",
        higher_is_better=False,
        seeds=QUICK_SEEDS if quick else SEEDS,
        after=_bits_per_character,
    )


def copy_paste_long(quick: bool = False) -> Experiment:
    """Copy-paste at the paper's lengths (20-40): RNN alone; + untrained Transformer; + trained; Transformer alone."""
    short = copy_paste(quick)
    arms = []
    for arm in short.arms:
        config = arm.config.with_args("data", min_len=20, max_len=40)
        if not quick:
            # Longer sequences need longer training: 2000 steps instead of 400.
            config = config.with_section("train", epochs=40)
        if config.guide is not None:
            config = config.with_args("guide", max_len=82)
        if config.model.name == "causal_transformer":
            config = config.with_args("model", max_len=82)
        arms.append(Arm(arm.name, config, guide_from=arm.guide_from))
    return Experiment(
        name="copy-paste-long" + ("-quick" if quick else ""),
        description=short.description.replace("lengths 3-6", "lengths 20-40, as in the paper; 40 epochs"),
        arms=arms,
        seeds=short.seeds,
    )


@register_experiment("sequence")
def sequence(quick: bool = False) -> list[Experiment]:
    """Sequences: copy-paste (RNN + Transformer guide), parity (Transformer + RNN guide), Shakespeare LM."""
    return [copy_paste(quick), parity(quick), language_model(quick)]


register_experiment("sequence-copy-paste")(copy_paste)
register_experiment("sequence-copy-paste-long")(copy_paste_long)
register_experiment("sequence-parity")(parity)
register_experiment("sequence-lm")(language_model)


# Copy-paste at the paper's lengths, where the RNN fails alone: one setting
# changed at a time from the long study's guided arm, read on validation.
EXPLORE_SEED = (0,)


def _explore_settings(guided: RunConfig, quick: bool) -> dict[str, RunConfig]:
    """Named variants of the guided run (untrained Transformer): alpha, mode, layers, guide width, length."""
    longer = 2 if quick else 80
    wide = 16 if quick else 256
    return {
        "guided": guided,
        "alpha10": guided.with_section("guidance", alpha=10.0),
        "flatten": guided.with_section("guidance", sequence_mode="flatten"),
        "last-layer": guided.with_section(
            "guidance", target_layers=None, guide_layers=None, pairs=[["layers.1", "blocks.1"]]
        ),
        f"guide-width{wide}": guided.with_args("guide", dim=wide),
        f"epochs{longer}": guided.with_section("train", epochs=longer),
    }


def copy_paste_explore(quick: bool = False) -> Experiment:
    """Copy-paste, lengths 20-40, seed 0, validation: the RNN alone and guided under each setting of `_explore_settings`."""
    long = {arm.name: arm.config for arm in copy_paste_long(quick).arms}
    guided = long["rnn+untrained-transformer"]
    settings = _explore_settings(guided, quick)
    longer = settings[next(k for k in settings if k.startswith("epochs"))].train.epochs
    arms = [Arm("rnn", long["rnn"]), Arm(f"rnn-epochs{longer}", long["rnn"].with_section("train", epochs=longer))]
    arms += [Arm(f"rnn+untrained-transformer-{name}", config) for name, config in settings.items()]
    return Experiment(
        name="copy-paste-explore" + ("-quick" if quick else ""),
        description=(
            "Copy-paste at lengths 20-40 (where the RNN fails alone), one seed, read on the validation split: the 2-layer tanh RNN "
            "alone and guided by an untrained 2-block causal Transformer, changing one setting at a time from the long study's "
            f"guided arm (alpha 1, token-wise CKA, layer i to block i, guide width 64, {guided.train.epochs} epochs): alpha 10, "
            "flattened sequences, only the last layer paired, a wider guide, longer training."
        ),
        arms=arms,
        seeds=EXPLORE_SEED,
    )


def copy_paste_rescue(explore: dict[str, Any], quick: bool = False) -> Experiment:
    """The setting with the best validation accuracy in `copy-paste-explore`, against the RNN alone trained as long, 3 seeds, test."""
    guided_rows = [row for row in explore["rows"] if row["arm"].startswith("rnn+")]
    best = max(guided_rows, key=lambda row: row["val_accuracy"][0])
    chosen = {arm.name: arm for arm in copy_paste_explore(quick).arms}[best["arm"]]
    alone = chosen.config.replace(guide=None)
    return Experiment(
        name="copy-paste-rescue" + ("-quick" if quick else ""),
        description=(
            f"Copy-paste at lengths 20-40, test accuracy of the copied symbols over seeds: the RNN alone and guided by an untrained "
            f"Transformer with the setting `{best['arm']}` (the best validation accuracy of copy-paste-explore, "
            f"{best['val_accuracy'][0]:.3f}), both trained {alone.train.epochs} epochs. Δ / std: difference to `rnn` in pooled seed stds."
        ),
        arms=[Arm("rnn", alone), Arm(best["arm"], chosen.config)],
        seeds=QUICK_SEEDS if quick else SEEDS,
        baseline="rnn",
    )


@register_experiment("copy-paste-rescue")
def copy_paste_study(quick: bool = False) -> list[Any]:
    """Copy-paste at lengths 20-40: explore guidance settings on validation, then the best one over 3 seeds on test."""
    return [copy_paste_explore(quick), lambda tables: copy_paste_rescue(tables[next(iter(tables))], quick)]
