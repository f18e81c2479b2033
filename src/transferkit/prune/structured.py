"""Structured channel pruning with Torch-Pruning.

Torch-Pruning builds a dependency graph of the model, so removing an output channel of a
conv also removes the matching BatchNorm entries and input channels of whatever consumes
it (residual additions included): the result is a smaller dense network that is faster on
real hardware, not a masked one.
"""

from __future__ import annotations

import copy
import math
from typing import Callable

import torch
import torch_pruning as tp
from torch import nn

from transferkit.errors import TransferkitError
from transferkit.evaluation.cost import count_macs, count_params

CRITERIA: dict[str, Callable[[], object]] = {
    "l1": lambda: tp.importance.MagnitudeImportance(p=1),
    "l2": lambda: tp.importance.MagnitudeImportance(p=2),
    "bn_scale": lambda: tp.importance.BNScaleImportance(),
    "taylor": lambda: tp.importance.TaylorImportance(),
    "random": lambda: tp.importance.RandomImportance(),  # the control: any criterion should beat it
}


# How the removed channels are spread over the layers (Torch-Pruning's options):
SCOPES = {"layer": {},                                               # every layer loses the same share
          "global": {"global_pruning": True},                        # channels ranked against all layers'
          "isomorphic": {"global_pruning": True, "isomorphic": True}}  # ranked within same-shaped groups


def taylor_gradients(model: nn.Module, calibration: tuple[torch.Tensor, torch.Tensor] | None) -> None:
    """The cross-entropy's gradients on `calibration` (images, labels), which taylor ranks by, with
    the model in eval mode so that BatchNorm statistics do not move."""
    if calibration is None:
        raise TransferkitError("prune.criterion=taylor needs calibration images (none given).")
    was = model.training
    model.eval()
    model.zero_grad()
    nn.functional.cross_entropy(model(calibration[0]), calibration[1]).backward()
    model.train(was)


def importance(name: str):
    if name not in CRITERIA:
        raise TransferkitError(f"unknown prune.criterion '{name}'. Fix: use one of {sorted(CRITERIA)}.")
    return CRITERIA[name]()


def kept_modules(model: nn.Module, names: list[str]) -> list[nn.Module]:
    """Modules named in prune.keep (e.g. 'blocks.0') and the head, whose outputs are the classes: never pruned."""
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        top = sorted({n.split(".")[0] for n in modules if n})
        raise TransferkitError(f"prune.keep names {missing}, which the model does not have. Fix: use module "
                               f"names such as {top} (or dotted paths below them).")
    if not prunable_widths(model, names):  # else a cut of nothing: no channel or weight goes, without a word
        raise TransferkitError(f"prune.keep={names} keeps every convolution and linear layer of the model, so "
                               f"pruning would remove nothing. Fix: name fewer modules in prune.keep (e.g. [head]).")
    return [modules[n] for n in names] + [model.head]


def group_regularizer(model: nn.Module, reg: float, keep: list[str], input_size: int = 32) -> Callable[[], None]:
    """Torch-Pruning's group-norm regularisation (DepGraph's sparse learning): called after each
    backward pass, it pulls every channel group of the model (a conv's filters, its BatchNorm
    entries, the next layer's inputs) towards zero, the least important groups hardest, so that
    the channels the cut removes carry little by the time it removes them."""
    was = model.training
    model.eval()  # tracing the graph runs a forward pass: BatchNorm statistics must not move
    pruner = tp.pruner.GroupNormPruner(model, torch.zeros(1, 3, input_size, input_size),
                                       tp.importance.GroupMagnitudeImportance(p=2), reg=reg,
                                       ignored_layers=kept_modules(model, keep))
    model.train(was)
    return lambda: pruner.regularize(model)


def check_rates(model: nn.Module, rates: list[float]) -> None:
    if rates and len(rates) != len(model.blocks):
        raise TransferkitError(f"prune.rates has {len(rates)} values but the model has {len(model.blocks)} blocks. "
                               f"Fix: give one rate per block (1 = the common share), or [] for none.")


def round_rates(rates: list[float], ratio: float, step: int, steps: int) -> list[float]:
    """Each block's rate in round `step` of `steps` of a channel cut, so that a block of rate r has then lost
    min(r x ratio x step / steps, 0.95) of its channels, as one cut would, rather than r times each round's share
    of what the earlier rounds left, compounded."""
    def kept(r: float, k: int) -> float:
        return 1 - min(r * ratio * k / steps, 0.95)

    common = 1 - (1 - ratio * step / steps) / (1 - ratio * (step - 1) / steps)  # the round's ratio (rate 1)
    return [(1 - kept(r, step) / kept(r, step - 1)) / common for r in rates]


def channel_share(ratio: float, rate: float) -> float:
    """The share of its channels a channel cut takes from a layer in a block of `rate`: the ratio at rate 1, else
    the ratio times the rate, at most 0.95."""
    return ratio if rate == 1 else min(rate * ratio, 0.95)


def block_rate(layer: str, rates: list[float] | None) -> float:
    """The rate of the block a layer (blocks.<i>.…) is in; 1 outside the blocks or without rates."""
    return rates[int(layer.split(".")[1])] if rates and layer.startswith("blocks.") else 1


def count_macs_params(model: nn.Module, input_size: int = 32) -> tuple[int, int]:
    """The same MAC count evaluate reports (torch's FLOP counter), so targets and reports agree."""
    was = model.training
    macs, params = count_macs(model, input_size), count_params(model)
    model.train(was)
    return macs, params


def conv_widths(model: nn.Module) -> list[int]:
    """Output channels of every convolution, in order."""
    return [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]


class NearestMultiplePruner(tp.pruner.MetaPruner):
    """round_to to the nearest multiple (ties keep more), as Torch-Pruning documents it: its code rounds
    the kept count down, so a layer lost up to round_to - 1 channels more than `ratio` (16 of 32 at 0.3)."""

    def _round_to(self, n_pruned: int, current_channels: int, round_to: int) -> int:
        kept = max(round_to, (current_channels - n_pruned + round_to // 2) // round_to * round_to)
        return max(current_channels - kept, 0)


def smallest_channel_count(model: nn.Module) -> int:
    return min(conv_widths(model))


def prunable_widths(model: nn.Module, keep: list[str]) -> dict[str, int]:
    """Output channels (features, for vgg_mini's fully connected blocks) of each convolution and linear layer that
    prune.keep does not name (nor a module above it); the head's outputs are the classes, never cut."""
    return {name: _width(m) for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
            and not any(name == k or name.startswith(f"{k}.") for k in [*keep, "head"])}


def _width(layer: nn.Module) -> int:
    return layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features


def check_no_layer_emptied(model: nn.Module, ratio: float, keep: list[str], rates: list[float] | None = None) -> None:
    """target=channels keeps int(c x (1 - share)) of a layer's c channels (channel_share, as _prune sets it): where
    that is 0, Torch-Pruning leaves the layer whole without a word (a cut that reports a reduction of nothing)."""
    widths = prunable_widths(model, keep)
    rate = {n: block_rate(n, rates) for n in widths}

    def ratio_bound(c: int, r: float) -> float:  # the largest ratio (3 decimals) that leaves the layer a channel
        share = math.floor((1 - 1 / c) * 1000) / 1000
        while int(c * (1 - share)) < 1:  # the float product can fall just under 1
            share = round(share - 0.001, 3)
        return math.floor(share / r * 1000) / 1000

    if empty := sorted((ratio_bound(c, rate[n]), n, c) for n, c in widths.items()
                       if int(c * (1 - channel_share(ratio, rate[n]))) < 1):
        bound, _, c = empty[0]
        names = [n for _, n, _ in empty]
        listed = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        raise TransferkitError(f"prune.ratio={ratio} would leave {len(names)} layer(s) no channel ({listed}; the "
                               f"{'first' if rates else 'narrowest'} has {c}). Fix: set prune.ratio <= {bound}, "
                               f"{'lower the rates of their blocks (prune.rates), ' * bool(rates)}or name those "
                               f"layers in prune.keep.")


def prune_channels(model: nn.Module, *, criterion: str, target: str, ratio: float, keep: list[str],
                   calibration: tuple[torch.Tensor, torch.Tensor] | None = None, input_size: int = 32,
                   max_search_steps: int = 40, round_to: int | None = None, scope: str = "layer",
                   rates: list[float] | None = None, refuse_empty: bool = True,
                   widths: dict[str, int] | None = None) -> dict:
    """Remove channels in place until `target` is met:
    - target="channels": remove `ratio` of the channels of every prunable layer;
    - target="macs": remove channels in small uniform steps until MACs <= (1 - ratio) x before.
    `round_to` keeps every pruned layer's channel count a multiple of it. CPU convolution
    kernels (oneDNN) work on blocks of 8 or 16 channels and pad the rest with zeros, so a
    13-channel layer costs about what a 16-channel one does: rounding buys speed per MAC
    (bench/mfu.py measures it). It is a preference, the target is not: a model too narrow to
    reach the target in multiples of `round_to` is pruned to any channel count, and the
    result's "round_to" says which was used.
    `calibration` (images, labels) feeds the gradient-based criterion (taylor); `scope` is one of SCOPES.
    `rates` (one per block of the model, in order) cuts each block's channels at that many times the
    share of the others (0.5: half as fast), so the cut can spare the blocks where channels cost
    few MACs; none or [] cuts every block at the same share. `refuse_empty`: with target="channels",
    refuse a ratio that would leave a layer no channel (rounds of a cut checked as a whole pass False).
    `widths` (layer name -> channels to keep: a round of a channel cut, stages/prune.py) overrides the ratio there."""
    if scope not in SCOPES:
        raise TransferkitError(f"unknown prune.scope '{scope}'. Fix: use one of {list(SCOPES)}.")
    if refuse_empty and target == "channels" and scope == "layer":  # ranked across layers: the ranking decides
        check_no_layer_emptied(model, ratio, keep, rates)
    settings = dict(criterion=criterion, target=target, ratio=ratio, keep=keep, calibration=calibration,
                    input_size=input_size, max_search_steps=max_search_steps, scope=scope, rates=list(rates or []),
                    widths=widths)
    if round_to:
        rng = torch.get_rng_state()  # the random criterion's draws: the cut below is the one tried here
        try:  # on copies first: Torch-Pruning changes the model in place, and a failed try cannot be undone
            _prune(rounded := copy.deepcopy(model), round_to=round_to, **settings)
            if target == "channels":  # rounding to the nearest multiple may leave whole a layer the cut reaches
                torch.set_rng_state(rng)
                _prune(reached := copy.deepcopy(model), round_to=None, **settings)
                before, with_rounding, without = (prunable_widths(m, keep) for m in (model, rounded, reached))
                if [n for n, c in before.items() if with_rounding[n] == c and without[n] < c]:
                    round_to = None
        except TransferkitError:
            round_to = None
        torch.set_rng_state(rng)
    return {**_prune(model, round_to=round_to, **settings), "round_to": round_to}


def _prune(model: nn.Module, *, criterion: str, target: str, ratio: float, keep: list[str],
           calibration: tuple[torch.Tensor, torch.Tensor] | None, input_size: int, max_search_steps: int,
           round_to: int | None, scope: str, rates: list[float], widths: dict[str, int] | None) -> dict:
    example = torch.zeros(1, 3, input_size, input_size)
    base_macs, base_params = count_macs_params(model, input_size)
    imp = importance(criterion)
    steps = 1 if target == "channels" else max_search_steps
    check_rates(model, rates)
    # the search ramps every share linearly to its maximum: the fastest block's is 0.95, the others' in proportion
    max_ratio = ratio if target == "channels" else 0.95 / max([1, *rates])
    per_module = {block: channel_share(max_ratio, rate) for block, rate in zip(model.blocks, rates) if rate != 1}
    modules = dict(model.named_modules())  # a layer's own goal comes after its block's, and Torch-Pruning keeps
    per_module.update({modules[n]: min(max(1 - (k + 0.5) / _width(modules[n]), 0.0), 0.95)  # the last
                       for n, k in (widths or {}).items()})  # int(c x (1 - ratio)) is then k
    # channels: each layer's share is the target; macs: the search cuts until MACs meet it, so rounding down is safe
    pruner_class = NearestMultiplePruner if target == "channels" else tp.pruner.MetaPruner
    pruner = pruner_class(model, example, imp, pruning_ratio=max_ratio, iterative_steps=steps,
                          pruning_ratio_dict=per_module,
                          ignored_layers=kept_modules(model, keep), round_to=round_to, **SCOPES[scope])
    model.eval()
    for _ in range(steps):
        if criterion == "taylor":
            taylor_gradients(model, calibration)
        pruner.step()
        macs, _ = count_macs_params(model, input_size)
        if smallest_channel_count(model) < 1:
            raise TransferkitError("pruning would remove every channel of a layer. Fix: lower prune.ratio.")
        if target == "macs" and macs <= (1 - ratio) * base_macs:
            break
    macs, params = count_macs_params(model, input_size)
    if target == "macs" and macs > (1 - ratio) * base_macs:
        raise TransferkitError(f"could not reach prune.ratio={round(ratio, 12)} of MACs (reached "
                               f"{1 - macs / base_macs:.2f}) without emptying a layer. Fix: lower prune.ratio "
                               f"or keep fewer layers.")
    model.zero_grad(set_to_none=True)
    return {"macs_before": base_macs, "macs_after": macs, "params_before": base_params, "params_after": params}
