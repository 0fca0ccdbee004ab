"""Accuracy and error consistency against numbers worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from untrainable.metrics import accuracy, error_consistency, error_consistency_matrix


def test_accuracy_hand_example():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, 4.0], [1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 1])
    # argmax = [0, 1, 0, 0]; right on trials 0 and 1 -> 2 / 4
    assert accuracy(logits, labels) == 0.5
    assert accuracy(logits.numpy(), labels.numpy()) == 0.5


def test_error_consistency_hand_example():
    a = [1, 1, 1, 1, 1, 1, 1, 0, 0, 0]
    b = [1, 1, 1, 1, 1, 0, 0, 1, 0, 0]
    # 10 trials. p_a = 7/10, p_b = 6/10.
    # Both right: trials 0-4 (5); both wrong: trials 8, 9 (2) -> c_obs = 7/10 = 0.7
    # c_exp = 0.7 * 0.6 + 0.3 * 0.4 = 0.42 + 0.12 = 0.54
    # kappa = (0.7 - 0.54) / (1 - 0.54) = 0.16 / 0.46 = 0.347826...
    assert error_consistency(np.array(a, bool), np.array(b, bool)) == pytest.approx(0.16 / 0.46)
    kappa = error_consistency(torch.tensor(a).bool(), torch.tensor(b).bool())
    assert kappa == pytest.approx(0.3478261)


def test_opposite_observers_give_minus_one():
    a = np.array([1, 0, 1, 0], bool)
    # c_obs = 0, p_a = p_b = 0.5, c_exp = 0.5 -> kappa = -0.5 / 0.5 = -1
    assert error_consistency(a, ~a) == pytest.approx(-1.0)


def test_identical_vectors_give_one():
    a = np.array([1, 0, 0, 1, 1], bool)
    assert error_consistency(a, a) == pytest.approx(1.0)


def test_degenerate_all_right_gives_one():
    ones = np.ones(6, bool)
    assert error_consistency(ones, ones) == 1.0
    assert error_consistency(~ones, ~ones) == 1.0


def test_length_mismatch_raises():
    with pytest.raises(ValueError):
        error_consistency(np.ones(3, bool), np.ones(4, bool))


def test_matrix_symmetric_with_unit_diagonal():
    rng = np.random.default_rng(0)
    correct = {name: rng.random(50) < 0.6 for name in ["guided", "plain", "resnet"]}
    names, matrix = error_consistency_matrix(correct)
    assert names == ["guided", "plain", "resnet"]
    assert matrix.shape == (3, 3)
    np.testing.assert_allclose(matrix, matrix.T)
    np.testing.assert_allclose(np.diag(matrix), 1.0)
    assert matrix[0, 1] == pytest.approx(error_consistency(correct["guided"], correct["plain"]))
