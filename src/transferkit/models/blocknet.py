"""BlockNet: every architecture is `normalize -> blocks[0..n-1] -> head`.

Because every model is an ordered list of blocks, `freeze_depth=k` means one thing for
every architecture (blocks[:k] frozen, BatchNorm statistics included), and a linear probe
on an earlier block is just `truncate(j)` plus a fresh head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Normalize(nn.Module):
    """Input scaling lives in the model so an exported model takes plain [0, 1] images."""

    def __init__(self, mean: list[float], std: list[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class GlobalMaxPool(nn.Module):
    """Max over each feature map, through max_pool2d: the same values and gradients as
    AdaptiveMaxPool2d(1), whose CUDA backward has no deterministic version (trainer.deterministic)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():  # ONNX wants a kernel size it can fix: the op with the same values
            return F.adaptive_max_pool2d(x, 1)
        return F.max_pool2d(x, x.shape[-2:])


class Head(nn.Module):
    """Global pooling (for 4-D features) + linear classifier."""

    def __init__(self, in_features: int, num_classes: int, pool: str = "avg", bias: bool = True,
                 scale: float = 1.0):
        super().__init__()
        self.pool = {"avg": nn.AdaptiveAvgPool2d(1), "max": GlobalMaxPool()}[pool]
        self.fc = nn.Linear(in_features, num_classes, bias=bias)
        self.scale = scale  # airbench scales logits down (1/9): a calmer start at high learning rates

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            x = self.pool(x).flatten(1)
        x = self.fc(x)
        return x * self.scale if self.scale != 1.0 else x


class BlockNet(nn.Module):
    def __init__(self, blocks: list[nn.Module], num_classes: int, *, mean, std, arch: dict,
                 pool: str = "avg", head_bias: bool = True, head_scale: float = 1.0,
                 input_size: int = 32):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.blocks = nn.ModuleList(blocks)
        self.arch = dict(arch)  # how to rebuild this model: saved inside every checkpoint
        self.input_size = input_size
        self._head = dict(pool=pool, bias=head_bias, scale=head_scale)
        self.head = Head(self.feature_dim(len(self.blocks)), num_classes, **self._head)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_classes(self) -> int:
        return self.head.fc.out_features

    def features(self, x: torch.Tensor, depth: int | None = None) -> torch.Tensor:
        x = self.normalize(x)
        # slicing a ModuleList builds a new one (dozens of Python calls): not on every forward
        for block in self.blocks if depth is None else self.blocks[:depth]:
            x = block(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    @torch.no_grad()
    def feature_dim(self, depth: int) -> int:
        """Channels (or features) after blocks[:depth], found by a dry run (no BN update)."""
        was_training = self.training
        self.eval()
        probe = torch.zeros(1, 3, self.input_size, self.input_size, device=self.normalize.mean.device)
        out = self.features(probe, depth)
        self.train(was_training)
        return out.shape[1]

    def new_head(self, num_classes: int) -> None:
        """Replace the classifier (transfer to a task with other classes)."""
        self.head = Head(self.feature_dim(self.num_blocks), num_classes, **self._head)
        self.head.to(self.normalize.mean.device)

    def truncate(self, depth: int, num_classes: int) -> "BlockNet":
        """Keep blocks[:depth] and put a fresh head on their features (linear probe)."""
        self.blocks = self.blocks[:depth]
        self.arch["depth"] = depth
        self.head = Head(self.feature_dim(depth), num_classes, "avg", True, self._head["scale"])
        return self
