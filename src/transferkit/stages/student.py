"""student: the distillation baseline. The student network trained alone on the labels,
with its own block (`student`), which must match the distill stage's budget and recipe: the
only difference is the teacher."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from transferkit.errors import TransferkitError
from transferkit.models import init_from_data, load_backbone, model_from_config
from transferkit.stages.common import container, load_task
from transferkit.stages.training import train_stage


def build_student(cfg: DictConfig, task: dict):
    """Random init (with the architecture's data-dependent init), or the student's own
    pretrained weights when distill.student_init names a checkpoint."""
    n = len(task["classes"])
    if init := cfg.distill.student_init:
        if not Path(init).is_file():
            raise TransferkitError(f"distill.student_init={init!r}: no such file. Fix: point it at a model.pt of "
                                   f"distill.student's architecture (`transferkit pretrain model=NAME` writes one), "
                                   f"or set it to null for random init.")
        return load_backbone(init, container(cfg.distill.student), n, "pretrain", key="distill.student",
                             remake="point distill.student_init at a model.pt of that architecture "
                                    "(`transferkit pretrain model=NAME` writes one)")
    student = model_from_config(container(cfg.distill.student), n, key="distill.student")
    init_from_data(student, task["train_x"])
    return student


def run(cfg: DictConfig, inputs: dict[str, Path], out: Path) -> dict:
    task = load_task(inputs["prepare"], "target")
    return train_stage(cfg, "student", build_student(cfg, task), task, out)
