"""Distillation: the loss against a float64 reference, its invariants, gradients, and a frozen teacher."""

import numpy as np
import pytest
import torch
from torch import nn

from untrainable.distillation import Distillation, kd_loss


def reference_kd(student: np.ndarray, teacher: np.ndarray, temperature: float) -> float:
    """T^2 * mean over rows of sum_c p_t log(p_t / p_s), in float64 NumPy."""

    def softmax(z):
        z = z / temperature
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    p_s, p_t = softmax(student.astype(np.float64)), softmax(teacher.astype(np.float64))
    return float(temperature**2 * np.mean(np.sum(p_t * (np.log(p_t) - np.log(p_s)), axis=1)))


@pytest.mark.parametrize("temperature", [1.0, 4.0, 0.5])
def test_kd_loss_matches_float64_reference(temperature):
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(16, 10, generator=gen) * 3, torch.randn(16, 10, generator=gen) * 3
    got = float(kd_loss(s, t, temperature))
    assert got == pytest.approx(reference_kd(s.numpy(), t.numpy(), temperature), rel=1e-5, abs=1e-6)


def test_kd_loss_is_zero_when_the_distributions_agree_and_positive_otherwise():
    logits = torch.randn(8, 5)
    assert float(kd_loss(logits, logits + 7.0)) == pytest.approx(0.0, abs=1e-6)  # softmax ignores a shift
    assert float(kd_loss(logits, -logits)) > 0.1


def test_kd_loss_gradcheck_and_teacher_gets_no_gradient():
    s = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: kd_loss(a, t, 3.0), (s,))
    kd_loss(s, t, 3.0).backward()
    assert t.grad is None


def test_kd_loss_rejects_bad_shapes_and_temperatures():
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(torch.zeros(2, 3), torch.zeros(2, 3), 0.0)
    with pytest.raises(ValueError, match="one shape"):
        kd_loss(torch.zeros(2, 3), torch.zeros(2, 4))


def test_distillation_keeps_the_teacher_frozen_and_in_eval_mode():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Dropout(0.5), nn.Linear(16, 3))
    student = nn.Linear(8, 3)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    distill = Distillation(teacher, weight=2.0, temperature=2.0)
    distill.train()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    x = torch.randn(32, 8)
    first = None
    for _ in range(5):
        loss = distill(x, student(x))
        first = first if first is not None else float(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # BN running stats too
    assert float(loss) < first
    with torch.no_grad():
        expected = 2.0 * kd_loss(student(x), teacher(x), 2.0)
    assert float(distill(x, student(x))) == pytest.approx(float(expected), rel=1e-6)
