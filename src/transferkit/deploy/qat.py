"""Quantization-aware fine-tuning, for when post-training INT8 loses too much: the deployed model
(BatchNorm folded, as export writes it) trains a few epochs with every convolution's and linear
layer's weights and inputs fake-quantized as ONNX Runtime quantizes them (int8 weights with one
symmetric scale per output channel, 7-bit with reduce_range; uint8 inputs with a running
min/max), so its weights learn to sit where INT8 rounds them well; the layers quantize.keep_float
leaves in float stay float here too (float_layers). The fake quantization then comes off, but each
layer's input keeps the range it trained under as a clamp (an ONNX Clip once exported): the weights
learned that inputs beyond it saturate, as INT8 saturates them, and without the clamp the fp32 model
the quantize stage exports and calibrates again is another function.

Written with torch's parametrizations and FakeQuantize modules rather than torch.ao's QAT flows,
because those produce PyTorch INT8 modules, while the deployed INT8 model is ONNX Runtime's."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.ao.quantization import FusedMovingAvgObsFakeQuantize, MovingAverageMinMaxObserver
from torch.nn.utils import parametrize

QUANTIZED = (nn.Conv2d, nn.Linear)
# the ONNX ops those layers export as (the TorchScript-based exporter writes a Linear without bias as MatMul)
LAYER_OPS = ("Conv", "Gemm", "MatMul")


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
        if not self.per_channel:  # the scale as a tensor: a float read it back from the GPU at every step
            scale = (w.detach().abs().max().clamp_min(1e-8) / n).float()
            return torch.fake_quantize_per_tensor_affine(w, scale, torch.zeros((), dtype=torch.int32,
                                                                               device=w.device), -n, n)
        scale = w.detach().abs().flatten(1).amax(1).clamp_min(1e-8) / n
        zero = torch.zeros(len(scale), dtype=torch.int32, device=w.device)
        return torch.fake_quantize_per_channel_affine(w, scale.float(), zero, 0, -n, n)


class TrainingFakeQuantize(FusedMovingAvgObsFakeQuantize):
    """Observes activation ranges in training mode only: torch's FakeQuantize observes in eval mode too, and the
    val images it would then see decide whether the INT8 model ships. Fused: FakeQuantize's forward reads its
    enabled flags back from the device, twice a layer at every step."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.observer_enabled.fill_(int(self.training))
        return super().forward(x)


def _quantize_input(module: nn.Module, args: tuple) -> tuple:
    return (module.input_quant(args[0]), *args[1:])


def float_layers(model: nn.Module, onnx_file: Path, keep_float) -> set[str]:
    """The layers of `model` whose nodes in `onnx_file`, its export, `keep_float` (node names or op types)
    leaves in float. Found by their weights, which the file holds as they are in `model` with its logit scale
    folded (or transposed, for MatMul), since the exporters name the nodes and, for MatMul, the weights in their
    own ways."""
    import onnx
    from onnx import numpy_helper

    from transferkit.deploy.fold import fold_head_scale
    from transferkit.deploy.quantize import float_nodes
    from transferkit.errors import TransferkitError

    if not keep_float:
        return set()
    kept = set(float_nodes(onnx_file, keep_float))
    graph = onnx.load(str(onnx_file)).graph
    weights = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    key = lambda a: (a.shape, np.ascontiguousarray(a).tobytes())  # noqa: E731
    by_weight = {}
    for name, layer in fold_head_scale(copy.deepcopy(model)).named_modules():  # its names are the model's
        if isinstance(layer, QUANTIZED):
            w = layer.weight.detach().cpu().numpy()
            by_weight |= {key(w): name, key(w.T): name}
    found = set()
    for node in graph.node:
        if node.name in kept and node.op_type in LAYER_OPS:
            weight = weights.get(node.input[1])
            if weight is None or key(weight) not in by_weight:
                raise TransferkitError(f"quantize.keep_float={list(keep_float)}: node {node.name} of {onnx_file} "
                                       f"holds the weights of no layer of the pruned student, so fine-tuning cannot "
                                       f"leave that layer in float. Fix: export the student again (`dvc repro "
                                       f"export`).")
            found.add(by_weight[key(weight)])
    return found


def add_fake_quant(model: nn.Module, per_channel: bool, reduce_range: bool, keep_zeros: bool = False,
                   keep: set[str] | frozenset[str] = frozenset()) -> None:
    """Fake-quantize every convolution and linear layer of `model` in place, except the layers named in
    `keep` (float_layers). With `keep_zeros` (an unstructured-pruned model) the weights
    that are zero now stay zero."""
    for layer in [m for name, m in model.named_modules() if isinstance(m, QUANTIZED) and name not in keep]:
        mask = (layer.weight.detach() != 0).to(layer.weight.dtype) if keep_zeros else None
        parametrize.register_parametrization(layer, "weight", FakeQuantWeight(per_channel, reduce_range, mask))
        layer.input_quant = TrainingFakeQuantize(observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255,
                                                 dtype=torch.quint8, qscheme=torch.per_tensor_affine)
        layer.register_forward_pre_hook(_quantize_input)


class TrainedRange(nn.Module):
    """A layer's input clamped to the range its fake quantization trained under: exported, an ONNX Clip, whose
    output ONNX Runtime's calibration then finds within that range."""

    def __init__(self, low: float, high: float):
        super().__init__()
        self.low, self.high = low, high

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(self.low, self.high)


def remove_fake_quant(model: nn.Module) -> nn.Module:
    """The trained fp32 weights without fake quantization, each quantized layer's input clamped to the range
    it trained under (TrainedRange); an input whose observer saw nothing stays unclamped."""
    for layer in [m for m in model.modules() if isinstance(m, QUANTIZED)]:
        if parametrize.is_parametrized(layer, "weight"):
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
        if isinstance(quant := getattr(layer, "input_quant", None), TrainingFakeQuantize):
            seen = quant.activation_post_process.min_val.isfinite().all()
            scale, zero = float(quant.scale), int(quant.zero_point)  # the range its last step quantized to
            layer.input_quant = (TrainedRange((quant.quant_min - zero) * scale, (quant.quant_max - zero) * scale)
                                 if seen else nn.Identity())
    return model
