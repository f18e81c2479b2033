"""Every input a user controls, in one table: each bad value or file ends in one
TransferkitError whose message names the problem and the fix, before any training, and the
stage's previous outputs stay byte-for-byte intact.

Each case starts from a copy of a finished smoke pipeline, breaks one thing, runs the stage
that reads it exactly as the CLI does (validation, seeding, staged output) and checks the
message and the outputs. The CLI's one-line `error:` contract is checked in test_cli.py.
"""

from __future__ import annotations

import gzip
import io
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

from conftest import CIFAR10_CLASSES, compose, run, write_cifar_pickles, write_image_folder
from transferkit.errors import TransferkitError


@dataclass
class Case:
    stage: str
    overrides: tuple[str, ...] = ()
    needle: str = ""
    setup: Callable[[Path], tuple[str, ...]] | None = None  # breaks a file; may return more overrides
    experiment: str = "smoke"


# --------------------------------------------------------------------- file breakers
def _write(path: Path, text: str | None) -> tuple:
    """`text` into a stage's file (None: delete it)."""
    path.write_text(text) if text is not None else path.unlink()
    return ()


def _archive_with(tmp: Path, **kw) -> Path:
    return write_image_folder(tmp / "data", CIFAR10_CLASSES, train_per_class=kw.get("train", 3),
                              test_per_class=1)


def _image_folder_overrides(path: Path) -> tuple[str, ...]:
    return (f"data.source.dataset={path}", f"data.target.dataset={path}", "data.target.train_per_class=2",
            "data.target.val_per_class=1", "data.source.classes=[airplane,ship]",
            "data.target.classes=[cat,dog]")


def corrupt_archive(tmp):
    path = _archive_with(tmp)
    path.write_bytes(path.read_bytes()[:200])  # truncated mid-member
    return _image_folder_overrides(path)


def damaged_header_archive(tmp):
    path = _archive_with(tmp)
    raw = bytearray(gzip.decompress(path.read_bytes()))
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        offset = tar.getmembers()[7].offset  # a header in the middle: tarfile alone would end the archive there
    raw[offset + 10] ^= 0xFF
    path.write_bytes(gzip.compress(bytes(raw)))
    return _image_folder_overrides(path)


def random_bytes_archive(tmp):
    path = tmp / "data" / "cifar10-jpeg.tar.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(range(256)) * 40)
    return _image_folder_overrides(path)


def damaged_zip(tmp):
    path = write_image_folder(tmp / "data", CIFAR10_CLASSES, 3, 1, archive="zip")
    path.write_bytes(path.read_bytes()[:-100])  # its central directory cut off
    return _image_folder_overrides(path)


def class_without_test_images(tmp):
    root = write_image_folder(tmp / "data", CIFAR10_CLASSES, 3, 1, archive=False)
    shutil.rmtree(root / "test" / "dog")
    return _image_folder_overrides(root)


def corrupt_image(tmp):
    root = write_image_folder(tmp / "data", CIFAR10_CLASSES, 3, 1, archive=False)
    (root / "train" / "cat" / "0001.jpg").write_bytes(b"\xff\xd8not really a jpeg")
    return _image_folder_overrides(root)


def unknown_class_in_folder(tmp):
    root = write_image_folder(tmp / "data", CIFAR10_CLASSES, 3, 1, archive=False)
    return (*_image_folder_overrides(root), "data.target.classes=[cat,dgo]")


def too_many_per_class(tmp):
    root = write_image_folder(tmp / "data", CIFAR10_CLASSES, 3, 1, archive=False)
    return (*_image_folder_overrides(root), "data.target.train_per_class=50")


def empty_folder(tmp):
    (tmp / "empty" / "train").mkdir(parents=True)
    return _image_folder_overrides(tmp / "empty")


def unofficial_cifar_pickles(tmp):
    write_cifar_pickles(tmp / "data", "cifar10", CIFAR10_CLASSES, 5, 1)  # md5s cannot match
    return ("data.download=false",)


def unreadable_cifar_pickle(tmp):
    folder = write_cifar_pickles(tmp / "data", "cifar10", CIFAR10_CLASSES, 5, 1)
    (folder / "data_batch_3").write_bytes(b"not a pickle")
    return ("data.download=false", "data.verify_checksums=false")


def truncated_checkpoint(tmp):
    path = tmp / "artifacts" / "pretrain" / "model.pt"
    path.write_bytes(path.read_bytes()[:100])
    return ()


def bytes_that_are_no_checkpoint(tmp):
    (tmp / "artifacts" / "pretrain" / "model.pt").write_bytes(bytes(range(189, 256)) * 4)
    return ()


def foreign_file_as_checkpoint(tmp):
    torch.save({"weights": torch.zeros(3)}, tmp / "artifacts" / "pretrain" / "model.pt")
    return ()


def checkpoint_of_other_architecture(tmp):
    from transferkit.models import model_from_config, save_checkpoint

    other = model_from_config({"name": "vgg_mini", "widths": [8] * 9, "fc_width": 16}, 4)
    save_checkpoint(other, tmp / "artifacts" / "pretrain" / "model.pt", ["src_a", "src_b", "src_c", "src_d"],
                    stage="pretrain", experiment="smoke")
    return ()


def teacher_of_other_classes(tmp):
    shutil.copy(tmp / "artifacts" / "pretrain" / "model.pt", tmp / "artifacts" / "transfer" / "model.pt")
    return ()


def missing_prepared_task(tmp):
    shutil.rmtree(tmp / "artifacts" / "prepare")
    return ()


def truncated_prepared_task(tmp):
    path = tmp / "artifacts" / "prepare" / "target.pt"
    path.write_bytes(path.read_bytes()[:500])
    return ()


def altered_prepared_task(change: Callable[[dict], None]) -> Callable[[Path], tuple]:
    """A loadable target.pt whose content is not a task as prepare writes one."""
    def setup(tmp: Path) -> tuple:
        import torch

        path = tmp / "artifacts" / "prepare" / "target.pt"
        task = torch.load(path, weights_only=True)
        change(task)
        torch.save(task, path)
        return ()
    return setup


def student_of_other_classes(tmp):
    shutil.copy(tmp / "artifacts" / "pretrain" / "model.pt", tmp / "artifacts" / "distill" / "model.pt")
    return ()


def broken_onnx(tmp):
    path = tmp / "artifacts" / "export" / "model.onnx"
    path.write_bytes(path.read_bytes()[:300])  # truncated: no ONNX graph
    return ()


def int8_as_export(tmp):
    shutil.copyfile(tmp / "artifacts" / "quantize" / "model.onnx", tmp / "artifacts" / "export" / "model.onnx")
    return ()


def weaker_int8(tmp):
    """An INT8 model that must lose top-1: calibrated on blank images and judged on noise images in
    the val split, far outside every calibrated range, labelled with what the fp32 model predicts
    (so fp32 is all right). Noise, not the val images: a smoke model may give every image one
    class, which a badly quantized model keeps giving."""
    import torch

    from transferkit.evaluation.metrics import predict_onnx

    path = tmp / "artifacts" / "prepare" / "target.pt"
    task = torch.load(path, weights_only=True)
    task["train_x"] = torch.zeros_like(task["train_x"])
    task["val_x"] = torch.randint(0, 256, task["val_x"].shape, dtype=torch.uint8,
                                  generator=torch.Generator().manual_seed(0))
    fp32 = predict_onnx(tmp / "artifacts" / "export" / "model.onnx", task["val_x"], 500, threads=1).numpy()
    task["val_y"] = torch.from_numpy(fp32.argmax(1)).to(task["val_y"].dtype)
    torch.save(task, path)
    return ()


CASES = {
    # ---- dataset paths and formats
    # three ways, the synthetic images no fix for the scenarios, whose quadrants are real classes
    "missing dataset": Case("prepare", ("data.download=false",), "(3) synthetic images: `experiment=smoke` (the "
                            "pipeline; `transferkit scenarios` needs real images)", experiment="cifar10_split"),
    "corrupt archive": Case("prepare", needle="archive", setup=corrupt_archive, experiment="cifar10_split"),
    # a target.pt that loads but is no task: a crash mid-way, or training on the wrong data without a word
    "a prepared task without its val split": Case("scratch", needle="target.pt is not a prepared task: it lacks val_x",
                                                  setup=altered_prepared_task(lambda t: t.pop("val_x"))),
    "prepared labels beyond the classes": Case("scratch", needle="labels outside 0..2", setup=altered_prepared_task(
        lambda t: t.update(train_y=t["train_y"] + 5))),
    "fewer prepared labels than images": Case("scratch", needle="not one int64 label per image",
                                              setup=altered_prepared_task(lambda t: t.update(train_y=t["val_y"]))),
    "prepared images in float": Case("scratch", needle="not uint8 images", setup=altered_prepared_task(
        lambda t: t.update(train_x=t["train_x"].float()))),
    "archive with a damaged header": Case("prepare", needle="is damaged", setup=damaged_header_archive,
                                          experiment="cifar10_split"),
    "archive of random bytes": Case("prepare", needle="archive", setup=random_bytes_archive,
                                    experiment="cifar10_split"),
    "damaged zip archive": Case("prepare", needle="BadZipFile", setup=damaged_zip, experiment="cifar10_split"),
    "corrupt image": Case("prepare", needle="0001.jpg", setup=corrupt_image, experiment="cifar10_split"),
    "empty image folder": Case("prepare", needle="no images found", setup=empty_folder, experiment="cifar10_split"),
    "CIFAR pickles failing their checksum": Case("prepare", needle="checksum", setup=unofficial_cifar_pickles,
                                                 experiment="cifar10_split"),
    "unreadable CIFAR pickle": Case("prepare", needle="data_batch_3", setup=unreadable_cifar_pickle,
                                    experiment="cifar10_split"),
    "unknown dataset name": Case("prepare", ("data.target.dataset=cifar1000",), "cifar1000"),
    # ---- class names and counts
    "unknown class name": Case("prepare", needle="unknown class 'dgo'", setup=unknown_class_in_folder,
                               experiment="cifar10_split"),
    "more images per class than exist": Case("prepare", needle="train images", setup=too_many_per_class,
                                             experiment="cifar10_split"),
    "a class without test images": Case("prepare", needle="['dog'] of data.target.classes have no test images",
                                        setup=class_without_test_images, experiment="cifar10_split"),
    "class in source and target": Case("prepare", ("data.target.dataset=cifar10", "data.source.dataset=cifar10",
                                                   "data.source.classes=[cat,ship]", "data.target.classes=[cat,dog]"),
                                       "both"),
    "class listed twice": Case("prepare", ("data.target.classes=[tgt_a,tgt_a,tgt_b]",), "more than once"),
    "a single class": Case("prepare", ("data.target.classes=[tgt_a]",), "at least 2 classes"),
    "negative val count": Case("prepare", ("data.target.val_per_class=-1",), "data.target.val_per_class"),
    "no classes": Case("prepare", ("data.target.classes=[]",), "data.target.classes=[] is invalid"),
    "classes as a string, not a list": Case("prepare", ("data.target.classes=tgt_a",), "must be a valid list"),
    # ---- config groups and numeric ranges
    "unknown model": Case("pretrain", ("model.name=alexnet",), "alexnet"),
    "a block of zero channels": Case("pretrain", ("model.widths=[0,8,8]",), "model.widths=[0, 8, 8] is invalid"),
    "a stem wider than the whitening fills": Case("pretrain", ("model.stem_width=32",), "at most 24 filters"),
    "a setting the student network does not take": Case("student", ("+distill.student.width_mult=0.5",),
                                                         "bad settings for distill.student"),
    "no source training and no published weights": Case("pretrain", ("pretrain.epochs=0",), "model.weights"),
    "zero devices": Case("transfer", ("trainer.devices=0",), "trainer.devices=0 is invalid"),
    "zero nodes": Case("transfer", ("trainer.num_nodes=0",), "trainer.num_nodes"),
    "negative thread count": Case("transfer", ("trainer.num_threads=-1",), "trainer.num_threads"),
    "unknown accelerator": Case("transfer", ("trainer.accelerator=tpu",), "trainer.accelerator='tpu'"),
    "Lightning's short precision name": Case("transfer", ("trainer.precision=bf16",),
                                             "'16-true' (Lightning's short name bf16 is bf16-mixed). Fix:"),
    "freeze_depth beyond the blocks": Case("transfer", ("transfer.freeze_depth=9",), "transfer.freeze_depth"),
    "negative freeze_depth": Case("transfer", ("transfer.freeze_depth=-1",), "transfer.freeze_depth"),
    "freeze curve depth beyond the blocks": Case("freeze_curve", ("freeze_curve.depths=[0,9]",),
                                                 "freeze_curve.depths=[0, 9] is invalid: model 'fastnet' has 4 blocks"),
    "freeze curve depth twice": Case("freeze_curve", ("freeze_curve.depths=[2,2]",),
                                     "freeze_curve.depths=[2, 2] is invalid: lists a depth twice"),
    "freeze curve depth not a number": Case("freeze_curve", ("freeze_curve.depths=[a]",),
                                            "freeze_curve.depths=['a'] is invalid: must be a valid integer "
                                            "(item 0: 'a')"),
    "negative learning rate": Case("transfer", ("transfer.lr=-0.1",), "transfer.lr"),
    "zero learning rate": Case("pretrain", ("pretrain.lr=0",), "pretrain.lr"),
    "infinite learning rate": Case("scratch", ("scratch.lr=inf",), "scratch.lr=inf is invalid"),
    # a valid setting that blows the loss up: NaN weights, saved as a model and read by every later stage
    "a learning rate that diverges": Case("scratch", ("scratch.lr=1e6", "scratch.epochs=2"), "training diverged"),
    "negative backbone LR multiplier": Case("transfer", ("transfer.backbone_lr_mult=-1",), "backbone_lr_mult"),
    "zero epochs": Case("scratch", ("scratch.epochs=0",), "scratch.epochs"),
    "zero batch size": Case("transfer", ("transfer.batch_size=0",), "transfer.batch_size"),
    "momentum above 1": Case("transfer", ("transfer.momentum=1.5",), "transfer.momentum"),
    "label smoothing above 1": Case("transfer", ("transfer.label_smoothing=2",), "label_smoothing"),
    "translation too large": Case("transfer", ("transfer.translate=20",), "transfer.translate"),
    "negative weight decay": Case("pretrain", ("pretrain.weight_decay=-1",), "pretrain.weight_decay"),
    "probe depth beyond the blocks": Case("probe", ("probe.depth=9",), "probe.depth"),
    "scratch freeze_depth above 1": Case("scratch", ("scratch.freeze_depth=3",), "scratch.freeze_depth"),
    # only fastnet's first block is initialised from the data: another's, frozen, would stay random
    "scratch freezing a random first block": Case("scratch", ("scratch.freeze_depth=1", "model=vgg_mini"),
                                                  "scratch.freeze_depth=1 keeps the first block fixed"),
    "pretrain freezing a random first block": Case("pretrain", ("pretrain.freeze_depth=1", "model=vgg_mini"),
                                                   "model 'vgg_mini' starts it at random"),
    "negative seed": Case("transfer", ("seed=-1",), "seed"),
    "no seed": Case("transfer", ("~seed",), "seed is missing"),
    # ---- keys conf/ lacks, and values of the wrong kind where no range applies
    "a key conf/ lacks, added with +": Case("transfer", ("+transfer.lrr=0.1",),
                                            "no stage reads transfer.lrr (did you mean transfer.lr"),
    "a dataset that is no name or path": Case("prepare", ("data.source.dataset=5",),
                                              "data.source.dataset=5 is invalid"),
    "no target split at all": Case("prepare", ("data.target=null",), "data.target=None is invalid"),
    "an image size that is no integer": Case("prepare", ("data.image_size=32.0",), "data.image_size=32.0 is invalid"),
    "a student init that is no path": Case("student", ("distill.student_init=5",), "distill.student_init=5 is invalid"),
    "unknown strategy": Case("pretrain", ("trainer.strategy=bogus",), "trainer.strategy='bogus' is invalid"),
    "determinism with cuDNN autotuning": Case("pretrain", ("trainer=gpu", "trainer.deterministic=true"),
                                              "reruns are not bit-identical. Fix: add trainer.benchmark=false"),
    "devices that are no count": Case("transfer", ("trainer.devices=foo",), "trainer.devices='foo' is invalid"),
    "device ids on the CPU": Case("transfer", ("trainer.devices=[0,1]",), "trainer.devices=[0, 1] is invalid"),
    "a block replaced by a number": Case("transfer", ("transfer=5",), "transfer=5"),
    "a key others refer to, deleted": Case("transfer", ("~transfer.lr",), "transfer.lr"),
    "no trainer preset": Case("transfer", ("trainer=null",), "trainer=null"),
    "SyncBatchNorm on CPU": Case("transfer", ("trainer.sync_batchnorm=true",), "sync_batchnorm"),
    "gradual unfreezing on two CPU processes": Case("transfer", ("transfer.unfreeze_every_epochs=1",
                                                                 "trainer.devices=2"), "several processes"),
    "gradual unfreezing of a frozen backbone": Case("transfer", ("transfer.unfreeze_every_epochs=1",
                                                                 "transfer.backbone_lr_mult=0"),
                                                    "transfer.backbone_lr_mult=0 keeps frozen"),
    "unknown distillation method": Case("distill", ("distill.method=fitnets",), "fitnets"),
    "OmegaConf's mark of a value not given": Case("distill", ("distill.method=???",),
                                                  "distill.method='???' is invalid: ??? is OmegaConf's mark"),
    "temperature 0": Case("distill", ("distill.temperature=0",), "distill.temperature"),
    "mixup with a method that needs one label per image": Case("distill", ("distill.method=dkd", "distill.mixup=1"),
                                                               "distill.mixup"),
    "alpha above 1": Case("distill", ("distill.alpha=1.5",), "distill.alpha"),
    "pruning ratio 1": Case("prune", ("prune.ratio=1",), "prune.ratio"),
    "pruning ratio negative": Case("prune", ("prune.ratio=-0.2",), "prune.ratio"),
    "unknown pruning criterion": Case("prune", ("prune.criterion=magic",), "magic"),
    "unknown pruning mode": Case("prune", ("prune.mode=sparse",), "prune.mode"),
    "unknown pruning target": Case("prune", ("prune.target=flops",), "prune.target"),
    "unknown pruning scope": Case("prune", ("prune.scope=everywhere",), "prune.scope"),
    "unknown recovery teacher": Case("prune", ("prune.teacher=oracle",), "prune.teacher"),
    "zero pruning steps": Case("prune", ("prune.steps=0",), "prune.steps"),
    "pruning channel multiple zero": Case("prune", ("prune.round_to=0",), "prune.round_to"),
    "layer to keep that does not exist": Case("prune", ("prune.keep=[head,blocks.77]",), "blocks.77"),
    "layers to keep as a string, not a list": Case("prune", ("prune.keep=head",), "prune.keep='head' is invalid"),
    "pruning rates, one too few": Case("prune", ("prune.rates=[1,1,0.5]",), "prune.rates"),
    "negative pruning rate": Case("prune", ("prune.rates=[1,1,1,-1]",), "prune.rates"),
    "pruning rates that cut nothing": Case("prune", ("prune.rates=[0,0,0,0]",), "no block has a rate above 0"),
    "pruning rates only on kept blocks": Case("prune", ("prune.rates=[0,0,0,1]", "prune.keep=[head,blocks.3]"),
                                              "no block outside prune.keep has a rate above 0, so pruning would"),
    "negative sparse-learning epochs": Case("prune", ("prune.sparse_epochs=-1",), "prune.sparse_epochs"),
    "negative sparse-learning strength": Case("prune", ("prune.sparse_reg=-1",), "prune.sparse_reg"),
    "sparse learning in unstructured mode": Case("prune", ("prune.mode=unstructured", "prune.sparse_epochs=2"),
                                                 "prune.sparse_epochs"),
    "pruning rates in unstructured mode": Case("prune", ("prune.mode=unstructured", "prune.rates=[1,1,1,0.5]"),
                                               "prune.rates"),
    "channel criterion in unstructured mode": Case("prune", ("prune.mode=unstructured", "prune.criterion=bn_scale"),
                                                   "prune.criterion"),
    "channel scope in unstructured mode": Case("prune", ("prune.mode=unstructured", "prune.scope=isomorphic"),
                                               "prune.scope"),
    "zero latency repeats": Case("evaluate", ("evaluate.latency_repeats=0",), "evaluate.latency_repeats"),
    # what evaluate quotes from other stages: one line naming the stage to run again, before any scoring
    "a training stage's timing.json cut short": Case(
        "evaluate", needle="artifacts/pretrain/timing.json (Expecting", setup=lambda tmp: _write(
            tmp / "artifacts" / "pretrain" / "timing.json", '{"train_seconds": 3')),
    "quantize.json that is no object": Case("evaluate", needle="holds a list, not the object the 'quantize' stage",
                                            setup=lambda tmp: _write(tmp / "artifacts" / "quantize" / "quantize.json",
                                                                     "[1, 2]")),
    "prepare's summary.json gone": Case("evaluate", needle="prepare/summary.json (No such file or directory). Fix: "
                                        "run the 'prepare' stage again", setup=lambda tmp: _write(
                                            tmp / "artifacts" / "prepare" / "summary.json", None)),
    "zero throughput repeats": Case("evaluate", ("evaluate.throughput_repeats=0",), "evaluate.throughput_repeats"),
    "unknown quantization method": Case("quantize", ("quantize.method=kl",), "quantize.method"),
    "unknown quantization format": Case("quantize", ("quantize.format=int4",), "quantize.format"),
    "zero calibration images": Case("quantize", ("quantize.calibration_images=0",), "quantize.calibration_images"),
    "more calibration images than training images": Case("quantize", ("quantize.calibration_images=100000",),
                                                          "72 training images"),
    "a float layer that is not in the model": Case("quantize", ("quantize.keep_float=[Gemm,node_nowhere]",),
                                                   "/artifacts/export/model.onnx (nodes:"),  # not a temporary copy
    "float layers as a string, not a list": Case("quantize", ("quantize.keep_float=Gemm",),
                                                 "quantize.keep_float='Gemm' is invalid"),
    "an ONNX file ONNX Runtime cannot quantize": Case("quantize", needle="cannot quantize", setup=broken_onnx),
    "an INT8 model as the export": Case("quantize", needle="is quantized already (it holds DequantizeLinear, ",
                                        setup=int8_as_export),
    "the exported model gone": Case("quantize", needle="exported fp32 model not found at", setup=lambda tmp: _write(
        tmp / "artifacts" / "export" / "model.onnx", None)),  # was "ONNX Runtime cannot quantize", try qdq
    "an INT8 model that loses too much": Case("quantize", ("quantize.max_drop=0", "quantize.qat_epochs=0"),
                                              "quantize.qat_epochs",
                                              setup=weaker_int8),
    # ---- checkpoints and files from other runs, truncated or foreign
    "truncated checkpoint": Case("transfer", needle="unreadable", setup=truncated_checkpoint),
    "bytes that are no checkpoint at all": Case("transfer", needle="damaged, or not a file PyTorch wrote",
                                                setup=bytes_that_are_no_checkpoint),
    "not a transferkit checkpoint": Case("transfer", needle="not a transferkit checkpoint",
                                         setup=foreign_file_as_checkpoint),
    "checkpoint of another architecture": Case("transfer", needle="vgg_mini", setup=checkpoint_of_other_architecture),
    "teacher trained on other classes": Case("distill", needle="classes", setup=teacher_of_other_classes),
    "student trained on other classes": Case("prune", needle="trained on", setup=student_of_other_classes),
    "prepared task missing": Case("pretrain", needle="run the 'prepare' stage", setup=missing_prepared_task),
    "prepared task truncated": Case("transfer", needle="unreadable", setup=truncated_prepared_task),
}


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()} if folder.exists() else {}


def test_there_are_at_least_25_cases():
    assert len(CASES) >= 25


TRAINS_FIRST = {"a learning rate that diverges"}  # found only by training


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, smoke_artifacts, tmp_path, monkeypatch):
    case = CASES[name]
    if name not in TRAINS_FIRST:
        monkeypatch.setattr("transferkit.stages.training.fit", lambda *a, **k: pytest.fail("it trained first"))
    ref_cfg, _ = smoke_artifacts
    shutil.copytree(Path(ref_cfg.paths.artifacts_dir), tmp_path / "artifacts")
    (tmp_path / "data").mkdir(exist_ok=True)
    extra = case.setup(tmp_path) if case.setup else ()
    out = tmp_path / "artifacts" / case.stage
    before = _snapshot(out)
    with pytest.raises(TransferkitError) as err:
        cfg = compose(f"experiment={case.experiment}", *case.overrides, *extra, tmp=tmp_path)
        run(case.stage, cfg)
    message = str(err.value)
    assert case.needle in message, message
    assert "Fix:" in message or "fix" in message.split(), f"no fix named: {message}"
    assert _snapshot(out) == before, f"{case.stage}'s previous outputs changed"
    assert not (tmp_path / "artifacts" / f".{case.stage}.incomplete").exists()


@pytest.mark.parametrize("stage, out, needle", [
    ("scratch", "artifacts", "holds .*prepare, which this stage reads"),
    ("scratch", "artifacts/transfer/../prepare", "prepare, which this stage reads"),
    ("scratch", "notes", "files no stage wrote"),
    ("scratch", "artifacts/transfer", "is, holds or is inside the transfer stage's"),
    ("scratch", "artifacts/transfer/dvclive", "is, holds or is inside the transfer stage's"),  # dvclive's params.yaml
    ("prepare", "project", r"holds a project \(dvc.yaml, conf\)"),  # its params.yaml, as a stage's folder has
    ("prepare", "project/..", "is or holds the current folder"),
    # the swap would rename the link away and leave a folder in its place, the folder it pointed to unchanged
    ("scratch", "linked", r"is a symbolic link .*Fix: pass the folder it points to \(.*store\)")])
def test_an_output_folder_that_holds_other_things_is_never_replaced(smoke_artifacts, tmp_path, monkeypatch, stage, out,
                                                                     needle):
    """`--out DIR` names the stage's own folder: the swap that installs a stage's outputs would delete
    whatever else DIR holds (every stage's outputs, for `--out artifacts`; a project, whose params.yaml
    looks like a stage's), an input it reads, or another stage's outputs."""
    from transferkit.stages.run import run_stage

    ref_cfg, _ = smoke_artifacts
    shutil.copytree(Path(ref_cfg.paths.artifacts_dir), tmp_path / "artifacts")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("a user's own file")
    for name in ("params.yaml", "dvc.yaml", "conf/config.yaml"):
        (tmp_path / "project" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "project" / name).write_text("the project's own")
    (tmp_path / "params.yaml").write_text("looks like a stage's output folder")
    shutil.copytree(tmp_path / "artifacts" / "scratch", tmp_path / "store")  # a stage's earlier outputs
    (tmp_path / "linked").symlink_to(tmp_path / "store")
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    before = _snapshot(tmp_path)
    with pytest.raises(TransferkitError, match=needle):
        run_stage(stage, compose("experiment=smoke", tmp=tmp_path), tmp_path / out)
    assert _snapshot(tmp_path) == before
    (tmp_path / "mine").mkdir()  # an empty folder, or a stage's earlier outputs, may be replaced
    run_stage("scratch", compose("experiment=smoke", "scratch.epochs=1", tmp=tmp_path), tmp_path / "mine")
    assert (tmp_path / "mine" / "model.pt").exists()


@pytest.mark.parametrize("made", [False, True])
def test_the_artifacts_folder_as_a_stages_output_is_refused_before_any_stage_ran(tmp_path, monkeypatch, made):
    """In a fresh clone `artifacts/` is missing or empty: prepare's files loose in it would make it look like
    a stage's folder, and the next `--out artifacts` would replace every stage's outputs with its own."""
    from transferkit.stages.run import run_stage

    monkeypatch.chdir(tmp_path)
    if made:
        (tmp_path / "artifacts").mkdir()
    with pytest.raises(TransferkitError, match=r"artifacts is, holds or is inside the pretrain stage's.*Fix"):
        run_stage("prepare", compose("experiment=smoke", tmp=tmp_path), tmp_path / "artifacts")
    assert list(tmp_path.glob("artifacts/*")) == []


def test_a_gpu_clusters_params_prepare_on_a_cpu_node(tmp_path, monkeypatch):
    """prepare touches no device, and evaluate trains nothing: a params file for fp16 on GPUs (accelerator auto)
    prepares on a CPU-only login node, where the download works; transfer there is refused."""
    from transferkit.stages.run import run_stage

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = compose("experiment=smoke", "trainer=ddp", "trainer.precision=16-mixed", tmp=tmp_path)
    run_stage("prepare", cfg, tmp_path / "artifacts" / "prepare")
    assert (tmp_path / "artifacts" / "prepare" / "target.pt").exists()
    with pytest.raises(TransferkitError, match="trainer.precision=16-mixed is fp16"):
        run_stage("pretrain", cfg, tmp_path / "artifacts" / "pretrain")


@pytest.mark.parametrize("overrides, needle", [
    (("trainer=gpu",), "trainer.accelerator=gpu, but torch sees no CUDA GPU.*Fix: train on"),
    # the ddp preset's accelerator is auto: the CPU here, where SyncBatchNorm fails on the first batch
    (("trainer=ddp", "trainer.sync_batchnorm=true"), "sync_batchnorm=true works only on CUDA GPUs.*auto.*Fix"),
    # Lightning would train in bf16 instead, with a warning: the slow path on a CPU without native bf16
    (("trainer=cpu", "trainer.precision=16-mixed"),
     r"trainer.precision=16-mixed is fp16, which torch runs on GPUs only.*trains on the CPU here. Fix: .*auto"),
    (("trainer.accelerator=auto", "trainer.precision=16-true"),
     r"trainer.precision=16-true is fp16.*accelerator=auto trains on the CPU"),
])
def test_a_gpu_trainer_on_a_machine_without_one(smoke_artifacts, tmp_path, monkeypatch, overrides, needle):
    """Refused when the stage runs, not by `transferkit params`: params.yaml may be written for another machine."""
    from transferkit.config.checks import validate_run

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ref_cfg, _ = smoke_artifacts
    shutil.copytree(Path(ref_cfg.paths.artifacts_dir), tmp_path / "artifacts")
    before = _snapshot(tmp_path / "artifacts")
    cfg = compose("experiment=smoke", *overrides, tmp=tmp_path)
    validate_run(cfg, None, {}, all_stages=True)
    with pytest.raises(TransferkitError, match=needle):
        run("transfer", cfg)
    assert _snapshot(tmp_path / "artifacts") == before


def test_a_missing_input_read_from_a_projects_subfolder_names_the_folder_to_run_from(tmp_path, monkeypatch):
    """`transferkit transfer --params ../params.yaml` from docs/ said to run prepare first, which had run: its
    relative paths were read from docs/."""
    from transferkit.io import require

    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "config.yaml").write_text("seed: 0\n")
    (tmp_path / "docs").mkdir()
    (tmp_path / "artifacts" / "prepare").mkdir(parents=True)  # where the project's own folder has it
    (tmp_path / "artifacts" / "prepare" / "target.pt").write_bytes(b"")
    monkeypatch.chdir(tmp_path / "docs")
    with pytest.raises(TransferkitError, match=rf"target task not found at artifacts/prepare/target.pt, read from "
                                               rf"{tmp_path / 'docs'}, a folder inside the project {tmp_path}, .* "
                                               rf"Fix: run it from {tmp_path}\.$"):
        require("artifacts/prepare/target.pt", "target task", "prepare")
    for where, path in ((tmp_path, "artifacts/prepare/source.pt"), (tmp_path / "docs", "artifacts/prepare/source.pt"),
                        (tmp_path / "docs", tmp_path / "x" / "target.pt")):
        monkeypatch.chdir(where)  # from the project's folder, a file it lacks too, an absolute path: not run yet
        with pytest.raises(TransferkitError, match=r"run the 'prepare' stage first \(`dvc repro prepare`\)\.$"):
            require(path, "target task", "prepare")
    # a Hydra run with paths.artifacts_dir=/tmp/x: `dvc repro prepare` would fill the project's folder, not that one
    elsewhere = tmp_path / "x" / "prepare"
    with pytest.raises(TransferkitError, match=rf"run the 'prepare' stage first into {elsewhere} \(`transferkit "
                                               rf"prepare` with the same paths.artifacts_dir; `dvc repro prepare` "
                                               rf"fills the project's own folder\)\.$"):
        require(elsewhere / "target.pt", "target task", "prepare")
