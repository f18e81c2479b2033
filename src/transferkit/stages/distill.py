"""distill: the transferred model (teacher) teaches a much smaller student on the target
task with soft targets (method picked by name: kd, dkd)."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from transferkit.distill.module import DistillerModule
from transferkit.evaluation.cost import count_macs, count_params
from transferkit.models import load_checkpoint
from transferkit.stages.common import load_task
from transferkit.stages.student import build_student
from transferkit.stages.training import train_stage

log = logging.getLogger(__name__)


def load_teacher(transfer_dir: Path, classes: list[str]):
    return load_checkpoint(transfer_dir / "model.pt", "transfer", classes, what="teacher")[0]


def distillation(cfg: DictConfig, teacher, dkd_warmup: int = 0) -> dict:
    """DistillerModule's settings from the distill block: every stage that distils (distill,
    prune's recovery, quantize's fine-tune) learns from `teacher` the same way (the labels' share
    of the loss is smoothed by the label_smoothing of the block each stage trains with). dkd's
    warm-up is the distill stage's alone: the others fine-tune a student that has learned already."""
    d = cfg.distill
    return {"teacher": teacher, "method": d.method,
            "method_kwargs": {"temperature": d.temperature, "alpha": d.alpha, "dkd_alpha": d.dkd_alpha,
                              "dkd_beta": d.dkd_beta, "dkd_warmup": dkd_warmup, "mixup": d.mixup}}


def run(cfg: DictConfig, inputs: dict[str, Path], out: Path) -> dict:
    task = load_task(inputs["prepare"], "target")
    student = build_student(cfg, task)  # first, as the student stage builds it: the same start at one seed
    teacher = load_teacher(inputs["transfer"], task["classes"])
    ratio_params = count_params(student) / count_params(teacher)
    ratio_macs = count_macs(student) / count_macs(teacher)
    if ratio_params >= 1 or ratio_macs >= 1:
        log.warning("the student (%s) is not smaller than its teacher: %.2fx the parameters, %.2fx the "
                    "MACs. Distillation still runs, but the point is usually a smaller model: set "
                    "distill.student to a narrower network.", student.arch["name"], ratio_params, ratio_macs)
    if cfg.distill.method == "dkd" and cfg.distill.dkd_warmup > cfg.distill.epochs:
        log.warning("distill.dkd_warmup=%s is more than distill.epochs=%s: dkd's terms never reach their full "
                    "weight. Set distill.dkd_warmup to at most the epochs (0: full weight from the start).",
                    cfg.distill.dkd_warmup, cfg.distill.epochs)
    return train_stage(cfg, "distill", student, task, out, module_cls=DistillerModule,
                       **distillation(cfg, teacher, cfg.distill.dkd_warmup))
