"""The training loop: no host synchronisation per step, resume after an interruption with
identical results, precision chosen by the machine, lookahead weights."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from conftest import compose, resumable_leftover, run
from transferkit.data.loader import TaskDataModule
from transferkit.data.synthetic import make_synthetic
from transferkit.data.tasks import select_task
from transferkit.models import build_model
from transferkit.training.classifier import ClassifierModule
from transferkit.training.trainer import fit

SETTINGS = dict(lr=0.05, weight_decay=5e-4, momentum=0.9, label_smoothing=0.1, warmup_fraction=0.1)
# Every way Python code reads a value back from a tensor: on a GPU each one waits for the queue.
READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__")


def _task(train_per_class: int):
    raw = make_synthetic(["a", "b", "c"], train_per_class + 4, 4, seed=1)
    return select_task(raw, ["a", "b", "c"], train_per_class=train_per_class, val_per_class=4,
                       test_per_class=None, seed=0, role="target")


class _Automatic:
    """A module trained by Lightning's automatic optimization: the loop our training_step writes out."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.automatic_optimization = True

    def training_step(self, batch, batch_idx: int):
        return self.training_loss(batch)


def _module(kind: str, automatic: bool = False, **settings):
    from transferkit.distill.module import DistillerModule

    base = ClassifierModule if kind == "classifier" else DistillerModule
    cls = type(f"Automatic{base.__name__}", (_Automatic, base), {}) if automatic else base
    student = build_model("fastnet", 3, widths=[8, 16, 16], stem_width=8)
    if kind.startswith("fake-quantized"):  # as the quantize stage fine-tunes it for INT8
        from transferkit.deploy.fold import deployable
        from transferkit.deploy.qat import add_fake_quant

        student = deployable(student, for_training=True).train()
        add_fake_quant(student, per_channel="per-tensor" not in kind, reduce_range=True)
    if kind == "classifier":
        return cls(student, **SETTINGS, **settings)
    teacher = build_model("fastnet", 3, widths=[16, 16, 16], stem_width=8)  # distilled on mixed images
    return cls(student, teacher, method="kd", method_kwargs={"temperature": 4.0, "alpha": 0.5, "mixup": 1.0},
               **SETTINGS, **settings)


def _count_reads(monkeypatch, train_per_class: int, tmp_path: Path, kind: str = "classifier") -> int:
    pl.seed_everything(0, verbose=False)
    module = _module(kind)
    datamodule = TaskDataModule(_task(train_per_class), 8, 64, flip="random", translate=2)
    trainer_cfg = {**compose("experiment=smoke").trainer, "loggers": ["csv"], "checkpoint_budget": 0}
    if kind.startswith("fake-quantized"):  # in fp32, as the quantize stage runs it (`auto` may be bf16 here)
        trainer_cfg["precision"] = "32-true"
    count = [0]
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            count[0] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    fit(module, datamodule, trainer_cfg, tmp_path, max_epochs=1)
    monkeypatch.undo()
    return count[0]


@pytest.mark.parametrize("kind", ["classifier", "distiller with mixup", "fake-quantized distiller",
                                  "fake-quantized per-tensor distiller"])
def test_a_training_step_reads_nothing_back_from_the_device(monkeypatch, tmp_path, kind):
    """An epoch of 3x the steps reads exactly as many values back: none of them per step
    (what is read happens at the epoch's end: the logged loss and accuracy)."""
    few = _count_reads(monkeypatch, 8, tmp_path / "few", kind)      # 24 images: 3 steps of 8
    many = _count_reads(monkeypatch, 24, tmp_path / "many", kind)   # 72 images: 9 steps of 8
    assert few == many, f"{many - few} reads of device values in 6 more steps"


@pytest.mark.parametrize("kind,precision", [("classifier", "32-true"), ("distill", "bf16-mixed")])
def test_the_training_step_trains_as_lightnings_automatic_optimization_does(tmp_path, kind, precision):
    # gradual unfreezing, the step schedule and lookahead all see the same steps in the same order
    from transferkit.training.lookahead import Lookahead

    trainer_cfg = {**compose("experiment=smoke").trainer, "loggers": [], "checkpoint_budget": 0,
                   "precision": precision}
    weights = []
    for automatic in (True, False):
        pl.seed_everything(0, verbose=False)
        module = _module(kind, automatic, freeze_depth=1, unfreeze_every_epochs=1)
        datamodule = TaskDataModule(_task(16), 8, 64, flip="random", translate=2)
        trained = fit(module, datamodule, trainer_cfg, tmp_path / str(automatic), max_epochs=2,
                      callbacks=(Lookahead(every=2),))
        assert trained.precision == precision
        weights.append(trained.model.state_dict())
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_the_training_step_scales_fp16_gradients_as_automatic_optimization_does():
    # 16-mixed (older GPUs) steps through a GradScaler; Lightning's plugin runs it on a CPU too
    from pytorch_lightning.plugins.precision import MixedPrecision

    weights, scales = [], []
    for automatic in (True, False):
        pl.seed_everything(0, verbose=False)
        module = _module("classifier", automatic)
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=2, plugins=[MixedPrecision("16-mixed", "cpu")],
                             logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False)
        trainer.fit(module, datamodule=TaskDataModule(_task(16), 8, 64, flip="random", translate=2))
        weights.append(module.model.state_dict())
        scales.append(trainer.precision_plugin.scaler.get_scale())
    assert scales[0] == scales[1] and all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_a_fit_calls_no_inherited_empty_step_hook_and_every_overridden_one(monkeypatch, tmp_path):
    """Lightning calls each step hook on every callback and on the module (about ten Python calls each): those
    left as the base class's no-op are skipped, the overridden ones run each step, and all are back after."""
    from pytorch_lightning.callbacks import Callback

    from transferkit.training.hooks import STEP_HOOKS

    empty = []
    for base in (Callback, pl.LightningModule):  # the no-ops, counted: each is still the one the classes inherit
        for name in STEP_HOOKS:
            monkeypatch.setattr(base, name, lambda *args, _n=name, **kwargs: empty.append(_n))

    class Counted(Callback):
        steps = 0

        def on_train_batch_end(self, *args) -> None:
            Counted.steps += 1

    counted, module = Counted(), _module("classifier")
    trainer_cfg = {**compose("experiment=smoke").trainer, "loggers": ["csv"], "checkpoint_budget": 0}
    fit(module, TaskDataModule(_task(8), 8, 64), trainer_cfg, tmp_path, max_epochs=2, callbacks=(counted,))
    assert empty == [] and Counted.steps == 2 * 3  # 24 images in batches of 8, two epochs
    assert module.trained_images == 2 * 24  # the module's own on_train_batch_end ran every step too
    assert all(callable(getattr(o, name)) for o in (counted, module) for name in STEP_HOOKS)


def test_the_training_rate_counts_the_images_trained_on(tmp_path):
    """30 images in batches of 8 are 3 steps an epoch (the remainder is dropped): 24 images, not 30."""
    module = ClassifierModule(build_model("fastnet", 3, widths=[8, 16, 16], stem_width=8), **SETTINGS)
    datamodule = TaskDataModule(_task(10), 8, 64)
    trainer_cfg = {**compose("experiment=smoke").trainer, "loggers": [], "checkpoint_budget": 0}
    assert fit(module, datamodule, trainer_cfg, tmp_path, max_epochs=2).images == 2 * 3 * 8


def test_dvclive_writes_its_files_at_the_calls_its_own_stack_inspection_picks(tmp_path, monkeypatch):
    """Our dvclive logger decides `sync` by the frames' names, dvclive by inspect.stack(): at every
    log call of a fit with a validation split, both decide alike (and both decisions occur)."""
    import dvclive.fabric
    import dvclive.lightning

    decisions = []
    original = dvclive.fabric.DVCLiveLogger.log_metrics

    def recorded(self, metrics, step=None, sync=True):
        decisions.append((sync, dvclive.lightning._should_sync()))
        return original(self, metrics, step, sync)

    monkeypatch.setattr(dvclive.fabric.DVCLiveLogger, "log_metrics", recorded)
    module = ClassifierModule(build_model("fastnet", 3, widths=[8, 16, 16], stem_width=8), **SETTINGS)
    trainer_cfg = {**compose("experiment=smoke").trainer, "loggers": ["dvclive"], "checkpoint_budget": 0,
                   "log_every_n_steps": 1, "progress_bar": False}
    fit(module, TaskDataModule(_task(10), 8, 64), trainer_cfg, tmp_path, max_epochs=2)
    assert [ours for ours, _ in decisions] == [theirs for _, theirs in decisions]
    assert {ours for ours, _ in decisions} == {True, False}
    assert (tmp_path / "dvclive" / "metrics.json").exists()


class Interrupt(pl.Callback):
    """Raises at the start of epoch `at`, as a crash or Ctrl+C would, after the checkpoint of
    the epoch before has been completed; with `sigterm`, sends the process a SIGTERM instead (as
    `kill`, a scheduler or `docker stop` do), which Lightning turns into an exception at the next step."""

    def __init__(self, at: int, sigterm: bool = False):
        self.at, self.sigterm = at, sigterm

    def on_train_epoch_start(self, trainer, module):
        if trainer.current_epoch == self.at:
            if not self.sigterm:
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGTERM)


def _tensorboard_scalars(run_dir: Path) -> list[tuple[str, int, float]]:
    """Every scalar in the run's TensorBoard event files (records: 8-byte length, 4-byte CRC, the event, 4-byte CRC)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    scalars = []
    for path in (run_dir / "tensorboard").rglob("events.out.tfevents.*"):
        data, i = path.read_bytes(), 0
        while i < len(data):
            (length,) = struct.unpack("<Q", data[i:i + 8])
            event = Event.FromString(data[i + 12:i + 12 + length])
            scalars += [(v.tag, event.step, v.simple_value) for v in event.summary.value
                        if not v.tag.startswith(("_hparams_/", "hp_metric"))]
            i += 12 + length + 4
    return sorted(scalars)


@pytest.mark.parametrize("sigterm, stop", [(False, KeyboardInterrupt), (True, SystemExit)], ids=["ctrl_c", "sigterm"])
def test_an_interrupted_stage_resumes_from_its_checkpoint_with_identical_results(tmp_path, monkeypatch, caplog, sigterm,
                                                                                stop):
    """The stage ends as a failure, so that DVC does not record it as done: Ctrl+C as a KeyboardInterrupt
    (cli.main then dies of SIGINT; Lightning would exit(1)), SIGTERM with 143 (Lightning would exit 0); and
    the next run resumes."""
    import transferkit.training.trainer as trainer_module

    overrides = ("experiment=smoke", "trainer.checkpoint_budget=1", "trainer.loggers=[dvclive,csv,tensorboard]",
                 "pretrain.lookahead=true")
    straight = compose(*overrides, tmp=tmp_path / "straight")
    run("prepare", straight)
    run("pretrain", straight)

    resumed = compose(*overrides, tmp=tmp_path / "resumed")
    shutil.copytree(tmp_path / "straight" / "artifacts" / "prepare", tmp_path / "resumed" / "artifacts" / "prepare")
    make = trainer_module.make_trainer
    monkeypatch.setattr(trainer_module, "make_trainer",
                        lambda *a, callbacks=(), **k: make(*a, callbacks=(*callbacks, Interrupt(3, sigterm)), **k))
    with pytest.raises(stop) as stopped:
        run("pretrain", resumed)
    assert not sigterm or stopped.value.code == 143
    work = tmp_path / "resumed" / "artifacts" / ".pretrain.incomplete"
    assert (work / "checkpoints" / "last.ckpt").exists(), "the interrupted run left nothing to resume"
    monkeypatch.setattr(trainer_module, "make_trainer", make)
    # settings that change nothing pretrain computes (its display, another stage's) discard no training
    resumed = compose(*overrides, "trainer.progress_bar=false", "distill.alpha=0.5", tmp=tmp_path / "resumed")
    caplog.set_level(logging.INFO, logger="transferkit")  # the stage's closing line
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run("pretrain", resumed)
    # the CSV logger's warning that it deletes its file would be wrong: the resume restores the file
    assert not [w for w in caught if "Previous log files" in str(w.message)]

    a, b = (tmp_path / name / "artifacts" / "pretrain" for name in ("straight", "resumed"))
    epoch = json.loads((b / "timing.json").read_text())["resumed_at_epoch"]
    assert 1 <= epoch <= 3  # not from scratch, and the closing line says so
    assert f"resumed after epoch {epoch} of {resumed.pretrain.epochs} from a killed run's checkpoint" in caplog.text
    assert (a / "metrics.json").read_bytes() == (b / "metrics.json").read_bytes()
    assert torch.equal(torch.load(a / "model.pt")["state_dict"]["head.fc.weight"],
                       torch.load(b / "model.pt")["state_dict"]["head.fc.weight"])
    # the curves carry on where they stopped: every file of the logs as in the uninterrupted run (the learning
    # rate's included, which LearningRateMonitor logs as an epoch starts, before the checkpoint's pair is made)
    logs = sorted(p.relative_to(a) for p in (*(a / "dvclive").rglob("*"), a / "csv" / "metrics.csv") if p.is_file())
    assert any("lr-" in str(p) for p in logs)
    assert logs == sorted(p.relative_to(b) for p in (*(b / "dvclive").rglob("*"), b / "csv" / "metrics.csv")
                          if p.is_file())
    for log in logs:
        assert (a / log).read_text() == (b / log).read_text(), log
    # TensorBoard's files are named by the second they start in: the resumed run writes one of its own beside the
    # restored copy, which it used to replace (tensorboardX writes on a thread of its own, so the events of the last
    # moments before a checkpoint may be missing from the copy: no equality asserted)
    files = sorted(p.name for p in (b / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 2 and ".resumed-" in files[1] and _tensorboard_scalars(b) != [], files
    assert not (b / "checkpoints").exists() and not work.exists()


@pytest.mark.slow
def test_stages_with_several_fits_or_mixup_resume_with_identical_results(tmp_path, monkeypatch):
    """The same promise where one stage fits more than once (prune: sparse learning, a recovery
    per round, the final one; freeze_curve: one fit per depth) or draws per-step randomness
    (distill with mixup): interrupted in a later epoch, run again, the outputs are byte-identical."""
    import transferkit.training.trainer as trainer_module

    overrides = ("experiment=smoke", "trainer.checkpoint_budget=1", "distill.mixup=1.0", "prune.sparse_epochs=2",
                 "prune.sparse_reg=0.01", "prune.steps=2", "prune.epochs=4", "freeze_curve.depths=[0,2]")
    straight = compose(*overrides, tmp=tmp_path / "straight")
    for stage in ("prepare", "pretrain", "transfer", "distill", "prune", "freeze_curve"):
        run(stage, straight)
    resumed = compose(*overrides, tmp=tmp_path / "resumed")
    for stage in ("prepare", "pretrain", "transfer"):
        shutil.copytree(tmp_path / "straight" / "artifacts" / stage, tmp_path / "resumed" / "artifacts" / stage)
    make = trainer_module.make_trainer
    for stage in ("distill", "prune", "freeze_curve"):  # each stops in epoch 3 of the first fit that has one
        monkeypatch.setattr(trainer_module, "make_trainer",
                            lambda *a, callbacks=(), **k: make(*a, callbacks=(*callbacks, Interrupt(3)), **k))
        with pytest.raises(KeyboardInterrupt):
            run(stage, resumed)
        monkeypatch.setattr(trainer_module, "make_trainer", make)
        run(stage, resumed)
        a, b = (tmp_path / name / "artifacts" / stage for name in ("straight", "resumed"))
        timings = [json.loads(f.read_text()) for f in sorted(b.glob("**/timing.json"))]
        assert any(t["resumed_at_epoch"] for t in timings), f"{stage} started again from scratch"
        for f in sorted(a.glob("**/metrics.json")) + sorted(a.glob("**/model.pt")):
            assert f.read_bytes() == (b / f.relative_to(a)).read_bytes(), f"{stage}: {f.relative_to(a)} differs"
        assert not (tmp_path / "resumed" / "artifacts" / f".{stage}.incomplete").exists()


def test_a_resumed_freeze_curve_keeps_the_points_it_finished(tmp_path, monkeypatch):
    """Killed in its second point, freeze_curve resumes that point and trains the first no more."""
    import transferkit.training.trainer as trainer_module

    cfg = compose("experiment=smoke", "trainer.checkpoint_budget=1", "freeze_curve.depths=[0,2]", tmp=tmp_path)
    for stage in ("prepare", "pretrain"):
        run(stage, cfg)
    make, fits = trainer_module.make_trainer, []

    def counting(*a, callbacks=(), **k):
        fits.append(1)
        return make(*a, callbacks=(*callbacks, *[Interrupt(3)] * (len(fits) == 2)), **k)

    monkeypatch.setattr(trainer_module, "make_trainer", counting)
    with pytest.raises(KeyboardInterrupt):
        run("freeze_curve", cfg)
    assert len(fits) == 2
    fits.append(1)  # no interruption from here on
    results = run("freeze_curve", cfg)
    assert len(fits) == 4 and set(results) == {"depth0", "depth2"}  # one fit: the second point's
    timing = json.loads((tmp_path / "artifacts" / "freeze_curve" / "depth2" / "timing.json").read_text())
    assert 1 <= timing["resumed_at_epoch"] <= 3


def test_a_poisoned_resume_checkpoint_is_refused(tmp_path, monkeypatch):
    from test_safe_files import Payload

    from transferkit.errors import TransferkitError

    cfg = compose("experiment=smoke", tmp=tmp_path)
    run("prepare", cfg)
    work = resumable_leftover("pretrain", cfg)
    (work / "checkpoints" / "logs").mkdir(parents=True)
    marker = tmp_path / "marker"
    torch.save({"epoch": 1, "state_dict": Payload(marker)}, work / "checkpoints" / "last.ckpt")
    with pytest.raises(TransferkitError, match="not plain data"):
        run("pretrain", cfg)
    assert not marker.exists()


@pytest.mark.parametrize("state", [
    {"epoch": 1, "global_step": 4, "loops": {}, "optimizer_states": [], "state_dict": {"model.x": torch.ones(3)}},
    {"epoch": 1, "state_dict": {}},
    "cut off",
], ids=["other_model", "not_lightnings", "cut_off"])
def test_a_resume_checkpoint_that_does_not_fit_the_model_is_left_and_the_fit_starts_over(tmp_path, capsys, state):
    """Lightning's restore would fail on it with its own error, and the next run would meet it again."""
    cfg = compose("experiment=smoke", tmp=tmp_path)
    run("prepare", cfg)
    work = resumable_leftover("pretrain", cfg)
    (work / "checkpoints" / "logs").mkdir(parents=True)
    torch.save({"epoch": 1, "weights": torch.ones(1000)} if state == "cut off" else state,
               work / "checkpoints" / "last.ckpt")
    if state == "cut off":  # a disk that failed mid-write
        os.truncate(work / "checkpoints" / "last.ckpt", 600)
    run("pretrain", cfg)
    assert "is not a checkpoint of this fit" in capsys.readouterr().err
    timing = json.loads((Path(cfg.paths.artifacts_dir) / "pretrain" / "timing.json").read_text())
    assert timing["resumed_at_epoch"] is None and not work.exists()


class _EpochsStarted(pl.Callback):
    def __init__(self):
        self.started = []

    def on_train_epoch_start(self, trainer, module):
        self.started.append(trainer.current_epoch)


def _fit_stopped_at(out: Path, epoch: int, max_epochs: int) -> dict:
    """A fit saving every epoch, stopped as `epoch` starts (as Ctrl+C would); its trainer config."""
    trainer_cfg = {**compose("experiment=smoke").trainer, "loggers": [], "checkpoint_budget": 1}
    with pytest.raises(KeyboardInterrupt):
        fit(_module("classifier"), TaskDataModule(_task(8), 8, 64), trainer_cfg, out, max_epochs,
            callbacks=(Interrupt(epoch),))
    return trainer_cfg


def test_a_resumed_fit_trains_only_the_epochs_after_its_checkpoint_and_reports_the_first_of_them(tmp_path):
    """Stopped as epoch 2 starts (epochs 0 and 1 trained and checkpointed), the rerun trains epochs 2 and 3 alone,
    and its resumed_at_epoch (timing.json's) is 2, the first epoch it trains."""
    trainer_cfg = _fit_stopped_at(tmp_path, 2, 4)
    epochs = _EpochsStarted()
    done = fit(_module("classifier"), TaskDataModule(_task(8), 8, 64), trainer_cfg, tmp_path, 4, callbacks=(epochs,))
    assert done.resumed_at_epoch == 2 and epochs.started == [2, 3]


@pytest.mark.parametrize("flaw", ["a_layer_of_another_width", "no_optimizer_state"])
def test_a_resume_checkpoint_lightning_could_not_restore_is_left_and_the_fit_starts_over(tmp_path, capsys, flaw):
    """A checkpoint with the model's tensor names but one of another shape (a model of another width), or one
    without the optimiser's state, would fail Lightning's restore at every rerun: the fit trains from the start."""
    trainer_cfg = _fit_stopped_at(tmp_path, 1, 2)
    path = tmp_path / "checkpoints" / "last.ckpt"
    state = torch.load(path, weights_only=True)
    if flaw == "no_optimizer_state":
        del state["optimizer_states"]
    else:
        name, weight = next((k, v) for k, v in state["state_dict"].items() if v.dim() > 1)
        state["state_dict"][name] = torch.zeros(weight.shape[0] + 1, *weight.shape[1:])
    torch.save(state, path)
    epochs = _EpochsStarted()
    done = fit(_module("classifier"), TaskDataModule(_task(8), 8, 64), trainer_cfg, tmp_path, 2, callbacks=(epochs,))
    assert "is not a checkpoint of this fit" in capsys.readouterr().err
    assert done.resumed_at_epoch is None and epochs.started == [0, 1]


def test_a_resumed_fit_leaves_no_checkpoint_that_a_kill_left_beside_its_pair(tmp_path):
    """A kill mid-swap can leave checkpoints.previous/ beside the pair a rerun resumes from; a rerun that saves no
    checkpoint of its own (it resumes at the last epoch) leaves neither folder in the stage's outputs."""
    trainer_cfg = _fit_stopped_at(tmp_path, 2, 3)
    shutil.copytree(tmp_path / "checkpoints", tmp_path / "checkpoints.previous")  # as the killed swap left it
    done = fit(_module("classifier"), TaskDataModule(_task(8), 8, 64), trainer_cfg, tmp_path, 3)
    assert done.resumed_at_epoch == 2 and sorted(p.name for p in tmp_path.glob("checkpoints*")) == []


class _WeightsBecome(pl.Callback):
    """Sets one weight to `value` as training ends: what a loss that overflowed leaves."""

    def __init__(self, value: float):
        self.value = value

    def on_train_end(self, trainer, module):
        with torch.no_grad():
            weight = next(module.model.parameters())
            weight[(0,) * weight.dim()] = self.value


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "minus_inf"])
def test_weights_that_are_not_finite_after_a_fit_end_it_in_the_divergence_error(tmp_path, value):
    """Every later stage would read them: one NaN, inf or -inf weight ends the fit in the error that names the fix."""
    from transferkit.errors import TransferkitError

    trainer_cfg = {**compose("experiment=smoke").trainer, "loggers": [], "checkpoint_budget": 0}
    with pytest.raises(TransferkitError, match=r"training diverged: .*not finite.*Fix: lower"):
        fit(_module("classifier"), TaskDataModule(_task(8), 8, 64), trainer_cfg, tmp_path, 1,
            callbacks=(_WeightsBecome(value),))


def test_the_resume_key_changes_with_the_code_and_with_any_input_file(tmp_path, monkeypatch):
    import importlib.metadata
    import os
    import shutil

    import transferkit
    from transferkit.stages.common import resume_key

    code = tmp_path / "transferkit"  # a copy of the package, as resume_key reads it
    shutil.copytree(Path(transferkit.__file__).parent, code, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(transferkit, "__file__", str(code / "__init__.py"))
    inputs = [tmp_path / "prepare", tmp_path / "pretrain"]
    for folder in inputs:
        (folder / "dvclive").mkdir(parents=True)
        (folder / "dvclive" / "metrics.json").write_text("{}")
    key = resume_key(inputs)
    assert resume_key(inputs) == key and resume_key(inputs[:1]) != key
    for change in (lambda: (inputs[1] / "dvclive" / "metrics.json").write_text("{}  "),  # size
                   lambda: os.utime(inputs[0] / "dvclive" / "metrics.json", ns=(1, 1)),  # remade, same size
                   lambda: (inputs[0] / "target.pt").write_text(""),  # a new file
                   lambda: (code / "errors.py").write_text((code / "errors.py").read_text() + "# edited\n"),
                   lambda: monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.0")):  # torch, Lightning
        change()
        assert resume_key(inputs) != key
        key = resume_key(inputs)


def test_a_killed_fit_resumes_only_on_as_many_processes_and_in_the_precision_it_trained_with(monkeypatch):
    """`devices: auto` and `precision: auto` read the same in params.yaml on every node: resumed on more GPUs, a fit
    would take fewer steps an epoch than its schedule was counted in, and end before its last warm-down."""
    from transferkit.stages.run import tracked
    from transferkit.training import precision

    cfg = compose("experiment=smoke", "trainer.accelerator=gpu", "trainer.devices=auto", "trainer.precision=auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    keys = {}
    for gpus in (2, 2, 4):
        monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
        keys.setdefault(gpus, set()).add(tracked("transfer", cfg))
    assert len(keys[2]) == 1 and keys[2] != keys[4]
    assert json.loads(keys[4].pop())["processes"] == 4
    for devices, processes in (("'0,2'", 2), ("[1]", 1), (3, 3)):
        on_nodes = compose("experiment=smoke", "trainer.accelerator=gpu", f"trainer.devices={devices}",
                           "trainer.num_nodes=2")
        assert json.loads(tracked("transfer", on_nodes))["processes"] == 2 * processes
    on_cpu = compose("experiment=smoke", "trainer.accelerator=cpu", "trainer.precision=auto")
    chosen = {}
    for speedup in (0.5, 2.0):
        monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: speedup)
        chosen[speedup] = json.loads(tracked("pretrain", on_cpu))["precision"]
    assert chosen == {0.5: "32-true", 2.0: "bf16-mixed"}
    assert "processes" not in tracked("prepare", on_cpu)  # it fits nothing


def test_checkpoint_budget_bounds_the_time_spent_saving(tmp_path, monkeypatch):
    """On a clock the test moves (a real one on a busy machine would test nothing): epochs of 1 s and
    saves of 0.1 s under budgets of 2%, every epoch (1) and never (0)."""
    from types import SimpleNamespace

    from transferkit.training import trainer as tr

    now = [0.0]
    monkeypatch.setattr(tr, "time", SimpleNamespace(perf_counter=lambda: now[0]))

    class Trainer:  # just what the callback reads
        current_epoch, max_epochs, global_rank = 0, 1000, 0

        class strategy:
            broadcast = staticmethod(lambda x: x)

        def save_checkpoint(self, path):
            now[0] += 0.1
            saved.append(self.current_epoch)

    for budget, expected in ((0.02, range(35, 42)), (1, [200]), (0, [0])):
        now[0], saved, trainer = 0.0, [], Trainer()
        cb = tr.ResumeCheckpoint(tmp_path, budget=budget)
        cb.on_train_start(trainer, torch.nn.Linear(1000, 1000))
        for epoch in range(200):
            trainer.current_epoch = epoch
            now[0] += 1.0  # an epoch's training
            cb.on_train_epoch_end(trainer, None)
            cb.pending = None  # the swap at the next epoch's start is another test's
        assert len(saved) in expected, (budget, len(saved))
        if budget < 1:
            assert cb.spent <= budget * now[0] + 1e-9  # within the budget at every save, so at the end


def test_resume_checkpoints_are_written_in_the_work_folder_alone(tmp_path, monkeypatch):
    """Lightning's own save writes each checkpoint to the system's temporary folder first and copies it over:
    a kill mid-save left a checkpoint-sized file there for good, and a full or missing temporary folder failed
    the stage as if the artifacts disk were full. Each reaches the disk before it is renamed into place: after a
    power cut, an empty last.ckpt stopped the rerun."""
    import os
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-folder"))
    pl.seed_everything(0, verbose=False)
    trainer_cfg = {**compose("experiment=smoke").trainer, "loggers": ["csv"], "checkpoint_budget": 1}
    saves, synced = [], []
    save, fsync = torch.save, os.fsync
    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **kw: saves.append(f.name if hasattr(f, "write") else f)
                        or save(obj, f, *a, **kw))
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or fsync(fd))
    fit(_module("classifier"), TaskDataModule(_task(8), 8, 64), trainer_cfg, tmp_path / "out", max_epochs=3)
    assert [Path(f).relative_to(tmp_path / "out").as_posix() for f in saves] == ["checkpoints.next/state.tmp"] * 2
    assert [str(f) for f in saves] == [f for f in synced if f.endswith("state.tmp")]


class _Killed(BaseException):
    """What a kill -9 does to the callback: it stops between two file operations."""


class _SavingTrainer:  # just what the callback reads; the state file and the logs name their epoch
    current_epoch, max_epochs, global_rank, loggers = 0, 100, 0, ()

    class strategy:
        broadcast = staticmethod(lambda x: x)

    def save_checkpoint(self, path):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"epoch {self.current_epoch}")


def _started(out: Path):
    from transferkit.training.trainer import ResumeCheckpoint

    cb, trainer = ResumeCheckpoint(out, budget=1), _SavingTrainer()
    cb.on_train_start(trainer, torch.nn.Linear(1, 1))
    return cb, trainer


def _epoch(cb, trainer, out: Path, n: int) -> None:
    """Epoch n ends: saved, its metrics logged; the next one starts (the swap)."""
    trainer.current_epoch = n
    cb.on_train_epoch_end(trainer, None)
    (out / "dvclive").mkdir(exist_ok=True)
    (out / "dvclive" / "metrics.json").write_text(f"epoch {n}")
    trainer.current_epoch = n + 1
    cb.committer.on_train_epoch_start(trainer, None)


@pytest.fixture
def killed_after(monkeypatch):
    """killed_after(k, step): run step() and die as a kill -9 would after k file operations; True if it died."""
    import os
    import shutil

    state = {"ops": 0, "at": None}

    def mortal(fn):
        def op(*args, **kwargs):
            state["ops"] += 1
            if state["at"] is not None and state["ops"] > state["at"]:
                raise _Killed
            return fn(*args, **kwargs)
        return op

    for name in ("rmtree", "copytree"):
        monkeypatch.setattr(shutil, name, mortal(getattr(shutil, name)))
    monkeypatch.setattr(os, "replace", mortal(os.replace))
    monkeypatch.setattr(Path, "rename", mortal(Path.rename))

    def run(k: int, step) -> bool:
        state["ops"], state["at"] = 0, k
        try:
            step()
        except _Killed:
            return True
        finally:
            state["at"] = None
        return False
    return run


def _whole_pair(out: Path) -> tuple[str, str]:
    from transferkit.training.trainer import RESUME_CHECKPOINT, resume_folder

    saved = resume_folder(out)
    assert saved is not None, "nothing to resume from"
    state = (saved / RESUME_CHECKPOINT).read_text()
    assert state == (saved / "logs" / "dvclive" / "metrics.json").read_text()  # the logs of its own epoch
    return saved.name, state


def test_a_kill_at_any_step_of_a_checkpoint_swap_leaves_a_whole_pair(tmp_path, killed_after):
    """Each file operation of a save and its swap in turn is where the process dies: what it leaves
    always resumes from one checkpoint with the logs of that checkpoint's own epoch."""
    left = set()
    for k in range(100):
        out = tmp_path / str(k)
        out.mkdir()
        cb, trainer = _started(out)
        _epoch(cb, trainer, out, 0)  # a whole pair of epoch 0
        if not killed_after(k, lambda: _epoch(cb, trainer, out, 1)):
            break
        left.add(_whole_pair(out))
    assert k > 5  # every operation of the save and the swap was a place to die
    assert ("checkpoints", "epoch 1") in left and ("checkpoints.previous", "epoch 0") in left


def test_a_run_resumed_from_a_pair_mid_swap_keeps_it_until_its_own_is_whole(tmp_path, killed_after):
    """The first swap killed once its state file is in checkpoints.next/ (the only whole pair), the
    run resumed from there, then killed again at each step of its next save and swap."""
    for k in range(100):
        out = tmp_path / str(k)
        out.mkdir()
        cb, trainer = _started(out)
        assert killed_after(3, lambda: _epoch(cb, trainer, out, 0))  # before checkpoints.next/ is renamed
        assert _whole_pair(out) == ("checkpoints.next", "epoch 0")
        cb, trainer = _started(out)  # the rerun, resumed at epoch 1
        if not killed_after(k, lambda: _epoch(cb, trainer, out, 1)):
            break
        _whole_pair(out)
    assert k > 5 and _whole_pair(out) == ("checkpoints", "epoch 1")


def test_a_rerun_after_a_kill_at_any_step_of_a_checkpoint_swap_saves_and_swaps_its_own_pair(tmp_path, killed_after):
    """Whatever a kill mid-swap leaves beside the pair it resumes from (a checkpoints.previous/ not yet deleted, a
    checkpoints.next/), the rerun's own next save and swap succeed and leave the pair of its epoch."""
    for k in range(100):
        out = tmp_path / str(k)
        out.mkdir()
        cb, trainer = _started(out)
        _epoch(cb, trainer, out, 0)
        if not killed_after(k, lambda: _epoch(cb, trainer, out, 1)):
            break
        cb, trainer = _started(out)  # the rerun
        _epoch(cb, trainer, out, 2)
        assert _whole_pair(out) == ("checkpoints", "epoch 2"), f"killed after {k} file operations"
    assert k > 5


def test_trainer_num_threads_holds_in_every_stage_and_ends_with_it(tmp_path, monkeypatch):
    """evaluate's and quantize's timings run at trainer.num_threads too, not only the fits; a caller in this
    process (a test, cli.main as a library) keeps its own count afterwards."""
    import transferkit.stages.evaluate as evaluate
    from transferkit.stages.run import run_stage

    seen = []
    monkeypatch.setattr(evaluate, "run", lambda cfg, inputs, out: seen.append(torch.get_num_threads()) or {})
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run_stage("evaluate", compose("experiment=smoke", "trainer.num_threads=1", tmp=tmp_path), tmp_path / "ev")
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_evaluate_records_the_thread_count_its_timings_ran_at_after_its_one_thread_latency(smoke_artifacts, tmp_path):
    """evaluate times each model at one thread as well, then goes back to trainer.num_threads: timing.json's
    machine names the count the stage ran at, not the one-thread section's."""
    shutil.copytree(Path(smoke_artifacts[0].paths.artifacts_dir), tmp_path / "artifacts")
    before = torch.get_num_threads()
    run("evaluate", compose("experiment=smoke", "trainer.num_threads=2", tmp=tmp_path))
    timing = json.loads((tmp_path / "artifacts" / "evaluate" / "timing.json").read_text())
    assert timing["machine"]["threads"] == 2
    assert torch.get_num_threads() == before


def test_train_seconds_start_with_the_training_loop_and_num_threads_reach_its_processes(tmp_path, monkeypatch):
    """What comes before the loop (DDP's other ranks starting, stood in for here by a slow setup) is no
    training time; OMP_NUM_THREADS says trainer.num_threads while the fit runs (Lightning's DDP launcher
    gives each rank cores / processes threads otherwise), and is as it was after it."""
    import time

    import transferkit.training.trainer as trainer_module

    cfg = compose("experiment=smoke", "trainer.num_threads=1", tmp=tmp_path)
    run("prepare", cfg)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    seen = []

    class SlowStart(pl.Callback):
        def setup(self, trainer, module, stage):
            time.sleep(3)

        def on_train_epoch_start(self, trainer, module):
            seen.append(os.environ.get("OMP_NUM_THREADS"))

    make = trainer_module.make_trainer
    monkeypatch.setattr(trainer_module, "make_trainer",
                        lambda *a, callbacks=(), **k: make(*a, callbacks=(*callbacks, SlowStart()), **k))
    started = time.perf_counter()
    run("pretrain", cfg)
    wall = time.perf_counter() - started
    timing = json.loads((tmp_path / "artifacts" / "pretrain" / "timing.json").read_text())
    assert timing["train_seconds"] < wall - 3
    assert seen and set(seen) == {"1"} and "OMP_NUM_THREADS" not in os.environ
    assert timing["threads"] == 1  # what the weights' bytes depend on, recorded


def test_devices_the_machine_lacks_end_in_one_error(monkeypatch, tmp_path):
    """Lightning finds the machine short of the GPUs asked for only as it builds the trainer (the config
    checks cannot count GPUs): one error line, not its traceback."""
    from pytorch_lightning.utilities.exceptions import MisconfigurationException

    import transferkit.training.trainer as trainer_module
    from transferkit.errors import TransferkitError

    def short(**kwargs):
        raise MisconfigurationException("You requested gpu: [0, 1]\n But your machine only has: [0]")

    monkeypatch.setattr(trainer_module.pl, "Trainer", short)
    with pytest.raises(TransferkitError, match=r"trainer.\{accelerator, devices, strategy\} = gpu, 2, ddp here: You "
                                               r"requested gpu: \[0, 1\] But your machine only has: \[0\]\. Fix"):
        trainer_module.make_trainer({"accelerator": "gpu", "devices": 2, "strategy": "ddp", "loggers": [],
                                    "precision": "32-true"}, tmp_path, 1)
    monkeypatch.undo()  # Lightning itself: a strategy this accelerator cannot run (a ValueError), no double stop
    with pytest.raises(TransferkitError, match=r"= cpu, 1, fsdp here: The strategy `fsdp` requires a GPU "
                                               r"accelerator.*to use FSDP\. Fix: set them"):
        trainer_module.make_trainer({"accelerator": "cpu", "devices": 1, "strategy": "fsdp", "loggers": [],
                                    "precision": "32-true"}, tmp_path, 1)


def test_precision_auto_follows_the_machine(monkeypatch, tmp_path):
    from transferkit.training import precision

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert precision.resolve_precision("32-true", "cpu") == "32-true"  # an explicit setting wins
    for speedup, want in ((2.0, "bf16-mixed"), (0.5, "32-true"), (1.1, "32-true"),
                          (precision.CPU_BF16_MIN_SPEEDUP, "bf16-mixed")):  # the threshold itself is fast enough
        monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda s=speedup: s)
        assert precision.resolve_precision("auto", "cpu") == want
    for native, want in ((True, "bf16-mixed"), (False, "16-mixed")):  # a GPU before Ampere emulates bf16
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True, n=native:
                            n or including_emulation)
        assert precision.resolve_precision("auto", "gpu") == precision.resolve_precision("auto", "cuda") == want
    assert precision.eval_device("cuda") == precision.eval_device("gpu") == "cuda"  # Lightning's two names of it
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: 2.0)  # a Mac: Lightning's auto picks its GPU (MPS)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert precision.resolve_precision("auto", "auto") == precision.resolve_precision("auto", "mps") == "32-true"
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = precision.cpu_bf16_speedup()  # measured once, then read from the cache
    cache = json.loads(precision.cache_file().read_text())
    assert len(cache) == 1 and next(iter(cache.values()))["speedup"] == first
    monkeypatch.setattr(precision, "matmul_gflops", lambda *a, **k: pytest.fail("measured twice"))
    assert precision.cpu_bf16_speedup() == first
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    key = next(iter(cache))
    for damaged in ({key: 1.5}, {key: {"speedup": "fast"}}, [1, 2], None, "deep"):  # JSON, not as written there
        precision.cache_file().write_text("[" * 100_000 + "]" * 100_000 if damaged == "deep" else json.dumps(damaged))
        assert precision.cpu_bf16_speedup() > 0  # measured again
        assert json.loads(precision.cache_file().read_text())[key]["speedup"] > 0


def test_the_precision_probe_is_measured_again_for_another_thread_count_or_cpu(monkeypatch, tmp_path):
    """bf16's speedup depends on how many threads multiply and on the CPU's instruction set: a probe cached at one
    thread count (or on one CPU) decides nothing for another, which measures its own and keeps the first."""
    from transferkit.training import precision

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # nothing cached: the probe measures
    measured = []
    monkeypatch.setattr(precision, "matmul_peaks", lambda: measured.append(1) or {
        "fp32_gflops": 10.0, "bf16_gflops": 10.0 * (1 + len(measured))})
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert precision.cpu_bf16_speedup() == 2.0
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    assert precision.cpu_bf16_speedup() == 3.0
    isa = precision.cpu_isa()
    monkeypatch.setattr(precision, "cpu_isa", lambda: f"{isa} amx_bf16")
    assert precision.cpu_bf16_speedup() == 4.0
    monkeypatch.setattr(precision, "cpu_isa", lambda: isa)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert precision.cpu_bf16_speedup() == 2.0 and len(measured) == 3  # each one measured once, then read back
    assert len(json.loads(precision.cache_file().read_text())) == 3


def test_the_precision_probe_draws_nothing_from_the_runs_seeded_generator(monkeypatch, tmp_path):
    """run_stage seeds, then resolves trainer.precision=auto (tracked): a first run on a machine, with no cached
    probe, measured its matmuls on torch's global generator, so its model started from other weights than every
    later run's (pretrain's model.pt differed with the same config on the same machine)."""
    from transferkit.training import precision

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # nothing cached: the probe measures
    torch.manual_seed(0)
    precision.resolve_precision("auto", "cpu")
    drawn = torch.rand(4)
    torch.manual_seed(0)
    assert torch.equal(drawn, torch.rand(4))


@pytest.mark.parametrize("seconds, sizes_measured", [
    (lambda n: 2 * n ** 3 / 1e9, [128, 256]),  # 1 GFLOP/s, as bf16 without AVX-512: the first slow size is the measure
    (lambda n: 2 * n ** 3 / 100e9, [128, 256, 512, 1024]),  # 100 GFLOP/s: up to max_n
    (lambda n: 0.03, [128, 256, 512, 1024]),  # a busy machine: every product waits 30 ms for a thread
])
def test_the_matmul_probe_stops_growing_once_a_product_is_slow_for_its_arithmetic(monkeypatch, seconds,
                                                                                  sizes_measured):
    """bf16 on a CPU without AVX-512 runs at about 1 GFLOP/s: a 1024 x 1024 product takes seconds, so
    the probe stops at a size whose product takes `slow_s`, unless a product that much larger took
    about as long, which is a machine busy with other work (a reading of 0.1 GFLOP/s would decide
    `precision: auto` wrongly, and be cached). The clock is the test's: each product takes `seconds(n)`."""
    from types import SimpleNamespace

    from transferkit.training import precision

    sizes, randn, now = [], torch.randn, [0.0]

    def clock() -> float:  # a timed product lies between two readings
        now[0] += seconds(sizes[-1])
        return now[0]

    monkeypatch.setattr(torch, "randn", lambda n, m, **k: sizes.append(n) or randn(n, m, **k))
    monkeypatch.setattr(precision, "time", SimpleNamespace(perf_counter=clock))
    n = sizes_measured[-1]
    assert precision.matmul_gflops(torch.float32, max_n=1024) == pytest.approx(2 * n ** 3 / seconds(n) / 1e9)
    assert sorted(set(sizes)) == sizes_measured
    assert precision.cpu_isa().startswith(torch.backends.cpu.get_cpu_capability())


def test_the_precision_used_is_recorded_and_reported(smoke_artifacts):
    cfg, _ = smoke_artifacts
    artifacts = Path(cfg.paths.artifacts_dir)
    timing = json.loads((artifacts / "pretrain" / "timing.json").read_text())
    assert timing["precision"] in ("bf16-mixed", "32-true") and timing["device"] == "cpu" and timing["processes"] == 1
    assert f"pretrain {timing['precision']} on cpu" in (artifacts / "evaluate" / "report.md").read_text()


def _lookahead_run(every: int, steps: int):
    """A Lookahead callback over `steps` optimiser steps that each add 1 to a linear layer's
    weights; returns the weights it started from, the layer and the callback."""
    from transferkit.training.lookahead import Lookahead

    model = torch.nn.Module()
    model.model = torch.nn.Linear(2, 2)
    cb = Lookahead(every=every)

    class Trainer:
        global_step, estimated_stepping_batches = 0, steps

    cb.on_train_start(Trainer(), model)
    start = model.model.weight.detach().clone()
    trainer = Trainer()
    for step in range(1, steps + 1):
        with torch.no_grad():
            model.model.weight.add_(1.0)  # an optimiser step
        trainer.global_step = step
        cb.on_train_batch_end(trainer, model, None, None, step)
    return start, model.model, cb


def test_each_epoch_draws_its_own_dropout_and_mixup_randomness_and_a_repeat_of_it_the_same(monkeypatch):
    """The module seeds torch at each epoch start from (seed, epoch, rank): every epoch draws other dropout masks
    and mixup partners than the last, and a resumed epoch draws the ones it drew before."""
    epoch = 0
    monkeypatch.setattr(ClassifierModule, "current_epoch", property(lambda self: epoch))
    module = _fixed_module()

    def draws():
        module.on_train_epoch_start()
        return torch.rand(8)

    first = draws()
    epoch = 1
    second = draws()
    assert not torch.equal(first, second)
    epoch = 0
    assert torch.equal(draws(), first)


def test_a_stage_with_lookahead_on_saves_the_averaged_weights(smoke_artifacts, tmp_path, monkeypatch):
    """A block's `lookahead: true` trains its stage with Lookahead: the model the stage saves is the average the
    callback ended on, weights and BatchNorm statistics; with it off the stage keeps no average."""
    from transferkit.models import load_checkpoint
    from transferkit.training.lookahead import Lookahead

    made, init = [], Lookahead.__init__
    monkeypatch.setattr(Lookahead, "__init__", lambda self, *a, **k: made.append(self) or init(self, *a, **k))
    shutil.copytree(Path(smoke_artifacts[0].paths.artifacts_dir), tmp_path / "artifacts")
    settings = ("scratch.epochs=1", "scratch.batch_size=8")  # 9 steps: past the callback's interval of 5
    run("scratch", compose("experiment=smoke", *settings, tmp=tmp_path))
    assert made == []
    run("scratch", compose("experiment=smoke", *settings, "scratch.lookahead=true", tmp=tmp_path))
    assert len(made) == 1
    model, _ = load_checkpoint(tmp_path / "artifacts" / "scratch" / "model.pt", "scratch")
    state = model.state_dict()
    averaged = [name for name, _ in model.named_parameters()] + [
        f"{name}.{stat}" for name, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)
        for stat in ("running_mean", "running_var")]
    names = [name for name in state if name in averaged]
    assert len(names) == len(made[0].average) == len(averaged)
    for name, average in zip(names, made[0].average):
        assert torch.equal(state[name], average.to(state[name].dtype)), name


def test_lookahead_ends_on_the_averaged_weights():
    start, layer, cb = _lookahead_run(every=2, steps=4)
    # step 2: decay 0.95^2 * (2/4)^3; step 4: 0.95^2 * 1; the weights end on the average
    d2 = 0.95 ** 2 * (2 / 4) ** 3
    avg = start + (1 - d2) * 2                  # after step 2 (weights were start + 2)
    avg = d2 * 0 + avg                          # weights reset onto it
    w4 = avg + 2                                # two more steps
    want = 0.95 ** 2 * avg + (1 - 0.95 ** 2) * w4
    torch.testing.assert_close(layer.weight, want)
    torch.testing.assert_close(cb.average[0], want)


@pytest.mark.parametrize("every, steps", [(2, 5), (3, 3)])
def test_lookahead_lands_the_weights_and_batchnorm_statistics_on_their_average_at_the_last_step(every, steps):
    """Every `every` steps the average moves toward the weights and the weights onto it; at the last step the
    model is the average even where that step averages nothing (5 steps of 2: the average of step 4), and a
    run of exactly `every` steps averages once. BatchNorm's running mean and variance go as the weights do."""
    from transferkit.training.lookahead import Lookahead

    holder = torch.nn.Module()
    holder.model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    tensors = [holder.model[0].weight, holder.model[1].running_mean, holder.model[1].running_var]
    cb = Lookahead(every=every)
    trainer = SimpleNamespace(global_step=0, estimated_stepping_batches=steps)
    cb.on_train_start(trainer, holder)
    want = [t.detach().clone() for t in tensors]  # the average, by hand
    current = [t.clone() for t in want]
    for step in range(1, steps + 1):
        with torch.no_grad():
            for t in tensors:
                t.add_(1.0)  # an optimiser step, and a batch's BatchNorm update
        current = [c + 1 for c in current]
        trainer.global_step = step
        cb.on_train_batch_end(trainer, holder, None, None, step)
        if step % every == 0:
            decay = 0.95 ** every * (step / steps) ** 3
            want = [decay * a + (1 - decay) * c for a, c in zip(want, current)]
        if step % every == 0 or step == steps:
            current = [a.clone() for a in want]
    for name, t, w in zip(("weight", "running_mean", "running_var"), tensors, want):
        torch.testing.assert_close(t.detach(), w, msg=name)


def test_a_resumed_lookahead_carries_on_from_the_average_its_checkpoint_holds():
    """A run resumed after step 3 of 6 takes its average from the checkpoint (the callback's state_dict), not
    from the weights it resumes with, and ends on the weights of the run that was never interrupted."""
    from transferkit.training.lookahead import Lookahead

    def steps(holder, cb, trainer, start, stop):
        for step in range(start, stop + 1):
            with torch.no_grad():
                holder.model.weight.add_(1.0)  # an optimiser step
            trainer.global_step = step
            cb.on_train_batch_end(trainer, holder, None, None, step)

    torch.manual_seed(0)
    holder = torch.nn.Module()
    holder.model = torch.nn.Linear(2, 2)
    start = holder.model.weight.detach().clone()
    trainer, straight = SimpleNamespace(global_step=0, estimated_stepping_batches=6), Lookahead(every=2)
    straight.on_train_start(trainer, holder)
    steps(holder, straight, trainer, 1, 6)
    want = holder.model.weight.detach().clone()

    with torch.no_grad():
        holder.model.weight.copy_(start)
    first = Lookahead(every=2)
    first.on_train_start(trainer, holder)
    steps(holder, first, trainer, 1, 3)  # interrupted here: the checkpoint keeps the weights and the state_dict
    resumed = Lookahead(every=2)
    resumed.load_state_dict(first.state_dict())
    resumed.on_train_start(trainer, holder)
    steps(holder, resumed, trainer, 4, 6)
    torch.testing.assert_close(holder.model.weight.detach(), want)


def test_lookahead_keeps_the_trained_weights_of_a_run_shorter_than_its_interval():
    start, layer, _ = _lookahead_run(every=5, steps=3)  # no step reaches the averaging interval
    torch.testing.assert_close(layer.weight, start + 3)  # not reset onto the initial weights


def test_a_stage_trains_without_any_logger(tmp_path):
    cfg = compose("experiment=smoke", "trainer.loggers=[]", tmp=tmp_path)
    run("prepare", cfg)
    assert "val_acc" in run("pretrain", cfg)
    assert not (tmp_path / "artifacts" / "pretrain" / "dvclive").exists()


@pytest.mark.parametrize("setting, terminal, drawn", [(True, True, True), (True, False, False), (False, True, False),
                                                     (True, None, False)])
def test_the_training_bar_is_drawn_on_a_terminal_only(tmp_path, monkeypatch, setting, terminal, drawn):
    """As tqdm draws every other bar: never redrawn, step after step, into a log file or a pipe
    (terminal None: a process whose stdout was closed, where Python sets sys.stdout to None)."""
    import io
    import sys

    from pytorch_lightning.callbacks import TQDMProgressBar

    from transferkit.training.trainer import make_trainer

    class Stdout(io.StringIO):
        def isatty(self) -> bool:
            return terminal

    monkeypatch.setattr(sys, "stdout", None if terminal is None else Stdout())
    trainer_cfg = {**compose().trainer, "progress_bar": setting, "loggers": []}
    trainer = make_trainer(trainer_cfg, tmp_path, max_epochs=1)
    assert any(isinstance(c, TQDMProgressBar) for c in trainer.callbacks) == drawn


def test_a_second_run_of_a_stage_while_one_builds_its_folder_is_refused_and_changes_nothing(tmp_path):
    """Two runs of one stage at once (two terminals, a run by hand beside `dvc repro`): the second deleted or resumed
    the first one's work folder, replaced its logs mid-run, and swapped its own outputs in."""
    from transferkit.errors import TransferkitError
    from transferkit.stages.common import staged_output

    final = tmp_path / "artifacts" / "transfer"
    with staged_output(final, "a: 1\n") as work:
        (work / "model.pt").write_text("first")
        with pytest.raises(TransferkitError, match=rf"another run \(process {os.getpid()}\) is writing .*Fix: wait"):
            with staged_output(final, "a: 1\n"):
                pass
        assert (work / "model.pt").read_text() == "first"
    assert (final / "model.pt").read_text() == "first"
    with staged_output(final, "a: 1\n") as work:  # free again once the first run has ended
        (work / "model.pt").write_text("second")
    assert (final / "model.pt").read_text() == "second"
    assert sorted(p.name for p in final.parent.iterdir()) == ["transfer"]  # no lock file left beside it


def test_a_resumed_work_folder_loses_the_half_written_files_of_the_killed_run(tmp_path):
    """A kill -9 while atomic_path writes leaves its temporary in the work folder that the rerun
    resumes; the finished output holds only what an uninterrupted run writes."""
    from transferkit.io import atomic_path
    from transferkit.stages.common import PARAMS_FILE, RESUME_KEY, resume_key, staged_output
    from transferkit.training import RESUME_CHECKPOINT

    final, work = tmp_path / "quantize", tmp_path / ".quantize.incomplete"
    (work / "qat" / "checkpoints").mkdir(parents=True)
    (work / PARAMS_FILE).write_text("lr: 0.1\n")
    (work / RESUME_KEY).write_text(resume_key([], "lr: 0.1\n"))
    (work / "qat" / "checkpoints" / RESUME_CHECKPOINT).write_text("epoch 3")
    (work / ".model.onnx.x1y2z3.tmp").write_text("half an onnx file")  # as the killed run's atomic_path left it
    (work / "qat" / ".model.pt.a1b2c3.tmp").write_text("half a checkpoint")
    with staged_output(final, "lr: 0.1\n") as folder:
        assert (folder / "qat" / "checkpoints" / RESUME_CHECKPOINT).read_text() == "epoch 3"  # still resumed
        with atomic_path(folder / "model.onnx") as tmp:
            tmp.write_text("the whole onnx file")
    assert not [p for p in final.rglob("*") if p.name.endswith(".tmp")]
    assert (final / "model.onnx").read_text() == "the whole onnx file"


def test_staged_output_keeps_only_leftovers_of_the_same_config_and_restores_a_swap_cut_short(tmp_path, capsys):
    """A killed run's work folder is resumed only by a run with the same params and only when it
    holds a resume checkpoint (anything else in it could only be stale); a kill between the two
    renames of the swap (final -> .old, work -> final) leaves .old, which comes back."""
    from transferkit.stages.common import PARAMS_FILE, RESUME_KEY, resume_key, staged_output
    from transferkit.training import RESUME_CHECKPOINT

    final = tmp_path / "pretrain"
    work = tmp_path / ".pretrain.incomplete"

    def leftover(*files: str, inputs=()) -> None:
        (work / "checkpoints").mkdir(parents=True)
        (work / PARAMS_FILE).write_text("lr: 0.1\n")
        (work / RESUME_KEY).write_text(resume_key(inputs, "lr: 0.1\n"))
        for name in files:
            (work / "checkpoints" / name).write_text("epoch 3")

    leftover(RESUME_CHECKPOINT)
    with staged_output(final, "lr: 0.1\n") as folder:  # same config: the leftover is resumed
        assert (folder / "checkpoints" / RESUME_CHECKPOINT).read_text() == "epoch 3"
        (folder / "model.pt").write_text("trained with lr 0.1")
    assert (final / "model.pt").read_text() == "trained with lr 0.1" and not work.exists()
    assert sorted(p.name for p in final.iterdir()) == ["checkpoints", "model.pt", PARAMS_FILE]  # no resume key

    prepared = tmp_path / "prepare"
    prepared.mkdir()
    (prepared / "source.pt").write_text("images")
    leftover(RESUME_CHECKPOINT, inputs=[prepared])
    (prepared / "source.pt").write_text("images, made again")  # an earlier stage ran again meanwhile
    assert capsys.readouterr().err == ""  # resumed: nothing to say
    with staged_output(final, "lr: 0.1\n", [prepared]) as folder:  # same config, another input: the leftover goes
        assert not (folder / "checkpoints").exists()
        (folder / "model.pt").write_text("trained with lr 0.1 on the new input")
    # with a word: the stopped run's message promised that the same command resumes
    assert capsys.readouterr().err == (f"{work} holds a stopped run's training with other settings, code or inputs "
                                       f"than this run's: training from the start.\n")
    leftover(RESUME_CHECKPOINT)
    (work / RESUME_KEY).unlink()  # left by a version that wrote no key: what it trained from is unknown
    with staged_output(final, "lr: 0.1\n") as folder:
        assert not (folder / "checkpoints").exists()
        (folder / "model.pt").write_text("trained with lr 0.1, again")

    capsys.readouterr()
    leftover("table.csv")  # same config, nothing to resume from: the leftover goes
    with staged_output(final, "lr: 0.1\n") as folder:
        assert not (folder / "checkpoints").exists()
        (folder / "model.pt").write_text("trained with lr 0.1, again")
    assert capsys.readouterr().err == ""  # no training lost

    leftover(RESUME_CHECKPOINT)
    with staged_output(final, "lr: 0.02\n") as folder:  # another config: the leftover goes
        assert not (folder / "checkpoints").exists() and (folder / PARAMS_FILE).read_text() == "lr: 0.02\n"
        (folder / "model.pt").write_text("trained with lr 0.02")
    assert (final / "model.pt").read_text() == "trained with lr 0.02"

    final.rename(tmp_path / ".pretrain.old")  # killed after the first rename of a swap
    with pytest.raises(RuntimeError):
        with staged_output(final, "lr: 0.5\n"):
            assert (final / "model.pt").read_text() == "trained with lr 0.02"  # back before any work
            raise RuntimeError("this run fails")
    assert (final / "model.pt").read_text() == "trained with lr 0.02" and not work.exists()


def test_outputs_a_swap_killed_before_its_cleanup_left_in_old_do_not_stop_the_next_swap(tmp_path):
    """A kill after the swap's second rename (work -> final) leaves the outputs before them in .NAME.old beside
    the new ones: the next run still installs its own outputs, and removes the old ones."""
    from transferkit.stages.common import PARAMS_FILE, staged_output

    final, old = tmp_path / "transfer", tmp_path / ".transfer.old"
    with staged_output(final, "a: 1\n") as work:
        (work / "model.pt").write_text("second")
    old.mkdir()  # as the killed swap left the outputs of the run before
    (old / PARAMS_FILE).write_text("a: 1\n")
    (old / "model.pt").write_text("first")
    with staged_output(final, "a: 1\n") as work:
        (work / "model.pt").write_text("third")
    assert (final / "model.pt").read_text() == "third" and not old.exists()


def test_the_finished_points_of_a_run_killed_before_its_next_checkpoint_are_kept_for_the_rerun(tmp_path):
    """freeze_curve stopped between two points, before the second saved a checkpoint: its work folder holds
    only the first point's outputs (their timing.json written last), which the failed run keeps and the next
    run with the same config resumes with."""
    from transferkit.stages.common import staged_output

    final, work = tmp_path / "freeze_curve", tmp_path / ".freeze_curve.incomplete"
    with pytest.raises(KeyboardInterrupt):
        with staged_output(final, "a: 1\n") as folder:
            (folder / "depth0").mkdir()
            (folder / "depth0" / "metrics.json").write_text("{}")
            (folder / "depth0" / "timing.json").write_text("{}")
            raise KeyboardInterrupt
    assert (work / "depth0" / "timing.json").is_file()
    with staged_output(final, "a: 1\n") as folder:
        assert (folder / "depth0" / "metrics.json").is_file() and (folder / "depth0" / "timing.json").is_file()
    assert (final / "depth0" / "timing.json").is_file()


def test_lightnings_routine_info_lines_are_dropped_and_the_telling_ones_kept():
    import logging

    from transferkit.training.trainer import _DropMessages

    def shown(msg: str) -> bool:
        return _DropMessages().filter(logging.LogRecord("pytorch_lightning", logging.INFO, "", 0, msg, None, None))

    assert not shown("`Trainer.fit` stopped: `max_epochs=3` reached.")
    assert not shown("Loading `train_dataloader` to estimate number of stepping batches.")
    assert shown("`Trainer.fit` stopped: No training batches.")  # a task too small for one batch
    assert shown("GPU available: False, used: False")  # where a stage trains
    # what the stage's own lines say (precision, a resume, Ctrl+C), and accelerators no stage uses
    for said in ("Using bfloat16 Automatic Mixed Precision (AMP)", "Restoring states from the checkpoint path at x",
                 "Restored all states from the checkpoint at x", "\nDetected KeyboardInterrupt, attempting graceful "
                 "shutdown ...", "TPU available: False, using: 0 TPU cores"):
        assert not shown(said), said


# ------------------------------------------------------------------ what a step computes
def _fixed_module(**settings):
    """A small classifier in eval mode (BatchNorm on its running statistics: the same predictions at every call)."""
    pl.seed_everything(0, verbose=False)
    module = ClassifierModule(build_model("fastnet", 3, widths=[8, 16, 16], stem_width=8),
                              **{**SETTINGS, "channels_last": False, **settings})
    return module.eval()


def test_the_logged_accuracy_is_the_share_of_argmax_predictions_equal_to_the_label():
    """val/acc and train/acc (dvclive's curves, the report's training plots) come from the sums the steps keep on
    the device, [loss x n, correct, n]: on a batch whose predictions are known (5 of 8 right), correct is 5
    and the logged accuracy 5/8, both from the validation step and from the training loss."""
    module = _fixed_module()
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = module.model(x)
    pred = logits.argmax(1)
    y = pred.clone()
    y[:3] = (pred[:3] + 1) % 3  # the first three wrong, the other five right
    logged = {}
    module.log = lambda name, value, **kw: logged.__setitem__(name, float(value))
    module.trainer = SimpleNamespace(strategy=SimpleNamespace(reduce=lambda sums, reduce_op: sums))  # one process
    module.on_validation_epoch_start()
    with torch.no_grad():
        module.validation_step((x, y), 0)
    module.on_validation_epoch_end()
    assert logged["val/acc"] == pytest.approx(5 / 8)
    assert logged["val/loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    module._train_sums = torch.zeros(3)
    with torch.no_grad():
        module.training_loss((x, y))
    assert module._train_sums[1:].tolist() == [5.0, 8.0]
    module.on_train_epoch_end()
    assert logged["train/acc"] == pytest.approx(5 / 8)


def test_the_loss_smooths_the_labels_by_the_stages_label_smoothing():
    """label_smoothing (the optimisation block's, 0.2 by default) reaches the classifier's loss: its cross-entropy is
    F.cross_entropy's with that smoothing, and differs from the unsmoothed one."""
    x, y = torch.rand(8, 3, 32, 32), torch.arange(8) % 3
    logits = torch.randn(8, 3, generator=torch.Generator().manual_seed(1)) * 3  # confident: smoothing shows
    losses = [_fixed_module(label_smoothing=smoothing).loss(logits, x, y).item() for smoothing in (0.0, 0.3)]
    assert losses[0] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    assert losses[1] == pytest.approx(F.cross_entropy(logits, y, label_smoothing=0.3).item(), rel=1e-5)
    assert losses[1] != pytest.approx(losses[0])


def test_the_learning_rate_warms_up_from_warmup_from_and_decays_towards_decay_to():
    """The schedule conf/optim/sgd.yaml documents (airbench's): a linear warm-up over warmup_fraction of the steps,
    from warmup_from x lr (the first step one warm-up step above it) to lr, then a linear decay towards
    decay_to x lr (the last step one decay step above it), in every parameter group."""
    total, warmup, start, end = 20, 5, 0.2, 0.1
    module = ClassifierModule(build_model("fastnet", 3, widths=[8, 16, 16], stem_width=8),
                              **{**SETTINGS, "warmup_fraction": warmup / total, "warmup_from": start, "decay_to": end},
                              backbone_lr_mult=0.5)
    module.trainer = SimpleNamespace(estimated_stepping_batches=total)
    optimizers = module.configure_optimizers()
    opt, sched = optimizers["optimizer"], optimizers["lr_scheduler"]["scheduler"]
    assert optimizers["lr_scheduler"]["interval"] == "step"
    base = [g["initial_lr"] for g in opt.param_groups]
    factors = []
    for _ in range(total):
        assert all(g["lr"] == pytest.approx(b * sched.lr_lambdas[0](len(factors)))
                   for g, b in zip(opt.param_groups, base))
        factors.append(opt.param_groups[0]["lr"] / base[0])
        opt.step()
        sched.step()
    up, down = (1 - start) / warmup, (1 - end) / (total - warmup)  # one step of each
    assert factors[0] == pytest.approx(start + up)
    assert factors[warmup - 1] == pytest.approx(1.0) and factors[warmup] == pytest.approx(1.0)
    assert factors[total - 1] == pytest.approx(end + down)
    # linear in between: equal steps up, then equal steps down
    assert [b - a for a, b in zip(factors, factors[1:warmup])] == pytest.approx([up] * (warmup - 1))
    decay = factors[warmup:]
    assert [a - b for a, b in zip(decay, decay[1:])] == pytest.approx([down] * (total - warmup - 1))


# ------------------------------------------------------------------ augmentation on the device
def test_augment_translates_the_images_it_is_given_shifts_for():
    """augment with shifts is translate (after the flip): each image a crop of its reflect-padded self."""
    from transferkit.data.augment import augment, draw_flips, draw_shifts, flip, translate

    pad, gen = 2, torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 8, 8, generator=gen)
    mask, shifts = draw_flips(16, gen, "cpu"), draw_shifts(16, pad, gen, "cpu")
    assert (shifts != pad).any()  # some image moves
    moved = augment(x, None, shifts, pad)
    assert torch.equal(moved, translate(x, shifts, pad)) and not torch.equal(moved, x)
    assert torch.equal(augment(x, mask, shifts, pad), translate(flip(x, mask), shifts, pad))


def test_the_datamodule_augments_training_batches_with_its_flip_and_translate_and_never_val_batches():
    """TaskDataModule hands its flip and translate (the stage block's, through data_settings) to the training
    batches: with either one on, most training images come mirrored or shifted, with both off none does; the
    validation batches are the images as they are whatever the settings."""
    from transferkit.data.loader import TaskDataModule

    n = 32
    images = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    task = {"train_x": images, "train_y": torch.arange(n), "val_x": images, "val_y": torch.arange(n),
            "classes": ["a", "b"]}
    ref = images.float() / 255
    trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")), current_epoch=0,
                              global_rank=0, world_size=1)

    def changed(flip, translate, train):
        datamodule = TaskDataModule(task, 8, 64, flip=flip, translate=translate, channels_last=False)
        datamodule.trainer = trainer
        batches = datamodule.train_dataloader() if train else datamodule.val_dataloader()
        return sum(int((x != ref[y]).flatten(1).any(1).sum()) for x, y in batches)

    for flip, translate in (("random", 0), ("none", 2)):
        assert changed(flip, translate, train=True) > n // 4, (flip, translate)
        assert changed(flip, translate, train=False) == 0
    assert changed("none", 0, train=True) == 0


def test_the_datamodule_serves_the_trainers_epoch_and_rank_at_the_runs_seed():
    """TaskDataModule's training batches follow the trainer and the seed it is given: another epoch or another
    seed is another permutation, the same (seed, epoch) the same one (what a resumed run repeats), and each DDP
    rank (global_rank of world_size) takes its own shard of it."""
    from transferkit.data.loader import TaskDataModule

    n = 32
    images = torch.zeros(n, 3, 4, 4, dtype=torch.uint8)
    task = {"train_x": images, "train_y": torch.arange(n), "val_x": images, "val_y": torch.arange(n),
            "classes": ["a", "b"]}

    def order(seed=0, epoch=0, rank=0, world_size=1):
        datamodule = TaskDataModule(task, 8, 64, flip="none", translate=0, seed=seed, channels_last=False)
        datamodule.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")),
                                             current_epoch=epoch, global_rank=rank, world_size=world_size)
        return [int(i) for _, y in datamodule.train_dataloader() for i in y]

    assert order() == order() and sorted(order()) == list(range(n))
    assert order(epoch=1) != order() and order(seed=1) != order()
    shards = [order(rank=rank, world_size=2) for rank in (0, 1)]
    assert sorted(shards[0] + shards[1]) == list(range(n))


@pytest.mark.parametrize("pad", [1, 2])
def test_training_batches_are_shifted_crops_of_the_reflect_padded_images(pad):
    """DeviceBatches with translate=k serves each training image as the crop of the image reflect-padded by k at
    a shift drawn per image in 0..2k (rows and columns): every image one such crop, many shifts used, most not
    the image itself; the validation batches are the images as they are."""
    from transferkit.data.loader import DeviceBatches

    n, h = 64, 8
    images = torch.randint(0, 256, (n, 3, h, h), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    ref = images.float() / 255
    padded = F.pad(ref, (pad, pad, pad, pad), mode="reflect")
    seen = []
    for x, y in DeviceBatches(images, torch.arange(n), 16, device="cpu", train=True, translate=pad, seed=0,
                              channels_last=False):
        for img, i in zip(x, y.tolist()):
            at = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                  if torch.equal(img, padded[i, :, dy:dy + h, dx:dx + h])]
            assert len(at) == 1, f"image {i} is not one crop of its padded self"
            seen.append(at[0])
    assert len(seen) == n and len(set(seen)) >= 0.6 * (2 * pad + 1) ** 2  # of the (2k + 1)^2 shifts
    assert sum(s != (pad, pad) for s in seen) > n // 2
    val = DeviceBatches(images, torch.arange(n), 16, device="cpu", train=False, translate=pad, channels_last=False)
    assert torch.equal(torch.cat([x for x, _ in val]), ref)
