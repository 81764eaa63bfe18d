"""Knowledge distillation from the full-precision model, and quantization-aware fine-tuning setup.

BinaryAttention (SPEC.md section 1) fine-tunes a binary-QK model from a full-precision checkpoint and
distils from that same full-precision model (self-distillation), DeiT-style:

* soft:  ``KL(softmax(t / tau) || softmax(s / tau)) * tau^2``, averaged over the batch;
* hard:  ``cross_entropy(s, argmax t)`` (the teacher's decision as the label);

and the training loss is ``(1 - alpha) * base_criterion(s, labels) + alpha * distillation``.
"""

from __future__ import annotations

import copy
from typing import Callable, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .nn import convert

__all__ = ["DistillationLoss", "soft_distillation", "hard_distillation", "prepare_qat"]

Outputs = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


def soft_distillation(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """``tau^2 * mean_b KL(softmax(t_b / tau) || softmax(s_b / tau))``.

    The ``tau^2`` factor keeps the gradient magnitude independent of the temperature (Hinton et al.);
    the mean is over the batch (rows), the sum over classes, i.e. the per-sample KL divergence.
    """
    log_p_student = F.log_softmax(student_logits.float() / tau, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / tau, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * (tau * tau)


def hard_distillation(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the student against the teacher's arg-max class (DeiT's hard distillation)."""
    return F.cross_entropy(student_logits.float(), teacher_logits.argmax(dim=-1))


class DistillationLoss(nn.Module):
    """DeiT-style distillation loss against a frozen full-precision teacher.

    Args:
      teacher: the full-precision model. It is frozen (``requires_grad_(False)``) and always evaluated
        in eval mode under ``torch.no_grad()``; it is a submodule, so ``.to()`` moves it with the loss.
      kind: ``"soft"`` or ``"hard"``.
      tau: softmax temperature of the soft kind (ignored by hard).
      alpha: weight of the distillation term; ``1 - alpha`` weighs ``base_criterion``.
      base_criterion: loss against the true labels (default ``nn.CrossEntropyLoss()``, which also
        accepts class-probability targets, e.g. from mixup).

    ``forward(inputs, outputs, labels, teacher_outputs=None)``: ``outputs`` is the student's logits, or
    a ``(class_logits, distillation_logits)`` pair (DeiT's distillation token): then the base loss uses
    the first and the distillation term the second. ``teacher_outputs`` skips the teacher forward.
    """

    def __init__(self, teacher: nn.Module, kind: str = "soft", tau: float = 1.0, alpha: float = 0.5,
                 base_criterion: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None) -> None:
        super().__init__()
        if kind not in ("soft", "hard"):
            raise ValueError(f"kind must be 'soft' or 'hard', got {kind!r}")
        if not tau > 0:
            raise ValueError(f"tau must be positive, got {tau}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.kind, self.tau, self.alpha = kind, float(tau), float(alpha)
        self.base_criterion = base_criterion if base_criterion is not None else nn.CrossEntropyLoss()
        self.teacher = teacher.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> "DistillationLoss":
        super().train(mode)
        self.teacher.eval()  # the teacher's dropout / batch-norm statistics never change
        return self

    def distillation(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        if self.kind == "soft":
            return soft_distillation(student_logits, teacher_logits, self.tau)
        return hard_distillation(student_logits, teacher_logits)

    def forward(self, inputs: torch.Tensor, outputs: Outputs, labels: torch.Tensor,
                teacher_outputs: Optional[torch.Tensor] = None) -> torch.Tensor:
        if isinstance(outputs, (tuple, list)):
            class_logits, distill_logits = outputs
        else:
            class_logits = distill_logits = outputs
        base = self.base_criterion(class_logits, labels)
        if self.alpha == 0.0:
            return base
        if teacher_outputs is None:
            with torch.no_grad():
                teacher_outputs = self.teacher(inputs)
        if isinstance(teacher_outputs, (tuple, list)):
            teacher_outputs = teacher_outputs[0]
        kd = self.distillation(distill_logits, teacher_outputs.detach())
        return (1.0 - self.alpha) * base + self.alpha * kd

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, tau={self.tau}, alpha={self.alpha}"


def prepare_qat(model: nn.Module, *, kind: str = "soft", tau: float = 1.0, alpha: float = 0.5,
                base_criterion: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
                **convert_options) -> Tuple[nn.Module, DistillationLoss]:
    """Quantization-aware fine-tuning from a full-precision model, with self-distillation.

    ``model`` holds the full-precision weights (e.g. a timm ViT with a loaded checkpoint). A frozen
    deep copy becomes the teacher; ``model`` itself is converted in place by
    ``binformer.nn.convert(model, **convert_options)`` and returned as the student, with the
    ``DistillationLoss`` to train it with::

        student, criterion = prepare_qat(vit, kind="soft", tau=1.0, alpha=0.5)
        optimizer = torch.optim.AdamW(student.parameters(), lr=...)
        loss = criterion(images, student(images), labels)
    """
    teacher = copy.deepcopy(model)
    student = convert(model, **convert_options)
    return student, DistillationLoss(teacher, kind=kind, tau=tau, alpha=alpha, base_criterion=base_criterion)
