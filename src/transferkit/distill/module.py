"""DistillerModule: a student (trained) and a teacher (frozen, eval mode, no gradients).

It is a ClassifierModule whose training loss comes from the distillation registry: the
data path, augmentation, optimiser, schedule and validation are the student's, unchanged.
With `mixup` > 0 it matches the teacher's function on mixed images too (Beyer et al., "Knowledge
distillation: A good teacher is patient and consistent", 2022): teacher and student see the same
mix of two training images, which gives a student of few images many more inputs to match on.
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
        self.mixup = float(self.method_kwargs.pop("mixup", 0.0))
        for p in teacher.parameters():
            p.requires_grad_(False)
        if train_kwargs.get("channels_last", True):
            teacher = teacher.to(memory_format=torch.channels_last)
        self.teacher = teacher.eval()

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self.teacher.eval()  # Lightning's model.train() at fit start would wake its BatchNorm up

    def training_loss(self, batch) -> torch.Tensor:
        if not self.mixup:
            return super().training_loss(batch)
        x, y = batch
        # each image blended with another of the batch, lam ~ Beta(m, m) per image, sampled on the device
        c = torch.full((len(y),), self.mixup, device=x.device)
        lam = torch.distributions.Beta(c, c, validate_args=False).sample()  # checking c would read it back: a sync
        other = torch.randperm(len(y), device=x.device)
        w = lam.view(-1, 1, 1, 1).to(x.dtype)
        x = w * x + (1 - w) * x[other]
        logits = self.model(x)
        loss = self.loss(logits, x, y, mixed_with=(y[other], lam))
        self._tally(self._train_sums, loss, logits, y)
        return loss

    def loss(self, logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor, **mixed) -> torch.Tensor:
        with torch.no_grad():  # the teacher's forward pass builds no graph: no backward cost
            teacher_logits = self.teacher(x)
        return self.loss_fn(logits, teacher_logits, y, label_smoothing=self.hparams.label_smoothing,
                            epoch=self.current_epoch, **self.method_kwargs, **mixed)
