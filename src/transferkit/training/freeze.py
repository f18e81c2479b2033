"""Freezing blocks for transfer learning.

A frozen block gets requires_grad=False *and* stays in eval mode, so its BatchNorm running
statistics do not drift toward the target data. (Lightning's BaseFinetuning.freeze sets
`track_running_stats=False` instead, which makes BatchNorm normalise with batch statistics
at inference too; that is why this is done here by hand.)
"""

from __future__ import annotations

from torch import nn

from transferkit.models.blocknet import BlockNet


def set_trainable(module: nn.Module, trainable: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(trainable)
    module.train(trainable)


def freeze_blocks(model: BlockNet, depth: int) -> None:
    """Freeze blocks[:depth] (and the input normalisation); the rest stays trainable."""
    for i, block in enumerate(model.blocks):
        set_trainable(block, i >= depth)


def start_depth(freeze_depth: int, backbone_lr_mult: float, num_blocks: int) -> int:
    """The blocks a fine-tune keeps frozen at its start: every one when the backbone gets no rate
    (backbone_lr_mult 0, the source material's "LRateMultiplier 0"), else freeze_depth."""
    return num_blocks if backbone_lr_mult == 0 else freeze_depth


def frozen_depth(model: BlockNet) -> int:
    """How many leading blocks are frozen right now."""
    depth = 0
    for block in model.blocks:
        params = list(block.parameters())
        if params and any(p.requires_grad for p in params):
            break
        depth += 1
    return depth


def keep_frozen_in_eval(model: BlockNet) -> None:
    """Frozen blocks back in eval mode, whatever put the whole model in train mode (older Lightning at the start
    of fit, a user's callback): their BatchNorm statistics stay the pretrained ones."""
    for block in model.blocks[: frozen_depth(model)]:
        block.eval()
