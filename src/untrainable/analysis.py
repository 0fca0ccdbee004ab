"""Analyses of finished runs: layer-by-layer similarity maps and error consistency between models."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from untrainable.capture import LayerCapture, resolve_layers
from untrainable.metrics import error_consistency_matrix
from untrainable.similarity import Similarity, centred_gram, get_similarity, gram_cka

PREDICTIONS_FILE = "test_predictions.npy"  # written by every classification run (trainer._finish)


def _capture(model: nn.Module, layers: Sequence[str] | None, x: Tensor) -> tuple[list[str], dict[str, Tensor]]:
    """Activations of `layers` of `model` on x, in eval mode and without gradients; hooks removed after."""
    capture = LayerCapture(model, layers)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            _, activations = capture.run(x)
        return list(capture.names), activations
    finally:
        capture.remove()
        model.train(was_training)


def similarity_matrix(
    target: nn.Module,
    guide: nn.Module,
    x: Tensor,
    target_layers: Sequence[str] | None = None,
    guide_layers: Sequence[str] | None = None,
    similarity: str | Similarity = "cka",
) -> np.ndarray:
    """Similarity of every guide layer to every target layer on one batch.

    Args:
        target, guide: models taking x; both are run in eval mode without
            gradients and are left in the mode they were in.
        x: the inputs, (n, ...); n is the number of examples the measure sees.
        target_layers, guide_layers: module paths or globs (as in
            `LayerCapture`); default `capture.default_layers` of each model.
        similarity: a name from `similarity.list_similarities()` or a callable
            (n, d1), (n, d2) -> scalar.
    Returns:
        float64 array (len(guide layers), len(target layers)): entry [i, j] is
        the similarity of guide layer i and target layer j, activations
        flattened to (n, features). Rows and columns follow the resolved layer
        order (`capture.resolve_layers`).

    With `similarity="cka"` each layer's centred Gram matrix is formed once
    and reused for all its pairs (the same biased linear CKA as
    `similarity.linear_cka`, computed in float64).
    """
    target_names, target_acts = _capture(target, target_layers, x)
    guide_names, guide_acts = _capture(guide, guide_layers, x)
    if similarity == "cka":
        # Every layer takes part in many pairs: form its centred Gram matrix once.
        target_grams = {name: centred_gram(act.double()) for name, act in target_acts.items()}
        guide_grams = {name: centred_gram(act.double()) for name, act in guide_acts.items()}
        return np.array([[float(gram_cka(guide_grams[g], target_grams[t])) for t in target_names] for g in guide_names])
    measure = get_similarity(similarity)
    matrix = np.empty((len(guide_names), len(target_names)))
    for i, g in enumerate(guide_names):
        for j, t in enumerate(target_names):
            matrix[i, j] = float(measure(target_acts[t].flatten(1).double(), guide_acts[g].flatten(1).double()))
    return matrix


def layer_names(model: nn.Module, layers: Sequence[str] | None = None) -> list[str]:
    """The module paths `similarity_matrix` uses for rows or columns of `model`."""
    return resolve_layers(model, layers)


def dataset_labels(dataset: Any) -> np.ndarray:
    """The labels of a data set of (x, y) items as an int64 array (n,)."""
    tensors = getattr(dataset, "tensors", None)
    if tensors is not None and len(tensors) >= 2:
        return tensors[1].cpu().numpy().astype(np.int64)
    return np.array([int(dataset[i][1]) for i in range(len(dataset))], dtype=np.int64)


def load_predictions(folder: str | Path) -> np.ndarray:
    """A run folder's argmax predictions on the test set, (n,)."""
    path = Path(folder) / PREDICTIONS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; only finished classification runs write it")
    return np.load(path)


def error_consistency_summary(runs: Mapping[str, Sequence[str | Path]], labels: Any) -> dict[str, Any]:
    """Error consistency (Cohen's kappa, Geirhos et al. 2020) between models, over seeds.

    Args:
        runs: model name -> its run folders, one per seed, each holding
            `test_predictions.npy`. Seed k of every model is compared with
            seed k of every other, so all models need the same number of runs.
        labels: the test labels (n,).
    Returns:
        A JSON-ready dict: `names`; `mean` and `std` (m, m) over seeds (std 0
        with one seed); `per_seed` (seeds, m, m); `accuracy` name -> mean test
        accuracy; `seeds`, the number of runs per model.
    """
    labels = np.asarray(labels)
    names = list(runs)
    counts = {name: len(folders) for name, folders in runs.items()}
    if not names or len(set(counts.values())) != 1 or not next(iter(counts.values())):
        raise ValueError(f"every model needs the same, non-zero number of runs; got {counts}")
    seeds = counts[names[0]]
    matrices, accuracy = [], {name: [] for name in names}
    for k in range(seeds):
        correct = {}
        for name in names:
            predictions = load_predictions(runs[name][k])
            if predictions.shape != labels.shape:
                raise ValueError(f"{runs[name][k]}: predictions {predictions.shape} do not match labels {labels.shape}")
            correct[name] = predictions == labels
            accuracy[name].append(float(correct[name].mean()))
        matrices.append(error_consistency_matrix(correct)[1])
    stacked = np.stack(matrices)
    return {
        "names": names,
        "seeds": seeds,
        "mean": stacked.mean(axis=0).tolist(),
        "std": (stacked.std(axis=0, ddof=1) if seeds > 1 else np.zeros_like(stacked[0])).tolist(),
        "per_seed": stacked.tolist(),
        "accuracy": {name: float(np.mean(values)) for name, values in accuracy.items()},
    }
