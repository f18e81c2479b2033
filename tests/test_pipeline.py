"""Every stage and every experiment preset, for real, on tiny data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import CIFAR10_CLASSES, TINY, compose, run, run_all, write_cifar_pickles, write_image_folder
from transferkit.errors import TransferkitError
from transferkit.models import load_checkpoint

AQUATIC = ["beaver", "dolphin", "otter", "seal", "whale", "aquarium_fish", "flatfish", "ray", "shark", "trout"]


def _metrics(cfg) -> str:
    from pathlib import Path

    return (Path(cfg.paths.artifacts_dir) / "evaluate" / "metrics.json").read_text()


def test_smoke_pipeline_produces_every_output(smoke_artifacts):
    cfg, results = smoke_artifacts
    art = __import__("pathlib").Path(cfg.paths.artifacts_dir)
    for stage in ("pretrain", "transfer", "probe", "scratch", "student", "distill", "prune"):
        assert (art / stage / "model.pt").exists()
        assert (art / stage / "dvclive" / "plots" / "metrics" / "train" / "loss.tsv").exists()
        assert 0.0 <= results[stage]["val_acc"] <= 1.0
    metrics = json.loads((art / "evaluate" / "metrics.json").read_text())
    assert set(metrics["models"]) == {"scratch", "probe", "transfer", "student", "distill", "prune",
                                      "onnx_fp32", "onnx_int8"}  # the pruned student as deployed, fp32 and INT8
    for m in metrics["models"].values():
        lo, hi = m["top1_ci95"]
        assert lo <= m["top1"] <= hi and m["n_test"] == 3 * 16
        assert m["params"] > 0 and m["macs"] > 0 and m["size_bytes"] > 0
        assert set(m["per_class"]) == {"tgt_a", "tgt_b", "tgt_c"}
    timing = json.loads((art / "evaluate" / "timing.json").read_text())
    assert all(timing[n]["latency_ms_bs1"] > 0 and timing[n]["throughput_img_s"] > 0 for n in metrics["models"])
    machine = timing["machine"]  # what the timings ran on: the CPU, its matmul peaks before and after them
    assert machine["cpu"] and machine["fp32_gflops_before"] > 0 and machine["bf16_gflops"] > 0
    report = (art / "evaluate" / "report.md").read_text()
    trained = next(x for x in report.splitlines() if x.startswith("- trained in: "))
    # every training stage's precision, freeze_curve's points by depth too (walk R88)
    assert all(f"{s} 32-true on cpu" in trained or f"{s} bf16-mixed on cpu" in trained
               for s in ("pretrain", "transfer", "probe", "prune", "freeze_curve/depth0")), trained
    assert machine["other_cores"] >= 0  # the other processes' share of the CPU then, warned of where it slows them
    assert ("other processes kept" in report) == (machine["other_cores"] >= 0.25)
    assert "57.4%" in report and "60.1%" in report and "Transfer minus scratch" in report
    # the run's own numbers, each in its place (scratch before transfer, the paired gain after)
    m, gain = metrics["models"], metrics["transfer_vs_scratch"]
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    assert (f"| this run | {pct(m['scratch']['top1'])} | {pct(m['transfer']['top1'])} | "
            f"{100 * gain['difference']:+.1f} points |") in report
    assert f"Transfer minus scratch: **{100 * gain['difference']:+.1f} points** (95% paired interval " \
           f"{100 * gain['ci95'][0]:+.1f} to {100 * gain['ci95'][1]:+.1f}, {gain['n']} test images; one seed" in report
    assert gain["difference"] == pytest.approx(m["transfer"]["top1"] - m["scratch"]["top1"])
    share = metrics["distillation"]["gap_recovered"]  # given only where the teacher-student gap is resolved
    assert "## Distillation" in report and ("is not resolved" if share is None else f"{100 * share:.0f}% of the gap") \
        in report
    # what the accuracy column costs, and the deployed files' accuracy with the one view `predict` runs
    assert "Top-1 averages each test image's 2 views (`evaluate.tta: flip`), 2 forward passes" in report
    assert f"there the deployed files score {pct(m['onnx_fp32']['top1_one_view'])} (pruned, ONNX fp32)" in report
    assert f"| student distilled | {pct(m['distill']['top1'])} |" in report
    assert "Scratch trained unlike transfer" not in report  # the smoke preset's scratch takes transfer's recipe
    # teacher and student share a builder (fastnet): the report tells them apart by their widths
    assert "- model: `fastnet (8/16/16 channels)`" in report and "Student: `fastnet (4/8/8 channels)`" in report
    assert 0 < metrics["distillation"]["student_params_ratio"] < 1
    assert "## Pruning" in report
    # its commands for more runs are DVC sweeps, composed as params.yaml is, into sweeps/<name>-<stage>
    assert "transferkit sweep transfer transfer.freeze_depth=0,1,2,3,4 seed=0,1,2" in report
    assert "transferkit collect sweeps/smoke-transfer sweeps/smoke-scratch sweeps/smoke-probe" in report
    # the smoke models' sizes as counts (a student of a few thousand parameters is not "0.00 M")
    assert f"| {m['prune']['params']:,} | {m['prune']['macs']:,} |" in report and "| 0.00 M |" not in report
    html = (art / "evaluate" / "report.html").read_text()  # the same report, plots embedded
    assert "<table>" in html and "Transfer minus scratch" in html and "data:image/png;base64," in html
    assert metrics["models"]["prune"]["macs"] <= (1 - 0.7) * metrics["models"]["distill"]["macs"]
    for png in ("curves.png", "confusion_transfer.png", "confusion_scratch.png", "confusion_probe.png",
                "confusion_student.png", "confusion_distill.png", "confusion_prune.png", "pareto.png"):
        assert (art / "evaluate" / png).read_bytes()[:4] == b"\x89PNG"
    rows = (art / "evaluate" / "predictions" / "transfer.csv").read_text().splitlines()
    assert rows[0] == "actual,predicted" and len(rows) == 1 + 48


def test_every_plot_the_report_shows_is_a_file_evaluate_wrote(smoke_artifacts):
    """report.md shows its plots by file name, each one in evaluate's folder (the deployed ONNX models have no
    confusion matrix of their own: the pruned model's is theirs), and report.html embeds every one of them."""
    import re

    cfg, _ = smoke_artifacts
    out = Path(cfg.paths.artifacts_dir) / "evaluate"
    shown = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", (out / "report.md").read_text())
    assert "confusion_prune.png" in shown and not [name for name in shown if not (out / name).is_file()]
    sources = re.findall(r'<img [^>]*src="([^"]*)"', (out / "report.html").read_text())
    assert len(sources) == len(shown) and all(src.startswith("data:image/png;base64,") for src in sources)


def test_evaluate_scores_with_evaluate_tta_and_the_deployed_files_one_view_with_one_view(smoke_artifacts):
    """Every top-1 evaluate reports is over the test-time views of evaluate.tta (smoke: flip), worked here again
    from the saved models and files; the deployed files' top1_one_view is over one view, as `transferkit
    predict` runs them. On this test set the views change some model's top-1, so the check can tell."""
    from transferkit.evaluation.metrics import predict, predict_onnx
    from transferkit.stages import TARGET_MODELS
    from transferkit.stages.common import load_task
    from transferkit.stages.evaluate import DEPLOYED

    cfg, _ = smoke_artifacts
    art, ev = Path(cfg.paths.artifacts_dir), cfg.evaluate
    assert ev.tta != "none"
    models = json.loads((art / "evaluate" / "metrics.json").read_text())["models"]
    task = load_task(art / "prepare", "target")
    x, y = task["test_x"], task["test_y"]
    top1 = lambda logits: float((logits.argmax(1) == y).float().mean())  # noqa: E731
    views_matter = []
    for name in TARGET_MODELS:
        model, _ = load_checkpoint(art / name / "model.pt", name)
        with_views, one = (top1(predict(model, x, ev.batch_size, tta)) for tta in (ev.tta, "none"))
        assert models[name]["top1"] == pytest.approx(with_views), name
        views_matter.append(with_views != one)
    for name, stage in DEPLOYED.items():
        path = art / stage / "model.onnx"
        with_views, one = (top1(predict_onnx(path, x, ev.batch_size, tta)) for tta in (ev.tta, "none"))
        assert models[name]["top1"] == pytest.approx(with_views), name
        assert models[name]["top1_one_view"] == pytest.approx(one), name
        views_matter.append(with_views != one)
    assert any(views_matter)


def test_smoke_learns_something(smoke_artifacts):
    # synthetic classes are easy: a model that learned nothing would sit at 1/3
    cfg, results = smoke_artifacts
    assert results["evaluate"]["models"]["scratch"]["top1"] > 0.5


def test_pretrain_scores_the_model_it_saved_on_the_source_tasks_test_split(smoke_artifacts):
    """pretrain's metrics.json holds the source task's test accuracy of the backbone it saved (the scenarios
    table quotes it as how well the source task was learned); the target stages score val alone."""
    from transferkit.stages.common import load_task

    cfg, results = smoke_artifacts
    artifacts = Path(cfg.paths.artifacts_dir)
    source = load_task(artifacts / "prepare", "source")
    model, _ = load_checkpoint(artifacts / "pretrain" / "model.pt", "pretrain")
    with torch.no_grad():
        hits = model.eval()(source["test_x"].float() / 255).argmax(1) == source["test_y"]
    saved = json.loads((artifacts / "pretrain" / "metrics.json").read_text())
    assert saved == results["pretrain"]
    assert saved["test_acc"] == pytest.approx(float(hits.float().mean()), abs=1.5 / len(hits))  # float rounding
    assert "test_acc" not in results["transfer"] and "val_acc" in results["transfer"]


def test_a_target_task_without_val_images_trains_and_records_no_val_score(tmp_path, capsys, caplog):
    """data.target.val_per_class=0: a training stage fits on the train split, saves its model, and its
    metrics.json holds no val accuracy (nothing was scored), as its closing line says."""
    cfg = compose("experiment=smoke", "data.target.val_per_class=0", "scratch.epochs=1", tmp=tmp_path)
    caplog.set_level("INFO", logger="transferkit")
    run("prepare", cfg)
    metrics = run("scratch", cfg)
    assert metrics == {} == json.loads((tmp_path / "artifacts" / "scratch" / "metrics.json").read_text())
    assert (tmp_path / "artifacts" / "scratch" / "model.pt").is_file()
    shown = capsys.readouterr().out + caplog.text  # printed, or logged where a Hydra app (pytest too) has handlers
    assert "scratch: top-1 not scored (no val split)" in shown, shown


def test_same_config_gives_identical_metrics(smoke_artifacts, tmp_path):
    cfg, _ = smoke_artifacts
    again = compose("experiment=smoke", tmp=tmp_path)
    run_all(again)
    assert _metrics(again) == _metrics(cfg)


def test_cifar10_split_preset_on_a_tiny_image_archive(tmp_path):
    # the default experiment's real code path: the image-folder archive in data/
    write_image_folder(tmp_path / "data", CIFAR10_CLASSES, train_per_class=12, test_per_class=4)
    cfg = compose("experiment=cifar10_split", *TINY, "model.widths=[8,16,16]", "model.stem_width=8",
                  "data.target.train_per_class=8", "data.target.val_per_class=2", tmp=tmp_path)
    results = run_all(cfg)
    summary = results["prepare"]
    assert summary["source"]["n_train"] == 5 * 12 and summary["target"]["n_test"] == 5 * 4
    assert summary["target"]["classes"] == ["cat", "deer", "dog", "frog", "horse"]
    assert results["evaluate"]["models"]["transfer"]["n_test"] == 20


def _official_pickles(tmp_path):
    """CIFAR-100 is not available offline: the official formats, written small (the aquatic classes among others)."""
    write_cifar_pickles(tmp_path / "data", "cifar10", CIFAR10_CLASSES, train_per_class=6, test_per_class=2)
    write_cifar_pickles(tmp_path / "data", "cifar100", [f"other{i}" for i in range(5)] + AQUATIC,
                        train_per_class=8, test_per_class=3)


def test_cifar10_full_preset_on_tiny_official_pickles(tmp_path):
    # all of CIFAR-10 as the source, airbench's recipe: whitened stem kept frozen, lookahead,
    # alternating flips, multi-view test-time augmentation
    _official_pickles(tmp_path)
    cfg = compose("experiment=cifar10_full", *TINY, "data.verify_checksums=false", "data.target.train_per_class=5",
                  "data.target.val_per_class=2", "model.widths=[8,16,16]", "model.stem_width=8", "pretrain.epochs=2",
                  tmp=tmp_path)  # 2 epochs: enough steps for lookahead to average (at step 5)
    assert cfg.model.dirac_init and cfg.pretrain.lookahead and cfg.pretrain.tta == "flip_translate"
    results = run_all(cfg)  # every stage: scratch and freeze_curve with its dirac init, evaluate with its six views
    assert results["prepare"]["source"]["n_train"] == 10 * 6 and results["prepare"]["target"]["classes"] == AQUATIC
    assert 0.0 <= results["pretrain"]["test_acc_tta"] <= 1.0
    assert "test-time augmentation: flip_translate" in (tmp_path / "artifacts" / "evaluate" / "report.md").read_text()
    _, ckpt = load_checkpoint(tmp_path / "artifacts" / "pretrain" / "model.pt", "pretrain")
    assert ckpt["arch"]["dirac_init"] is True
    # pretrain.freeze_depth=1: the stem whitened from the source images is the stem that was saved
    from transferkit.config.compose import to_params
    from transferkit.models import init_from_data, model_from_config
    from transferkit.stages.common import load_task

    source = load_task(tmp_path / "artifacts" / "prepare", "source")
    fresh = model_from_config(to_params(cfg.model), len(source["classes"]))
    init_from_data(fresh, source["train_x"])
    assert cfg.pretrain.freeze_depth == 1
    assert torch.equal(fresh.blocks[0][0].weight, ckpt["state_dict"]["blocks.0.0.weight"])


def test_seed_aquatic_preset_on_tiny_official_pickles(tmp_path):
    _official_pickles(tmp_path)
    cfg = compose("experiment=seed_aquatic", *TINY, "data.verify_checksums=false",
                  "data.target.train_per_class=5", "data.target.val_per_class=2",
                  "model.widths=[8,8,8,8,8,8,8,8,8]", "model.fc_width=16", tmp=tmp_path)
    results = run_all(cfg)
    assert results["prepare"]["target"]["classes"] == AQUATIC
    assert results["prepare"]["target"]["n_test"] == 30
    model, ckpt = load_checkpoint(tmp_path / "artifacts" / "transfer" / "model.pt", "transfer")
    assert ckpt["arch"]["name"] == "vgg_mini" and model.num_blocks == 11


@pytest.mark.parametrize("model", ["fastnet", "fastnet_tiny", "vgg_mini", "resnet18", "mobilenet"])
def test_every_model_runs_transfer(tmp_path, model):
    import torch

    extra = {"fastnet": ["model.widths=[8,16,16]"], "vgg_mini": ["model.widths=[8,8,8,8,8,8,8,8,8]",
             "model.fc_width=16"], "resnet18": [], "fastnet_tiny": [], "mobilenet": []}[model]
    cfg = compose("experiment=smoke", f"model={model}", *TINY, *extra, "transfer.freeze_depth=2", tmp=tmp_path)
    results = {stage: run(stage, cfg) for stage in ("prepare", "pretrain", "transfer")}
    assert 0.0 <= results["transfer"]["val_acc"] <= 1.0
    art = tmp_path / "artifacts"
    pretrained, _ = load_checkpoint(art / "pretrain" / "model.pt", "pretrain")
    transferred, ckpt = load_checkpoint(art / "transfer" / "model.pt", "transfer", ["tgt_a", "tgt_b", "tgt_c"])
    assert ckpt["arch"]["name"] == cfg.model.name
    # the two frozen blocks keep the pretrained weights and statistics; the next block trained
    for k in (0, 1):
        for (name, a), b in zip(pretrained.blocks[k].state_dict().items(), transferred.blocks[k].state_dict().values()):
            assert torch.equal(a, b), f"frozen block {k}: {name} changed"
    assert any(not torch.equal(a, b) for a, b in zip(pretrained.blocks[2].parameters(),
                                                     transferred.blocks[2].parameters()))


def test_a_mobilenet_student_goes_through_distill_prune_export_quantize_and_evaluate(smoke_artifacts, tmp_path):
    # the other student the docs offer (model@distill.student=mobilenet): depthwise convolutions
    # through Torch-Pruning, the exporters and the INT8 quantizer; the teacher's stages are reused
    ref = Path(smoke_artifacts[0].paths.artifacts_dir)
    student_stages = ("distill", "student", "prune", "export", "quantize", "evaluate")
    shutil.copytree(ref, tmp_path / "artifacts", ignore=lambda d, names: student_stages if Path(d) == ref else [])
    cfg = compose("experiment=smoke", "model@distill.student=mobilenet", tmp=tmp_path)
    for stage in student_stages:
        run(stage, cfg)
    art = tmp_path / "artifacts"
    for stage in ("distill", "student", "prune"):
        assert load_checkpoint(art / stage / "model.pt", stage)[1]["arch"]["name"] == "mobilenet"
    exported = json.loads((art / "export" / "export.json").read_text())
    assert exported["onnx"]["top1_agreement"] == 1.0 and exported["onnx"]["within"]
    models = json.loads((art / "evaluate" / "metrics.json").read_text())["models"]
    assert models["prune"]["macs"] <= (1 - 0.7) * models["distill"]["macs"]  # prune.ratio=0.7 of the MACs
    assert models["onnx_fp32"]["macs"] == models["prune"]["macs"] and models["onnx_int8"]["n_test"] == 3 * 16


DEPLOY_STAGES = ("prune", "export", "quantize", "evaluate")


def _deploy_again(smoke_artifacts, tmp_path, *overrides) -> Path:
    """The smoke pipeline's teacher and student reused, the stages from prune on run again with `overrides`."""
    ref = Path(smoke_artifacts[0].paths.artifacts_dir)
    shutil.copytree(ref, tmp_path / "artifacts", ignore=lambda d, names: DEPLOY_STAGES if Path(d) == ref else [])
    cfg = compose("experiment=smoke", *overrides, tmp=tmp_path)
    for stage in DEPLOY_STAGES:
        run(stage, cfg)
    return tmp_path / "artifacts"


def test_an_unstructured_prune_goes_through_export_quantize_and_evaluate(smoke_artifacts, tmp_path, monkeypatch):
    """Zeroed single weights, recovered and fine-tuned for INT8 with dkd, scored with airbench's six views: each
    of these ran in its own stage only, never through the stages after it."""
    from transferkit.stages import quantize

    real_check, calls = quantize.check, []

    def check(*args, **kwargs):  # post-training INT8 judged to score 0: the stage fine-tunes for INT8
        calls.append(real_check(*args, **kwargs))
        return {**calls[-1], "int8_top1": 0.0} if len(calls) == 1 else calls[-1]

    monkeypatch.setattr(quantize, "check", check)
    art = _deploy_again(smoke_artifacts, tmp_path, "prune.mode=unstructured", "prune.ratio=0.5", "prune.epochs=1",
                        "distill.method=dkd", "quantize.max_drop=0.3", "quantize.qat_epochs=1",
                        "evaluate.tta=flip_translate")
    assert json.loads((art / "prune" / "metrics.json").read_text())["sparsity"] == pytest.approx(0.5, abs=0.02)
    assert json.loads((art / "quantize" / "quantize.json").read_text())["produced_by"].startswith(
        "quantization-aware fine-tuning (1 epoch,")
    import onnx
    from onnx import numpy_helper

    convs = [numpy_helper.to_array(t) for t in onnx.load(str(art / "quantize" / "qat" / "model_fp32.onnx")).graph
             .initializer if len(t.dims) == 4]  # fine-tuned for INT8, the zeros pruning left stay zero
    assert sum(int((w == 0).sum()) for w in convs) / sum(w.size for w in convs) >= 0.45
    report = (art / "evaluate" / "report.md").read_text()
    assert "unstructured: single weights zeroed" in report and "test-time augmentation: flip_translate" in report
    assert "Top-1 averages each test image's 6 views" in report
    models = json.loads((art / "evaluate" / "metrics.json").read_text())["models"]
    assert models["onnx_int8"]["n_test"] == 3 * 16
    # the results table's params count the zeros, and say so: the pruned rows read like the distilled one's
    from transferkit.evaluation.tables import results_table

    sparse = json.loads((art / "prune" / "metrics.json").read_text())["sparsity"]
    assert {n for n, m in models.items() if m.get("sparsity") == sparse} == {"prune", "onnx_fp32", "onnx_int8"}
    table = results_table(json.loads((art / "evaluate" / "metrics.json").read_text()),
                          json.loads((art / "evaluate" / "timing.json").read_text()))
    assert table.count(f" ({100 * sparse:.0f}% zero) |") == 3, table


def test_other_quantizer_settings_and_a_pruning_scope_go_through_to_evaluate(smoke_artifacts, tmp_path):
    """Entropy calibration into Quantize/DequantizeLinear pairs with one scale per tensor, after a cut with
    isomorphic scope, scored without test-time augmentation: until now composed or unit-tested only."""
    art = _deploy_again(smoke_artifacts, tmp_path, "prune.scope=isomorphic", "prune.epochs=1",
                        "quantize.method=entropy", "quantize.format=qdq", "quantize.per_channel=false",
                        "quantize.max_drop=1", "evaluate.tta=none")
    quantized = json.loads((art / "quantize" / "quantize.json").read_text())
    assert (quantized["method"], quantized["format"], quantized["per_channel"]) == ("entropy", "qdq", False)
    report = (art / "evaluate" / "report.md").read_text()
    assert "test-time augmentation: none" in report and "each of one forward pass per image" in report
    models = json.loads((art / "evaluate" / "metrics.json").read_text())["models"]
    assert models["prune"]["macs"] <= (1 - 0.7) * models["distill"]["macs"]


def test_results_command_prints_the_models_and_each_stage_training(smoke_artifacts, capsys):
    from transferkit.evaluation.report import LABELS
    from transferkit.evaluation.tables import main, pct, results_table

    cfg, results = smoke_artifacts
    assert main([str(Path(cfg.paths.artifacts_dir) / "evaluate")]) == 0
    out = capsys.readouterr().out
    top1 = results["evaluate"]["models"]["transfer"]["top1"]
    assert (f"| transfer (fine-tuned) | {100 * top1:.1f} (" in out and "matmul peak fp32" in out
            and "before the timings" in out)
    timing = json.loads((Path(cfg.paths.artifacts_dir) / "pretrain" / "timing.json").read_text())
    seconds = timing["train_seconds"]  # under 10 s with a decimal: a smoke stage trains for less than one
    assert f"| pretrain | {seconds:,.{int(seconds < 10)}f} | {timing['train_images_per_second']:,.0f} | cpu |" in out
    assert "| distill |" in out and "| prune |" in out and "Training in all:" in out
    # every model evaluate scored, in evaluate's order (metrics.json sorts its keys: distill would come first), the
    # deployed files after the trained models, and a stage the labels do not know by its own name
    from transferkit.stages import TARGET_MODELS

    metrics = json.loads((Path(cfg.paths.artifacts_dir) / "evaluate" / "metrics.json").read_text())
    metrics["models"] = {"newstage": metrics["models"]["scratch"], **metrics["models"]}
    timing = json.loads((Path(cfg.paths.artifacts_dir) / "evaluate" / "timing.json").read_text())
    table = results_table(metrics, timing)
    assert ("other processes kept" in table) == (timing["machine"]["other_cores"] >= 0.25)
    names = [*TARGET_MODELS, "newstage", "onnx_fp32", "onnx_int8"]
    assert sorted(names) == sorted(metrics["models"])
    assert [row.split(" | ")[0] for row in table.splitlines()[2:2 + len(names)]] == [
        f"| {LABELS.get(name, name)}" for name in names]
    # baselines first, then the fine-tuned teacher, then its student: alone, distilled, pruned, deployed
    rows = [out.index(f"| {LABELS[name]} |") for name in ("scratch", "probe", "transfer", "student", "distill", "prune",
                                                          "onnx_fp32", "onnx_int8")]
    assert rows == sorted(rows)
    # top-1 is over evaluate.tta's views (smoke: flip, as evaluate's params.yaml says); the deployed files as
    # predict runs them, one view, too
    m = metrics["models"]
    assert "Top-1 averages each test image's 2 views (`evaluate.tta: flip`)" in out, out
    one_view = (f"{pct(m['onnx_fp32']['top1_one_view'])}% (pruned, ONNX fp32) and "
                f"{pct(m['onnx_int8']['top1_one_view'])}% (pruned, ONNX INT8)")
    assert f"`transferkit predict` runs one view: there the deployed files score {one_view}" in out, out
    assert f"the deployed files score {one_view}" in table  # no params.yaml to say which views: the % kept


def test_results_from_inside_evaluates_folder_print_the_training_table_too(smoke_artifacts, capsys, monkeypatch):
    """`transferkit results .` (or metrics.json) in artifacts/evaluate: the stages' folders are "..", not "."'s
    parent, which is "." again: the training table was left out without a word."""
    from transferkit.evaluation.tables import main

    cfg, _ = smoke_artifacts
    main([str(Path(cfg.paths.artifacts_dir) / "evaluate")])
    want = capsys.readouterr().out
    assert "Training, from each stage's timing.json" in want
    monkeypatch.chdir(Path(cfg.paths.artifacts_dir) / "evaluate")
    for given in (".", "metrics.json"):
        assert main([given]) == 0 and capsys.readouterr().out == want
    monkeypatch.chdir("../transfer")
    with pytest.raises(TransferkitError, match=r"Fix: pass evaluate's folder, `transferkit results ../evaluate`"):
        main(["."])


@pytest.mark.parametrize("folder, needle", [
    ("artifacts/transfer", "artifacts/transfer/metrics.json is not evaluate's: it scores no models. "
                           "Fix: pass evaluate's folder, `transferkit results artifacts/evaluate`."),
    ("artifacts", "the results are in evaluate's. Fix: `transferkit results artifacts/evaluate`."),
    ("elsewhere", "cannot read elsewhere/metrics.json (No such file or directory). "
                  "Fix: pass evaluate's output folder (`transferkit results artifacts/evaluate`)"),
    ("artifacts/evaluate", "cannot read artifacts/evaluate/timing.json (No such file or directory). "
                           "Fix: run evaluate again (`dvc repro evaluate`)"),
    ("artifacts/evaluate/metrics.json", "cannot read artifacts/evaluate/timing.json (No such file or directory)"),
    (None, "cannot read ../artifacts/evaluate/timing.json"),  # no folder given, run from a folder in the project
])
def test_results_command_names_evaluates_folder(tmp_path, monkeypatch, folder, needle):
    """Another stage's folder, the artifacts folder, no folder, and evaluate's without its timing.json:
    one error each, naming the folder to pass."""
    from transferkit.evaluation.tables import main

    monkeypatch.chdir(tmp_path)
    for stage, metrics in (("transfer", {"val_acc": 0.5}), ("evaluate", {"models": {}, "transfer_vs_scratch": {}})):
        (tmp_path / "artifacts" / stage).mkdir(parents=True)
        (tmp_path / "artifacts" / stage / "metrics.json").write_text(json.dumps(metrics))
    (tmp_path / "artifacts" / "transfer" / "timing.json").write_text(json.dumps({"train_seconds": 1.0}))
    if folder is None:
        (tmp_path / "conf").mkdir()
        (tmp_path / "conf" / "config.yaml").touch()
        (tmp_path / "docs").mkdir()
        monkeypatch.chdir(tmp_path / "docs")
    with pytest.raises(TransferkitError) as e:
        main([folder] if folder else [])
    assert needle in str(e.value)


def test_results_before_any_run_says_to_run_the_pipeline(tmp_path, monkeypatch):
    """Not to pass the very folder it just failed to read."""
    from transferkit.evaluation.tables import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(TransferkitError, match=r"cannot read artifacts/evaluate/metrics.json \(No such file or "
                                               r"directory\). Fix: run the pipeline first \(`dvc repro`\).$"):
        main([])


def test_results_command_finds_evaluate_where_the_projects_params_put_the_artifacts(tmp_path, monkeypatch):
    from conftest import compose
    from transferkit.config.compose import params_text
    from transferkit.evaluation.tables import main

    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "config.yaml").touch()
    (tmp_path / "params.yaml").write_text(params_text(compose("paths.artifacts_dir=runs")))
    (tmp_path / "runs" / "evaluate").mkdir(parents=True)
    (tmp_path / "runs" / "evaluate" / "metrics.json").write_text(json.dumps({"models": {}, "transfer_vs_scratch": {}}))
    (tmp_path / "docs").mkdir()
    monkeypatch.chdir(tmp_path / "docs")
    with pytest.raises(TransferkitError, match=r"cannot read \.\./runs/evaluate/timing.json"):
        main([])


def test_results_say_when_params_yaml_has_changed_since_evaluate_ran(smoke_artifacts, tmp_path, monkeypatch, capsys):
    """`transferkit params seed=3` then `transferkit results`: the table is the last run's, which it says with the
    setting that changed; a setting no stage tracks (the progress bar) and a folder given by hand say nothing."""
    import shutil

    from omegaconf import OmegaConf

    from transferkit.config.compose import params_text
    from transferkit.evaluation.tables import main

    cfg, _ = smoke_artifacts
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "config.yaml").touch()
    shutil.copytree(Path(cfg.paths.artifacts_dir) / "evaluate", tmp_path / "artifacts" / "evaluate")
    monkeypatch.chdir(tmp_path)
    notes = {}
    for change in ([], ["trainer.progress_bar=true"], [f"seed={cfg.seed + 3}", "trainer.progress_bar=true"]):
        edited = OmegaConf.merge(cfg, OmegaConf.from_dotlist(["paths.artifacts_dir=artifacts", *change]))
        (tmp_path / "params.yaml").write_text(params_text(edited))
        assert main([]) == 0
        notes[len(change)] = capsys.readouterr().out.split("Training in all:")[-1]
        assert main(["artifacts/evaluate"]) == 0
        assert "has changed" not in capsys.readouterr().out
    assert "has changed" not in notes[0] + notes[1]
    assert notes[2].strip().endswith(f"params.yaml has changed since evaluate ran (seed: {cfg.seed} → {cfg.seed + 3}):"
                                     " these are the last run's results. Fix: `uv run dvc repro` brings them up to "
                                     "date."), notes[2]


@pytest.mark.parametrize("text", ['{"train_seconds": 3', "[" * 100_000 + "]" * 100_000])  # (a RecursionError)
def test_results_command_names_a_stages_unreadable_timing(smoke_artifacts, tmp_path, text):
    """A damaged timing.json of a training stage: one error naming it and the fix, before any table."""
    import shutil

    from transferkit.evaluation.tables import main

    cfg, _ = smoke_artifacts
    art = tmp_path / "artifacts"
    for stage in ("evaluate", "transfer"):
        shutil.copytree(Path(cfg.paths.artifacts_dir) / stage, art / stage)
    (art / "transfer" / "timing.json").write_text(text)
    with pytest.raises(TransferkitError, match=r"cannot read .*transfer/timing.json \(.*\)\. Fix: run transfer "
                                               r"again \(`dvc repro transfer`\)\.$"):
        main([str(art / "evaluate")])


@pytest.mark.parametrize("damage", ["metrics", "timing", "machine"])
def test_results_command_names_files_of_another_shape(smoke_artifacts, tmp_path, damage):
    """evaluate's files from another version (a model without top1), or a training stage's timing.json with text
    for seconds: one line naming the folder and the fix, not a traceback."""
    import shutil

    from transferkit.evaluation.tables import main

    cfg, _ = smoke_artifacts
    art = tmp_path / "artifacts"
    for stage in ("evaluate", "transfer"):
        shutil.copytree(Path(cfg.paths.artifacts_dir) / stage, art / stage)
    if damage == "metrics":
        metrics = json.loads((art / "evaluate" / "metrics.json").read_text())
        del metrics["models"]["transfer"]["top1"]
        (art / "evaluate" / "metrics.json").write_text(json.dumps(metrics))
    elif damage == "machine":
        timing = json.loads((art / "evaluate" / "timing.json").read_text())
        (art / "evaluate" / "timing.json").write_text(json.dumps({**timing, "machine": "a string"}))
    else:
        (art / "transfer" / "timing.json").write_text('{"train_seconds": "3"}')
    needle = {"metrics": r"evaluate's metrics.json or timing.json is of another shape \(KeyError: 'top1'\)\. Fix: run "
                         r"evaluate ",
              "machine": r"evaluate's metrics.json or timing.json is of another shape \(AttributeError: .*\)\. Fix: "
                         r"run evaluate ",
              "timing": r"transfer/timing.json is of another shape \(.*\)\. Fix: run transfer again"}[damage]
    with pytest.raises(TransferkitError, match=needle):
        main([str(art / "evaluate")])


@pytest.mark.parametrize("params", ["evaluate: {tta: [flip, none]}\n", "evaluate: {tta: &v [*v]}\n", b"\xff\xfe"])
def test_results_print_the_table_whatever_evaluates_params_yaml_says_of_tta(smoke_artifacts, tmp_path, capsys, params):
    """evaluate.tta in the params.yaml beside evaluate's outputs only names the views in a note: with a value that
    is no mode, an alias or bytes that are not text, the note names none and the table prints (where a list was
    blamed on metrics.json)."""
    import shutil

    from transferkit.evaluation.tables import main

    cfg, _ = smoke_artifacts
    shutil.copytree(Path(cfg.paths.artifacts_dir) / "evaluate", tmp_path / "evaluate")
    path = tmp_path / "evaluate" / "params.yaml"
    path.write_bytes(params) if isinstance(params, bytes) else path.write_text(params)
    assert main([str(tmp_path / "evaluate")]) == 0
    out = capsys.readouterr().out
    assert "| transfer (fine-tuned) |" in out and "Top-1 is over the test-time views of evaluate.tta; " in out


def test_report_html_shows_names_from_the_data_as_text(tmp_path):
    """Class names come from folder names in an archive: in report.html they are text, never HTML or links,
    and a | in one does not split its table row."""
    from transferkit.evaluation.html import to_html
    from transferkit.evaluation.report import render

    bad = ["<img src=x onerror=alert(1)>", "b|c", "[x](javascript:alert(1))", "<me@evil.example>", "<http://e.example>",
           'src="secret.png"', "__init__", "a_b_c", "&lt;b&gt;", "<sup>x", "line\nbreak"]
    (tmp_path / "secret.png").write_bytes(b"a file beside the report")  # embedded only where the report shows a plot
    m = {"top1": .5, "top1_ci95": [.4, .6], "params": 1000, "macs": 1000, "size_bytes": 100,
         "per_class": dict.fromkeys(bad, 0.5)}
    cfg = {"experiment": "<script>alert(1)</script>", "model": "fastnet", "freeze_depth": 1, "backbone_lr_mult": 0,
           "probe_depth": None, "epochs": dict.fromkeys(["pretrain", "transfer", "scratch", "probe", "distill"], 1),
           "seed": 0, "tta": "none", "tta_views": 1, "blocks": 11}
    data = {"source": {"dataset": "d", "classes": ["a"], "n_train": 1, "n_val": 1},
            "target": {"dataset": "archive.tar", "classes": bad, "n_train": 1, "n_val": 1, "n_test": 2}}
    text = render(cfg, {"models": {"scratch": m}}, {}, data)
    page = to_html(text, tmp_path)
    assert "<img src=x" not in page and "<script>" not in page and "href=" not in page and "mailto" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page and "<td>b|c</td>" in page
    # no emphasis from underscores, and an entity in a name shows as written
    assert "<td>__init__</td>" in page and "<td>a_b_c</td>" in page and "<td>&amp;lt;b&amp;gt;</td>" in page
    assert "| &lt;sup>x |" in text and "<sup>" not in page  # a tag GitHub's preview renders stays text in report.md
    assert 'src="secret.png"' in page and "base64" not in page
    assert "| – | – | – |" in text  # no timings measured: a dash, not nan
    assert "trained in" not in text  # no stage's precision known: no line, not an empty one
    assert "\n| line break | 50.0% |" in text  # a newline in a name split its table row
    # the freeze sweep to run next covers the model's blocks (it was 0 to 4 whatever the model)
    assert "transferkit sweep transfer transfer.freeze_depth=0,1,2,3,4,5,6,7,8,9,10,11 seed=0,1,2" in text


def test_report_html_embeds_only_the_reports_own_plots_and_shows_html_as_text(tmp_path):
    """report.html embeds the PNGs beside report.md by their plain file names, never a file elsewhere a path
    leads to; HTML in the text, a block of it too, shows as text and never runs."""
    from transferkit.evaluation.html import to_html

    folder = tmp_path / "evaluate"
    folder.mkdir()
    (folder / "curves.png").write_bytes(b"\x89PNG the plot")
    (tmp_path / "outside.png").write_bytes(b"\x89PNG another file")
    page = to_html("![curves](curves.png)\n\n![x](../outside.png)\n\n<script>alert(1)</script>\n\n"
                   "<div onclick=alert(1)>x</div>\n", folder)
    assert page.count("data:image/png;base64,") == 1 and 'src="../outside.png"' in page
    assert "<script>" not in page and "<div" not in page and "&lt;script&gt;" in page


def test_plots_show_names_from_the_data_as_text(tmp_path):
    """matplotlib reads text between two $ as TeX: a class "a$\\q$" stopped evaluate with its ParseFatalException,
    and "c$d$" was drawn as an italic d."""
    from transferkit.evaluation.plots import confusion_png

    confusion_png([[1, 0], [0, 1]], ["cost $5", "a$\\q$"], "fastnet: top-1 50.0%", tmp_path / "confusion.png")
    assert (tmp_path / "confusion.png").read_bytes()[:4] == b"\x89PNG"


def _drawn(monkeypatch, draw) -> list:
    """The figures `draw()` saves through the plots module, to read what they show (legend, axes, lines)."""
    from transferkit.evaluation import plots

    figures, save = [], plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: (figures.append(fig), save(fig, path)))
    draw()
    return figures


def _legend(fig) -> list[str]:
    return [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]


def test_every_plot_is_written_and_closes_its_figure(tmp_path):
    """evaluate and collect draw a plot per model and per sweep: each one is a PNG file, and its figure is closed
    once written (matplotlib keeps every open figure in memory)."""
    import matplotlib.pyplot as plt

    from transferkit.evaluation import plots

    plt.close("all")
    run = {"freeze_depth": 1, "top1": 0.6, "top1_ci95": [0.5, 0.7], "val_acc": 0.6}
    model = {"top1": 0.5, "macs": 1e6}
    summary = {"stage": "transfer", "rows": [{"stage": "transfer", "setting": ["transfer.lr=0.1"], "test_mean": 0.6,
                                              "test_std": None, "val_mean": None, "seeds": [0]}]}
    for name, draw in (("confusion", lambda p: plots.confusion_png([[1, 0], [0, 1]], ["a", "b"], "t", p)),
                       ("curves", lambda p: plots.curves_png({"transfer": tmp_path / "none"}, p)),
                       ("pareto", lambda p: plots.pareto_png({"transfer": model}, {"transfer": {"latency_ms_bs1": 1}},
                                                             p)),
                       ("freeze_curve", lambda p: plots.freeze_curve_png([run], {"scratch": model}, None, p)),
                       ("sweep", lambda p: plots.sweep_png(summary, p))):
        draw(tmp_path / f"{name}.png")
        assert (tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG", name
        assert plt.get_fignums() == [], name


def test_the_curves_plot_draws_each_stages_own_series_and_skips_what_it_did_not_log(tmp_path, monkeypatch):
    """curves.png: validation accuracy on the left, training loss on the right, one line per stage; a stage that
    logged no val accuracy (prune, a task without val images) has no line there, and no error."""
    from transferkit.evaluation.plots import curves_png

    def log(stage, metric, values):
        path = tmp_path / stage / "plots" / "metrics" / f"{metric}.tsv"
        path.parent.mkdir(parents=True, exist_ok=True)
        name = metric.split("/")[-1]
        path.write_text(f"step\t{name}\n" + "".join(f"{i}\t{v}\n" for i, v in enumerate(values)))

    log("transfer", "val/acc", [0.5, 0.7])
    log("transfer", "train/loss", [2.0, 1.5])
    log("prune", "train/loss", [1.0, 0.8, 0.6])
    (fig,) = _drawn(monkeypatch, lambda: curves_png({n: tmp_path / n for n in ("transfer", "prune")},
                                                    tmp_path / "curves.png"))
    series = {ax.get_title(): {line.get_label(): list(line.get_ydata()) for line in ax.lines} for ax in fig.axes}
    assert series == {"validation accuracy": {"transfer": [0.5, 0.7]},
                      "training loss": {"transfer": [2.0, 1.5], "prune": [1.0, 0.8, 0.6]}}


def test_the_freeze_curve_plot_rings_the_depth_best_on_val(tmp_path, monkeypatch):
    """The ringed point is the depth with the highest val accuracy, whatever its test accuracy."""
    from transferkit.evaluation.plots import freeze_curve_png

    rows = [{"freeze_depth": d, "top1": t, "top1_ci95": [t - 0.1, t + 0.1], "val_acc": v}
            for d, t, v in ((0, 0.7, 0.4), (1, 0.5, 0.65), (3, 0.6, 0.55))]
    (fig,) = _drawn(monkeypatch, lambda: freeze_curve_png(rows, {}, None, tmp_path / "freeze_curve.png"))
    assert "best on val (depth 1)" in _legend(fig)
    assert fig.axes[0].get_xlabel() == "blocks frozen (transfer.freeze_depth)"


def test_the_freeze_curve_plot_under_gradual_unfreezing_counts_the_blocks_frozen_at_the_start(tmp_path, monkeypatch):
    from transferkit.evaluation.plots import freeze_curve_png

    rows = [{"freeze_depth": d, "top1": 0.6, "top1_ci95": [0.5, 0.7], "val_acc": 0.6} for d in (0, 2)]
    (fig,) = _drawn(monkeypatch, lambda: freeze_curve_png(rows, {}, None, tmp_path / "freeze_curve.png", 3))
    assert fig.axes[0].get_xlabel() == ("blocks frozen at the start (transfer.freeze_depth)\n"
                                        "one more unfrozen every 3 epochs")


def test_the_pareto_plot_shows_only_the_models_that_were_timed(tmp_path, monkeypatch):
    """A model without a measured latency has no place on the accuracy-vs-latency plot: it is left out."""
    from transferkit.evaluation.plots import pareto_png

    models = {"transfer": {"top1": 0.6, "macs": 2e6}, "onnx_fp32": {"top1": 0.6, "macs": 2e6}}
    (fig,) = _drawn(monkeypatch, lambda: pareto_png(models, {"transfer": {"latency_ms_bs1": 1.5}, "onnx_fp32": {}},
                                                    tmp_path / "pareto.png"))
    assert [t.get_text() for t in fig.axes[0].texts] == ["transfer"]


def _sweep_row(stage, setting, mean):
    return {"stage": stage, "setting": setting, "test_mean": mean, "test_std": 0.01, "val_mean": mean, "seeds": [0, 1]}


def test_a_sweep_plot_over_two_settings_labels_each_point_by_its_setting(tmp_path, monkeypatch):
    """One swept key gives a numeric x axis named after it; two keys (a point each) are no axis of numbers: each
    point is labelled by its setting."""
    from transferkit.evaluation.plots import sweep_png

    numeric = []
    one = {"stage": "transfer", "rows": [_sweep_row("transfer", [f"transfer.lr={lr}"], 0.6) for lr in (0.1, 0.2)]}
    (fig,) = _drawn(monkeypatch, lambda: numeric.append(sweep_png(one, tmp_path / "one.png")))
    assert numeric == [True] and fig.axes[0].get_xlabel() == "transfer.lr"
    two = {"stage": "transfer", "rows": [_sweep_row("transfer", ["transfer.lr=0.1"], 0.6),
                                         _sweep_row("transfer", ["transfer.epochs=2"], 0.7)]}
    (fig,) = _drawn(monkeypatch, lambda: numeric.append(sweep_png(two, tmp_path / "two.png")))
    assert numeric == [True, False]
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["transfer.lr=0.1", "transfer.epochs=2"]
    # no line joins settings that have no order (it would draw a trend); the title says what the bars are
    assert {line.get_linestyle() for line in fig.axes[0].get_lines() if len(line.get_xdata()) == 2} == {"None"}
    assert fig.axes[0].get_title() == "transfer sweep (mean ± std over seeds)"
    one_seed = {"stage": "transfer", "rows": [{**r, "seeds": [0], "test_std": None} for r in two["rows"]]}
    (fig,) = _drawn(monkeypatch, lambda: sweep_png(one_seed, tmp_path / "seed.png"))
    assert fig.axes[0].get_title() == "transfer sweep (one seed)"


def test_a_sweep_plot_draws_reference_lines_only_for_the_other_stages(tmp_path, monkeypatch):
    """scratch and the probe are reference lines beside another stage's sweep; a scratch sweep's own default run is
    one of its points, not a reference line too."""
    from transferkit.evaluation.plots import sweep_png

    rows = [_sweep_row("scratch", [], 0.5), _sweep_row("scratch", ["scratch.lr=0.2"], 0.55),
            _sweep_row("probe", [], 0.4)]
    (fig,) = _drawn(monkeypatch, lambda: sweep_png({"stage": "scratch", "rows": rows}, tmp_path / "sweep.png"))
    legend = _legend(fig)
    assert "probe, test (2 seeds)" in legend and not [t for t in legend if t.startswith("scratch, test (")], legend


def test_an_interval_bound_that_is_not_0_does_not_print_as_0():
    """A verdict reads whether the interval excludes 0: "+0.0 to +20.0 ... excludes 0" read as a contradiction."""
    from transferkit.evaluation.formats import interval

    assert interval(0.0004, 0.2) == "+0.04 to +20.0"
    assert interval(-0.3, -0.00001) == "-30.0 to -0.001"
    assert interval(0.0, 1.5) == "+0.0 to +100.0"


def test_sizes_and_timings_print_in_units_that_show_them():
    """A tiny model's file in KB (as MB it read 0.01 MB), a large one's in MB; a timing that timing.json lacks or
    holds as no number prints as a dash, not a traceback or "None ms"."""
    from transferkit.evaluation.formats import file_size, measured

    assert file_size(12_345) == "12.3 KB"
    assert file_size(100_000) == "0.10 MB" and file_size(2_500_000) == "2.50 MB"
    assert measured({"latency_ms_bs1": 1.234}, "latency_ms_bs1", ".2f", " ms") == "1.23 ms"
    assert measured({"latency_ms_bs1": None}, "latency_ms_bs1", ".2f", " ms") == "–"
    assert measured({"latency_ms_bs1": "n/a"}, "latency_ms_bs1", ".2f", " ms") == "–"
    assert measured({}, "latency_ms_bs1", ".2f", " ms") == "–"


def test_the_report_tells_models_of_one_builder_apart():
    from omegaconf import OmegaConf

    from transferkit.stages.evaluate import described

    assert described(OmegaConf.create({"name": "mobilenet", "width_mult": 0.5})) == "mobilenet (width x0.5)"
    assert described(OmegaConf.create({"name": "resnet18", "weights": "IMAGENET1K_V1"})) == \
        "resnet18 (weights IMAGENET1K_V1)"
    assert described(OmegaConf.create({"name": "resnet18", "weights": None})) == "resnet18"


def test_the_report_says_how_transfer_unfroze_and_what_prunes_recovery_learned_from():
    """Gradual unfreezing makes a freeze depth where each run starts, and prune.teacher=student recovers from the
    student before pruning: the report's recipe lines say so, and the budgets name prune's (walk X85)."""
    from transferkit.evaluation.report import render

    m = {"top1": .5, "top1_ci95": [.4, .6], "params": 1000, "macs": 1000, "size_bytes": 100, "per_class": {"a": .5}}
    row = {"val_acc": .5, "top1": .5, "top1_ci95": [.4, .6], "vs_scratch": {"difference": 0.0, "ci95": [-.1, .1]}}
    prune = {"mode": "structured", "criterion": "l2", "target": "macs", "ratio": .5, "steps": 1, "scope": "layer"}
    cfg = {"experiment": "e", "model": "fastnet", "freeze_depth": 1, "backbone_lr_mult": 0.3, "probe_depth": None,
           "epochs": dict.fromkeys(["pretrain", "transfer", "scratch", "probe", "distill"], 1), "seed": 0,
           "tta": "none", "tta_views": 1, "blocks": 4}
    data = {"source": {"dataset": "d", "classes": ["a"], "n_train": 1, "n_val": 1},
            "target": {"dataset": "d", "classes": ["a"], "n_train": 1, "n_val": 1, "n_test": 2}}
    metrics = {"models": {"transfer": m, "distill": m, "prune": m},
               "freeze_curve": [{**row, "freeze_depth": 0}, {**row, "freeze_depth": 2}]}
    fixed = render({**cfg, "prune": prune}, metrics, {}, data)
    assert "backbone_lr_mult=0.3; probe depth=all" in fixed and "distill and student alone 1; seed 0" in fixed
    assert "(blocks[:k] frozen, the rest fine-tuned), same seed" in fixed and "| blocks frozen | val top-1 |" in fixed
    assert "recovered by a short fine-tune distilled from the teacher." in fixed
    gradual = render({**cfg, "unfreeze_every_epochs": 2, "epochs": {**cfg["epochs"], "prune": 3},
                      "prune": {**prune, "teacher": "student"}}, metrics, {}, data)
    assert "backbone_lr_mult=0.3, unfreeze_every_epochs=2; probe depth=all" in gradual
    assert "distill and student alone 1, prune recovery 3; seed 0" in gradual
    assert "(blocks[:k] frozen at the start, one more unfrozen every 2 epochs), same seed" in gradual
    assert "| blocks frozen at the start | val top-1 |" in gradual
    assert "recovered by a short fine-tune distilled from the student before pruning." in gradual
    training = {"pretrain": {"precision": "32-true", "device": "cpu", "processes": 2}, "probe": {"precision": None}}
    assert "- trained in: pretrain 32-true on cpu, 2 processes\n" in render(
        {**cfg, "prune": prune, "training": training}, metrics, {}, data)


def test_the_verdict_on_transfer_names_what_scratch_trained_with_apart():
    """scratch takes transfer's recipe key for key unless a user tunes it apart: the verdict then says so."""
    from transferkit.evaluation.report import render

    m = {"top1": .5, "top1_ci95": [.4, .6], "params": 1000, "macs": 1000, "size_bytes": 100, "per_class": {"a": .5}}
    cfg = {"experiment": "e", "model": "fastnet", "freeze_depth": 1, "backbone_lr_mult": 0, "probe_depth": None,
           "epochs": dict.fromkeys(["pretrain", "transfer", "scratch", "probe", "distill"], 1), "seed": 0,
           "tta": "none", "tta_views": 1, "blocks": 4, "scratch_differs": ["scratch.lr=0.5 vs transfer.lr=0.05"]}
    data = {"source": {"dataset": "d", "classes": ["a"], "n_train": 1, "n_val": 1},
            "target": {"dataset": "d", "classes": ["a"], "n_train": 1, "n_val": 1, "n_test": 2}}
    gain = {"difference": 0.0, "ci95": [-0.1, 0.1], "n": 2}
    text = render(cfg, {"models": {"scratch": m, "transfer": m}, "transfer_vs_scratch": gain}, {}, data)
    assert ("within noise (the interval includes 0). Scratch trained unlike transfer (scratch.lr=0.5 vs "
            "transfer.lr=0.05), so the difference measures these settings too") in text


def test_the_report_names_the_models_not_shown_better_than_guessing():
    """The smoke preset's probe and pruned model scored 33.3% on three classes, a number the report gave no
    reading of: a model whose interval reaches chance is named as such, with the fix; the others are not."""
    from transferkit.evaluation.report import render

    def model(lo):
        return {"top1": lo + .1, "top1_ci95": [lo, lo + .2], "params": 1000, "macs": 1000, "size_bytes": 100,
                "per_class": dict.fromkeys("abc", lo + .1)}

    cfg = {"experiment": "e", "model": "fastnet", "freeze_depth": 1, "backbone_lr_mult": 0, "probe_depth": None,
           "epochs": dict.fromkeys(["pretrain", "transfer", "scratch", "probe", "distill"], 1), "seed": 0,
           "tta": "none", "tta_views": 1, "blocks": 4}
    data = {"source": {"dataset": "d", "classes": ["a"], "n_train": 1, "n_val": 1},
            "target": {"dataset": "d", "classes": list("abc"), "n_train": 1, "n_val": 1, "n_test": 30}}
    text = render(cfg, {"models": {"transfer": model(.5), "probe": model(.2), "prune": model(1 / 3)}}, {}, data)
    line = next(x for x in text.splitlines() if x.startswith("Not shown better than guessing"))
    assert line == ("Not shown better than guessing: linear probe; student pruned + recovered (the 95% interval "
                    "reaches 33.3%, one class in 3). Fix: more epochs or training images."), line
    assert "guessing" not in render(cfg, {"models": {"transfer": model(.5)}}, {}, data)
    for machine in ({}, {"other_cores": 0.9}):  # one blank line between paragraphs, with the busy note or without
        assert "\n\n\n" not in render(cfg, {"models": {"transfer": model(.5)}}, {"machine": machine}, data)
    # a test set that is 60% one class (an image folder's, all its test images): naming that class scores 60%
    text = render({**cfg, "chance": 0.6}, {"models": {"transfer": model(.5), "probe": model(.8)}}, {}, data)
    line = next(x for x in text.splitlines() if x.startswith("Not shown better than guessing"))
    assert line == ("Not shown better than guessing: transfer (fine-tuned) (the 95% interval reaches 60.0%, what "
                    "always naming the test set's most common class scores). Fix: more epochs or training images.")


def test_evaluate_takes_chance_from_the_test_set_it_scores(smoke_artifacts, tmp_path, monkeypatch):
    """An image folder's test classes can be uneven: always naming the most common class then scores its share,
    which is what a model's interval must clear, not 1/classes."""
    from transferkit.stages import evaluate
    from transferkit.stages.run import run_stage

    cfg, _ = smoke_artifacts
    load = evaluate.load_task

    def uneven(folder, role):  # class 0 whole, every fourth image of the others
        task = load(folder, role)
        keep = (task["test_y"] == 0) | (torch.arange(len(task["test_y"])) % 4 == 0)
        return {**task, "test_x": task["test_x"][keep], "test_y": task["test_y"][keep]}

    monkeypatch.setattr(evaluate, "load_task", uneven)
    run_stage("evaluate", cfg, tmp_path / "evaluate")
    y = uneven(Path(cfg.paths.artifacts_dir) / "prepare", "target")["test_y"]
    share = int(torch.bincount(y).max()) / len(y)
    assert share > 1.5 / len(load(Path(cfg.paths.artifacts_dir) / "prepare", "target")["classes"])
    report = (tmp_path / "evaluate" / "report.md").read_text()
    line = next(x for x in report.splitlines() if x.startswith("Not shown better than guessing"))
    assert f"the 95% interval reaches {100 * share:.1f}%, what always naming the test set's most common class" in line


def test_training_table_shows_a_stage_that_trained_nothing():
    from transferkit.evaluation.tables import training_table

    text = training_table({"pretrain": {"train_seconds": 0.0, "train_images_per_second": None, "device": "cpu",
                                        "processes": None, "precision": "32-true", "resumed_at_epoch": None},
                           "transfer": {"train_seconds": 12.4, "train_images_per_second": 401.6, "device": "cuda",
                                        "processes": 2, "precision": "bf16-mixed", "resumed_at_epoch": 3}})
    assert "| pretrain | 0.0 | – | cpu | – | 32-true | – |" in text  # under 10 s: with a decimal
    assert "| transfer | 12 | 402 | cuda | 2 | bf16-mixed | 3 |" in text and "Training in all: 12 s." in text


def test_the_report_says_how_many_processes_trained_a_stage_under_ddp():
    """DDP's processes each take a batch (a recipe of their own): report.md's "trained in" line names them where
    more than one trained, as each stage's closing line does (walk L86)."""
    from transferkit.training.precision import trained_in

    assert trained_in({"precision": "32-true", "device": "cpu", "processes": 2}) == "32-true on cpu, 2 processes"
    assert trained_in({"precision": "bf16-mixed", "device": "cuda:0", "processes": 1}) == "bf16-mixed on cuda:0"
    assert trained_in({"precision": "32-true", "device": "cpu"}) == "32-true on cpu"  # an older timing.json


def test_the_training_table_totals_every_stages_seconds():
    """"Training in all" is the sum over the stages that trained, a stage without seconds counting as none."""
    from transferkit.evaluation.tables import training_table

    text = training_table({"pretrain": {"train_seconds": 30.0}, "transfer": {"train_seconds": 12.4},
                           "probe": {"train_seconds": None}, "evaluate": {}})
    assert "Training in all: 42 s." in text
    assert "| evaluate |" not in text and "| probe | – |" in text


def test_gradual_unfreezing_and_earlier_block_probe(tmp_path):
    cfg = compose("experiment=smoke", "transfer.freeze_depth=3", "transfer.unfreeze_every_epochs=1",
                  "transfer.epochs=3", "probe.depth=2", tmp=tmp_path)
    for stage in ("prepare", "pretrain", "transfer", "probe"):
        run(stage, cfg)
    probe, ckpt = load_checkpoint(tmp_path / "artifacts" / "probe" / "model.pt", "probe")
    assert probe.num_blocks == 2 and ckpt["arch"]["depth"] == 2
    # 3 frozen, then one more block unfrozen per epoch: blocks[2] trains from epoch 1, blocks[1]
    # from epoch 2, blocks[0] never (a static freeze_depth=3 would leave all three as pretrained)
    pretrained, tuned = (load_checkpoint(tmp_path / "artifacts" / s / "model.pt", s)[0].blocks
                         for s in ("pretrain", "transfer"))
    same = [all(torch.equal(a, b) for a, b in zip(p.state_dict().values(), t.state_dict().values()))
            for p, t in zip(pretrained[:3], tuned[:3])]
    assert same == [True, False, False]


def test_failed_stage_keeps_previous_outputs(tmp_path):
    cfg = compose("experiment=smoke", tmp=tmp_path)
    for stage in ("prepare", "pretrain", "transfer"):
        run(stage, cfg)
    out = tmp_path / "artifacts" / "transfer"
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    bad = compose("experiment=smoke", "transfer.freeze_depth=99", tmp=tmp_path)
    with pytest.raises(TransferkitError, match="transfer.freeze_depth"):
        run("transfer", bad)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert not any(p.name.endswith(".incomplete") for p in out.parent.iterdir())


def test_pretrain_checkpoint_from_another_architecture_is_refused(tmp_path):
    cfg = compose("experiment=smoke", tmp=tmp_path)
    run("prepare", cfg)
    run("pretrain", cfg)
    other = compose("experiment=smoke", "model.widths=[8,16,32]", tmp=tmp_path)
    with pytest.raises(TransferkitError, match="architecture"):
        run("transfer", other)


def test_stage_before_its_input_exists_says_what_to_run(tmp_path):
    cfg = compose("experiment=smoke", tmp=tmp_path)
    with pytest.raises(TransferkitError, match="dvc repro prepare"):
        run("pretrain", cfg)


def test_tensorboard_and_csv_loggers_are_selectable(smoke_artifacts, tmp_path):
    ref_cfg, _ = smoke_artifacts
    shutil.copytree(Path(ref_cfg.paths.artifacts_dir), tmp_path / "artifacts")
    cfg = compose("experiment=smoke", "trainer.loggers=[dvclive,tensorboard,csv]", "transfer.epochs=2", tmp=tmp_path)
    run("transfer", cfg)
    out = tmp_path / "artifacts" / "transfer"
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert "val/acc" in (out / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert (out / "dvclive" / "plots" / "metrics" / "val" / "acc.tsv").exists()


def test_unknown_logger_is_refused(smoke):
    from transferkit.config.checks import validate
    from transferkit.errors import TransferkitError

    cfg = compose("experiment=smoke", "trainer.loggers=[wandb]")
    with pytest.raises(TransferkitError,
                       match=r"trainer.loggers=\['wandb'\] is invalid: must be 'dvclive', 'tensorboard' or 'csv'.*Fix"):
        validate(cfg)


def test_the_deployed_files_and_the_students_ratios_count_the_right_models(smoke_artifacts):
    """The ONNX rows are the pruned student's (its params and MACs, not the distilled one's before pruning), and the
    distillation ratios divide the student's MACs by the teacher's MACs (and params by params)."""
    cfg, _ = smoke_artifacts
    metrics = json.loads((Path(cfg.paths.artifacts_dir) / "evaluate" / "metrics.json").read_text())
    m, dist = metrics["models"], metrics["distillation"]
    for name in ("onnx_fp32", "onnx_int8"):
        assert (m[name]["params"], m[name]["macs"]) == (m["prune"]["params"], m["prune"]["macs"])
    assert m["prune"]["macs"] < m["distill"]["macs"]
    assert dist["student_macs_ratio"] == pytest.approx(m["distill"]["macs"] / m["transfer"]["macs"])
    assert dist["student_params_ratio"] == pytest.approx(m["distill"]["params"] / m["transfer"]["params"])
    assert dist["student_macs_ratio"] != pytest.approx(dist["student_params_ratio"])
