"""Unstructured pruning (torch.nn.utils.prune): zeroes single weights of every conv and linear
layer, ranked by prune.criterion, within each layer or across layers (prune.scope). The tensors
keep their shapes, so dense kernels run no faster; the report states sparsity, and speed only
from measurement."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import prune

from transferkit.errors import TransferkitError
from transferkit.prune.structured import kept_modules, taylor_gradients


def _magnitude(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().abs()


def _taylor(weight: torch.Tensor) -> torch.Tensor:
    """|w x dL/dw|: the first-order estimate of the loss change when w is zeroed."""
    return (weight.detach() * weight.grad).abs()


def _random(weight: torch.Tensor) -> torch.Tensor:
    return torch.rand_like(weight, dtype=torch.float32)


# A single weight's score per prune.criterion. For one weight its L1 and L2 norms are both |w|;
# bn_scale ranks whole channels by their BatchNorm scale and has no per-weight form.
SCORES = {"l1": _magnitude, "l2": _magnitude, "taylor": _taylor, "random": _random}
# layer: each layer loses `ratio` of its weights; global: weights ranked against all layers'.
SCOPES = ("layer", "global")


def check_settings(criterion: str, scope: str) -> None:
    if criterion not in SCORES:
        raise TransferkitError(f"prune.criterion={criterion} ranks channels, not single weights, so "
                               f"prune.mode=unstructured cannot use it. Fix: set prune.criterion to one of "
                               f"{sorted(SCORES)}, or prune.mode=structured.")
    if scope not in SCOPES:
        raise TransferkitError(f"prune.scope={scope} groups channels, not single weights, so "
                               f"prune.mode=unstructured cannot use it. Fix: set prune.scope to one of "
                               f"{list(SCOPES)}, or prune.mode=structured.")


def prunable(model: nn.Module, keep: list[str]) -> list[tuple[nn.Module, str]]:
    keep = [*keep, "head"]  # its outputs are the classes: kept, as structured pruning keeps it
    return [(m, "weight") for name, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and not any(name == k or name.startswith(k + ".") for k in keep)]


def prune_weights(model: nn.Module, ratio: float, keep: list[str], *, criterion: str, scope: str,
                  calibration: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """Mask the `ratio` lowest-scoring weights (masks stay during recovery training).
    `calibration` (images, labels) feeds the gradient-based criterion (taylor)."""
    check_settings(criterion, scope)
    kept_modules(model, keep)  # names the model has, and a layer left to prune
    targets = prunable(model, keep)
    if criterion == "taylor":
        taylor_gradients(model, calibration)
    scores = {(m, name): SCORES[criterion](getattr(m, name)) for m, name in targets}
    model.zero_grad(set_to_none=True)
    # L1Unstructured on the scores drops the lowest-scoring weights: torch's methods take any ranking this way
    if scope == "global":
        prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, importance_scores=scores, amount=ratio)
    else:
        for m, name in targets:
            prune.l1_unstructured(m, name, amount=ratio, importance_scores=scores[(m, name)])


def make_permanent(model: nn.Module) -> None:
    for m in model.modules():
        if prune.is_pruned(m):
            for name in [n[:-5] for n, _ in m.named_parameters(recurse=False) if n.endswith("_orig")]:
                prune.remove(m, name)


def sparsity(model: nn.Module, keep: list[str]) -> float:
    weights = [m.weight for m, _ in prunable(model, keep)]
    zeros = sum(int((w == 0).sum()) for w in weights)
    return zeros / max(1, sum(w.numel() for w in weights))
