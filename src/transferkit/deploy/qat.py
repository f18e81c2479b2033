"""Quantization-aware fine-tuning, for when post-training INT8 loses too much: the deployed model
(BatchNorm folded, as export writes it) trains a few epochs with every convolution's and linear
layer's weights and inputs fake-quantized as ONNX Runtime quantizes them (int8 weights with one
symmetric scale per output channel, 7-bit with reduce_range; uint8 inputs with a running
min/max), so its weights learn to sit where INT8 rounds them well. The fake quantization is then
removed: the result is an ordinary fp32 model, exported and quantized again by the quantize stage.

Written with torch's parametrizations and FakeQuantize modules rather than torch.ao's QAT flows,
because those produce PyTorch INT8 modules, while the deployed INT8 model is ONNX Runtime's."""

from __future__ import annotations

import torch
from torch import nn
from torch.ao.quantization import FakeQuantize, MovingAverageMinMaxObserver
from torch.nn.utils import parametrize

QUANTIZED = (nn.Conv2d, nn.Linear)


class FakeQuantWeight(nn.Module):
    """int8 weights, symmetric, one scale per output channel (or one in all), in [-127, 127] or
    with reduce_range in [-64, 64], as ONNX Runtime quantizes them; straight-through gradients."""

    def __init__(self, per_channel: bool, reduce_range: bool, mask: torch.Tensor | None = None):
        super().__init__()
        self.per_channel, self.levels = per_channel, 64 if reduce_range else 127
        self.register_buffer("mask", mask, persistent=False)  # a buffer: it moves with the model (.to(device))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        n = self.levels
        if self.mask is not None:  # a pruned weight stays zero: it gets no gradient, so its float value stays 0
            w = w * self.mask
        if not self.per_channel:
            scale = float(w.detach().abs().max().clamp_min(1e-8)) / n
            return torch.fake_quantize_per_tensor_affine(w, scale, 0, -n, n)
        scale = w.detach().abs().flatten(1).amax(1).clamp_min(1e-8) / n
        zero = torch.zeros(len(scale), dtype=torch.int32, device=w.device)
        return torch.fake_quantize_per_channel_affine(w, scale.float(), zero, 0, -n, n)


def _quantize_input(module: nn.Module, args: tuple) -> tuple:
    return (module.input_quant(args[0]), *args[1:])


def add_fake_quant(model: nn.Module, per_channel: bool, reduce_range: bool, keep_zeros: bool = False) -> list:
    """Fake-quantize every convolution and linear layer of `model` in place; returns the hooks. With
    `keep_zeros` (an unstructured-pruned model) the weights that are zero now stay zero."""
    hooks = []
    for layer in [m for m in model.modules() if isinstance(m, QUANTIZED)]:
        mask = (layer.weight.detach() != 0).to(layer.weight.dtype) if keep_zeros else None
        parametrize.register_parametrization(layer, "weight", FakeQuantWeight(per_channel, reduce_range, mask))
        layer.input_quant = FakeQuantize(observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255,
                                         dtype=torch.quint8, qscheme=torch.per_tensor_affine)
        hooks.append(layer.register_forward_pre_hook(_quantize_input))
    return hooks


def remove_fake_quant(model: nn.Module, hooks: list) -> nn.Module:
    """The trained fp32 weights, without fake quantization: an ordinary model again."""
    for hook in hooks:
        hook.remove()
    for layer in [m for m in model.modules() if isinstance(m, QUANTIZED)]:
        if parametrize.is_parametrized(layer, "weight"):
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
        if hasattr(layer, "input_quant"):
            del layer.input_quant
    return model
