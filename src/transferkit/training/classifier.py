"""ClassifierModule: one LightningModule for pretrain, transfer, scratch, probe and student
(distill, prune and quantize's fine-tune use it through DistillerModule).

The differences between those stages are data and settings (which blocks are frozen,
the backbone's learning-rate multiplier, gradual unfreezing), not code.

The step never waits for the host: batches arrive on the device (data/loader.py), and loss and
accuracy are summed into device tensors that are read once, at the end of the epoch.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from transferkit.data.loader import module_seed
from transferkit.models.blocknet import BlockNet
from transferkit.training.freeze import freeze_blocks, keep_frozen_in_eval, start_depth


def from_rank_zero(tensors) -> None:
    """Under DDP, rank 0's values of `tensors` in every process, in place (through the device the process group
    communicates on); nothing in one process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    for tensor in tensors:
        moved = tensor.to(device)
        dist.broadcast(moved, 0)
        tensor.copy_(moved)


class ClassifierModule(pl.LightningModule):
    def __init__(self, model: BlockNet, *, lr: float, weight_decay: float, momentum: float,
                 label_smoothing: float, warmup_fraction: float, warmup_from: float = 0.0,
                 decay_to: float = 0.0, bn_bias_lr_mult: float = 1.0, bn_bias_decay: bool = False,
                 freeze_depth: int = 0, backbone_lr_mult: float = 1.0, unfreeze_every_epochs: int = 0,
                 seed: int = 0, channels_last: bool = True):
        super().__init__()
        # not the networks, nor prune's regularizer: a logger "sanitizes" a callable by calling it
        self.save_hyperparameters(ignore=["model", "student", "teacher", "regularize"])
        self.model = model.to(memory_format=torch.channels_last) if channels_last else model
        self.start_depth = start_depth(freeze_depth, backbone_lr_mult, model.num_blocks)
        freeze_blocks(model, self.start_depth)
        self.automatic_optimization = False
        self.trained_images = 0  # by this process, this run: what a training rate is computed from

    def __setattr__(self, name: str, value) -> None:
        # Lightning sets _current_fx_name twice around every hook call, dozens of times a step: a
        # string needs none of nn.Module's checks for parameters, buffers and submodules
        if name == "_current_fx_name":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    # ---------------------------------------------------------------- steps
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def loss(self, logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)

    def _tally(self, sums: torch.Tensor, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        """sums += [loss * n, correct, n], all on the device: no .item(), and no host value copied
        to the device either (that would wait for the queue too); n is a shape, known on the host."""
        n = len(y)
        sums += torch.stack([loss.detach().float() * n, (logits.argmax(1) == y).sum().float(),
                             loss.new_full((), n, dtype=torch.float32)])

    def training_loss(self, batch) -> torch.Tensor:
        x, y = batch
        logits = self.model(x)
        loss = self.loss(logits, x, y)
        self._tally(self._train_sums, loss, logits, y)
        return loss

    def training_step(self, batch, batch_idx: int) -> None:
        # the steps of Lightning's automatic optimization, in its order, without the closure and
        # the hook calls around it that it makes on every step
        loss = self.training_loss(batch)
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        self.lr_schedulers().step()

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self.trained_images += len(batch[1])  # a shape, known on the host: no wait

    def validation_step(self, batch, batch_idx: int):
        x, y = batch
        logits = self.model(x)
        self._tally(self._val_sums, F.cross_entropy(logits, y), logits, y)

    def _log_sums(self, prefix: str, sums: torch.Tensor) -> None:
        loss_sum, correct, n = self.trainer.strategy.reduce(sums, reduce_op="sum")
        self.log(f"{prefix}/loss", loss_sum / n, prog_bar=prefix == "train")
        self.log(f"{prefix}/acc", correct / n, prog_bar=prefix == "val")

    def on_train_epoch_start(self) -> None:
        # the epoch's randomness (dropout, mixup) depends on (seed, epoch, rank) only: a resumed run repeats it
        torch.manual_seed(module_seed(self.hparams.seed, self.current_epoch, self.global_rank))
        self._train_sums = torch.zeros(3, device=self.device)
        if every := self.hparams.unfreeze_every_epochs:
            # gradual unfreezing: one more block from the top every `every` epochs, from the epoch
            # number alone, so a resumed run starts with the blocks it had unfrozen before
            freeze_blocks(self.model, max(0, self.start_depth - self.current_epoch // every))
        keep_frozen_in_eval(self.model)

    def on_train_epoch_end(self) -> None:
        self._log_sums("train", self._train_sums)

    def on_validation_epoch_start(self) -> None:
        self._val_sums = torch.zeros(3, device=self.device)
        # DDP hands rank 0's buffers to the others at each training forward only: after the epoch's last step each
        # rank holds the BatchNorm statistics of its own last batch, and the val score would mix models
        from_rank_zero(self.model.buffers())

    def on_validation_epoch_end(self) -> None:
        self._log_sums("val", self._val_sums)

    # ---------------------------------------------------------------- optimiser
    def configure_optimizers(self):
        hp = self.hparams
        head = list(self.model.head.parameters())
        # every block is in the optimiser (frozen ones receive no gradient, so SGD skips
        # them): gradual unfreezing then needs no optimiser surgery
        backbone = [p for b in self.model.blocks for p in b.parameters()]
        bn_shifts = {id(m.bias) for m in self.model.blocks.modules()
                     if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.bias is not None}
        groups = [{"params": head, "lr": hp.lr, "weight_decay": hp.weight_decay}]
        if hp.backbone_lr_mult > 0 and backbone:
            lr = hp.lr * hp.backbone_lr_mult
            # BatchNorm shifts learn at bn_bias_lr_mult x the rate, with either no weight decay or,
            # with bn_bias_decay, the same shrink per step as the weights (airbench's decoupled form:
            # lr x weight_decay is what shrinks a parameter per step); other 1-D tensors (BatchNorm
            # scales, biases) learn at the rate without weight decay
            shift_wd = hp.weight_decay / hp.bn_bias_lr_mult if hp.bn_bias_decay else 0.0
            groups += [{"params": [p for p in backbone if p.ndim > 1], "lr": lr, "weight_decay": hp.weight_decay},
                       {"params": [p for p in backbone if id(p) in bn_shifts], "lr": lr * hp.bn_bias_lr_mult,
                        "weight_decay": shift_wd},
                       {"params": [p for p in backbone if p.ndim <= 1 and id(p) not in bn_shifts], "lr": lr,
                        "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        opt = torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum, nesterov=hp.momentum > 0)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = max(1, int(total * hp.warmup_fraction))
        start, end = hp.warmup_from, hp.decay_to

        def schedule(step: int) -> float:  # linear warm-up, then linear decay (airbench)
            if step < warmup:
                return start + (1 - start) * (step + 1) / warmup
            return end + (1 - end) * max(0.0, (total - step) / max(1, total - warmup))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
