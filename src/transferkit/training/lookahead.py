"""Lookahead weights (airbench): every `every` steps the weights move to an exponential moving
average of themselves, whose decay grows from 0 to 0.95^every over training as (step/total)^3,
and at the last step the averaged weights become the model. Averaging late in training, when
the learning rate is small, lands between the last steps' noisy weights: higher accuracy for the
same number of steps. BatchNorm statistics are averaged with the weights, as airbench does; no
other buffer is (fake quantization's observers start their running min and max at +-inf, which
would turn the average into NaN). A run of fewer than `every` steps has no average to land on:
it keeps the weights it trained."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback


class Lookahead(Callback):
    def __init__(self, every: int = 5, decay: float = 0.95):
        self.every, self.decay = every, decay
        self.average: list[torch.Tensor] | None = None

    def _tensors(self, module: pl.LightningModule) -> list[torch.Tensor]:
        """The model's weights and BatchNorm statistics, in the order of its state_dict."""
        model, batchnorm = module.model, torch.nn.modules.batchnorm._BatchNorm
        averaged = {name for name, _ in model.named_parameters()} | {
            f"{name}.{stat}" for name, m in model.named_modules() if isinstance(m, batchnorm)
            for stat in ("running_mean", "running_var")}
        return [t for name, t in model.state_dict().items() if name in averaged]

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.total = max(1, int(trainer.estimated_stepping_batches))
        if self.average is None:  # a resumed run brings its average from the checkpoint
            self.average = [t.detach().clone() for t in self._tensors(module)]
        else:
            self.average = [a.to(t.device) for a, t in zip(self.average, self._tensors(module))]

    @torch.no_grad()
    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        step, total = trainer.global_step, self.total
        due = step % self.every == 0
        if total < self.every or (not due and step < total):  # too short a run: no average to land on
            return
        current = self._tensors(module)
        if due:  # move the average toward the weights...
            torch._foreach_lerp_(self.average, current, 1 - self.decay ** self.every * min(1.0, step / total) ** 3)
        torch._foreach_copy_(current, self.average)  # ...and the weights onto it (at the last step: for good)

    def state_dict(self) -> dict:
        return {"average": [t.cpu() for t in self.average or []]}

    def load_state_dict(self, state: dict) -> None:
        self.average = list(state["average"]) or None
