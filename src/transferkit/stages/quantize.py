"""quantize: the exported fp32 model (the pruned student) -> INT8, calibrated on training images
of the target task (never test images), judged against fp32 on the val images and scored against
it on the test set (deploy/quantize.py). Where post-training quantization loses more than
quantize.max_drop on val and quantize.qat_epochs > 0, the model is fine-tuned for INT8
(deploy/qat.py), distilled from the teacher, and quantized again."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from transferkit.deploy.quantize import (calibration_images, check, copy_metadata, decision_split, loss_of, quantize,
                                         refuse, sizes)
from transferkit.deploy.runtime import require_classes
from transferkit.evaluation.tables import quantize_line
from transferkit.io import atomic_path, require, save_json
from transferkit.stages.common import announce, load_task

INT8_FILE = "model.onnx"  # an INT8 ONNX model, read by ONNX Runtime (and `transferkit predict`)
QAT_DIR = "qat"           # the fine-tuning's logs and its fp32 ONNX model


def run(cfg: DictConfig, inputs: dict[str, Path], out: Path) -> dict:
    q = cfg.quantize
    task = load_task(inputs["prepare"], "target")
    calibration = calibration_images(task, q.calibration_images)
    settings = dict(method=q.method, fmt=q.format, per_channel=q.per_channel, reduce_range=q.reduce_range,
                    keep_float=list(q.keep_float))
    fp32 = require(inputs["export"] / "model.onnx", "exported fp32 model", "export")
    threads = torch.get_num_threads()
    produced_by = "post-training quantization"
    split, post_training = decision_split(task), {}
    with atomic_path(out / INT8_FILE) as tmp:
        seconds = quantize(fp32, tmp, calibration, **settings)  # first: it names a file it cannot read
        require_classes(fp32, task["classes"], "export")  # before any scoring against this task's labels
        check_export_of(inputs["prune"] / "model.pt", fp32, task)  # its INT8 file ships as the pruned model's
        judged = check(fp32, tmp, task, threads, split)
        if loss_of(judged) > q.max_drop and q.qat_epochs > 0:
            scored = check(fp32, tmp, task, threads)  # reported beside the fine-tuned model, never used to choose
            post_training = {"post_training": {k: scored[k] for k in ("int8_top1", "top1_agreement",
                                                                        "max_abs_logit_diff")},
                             f"post_training_{split}": judged}
            tuned, trained_ranges = fine_tune(cfg, inputs, task, out / QAT_DIR)
            copy_metadata(fp32, tuned)
            seconds += quantize(tuned, tmp, calibration, **settings, trained_ranges=trained_ranges)
            judged = check(fp32, tmp, task, threads, split)  # against the model it came from
            produced_by = (f"quantization-aware fine-tuning ({q.qat_epochs} epoch{'s' * (q.qat_epochs != 1)}, "
                           f"distilled from the teacher)")
        if loss_of(judged) > q.max_drop:
            raise refuse(judged, q.max_drop, q.qat_epochs if post_training else 0, q.reduce_range, split)
        result = {**check(fp32, tmp, task, threads), **sizes(fp32, tmp)}
    save_json({"method": q.method, "format": q.format, "per_channel": q.per_channel, "reduce_range": q.reduce_range,
               "keep_float": list(q.keep_float),
               "calibration_images": q.calibration_images, "produced_by": produced_by, **result,
               "judged_on": split, split: judged, **post_training},
              out / "quantize.json")
    save_json({"quantize_seconds": round(seconds, 2)}, out / "timing.json")
    announce(quantize_line(result, produced_by))
    return result


def fine_tune(cfg: DictConfig, inputs: dict[str, Path], task: dict, out: Path) -> tuple[Path, list]:
    """The pruned student as deployed (fold.deployable), trained with fake INT8 quantization and
    distilled from the transfer model with prune's optimisation block (prune.teacher is not read:
    the student before pruning is not among this stage's inputs); returns its fp32 ONNX file and the input
    ranges it trained under, which its INT8 file keeps."""
    from transferkit.deploy.export import export_onnx
    from transferkit.deploy.fold import deployable, fold_head_scale
    from transferkit.deploy.qat import TrainedRange, add_fake_quant, float_layers, remove_fake_quant
    from transferkit.distill.module import DistillerModule
    from transferkit.models import load_checkpoint
    from transferkit.stages.distill import distillation, load_teacher
    from transferkit.stages.training import fit_stage

    q = cfg.quantize
    student, _ = load_checkpoint(inputs["prune"] / "model.pt", "prune", task["classes"], what="the pruned student")
    model = deployable(student, for_training=True).train()
    keep = float_layers(model, inputs["export"] / "model.onnx", q.keep_float)  # the layers INT8 leaves in float
    # an unstructured-pruned student ships sparse: its zeroed weights stay zero
    add_fake_quant(model, q.per_channel, q.reduce_range, keep_zeros=cfg.prune.mode == "unstructured", keep=keep)
    settings = OmegaConf.merge(cfg.prune, {"epochs": q.qat_epochs, "lr": q.qat_lr})
    # in fp32 (the fake quantization's arithmetic), in this one process: a few epochs of a small model
    fp32_cfg = OmegaConf.merge(cfg, {"trainer": {"precision": "32-true", "devices": 1, "num_nodes": 1,
                                                 "strategy": "auto", "sync_batchnorm": False}})
    fit = fit_stage(fp32_cfg, settings, model, task, out, module_cls=DistillerModule,
                    **distillation(cfg, load_teacher(inputs["transfer"], task["classes"])))
    tuned = remove_fake_quant(fit.model).eval()  # each layer's input clamped to its trained range
    path = out / "model_fp32.onnx"
    export_onnx(fold_head_scale(tuned), path, int(student.input_size), "auto", None, log=lambda *_: None)
    return path, [(m.low, m.high) for m in tuned.modules() if isinstance(m, TrainedRange)]


def check_export_of(model: Path, fp32: Path, task: dict, n: int = 64) -> None:
    """The INT8 file ships, and the fine-tuning trains, as `model`: an export of another one (`--in export=DIR`, or
    `transferkit export` by hand into the export stage's folder) would be reported under its name and size. An
    export's logits match its model.pt to within export's tolerance, far below 5% of their range; another model's
    differ by whole units."""
    import numpy as np

    from transferkit.deploy.runtime import Classifier
    from transferkit.errors import TransferkitError

    x = calibration_images(task, min(n, len(task["train_y"])))
    a, b = Classifier(model)(x), Classifier(fp32)(x)
    if a.shape != b.shape or np.abs(a - b).max() > 5e-2 * max(1.0, float(np.abs(a).max())):
        raise TransferkitError(f"{fp32} is not the export of {model} (their logits differ on training images), and "
                               f"its INT8 file would ship as that model's. Fix: give --in export= a folder of its "
                               f"export (`transferkit export {model} --out DIR`), or --in prune= the folder of the "
                               f"model exported; in the pipeline, `dvc repro export` exports the pruned model again.")
