"""Unstructured magnitude pruning (torch.nn.utils.prune): zeroes the smallest weights of
every conv and linear layer globally. The tensors keep their shapes, so dense kernels run
no faster; the report states sparsity, and speed only from measurement."""

from __future__ import annotations

from torch import nn
from torch.nn.utils import prune


def prunable(model: nn.Module, keep: list[str]) -> list[tuple[nn.Module, str]]:
    return [(m, "weight") for name, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and not any(name == k or name.startswith(k + ".") for k in keep)]


def prune_weights(model: nn.Module, ratio: float, keep: list[str]) -> None:
    """Mask the `ratio` smallest-magnitude weights (masks stay during recovery training)."""
    prune.global_unstructured(prunable(model, keep), pruning_method=prune.L1Unstructured, amount=ratio)


def make_permanent(model: nn.Module) -> None:
    for m in model.modules():
        if prune.is_pruned(m):
            for name in [n[:-5] for n, _ in m.named_parameters(recurse=False) if n.endswith("_orig")]:
                prune.remove(m, name)


def sparsity(model: nn.Module, keep: list[str]) -> float:
    weights = [m.weight for m, _ in prunable(model, keep)]
    zeros = sum(int((w == 0).sum()) for w in weights)
    return zeros / max(1, sum(w.numel() for w in weights))

