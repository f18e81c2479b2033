"""evaluate: every trained target model on the target test set, side by side: accuracy
with intervals, per-class accuracy, confusion matrices, cost; metrics.json and report.md."""

from __future__ import annotations

import csv
from pathlib import Path

import torch
from omegaconf import DictConfig

from transferkit.deploy.runtime import require_classes
from transferkit.evaluation import cost, html, plots, report, speed
from transferkit.evaluation.metrics import (VIEWS, classification_metrics, paired_difference, predict, predict_onnx,
                                            wilson_interval)
from transferkit.evaluation.tables import results_table
from transferkit.io import atomic_path, load_json, save_json, save_text
from transferkit.models import load_checkpoint
from transferkit.progress import progress
from transferkit.stages import TARGET_MODELS
from transferkit.stages.common import load_task, point_dir
from transferkit.training.freeze import start_depth
from transferkit.training.precision import cpu_isa, cpu_model, eval_device, matmul_peaks

# The pruned student as deployed (export's fp32 ONNX file, quantize's INT8 one): name -> the stage that wrote it.
DEPLOYED = {"onnx_fp32": "export", "onnx_int8": "quantize"}


def _write_predictions(path: Path, labels: torch.Tensor, pred: torch.Tensor, classes: list[str]) -> None:
    """actual,predicted rows: what `dvc plots show` draws as a confusion matrix."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["actual", "predicted"])
        w.writerows((classes[a], classes[p]) for a, p in zip(labels.tolist(), pred.tolist()))


def distillation_summary(models: dict, correct: dict) -> dict:
    """How much of the teacher-student gap distillation closes, and what the student saves. The share is
    a ratio of two noisy differences: given only where the gap itself is resolved (its interval excludes 0)."""
    teacher, alone, distilled = (models[k] for k in ("transfer", "student", "distill"))
    gap = paired_difference(correct["transfer"], correct["student"])
    return {
        "gap_recovered": (distilled["top1"] - alone["top1"]) / gap["difference"] if gap["ci95"][0] > 0 else None,
        "teacher_vs_student": gap,
        "distill_vs_student": paired_difference(correct["distill"], correct["student"]),
        "student_params_ratio": distilled["params"] / teacher["params"],
        "student_macs_ratio": distilled["macs"] / teacher["macs"],
    }


def described(model_cfg) -> str:
    """A builder's name with what sizes or starts it: the teacher and the student may share a builder."""
    widths, mult, weights = (model_cfg.get(k) for k in ("widths", "width_mult", "weights"))
    parts = [f"{'/'.join(map(str, widths))} channels" if widths else None, f"width x{mult}" if mult else None,
             f"weights {weights}" if weights else None]
    return f"{model_cfg.name} ({', '.join(p for p in parts if p)})" if any(parts) else str(model_cfg.name)


def freeze_curve(cfg: DictConfig, inputs: dict[str, Path], x: torch.Tensor, y: torch.Tensor, classes: list[str],
                 correct: dict, num_blocks: int) -> list[dict]:
    """Test accuracy at every freeze depth: the transfer stage's own point and freeze_curve's,
    each with its 95% interval, its difference to scratch (paired by image) and its val
    accuracy (the number to choose a depth by: the test set only reports)."""
    ev, t = cfg.evaluate, cfg.transfer
    points = {start_depth(t.freeze_depth, t.backbone_lr_mult, num_blocks): ("transfer", inputs["transfer"])}
    for depth in cfg.freeze_curve.depths:
        points.setdefault(depth, ("freeze_curve", point_dir(inputs["freeze_curve"], depth)))
    rows = []
    for depth, (stage, folder) in progress(sorted(points.items()), "scoring the freeze curve", "depth"):
        if stage == "transfer":
            hits = correct["transfer"]
        else:
            model, _ = load_checkpoint(folder / "model.pt", stage, classes)
            hits = predict(model, x, ev.batch_size, ev.tta, eval_device(str(cfg.trainer.accelerator))).argmax(1) == y
        val = load_json(folder / "metrics.json", stage).get("val_acc")
        n_correct = int(hits.sum())
        rows.append({"freeze_depth": depth, "top1": n_correct / len(y),
                     "top1_ci95": list(wilson_interval(n_correct, len(y))), "val_acc": val,
                     "vs_scratch": paired_difference(hits, correct["scratch"]), "stage": stage})
    return rows


def run(cfg: DictConfig, inputs: dict[str, Path], out: Path) -> dict:
    task = load_task(inputs["prepare"], "target")
    classes, x, y = task["classes"], task["test_x"], task["test_y"]
    ev = cfg.evaluate
    # what the report quotes from the other stages, read before minutes of scoring and timing
    summary = load_json(inputs["prepare"] / "summary.json", "prepare")
    pruned = load_json(inputs["prune"] / "metrics.json", "prune")
    # the precision and device each model trained in; freeze_curve's by depth (none at the depth transfer trained)
    folders = {**{s: inputs[s] for s in ("pretrain", *TARGET_MODELS)},
               **{f"freeze_curve/depth{d}": point_dir(inputs["freeze_curve"], d) for d in cfg.freeze_curve.depths}}
    trained = {name: t for name, folder in folders.items()
               if (t := load_json(folder / "timing.json", name.split("/")[0], optional=True)) is not None}
    # the deployable model's checks (dvc.yaml runs export and quantize first)
    checks = {name: c for name, stage in (("export", "export"), ("quantize", "quantize"))
              if (c := load_json(inputs[stage] / f"{name}.json", stage, optional=True)) is not None}
    # the deployable model as shipped: the pruned student in ONNX, fp32 and INT8, run by ONNX Runtime
    onnx = {name: inputs[stage] / "model.onnx" for name, stage in DEPLOYED.items()
            if (inputs[stage] / "model.onnx").exists()}
    for name, path in onnx.items():
        require_classes(path, classes, DEPLOYED[name])
    torch.manual_seed(cfg.seed)
    models, timing, correct, loaded = {}, {}, {}, {}
    for name in progress(TARGET_MODELS, "scoring models", "model"):
        path = inputs[name] / "model.pt"
        model, _ = load_checkpoint(path, name, classes)
        logits = predict(model, x, ev.batch_size, ev.tta, eval_device(str(cfg.trainer.accelerator)))
        pred = logits.argmax(1)
        correct[name] = pred == y
        m = classification_metrics(logits, y, classes)
        plots.confusion_png(m.pop("confusion"), classes, f"{name}: top-1 {100 * m['top1']:.1f}%",
                            out / f"confusion_{name}.png")
        _write_predictions(out / "predictions" / f"{name}.csv", y, pred, classes)
        m.update(params=cost.count_params(model), macs=cost.count_macs(model),
                 size_bytes=cost.file_size(path))
        models[name] = m
        loaded[name] = model
    # before the minutes of timing: a depth freeze_curve did not train fails here
    curve = freeze_curve(cfg, inputs, x, y, classes, correct, loaded["transfer"].num_blocks)
    before, load = matmul_peaks(), {}  # now: the precision probe's cache is from another hour
    with speed.other_work(load):  # other processes' share of the CPU while these timings ran
        for name, img_s in speed.cpu_throughput(loaded, ev.throughput_batch, ev.throughput_repeats).items():
            timing[name] = {"throughput_img_s": round(img_s, 1)}
        for name, path in onnx.items():
            logits = predict_onnx(path, x, ev.batch_size, ev.tta)
            correct[name] = logits.argmax(1) == y
            m = classification_metrics(logits, y, classes)
            m.pop("confusion")
            # `transferkit predict` runs one view: the deployed files' accuracy as a user gets it
            one_view = logits if ev.tta == "none" else predict_onnx(path, x, ev.batch_size)
            models[name] = {**m, "top1_one_view": float((one_view.argmax(1) == y).float().mean()),
                            "params": models["prune"]["params"], "macs": models["prune"]["macs"],
                            "size_bytes": cost.file_size(path)}
        for name, img_s in speed.onnx_throughput(onnx, ev.throughput_batch, ev.throughput_repeats).items():
            timing[name] = {"throughput_img_s": round(img_s, 1)}
        for name, ms in speed.cpu_latency_ms(loaded, ev.latency_repeats, onnx_files=onnx).items():
            timing[name]["latency_ms_bs1"] = round(ms, 3)
        # one thread too: how a model often runs when deployed beside other work, and where
        # small models are not dominated by the cost of waking up a second thread
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for name, ms in speed.cpu_latency_ms(loaded, ev.latency_repeats, onnx_files=onnx).items():
                timing[name]["latency_ms_bs1_1thread"] = round(ms, 3)
            # the deployed files' throughput too: on a shared VM the second thread's speed varies the most
            for name, img_s in speed.onnx_throughput(onnx, ev.throughput_batch, ev.throughput_repeats).items():
                timing[name]["throughput_img_s_1thread"] = round(img_s, 1)
        finally:
            torch.set_num_threads(threads)
    for name in ("prune", *onnx) if "sparsity" in pruned else ():  # unstructured: params and MACs count the zeros
        models[name]["sparsity"] = pruned["sparsity"]
    metrics = {"models": models,
               "transfer_vs_scratch": paired_difference(correct["transfer"], correct["scratch"]),
               "distillation": distillation_summary(models, correct),
               "freeze_curve": curve}
    save_json(metrics, out / "metrics.json")
    save_json(metrics["freeze_curve"], out / "freeze_curve.json")  # `dvc plots show` draws it
    plots.freeze_curve_png(metrics["freeze_curve"], models, cfg.probe.depth, out / "freeze_curve.png",
                           cfg.transfer.unfreeze_every_epochs)
    # the speed the timings above ran at, before and after them: a shared machine's speed drifts
    timing["machine"] = {"cpu": cpu_model(), "isa": cpu_isa(), "threads": torch.get_num_threads(),
                         "torch": torch.__version__, **{f"{k}_before": v for k, v in before.items()}, **matmul_peaks(),
                         **load}
    timing["throughput_batch"] = ev.throughput_batch
    save_json(timing, out / "timing.json")
    plots.pareto_png(models, timing, out / "pareto.png")
    plots.curves_png({n: inputs[n] / "dvclive" for n in ("pretrain", *TARGET_MODELS)}, out / "curves.png")
    cfg_summary = {
        "experiment": cfg.name, "model": described(cfg.model), "blocks": loaded["transfer"].num_blocks,
        "seed": cfg.seed, "tta": ev.tta, "chance": int(torch.bincount(y).max()) / len(y),
        "tta_views": VIEWS[ev.tta],
        "freeze_depth": cfg.transfer.freeze_depth, "backbone_lr_mult": cfg.transfer.backbone_lr_mult,
        "unfreeze_every_epochs": cfg.transfer.unfreeze_every_epochs,
        "probe_depth": cfg.probe.depth, "distill_method": cfg.distill.method,
        "distill_temperature": cfg.distill.temperature, "student": described(cfg.distill.student),
        "epochs": {s: cfg[s].epochs for s in ("pretrain", "transfer", "scratch", "probe", "distill", "prune")},
        # scratch takes transfer's recipe unless set apart (tuning a baseline is a choice the verdict must show)
        "scratch_differs": [f"scratch.{k}={cfg.scratch[k]} vs transfer.{k}={cfg.transfer[k]}" for k in cfg.scratch
                            if k != "freeze_depth" and k in cfg.transfer and cfg.scratch[k] != cfg.transfer[k]],
        "prune": {k: cfg.prune[k] for k in ("mode", "criterion", "target", "ratio", "steps", "scope", "teacher")},
    }
    if "sparsity" in pruned:  # unstructured
        cfg_summary["prune"]["sparsity"] = pruned["sparsity"]
    cfg_summary.update(training=trained, **checks)
    text = report.render(cfg_summary, metrics, timing, summary)
    save_text(text, out / "report.md")
    save_text(html.to_html(text, out), out / "report.html")
    # the answer at the end of `dvc repro`, as `transferkit results` prints it again later
    print(f"{results_table(metrics, timing, ev.tta)}\nreport.md, report.html and the plots are in evaluate's output "
          f"folder; `transferkit results [FOLDER]` (default artifacts/evaluate) prints this table again.")
    return metrics
