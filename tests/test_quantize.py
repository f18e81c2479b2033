"""The quantize stage: the smoke pipeline's deployable model in INT8 for real (smaller, mostly in
agreement with fp32, the class names inside, runnable by `predict`), scored by evaluate beside
fp32 ONNX and PyTorch."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

import numpy as np
from omegaconf import OmegaConf
from PIL import Image


def _weight_bytes(path: Path) -> int:
    import onnx

    return sum(len(t.raw_data) for t in onnx.load(str(path)).graph.initializer)


def test_int8_model_has_smaller_weights_and_agrees_with_fp32(smoke_artifacts):
    cfg, _ = smoke_artifacts
    artifacts = Path(cfg.paths.artifacts_dir)
    out = artifacts / "quantize"
    q = json.loads((out / "quantize.json").read_text())
    # the smoke model is so small that tensor names and scales outweigh its weights: the file
    # shrinks only for real models (the next test); its weights shrink here too
    assert _weight_bytes(out / "model.onnx") < _weight_bytes(artifacts / "export" / "model.onnx") / 2
    assert q["bytes"] == {"fp32": (artifacts / "export" / "model.onnx").stat().st_size,
                          "int8": (out / "model.onnx").stat().st_size}
    assert q["top1_agreement"] > 0.5 and q["n_test"] == 48  # most test images: the same class as fp32
    assert q["calibration_images"] == cfg.quantize.calibration_images and q["produced_by"]
    import onnx

    graph = onnx.load(str(out / "model.onnx")).graph
    assert any(n.op_type == "QLinearConv" for n in graph.node)  # ONNX Runtime's native INT8 kernels


def test_calibration_images_are_spread_training_images_scaled_as_the_model_takes_them():
    """The ranges INT8 activations are calibrated on come from training images as the exported model takes
    them, float32 in [0, 1] (uint8 values would set every range 255 times too wide), spread over the classes."""
    import numpy as np
    import torch

    from transferkit.deploy.quantize import calibration_images

    images = torch.randint(0, 256, (12, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    images[0, 0, 0, 0] = 255
    task = {"train_x": images, "train_y": torch.arange(12) // 6}  # sorted by class, as a prepared task is
    got = calibration_images(task, 4)
    assert got.dtype == np.float32 and got.shape == (4, 3, 8, 8)
    np.testing.assert_array_equal(got, (images[[0, 4, 7, 11]].float() / 255).numpy())
    assert got.max() == 1.0


def test_int8_file_of_a_real_sized_model_is_over_3x_smaller(tmp_path):
    import numpy as np
    import torch

    from transferkit.deploy.export import export
    from transferkit.deploy.quantize import quantize
    from transferkit.models import build_model, save_checkpoint

    torch.manual_seed(0)  # 0.1 M parameters, a third of the pipeline's pruned student: fixed overheads weigh more
    save_checkpoint(build_model("fastnet", 5, widths=[32, 64, 64], stem_width=16).eval(), tmp_path / "model.pt",
                    list("abcde"), stage="prune")
    export(tmp_path / "model.pt", tmp_path / "export", None, repeats=2, batch_size=64, threads=1, log=lambda *_: None)
    fp32, int8 = tmp_path / "export" / "model.onnx", tmp_path / "int8.onnx"
    calibration = np.random.default_rng(0).random((32, 3, 32, 32), dtype=np.float32)
    quantize(fp32, int8, calibration, method="minmax", fmt="qoperator", per_channel=True, reduce_range=True)
    assert int8.stat().st_size * 3 < fp32.stat().st_size


def test_int8_logits_follow_fp32_on_a_model_whose_classes_vary(tmp_path, capfd):
    """The smoke pipeline's model gives most test images one class, so agreeing with it says little: here
    a model whose fp32 classes vary, quantized every way, must keep its logits and most of its classes."""
    import torch

    from transferkit.deploy.export import export_onnx
    from transferkit.deploy.quantize import quantize
    from transferkit.models import build_model

    torch.manual_seed(0)
    model = build_model("fastnet", 5, widths=[16, 32, 32], stem_width=8)
    torch.nn.init.normal_(model.head.fc.weight)  # a head whose classes differ by more than its init's
    rng = np.random.default_rng(0)
    calibration, test = (np.clip(rng.random((n, 3, 1, 1), dtype=np.float32)  # each image a colour of its own
                                 + 0.3 * rng.standard_normal((n, 3, 32, 32), dtype=np.float32), 0, 1)
                         for n in (64, 200))
    model.train()
    with torch.no_grad():
        for _ in range(30):  # BatchNorm statistics of these images, not of its init
            model(torch.from_numpy(calibration))
    export_onnx(model.eval(), tmp_path / "fp32.onnx", 32, "auto", None, log=lambda *_: None)
    import onnxruntime as ort

    run = lambda path: ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(  # noqa: E731
        None, {"images": test})[0]
    ref = run(tmp_path / "fp32.onnx")
    assert len(set(ref.argmax(1))) >= 3  # a reference whose classes vary
    for method, fmt in (("minmax", "qoperator"), ("entropy", "qdq"), ("percentile", "qoperator")):
        quantize(tmp_path / "fp32.onnx", tmp_path / f"{method}.onnx", calibration, method=method, fmt=fmt,
                 per_channel=True, reduce_range=True)
        got = run(tmp_path / f"{method}.onnx")
        assert np.corrcoef(ref.ravel(), got.ravel())[0, 1] > 0.95, method
        assert (got.argmax(1) == ref.argmax(1)).mean() > 0.7, method
    out = capfd.readouterr().out  # ONNX Runtime's histogram calibrators print their progress and bin counts
    assert "Collecting tensor data" not in out and "Number of" not in out, out


def test_reduce_range_keeps_every_int8_weight_within_7_bits(tmp_path):
    """8-bit weights overflow the 16-bit pair sums of CPUs without VNNI (AVX2): reduce_range
    keeps them in [-64, 64], in the file and in the fake quantization that fine-tunes for it."""
    import numpy as np
    import torch
    import onnx
    from onnx import numpy_helper

    from transferkit.deploy.export import export_onnx
    from transferkit.deploy.qat import FakeQuantWeight
    from transferkit.deploy.quantize import quantize
    from transferkit.models import build_model

    torch.manual_seed(0)
    export_onnx(build_model("fastnet", 3, widths=[8, 16, 16], stem_width=8).eval(), tmp_path / "fp32.onnx", 32, "auto",
                None, log=lambda *_: None)
    calibration = np.random.default_rng(0).random((16, 3, 32, 32), dtype=np.float32)
    for reduce_range, bound in ((True, 64), (False, 127)):
        out = tmp_path / f"int8_{reduce_range}.onnx"
        quantize(tmp_path / "fp32.onnx", out, calibration, method="minmax", fmt="qoperator", per_channel=True,
                 reduce_range=reduce_range)
        weights = [numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer
                   if t.data_type == onnx.TensorProto.INT8]
        assert weights and max(int(np.abs(w).max()) for w in weights) == bound
        w = torch.randn(4, 3, 3, 3)
        levels = (FakeQuantWeight(per_channel=True, reduce_range=reduce_range)(w)
                  / (w.abs().flatten(1).amax(1) / bound).view(-1, 1, 1, 1))
        assert torch.allclose(levels, levels.round(), atol=1e-4) and levels.abs().max() <= bound + 1e-4


def test_per_channel_gives_each_output_channel_of_a_convolution_its_own_weight_scale(tmp_path):
    """quantize.per_channel=true: each QLinearConv's weights carry one scale per output channel; false: one
    scale for the whole tensor."""
    import numpy as np
    import onnx
    import torch

    from transferkit.deploy.export import export_onnx
    from transferkit.deploy.quantize import quantize
    from transferkit.models import build_model

    torch.manual_seed(0)
    export_onnx(build_model("fastnet", 3, widths=[8, 16, 16], stem_width=8).eval(), tmp_path / "fp32.onnx", 32, "auto",
                None, log=lambda *_: None)
    calibration = np.random.default_rng(0).random((16, 3, 32, 32), dtype=np.float32)
    for per_channel in (True, False):
        out = tmp_path / f"int8_{per_channel}.onnx"
        quantize(tmp_path / "fp32.onnx", out, calibration, method="minmax", fmt="qoperator", per_channel=per_channel,
                 reduce_range=True)
        graph = onnx.load(str(out)).graph
        tensors = {t.name: t for t in graph.initializer}
        # QLinearConv's inputs: x, x_scale, x_zero_point, w, w_scale, ...
        convs = [(tensors[n.input[3]], tensors[n.input[4]]) for n in graph.node if n.op_type == "QLinearConv"]
        assert convs
        for weight, scale in convs:
            assert int(np.prod(scale.dims)) == (weight.dims[0] if per_channel else 1), per_channel


def test_predict_takes_the_int8_file(smoke_artifacts, tmp_path):
    from transferkit.deploy.predict import predict

    cfg, _ = smoke_artifacts
    image = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(image)
    result = predict(Path(cfg.paths.artifacts_dir) / "quantize" / "model.onnx", [image])
    assert result[0]["class"] in list(cfg.data.target.classes)  # the class names travel inside the file


def test_evaluate_scores_int8_beside_fp32_and_pytorch(smoke_artifacts):
    cfg, _ = smoke_artifacts
    folder = Path(cfg.paths.artifacts_dir) / "evaluate"
    models = json.loads((folder / "metrics.json").read_text())["models"]
    timing = json.loads((folder / "timing.json").read_text())
    for name in ("prune", "onnx_fp32", "onnx_int8"):
        assert {"top1", "top1_ci95", "per_class", "size_bytes", "macs"} <= set(models[name])
        assert {"latency_ms_bs1", "latency_ms_bs1_1thread", "throughput_img_s"} <= set(timing[name])
    for name in ("onnx_fp32", "onnx_int8"):  # the deployed files' throughput on 1 thread as well
        assert timing[name]["throughput_img_s_1thread"] > 0
    assert models["onnx_fp32"]["top1"] == models["prune"]["top1"]  # the same model, another runtime
    artifacts = Path(cfg.paths.artifacts_dir)
    for name, file in (("onnx_fp32", artifacts / "export" / "model.onnx"),
                       ("onnx_int8", artifacts / "quantize" / "model.onnx")):
        assert models[name]["size_bytes"] == file.stat().st_size
    report = (folder / "report.md").read_text()
    assert "## INT8" in report and re.search(r"the throughput \d+\.\d\dx (higher|lower) \(on 1 thread "
                                             r"\d+\.\d\dx (higher|lower)\), the batch-1 latency \d+\.\d\dx "
                                             r"(shorter|longer)\.", report), report


def test_keep_float_leaves_the_classifier_in_float(smoke_artifacts, tmp_path):
    import onnx

    from transferkit.deploy.quantize import calibration_images, quantize
    from transferkit.stages.common import load_task

    cfg, _ = smoke_artifacts
    artifacts = Path(cfg.paths.artifacts_dir)
    images = calibration_images(load_task(artifacts / "prepare", "target"), 16)
    out = tmp_path / "int8.onnx"
    quantize(artifacts / "export" / "model.onnx", out, images, method="minmax", fmt="qoperator", per_channel=True,
             reduce_range=True, keep_float=["Gemm"])
    graph = onnx.load(str(out)).graph
    logits = next(n for n in graph.node if graph.output[0].name in n.output)
    # the logits straight from the classifier in float (fastnet's logit scale is folded into it), the convolutions
    # in INT8
    assert logits.op_type == "Gemm" and "QLinearConv" in [n.op_type for n in graph.node]


@pytest.mark.parametrize("method, fmt", [("entropy", "qoperator"), ("percentile", "qoperator"), ("minmax", "qdq")])
def test_every_calibration_method_and_format_quantizes(smoke_artifacts, tmp_path, method, fmt):
    """Each method and format gives a file that mostly agrees with fp32, calibrated on every training image: more
    than one batch, the last one short of 64, which the histogram methods must take as well."""
    import onnx

    from transferkit.deploy.quantize import calibration_images, quantize
    from transferkit.evaluation.metrics import predict_onnx
    from transferkit.stages.common import load_task

    cfg, _ = smoke_artifacts
    artifacts = Path(cfg.paths.artifacts_dir)
    task = load_task(artifacts / "prepare", "target")
    out = tmp_path / "int8.onnx"
    count = len(task["train_y"])
    assert count > 64 and count % 64
    quantize(artifacts / "export" / "model.onnx", out, calibration_images(task, count), method=method, fmt=fmt,
             per_channel=True, reduce_range=True)
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert ({"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops) if fmt == "qdq" else ("QLinearConv" in ops)
    fp32, int8 = (predict_onnx(f, task["test_x"], 64, threads=1).argmax(1)
                  for f in (artifacts / "export" / "model.onnx", out))
    assert (fp32 == int8).float().mean() > 0.5  # most test images: the same class as fp32


def test_fake_quantization_trains_and_comes_off_leaving_each_input_clamped_to_its_trained_range():
    """Inputs beyond a layer's range saturate in INT8 and get no gradient in training, so the weights learn that they
    saturate: the model fine-tuning hands on keeps each range as a clamp, and computes what was trained. Without
    the clamps the fp32 model exported and calibrated again was another function."""
    import copy

    import torch

    from transferkit.deploy.fold import fold_batchnorm
    from transferkit.deploy.qat import TrainedRange, add_fake_quant, remove_fake_quant
    from transferkit.models import build_model

    torch.manual_seed(0)
    plain = fold_batchnorm(build_model("fastnet", 3, widths=[8, 16, 16], stem_width=8, activation="relu"))
    model = copy.deepcopy(plain)
    add_fake_quant(model, per_channel=True, reduce_range=True)
    x = torch.rand(4, 3, 32, 32)
    model.train()(x)  # the observers see a batch
    model.eval()
    fake, ref = model(x), plain(x)
    assert not torch.equal(fake, ref) and (fake - ref).abs().max() < 0.1 * ref.abs().max()  # INT8 rounding, no more
    fake.sum().backward()  # straight-through: the float weights get gradients
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    bright = 8 * x  # far beyond the range the first layer saw
    with torch.no_grad():
        fake_bright = model(bright)
    remove_fake_quant(model)
    assert model.state_dict().keys() == plain.state_dict().keys()  # no observer, no parametrization left
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert all(isinstance(m.input_quant, TrainedRange) for m in layers)
    with torch.no_grad():
        # the weights as they were, untouched by the forwards; a range ends where INT8's does, within half a step
        # of what the observer saw: at most a hair of the batch it saw is clamped
        assert (model(x) - ref).abs().max() < 0.01 * ref.abs().max()
        clamped, unclamped = (model(bright) - fake_bright).abs().max(), (plain(bright) - fake_bright).abs().max()
    assert clamped < 0.1 * fake_bright.abs().max() < unclamped, (clamped, unclamped)  # rounding, not saturation
    # an input range no training step observed is left as it is
    untrained = copy.deepcopy(plain)
    add_fake_quant(untrained, per_channel=True, reduce_range=True)
    remove_fake_quant(untrained)
    with torch.no_grad():
        assert torch.equal(untrained(bright), plain(bright))


@pytest.mark.parametrize("exporter, fmt", [("dynamo", "qoperator"), ("legacy", "qdq")])
def test_int8_of_a_fine_tuned_model_quantizes_each_input_over_its_trained_range(tmp_path, exporter, fmt):
    """The INT8 file of a model fine-tuned for INT8 puts each quantized layer's input on the grid it trained on
    (scale = range / 255): the calibration images, here dimmer than the batch the ranges trained on, reach only
    part of each range, and the ranges calibrated on them put the inputs on other grids. fastnet's MaxPool sits
    between a convolution's ReLU and the next clamp."""
    import numpy as np
    import onnx
    import torch
    from onnx import numpy_helper

    from transferkit.deploy.export import export_onnx
    from transferkit.deploy.fold import fold_batchnorm
    from transferkit.deploy.qat import TrainedRange, add_fake_quant, remove_fake_quant
    from transferkit.deploy.quantize import quantize
    from transferkit.models import build_model

    torch.manual_seed(0)
    model = fold_batchnorm(build_model("fastnet", 3, widths=[8, 16, 16], stem_width=8, activation="relu"))
    add_fake_quant(model, per_channel=True, reduce_range=True)
    x = torch.rand(16, 3, 32, 32)
    model.train()(x)  # the observers see a batch
    model = remove_fake_quant(model).eval()
    trained = [(m.low, m.high) for m in model.modules() if isinstance(m, TrainedRange)]
    assert len(trained) == sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in model.modules())
    export_onnx(model, tmp_path / "model.onnx", 32, exporter, None, log=lambda *_: None)

    def grids(ranges) -> np.ndarray:  # the activation scales of the INT8 file
        quantize(tmp_path / "model.onnx", tmp_path / "int8.onnx", (0.3 * x).numpy(), method="minmax", fmt=fmt,
                 per_channel=True, reduce_range=True, trained_ranges=ranges)
        saved = onnx.load(str(tmp_path / "int8.onnx")).graph.initializer
        return np.array([float(numpy_helper.to_array(t)) for t in saved
                         if t.name.endswith("_scale") and numpy_helper.to_array(t).size == 1])

    def on_a_grid(scales: np.ndarray) -> list[bool]:
        return [bool(np.isclose(scales, (high - low) / 255, rtol=1e-5).any()) for low, high in trained]

    assert all(on_a_grid(grids(trained))), on_a_grid(grids(trained))
    assert not any(on_a_grid(grids([])))  # calibrated: each on its own


def test_fake_quantization_observes_activation_ranges_in_training_only():
    """Validation (eval mode) moved the ranges too, torch's FakeQuantize observing whatever it sees: the val
    images that decide whether the INT8 model ships set the ranges the next training steps quantized with."""
    import torch

    from transferkit.deploy.qat import add_fake_quant
    from transferkit.models import build_model

    torch.manual_seed(0)
    model = build_model("fastnet", 3, widths=[8, 16, 16], stem_width=8, activation="relu")
    add_fake_quant(model, per_channel=True, reduce_range=False)
    model.train()(torch.rand(4, 3, 32, 32))
    observers = [m.activation_post_process for m in model.modules() if hasattr(m, "activation_post_process")]

    def ranges() -> torch.Tensor:
        return torch.stack([torch.stack([o.min_val, o.max_val]) for o in observers])

    trained = ranges()
    model.eval()(100 * torch.rand(4, 3, 32, 32))  # far outside what training saw
    assert torch.equal(ranges(), trained)
    model.train()(100 * torch.rand(4, 3, 32, 32))
    assert (ranges()[:, 1] > trained[:, 1]).any()  # training observes again


def test_lookahead_averages_weights_and_batchnorm_statistics_not_the_fake_quantization_observers():
    """Quantization-aware fine-tuning trains with prune's block, lookahead included where it is on: the
    observers' running min and max start at +-inf, and averaging them too turned every weight into NaN
    once the average's weight fell below one half (late in training)."""
    import torch

    from transferkit.deploy.fold import deployable
    from transferkit.deploy.qat import add_fake_quant
    from transferkit.models import build_model
    from transferkit.training.lookahead import Lookahead

    torch.manual_seed(0)
    model = deployable(build_model("fastnet", 3, widths=[8, 8, 8], stem_width=8).eval()).train()
    add_fake_quant(model, per_channel=True, reduce_range=True)
    holder, lookahead, steps = torch.nn.Module(), Lookahead(every=2), 10

    class Trainer:
        global_step, estimated_stepping_batches = 0, steps

    holder.model, trainer = model, Trainer()
    lookahead.on_train_start(trainer, holder)
    assert len(lookahead.average) == len(list(model.parameters())) + 2 * sum(  # weights and BN statistics only
        isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(1, steps + 1):
        opt.zero_grad()
        model(torch.rand(8, 3, 32, 32)).logsumexp(1).mean().backward()
        opt.step()
        trainer.global_step = step
        lookahead.on_train_batch_end(trainer, holder, None, None, step)
    assert all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point())


def test_quantization_aware_fine_tuning_when_post_training_loses_too_much(smoke_artifacts, tmp_path, monkeypatch,
                                                                         capsys, caplog):
    """Post-training INT8 made to score 0 on the val images (the stage's first check, doctored):
    the stage fine-tunes the model for INT8, quantizes it again, judges it on val for real, scores
    it on test and says so. The test images decide nothing."""
    import shutil

    import onnx
    import torch

    import transferkit
    from conftest import compose, run
    from transferkit.deploy import qat
    from transferkit.stages import quantize as stage

    real_check, results = stage.check, []

    def check(fp32, int8, task, threads, split="test"):
        results.append((split, real_check(fp32, int8, task, threads, split)))
        return {**results[-1][1], "int8_top1": 0.0} if len(results) == 1 else results[-1][1]

    monkeypatch.setattr(stage, "check", check)
    real_add, kept = qat.add_fake_quant, []  # the layers fine-tuning leaves in float: those INT8 leaves in float
    monkeypatch.setattr(qat, "add_fake_quant", lambda *args, keep, **kwargs: kept.append(keep) or real_add(
        *args, keep=keep, **kwargs))
    ref_cfg, _ = smoke_artifacts
    shutil.copytree(Path(ref_cfg.paths.artifacts_dir), tmp_path / "artifacts")
    caplog.set_level("INFO", logger="transferkit")
    run("quantize", compose("experiment=smoke", "quantize.max_drop=0.3", "quantize.qat_epochs=2",
                            "quantize.keep_float=[Gemm]", tmp=tmp_path))
    shown = capsys.readouterr().out + caplog.text  # printed, or logged where a Hydra app (pytest too) has handlers
    assert kept == [{"head.fc"}]
    out = tmp_path / "artifacts" / "quantize"
    q = json.loads((out / "quantize.json").read_text())
    # judged on val, post-training scored on test for the report, judged again on val, scored on test
    assert [split for split, _ in results] == ["val", "test", "val", "test"]
    assert q["produced_by"].startswith("quantization-aware fine-tuning (2 epochs") and q["judged_on"] == "val"
    assert q["post_training_val"]["int8_top1"] == 0.0 and q["post_training_val"]["n_val"] == 24
    assert q["post_training"]["int8_top1"] == results[1][1]["int8_top1"]
    assert q["val"] == results[2][1] and q["int8_top1"] == results[3][1]["int8_top1"]
    assert q["fp32_top1"] == results[3][1]["fp32_top1"] and q["n_test"] == results[3][1]["n_test"]
    # the stage ends with one line of what it made, as the training stages do
    assert (f"quantize: INT8 top-1 test {100 * q['int8_top1']:.1f}%, fp32 {100 * q['fp32_top1']:.1f}% (the same "
            f"prediction on {100 * q['top1_agreement']:.1f}% of {q['n_test']} images); ") in shown, shown
    larger = " (larger: its quantization nodes outweigh a model this small)" * (q["bytes"]["int8"] > q["bytes"]["fp32"])
    assert (f"file: fp32 {q['bytes']['fp32'] / 1e3:.1f} KB -> INT8 {q['bytes']['int8'] / 1e3:.1f} KB{larger}; by "
            f"quantization-aware fine-tuning (2 epochs") in shown  # a tiny model: its INT8 file may be the larger
    assert (out / "qat" / "model_fp32.onnx").is_file() and (out / "qat" / "dvclive").is_dir()
    # each fine-tuned layer's input keeps its trained range, as a Clip: the convolutions, not the Gemm kept in float
    ops = [[n.op_type for n in onnx.load(str(f)).graph.node]
           for f in (tmp_path / "artifacts" / "export" / "model.onnx", out / "qat" / "model_fp32.onnx")]
    assert ops[1].count("Clip") - ops[0].count("Clip") == ops[1].count("Conv") > 0 and ops[1].count("Gemm") == 1
    paths = [str(Path(m.__file__).resolve().parents[1]).encode() for m in (transferkit, torch)]  # src/, site-packages/
    for onnx_file in (out / "model.onnx", out / "qat" / "model_fp32.onnx"):  # no stack traces of this machine
        assert not any(p in onnx_file.read_bytes() for p in paths), onnx_file


def test_quantize_refuses_an_export_of_another_model(smoke_artifacts, tmp_path):
    """The INT8 file ships, and the fine-tuning trains, as prune's model.pt: an export of another model (`--in
    export=DIR`, or `transferkit export` by hand into the export stage's folder) would be reported in evaluate's
    table as the pruned model, with its size. Post-training quantization refuses it too."""
    from transferkit.deploy.export import export
    from transferkit.errors import TransferkitError
    from transferkit.stages.common import load_task
    from transferkit.stages.quantize import check_export_of
    from transferkit.stages.run import run_stage

    cfg, _ = smoke_artifacts
    artifacts = Path(cfg.paths.artifacts_dir)
    task = load_task(artifacts / "prepare", "target")
    check_export_of(artifacts / "prune" / "model.pt", artifacts / "export" / "model.onnx", task)  # its own: passes
    export(artifacts / "transfer" / "model.pt", tmp_path / "teacher", repeats=2, threads=1, log=lambda *_: None)
    with pytest.raises(TransferkitError, match=r"model\.onnx is not the export of .*prune/model\.pt \(their logits "
                                               r"differ on training images\).*Fix: give --in export= a folder"):
        check_export_of(artifacts / "prune" / "model.pt", tmp_path / "teacher" / "model.onnx", task)
    post_training = OmegaConf.merge(cfg, {"quantize": {"qat_epochs": 0, "max_drop": 1.0}})
    with pytest.raises(TransferkitError, match=r"is not the export of .*its INT8 file would ship as that model's"):
        run_stage("quantize", post_training, tmp_path / "quantize", {"export": tmp_path / "teacher"})
    assert not (tmp_path / "quantize").exists()


def test_report_says_which_quantization_produced_the_model():
    from transferkit.evaluation.report import quantize_section

    q = {"format": "qoperator", "per_channel": True, "method": "minmax", "calibration_images": 512, "n_test": 100,
         "top1_agreement": 0.99, "max_abs_logit_diff": 0.5, "size_ratio": 3.9, "fp32_top1": 0.78, "int8_top1": 0.775,
         "judged_on": "val", "val": {"fp32_top1": 0.8, "int8_top1": 0.795, "n_val": 500}}
    models = {"onnx_fp32": {"top1": 0.78, "size_bytes": 4e5}, "onnx_int8": {"top1": 0.775, "size_bytes": 1e5}}
    ptq = "\n".join(quantize_section({**q, "produced_by": "post-training quantization"}, models, {}))
    qat = "\n".join(quantize_section({**q, "produced_by": "quantization-aware fine-tuning (5 epochs, distilled from "
                                      "the teacher)", "post_training": {"int8_top1": 0.74},
                                      "post_training_val": {"fp32_top1": 0.8, "int8_top1": 0.7, "n_val": 500}},
                                     models, {}))
    judged = "its loss judged on the 500 val images (79.5% top-1, fp32 80.0%)"
    assert "quantized by post-training quantization" in ptq and judged in ptq
    assert "Post-training quantization alone" not in ptq
    assert "quantized by quantization-aware fine-tuning (5 epochs" in qat and judged in qat
    assert ("alone lost more than quantize.max_drop allows on the 500 val images (70.0% top-1, fp32 80.0%), and "
            "reached 74.0% top-1 on the test images (fp32: 78.0%)") in qat
    assert "the file 3.90x smaller" in ptq
    tiny = "\n".join(quantize_section({**q, "size_ratio": 7796 / 9398, "produced_by": "post-training quantization"},
                                      models, {}))
    assert "the file 1.21x larger" in tiny  # a tiny model: INT8's scales outweigh what its weights save
    # faster is one word each way: throughput 2x higher and latency 2x shorter, not "x2.00" and "x0.50"
    timed = {"onnx_fp32": {"throughput_img_s": 100.0, "throughput_img_s_1thread": 60.0, "latency_ms_bs1": 0.5},
             "onnx_int8": {"throughput_img_s": 200.0, "throughput_img_s_1thread": 40.0, "latency_ms_bs1": 0.25}}
    fast = "\n".join(quantize_section({**q, "produced_by": "post-training quantization"}, models, timed))
    assert ("the throughput 2.00x higher (on 1 thread 1.50x lower), the batch-1 latency 2.00x shorter." in fast), fast


def test_int8_keeps_the_relu_after_max_pooling(tmp_path):
    """fastnet's Conv -> MaxPool -> BatchNorm -> ReLU, folded for deployment: ONNX Runtime's INT8
    operators fuse a ReLU straight after a convolution and mishandle one after max pooling, so the
    deployed model has the ReLU before the pooling, where it computes the same."""
    import torch

    from transferkit.deploy.export import export_onnx
    from transferkit.deploy.fold import fold_batchnorm
    from transferkit.deploy.quantize import quantize
    from transferkit.evaluation.metrics import predict_onnx
    from transferkit.models import build_model

    torch.manual_seed(0)
    model = build_model("fastnet", 3, widths=[8, 16, 16], stem_width=8, activation="relu").eval()
    for bn in [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]:  # as if trained
        bn.weight.data.uniform_(0.5, 1.5), bn.bias.data.normal_(0, 0.5), bn.running_mean.normal_(0, 0.5)
    deployed = fold_batchnorm(model)
    for seq in [m for m in deployed.modules() if isinstance(m, torch.nn.Sequential)]:
        ops = [m for m in seq if not isinstance(m, torch.nn.Identity)]  # as the exported graph has them
        assert not any(isinstance(a, torch.nn.MaxPool2d) and isinstance(b, torch.nn.ReLU) for a, b in zip(ops, ops[1:]))
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.allclose(deployed(images.float() / 255), model(images.float() / 255), atol=1e-5)
    export_onnx(deployed, tmp_path / "fp32.onnx", 32, "auto", None, log=lambda *_: None)
    quantize(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", (images.float() / 255).numpy(), method="minmax",
             fmt="qoperator", per_channel=True, reduce_range=True)
    a, b = (predict_onnx(tmp_path / f, images, 500, threads=1).numpy() for f in ("fp32.onnx", "int8.onnx"))
    assert np.abs(a - b).max() < 0.1 * np.abs(a).max()  # INT8 rounding, not a lost ReLU


def test_a_refusal_with_8_bit_weights_suggests_7_bit_ones():
    from transferkit.deploy.quantize import refuse

    result = {"fp32_top1": 0.76, "int8_top1": 0.73}
    assert "3.00 points of top-1 against fp32 on the val images" in str(refuse(result, 0.01, 5))
    assert "quantize.reduce_range=true" in str(refuse(result, 0.01, 5, reduce_range=False))
    assert "reduce_range" not in str(refuse(result, 0.01, 5, reduce_range=True))  # 7-bit already: not a fix


def test_quantization_aware_fine_tuning_keeps_an_unstructured_pruned_model_sparse():
    """The INT8 model of an unstructured-pruned student is that student: fine-tuning for INT8 must not
    regrow the weights pruning zeroed (the quantize stage passes keep_zeros for prune.mode=unstructured)."""
    import torch

    from transferkit.deploy.fold import deployable
    from transferkit.deploy.qat import add_fake_quant, remove_fake_quant
    from transferkit.models import build_model
    from transferkit.prune.unstructured import make_permanent, prune_weights, sparsity

    def tuned(keep_zeros: bool) -> float:
        torch.manual_seed(0)
        student = build_model("fastnet", 3, widths=[8, 16, 16], stem_width=8, activation="relu")
        prune_weights(student, 0.6, ["head"], criterion="l1", scope="layer")
        make_permanent(student)
        model = deployable(student.eval()).train()
        before = sparsity(model, ["head"])
        add_fake_quant(model, per_channel=True, reduce_range=True, keep_zeros=keep_zeros)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        for _ in range(5):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(torch.rand(8, 3, 32, 32)), torch.randint(0, 3, (8,))).backward()
            opt.step()
        remove_fake_quant(model)
        assert before == pytest.approx(0.6, abs=0.01)
        return sparsity(model, ["head"])

    assert tuned(keep_zeros=True) == pytest.approx(0.6, abs=0.01)
    assert tuned(keep_zeros=False) < 0.3  # what the stage did before: most zeros grew back
    # the mask moves with the model, as Lightning moves it to the GPU (here: to the meta device)
    model = build_model("fastnet", 3, widths=[8, 8, 8], stem_width=8)
    add_fake_quant(model, per_channel=True, reduce_range=True, keep_zeros=True)
    model.to("meta")
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert all(m.parametrizations.weight[0].mask.is_meta for m in layers)


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_quantization_aware_fine_tuning_leaves_the_layers_keep_float_names_in_float(tmp_path, exporter):
    """quantize.keep_float names nodes of the exported file (or their op types), which ONNX Runtime leaves in
    float: fine-tuning for INT8 leaves the same layers unquantized, whichever exporter wrote the file (the
    TorchScript-based one writes a Linear without bias as MatMul, its weight transposed and renamed)."""
    import onnx
    import torch
    from torch.nn.utils import parametrize

    from transferkit.deploy.export import export_onnx
    from transferkit.deploy.fold import deployable
    from transferkit.deploy.qat import add_fake_quant, float_layers
    from transferkit.errors import TransferkitError
    from transferkit.models import build_model

    torch.manual_seed(0)
    trained = build_model("fastnet", 3, widths=[8, 16, 16], stem_width=8, activation="relu").eval()
    # as the stage does: the export folds the logit scale into the classifier, fine-tuning keeps it a scale
    export_onnx(deployable(trained), tmp_path / "model.onnx", 32, exporter, None, log=lambda *_: None)
    model = deployable(trained, for_training=True)
    assert model.head.scale != 1.0
    nodes = onnx.load(str(tmp_path / "model.onnx")).graph.node
    classifier = next(n.op_type for n in nodes if n.op_type in ("Gemm", "MatMul"))
    assert classifier == {"dynamo": "Gemm", "legacy": "MatMul"}[exporter] == nodes[-1].op_type
    convs = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    second_conv = [n.name for n in nodes if n.op_type == "Conv"][1]
    assert float_layers(model, tmp_path / "model.onnx", [classifier]) == {"head.fc"}
    assert float_layers(model, tmp_path / "model.onnx", [second_conv, "Relu"]) == {convs[1]}  # ReLU: no layer
    assert float_layers(model, tmp_path / "model.onnx", ["Conv"]) == set(convs)
    assert float_layers(model, tmp_path / "model.onnx", []) == set()
    with pytest.raises(TransferkitError, match=rf"\['Softmax'\] is neither a node name nor an op type.* Fix: .*"
                                               rf"\({classifier} keeps the classifier in float\)\.$"):
        float_layers(model, tmp_path / "model.onnx", ["Softmax"])

    add_fake_quant(model, per_channel=True, reduce_range=True, keep={"head.fc", convs[1]})
    float_ones = [name for name, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
                  and not parametrize.is_parametrized(m, "weight") and not hasattr(m, "input_quant")]
    assert float_ones == [convs[1], "head.fc"]


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_a_linear_layers_batchnorm_is_folded_so_keep_float_finds_its_weights_in_the_file(tmp_path, exporter):
    """vgg_mini's hidden Linear layers each feed a BatchNorm1d, which both exporters fold into the layer's Gemm:
    the deployable model folds it first, so each Gemm holds the weights of a layer that fine-tuning can leave
    in float, and the model computes what it did."""
    import torch

    from transferkit.deploy.export import export_onnx
    from transferkit.deploy.fold import deployable
    from transferkit.deploy.qat import float_layers
    from transferkit.models import model_from_config

    torch.manual_seed(0)
    model = model_from_config({"name": "vgg_mini", "widths": [8] * 9, "fc_width": 16}, 5).eval()
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)):
            bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.uniform_(-2, 2)
    deployed = deployable(model)
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in deployed.modules())
    x = torch.randn(8, 3, 32, 32)
    torch.testing.assert_close(deployed(x), model(x), atol=1e-4, rtol=1e-4)
    export_onnx(deployed, tmp_path / "model.onnx", 32, exporter, None, log=lambda *_: None)
    linears = {name for name, m in deployed.named_modules() if isinstance(m, torch.nn.Linear)}
    assert len(linears) == 3 and float_layers(deployed, tmp_path / "model.onnx", ["Gemm"]) == linears


def test_a_full_disk_while_quantizing_is_not_blamed_on_the_model(tmp_path, monkeypatch):
    import errno

    import onnxruntime.quantization
    import torch

    from transferkit.deploy.export import export
    from transferkit.deploy.quantize import quantize
    from transferkit.io import disk_full
    from transferkit.models import build_model, save_checkpoint

    torch.manual_seed(0)
    save_checkpoint(build_model("fastnet", 5, widths=[8, 16, 16], stem_width=8).eval(), tmp_path / "model.pt",
                    list("abcde"), stage="prune")
    export(tmp_path / "model.pt", tmp_path / "export", None, repeats=1, batch_size=8, threads=1, log=lambda *_: None)

    def no_room(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(onnxruntime.quantization, "quantize_static", no_room)
    calibration = np.random.default_rng(0).random((8, 3, 32, 32), dtype=np.float32)
    with pytest.raises(OSError) as raised:  # the stage turns it into its one disk-full line, naming the fix
        quantize(tmp_path / "export" / "model.onnx", tmp_path / "int8.onnx", calibration, method="minmax",
                 fmt="qoperator", per_channel=True, reduce_range=True)
    assert disk_full(raised.value) and "cannot quantize" not in str(raised.value)


@pytest.mark.parametrize("stage", ["quantize", "evaluate"])
def test_an_exported_model_of_another_task_is_refused_before_it_is_scored(smoke_artifacts, tmp_path, stage):
    """The pretrained model exported (the source task's four classes) and handed to quantize or evaluate as the
    deployable model: it was scored against the target task's labels, and evaluate's report put its accuracy
    beside the pruned student's size, without a word."""
    from transferkit.deploy.export import export
    from transferkit.errors import TransferkitError
    from transferkit.stages import inputs_of
    from transferkit.stages.run import run_stage

    cfg, _ = smoke_artifacts
    artifacts = Path(cfg.paths.artifacts_dir)
    export(artifacts / "pretrain" / "model.pt", tmp_path / "export")
    out = tmp_path / stage
    shutil.copytree(artifacts / stage, out)  # an earlier run's outputs
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(TransferkitError, match=r"export/model.onnx was exported from a model of classes \[.*\], but "
                                               r"the target task is .*Fix: rerun 'export' on this task"):
        run_stage(stage, cfg, out, {**inputs_of(stage, artifacts), "export": tmp_path / "export"})
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_fake_quantization_with_one_scale_per_tensor_rounds_to_the_grid_of_the_largest_weight():
    """quantize.per_channel=false: one scale, the largest |weight| / 64 (reduce_range), for the whole tensor, as
    ONNX Runtime quantizes it: every weight lands on that grid and none is clipped."""
    import torch

    from transferkit.deploy.qat import FakeQuantWeight

    w = torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(0))
    step = w.abs().max() / 64
    levels = FakeQuantWeight(per_channel=False, reduce_range=True)(w) / step
    assert torch.allclose(levels, levels.round(), atol=1e-4)
    assert (levels * step - w).abs().max() <= step / 2 + 1e-6 and levels.abs().max() == pytest.approx(64)


def test_fake_quantization_gives_each_layers_input_the_256_levels_of_uint8():
    """The inputs are fake-quantized as ONNX Runtime quantizes them, to uint8: 256 levels over the range
    training observed, not fewer."""
    import torch

    from transferkit.deploy.qat import add_fake_quant
    from transferkit.models import build_model

    torch.manual_seed(0)
    model = build_model("fastnet", 3, widths=[8, 8, 8], stem_width=8, activation="relu")
    add_fake_quant(model, per_channel=True, reduce_range=True)
    model.train()(torch.rand(4, 3, 32, 32))
    quant = model.blocks[1][0][0].input_quant.eval()
    seen = quant.activation_post_process
    levels = torch.unique(quant(torch.linspace(float(seen.min_val), float(seen.max_val), 10_000)))
    assert 250 <= len(levels) <= 256


def test_the_int8_check_scores_each_file_by_its_own_logits_and_sizes_compare_the_files(tmp_path, monkeypatch):
    import torch

    from transferkit.deploy import quantize as q

    logits = {"fp32.onnx": [[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, 2.0]],  # classes 0 1 0 1
              "int8.onnx": [[2.0, 0.0], [1.5, 0.5], [2.0, 0.0], [1.0, 0.0]]}  # classes 0 0 0 0
    monkeypatch.setattr(q, "predict_onnx", lambda path, images, batch_size, threads: torch.tensor(logits[path.name]))
    task = {"val_x": torch.zeros(4, 3, 8, 8, dtype=torch.uint8), "val_y": torch.tensor([0, 1, 0, 1])}
    got = q.check(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", task, threads=1, split="val")
    assert got == {"fp32_top1": 1.0, "int8_top1": 0.5, "top1_agreement": 0.5, "max_abs_logit_diff": 2.0,
                   "n_val": 4}
    (tmp_path / "fp32.onnx").write_bytes(b"x" * 400)
    (tmp_path / "int8.onnx").write_bytes(b"x" * 100)
    assert q.sizes(tmp_path / "fp32.onnx", tmp_path / "int8.onnx") == {"bytes": {"fp32": 400, "int8": 100},
                                                                       "size_ratio": 4.0}


def test_the_int8_model_is_judged_on_training_images_where_the_task_keeps_no_val_images():
    """Never on the test images it is scored on."""
    import torch

    from transferkit.deploy.quantize import decision_split

    assert decision_split({"val_y": torch.zeros(3, dtype=torch.long)}) == "val"
    assert decision_split({"val_y": torch.zeros(0, dtype=torch.long)}) == "train"


def test_keep_zeros_fake_quantizes_the_weights_pruning_kept_and_only_those():
    """An unstructured-pruned student fine-tuned for INT8: its zeros stay zero, and every weight it kept trains
    fake-quantized, within half a step of its INT8 grid of what it was (not masked away with the zeros)."""
    import torch

    from transferkit.deploy.qat import QUANTIZED, add_fake_quant
    from transferkit.models import build_model
    from transferkit.prune.unstructured import make_permanent, prune_weights

    torch.manual_seed(0)
    model = build_model("fastnet", 3, widths=[8, 16, 16], stem_width=8, activation="relu")
    prune_weights(model, 0.6, ["head"], criterion="l1", scope="layer")
    make_permanent(model)
    before = {name: m.weight.detach().clone() for name, m in model.named_modules() if isinstance(m, QUANTIZED)}
    add_fake_quant(model, per_channel=True, reduce_range=True, keep_zeros=True)
    for name, m in model.named_modules():
        if name in before:
            w = before[name]
            half_step = (w.abs().flatten(1).amax(1) / 64 / 2).view(-1, *[1] * (w.dim() - 1))
            assert not m.weight[w == 0].any() and ((m.weight - w).abs() <= half_step + 1e-6).all(), name


def test_a_keep_float_node_whose_weights_no_layer_holds_is_one_error(tmp_path):
    """The exported file is of another student than the pruned one fine-tuning reads (an export not rerun): the
    layer keep_float names cannot be found, and the stage says so in one line."""
    import torch

    from transferkit.deploy.export import export_onnx
    from transferkit.deploy.fold import deployable
    from transferkit.deploy.qat import float_layers
    from transferkit.errors import TransferkitError
    from transferkit.models import build_model

    torch.manual_seed(0)
    model = deployable(build_model("fastnet", 3, widths=[8, 16, 16], stem_width=8, activation="relu").eval())
    export_onnx(model, tmp_path / "model.onnx", 32, "legacy", None, log=lambda *_: None)
    with torch.no_grad():
        model.head.fc.weight.add_(1.0)  # retrained since the export
    with pytest.raises(TransferkitError, match=r"holds the weights of no layer of the pruned student.*Fix: export"):
        float_layers(model, tmp_path / "model.onnx", ["MatMul"])


def test_calibration_can_take_every_training_image_and_no_more():
    import torch

    from transferkit.deploy.quantize import calibration_images
    from transferkit.errors import TransferkitError

    images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    task = {"train_x": images, "train_y": torch.arange(6) // 3}
    assert calibration_images(task, 6).shape == (6, 3, 8, 8)
    for n in (7, 0):  # 0 stopped the comparison before it counted the images: an UnboundLocalError
        with pytest.raises(TransferkitError, match=rf"quantize.calibration_images={n} is invalid.*set it in 1..6"):
            calibration_images(task, n)


def test_entropy_and_percentile_calibration_clip_the_ranges_minmax_keeps_whole(tmp_path):
    """quantize.method picks how activation ranges are calibrated: minmax keeps each range whole, while entropy
    (the KL search over a fine histogram) and percentile clip the rare large values, each in its own way, so
    the three give three sets of activation scales."""
    import onnx
    import torch
    from onnx import numpy_helper

    from transferkit.deploy.export import export_onnx
    from transferkit.deploy.quantize import METHODS, quantize
    from transferkit.models import build_model

    torch.manual_seed(0)
    export_onnx(build_model("fastnet", 3, widths=[8, 8, 8], stem_width=8).eval(), tmp_path / "fp32.onnx", 32, "auto",
                None, log=lambda *_: None)
    rng = np.random.default_rng(0)
    calibration = np.clip(0.5 + 0.05 * rng.standard_normal((32, 3, 32, 32), dtype=np.float32), 0, 1)
    calibration[0, :, :2, :2] = 1.0  # a few extreme pixels: the tails
    scales = {}
    for method in METHODS:
        out = tmp_path / f"{method}.onnx"
        quantize(tmp_path / "fp32.onnx", out, calibration, method=method, fmt="qoperator", per_channel=True,
                 reduce_range=True)
        graph = onnx.load(str(out)).graph
        tensors = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        # QLinearConv's inputs: x, x_scale, x_zero_point, w, w_scale, w_zero_point, y_scale, ...
        scales[method] = np.array([float(tensors[n.input[6]]) for n in graph.node if n.op_type == "QLinearConv"])
    assert len(scales["minmax"]) >= 4
    for method in ("entropy", "percentile"):
        assert (scales[method] <= scales["minmax"] * (1 + 1e-6)).all(), method  # a clipped range, never a wider one
        assert not np.allclose(scales[method], scales["minmax"], rtol=1e-4), method
    assert (scales["entropy"] < 0.5 * scales["minmax"]).any()  # the KL search cuts a long tail hard
    assert not np.allclose(scales["entropy"], scales["percentile"], rtol=1e-4)


def test_the_quantize_line_says_which_file_is_which_and_when_int8_is_the_larger():
    """'7.8 KB -> 9.4 KB' on the smoke model said neither which file was which nor that INT8 was the larger."""
    from transferkit.evaluation.tables import quantize_line

    result = {"int8_top1": .5, "fp32_top1": .5, "top1_agreement": 1.0, "n_test": 10}
    smaller, larger = (quantize_line({**result, "bytes": {"fp32": 7800, "int8": n}}, "post-training")
                       for n in (2000, 9400))
    assert "file: fp32 7.8 KB -> INT8 2.0 KB; by post-training" in smaller
    assert "file: fp32 7.8 KB -> INT8 9.4 KB (larger: its quantization nodes outweigh a model this small); by" in larger
