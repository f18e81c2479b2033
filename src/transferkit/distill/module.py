"""DistillerModule: a student (trained) and a teacher (frozen, eval mode, no gradients).

It is a ClassifierModule whose training loss comes from the distillation registry: the
data path, augmentation, optimiser, schedule and validation are the student's, unchanged.
"""

from __future__ import annotations

import torch

from transferkit.distill.losses import get_loss
from transferkit.models.blocknet import BlockNet
from transferkit.training.classifier import ClassifierModule


class DistillerModule(ClassifierModule):
    def __init__(self, student: BlockNet, teacher: BlockNet, *, method: str, method_kwargs: dict,
                 **train_kwargs):
        super().__init__(student, **train_kwargs)
        self.loss_fn = get_loss(method)
        self.method_kwargs = dict(method_kwargs)
        for p in teacher.parameters():
            p.requires_grad_(False)
        if train_kwargs.get("channels_last", True):
            teacher = teacher.to(memory_format=torch.channels_last)
        self.teacher = teacher.eval()

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self.teacher.eval()  # Lightning's model.train() at fit start would wake its BatchNorm up

    def loss(self, logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # the teacher's forward pass builds no graph: no backward cost
            teacher_logits = self.teacher(x)
        return self.loss_fn(logits, teacher_logits, y, **self.method_kwargs)
