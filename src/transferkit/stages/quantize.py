"""quantize: the exported fp32 model (the pruned student) -> INT8, calibrated on training images
of the target task (never test images), checked against fp32 on the test set (deploy/quantize.py)."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from transferkit.deploy.quantize import calibration_images, check, quantize
from transferkit.io import atomic_path, save_json
from transferkit.stages.common import load_task

INT8_FILE = "model.onnx"  # an INT8 ONNX model, read by ONNX Runtime (and `transferkit predict`)


def run(cfg: DictConfig, inputs: dict[str, Path], out: Path) -> dict:
    q = cfg.quantize
    task = load_task(inputs["prepare"], "target")
    calibration = calibration_images(task, q.calibration_images)
    fp32 = inputs["export"] / "model.onnx"
    with atomic_path(out / INT8_FILE) as tmp:
        seconds = quantize(fp32, tmp, calibration, method=q.method, fmt=q.format, per_channel=q.per_channel,
                           keep_float=list(q.keep_float))
        result = check(fp32, tmp, task, torch.get_num_threads(), q.max_drop)
    save_json({"method": q.method, "format": q.format, "per_channel": q.per_channel, "keep_float": list(q.keep_float),
               "calibration_images": q.calibration_images, "produced_by": "post-training quantization", **result},
              out / "quantize.json")
    save_json({"quantize_seconds": round(seconds, 2)}, out / "timing.json")
    return result
