"""Knowledge distillation (Hinton et al. 2015): the contrast the paper draws with guidance.

Distillation matches the target's output distribution to a frozen teacher's;
guidance matches intermediate representations. The paper's point is that an
untrained teacher transfers nothing by distillation while an untrained guide
still helps, so the two must be comparable on the same footing: this loss
composes with `Guidance` (add both to the task loss) and freezes its teacher
in the same one place (`guidance.freeze`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from untrainable.guidance import freeze


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """Temperature-scaled distillation loss, T^2 KL(softmax(t / T) || softmax(s / T)), mean over the batch.

    Args:
        student_logits: (n, classes), the target's output; gradients flow.
        teacher_logits: (n, classes), the frozen teacher's output.
        temperature: T > 0; the T^2 factor keeps the gradient's scale
            independent of T (Hinton et al. 2015, section 2).
    Returns:
        A scalar >= 0, zero exactly when the two distributions agree.
    Computed in float32 or wider, whatever the autocast dtype.
    """
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(
            f"kd_loss needs (n, classes) logits of one shape, got {tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        log_p_student = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
        log_p_teacher = F.log_softmax(teacher_logits.detach().to(dtype) / temperature, dim=-1)
        kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


class Distillation(nn.Module):
    """Distillation from a frozen teacher, a loss term to add beside the task loss and guidance.

        distill = Distillation(teacher, weight=1.0, temperature=4.0)
        out = guidance(x)                                  # or logits = target(x)
        loss = task_loss + out.guidance_loss + distill(x, out.output)

    The teacher is frozen (eval mode, no gradients, run under no_grad) and
    stays in eval mode whatever `.train()` is called on.
    """

    def __init__(self, teacher: nn.Module, weight: float = 1.0, temperature: float = 4.0) -> None:
        super().__init__()
        if not (weight >= 0 and math.isfinite(weight)):
            raise ValueError(f"distillation weight must be a finite number >= 0, got {weight}")
        kd_loss(torch.zeros(1, 2), torch.zeros(1, 2), temperature)  # validates the temperature now, not mid-run
        self.teacher = freeze(teacher)
        self.weight = weight
        self.temperature = temperature

    def train(self, mode: bool = True) -> "Distillation":
        self.training = mode
        freeze(self.teacher)
        return self

    def forward(self, x: Tensor, student_logits: Tensor) -> Tensor:
        """weight * kd_loss(student_logits, teacher(x)); x: the teacher's input batch, (n, ...)."""
        freeze(self.teacher)
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        return self.weight * kd_loss(student_logits, teacher_logits, self.temperature)
