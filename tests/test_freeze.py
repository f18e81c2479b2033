"""Freezing really freezes: frozen weights and BatchNorm statistics do not move during
transfer, the unfrozen part does, and the learning-rate multiplier is applied."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from conftest import compose
from transferkit.data.loader import TaskDataModule
from transferkit.data.synthetic import make_synthetic
from transferkit.data.tasks import select_task
from transferkit.models import build_model
from transferkit.training.classifier import ClassifierModule
from transferkit.training.freeze import frozen_depth
from transferkit.training.trainer import fit

SETTINGS = dict(lr=0.05, weight_decay=5e-4, momentum=0.9, label_smoothing=0.0, warmup_fraction=0.1)


def _task():
    raw = make_synthetic(["a", "b", "c"], 24, 4, seed=1)
    return select_task(raw, ["a", "b", "c"], train_per_class=20, val_per_class=4, test_per_class=None,
                       seed=0, role="target")


def _train(model, tmp_path, epochs=2, **kwargs):
    pl.seed_everything(0, verbose=False)
    module = ClassifierModule(model, **SETTINGS, **kwargs)
    trainer_cfg = dict(compose("experiment=smoke").trainer)
    return fit(module, TaskDataModule(_task(), 16, 64), trainer_cfg, tmp_path, epochs).model


def _block_state(model, i):
    return {k: v.clone() for k, v in model.blocks[i].state_dict().items()}


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_frozen_blocks_and_their_batchnorm_statistics_do_not_change(tmp_path, depth):
    model = build_model("fastnet", 3, widths=[8, 16, 16], stem_width=8)
    before = [_block_state(model, i) for i in range(model.num_blocks)]
    head_before = copy.deepcopy(model.head.state_dict())
    _train(model, tmp_path, freeze_depth=depth)
    for i in range(model.num_blocks):
        after = _block_state(model, i)
        if i < depth:
            assert _same(before[i], after), f"frozen block {i} changed"
        else:
            assert not _same(before[i], after), f"trainable block {i} did not change"
            bn = [k for k in after if k.endswith("running_mean")]
            assert bn and any(not torch.equal(before[i][k], after[k]) for k in bn)
    assert not _same(head_before, model.head.state_dict())


def test_backbone_lr_mult_zero_freezes_the_whole_backbone(tmp_path):
    model = build_model("fastnet", 3, widths=[8, 16, 16], stem_width=8)
    before = [_block_state(model, i) for i in range(model.num_blocks)]
    _train(model, tmp_path, freeze_depth=0, backbone_lr_mult=0.0)
    assert all(_same(before[i], _block_state(model, i)) for i in range(model.num_blocks))


def test_the_transfer_stage_with_backbone_lr_mult_zero_keeps_every_pretrained_block(smoke_artifacts, tmp_path):
    """transfer.backbone_lr_mult=0 trains the new head alone whatever transfer.freeze_depth says: the transfer
    stage's model holds pretrain's blocks, weights and BatchNorm statistics, bit for bit."""
    import shutil

    from conftest import run
    from transferkit.models import load_checkpoint

    shutil.copytree(Path(smoke_artifacts[0].paths.artifacts_dir), tmp_path / "artifacts")
    cfg = compose("experiment=smoke", "transfer.backbone_lr_mult=0", "transfer.epochs=2", tmp=tmp_path)
    assert cfg.transfer.freeze_depth < 4  # the smoke preset's depth leaves blocks a rate would train
    run("transfer", cfg)
    transferred, _ = load_checkpoint(tmp_path / "artifacts" / "transfer" / "model.pt", "transfer")
    pretrained, _ = load_checkpoint(tmp_path / "artifacts" / "pretrain" / "model.pt", "pretrain")
    assert transferred.num_blocks == pretrained.num_blocks == 4
    for i in range(pretrained.num_blocks):
        assert _same(_block_state(pretrained, i), _block_state(transferred, i)), f"block {i} changed"


@pytest.mark.parametrize("overrides, says", [
    ([], "transfer (freeze depth 1): top-1 val 81.2%; "),
    (["transfer.backbone_lr_mult=0"], "transfer (backbone frozen: backbone_lr_mult 0): "),
    (["transfer.unfreeze_every_epochs=3"], "transfer (freeze depth 1, one block unfrozen every 3 epochs): "),
    (["transfer.freeze_depth=0", "transfer.unfreeze_every_epochs=3"], "transfer (freeze depth 0): "),  # none frozen
])
def test_the_line_a_transfer_ends_with_says_what_stayed_frozen(overrides, says):
    from transferkit.stages.training import summary_line

    run = {"train_seconds": 0.43, "train_images_per_second": 500.0, "precision": "32-true", "device": "cpu"}
    line = summary_line("transfer", compose(*overrides).transfer, {"val_acc": 0.8125}, run)
    assert line.startswith(says) and line.endswith("; 0.4 s of training at 500 img/s (32-true on cpu)")
    assert "; 12 s of training" in summary_line("transfer", compose().transfer, {}, {**run, "train_seconds": 12.4})
    assert summary_line("transfer", compose().transfer, {}, {**run, "processes": 2}).endswith(
        "(32-true on cpu, 2 processes)")  # DDP's processes each take a batch: a recipe of their own
    resumed = summary_line("transfer", compose().transfer, {}, {**run, "resumed_at_epoch": 2})
    assert resumed.endswith(f"(32-true on cpu), resumed after epoch 2 of {compose().transfer.epochs} "
                            "from a killed run's checkpoint")


def test_discriminative_learning_rate_groups():
    model = build_model("fastnet", 3, widths=[8, 16, 16], stem_width=8)
    module = ClassifierModule(model, **SETTINGS, freeze_depth=1, backbone_lr_mult=0.1)
    module.trainer = type("T", (), {"estimated_stepping_batches": 10})()
    opt = module.configure_optimizers()["optimizer"]
    head_group, *backbone_groups = opt.param_groups
    assert head_group["initial_lr"] == pytest.approx(0.05)
    assert [g["initial_lr"] for g in backbone_groups] == pytest.approx([0.005, 0.005, 0.005])
    assert {id(p) for p in head_group["params"]} == {id(p) for p in model.head.parameters()}
    backbone = {id(p) for b in model.blocks for p in b.parameters()}
    assert {id(p) for g in backbone_groups for p in g["params"]} == backbone
    # no weight decay on BatchNorm parameters and biases
    assert all(p.ndim <= 1 for g in backbone_groups[1:] for p in g["params"])
    assert [g["weight_decay"] for g in backbone_groups] == [5e-4, 0, 0]


def test_the_optimiser_is_sgd_with_the_blocks_nesterov_momentum_and_decays_the_heads_weights():
    """conf/optim/sgd.yaml: SGD with Nesterov momentum at the block's momentum, and the block's weight decay on
    the head's weights as on the backbone's (only the backbone's 1-D parameters go undecayed)."""
    model = build_model("fastnet", 3, widths=[8, 16, 16], stem_width=8)
    module = ClassifierModule(model, **{**SETTINGS, "momentum": 0.8, "weight_decay": 1e-3})
    module.trainer = type("T", (), {"estimated_stepping_batches": 10})()
    opt = module.configure_optimizers()["optimizer"]
    assert isinstance(opt, torch.optim.SGD)
    assert all(g["momentum"] == 0.8 and g["nesterov"] for g in opt.param_groups)
    head, weights = opt.param_groups[:2]
    assert {id(p) for p in head["params"]} == {id(p) for p in model.head.parameters()}
    assert head["weight_decay"] == weights["weight_decay"] == 1e-3


def test_batchnorm_shifts_can_learn_faster_and_decay_like_weights():
    """airbench's setting: BatchNorm shifts at 64x the learning rate, decayed by the same amount
    per step as the weights (lr x weight_decay equal); BatchNorm scales and biases untouched."""
    model = build_model("fastnet", 3, widths=[8, 16, 16], stem_width=8)
    module = ClassifierModule(model, **{**SETTINGS, "bn_bias_lr_mult": 64.0, "bn_bias_decay": True})
    module.trainer = type("T", (), {"estimated_stepping_batches": 10})()
    head, weights, shifts, other = module.configure_optimizers()["optimizer"].param_groups
    bn = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert {id(p) for p in shifts["params"]} == {id(m.bias) for m in bn}
    assert {id(m.weight) for m in bn} <= {id(p) for p in other["params"]}
    assert shifts["initial_lr"] == pytest.approx(64 * 0.05)
    assert (shifts["initial_lr"] * shifts["weight_decay"]
            == pytest.approx(weights["initial_lr"] * weights["weight_decay"]))
    assert other["weight_decay"] == 0 and other["initial_lr"] == pytest.approx(0.05)


def test_gradual_unfreezing_releases_one_block_per_interval(tmp_path):
    model = build_model("fastnet", 3, widths=[8, 16, 16], stem_width=8)
    before = [_block_state(model, i) for i in range(model.num_blocks)]
    _train(model, tmp_path, epochs=3, freeze_depth=4, unfreeze_every_epochs=1)
    # epochs 1 and 2 each unfreeze one block from the top: blocks 3 and 2 train, 0 and 1 never do
    changed = [not _same(before[i], _block_state(model, i)) for i in range(model.num_blocks)]
    assert changed == [False, False, True, True]


@pytest.mark.parametrize("epoch, frozen", [(0, 4), (1, 4), (2, 3), (5, 2), (9, 0)])
def test_a_resumed_run_starts_with_the_blocks_unfrozen_before(monkeypatch, epoch, frozen):
    module = ClassifierModule(build_model("fastnet", 3, widths=[8, 16, 16], stem_width=8), **SETTINGS,
                              freeze_depth=4, unfreeze_every_epochs=2)
    monkeypatch.setattr(ClassifierModule, "current_epoch", property(lambda self: epoch))  # as a resume sets it
    module.on_train_epoch_start()
    assert frozen_depth(module.model) == frozen


def test_each_epoch_starts_with_the_frozen_blocks_in_eval_mode_and_the_released_ones_training(monkeypatch):
    """A frozen block's BatchNorm normalises with, and keeps, the pretrained statistics: at each epoch start the
    frozen blocks are in eval mode whatever put the whole model in train mode (a callback, older Lightning's
    fit), and a block that gradual unfreezing releases trains again, its BatchNorm statistics included."""
    epoch = 0
    monkeypatch.setattr(ClassifierModule, "current_epoch", property(lambda self: epoch))
    module = ClassifierModule(build_model("fastnet", 3, widths=[8, 16, 16], stem_width=8), **SETTINGS,
                              freeze_depth=2)
    module.model.train()
    module.on_train_epoch_start()
    assert [b.training for b in module.model.blocks] == [False, False, True, True]
    gradual = ClassifierModule(build_model("fastnet", 3, widths=[8, 16, 16], stem_width=8), **SETTINGS,
                               freeze_depth=4, unfreeze_every_epochs=1)
    for epoch, training in ((0, [False] * 4), (1, [False, False, False, True]), (2, [False, False, True, True])):
        gradual.on_train_epoch_start()
        assert [b.training for b in gradual.model.blocks] == training, f"epoch {epoch}"


def test_a_probe_at_a_depth_trains_a_linear_head_on_that_many_pretrained_blocks(tmp_path):
    """probe.depth=k (an earlier block: the "small and different data" scenario) keeps blocks[:k] of the
    pretrained backbone, as pretrain left them, and trains a head on their features alone."""
    from conftest import run
    from transferkit.models import load_checkpoint

    cfg = compose("experiment=smoke", "probe.depth=2", tmp=tmp_path)
    for stage in ("prepare", "pretrain", "probe"):
        run(stage, cfg)
    artifacts = tmp_path / "artifacts"
    probe, _ = load_checkpoint(artifacts / "probe" / "model.pt", "probe")
    pretrained, _ = load_checkpoint(artifacts / "pretrain" / "model.pt", "pretrain")
    assert pretrained.num_blocks > 2 and probe.num_blocks == 2 and probe.arch["depth"] == 2
    assert probe.head.fc.in_features == pretrained.feature_dim(2)
    for i in range(2):
        assert _same(_block_state(pretrained, i), _block_state(probe, i)), f"block {i} changed in the probe"


def test_the_linear_probe_keeps_every_pretrained_block_as_it_was(smoke_artifacts):
    """probe trains a linear head on frozen features: every block of its model, weights and BatchNorm
    statistics alike, is pretrain's bit for bit (with the backbone trained too it would be no linear probe,
    and its row in the report no reference line)."""
    from transferkit.models import load_checkpoint

    artifacts = Path(smoke_artifacts[0].paths.artifacts_dir)
    probe, _ = load_checkpoint(artifacts / "probe" / "model.pt", "probe")
    pretrained, _ = load_checkpoint(artifacts / "pretrain" / "model.pt", "pretrain")
    assert probe.num_blocks == pretrained.num_blocks  # the smoke preset's probe.depth: null, every block
    for i in range(probe.num_blocks):
        after, before = _block_state(probe, i), _block_state(pretrained, i)
        assert after.keys() == before.keys() and _same(before, after), f"block {i} changed in the linear probe"
    assert sum(k.endswith("running_mean") for k in probe.blocks.state_dict()) >= 3  # BatchNorm statistics compared
