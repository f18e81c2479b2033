"""Distillation losses, picked by name from config (`distill.method`).

Each loss takes (student_logits, teacher_logits, labels) and the method's settings, and
returns the total loss to minimise. Register a new method with @register("name").
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from transferkit.errors import TransferkitError

LOSSES: dict[str, Callable] = {}


def register(name: str):
    def wrap(fn: Callable) -> Callable:
        LOSSES[name] = fn
        return fn
    return wrap


def get_loss(name: str) -> Callable:
    if name not in LOSSES:
        raise TransferkitError(f"unknown distill.method '{name}'. Fix: use one of {sorted(LOSSES)}.")
    return LOSSES[name]


def soft_target_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), averaged over the batch.
    The T^2 keeps the gradient scale independent of T (Hinton et al., 2015)."""
    t = temperature
    log_p_student = F.log_softmax(student.float() / t, dim=1)
    log_p_teacher = F.log_softmax(teacher.float() / t, dim=1)
    return F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean") * t * t


@register("kd")
def kd_loss(student, teacher, labels, *, temperature: float = 4.0, alpha: float = 0.9,
            label_smoothing: float = 0.0, mixed_with: tuple | None = None, **_) -> torch.Tensor:
    """Hinton's knowledge distillation: alpha * soft targets + (1 - alpha) * cross-entropy.
    `mixed_with` (labels, lam): the images are lam x theirs + (1 - lam) x others' (mixup), and
    each one's cross-entropy is split between its two labels in the same proportion."""
    if mixed_with is None:
        ce = F.cross_entropy(student.float(), labels, label_smoothing=label_smoothing)
    else:
        other, lam = mixed_with
        ce = (lam * F.cross_entropy(student.float(), labels, label_smoothing=label_smoothing, reduction="none")
              + (1 - lam) * F.cross_entropy(student.float(), other, label_smoothing=label_smoothing,
                                            reduction="none")).mean()
    return alpha * soft_target_loss(student, teacher, temperature) + (1 - alpha) * ce


@register("dkd")
def dkd_loss(student, teacher, labels, *, temperature: float = 4.0, dkd_alpha: float = 1.0,
             dkd_beta: float = 8.0, dkd_warmup: int = 0, epoch: int = 0, label_smoothing: float = 0.0,
             **_) -> torch.Tensor:
    """Decoupled KD (Zhao et al., CVPR 2022): KD split into the target-class part (TCKD,
    weight alpha) and the non-target-class part (NCKD, weight beta), plus cross-entropy.
    Weighting NCKD up is what lets the student learn the teacher's 'dark knowledge'. As the
    reference implementation does, the two terms ramp up over the first `dkd_warmup` epochs: at
    full weight on a random student, they swamp the labels (0: no ramp)."""
    t = temperature
    s, tt = student.float() / t, teacher.float() / t
    gt = F.one_hot(labels, s.shape[1]).bool()
    p_s, p_t = F.softmax(s, dim=1), F.softmax(tt, dim=1)
    # binary (target vs all others) distributions
    b_s = torch.stack([(p_s * gt).sum(1), (p_s * ~gt).sum(1)], dim=1).clamp_min(1e-8)
    b_t = torch.stack([(p_t * gt).sum(1), (p_t * ~gt).sum(1)], dim=1).clamp_min(1e-8)
    tckd = F.kl_div(b_s.log(), b_t, reduction="batchmean") * t * t
    # distributions over the non-target classes only: those columns taken out, where pushing the target's logit
    # down by a constant leaves it in the sum once the logits / T differ by more than that constant (a small T)
    s_nt, t_nt = (x[~gt].view(len(x), -1) for x in (s, tt))
    nckd = F.kl_div(F.log_softmax(s_nt, dim=1), F.log_softmax(t_nt, dim=1), reduction="batchmean",
                    log_target=True) * t * t
    ce = F.cross_entropy(student.float(), labels, label_smoothing=label_smoothing)
    ramp = min((epoch + 1) / dkd_warmup, 1.0) if dkd_warmup else 1.0
    return ce + ramp * (dkd_alpha * tckd + dkd_beta * nckd)
