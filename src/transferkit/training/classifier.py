"""ClassifierModule: one LightningModule for pretrain, transfer, scratch and probe.

The differences between those stages are data and settings (which blocks are frozen,
the backbone's learning-rate multiplier, gradual unfreezing), not code.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from transferkit.data.augment import augment_batch
from transferkit.models.blocknet import BlockNet
from transferkit.training.freeze import freeze_blocks, frozen_depth, keep_frozen_in_eval, set_trainable


class ClassifierModule(pl.LightningModule):
    def __init__(self, model: BlockNet, *, lr: float, weight_decay: float, momentum: float,
                 label_smoothing: float, warmup_fraction: float, freeze_depth: int = 0,
                 backbone_lr_mult: float = 1.0, unfreeze_every_epochs: int = 0,
                 flip: bool = True, translate: int = 2, channels_last: bool = True):
        super().__init__()
        self.save_hyperparameters(ignore=["model", "student", "teacher"])
        self.model = model.to(memory_format=torch.channels_last) if channels_last else model
        # backbone_lr_mult == 0 is the source material's "LRateMultiplier 0": a frozen backbone
        self.start_depth = model.num_blocks if backbone_lr_mult == 0 else freeze_depth
        freeze_blocks(model, self.start_depth)
        n = model.num_classes
        self.train_acc = MulticlassAccuracy(n, average="micro")
        self.val_acc = MulticlassAccuracy(n, average="micro")

    # ---------------------------------------------------------------- data on device
    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        x, y = batch
        x = x.float().div_(255)
        if self.trainer.training:
            x = augment_batch(x, self.hparams.flip, self.hparams.translate)
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y

    # ---------------------------------------------------------------- steps
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx: int):
        x, y = batch
        logits = self.model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)
        self.train_acc(logits, y)
        self.log("train/loss", loss, prog_bar=True, on_step=False, on_epoch=True, sync_dist=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx: int):
        x, y = batch
        logits = self.model(x)
        self.val_acc(logits, y)
        self.log("val/loss", F.cross_entropy(logits, y), on_epoch=True, sync_dist=True)
        self.log("val/acc", self.val_acc, prog_bar=True, on_epoch=True)

    # ---------------------------------------------------------------- freezing
    def on_train_epoch_start(self) -> None:
        every = self.hparams.unfreeze_every_epochs
        if every and self.current_epoch and self.current_epoch % every == 0:
            depth = frozen_depth(self.model)  # gradual unfreezing: one more block from the top
            if depth > 0:
                set_trainable(self.model.blocks[depth - 1], True)
        keep_frozen_in_eval(self.model)

    # ---------------------------------------------------------------- optimiser
    def configure_optimizers(self):
        hp = self.hparams
        head = list(self.model.head.parameters())
        # every block is in the optimiser (frozen ones receive no gradient, so SGD skips
        # them): gradual unfreezing then needs no optimiser surgery
        backbone = [p for b in self.model.blocks for p in b.parameters()]
        groups = [{"params": head, "lr": hp.lr, "weight_decay": hp.weight_decay}]
        if hp.backbone_lr_mult > 0 and backbone:
            lr = hp.lr * hp.backbone_lr_mult
            # no weight decay on BatchNorm scales/shifts and biases (1-D tensors)
            groups += [{"params": [p for p in backbone if p.ndim > 1], "lr": lr, "weight_decay": hp.weight_decay},
                       {"params": [p for p in backbone if p.ndim <= 1], "lr": lr, "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        opt = torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum, nesterov=hp.momentum > 0)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = max(1, int(total * hp.warmup_fraction))

        def schedule(step: int) -> float:  # linear warm-up, then linear decay to zero (airbench)
            if step < warmup:
                return (step + 1) / warmup
            return max(0.0, (total - step) / max(1, total - warmup))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
