"""prune: make the distilled student physically smaller and faster (structured channel
pruning), or sparse (unstructured), then recover accuracy with a short fine-tune distilled
from the teacher."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from transferkit.data.tasks import train_sample
from transferkit.distill.module import DistillerModule
from transferkit.models import load_checkpoint
from transferkit.prune.structured import (check_rates, conv_widths, group_regularizer, kept_modules, prunable_widths,
                                          prune_channels, round_rates)
from transferkit.prune.unstructured import make_permanent, prune_weights, sparsity
from transferkit.stages.common import load_task
from transferkit.stages.distill import distillation, load_teacher
from transferkit.stages.training import fit_stage, train_stage
from transferkit.training.classifier import from_rank_zero

log = logging.getLogger(__name__)


def _recover(cfg, model, teacher, task, out, epochs, step):
    """An intermediate recovery round (iterative pruning): KD fine-tune, nothing saved but its Fit."""
    return fit_stage(cfg, cfg.prune, model, task, out / "rounds" / f"round{step}", module_cls=DistillerModule,
                     epochs=epochs, **distillation(cfg, teacher))


def same_on_every_rank(model) -> None:
    """Under DDP, rank 0's weights, BatchNorm statistics and random state in every process: after a fit each holds
    its own statistics and draws, and a cut ranked by them (taylor, random, a global ranking) would give the ranks
    models of other shapes. No-op in one process."""
    rng = torch.get_rng_state()
    from_rank_zero((*model.state_dict().values(), rng))
    torch.set_rng_state(rng)


class SparseDistiller(DistillerModule):
    """Distillation with group-norm regularisation added to the gradients before each step."""

    def __init__(self, *args, regularize, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.regularize = regularize

    def on_before_optimizer_step(self, optimizer) -> None:
        self.regularize()


def run(cfg: DictConfig, inputs: dict[str, Path], out: Path) -> dict:
    p = cfg.prune
    task = load_task(inputs["prepare"], "target")
    student, _ = load_checkpoint(inputs["distill"] / "model.pt", "distill", task["classes"],
                                 what="the distilled student")
    # the recovery learns from distill's teacher, or from the student as it was before pruning
    teacher = load_teacher(inputs["transfer"], task["classes"]) if p.teacher == "transfer" else copy.deepcopy(student)
    keep = list(p.keep)
    kept_modules(student, keep)  # unknown names and a wrong count of rates fail here, before any work
    check_rates(student, list(p.rates))
    info: dict = {"mode": p.mode}
    fits = []  # sparse learning's and the rounds' recoveries, before the final fit
    images, labels = train_sample(task, min(256, len(task["train_y"])))  # taylor ranks by gradients on these
    calibration = (images.float() / 255, labels)
    if p.mode == "structured":
        def cut(model, ratio: float, refuse_empty: bool = True, rates=p.rates, widths=None) -> dict:  # trial, rounds
            return prune_channels(model, criterion=p.criterion, target=p.target, ratio=ratio, keep=keep,
                                  calibration=calibration, round_to=None if widths else p.round_to, scope=p.scope,
                                  rates=rates, refuse_empty=refuse_empty, widths=widths)

        if p.sparse_epochs or p.steps > 1:  # training comes before the last cut: a target it cannot reach fails now
            with torch.random.fork_rng(devices=[]):  # a trial cut of a copy: the run's randomness is untouched
                trial = cut(one_cut := copy.deepcopy(student), p.ratio)
        # rounds of a channel cut (each layer losing a count, not a ranked share) take, layer by layer, their part of
        # the way to the widths one cut leaves (the trial's, rounded to round_to as it was): a round's rounding is
        # then not compounded by the next
        by_layer = p.target == "channels" and p.scope == "layer" and p.steps > 1
        if by_layer:
            original, final = prunable_widths(student, keep), prunable_widths(one_cut, keep)
        if p.sparse_epochs:  # KD fine-tune that empties the channel groups the cut will remove
            fits.append(fit_stage(cfg, cfg.prune, student, task, out / "rounds" / "sparse", module_cls=SparseDistiller,
                      epochs=p.sparse_epochs, **distillation(cfg, teacher),
                      regularize=group_regularizer(student, p.sparse_reg, keep)))
        for step in range(1, p.steps + 1):
            # round k of n has removed k/n of the requested share of the original MACs or channels; its ratio
            # applies to what the earlier rounds left: MACs as measured (each round's search overshoots its goal)
            goal = p.ratio * step / p.steps
            left = (info["macs_after"] / info["macs_before"] if p.target == "macs" and "macs_after" in info
                    else 1 - p.ratio * (step - 1) / p.steps)
            if (ratio := 1 - (1 - goal) / left) > 0:  # else the earlier rounds' overshoot reached this goal
                rates = (round_rates(list(p.rates), p.ratio, step, p.steps) if p.target == "channels" and p.steps > 1
                         and not by_layer else p.rates)  # one cut: as given (its check names the ratio that fits)
                widths = {n: c - (c - final[n]) * step // p.steps for n, c in original.items()} if by_layer else None
                same_on_every_rank(student)  # after the sparse fit or a round's recovery
                result = cut(student, ratio, p.steps == 1, rates, widths)  # rounds: the trial cut checked prune.ratio
                if by_layer:
                    result["round_to"] = trial["round_to"]
                if p.round_to and result["round_to"] is None and (step == 1 or not by_layer):
                    now = "/".join(map(str, conv_widths(one_cut if by_layer else student)))  # rounds: where they end
                    why = ("the student is too narrow to reach the target" if p.steps == 1 or by_layer else  # else:
                           f"round {step} of {p.steps} could not take its share")  # a small share rounded back
                    log.warning("prune.round_to=%s: %s in multiples of %s channels, so it was pruned to any channel "
                                "count (conv widths %s). Fix: set prune.round_to to a smaller multiple%s, or null to "
                                "silence this.", p.round_to, why, p.round_to, now,
                                "" if p.steps == 1 or by_layer else " or fewer prune.steps")
                info.setdefault("macs_before", result["macs_before"])
                info.setdefault("params_before", result["params_before"])
                info.update(macs_after=result["macs_after"], params_after=result["params_after"],
                            round_to=result["round_to"])
            if step < p.steps:
                fits.append(_recover(cfg, student, teacher, task, out, max(1, p.epochs // p.steps), step))
        student.arch["pruned"] = True
        info["macs_reduction"] = info["macs_before"] / info["macs_after"]
        # the search lowers every layer's share together, in whole channels (multiples of round_to), and stops past
        # its goal; the last of several rounds cuts a narrower model: a narrow student's cut can go far past the ratio
        if p.target == "macs" and (removed := 1 - 1 / info["macs_reduction"]) > p.ratio + 0.05:
            fixes = ["set prune.round_to to a smaller multiple, or null (finer channel steps)"] * bool(
                info["round_to"]) + ["fewer prune.steps (the last round cuts a narrower model)"] * (p.steps > 1)
            log.warning("prune.ratio=%s asked for %.0f%% of the MACs removed; in %s%s the cut removed %.0f%%. %s",
                        p.ratio, 100 * p.ratio, f"multiples of prune.round_to={info['round_to']} channels"
                        if info["round_to"] else "whole channels", f" over {p.steps} rounds" * (p.steps > 1),
                        100 * removed, f"Fix: {', or '.join(fixes)}." if fixes else "The search cuts every layer "
                        "at once, a whole channel each: one of its steps removes that much of this student.")
        finalize = None
    else:
        prune_weights(student, p.ratio, keep, criterion=p.criterion, scope=p.scope, calibration=calibration)

        def finalize(model):  # masks become plain zeros in ordinary weight tensors
            make_permanent(model)
            return {"sparsity": sparsity(model, keep)}
    return train_stage(cfg, "prune", student, task, out, module_cls=DistillerModule, **distillation(cfg, teacher),
                       finalize=finalize, extra_metrics=info, earlier_fits=fits)
