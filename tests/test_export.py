"""Export and predict: ONNX and TorchScript of tiny fastnet, mobilenet (depthwise) and pruned
models match PyTorch (ONNX within 1e-4, TorchScript exactly), `predict` classifies PNG/JPEG
files like the PyTorch model with every kind of model file, and bad input ends in one error line."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import cli as command, dvc_project, made_once, one_error_line, refuse_listing
from transferkit import cli
from transferkit.deploy.export import export
from transferkit.deploy.fold import deployable, first_conv, fold_batchnorm
from transferkit.deploy.predict import predict
from transferkit.deploy.runtime import Classifier
from transferkit.errors import TransferkitError
from transferkit.models import build_model, load_checkpoint, model_from_config, save_checkpoint
from transferkit.prune.structured import prune_channels

CLASSES = ["cat", "deer", "dog", "frog", "horse"]
MODELS = ["fastnet", "mobilenet", "pruned"]
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.*deprecated:FutureWarning")


def _coloured(n: int, seed: int) -> torch.Tensor:
    """Images in [0, 1], each a colour of its own under noise: what a model's features can tell apart."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, 1, 1, generator=g) + 0.2 * torch.randn(n, 3, 32, 32, generator=g)).clamp(0, 1)


@torch.no_grad()
def _busy_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """Fresh BatchNorm layers are identities; give them scales, shifts and the statistics of coloured images
    (random statistics squash every image's features to the same values, and every image to one class)."""
    g = torch.Generator().manual_seed(1)
    norms = {m: m.momentum for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    for m in norms:
        n = m.num_features
        m.weight.copy_(torch.rand(n, generator=g) + 0.5)
        m.bias.copy_(torch.randn(n, generator=g) * 0.1)
        m.reset_running_stats()
        m.momentum = None  # the plain average over the batches seen: here, the one batch
    model.train()(_coloured(64, 1))
    for m, momentum in norms.items():
        m.momentum = momentum
        # a channel these images leave near-constant would, folded, scale its convolution and the rounding
        # up ~100-fold: the check is of the export, not of that
        m.running_var.clamp_(min=1e-2)
    return model.eval()


@torch.no_grad()
def _fit_head(model: torch.nn.Module) -> torch.nn.Module:
    """A head fitted (ridge regression, a least-squares fit kept small) to name each image's strongest colour
    channel (classes 0-2), so that the model's classes and probabilities follow its input: agreeing with it
    then means something."""
    x = _coloured(256, 2)
    head = model.eval().head
    features = head.pool(model.features(x)).flatten(1)
    features = torch.cat([features, torch.ones(len(x), 1)], 1) if head.fc.bias is not None else features
    targets = 4 * torch.nn.functional.one_hot(x.mean((2, 3)).argmax(1), 5).float() - 1
    w = torch.linalg.solve(features.T @ features + torch.eye(features.shape[1]), features.T @ targets).T
    head.fc.weight.copy_(w[:, :head.fc.in_features] / head.scale)
    if head.fc.bias is not None:
        head.fc.bias.copy_(w[:, -1] / head.scale)
    return model


def _make(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "fastnet":  # conf/model/fastnet_tiny.yaml
        return _fit_head(_busy_batchnorm(model_from_config(
            {"name": "fastnet", "widths": [8, 16, 16], "stem_width": 8, "bn_momentum": 0.2}, 5)))
    if kind == "mobilenet":
        return _fit_head(_busy_batchnorm(model_from_config({"name": "mobilenet", "width_mult": 0.35}, 5)))
    if kind == "resnet18":
        return _busy_batchnorm(model_from_config({"name": "resnet18", "weights": None}, 5))
    if kind == "vgg_mini":
        return _busy_batchnorm(model_from_config({"name": "vgg_mini", "widths": [8] * 9, "fc_width": 16}, 5))
    model = _busy_batchnorm(build_model("fastnet", 5, widths=[16, 32, 32], stem_width=8))
    prune_channels(model, criterion="l2", target="channels", ratio=0.3, keep=["head"])
    model.arch["pruned"] = True  # as the prune stage records it
    return _fit_head(model)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each model saved as a stage would save it, plus its export, checked on a fake test set (tests
    only read them: one that writes an export works on a copy)."""
    def make(root):
        g = torch.Generator().manual_seed(0)
        torch.save({"classes": CLASSES, "test_x": torch.randint(0, 256, (48, 3, 32, 32), dtype=torch.uint8,
                                                                generator=g),
                    "test_y": torch.randint(0, 5, (48,), generator=g)}, root / "target.pt")
        results = {}
        for kind in MODELS:
            save_checkpoint(_make(kind), root / kind / "model.pt", CLASSES, stage="prune")
            results[kind] = export(root / kind / "model.pt", root / kind / "export", root / "target.pt", repeats=5,
                                   batch_size=16, threads=1, log=lambda *_: None)
        (root / "results.json").write_text(json.dumps(results))

    root = made_once(tmp_path_factory, "export", make)
    results = json.loads((root / "results.json").read_text())
    return root, root / "target.pt", {kind: (root / kind, results[kind]) for kind in MODELS}


@pytest.mark.parametrize("kind", ["resnet18", "vgg_mini"])
def test_the_other_model_presets_export_and_match_pytorch(tmp_path, kind):
    """Any stage's model.pt exports (a transfer teacher of model=resnet18, a student of model@distill.student=
    vgg_mini): until now only fastnet, mobilenet and a pruned fastnet were exported by a test."""
    save_checkpoint(_make(kind), tmp_path / "model.pt", CLASSES, stage="transfer")
    result = export(tmp_path / "model.pt", tmp_path / "export", repeats=2, batch_size=64, threads=1,
                    log=lambda *_: None)
    assert result["onnx"]["within"] and result["torchscript"]["within"] and result["onnx"]["top1_agreement"] == 1.0
    assert len(predict(tmp_path / "export" / "model.onnx", _write_images(tmp_path / "images"))) == 5


@pytest.mark.parametrize("kind", MODELS)
def test_exports_match_pytorch(exported, kind):
    import onnxruntime as ort

    folder, result = exported[2][kind]
    assert result["n_checked"] == 48 and "target.pt" in result["checked_on"]
    assert result["onnx"]["within"] and result["onnx"]["top1_agreement"] == 1.0
    # TorchScript runs the folded model in PyTorch's own kernels (bit for bit: below): off the model as trained
    # by the folding's fp32 rounding alone, a few millionths of these logits (up to ~10)
    assert result["torchscript"]["max_abs_diff"] <= 3e-5 and result["torchscript"]["top1_agreement"] == 1.0
    # and how busy other processes kept the CPU meanwhile, which the summary warns of from a quarter of a core
    assert set(result["latency_ms_batch1"]) >= {"pytorch", "onnxruntime", "torchscript", "other_cores"}
    from transferkit.deploy.export import summary

    for busy in (0.0, 0.9):
        result = {**result, "latency_ms_batch1": {**result["latency_ms_batch1"], "other_cores": busy}}
        assert ("While export timed, other processes kept 0.90" in summary(result, folder)) is (busy == 0.9)
    saved = json.loads((folder / "export" / "export.json").read_text())
    assert saved["classes"] == CLASSES and saved["onnx"] == result["onnx"]
    assert not [p for p in (folder / "export").iterdir() if p.name.startswith(".")]  # no temporary files left

    # an independent check: another batch size (the batch axis is dynamic) and other images
    model, _ = load_checkpoint(folder / "model.pt", "prune")
    x = torch.rand(7, 3, 32, 32)
    with torch.no_grad():
        ref = model.eval()(x).numpy()
    session = ort.InferenceSession(str(folder / "export" / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert got.shape == (7, 5) and np.abs(got - ref).max() <= 1e-4
    ts = torch.jit.load(str(folder / "export" / "model.torchscript.pt"))
    with torch.no_grad():
        # the exports are of the deployable model (BatchNorm and input scaling folded): bit for bit
        assert torch.equal(ts(x), deployable(model)(x))


@pytest.mark.parametrize("tta", ["flip", "flip_translate"])
def test_onnx_scores_with_the_same_test_time_views_as_pytorch(exported, tta):
    """evaluate scores the ONNX files with evaluate.tta (cifar10_full: flip_translate) as it scores
    the PyTorch models: the same views, averaged alike, in batches whose last one is short."""
    from transferkit.evaluation.metrics import predict as predict_torch, predict_onnx

    folder, _ = exported[2]["fastnet"]
    model, _ = load_checkpoint(folder / "model.pt", "prune")
    images = torch.load(exported[1], weights_only=True)["test_x"][:20]
    want = predict_torch(model, images, batch_size=8, tta=tta)
    got = predict_onnx(folder / "export" / "model.onnx", images, batch_size=8, tta=tta, threads=1)
    views = (want - predict_torch(model, images, batch_size=8, tta="none")).abs().max()
    assert (got - want).abs().max() < views / 100  # far closer to PyTorch's views than the views are to one view


def test_exported_files_hold_no_path_of_this_machine(exported):
    # the same model exported from a clone in another folder gives the same bytes, and a shipped
    # file does not tell where its maker's files live
    import zipfile
    from pathlib import Path

    import torch

    import transferkit

    _, _, out = exported
    paths = [str(Path(m.__file__).resolve().parents[1]).encode() for m in (transferkit, torch)]  # src/, site-packages/
    for folder, result in out.values():
        files = folder / "export"
        assert not any(p in (files / "model.onnx").read_bytes() for p in paths)
        archive = zipfile.ZipFile(files / "model.torchscript.pt")
        assert all(n.startswith("archive/") for n in archive.namelist()), archive.namelist()[:3]
        assert not any(p in archive.read(n) for n in archive.namelist() for p in paths)


def test_report_shows_every_runtime_the_export_checked(exported):
    from transferkit.evaluation.report import export_section

    folder, _ = exported[2]["pruned"]
    saved = json.loads((folder / "export" / "export.json").read_text())
    rows = {line.split(" | ")[0].lstrip("| "): line for line in export_section(saved) if line.startswith("| ")}
    assert set(rows) >= {"PyTorch (eager; BatchNorm not folded, as the exports fold it)", "ONNX Runtime", "TorchScript"}
    assert f"{saved['onnx']['max_abs_diff']:.1e}" in rows["ONNX Runtime"]
    assert f"{saved['latency_ms_batch1']['onnxruntime']:.2f} ms" in rows["ONNX Runtime"]
    assert f"{saved['torchscript']['max_abs_diff']:.1e}" in rows["TorchScript"]


def _write_images(folder) -> list:
    """Five image files whose classes differ: three 32x32 PNGs, red, green and blue under noise; a larger
    yellow RGBA PNG, half of whose pixels are see-through; a grey JPEG."""
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    noisy = lambda h, w, colour: np.clip(rng.normal(colour, 40, (h, w, 3)), 0, 255).astype(np.uint8)  # noqa: E731
    paths = []
    for i, colour in enumerate([(200, 40, 40), (40, 200, 60), (50, 60, 210)]):  # already 32x32
        paths.append(folder / f"img{i}.png")
        Image.fromarray(noisy(32, 32, colour)).save(paths[-1])
    paths.append(folder / "big_rgba.png")  # resized, and converted to RGB over white
    alpha = rng.integers(0, 256, (40, 50, 1), dtype=np.uint8)
    Image.fromarray(np.concatenate([noisy(40, 50, (220, 200, 30)), alpha], 2), "RGBA").save(paths[-1])
    paths.append(folder / "gray.jpg")
    Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8), "L").save(paths[-1])
    return paths


def _reference(model, paths) -> np.ndarray:
    """What the PyTorch model says, with the preprocessing written out independently: see-through
    pixels over white, as a viewer shows them."""
    x = []
    for p in paths:
        img = Image.open(p)
        if img.mode == "RGBA":
            img = Image.alpha_composite(Image.new("RGBA", img.size, "white"), img)
        img = img.convert("RGB")
        if img.size != (32, 32):
            img = img.resize((32, 32), Image.BILINEAR)
        x.append(np.asarray(img).transpose(2, 0, 1))
    with torch.no_grad():
        return torch.softmax(model.eval()(torch.from_numpy(np.stack(x)).float() / 255), 1).numpy()


@pytest.mark.parametrize("kind", MODELS)
def test_predict_agrees_with_pytorch_for_every_model_file(exported, tmp_path, kind):
    folder, _ = exported[2][kind]
    paths = _write_images(tmp_path / "images")
    model, _ = load_checkpoint(folder / "model.pt", "prune")
    probs = _reference(model, paths)
    assert len(set(probs.argmax(1))) >= 2 and np.ptp(probs.max(1)) > 0.05  # a model whose answers vary
    import shutil

    shutil.copy(folder / "model.pt", tmp_path / "renamed.onnx")  # a model.pt given another name: read as what it is
    for file in ("model.pt", "export/model.onnx", "export/model.torchscript.pt", tmp_path / "renamed.onnx"):
        results = predict(folder / file, paths, trust_code=str(file).endswith("torchscript.pt"))
        assert [r["path"] for r in results] == [str(p) for p in paths]
        assert [r["class"] for r in results] == [CLASSES[i] for i in probs.argmax(1)], file
        assert np.allclose([r["probability"] for r in results], probs.max(1), atol=1e-4)
        assert all(len(r["top"]) == 3 and r["top"][0]["class"] == r["class"] for r in results)


def test_predict_command_lines_json_and_folders(exported, tmp_path, capsys):
    folder, _ = exported[2]["fastnet"]
    paths = _write_images(tmp_path / "images")
    onnx = str(folder / "export" / "model.onnx")
    assert cli.main(["predict", onnx, *map(str, paths)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(paths)
    assert all(ln.startswith(str(p)) and "top-3:" in ln for ln, p in zip(lines, paths))
    (tmp_path / "images" / f"._{paths[0].name}").write_bytes(b"\0\5\26\7 AppleDouble")  # macOS's copy: no image
    (tmp_path / "images" / ".ipynb_checkpoints").mkdir()
    (tmp_path / "images" / ".ipynb_checkpoints" / paths[0].name).write_bytes(paths[0].read_bytes())
    assert cli.main(["predict", onnx, str(tmp_path / "images"), "--json"]) == 0  # a folder: every image in it
    results = json.loads(capsys.readouterr().out)
    assert sorted(r["path"] for r in results) == sorted(map(str, paths))
    assert all(r["class"] in CLASSES and 0 < r["probability"] <= 1 for r in results)


def test_predict_names_a_link_to_nothing_in_a_folder_rather_than_leaving_it_out(exported, tmp_path, capsys):
    """A dangling link among a folder's images was skipped without a word (is_file() is False), where prepare
    refuses it: the folder's results silently lacked an image the user asked for."""
    folder, _ = exported[2]["fastnet"]
    paths = _write_images(tmp_path / "images")
    (tmp_path / "images" / "gone.png").symlink_to(tmp_path / "moved.png")
    assert cli.main(["predict", str(folder / "export" / "model.onnx"), str(tmp_path / "images")]) == 2
    err = capsys.readouterr().err
    assert f"cannot read 1 of {len(paths) + 1} image(s): {tmp_path / 'images' / 'gone.png'} (a link to nothing)" in err


def test_predict_refuses_a_folder_it_cannot_list_and_a_file_too_large_to_be_an_image(exported, tmp_path, monkeypatch):
    """A subfolder this user cannot list (copied from another user) was left out of the results without a word; a
    file larger than a quarter of memory (a video renamed .png) was read whole. Root lists anything: simulated."""
    from transferkit.data.memory import memory_limit
    from transferkit.deploy.predict import predict

    folder, _ = exported[2]["fastnet"]
    onnx = folder / "export" / "model.onnx"
    (tmp_path / "images" / "b").mkdir(parents=True)
    paths = _write_images(tmp_path / "images" / "a")
    (tmp_path / "images" / "b" / "1.png").write_bytes(paths[0].read_bytes())
    with open(tmp_path / "huge.png", "wb") as f:
        f.truncate(memory_limit() + 1)  # sparse: no disk used
    with pytest.raises(TransferkitError, match=r"cannot read 1 of 2 image\(s\): .*huge.png \([0-9.]+ GB, more than a "
                                               r"quarter of the memory this process may use: no image\)"):
        predict(onnx, [paths[0], tmp_path / "huge.png"])
    refuse_listing(monkeypatch, tmp_path / "images" / "b")
    with pytest.raises(TransferkitError, match=r"cannot read folder .*images/b \(Permission denied\). Fix: make it "
                                               r"readable"):
        predict(onnx, [tmp_path / "images"])


def test_predict_shows_file_names_as_text(exported, tmp_path, capsys):
    """A file named "b\\nevil.png tgt_a 0.999" printed a line of results of its own, and one holding an escape
    sequence drove the terminal: in the results and in the error naming unreadable files."""
    folder, _ = exported[2]["fastnet"]
    onnx = str(folder / "export" / "model.onnx")
    paths = _write_images(tmp_path / "images")[:2]
    forged = [paths[0].rename(tmp_path / "images" / "b\nforged  cat  0.999.png"),
              paths[1].rename(tmp_path / "images" / "c\x1b[31mred.png")]
    assert cli.main(["predict", onnx, *map(str, forged)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and "\x1b" not in "".join(lines)
    assert lines[0].startswith(str(tmp_path / "images" / "b\\nforged  cat  0.999.png")) and "\\x1b[31mred" in lines[1]
    (tmp_path / "images" / "d\x1b[2Jx.png").write_bytes(b"not an image")
    assert cli.main(["predict", onnx, str(tmp_path / "images")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "\x1b" not in err and "d\\x1b[2Jx.png" in err


def test_onnx_without_embedded_names_reads_export_json(exported, tmp_path):
    import onnx

    folder, _ = exported[2]["fastnet"]
    model = onnx.load(str(folder / "export" / "model.onnx"))
    del model.metadata_props[:]
    onnx.save(model, str(tmp_path / "model.onnx"))
    with pytest.raises(TransferkitError, match="no export.json beside it"):
        Classifier(tmp_path / "model.onnx")
    (tmp_path / "export.json").write_text((folder / "export" / "export.json").read_text())
    assert Classifier(tmp_path / "model.onnx").classes == CLASSES


def test_a_pruned_checkpoint_whose_weights_do_not_fit_together_is_refused(exported, tmp_path):
    """A pruned model.pt sets its layers' sizes from the file: one weight of another width than its
    layer_shapes say (altered or damaged) is refused as it loads, before any layer is allocated."""
    ckpt = torch.load(exported[2]["pruned"][0] / "model.pt", weights_only=True)
    assert ckpt["arch"]["pruned"]
    key = [k for k, v in ckpt["state_dict"].items() if k.startswith("blocks.") and v.ndim == 4][1]  # a conv weight
    w = ckpt["state_dict"][key]
    ckpt["state_dict"][key] = torch.zeros(w.shape[0], w.shape[1] + 1, *w.shape[2:])
    torch.save(ckpt, tmp_path / "model.pt")
    with pytest.raises(TransferkitError, match=r"does not fit its own architecture .*its layer_shapes say .* Fix: "
                                               r"write it again with the stage"):
        Classifier(tmp_path / "model.pt")


@pytest.mark.parametrize("metadata, needle", [
    ("not json", "metadata is damaged"),
    ("[" * 100_000 + "]" * 100_000, r"metadata is damaged \(maximum recursion depth"),  # a RecursionError traceback
    ('["a", "b"]', "is not what `transferkit export` writes"),
    ('{"classes": [0, 1, 2, 3, 4]}', "is not what `transferkit export` writes"),  # names, not numbers
    ('{"classes": ["a", "b"]}', r"scores 5 classes, and its metadata names 2 \(\['a', 'b'\]\)"),
    ('{"classes": ["a", "b", "c"], "input_size": 64}',
     r"graph takes input of shape \[.*, 3, 32, 32\], not the \[N, 3, 64, 64\] images its metadata names")])
def test_an_onnx_file_with_damaged_or_mismatched_metadata_is_refused(exported, tmp_path, metadata, needle):
    """The class names travel inside the file: edited or damaged, they would name the wrong class."""
    import onnx

    from transferkit.deploy.runtime import META_KEY

    folder, _ = exported[2]["fastnet"]
    model = onnx.load(str(folder / "export" / "model.onnx"))
    next(p for p in model.metadata_props if p.key == META_KEY).value = metadata
    onnx.save(model, str(tmp_path / "model.onnx"))
    with pytest.raises(TransferkitError, match=needle) as e:
        Classifier(tmp_path / "model.onnx")
    assert "Fix: export the model again" in str(e.value)


def test_an_onnx_file_with_a_fixed_batch_size_classifies_any_number_of_images(exported, tmp_path):
    """torch.onnx.export without dynamic axes fixes the batch at what it traced (often 1): predict runs
    such a file batch by batch, padding the last one, rather than failing on a second image."""
    import onnx

    folder, _ = exported[2]["fastnet"]
    model = onnx.load(str(folder / "export" / "model.onnx"))
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = 2
    onnx.save(model, str(tmp_path / "model.onnx"))
    paths = _write_images(tmp_path / "images")  # 5 images: two full batches of 2 and one padded
    fixed = [(r["class"], r["probability"]) for r in predict(tmp_path / "model.onnx", paths)]
    dynamic = [(r["class"], r["probability"]) for r in predict(folder / "export" / "model.onnx", paths)]
    assert len({c for c, _ in dynamic}) >= 2 and np.ptp([p for _, p in dynamic]) > 0.05  # answers that vary
    assert [c for c, _ in fixed] == [c for c, _ in dynamic]
    assert np.allclose([p for _, p in fixed], [p for _, p in dynamic], atol=1e-6)
    # what predict reads to cut the images: 2 for this file, None (any number) for every other kind
    assert Classifier(tmp_path / "model.onnx").fixed_batch == 2
    assert Classifier(folder / "export" / "model.onnx").fixed_batch is None
    assert Classifier(folder / "model.pt").fixed_batch is None
    assert Classifier(folder / "export" / "model.torchscript.pt", trust_code=True).fixed_batch is None


def test_predict_gives_a_fixed_batch_file_whole_runs(exported, tmp_path, monkeypatch):
    """A batch of decoded images smaller than a file's fixed batch was padded up to it one batch at a time:
    5 images read 1 by 1 ran 10 rows through a file fixed at 2. They are read in whole runs: 3 runs, 6 rows."""
    import onnx

    from transferkit.deploy import predict as predict_module

    folder, _ = exported[2]["fastnet"]
    model = onnx.load(str(folder / "export" / "model.onnx"))
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = 2
    onnx.save(model, str(tmp_path / "model.onnx"))
    clf, rows = Classifier(tmp_path / "model.onnx"), []

    class Counting:  # ONNX Runtime's session, counting the rows of each run
        def __init__(self, session):
            self.session = session

        def run(self, names, feeds, options=None):
            rows.extend(len(x) for x in feeds.values())
            return self.session.run(names, feeds, options)

    clf.session = Counting(clf.session)
    monkeypatch.setattr(predict_module, "batch_size", lambda input_size: 1)  # a tiny decode batch
    results = predict(clf, _write_images(tmp_path / "images"))
    assert len(results) == 5 and rows == [2, 2, 2]


def _crafted_onnx(path, *, batch="N", channels=3, height="H", width="W", input_size=32, brightest=None,
                  classes=CLASSES, output=None):
    """A small ONNX classifier written by hand, as a stranger might: each image's mean colour times a 3x5 matrix;
    with `brightest`, sqrt(brightest - mean colour) first: NaN for an image brighter than that; with `output`, the
    logits pooled over the batch ("pooled": one row; "flat": one number per class), cast to text ("text") or made
    probabilities ("softmax", and "softmax Reshape" with that op after the Softmax)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("ReduceMean", ["images"], ["colour"], axes=[2, 3], keepdims=0)]
    if brightest is not None:
        nodes += [helper.make_node("Sub", ["brightest", "colour"], ["room"]),
                  helper.make_node("Sqrt", ["room"], ["root"])]
    nodes.append(helper.make_node("MatMul", [nodes[-1].output[0], "w"], ["logits" if output is None else "scores"]))
    kind, shape = TensorProto.FLOAT, [batch, 5]
    if output in ("pooled", "flat"):
        nodes.append(helper.make_node("ReduceMean", ["scores"], ["logits"], axes=[0], keepdims=int(output == "pooled")))
        shape = [1, 5] if output == "pooled" else [5]
    elif output == "text":
        nodes.append(helper.make_node("Cast", ["scores"], ["logits"], to=TensorProto.STRING))
        kind = TensorProto.STRING
    elif output and output.startswith("softmax"):  # probabilities, where transferkit's files give logits
        after = output.split()[1:]  # an op that hands them on unchanged, as `softmax(x).reshape(n, -1)` exports
        names = [*(f"probabilities{i}" for i in range(len(after))), "logits"]
        nodes.append(helper.make_node("Softmax", ["scores"], [names[0]], axis=1))
        for op, source, target in zip(after, names, names[1:]):
            nodes.append(helper.make_node(op, [source, "rows"] if op == "Reshape" else [source], [target],
                                          **({"to": TensorProto.FLOAT} if op == "Cast" else {})))
    graph = helper.make_graph(
        nodes, "stranger",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [batch, channels, height, width])],
        [helper.make_tensor_value_info("logits", kind, shape)],
        initializer=[numpy_helper.from_array(np.arange(5 * channels, dtype=np.float32).reshape(-1, 5) / 15, "w"),
                     *([numpy_helper.from_array(np.float32(brightest), "brightest")] if brightest else []),
                     *([numpy_helper.from_array(np.array([0, -1], np.int64), "rows")]  # Reshape's: [N, rest]
                       if "Reshape" in (output or "") else [])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    helper.set_model_props(model, {"transferkit": json.dumps({"classes": classes, "input_size": input_size})})
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("shape, needle", [
    ({"batch": 100_000}, "takes batches of exactly 100000 images, outside the 1 to 256 predict runs at once"),
    ({"batch": 0}, "takes batches of exactly 0 images, outside the 1 to 256"),
    ({"input_size": 1_000_000}, "takes 1000000x1000000 images, the size its metadata names, outside the 8 to 1024"),
    ({"input_size": 0}, "takes 0x0 images, the size its metadata names, outside the 8 to 1024"),
    ({"height": 64, "width": 64}, ", 3, 64, 64], not the [N, 3, 32, 32] images its metadata names"),
    ({"height": 32, "width": 33}, ", 3, 32, 33], not the [N, 3, 32, 32] images its metadata names"),
    ({"channels": 1}, "takes input of shape ['N', 1, 'H', 'W'], not the [N, 3, 32, 32] images its metadata names")])
def test_an_onnx_file_that_asks_for_outsized_or_inconsistent_input_is_refused(tmp_path, capsys, shape, needle):
    """A file's own word on its input sets what predict allocates: a fixed batch it pads every run up to, an
    image size it makes a blank image of first. Out of bounds or at odds with the graph, it is refused."""
    model = _crafted_onnx(tmp_path / "model.onnx", **shape)
    line = _one_error(capsys, ["predict", str(model), str(_write_images(tmp_path / "images")[0])])
    assert needle in line and "Fix: export the model again" in line, line
    _crafted_onnx(tmp_path / "fits.onnx", batch=256, height=32, width=32)  # the most that is allowed: it runs
    assert len(predict(tmp_path / "fits.onnx", _write_images(tmp_path / "images"))) == 5


def test_an_onnx_file_whose_fixed_batch_of_its_images_outgrows_memory_is_refused(tmp_path, capsys, monkeypatch):
    """A batch of 256 and 1024 pixels a side each passed on their own, and predict padded every run to 256 such
    images in numpy, outside ONNX Runtime's bounded arena: 3 GiB for one image, or the process killed."""
    from transferkit.deploy import runtime

    monkeypatch.setattr(runtime, "memory_limit", lambda: 2**30)
    image = str(_write_images(tmp_path / "images")[0])
    model = _crafted_onnx(tmp_path / "model.onnx", batch=256, height=1024, width=1024, input_size=1024)
    line = _one_error(capsys, ["predict", str(model), image])
    assert "takes batches of exactly 256 1024x1024 images, 3.0 GiB of pixels a run, more than the 1.0 GiB" in line
    _crafted_onnx(tmp_path / "fits.onnx", batch=2, height=1024, width=1024, input_size=1024)
    assert len(predict(tmp_path / "fits.onnx", [image])) == 1


@pytest.mark.parametrize("where", ["graph", "subgraph", "function"])
def test_an_onnx_file_that_loops_is_refused_before_it_runs(tmp_path, capsys, where):
    """A Loop node's trip count is the file's: 2**62 iterations kept predict busy for ever, on its first
    two blank images. Inside an If's branch or a model function it is found too."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from conftest import cli as command, one_error_line  # in a process of its own: the old code never returned

    def graph(nodes, name, inputs, outputs, initializer=()):
        return helper.make_graph(nodes, name, [helper.make_tensor_value_info(*i) for i in inputs],
                                 [helper.make_tensor_value_info(*o) for o in outputs], initializer=initializer)

    body = graph([helper.make_node("Identity", ["c"], ["c_out"]), helper.make_node("Identity", ["v"], ["v_out"])],
                 "body", [("i", TensorProto.INT64, []), ("c", TensorProto.BOOL, []), ("v", TensorProto.FLOAT, None)],
                 [("c_out", TensorProto.BOOL, []), ("v_out", TensorProto.FLOAT, None)])
    loop = helper.make_node("Loop", ["trips", "go", "features"], ["logits"], body=body)
    if where == "subgraph":  # the Loop in the branch an If always takes
        loop = helper.make_node("If", ["go"], ["logits"], then_branch=graph([loop], "then", [], [("logits", 1, None)]),
                                else_branch=graph([helper.make_node("Identity", ["features"], ["logits"])], "else",
                                                  [], [("logits", 1, None)]))
    functions = []
    if where == "function":
        functions = [helper.make_function("local", "spin", ["trips", "go", "features"], ["logits"], [loop],
                                          [helper.make_opsetid("", 17)])]
        loop = helper.make_node("spin", ["trips", "go", "features"], ["logits"], domain="local")
    nodes = [helper.make_node("GlobalAveragePool", ["images"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["features"], axis=1), loop]
    model = helper.make_model(graph(nodes, "g", [("images", TensorProto.FLOAT, ["N", 3, 32, 32])],
                                    [("logits", TensorProto.FLOAT, ["N", 3])],
                                    [numpy_helper.from_array(np.array(2**62, np.int64), "trips"),
                                     numpy_helper.from_array(np.array(True), "go")]),
                              functions=functions, opset_imports=[helper.make_opsetid("", 17),
                                                                  helper.make_opsetid("local", 1)])
    helper.set_model_props(model, {"transferkit": json.dumps({"classes": ["a", "b", "c"], "input_size": 32})})
    onnx.save(model, str(tmp_path / "loop.onnx"))
    line = one_error_line(command("predict", str(tmp_path / "loop.onnx"),
                                  str(_write_images(tmp_path / "images")[0]), timeout=120))
    assert "loop.onnx's graph has a Loop node: a loop whose length the file sets" in line and "Fix: export" in line


@pytest.mark.parametrize("side, chain, needle", [(None, 1, "more than the"), (1000, 200, "took over 0 s")])
def test_an_onnx_file_whose_graph_outgrows_its_bytes_is_refused(tmp_path, monkeypatch, side, chain, needle):
    """A few hundred bytes of graph can ask for a tensor of terabytes (ConstantOfShape), or for minutes of matrix
    products over one: ONNX Runtime's arena is bounded, and the first two images are given PROBE_SECONDS."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from transferkit.deploy import runtime
    from transferkit.deploy.sessions import bounded_arena
    from transferkit.errors import TransferkitError

    monkeypatch.setattr(runtime, "PROBE_SECONDS", 0.3)
    side = side or int((1.2 * bounded_arena() / 4) ** 0.5)  # float32s past the bound, which the OS would give
    fill = helper.make_tensor("one", TensorProto.FLOAT, [1], [1e-3])
    nodes = [helper.make_node("ConstantOfShape", ["side"], ["m0"], value=fill),
             *(helper.make_node("MatMul", [f"m{i}", f"m{i}"], [f"m{i + 1}"]) for i in range(chain)),
             helper.make_node("ReduceSum", [f"m{chain}"], ["total"], keepdims=0),
             helper.make_node("GlobalAveragePool", ["images"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["features"], axis=1),
             helper.make_node("Add", ["features", "total"], ["logits"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("images", TensorProto.FLOAT,
                                                                         ["N", 3, 32, 32])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
                              [numpy_helper.from_array(np.array([side, side], np.int64), "side")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    helper.set_model_props(model, {"transferkit": json.dumps({"classes": ["a", "b", "c"], "input_size": 32})})
    onnx.save(model, str(tmp_path / "model.onnx"))
    assert (tmp_path / "model.onnx").stat().st_size < 50_000
    with pytest.raises(TransferkitError, match="to score two 32x32 images") as error:
        runtime.Classifier(tmp_path / "model.onnx", threads=1)
    assert needle in str(error.value) and "Fix: export the model again" in str(error.value)


@pytest.mark.parametrize("output, needle", [("pooled", "float32 of shape (1, 5) for 2 image(s)"),
                                            ("flat", "float32 of shape (5,) for 2 image(s)"),
                                            ("text", "object of shape (2, 5) for 2 image(s)")])
def test_a_model_whose_output_is_no_row_of_scores_per_image_is_refused(tmp_path, capsys, output, needle):
    """A graph that pools its scores over the batch would print one result for three images (zip stops at the
    shorter list), and one that returns a vector or text would end in a numpy traceback."""
    model = _crafted_onnx(tmp_path / "model.onnx", output=output)
    line = _one_error(capsys, ["predict", str(model), *map(str, _write_images(tmp_path / "images")[:3])])
    assert f"returns {needle}, not one row of class scores per image. Fix: export the model again" in line, line


@pytest.mark.parametrize("output", ["softmax", "softmax Reshape", "softmax Cast Flatten", "softmax Identity"])
def test_an_onnx_file_that_ends_in_softmax_gets_its_own_probabilities(tmp_path, output):
    """predict's softmax over a file's probabilities flattened them: 0.405 where the model says 0.9999; and still
    did where ops that pass them on unchanged come after the Softmax (`softmax(x).reshape(n, -1)` in a forward)."""
    import onnxruntime as ort

    model = _crafted_onnx(tmp_path / "model.onnx", output=output)
    paths = _write_images(tmp_path / "images")[:2]
    images = np.stack([np.asarray(Image.open(p).convert("RGB"), np.float32).transpose(2, 0, 1) / 255 for p in paths])
    own = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"images": images})[0]
    results = predict(model, paths)
    assert [r["class"] for r in results] == [CLASSES[i] for i in own.argmax(1)]
    assert np.allclose([[t["probability"] for t in r["top"]] for r in results],
                       [sorted(row, reverse=True)[:len(results[0]["top"])] for row in own], atol=1e-6)


def test_the_final_op_looks_through_reshapes_and_float_casts_alone(tmp_path):
    """Whether predict takes a file's output as probabilities: a Cast to integers changes the values, and a node of
    another domain named Softmax is a function of the file's own, which may pass logits through."""
    import onnx
    from onnx import TensorProto, helper

    from transferkit.deploy.graph import final_op

    def last_op(*nodes) -> str:
        graph = helper.make_graph(list(nodes), "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5])],
                                  [helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, [1, 5])])
        onnx.save(helper.make_model(graph), str(tmp_path / "model.onnx"))
        return final_op(tmp_path / "model.onnx")

    softmax = helper.make_node("Softmax", ["x"], ["p"], axis=1)
    assert last_op(softmax, helper.make_node("Cast", ["p"], ["y"], to=TensorProto.DOUBLE)) == "Softmax"
    assert last_op(softmax, helper.make_node("Cast", ["p"], ["y"], to=TensorProto.INT64)) == "Cast"
    assert last_op(helper.make_node("Softmax", ["x"], ["p"], domain="mine")) == ""
    assert last_op(helper.make_node("Identity", ["x"], ["y"])) == ""  # a graph input, handed on


def test_a_model_with_fewer_than_two_distinct_classes_is_refused(exported, tmp_path, capsys):
    """No model transferkit trains has one class, none or a class twice: the maximum over no scores ended in a
    numpy traceback."""
    good = str(_write_images(tmp_path / "images")[0])
    line = _one_error(capsys, ["predict", str(_crafted_onnx(tmp_path / "twice.onnx", classes=["a"] * 5)), good])
    assert "names 5 classes ['a', 'a', 'a', 'a', 'a'], not two or more distinct ones" in line, line
    ckpt = torch.load(exported[2]["fastnet"][0] / "model.pt", weights_only=True)
    torch.save({**ckpt, "classes": []}, tmp_path / "model.pt")
    for argv in (["predict", str(tmp_path / "model.pt"), good], ["export", str(tmp_path / "model.pt"), "--out",
                                                                   str(tmp_path / "out")]):
        assert "its 'classes' are no list of two or more distinct names" in _one_error(capsys, argv)
    assert not (tmp_path / "out").exists()


def test_a_model_that_fails_as_it_runs_gives_one_line_not_onnx_runtimes_log_too(tmp_path):
    """ONNX Runtime printed its own error log (C++, on stderr) above transferkit's line."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("ReduceMean", ["images"], ["colour"], axes=[2, 3], keepdims=0),
             helper.make_node("Reshape", ["colour", "shape"], ["square"]),  # 3 values an image: never 2x2
             helper.make_node("MatMul", ["square", "w"], ["logits"])]
    graph = helper.make_graph(nodes, "g",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, 32, 32])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])],
                              initializer=[numpy_helper.from_array(np.array([2, 2], np.int64), "shape"),
                                           numpy_helper.from_array(np.ones((2, 5), np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    helper.set_model_props(model, {"transferkit": json.dumps({"classes": CLASSES, "input_size": 32})})
    onnx.save(model, str(tmp_path / "model.onnx"))
    proc = command("predict", str(tmp_path / "model.onnx"), str(_write_images(tmp_path / "images")[0]))
    line = one_error_line(proc)
    assert "does not take the 32x32 images" in line and proc.stderr.strip() == line, proc.stderr


def test_predict_reads_and_classifies_a_batch_at_a_time(tmp_path, monkeypatch, capsys):
    """Memory stays flat however many images are given: at 1024 px a side, 40 images are 500 MB of float32 pixels,
    and predict held every image decoded before it classified any. Files that do not read, in the first batch and
    the last, are still named in one error."""
    import tracemalloc

    from transferkit.deploy.predict import batch_size

    model = _crafted_onnx(tmp_path / "model.onnx", input_size=1024)
    folder = tmp_path / "images"
    paths = [*_write_images(folder)] * 8
    alone = {r["path"]: r for r in predict(model, paths[:5])}  # the five differ in colour, so in probability
    runs = []
    call = Classifier.__call__
    monkeypatch.setattr(Classifier, "__call__", lambda self, x: runs.append(len(x)) or call(self, x))
    tracemalloc.start()
    try:
        results = predict(model, paths)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert results == [alone[str(p)] for p in paths] and len({r["probability"] for r in results}) == 5
    step = batch_size(1024)
    assert 1 <= step < 10 and runs[1:] == [step] * 8  # runs[0]: the black image probed at load
    assert peak < 12 * 1024 ** 2 * step * 4, f"{peak / 2**20:.0f} MiB"  # a few copies of one batch, not 40 images
    assert batch_size(32) == 256 and batch_size(224) > 64

    runs.clear()
    (folder / "broken.png").write_bytes(b"not a picture")
    line = _one_error(capsys, ["predict", str(model), str(folder / "broken.png"), *map(str, paths),
                               str(folder / "missing.png")])
    assert "cannot read 2 of 42 image(s)" in line and "broken.png (no image format PIL reads)" in line, line
    assert "missing.png (no such file)" in line
    assert len(runs) == 1  # the probe at load: no model run once a file has failed
    line = _one_error(capsys, ["predict", str(model), *(str(folder / f"gone{i}.png") for i in range(8))])
    assert "cannot read 8 of 8 image(s): " in line and "gone4.png (no such file); and 3 more. Fix:" in line, line
    assert "gone5.png" not in line  # the first few name the problem; thousands made a line no one reads
    assert line.endswith("Fix: mend or leave out these files, as each note says: predict reads image files this user "
                         "may read and PIL can open (PNG, JPEG, BMP, ...).")  # a note's own fix (downscale it) stands


def test_class_names_that_would_forge_a_result_line_are_refused(tmp_path, capsys):
    """predict prints one line per image: a class name holding a line break, or a terminal escape, would print
    a result of its own making."""
    forged = ["dog\n/tmp/x.png  cat  0.999  top-1: cat 0.999", "\x1b[31mred\x1b[0m", "c", "d", "e"]
    model = _crafted_onnx(tmp_path / "model.onnx", classes=forged)
    line = _one_error(capsys, ["predict", str(model), str(_write_images(tmp_path / "images")[0])])
    assert "names classes that are no printable names" in line and "\\x1b[31mred" in line and "Fix: export" in line
    assert len(predict(_crafted_onnx(tmp_path / "fine.onnx", classes=["café", "a b", "c", "d", "e"]),
                       _write_images(tmp_path / "images")[:1])) == 1


def test_a_model_that_scores_nan_or_infinity_is_refused(exported, tmp_path, capsys):
    """A normalisation std of 0 divides by zero, and a stranger's graph can take the root of a negative:
    NaN probabilities (invalid JSON with --json) would otherwise come out with exit code 0."""
    ckpt = torch.load(exported[2]["fastnet"][0] / "model.pt", weights_only=True)
    ckpt["arch"]["std"] = [0.0, 0.0, 0.0]
    ckpt["state_dict"]["normalize.std"] = torch.zeros_like(ckpt["state_dict"]["normalize.std"])
    torch.save(ckpt, tmp_path / "model.pt")
    images = tmp_path / "images"
    images.mkdir()
    for name, value in (("dark.png", 40), ("white.png", 255), ("grey.png", 200)):
        Image.fromarray(np.full((32, 32, 3), value, np.uint8)).save(images / name)
    line = _one_error(capsys, ["predict", str(tmp_path / "model.pt"), str(images / "dark.png"), "--json"])
    assert f"{tmp_path / 'model.pt'} scores a black image as NaN or infinity" in line
    assert "Fix: write it again with the stage that made it" in line
    model = _crafted_onnx(tmp_path / "stranger.onnx", brightest=0.5)  # a black image: finite; brighter than half: NaN
    assert predict(model, [images / "dark.png"])[0]["probability"] > 0.2
    line = _one_error(capsys, ["predict", str(model), *(str(images / n) for n in ("dark.png", "white.png", "grey.png")),
                               "--json"])
    assert f"{model} scores {images / 'white.png'}, {images / 'grey.png'} as NaN or infinity" in line
    assert "dark.png" not in line and "Fix: export the model again" in line


def test_an_onnx_file_that_takes_other_than_float_images_is_refused(exported, tmp_path):
    import onnx

    folder, _ = exported[2]["fastnet"]
    model = onnx.load(str(folder / "export" / "model.onnx"))
    images = model.graph.input[0]  # a valid model that takes uint8: a Cast in front of the float input
    model.graph.node.insert(0, onnx.helper.make_node("Cast", ["raw"], [images.name], to=onnx.TensorProto.FLOAT))
    raw = model.graph.input.add()
    raw.CopyFrom(images)
    raw.name, raw.type.tensor_type.elem_type = "raw", onnx.TensorProto.UINT8
    model.graph.input.remove(images)
    onnx.save(model, str(tmp_path / "model.onnx"))
    with pytest.raises(TransferkitError, match=r"takes tensor\(uint8\) input, not float32 images.*Fix: export"):
        Classifier(tmp_path / "model.onnx")


def _one_error(capsys, argv) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1 and "Traceback" not in err and "Fix:" in lines[0], err
    return lines[0]


def test_export_writes_nowhere_dvc_tracks_nor_into_a_projects_own_folders(exported, tmp_path, capsys, monkeypatch):
    """`export --out conf`, `--out artifacts` or `--out data/exported` wrote its three files there: into conf/,
    beside the stage folders, or into prepare's input, which reran the whole pipeline at the next `dvc repro`."""
    from transferkit.tracked import check_untracked

    project = dvc_project(tmp_path / "project", {  # data/ an input, each stage's folder in artifacts/ an output
        "prepare": {"cmd": "transferkit prepare", "deps": ["data"], "outs": [{"artifacts/prepare": {"persist": True}}]},
        "export": {"cmd": "transferkit export", "deps": ["artifacts/prepare"], "outs": ["artifacts/export"]}})
    (project / "data").mkdir()
    monkeypatch.chdir(project)
    model = str(exported[2]["fastnet"][0] / "model.pt")
    for out, says in (("conf", f"is in the project's conf/ ({project / 'conf'})"), ("conf/exported", "is in the proj"),
                      (".", "holds"), ("artifacts", f"holds {project / 'artifacts'}/"),
                      ("artifacts/prepare", "is"), ("artifacts/prepare/sub", "lies in"),
                      ("data/exported", f"lies in {project / 'data'}, an input of the prepare stage")):
        line = _one_error(capsys, ["export", model, "--out", out])
        assert f"--out {out} {says}" in line and "--out a new folder of its own" in line, line
    assert not list(project.rglob("*.onnx")) and not (project / "artifacts").exists()
    check_untracked(project / "artifacts" / "export", "--out", "export")  # what dvc.yaml's export stage runs
    with pytest.raises(TransferkitError, match="is .*artifacts/export, the export stage's outputs in"):
        check_untracked(project / "artifacts" / "export", "--out")  # another command's files would mix with them
    check_untracked(project / "outputs" / "export", "--out")
    check_untracked(tmp_path / "elsewhere", "--out")


def test_bad_input_gives_one_error_line(exported, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # export's defaults, outputs/ and artifacts/prepare/, here and not in the checkout
    root, test_set, models = exported
    folder = models["fastnet"][0]
    (tmp_path / "notes.txt").write_text("not a model")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    torch.save({"classes": ["a", "b"], "test_x": torch.zeros(2, 3, 32, 32, dtype=torch.uint8),
                "test_y": torch.zeros(2, dtype=torch.long)}, tmp_path / "other_task.pt")
    good = str(_write_images(tmp_path / "images")[0])

    assert "not found" in _one_error(capsys, ["export", str(tmp_path / "missing.pt")])
    assert "not a transferkit checkpoint" in _one_error(capsys, ["export", str(tmp_path / "notes.txt")])
    assert "not a transferkit checkpoint" in _one_error(capsys, ["export", str(tmp_path / "other.pt")])
    data = (folder / "model.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[:len(data) // 2])  # a copy cut off: damaged, not foreign
    (tmp_path / "empty.pt").write_bytes(b"")  # a full disk's
    for argv in (["export", str(tmp_path / "cut.pt")], ["predict", str(tmp_path / "cut.pt"), good],
                 ["export", str(tmp_path / "empty.pt")]):
        line = _one_error(capsys, argv)
        assert "unreadable" in line and "write it again with the stage that made it" in line, line
    assert "TorchScript" in _one_error(capsys, ["export", str(folder / "export" / "model.torchscript.pt")])
    assert "holds classes ['a', 'b']" in _one_error(
        capsys, ["export", str(folder / "model.pt"), "--test-set", str(tmp_path / "other_task.pt"),
                 "--out", str(tmp_path / "out")])
    # not a file torch wrote, one cut off, an empty one: unreadable, with the file to give (was "it holds no list of
    # classes", for the very file the fix named)
    for name in ("notes.txt", "cut.pt", "empty.pt"):
        line = _one_error(capsys, ["export", str(folder / "model.pt"), "--test-set", str(tmp_path / name)])
        assert f"prepared task at {tmp_path / name} is unreadable" in line and line.endswith(
            "Fix: do not use this file; pass the target.pt that the prepare stage wrote "
            "(artifacts/prepare/target.pt)."), line
    torch.save({"classes": CLASSES, "test_x": torch.zeros(0, 3, 32, 32, dtype=torch.uint8),
                "test_y": torch.zeros(0, dtype=torch.long)}, tmp_path / "no_test.pt")  # np.concatenate of nothing
    assert "not a prepared task: its test split holds no images, which the exported files are checked on" in \
        _one_error(capsys, ["export", str(folder / "model.pt"), "--test-set", str(tmp_path / "no_test.pt"), "--out",
                            str(tmp_path / "out")])
    torch.save({"classes": CLASSES, "test_x": torch.zeros(2, 3, 32, 32, dtype=torch.uint8)}, tmp_path / "no_y.pt")
    assert "not a prepared task: it lacks test_x or test_y" in _one_error(
        capsys, ["export", str(folder / "model.pt"), "--test-set", str(tmp_path / "no_y.pt")])
    torch.save({"classes": CLASSES, "test_x": torch.zeros(2, 3, 32, 32), "test_y": torch.zeros(2, dtype=torch.long)},
               tmp_path / "float_x.pt")  # images as floats: scaled twice (/255 of /255), the check would fail wrongly
    assert "not a prepared task: its test_x is torch.float32" in _one_error(
        capsys, ["export", str(folder / "model.pt"), "--test-set", str(tmp_path / "float_x.pt")])
    for name, y in (("short_y", torch.zeros(1, dtype=torch.long)), ("column_y", torch.zeros(2, 1, dtype=torch.long)),
                    ("big_y", torch.full((2,), len(CLASSES), dtype=torch.long))):
        # a label per image, each a class's index: (N, 1) labels broadcast against (N,) predictions, a wrong top-1
        torch.save({"classes": CLASSES, "test_x": torch.zeros(2, 3, 32, 32, dtype=torch.uint8), "test_y": y},
                   tmp_path / f"{name}.pt")
        line = _one_error(capsys, ["export", str(folder / "model.pt"), "--test-set", str(tmp_path / f"{name}.pt")])
        assert re.search(r"is not a prepared task: its test_y (is torch.int64 of shape|holds labels outside)", line)
    assert f"--test-set {tmp_path} is a folder. Fix: pass the target.pt" in _one_error(
        capsys, ["export", str(folder / "model.pt"), "--test-set", str(tmp_path)])
    line = _one_error(capsys, ["export", str(folder / "model.pt"), "--out", str(tmp_path / "notes.txt")])
    assert "a file stands where the folder would be" in line and "--out DIR" in line
    assert not (tmp_path / "out" / "model.onnx").exists()
    (tmp_path / "taken" / "model.onnx").mkdir(parents=True)  # a folder where the ONNX file goes: nothing written
    line = _one_error(capsys, ["export", str(folder / "model.pt"), "--out", str(tmp_path / "taken")])
    assert f"cannot write {tmp_path / 'taken' / 'model.onnx'}" in line
    assert sorted(p.name for p in (tmp_path / "taken").iterdir()) == ["model.onnx"]
    (tmp_path / "quantize").mkdir()  # another stage's folder: its INT8 model.onnx would become the fp32 one
    for name, data in (("params.yaml", "seed: 0\n"), ("model.onnx", "int8")):
        (tmp_path / "quantize" / name).write_text(data)
    line = _one_error(capsys, ["export", str(folder / "model.pt"), "--out", str(tmp_path / "quantize")])
    assert "holds params.yaml: a stage's outputs" in line
    assert (tmp_path / "quantize" / "model.onnx").read_text() == "int8"

    assert "not found" in _one_error(capsys, ["predict", str(tmp_path / "missing.onnx"), good])
    line = _one_error(capsys, ["predict", good, str(folder / "export" / "model.onnx")])  # the two swapped
    assert line.endswith(f"{good} is an image, where predict takes the model first. Fix: `transferkit predict MODEL "
                         f"IMAGE_OR_FOLDER...` (MODEL: a model.pt, model.onnx or model.torchscript.pt)."), line
    # a stage's folder for the model: the file in it, not "not found"
    assert f"{folder / 'export'} is a folder. Fix: pass the model file in it ({folder / 'export' / 'model.onnx'})" \
        in _one_error(capsys, ["predict", str(folder / "export"), good])
    assert f"{folder} is a folder. Fix: pass the model file in it ({folder / 'model.pt'})" \
        in _one_error(capsys, ["export", str(folder), "--out", str(tmp_path / "out")])
    # export reads a checkpoint: a folder of ONNX files holds none
    assert f"{folder / 'export'} is a folder, with no model.pt in it. Fix: pass a model.pt that a stage wrote" \
        in _one_error(capsys, ["export", str(folder / "export"), "--out", str(tmp_path / "out")])
    assert "not a transferkit checkpoint" in _one_error(capsys, ["predict", str(tmp_path / "notes.txt"), good])
    line = _one_error(capsys, ["predict", str(folder / "export" / "model.torchscript.pt"), good])
    assert "TorchScript" in line and "--trust-code" in line  # a program: never run unless asked
    line = _one_error(capsys, ["predict", str(folder / "model.pt"), good, str(tmp_path / "broken.png"),
                               str(tmp_path / "nope.jpg"), "/dev/zero"])  # a device: reading it would never end
    assert "cannot read 3 of 4" in line and "nope.jpg (no such file)" in line
    # decode_image's own words, not PIL's, whose text holds a buffer's memory address
    assert f"{tmp_path / 'broken.png'} (no image format PIL reads)" in line and " at 0x" not in line, line
    assert "/dev/zero (not a file)" in line


def test_checkpoint_errors_name_the_stage_the_path_says_wrote_it(tmp_path):
    """A model.pt one folder below its stage's (freeze_curve/depthK) names that stage; a path that
    names no stage gets a placeholder, never another stage."""
    from transferkit.deploy.runtime import UNKNOWN_STAGE, load_pipeline_checkpoint, stage_of
    from transferkit.errors import TransferkitError
    from transferkit.io import save_torch

    artifacts = tmp_path / "artifacts"
    assert stage_of(artifacts / "distill" / "model.pt") == "distill"
    assert stage_of(artifacts / "freeze_curve" / "depth2" / "model.pt") == "freeze_curve"
    assert stage_of(tmp_path / "sweeps" / "smoke-transfer" / "point0" / "model.pt") == UNKNOWN_STAGE == "<stage>"

    with pytest.raises(TransferkitError, match=r"`dvc repro freeze_curve` writes this one"):
        load_pipeline_checkpoint(artifacts / "freeze_curve" / "depth3" / "model.pt")
    with pytest.raises(TransferkitError, match="not found") as missing:
        load_pipeline_checkpoint(tmp_path / "elsewhere" / "model.pt")
    assert "writes this one" not in str(missing.value)

    model = _make("fastnet")
    fixes = {artifacts / "freeze_curve" / "depth2": "Fix: write it again (`dvc repro freeze_curve`).",
             tmp_path / "mine": "Fix: write it again with the stage that made it, or pass a model.pt that a stage "
                                "wrote, e.g. artifacts/prune/model.pt."}
    for folder, fix in fixes.items():
        folder.mkdir(parents=True)
        # its weights removed after a stage wrote it: the fix reruns the stage the path names, or none
        save_torch({"arch": model.arch, "classes": CLASSES, "state_dict": {}, "layer_shapes": None},
                   folder / "model.pt")
        with pytest.raises(TransferkitError, match="does not fit its own architecture") as altered:
            load_pipeline_checkpoint(folder / "model.pt")
        message = str(altered.value)
        assert message.endswith(fix) and "dvc repro prune" not in message and "<stage>" not in message


def test_the_check_allows_fp32_rounding_that_grows_with_the_logit():
    """Two correct fp32 runtimes differ by about 1e-6 of a logit: 1.2e-4 on a logit of 670 (a tiny model's
    on tiny data) is rounding; on a logit of 2 it is not."""
    import numpy as np

    from transferkit.deploy.export import compare

    ref = np.array([[670.0, -3.0], [2.0, 1.0]], dtype=np.float32)
    big = ref + np.array([[1.2e-4, 0], [0, 0]], dtype=np.float32)
    small = ref + np.array([[0, 0], [1.2e-4, 0]], dtype=np.float32)
    assert compare(ref, big, None, 1e-4)["within"] and not compare(ref, small, None, 1e-4)["within"]
    assert compare(ref, small, None, 1e-4)["max_abs_diff"] == pytest.approx(1.2e-4, rel=0.01)


def test_failed_check_keeps_the_previous_export(exported, tmp_path, monkeypatch, capsys):
    import transferkit.deploy.export as export_module

    root, test_set, models = exported
    folder = tmp_path / "fastnet"
    shutil.copytree(models["fastnet"][0], folder)
    out = folder / "export"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    wrong = lambda ref, other, labels, tolerance: {"max_abs_diff": 0.5, "within": False,  # noqa: E731
                                                   "top1_agreement": 0.9}
    monkeypatch.setattr(export_module, "compare", wrong)  # as if the exporter had mistranslated a layer
    line = _one_error(capsys, ["export", str(folder / "model.pt"), "--out", str(out), "--test-set", str(test_set),
                               "--repeats", "1", "--threads", "1"])
    assert "differs from PyTorch" in line and "nothing written" in line and "a larger --tolerance" in line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_an_export_clears_the_temporaries_a_killed_one_left(exported, tmp_path, monkeypatch):
    """A kill -9 mid-export left .model.onnx.XXXX.tmp and its kin in the output folder, which a later export kept
    and DVC then recorded among the stage's outputs; every temporary it makes is one of those (export.json's was
    written through a second temporary, ..export.json.X.tmp.Y.tmp, which no export cleared)."""
    from pathlib import Path

    import transferkit.io

    made, atomic_path = [], transferkit.io.atomic_path

    def recorded(path):
        made.append(Path(path).name)
        return atomic_path(path)

    monkeypatch.setattr(transferkit.io, "atomic_path", recorded)
    root, test_set, models = exported
    out = tmp_path / "export"
    out.mkdir()
    left = [out / ".model.onnx.k1ll3d.tmp", out / ".export.json.k1ll3d.tmp", out / ".model.torchscript.pt.k1ll3d.tmp"]
    for f in left:
        f.write_bytes(b"half")
    (out / "notes.tmp").write_text("the user's")  # no temporary of export's: kept
    export(models["fastnet"][0] / "model.pt", out, test_set, repeats=1, batch_size=16, threads=1, log=lambda *_: None)
    assert not [f for f in left if f.exists()] and (out / "notes.tmp").exists()
    assert not list(out.glob(".*.tmp"))
    assert not [name for name in made if name.startswith(".")]  # no temporary of a temporary


@pytest.mark.parametrize("failing", [None, "dynamo"])
def test_auto_exporter_falls_back_to_the_torchscript_based_one(exported, tmp_path, monkeypatch, failing):
    """Both exporters produce a checked file; where the dynamo one fails (it did on torch 2.11),
    auto uses the other and export.json says which produced the file and why."""
    import transferkit.deploy.export as export_module

    root, test_set, models = exported
    if failing:
        def broken(*args, **kwargs):
            raise RuntimeError("ConversionError: as on the GPU image")

        monkeypatch.setitem(export_module.EXPORTERS, failing, broken)
    for exporter in (["auto"] if failing else ["dynamo", "legacy"]):
        result = export(models["fastnet"][0] / "model.pt", tmp_path / exporter, test_set, repeats=2, batch_size=16,
                        threads=1, exporter=exporter, log=lambda *_: None)
        used = result["exporter"]
        assert used["onnx"] == ("legacy" if failing else exporter) and used["requested"] == exporter
        assert ("ConversionError" in used["failed"]["dynamo"]) if failing else "failed" not in used
        assert result["onnx"]["within"] and result["onnx"]["top1_agreement"] == 1.0


def test_an_opset_the_exporter_did_not_write_is_not_passed_off_as_done(exported, tmp_path, monkeypatch):
    """The dynamo exporter keeps its own opset where it cannot convert to the one asked for, without a word:
    auto then uses the other exporter, and an explicit dynamo stops with one error."""
    import transferkit.deploy.export as export_module

    root, test_set, models = exported
    legacy = export_module.EXPORTERS["legacy"]
    monkeypatch.setitem(export_module.EXPORTERS, "dynamo", lambda model, path, example, opset: legacy(
        model, path, example, 18))  # as dynamo does when its version converter fails
    result = export(models["fastnet"][0] / "model.pt", tmp_path / "auto", test_set, repeats=2, batch_size=16,
                    threads=1, opset=17, log=lambda *_: None)
    assert result["exporter"]["onnx"] == "legacy" and result["exporter"]["opset"] == 17
    assert "it wrote opset 18, not the 17 asked for" in result["exporter"]["failed"]["dynamo"]
    with pytest.raises(TransferkitError, match="dynamo: ValueError: it wrote opset 18, not the 17 asked for"):
        export(models["fastnet"][0] / "model.pt", tmp_path / "dynamo", test_set, repeats=2, batch_size=16,
               threads=1, opset=17, exporter="dynamo", log=lambda *_: None)
    assert not (tmp_path / "dynamo").exists()  # nor the --out folder it made: a failed export writes nothing


@pytest.mark.parametrize("exporter, opset, cause", [("auto", 8, "legacy: ValidationError: No Op registered for Erf "
                                                                 "with domain_version of 8"),
                                                    ("legacy", 8, "legacy: ValidationError: No Op registered for Erf"),
                                                    ("legacy", 7, "legacy: .*adaptive_max_pool2d")])
def test_an_opset_too_old_for_the_model_is_one_error_whose_fix_is_the_opset(exported, tmp_path, exporter, opset,
                                                                             cause):
    """fastnet's GELU exports to Erf, which opset 9 brought: at --opset 8 the TorchScript-based exporter's file
    fails ONNX's checker, an exporter's failure (one error, nothing written), not a traceback; and whichever
    exporter was asked for, the fix names the opset first, not `--exporter auto` alone, which fails alike
    (walk I84)."""
    root, test_set, models = exported
    fix = "leave --opset out" + ", or try --exporter auto" * (exporter != "auto")
    with pytest.raises(TransferkitError, match=rf"^ONNX export failed: .*{cause}.* Fix: {fix}\.$"):
        export(models["fastnet"][0] / "model.pt", tmp_path / "out", test_set, repeats=2, batch_size=16, threads=1,
               opset=opset, exporter=exporter, log=lambda *_: None)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("opset", [7, 17])
def test_the_exporters_own_output_stays_out_of_the_terminal(exported, tmp_path, opset):
    """The exporters print from C++ and through their loggers, past Python's warnings filter: --opset 7 put a
    98-line graph and a traceback around its one error line, and --opset 17, which succeeds (dynamo's version
    converter fails, the TorchScript-based exporter writes it), a traceback from onnxscript."""
    root, test_set, models = exported
    proc = command("export", str(models["fastnet"][0] / "model.pt"), "--out", str(tmp_path / "out"), "--test-set",
                   str(test_set), "--opset", str(opset))
    if opset == 7:  # below what the network's adaptive max pooling exports to
        assert "Fix: leave --opset out." in one_error_line(proc) and len(proc.stderr.splitlines()) == 1
    else:
        assert proc.returncode == 0 and proc.stderr == "" and "ONNX opset 17, legacy exporter" in proc.stdout
    # the fallback's line and the summary, no graph (nor the busy note, which tests run beside others may add)
    assert len([line for line in proc.stdout.splitlines() if not line.startswith("While export timed")]) <= 8


@pytest.mark.parametrize("kind", MODELS)
def test_folding_the_input_scaling_keeps_the_logits(kind):
    """fastnet's stem pads nothing, so the scaling folds into it; mobilenet's first conv pads: left alone.
    Either way the first convolution's input is padded to 4 channels."""
    model = _make(kind).eval()
    folded = deployable(model)
    x = torch.rand(16, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-5)
    assert isinstance(folded.normalize, torch.nn.Identity) == (kind != "mobilenet")
    assert not isinstance(model.normalize, torch.nn.Identity)  # the original is left as it was
    # the input is padded to 4 channels, whose weights are zero, for ONNX Runtime's INT8 kernels
    assert (first_conv(model).in_channels, first_conv(folded).in_channels) == (3, 4)
    assert not first_conv(folded).weight[:, 3:].any()


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_the_logit_scale_folds_into_the_classifier_so_the_graph_ends_in_it(tmp_path, exporter):
    """fastnet scales its logits by 1/9, exported as a Mul after the classifier, which INT8 quantizes again where
    quantize.keep_float=[Gemm] leaves the classifier in float. Folded, the same logits come from the classifier
    itself; fine-tuning for INT8 keeps the scale a scale, so the classifier learns at the rate it trained at."""
    import onnx

    from transferkit.deploy.export import export_onnx

    model = _make("fastnet").eval()
    folded = deployable(model)
    x = torch.rand(16, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-5)
    assert (model.head.scale, folded.head.scale, deployable(model, for_training=True).head.scale) == (1 / 9, 1, 1 / 9)
    export_onnx(folded, tmp_path / "model.onnx", 32, exporter, None, log=lambda *_: None)
    # fastnet's classifier has no bias: the TorchScript-based exporter writes it as MatMul
    assert onnx.load(str(tmp_path / "model.onnx")).graph.node[-1].op_type == {"dynamo": "Gemm", "legacy": "MatMul"}[
        exporter]


@pytest.mark.parametrize("kind", [*MODELS, "resnet18"])
def test_folding_batchnorm_keeps_the_logits(kind):
    """Folded across fastnet's max pooling too (its scales are positive here), and in torchvision's ResNet
    blocks, which hold their pairs as attributes: one op fewer per layer, none left."""
    model = _make(kind)
    folded = fold_batchnorm(model)
    x = torch.rand(16, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-5)
    n_bn = lambda m: sum(isinstance(x, torch.nn.BatchNorm2d) for x in m.modules())  # noqa: E731
    assert n_bn(folded) == 0
    assert n_bn(model) > 0  # the original is left as it was


def test_a_negative_batchnorm_scale_behind_max_pooling_is_not_folded():
    """fastnet pools between a convolution and its BatchNorm: a negative scale folded into the convolution
    would turn the max into a min. That pair stays as it is, the pairs after it fold, the logits are the same."""
    model = _make("fastnet")
    bn = model.blocks[1][0][2]  # conv -> max pool -> this BatchNorm
    with torch.no_grad():
        bn.weight[::2].neg_()
    folded = fold_batchnorm(model)
    x = torch.rand(16, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-5)
    assert isinstance(folded.blocks[1][0][2], torch.nn.BatchNorm2d)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules()) == 1


def test_predict_lists_a_folders_images_in_sorted_order(tmp_path):
    """A folder's images are classified in the order of their sorted paths, subfolders included, whatever order
    the file system lists them in: one folder gives its results in one order on every machine."""
    model = _crafted_onnx(tmp_path / "model.onnx")
    (tmp_path / "images").mkdir()
    paths = _write_images(tmp_path / "images" / "b") + _write_images(tmp_path / "images" / "a")
    assert [r["path"] for r in predict(model, [tmp_path / "images"])] == sorted(map(str, paths))


def test_predict_gives_the_probabilities_of_large_logits(tmp_path):
    """A confident model's logits in the thousands give probabilities near 1 and 0, not NaN from an overflowing
    exp: the same classes as the same model with its logits scaled down, the top one near 1."""
    import onnx
    from onnx import numpy_helper

    small = _crafted_onnx(tmp_path / "small.onnx")
    model = onnx.load(str(small))
    w = next(t for t in model.graph.initializer if t.name == "w")
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * 2000, "w"))
    onnx.save(model, str(tmp_path / "large.onnx"))
    paths = _write_images(tmp_path / "images")
    large, reference = predict(tmp_path / "large.onnx", paths), predict(small, paths)
    assert [r["class"] for r in large] == [r["class"] for r in reference]
    probabilities = [t["probability"] for r in large for t in r["top"]]
    assert np.isfinite(probabilities).all() and all(r["probability"] > 0.99 for r in large), large


def test_a_model_of_one_class_is_refused(tmp_path, capsys):
    """A model that scores one class names it for every image with probability 1: no model transferkit trains
    has fewer than two classes, so a file of one is refused as it loads."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(_crafted_onnx(tmp_path / "five.onnx", classes=["a"])))
    w = next(t for t in model.graph.initializer if t.name == "w")
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w)[:, :1].copy(), "w"))
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 1
    onnx.save(model, str(tmp_path / "one.onnx"))
    line = _one_error(capsys, ["predict", str(tmp_path / "one.onnx"), str(_write_images(tmp_path / "images")[0])])
    assert "names 1 class ['a'], not two or more distinct ones" in line, line


def test_a_fixed_batch_onnx_file_gives_one_row_per_image(tmp_path):
    """A file fixed at 2 images a run is padded up to whole runs: the Classifier returns the rows of the images it
    was given, 5 for 5, not the 6 it ran."""
    clf = Classifier(_crafted_onnx(tmp_path / "model.onnx", batch=2))
    images = np.random.default_rng(0).random((5, 3, 32, 32), dtype=np.float32)
    logits = clf(images)
    assert clf.fixed_batch == 2 and logits.shape == (5, len(CLASSES))
    np.testing.assert_allclose(logits, images.mean((2, 3)) @ (np.arange(15, dtype=np.float32).reshape(3, 5) / 15),
                               rtol=1e-5, atol=1e-6)


def test_a_model_that_scores_one_class_as_nan_or_infinity_is_refused(tmp_path, capsys):
    """One score of NaN or infinity in an image's row makes its probabilities NaN: a row is refused for any such
    score, not only where all of them are (here a class's score divided by zero)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("ReduceMean", ["images"], ["colour"], axes=[2, 3], keepdims=0),
             helper.make_node("MatMul", ["colour", "w"], ["scores"]),
             helper.make_node("Div", ["scores", "d"], ["logits"])]
    graph = helper.make_graph(nodes, "g",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, 32, 32])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])],
                              initializer=[numpy_helper.from_array(np.ones((3, 5), np.float32), "w"),
                                           numpy_helper.from_array(np.array([1, 1, 1, 1, 0], np.float32), "d")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    helper.set_model_props(model, {"transferkit": json.dumps({"classes": CLASSES, "input_size": 32})})
    onnx.save(model, str(tmp_path / "model.onnx"))
    line = _one_error(capsys, ["predict", str(tmp_path / "model.onnx"), str(_write_images(tmp_path / "images")[0])])
    assert "as NaN or infinity" in line, line


def test_an_exported_model_of_the_tasks_classes_in_another_order_is_refused(tmp_path):
    """Labels are indices into the task's class list: a file of the same classes in another order would score every
    image against another class's label, so require_classes wants the task's order, not only its names."""
    from transferkit.deploy.runtime import require_classes

    model = _crafted_onnx(tmp_path / "model.onnx")
    require_classes(model, CLASSES, "export")
    with pytest.raises(TransferkitError, match=r"was exported from a model of classes \['cat', 'deer'.* but the "
                                               r"target task is \['horse', 'frog'"):
        require_classes(model, CLASSES[::-1], "export")


def test_an_onnx_file_named_in_capitals_is_read_as_onnx(tmp_path):
    """A file copied from a system that names it MODEL.ONNX is an ONNX model still, not a checkpoint refused as
    'not a file written by torch.save'."""
    shutil.copy(_crafted_onnx(tmp_path / "model.onnx"), tmp_path / "MODEL.ONNX")
    clf = Classifier(tmp_path / "MODEL.ONNX")
    assert clf.kind == "onnx" and clf.classes == CLASSES


def test_the_check_counts_agreement_and_top1_from_the_runtimes_own_logits():
    """A runtime that picks another class on one image of four agrees with PyTorch on 3/4 of them and scores
    its own top-1 against the labels, not PyTorch's."""
    from transferkit.deploy.export import compare

    ref = np.array([[2.0, 1.0], [0.0, 3.0], [5.0, 1.0], [1.0, 4.0]], dtype=np.float32)
    other = ref.copy()
    other[1] = [3.0, 0.0]
    result = compare(ref, other, torch.tensor([0, 1, 0, 1]), 1e-4)
    assert result["top1_agreement"] == 0.75 and result["top1"] == 0.75 and not result["within"]
    assert compare(ref, ref, torch.tensor([0, 1, 0, 1]), 1e-4)["top1"] == 1.0


def test_export_json_records_each_files_size_and_the_pytorch_top1_on_the_test_set(exported):
    root, test_set, models = exported
    folder, result = models["fastnet"]
    files = folder / "export"
    assert result["bytes"] == {"onnx": (files / "model.onnx").stat().st_size,
                               "torchscript": (files / "model.torchscript.pt").stat().st_size,
                               "checkpoint": (folder / "model.pt").stat().st_size}
    model, _ = load_checkpoint(folder / "model.pt", "prune")
    task = torch.load(test_set, weights_only=True)
    with torch.no_grad():
        predicted = model.eval()(task["test_x"].float() / 255).argmax(1)
    assert result["pytorch"]["top1"] == pytest.approx(float((predicted == task["test_y"]).float().mean()))


def test_export_gives_back_the_thread_count_it_found(exported, tmp_path):
    """--threads sets the threads of the checks and the latency only: export() called in a process (as the
    pipeline's export stage is) leaves torch's thread count for whatever runs next."""
    root, test_set, models = exported
    before = torch.get_num_threads()
    export(models["fastnet"][0] / "model.pt", tmp_path / "export", test_set, repeats=1, batch_size=16,
           threads=before + 1, log=lambda *_: None)
    assert torch.get_num_threads() == before


def test_a_scan_node_counts_as_control_flow_as_a_loop_does(tmp_path):
    """Scan iterates over a dimension of its input, which a file can make as long as it likes: predict refuses
    it before it runs, as it refuses a Loop."""
    import onnx
    from onnx import TensorProto, helper

    from transferkit.deploy.graph import control_flow

    body = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "body",
                             [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
                             [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])])
    scan = helper.make_node("Scan", ["features"], ["logits"], body=body, num_scan_inputs=1)
    graph = helper.make_graph([helper.make_node("Flatten", ["images"], ["features"]), scan], "g",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, 1, 1])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "scan.onnx"))
    assert control_flow(tmp_path / "scan.onnx") == "Scan"
    assert control_flow(_crafted_onnx(tmp_path / "plain.onnx")) is None


def test_a_damaged_onnx_file_is_one_error_line_that_calls_it_unreadable(tmp_path, capsys):
    """ONNX Runtime's own exception for a file it cannot parse (a cut download, another format) ended in its
    traceback."""
    (tmp_path / "model.onnx").write_bytes(b"\x08\x07not really a protobuf")
    line = _one_error(capsys, ["predict", str(tmp_path / "model.onnx"), str(_write_images(tmp_path / "images")[0])])
    assert f"{tmp_path / 'model.onnx'} is not a readable ONNX model" in line and "Fix: write it again" in line, line


def test_export_without_out_keeps_two_models_of_one_folder_apart(exported, tmp_path, monkeypatch):
    """Run by hand without --out: FOLDER/model.pt goes to outputs/export/FOLDER, and FOLDER/NAME.pt to
    outputs/export/FOLDER-NAME, so prune.pt's export is not replaced by transfer.pt's from the same folder."""
    from transferkit.deploy.export import main

    (tmp_path / "runs").mkdir()
    for name in ("model", "prune", "transfer"):
        shutil.copyfile(exported[0] / "pruned" / "model.pt", tmp_path / "runs" / f"{name}.pt")
    monkeypatch.chdir(tmp_path)
    for name in ("model", "prune", "transfer"):
        assert main([f"runs/{name}.pt", "--repeats", "5", "--batch-size", "16", "--threads", "1"]) == 0
    made = sorted(p.parent.name for p in (tmp_path / "outputs" / "export").glob("*/export.json"))
    assert made == ["runs", "runs-prune", "runs-transfer"]
    monkeypatch.chdir(tmp_path / "runs")  # a file named from its own folder: the folder's name all the same
    assert main(["prune.pt", "--repeats", "5", "--batch-size", "16", "--threads", "1"]) == 0
    assert (tmp_path / "runs" / "outputs" / "export" / "runs-prune" / "export.json").is_file()


def test_a_check_on_random_images_says_why_no_test_set_was_used(tmp_path, monkeypatch):
    """Export run from a subfolder looks for artifacts/prepare/target.pt there: the description it prints says
    where it looked and what it found, not that no test set has the model's classes."""
    from transferkit.deploy.export import check_images
    from transferkit.io import save_torch

    monkeypatch.chdir(tmp_path)
    assert check_images(None, CLASSES, 32)[2] == "256 random images (no artifacts/prepare/target.pt here)"
    other = {"classes": CLASSES[::-1], "test_x": torch.zeros(2, 3, 32, 32, dtype=torch.uint8),
             "test_y": torch.zeros(2, dtype=torch.long)}
    save_torch(other, tmp_path / "artifacts" / "prepare" / "target.pt")
    assert check_images(None, CLASSES, 32)[2] == "256 random images (artifacts/prepare/target.pt holds other classes)"
