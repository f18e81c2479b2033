"""report.md: the page a person reads first."""

from __future__ import annotations

from transferkit.evaluation.formats import busy_note, file_size, interval, measured, millions, names, times

# The source material's reference experiment (mini-VGG+BN, CIFAR-10 -> 10 aquatic CIFAR-100
# classes, 400 train / 100 eval per class, conv1-6 frozen, 50 epochs, hours on a CPU).
SOURCE_MATERIAL = {"scratch": 0.574, "transfer": 0.601, "n_test": 1000}

LABELS = {"scratch": "scratch (baseline)", "probe": "linear probe", "transfer": "transfer (fine-tuned)",
          "student": "student alone", "distill": "student distilled", "prune": "student pruned + recovered",
          "onnx_fp32": "pruned, ONNX fp32", "onnx_int8": "pruned, ONNX INT8"}


# the copies prepare found (its summary.json): test scores on training images, a gain pretraining saw
SEEN = {"test_seen_in_training": "test images are also training images",
        "train_seen_in_source": "train images are also source training images",
        "val_seen_in_train": "val images are also train images"}


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def freeze_curve_section(rows: list[dict], models: dict, cfg_summary: dict) -> list[str]:
    """How many blocks to freeze: one row per depth, the best on val marked."""
    if len(rows) < 2:
        return []
    with_val = [r for r in rows if r.get("val_acc") is not None]
    best = max(with_val, key=lambda r: r["val_acc"]) if with_val else None
    tied = [str(r["freeze_depth"]) for r in with_val if r is not best and r["val_acc"] == best["val_acc"]]
    mark = f" (best on val{', tied with ' + ', '.join(tied) if tied else ''})"  # ties go to the shallowest depth
    every = cfg_summary.get("unfreeze_every_epochs")  # gradual unfreezing: a depth is where each run starts
    how = f"frozen at the start, one more unfrozen every {every} epochs" if every else "frozen, the rest fine-tuned"
    lines = ["## How many blocks to freeze?", "",
             f"The transfer recipe at each freeze depth (blocks[:k] {how}), same seed and budget; the `transfer` "
             f"stage's own depth is {cfg_summary['freeze_depth']}. Choose by val: the test set only reports.", "",
             f"| blocks frozen{' at the start' * bool(every)} | val top-1 | test top-1 | 95% interval | minus scratch "
             "(95% paired interval) |", "|---|---|---|---|---|"]
    for r in rows:
        d = r["vs_scratch"]
        val = "–" if r.get("val_acc") is None else _pct(r["val_acc"])
        lines.append(f"| {r['freeze_depth']}{mark if r is best else ''} | {val} | **{_pct(r['top1'])}** | "
                     f"{_pct(r['top1_ci95'][0])} – {_pct(r['top1_ci95'][1])} | {100 * d['difference']:+.1f} "
                     f"({interval(*d['ci95'])}) |")
    refs = [f"{LABELS[k]} {_pct(models[k]['top1'])}" for k in ("scratch", "probe") if k in models]
    lines += ["", f"Reference lines: {', '.join(refs)}. One seed: the sweep commands under Reproduce "
              "give mean ± std over seeds.", "", "![accuracy vs freeze depth](freeze_curve.png)", ""]
    return lines


def deployed_one_view(models: dict, pct) -> list[str]:
    """The deployed files' top-1 with one view of each image, as `transferkit predict` runs them."""
    return [f"{pct(models[k]['top1_one_view'])} ({LABELS[k]})" for k in ("onnx_fp32", "onnx_int8")
            if "top1_one_view" in models.get(k, {})]


def one_view_note(tta: str, views: int, models: dict) -> list[str]:
    """What the top-1 column costs, and the deployed files' accuracy as `transferkit predict` gets it."""
    if tta == "none":
        return ["Top-1, MACs, latency and throughput are each of one forward pass per image."]
    deployed = deployed_one_view(models, _pct)
    return [f"Top-1 averages each test image's {views} views (`evaluate.tta: {tta}`), {views} forward "
            "passes; MACs, latency and throughput are one pass's."
            + (f" `transferkit predict` runs one view: there the deployed files score {' and '.join(deployed)}."
               if deployed else "")]


def export_section(export: dict) -> list[str]:
    """The deployable model as the export stage checked it (its export.json)."""
    lat = export["latency_ms_batch1"]
    return [
        "## The model to ship", "",
        f"`{export['model']}` exported by the `export` stage to ONNX (opset {export['exporter']['opset']}) and "
        f"TorchScript, then checked against PyTorch in fp32 on the {export['n_checked']} test images:", "",
        "| runtime | max abs logit difference vs PyTorch | top-1 agreement | CPU latency (batch 1, export's timing) |",
        "|---|---|---|---|",
        f"| PyTorch (eager; BatchNorm not folded, as the exports fold it) | – | – | {lat['pytorch']:.2f} ms |",
        *[f"| {name} | {export[fmt]['max_abs_diff']:.1e} | {100 * export[fmt]['top1_agreement']:.2f}% | "
          f"{lat[runtime]:.2f} ms |"
          for name, fmt, runtime in (("ONNX Runtime", "onnx", "onnxruntime"),  # export.json: checks by format,
                                     ("TorchScript", "torchscript", "torchscript"))  # latencies by runtime
          if fmt in export and runtime in lat],
        "", "Classify image files with it: `uv run transferkit predict artifacts/export/model.onnx IMAGE ...`.",
        ""]


def prune_section(pc: dict, models: dict, timing: dict) -> list[str]:
    """The pruned student beside the distilled one it was cut from."""
    (before, tb), (after, ta) = ((models[k], timing.get(k, {})) for k in ("distill", "prune"))
    how = (f"unstructured: single weights zeroed, criterion `{pc['criterion']}`, scope {pc.get('scope')}, "
           f"sparsity {100 * pc['sparsity']:.1f}% of the prunable weights" if pc["mode"] == "unstructured" else
           f"{pc['mode']}, criterion `{pc['criterion']}`, asked to remove {pc['ratio']:.0%} of the "
           f"{pc['target'].replace('macs', 'MACs')}: {1 - after['macs'] / before['macs']:.0%} of the MACs removed, "
           f"{pc['steps']} step(s)")
    lines = [
        "## Pruning", "",
        f"The distilled student, pruned ({how}) and recovered by a short fine-tune distilled from "
        f"{'the student before pruning' if pc.get('teacher') == 'student' else 'the teacher'}.", "",
        "| | top-1 | params | MACs | file | CPU latency (batch 1) | CPU throughput |",
        "|---|---|---|---|---|---|---|"]
    for label, m, t in (("before (distilled)", before, tb), ("after (pruned + recovered)", after, ta)):
        lines.append(f"| {label} | {_pct(m['top1'])} | {millions(m['params'], 3)} | {millions(m['macs'], 1)} | "
                     f"{file_size(m['size_bytes'])} | {measured(t, 'latency_ms_bs1', '.2f', ' ms')} | "
                     f"{measured(t, 'throughput_img_s', '.0f', ' img/s')} |")
    lat = tb.get("latency_ms_bs1", float("nan")) / ta.get("latency_ms_bs1", float("nan"))
    lat1 = tb.get("latency_ms_bs1_1thread", float("nan")) / ta.get("latency_ms_bs1_1thread", float("nan"))
    effect = (f"measured batch-1 latency {times(lat, 'lower', 'higher')} ({times(lat1, 'lower', 'higher')} "
              f"on one thread), top-1 {100 * (after['top1'] - before['top1']):+.1f} points.")
    cost = ("Zeroed weights keep their tensors' shapes, so MACs do not fall and dense kernels run no "
            f"faster; {effect}" if pc["mode"] == "unstructured" else
            f"MACs {before['macs'] / after['macs']:.2f}x fewer, {effect} MACs ratios overstate wall-clock "
            "gains on small models (fixed per-layer overheads); both are shown.")
    return lines + ["", cost, "", "![accuracy vs latency](pareto.png)", ""]


def distillation_section(dist: dict, models: dict, timing: dict, cfg_summary: dict) -> list[str]:
    """The distilled student beside the student alone and its teacher."""
    t, st = (timing.get(k, {}).get("latency_ms_bs1") for k in ("transfer", "distill"))
    d = dist["distill_vs_student"]
    rec, gap = dist["gap_recovered"], dist["teacher_vs_student"]
    return [
        "## Distillation", "",
        f"Teacher: the transfer model. Student: `{cfg_summary['student']}`, "
        f"{dist['student_params_ratio']:.2f}x the teacher's parameters and "
        f"{dist['student_macs_ratio']:.2f}x its MACs; method `{cfg_summary['distill_method']}`, "
        f"T={cfg_summary['distill_temperature']}. The student alone is the same network and budget "
        "without the teacher.", "",
        "| | top-1 | CPU latency (batch 1) | same, 1 thread |", "|---|---|---|---|",
        *[f"| {label} | {_pct(models[k]['top1'])} | {measured(timing.get(k, {}), 'latency_ms_bs1', '.2f', ' ms')}"
          f" | {measured(timing.get(k, {}), 'latency_ms_bs1_1thread', '.2f', ' ms')} |"
          for label, k in (("teacher (transfer)", "transfer"), ("student alone", "student"),
                           ("student distilled", "distill"))], "",
        f"Distilled minus alone: **{100 * d['difference']:+.1f} points** (95% paired interval "
        f"{interval(*d['ci95'])}); " + (
            f"that is {100 * rec:.0f}% of the gap between the student alone and the teacher "
            f"({100 * gap['difference']:+.1f} points, {interval(*gap['ci95'])})" if rec is not None else
            f"the student alone beats the teacher, by {-100 * gap['difference']:.1f} points "
            f"({interval(-gap['ci95'][1], -gap['ci95'][0])}), so there is no gap to close" if gap["ci95"][1] < 0 else
            f"the gap between the student alone and the teacher ({100 * gap['difference']:+.1f} points, "
            f"{interval(*gap['ci95'])}) is not resolved on these test images, so no share of it is given")
        + (f"; the distilled student runs {times(t / st, 'faster', 'slower', 1)} than the teacher at batch 1"
           if t and st else "") + ".", ""]


def _judged(q: dict, key: str) -> str:
    """Where the stage judged the INT8 model's loss against fp32 (val images; never the test images)."""
    if not (j := q.get(key)):
        return ""
    split = q["judged_on"]
    return f"on the {j[f'n_{split}']:,} {split} images ({_pct(j['int8_top1'])} top-1, fp32 {_pct(j['fp32_top1'])})"


def quantize_section(q: dict, models: dict, timing: dict) -> list[str]:
    """The INT8 model beside the fp32 ONNX model and the PyTorch model it came from."""
    rows = [(LABELS[k], k) for k in ("prune", "onnx_fp32", "onnx_int8") if k in models]
    fp32, int8 = timing.get("onnx_fp32", {}), timing.get("onnx_int8", {})

    def speedup(key: str) -> float:  # INT8 over fp32 ONNX; nan where either was not timed
        return int8.get(key, float("nan")) / fp32.get(key, float("nan"))

    split = q.get("judged_on", "")
    return [
        "## INT8", "",
        f"The fp32 ONNX model quantized by {q['produced_by']} (ONNX Runtime, {q['format']} format, per-channel "
        f"weights: {q['per_channel']}, 7-bit weights: {q.get('reduce_range', False)}), activation ranges "
        f"calibrated ({q['method']}) on {q['calibration_images']} "
        f"training images{f', and its loss judged {_judged(q, split)}' if _judged(q, split) else ''}. On the "
        f"{q['n_test']:,} test images, one view each, it agrees with fp32 on {100 * q['top1_agreement']:.2f}% "
        f"(largest logit difference {q['max_abs_logit_diff']:.3g})."
        + (f" Post-training quantization alone lost more than quantize.max_drop allows "
           f"{_judged(q, f'post_training_{split}')}, and reached {_pct(q['post_training']['int8_top1'])} top-1 "
           f"on the test images (fp32: {_pct(q['fp32_top1'])})." if "post_training" in q else ""), "",
        "| model | top-1 | file | CPU latency (batch 1) | same, 1 thread | CPU throughput | same, 1 thread |",
        "|---|---|---|---|---|---|---|",
        *[f"| {label} | {_pct(models[k]['top1'])} | {file_size(models[k]['size_bytes'])} | "
          f"{measured(timing.get(k, {}), 'latency_ms_bs1', '.2f', ' ms')} | "
          f"{measured(timing.get(k, {}), 'latency_ms_bs1_1thread', '.2f', ' ms')} | "
          f"{measured(timing.get(k, {}), 'throughput_img_s', '.0f', ' img/s')} | "
          f"{measured(timing.get(k, {}), 'throughput_img_s_1thread', '.0f', ' img/s')} |" for label, k in rows], "",
        f"INT8 against fp32 ONNX: the file {times(q['size_ratio'], 'smaller', 'larger')}, the throughput "
        f"{times(speedup('throughput_img_s'), 'higher', 'lower')} (on 1 thread "
        f"{times(speedup('throughput_img_s_1thread'), 'higher', 'lower')}), the batch-1 latency "
        f"{times(1 / speedup('latency_ms_bs1'), 'shorter', 'longer')}. "
        "Classify image files with it: `uv run transferkit predict artifacts/quantize/model.onnx IMAGE ...`.", ""]


def render(cfg_summary: dict, metrics: dict, timing: dict, data_summary: dict) -> str:
    models = metrics["models"]
    lines = [f"# transferkit report: {names([cfg_summary['experiment']])}", "", "## What was run", ""]
    epochs, every = cfg_summary["epochs"], cfg_summary.get("unfreeze_every_epochs")
    unfreezing = f", unfreeze_every_epochs={every}" if every else ""
    recovery = f", prune recovery {epochs['prune']}" if "prune" in epochs else ""
    src, tgt = data_summary["source"], data_summary["target"]
    from transferkit.training.precision import trained_in  # here: it imports torch, which the results table needs not
    trained = "; ".join(f"{stage} {trained_in(t)}" for stage, t in cfg_summary.get("training", {}).items()
                        if t.get("precision"))
    lines += [
        f"- source task: {names([src['dataset']])} {names(src['classes'])} "
        f"({src['n_train']} train, {src['n_val']} val images)",
        f"- target task: {names([tgt['dataset']])} {names(tgt['classes'])} "
        f"({tgt['n_train']} train, {tgt['n_val']} val, **{tgt['n_test']} test** images)" + "".join(
            f"; **{tgt[k]} {what}** (pixel for pixel, as prepare warned)" for k, what in SEEN.items() if tgt.get(k)),
        f"- model: `{cfg_summary['model']}`; transfer: freeze_depth={cfg_summary['freeze_depth']}, backbone_lr_mult="
        f"{cfg_summary['backbone_lr_mult']}{unfreezing}; probe depth={cfg_summary['probe_depth'] or 'all'}",
        f"- budgets (epochs): pretrain {epochs['pretrain']}, transfer {epochs['transfer']}, scratch "
        f"{epochs['scratch']}, probe {epochs['probe']}, distill and student alone {epochs['distill']}{recovery}; "
        f"seed {cfg_summary['seed']}; test-time augmentation: {cfg_summary['tta']}",
        *([f"- trained in: {trained}"] if trained else []),  # none where no stage's timing.json names its precision
        "",
        "## Results on the target test set", "",
        "| model | top-1 | 95% interval | params | MACs | file | CPU latency (batch 1) | same, 1 thread "
        "| CPU throughput |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in models.items():
        t = timing.get(name, {})
        lines.append(
            f"| {LABELS.get(name, name)} | **{_pct(m['top1'])}** | {_pct(m['top1_ci95'][0])} – "
            f"{_pct(m['top1_ci95'][1])} | {millions(m['params'], 2)} | {millions(m['macs'], 1)} | "
            f"{file_size(m['size_bytes'])} | {measured(t, 'latency_ms_bs1', '.2f', ' ms')} | "
            f"{measured(t, 'latency_ms_bs1_1thread', '.2f', ' ms')} | "
            f"{measured(t, 'throughput_img_s', '.0f', ' img/s')} |")
    lines += ["", *one_view_note(cfg_summary["tta"], cfg_summary["tta_views"], models), ""]
    lines += [line for note in busy_note(timing) for line in (note, "")]
    classes = len(next(iter(models.values()))["per_class"])
    # what always naming the most common test class scores: 1/classes on a balanced test set
    chance = cfg_summary.get("chance", 1 / classes)
    if guessing := [LABELS.get(n, n) for n, m in models.items() if m["top1_ci95"][0] <= chance]:
        why = (f"one class in {classes}" if round(chance * classes, 9) == 1 else
               "what always naming the test set's most common class scores")
        lines += [f"Not shown better than guessing: {'; '.join(guessing)} (the 95% interval reaches "
                  f"{_pct(chance)}, {why}). Fix: more epochs or training images.", ""]
    if gain := metrics.get("transfer_vs_scratch"):
        lo, hi = gain["ci95"]
        verdict = ("transfer is better than scratch (the interval excludes 0)" if lo > 0 else
                   "scratch is better than transfer (the interval excludes 0)" if hi < 0 else
                   "the difference is within noise (the interval includes 0)")
        sm = SOURCE_MATERIAL
        sm_half = 1.96 * ((sm["scratch"] * (1 - sm["scratch"]) + sm["transfer"] * (1 - sm["transfer"]))
                          / sm["n_test"]) ** 0.5
        lines += [
            "## Does transfer pay?", "",
            f"Transfer minus scratch: **{100 * gain['difference']:+.1f} points** "
            f"(95% paired interval {interval(lo, hi)}, {gain['n']} test images; one seed, so the test set's "
            f"noise and not training's): {verdict}."
            + (f" Scratch trained unlike transfer ({', '.join(cfg_summary['scratch_differs'])}), so the difference "
               f"measures these settings too, not the pretrained start alone."
               if cfg_summary.get("scratch_differs") else ""),
            "",
            "| | scratch | transfer | gain |", "|---|---|---|---|",
            f"| this run | {_pct(models['scratch']['top1'])} | {_pct(models['transfer']['top1'])} | "
            f"{100 * gain['difference']:+.1f} points |",
            f"| source material (mini-VGG, CIFAR-10 -> aquatic CIFAR-100, hours on a CPU) | "
            f"{_pct(sm['scratch'])} | {_pct(sm['transfer'])} | "
            f"{100 * (sm['transfer'] - sm['scratch']):+.1f} points (about ±{100 * sm_half:.1f} on "
            f"{sm['n_test']} images, unpaired) |",
            "",
        ]
    lines += freeze_curve_section(metrics.get("freeze_curve") or [], models, cfg_summary)
    if dist := metrics.get("distillation"):
        lines += distillation_section(dist, models, timing, cfg_summary)
    if "prune" in models and "distill" in models:
        lines += prune_section(cfg_summary["prune"], models, timing)
    if cfg_summary.get("export"):
        lines += export_section(cfg_summary["export"])
    if cfg_summary.get("quantize"):
        lines += quantize_section(cfg_summary["quantize"], models, timing)
    lines += ["## Per-class accuracy", "", "| class | " + " | ".join(LABELS.get(n, n) for n in models) + " |",
              "|---|" + "---|" * len(models)]
    for c in next(iter(models.values()))["per_class"]:
        lines.append(f"| {names([c])} | " + " | ".join(_pct(m["per_class"][c]) for m in models.values()) + " |")
    lines += ["", "## Plots", "", "Training curves (validation accuracy, training loss):", "",
              "![curves](curves.png)", ""]
    for name in models:
        if not name.startswith("onnx_"):  # the ONNX models are the pruned one's: its matrix is theirs
            lines += [f"![confusion matrix: {name}](confusion_{name}.png)", ""]
    return "\n".join(lines + reproduce_section(cfg_summary["experiment"], cfg_summary["blocks"]))


def reproduce_section(experiment: str, blocks: int) -> list[str]:
    """The commands that made the report, and those for more runs: a sweep over every freeze depth the model has."""
    return [
        "## Reproduce", "",
        "```",
        "uv sync --compile-bytecode && uv run dvc repro   # this whole pipeline; reruns only what changed",
        "uv run dvc metrics show          # the numbers above, less their intervals (lists, which DVC skips)",
        "uv run dvc plots show            # curves and confusion matrices (HTML)",
        # sweeps compose as params.yaml does (its overrides kept) and go to sweeps/<name>-<stage>
        f"uv run transferkit sweep transfer transfer.freeze_depth={','.join(map(str, range(blocks + 1)))} "
        "seed=0,1,2   # how many blocks to freeze",
        "uv run transferkit sweep scratch seed=0,1,2 && uv run transferkit sweep probe seed=0,1,2",
        "uv run transferkit collect " + " ".join(f"sweeps/{experiment}-{s}" for s in ("transfer", "scratch", "probe"))
        + "   # -> accuracy vs freeze depth over seeds, minus scratch",
        "uv run transferkit check-repro   # the smoke pipeline twice: identical metrics, clean dvc status",
        "```", "",
        "Latency and throughput are measured on the machine that ran `evaluate` (timing.json), those of the model "
        "to ship by `export` (export.json); every other number is in metrics.json and is identical from run to run.",
        ""]
