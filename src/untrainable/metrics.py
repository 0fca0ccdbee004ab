"""Classification metrics: accuracy and trial-by-trial error consistency between two classifiers."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np


def _numpy(x: Any) -> np.ndarray:
    """A torch tensor (any device) or array-like as a NumPy array."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def accuracy(logits: Any, labels: Any) -> float:
    """Fraction of rows whose largest logit is the label: logits (n, k), labels (n,) -> float."""
    logits, labels = _numpy(logits), _numpy(labels)
    if logits.ndim != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(f"need logits (n, k) and labels (n,), got {logits.shape} and {labels.shape}")
    if len(labels) == 0:
        raise ValueError("accuracy of zero examples is undefined")
    return float(np.mean(logits.argmax(axis=1) == labels))


def error_consistency(correct_a: Any, correct_b: Any) -> float:
    """Cohen's kappa of two observers' right/wrong trials (Geirhos, Meding & Wichmann 2020).

    correct_a, correct_b: bool (n,), one entry per trial. With c_obs the
    fraction of trials both got right or both got wrong and, for independent
    observers of accuracies p_a and p_b, c_exp = p_a p_b + (1 - p_a)(1 - p_b):
    kappa = (c_obs - c_exp) / (1 - c_exp), in [-1, 1]; 0 means no more shared
    errors than chance.

    Degenerate case: c_exp == 1 only when both observers are right on every
    trial or both wrong on every trial; then c_obs == 1 too and kappa is 0/0.
    We return 1.0, since the two agree on every trial. (If c_exp == 1 and
    c_obs < 1 could occur we would return 0.0, but it cannot.)
    """
    a, b = _numpy(correct_a).astype(bool), _numpy(correct_b).astype(bool)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"need two bool vectors of one length (n,), got {a.shape} and {b.shape}")
    n = len(a)
    if n == 0:
        raise ValueError("error consistency of zero trials is undefined")
    # Integer counts so the degenerate test c_exp == 1 is exact.
    n_a, n_b, n_agree = int(a.sum()), int(b.sum()), int((a == b).sum())
    expected_agree_n2 = n_a * n_b + (n - n_a) * (n - n_b)  # c_exp * n^2
    if expected_agree_n2 == n * n:
        return 1.0 if n_agree == n else 0.0
    c_obs = n_agree / n
    c_exp = expected_agree_n2 / (n * n)
    return float((c_obs - c_exp) / (1.0 - c_exp))


def error_consistency_matrix(correct: Mapping[str, Any]) -> tuple[list[str], np.ndarray]:
    """Pairwise error consistency of several observers on the same trials.

    correct: name -> bool (n,). Returns the names in the mapping's order and a
    symmetric (m, m) float64 matrix with ones on the diagonal.
    """
    names = list(correct)
    if not names:
        raise ValueError("need at least one observer")
    vectors = [_numpy(correct[name]) for name in names]
    m = len(names)
    matrix = np.eye(m)
    for i in range(m):
        for j in range(i + 1, m):
            matrix[i, j] = matrix[j, i] = error_consistency(vectors[i], vectors[j])
    return names, matrix
