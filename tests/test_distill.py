"""Distillation: the loss math, a teacher that never changes, every registered method for
real on the smoke experiment, DDP, and bad input."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from conftest import compose, run
from transferkit.stages.common import load_task
from transferkit.config.compose import params_text
from transferkit.data.loader import TaskDataModule
from transferkit.distill.losses import LOSSES, dkd_loss, kd_loss, soft_target_loss
from transferkit.distill.module import DistillerModule
from transferkit.errors import TransferkitError
from transferkit.models import build_model, load_checkpoint
from transferkit.training.trainer import fit


def _logits(seed, n=16, k=5):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 3


def test_student_equal_to_teacher_gives_zero_soft_target_term():
    t = _logits(0)
    assert soft_target_loss(t, t, 4.0).abs().item() < 1e-6
    labels = torch.randint(0, 5, (16,))
    # kd then reduces to (1 - alpha) * cross-entropy
    assert kd_loss(t, t, labels, temperature=4.0, alpha=0.9).item() == pytest.approx(
        0.1 * F.cross_entropy(t, labels).item(), rel=1e-5)


def test_soft_target_term_is_scaled_by_t_squared():
    s, t = _logits(1), _logits(2)
    for temp in (1.0, 2.0, 4.0, 8.0):
        kl = F.kl_div(F.log_softmax(s / temp, 1), F.softmax(t / temp, 1), reduction="batchmean")
        assert soft_target_loss(s, t, temp).item() == pytest.approx(temp * temp * kl.item(), rel=1e-5)


def test_alpha_zero_is_plain_cross_entropy():
    s, t, y = _logits(3), _logits(4), torch.randint(0, 5, (16,))
    assert kd_loss(s, t, y, temperature=4.0, alpha=0.0).item() == pytest.approx(F.cross_entropy(s, y).item())


def test_dkd_is_zero_beyond_cross_entropy_when_student_equals_teacher():
    t, y = _logits(5), torch.randint(0, 5, (16,))
    assert dkd_loss(t, t, y).item() == pytest.approx(F.cross_entropy(t, y).item(), abs=1e-5)
    s = _logits(6)
    assert dkd_loss(s, t, y).item() > F.cross_entropy(s, y).item()


def _dkd_by_hand(s, t, y, temperature, alpha, beta):
    """Decoupled KD as Zhao et al. (CVPR 2022) define it, one image at a time in float64: cross-entropy
    + alpha x T^2 KL(teacher || student) of the binary (target, not target) probabilities
    + beta x T^2 KL(teacher || student) of the probabilities over the non-target classes alone."""
    s, t, temp = s.double(), t.double(), temperature
    tckd = nckd = 0.0
    for si, ti, yi in zip(s, t, y.tolist()):
        ps, pt = F.softmax(si / temp, 0)[yi], F.softmax(ti / temp, 0)[yi]
        tckd += pt * (pt / ps).log() + (1 - pt) * ((1 - pt) / (1 - ps)).log()
        others = [k for k in range(len(si)) if k != yi]
        qs, qt = F.softmax(si[others] / temp, 0), F.softmax(ti[others] / temp, 0)
        nckd += (qt * (qt / qs).log()).sum()
    n = len(y)
    return F.cross_entropy(s, y) + temp * temp * (alpha * tckd + beta * nckd) / n


@pytest.mark.parametrize("temperature, alpha, beta", [(4.0, 1.0, 0.0), (4.0, 0.0, 1.0), (2.0, 1.0, 8.0)])
def test_dkd_is_zhao_et_als_decoupled_kd(temperature, alpha, beta):
    """distill.method=dkd's loss on fixed logits, term by term against a plain implementation of the paper's:
    the target-class term alone (beta 0), the non-target term alone (alpha 0), and both at another T."""
    s, t, y = _logits(11), _logits(12), torch.randint(0, 5, (16,), generator=torch.Generator().manual_seed(13))
    got = dkd_loss(s, t, y, temperature=temperature, dkd_alpha=alpha, dkd_beta=beta)
    assert got.item() == pytest.approx(_dkd_by_hand(s, t, y, temperature, alpha, beta).item(), rel=1e-4)


def test_dkds_non_target_term_leaves_the_target_out_at_a_small_temperature():
    """At T=0.02 the logits / T differ by more than 1000: pushing the target's logit down by 1000 left it in the
    non-target distribution, and the term came out twice its value (0.1997 for 0.1000 here)."""
    s, t, y = torch.tensor([[10.0, 0.0, 5.0]]), torch.tensor([[25.0, 5.0, 0.0]]), torch.tensor([0])
    temp = 0.02
    qs, qt = F.softmax(s[0, 1:].double() / temp, 0), F.softmax(t[0, 1:].double() / temp, 0)
    nckd = temp * temp * (qt * (qt.clamp_min(1e-300) / qs).log()).sum().item()
    got = dkd_loss(s, t, y, temperature=temp, dkd_alpha=0.0, dkd_beta=1.0) - F.cross_entropy(s, y)
    assert got.item() == pytest.approx(nckd, rel=1e-4) and nckd == pytest.approx(0.1, rel=1e-3)


def test_dkd_ramps_its_distillation_terms_up_over_its_warmup_epochs(monkeypatch):
    """As the reference implementation (mdistiller's DKD) does: the decoupled terms weigh epoch / warmup of
    their weight (epochs counted from 1) until the warm-up ends; cross-entropy weighs 1 from the start. The module
    hands the loss the epoch it trains."""
    s, t, y = _logits(21), _logits(22), torch.randint(0, 5, (16,), generator=torch.Generator().manual_seed(23))
    ce, full = F.cross_entropy(s, y).item(), dkd_loss(s, t, y).item()
    for epoch, share in ((0, 0.2), (3, 0.8), (4, 1.0), (40, 1.0)):
        got = dkd_loss(s, t, y, dkd_warmup=5, epoch=epoch).item()
        assert got == pytest.approx(ce + share * (full - ce), rel=1e-5), epoch
    assert dkd_loss(s, t, y, dkd_warmup=0, epoch=0).item() == pytest.approx(full)
    teacher = build_model("fastnet", 3, widths=[4, 8, 8], stem_width=4).eval()
    student = build_model("fastnet", 3, widths=[4, 4, 4], stem_width=4)
    module = DistillerModule(student, teacher, method="dkd", method_kwargs={"temperature": 4.0, "dkd_warmup": 10},
                             lr=0.05, weight_decay=5e-4, momentum=0.9, label_smoothing=0.0, warmup_fraction=0.1,
                             channels_last=False)
    monkeypatch.setattr(DistillerModule, "current_epoch", property(lambda self: 4))
    x, y = torch.rand(8, 3, 32, 32), torch.arange(8) % 3
    with torch.no_grad():
        got = module.loss(student(x), x, y).item()
        assert got == pytest.approx(dkd_loss(student(x), teacher(x), y, dkd_warmup=10, epoch=4).item())
        assert got != pytest.approx(dkd_loss(student(x), teacher(x), y).item())


def test_only_the_distill_stage_warms_dkd_up(tmp_path, monkeypatch):
    """prune's recovery and quantize's fine-tune distil a student that has learned already: at full weight from
    their first epoch (their rounds and QAT's few epochs would each start again at a fifth)."""
    import transferkit.stages.distill as distill_stage
    from transferkit.stages.distill import distillation

    cfg = compose("experiment=smoke", "distill.method=dkd", "distill.dkd_warmup=3", "distill.epochs=4", tmp=tmp_path)
    assert distillation(cfg, None)["method_kwargs"]["dkd_warmup"] == 0  # what prune and quantize take
    seen = []
    monkeypatch.setattr(distill_stage, "train_stage", lambda *a, **k: seen.append(k["method_kwargs"]) or {})
    monkeypatch.setattr(distill_stage, "load_teacher", lambda *a: build_model("fastnet", 3, widths=[8, 16, 16]))
    monkeypatch.setattr(distill_stage, "load_task", lambda *a: {"classes": ["a", "b", "c"], "train_x": torch.randint(
        0, 256, (8, 3, 32, 32), dtype=torch.uint8)})
    distill_stage.run(cfg, {"prepare": tmp_path, "transfer": tmp_path}, tmp_path)
    assert seen[0]["dkd_warmup"] == 3


def test_dkd_non_target_term_ignores_the_target_logit():
    """NCKD compares the distributions over the non-target classes only: moving the student's target logit
    alone changes the cross-entropy and the target-class term, never the non-target term."""
    s, t, y = _logits(14), _logits(15), torch.randint(0, 5, (16,), generator=torch.Generator().manual_seed(16))
    moved = s + 2.5 * F.one_hot(y, 5)

    def nckd(student):
        return (dkd_loss(student, t, y, dkd_alpha=0.0, dkd_beta=1.0) - F.cross_entropy(student, y)).item()

    def tckd(student):
        return (dkd_loss(student, t, y, dkd_alpha=1.0, dkd_beta=0.0) - F.cross_entropy(student, y)).item()

    assert nckd(moved) == pytest.approx(nckd(s), rel=1e-4) and nckd(s) > 0.01
    assert tckd(moved) != pytest.approx(tckd(s), rel=1e-2)


def test_mixed_cross_entropy_is_split_between_the_two_labels_by_lam():
    s, t = _logits(7), _logits(8)
    y, other = torch.randint(0, 5, (16,)), torch.randint(0, 5, (16,))
    kw = {"temperature": 4.0, "alpha": 0.5}
    one, zero = torch.ones(16), torch.zeros(16)
    assert kd_loss(s, t, y, mixed_with=(other, one), **kw).item() == pytest.approx(kd_loss(s, t, y, **kw).item())
    assert kd_loss(s, t, y, mixed_with=(other, zero), **kw).item() == pytest.approx(kd_loss(s, t, other, **kw).item())
    half = kd_loss(s, t, y, mixed_with=(other, one / 2), **kw).item()
    assert half == pytest.approx((kd_loss(s, t, y, **kw).item() + kd_loss(s, t, other, **kw).item()) / 2)


def _mixup_module(mixup: float, classes: int = 3, alpha: float = 0.5) -> DistillerModule:
    teacher = build_model("fastnet", classes, widths=[4, 8, 8], stem_width=4).eval()
    student = build_model("fastnet", classes, widths=[4, 4, 4], stem_width=4)
    module = DistillerModule(student, teacher, method="kd",
                             method_kwargs={"temperature": 4.0, "alpha": alpha, "mixup": mixup},
                             lr=0.05, weight_decay=5e-4, momentum=0.9, label_smoothing=0.0, warmup_fraction=0.1,
                             channels_last=False)
    module._train_sums = torch.zeros(3)
    return module


def test_mixup_shows_teacher_and_student_the_same_blend_of_two_images():
    module = _mixup_module(1.0, alpha=0.9)
    seen = {}
    module.teacher.register_forward_pre_hook(lambda m, a: seen.__setitem__("teacher", a[0].clone()))
    module.model.register_forward_pre_hook(lambda m, a: seen.__setitem__("student", a[0].clone()))
    values = torch.arange(8.0) / 8
    x = values.view(-1, 1, 1, 1).expand(8, 3, 32, 32).contiguous()  # image i: every pixel i/8
    torch.manual_seed(0)
    loss = module.training_loss((x, torch.arange(8) % 3))
    assert torch.isfinite(loss)
    assert torch.equal(seen["teacher"], seen["student"])  # consistent: one blend for both
    mixed = seen["student"].flatten(1)
    assert torch.allclose(mixed, mixed[:, :1].expand_as(mixed))  # a blend of two flat images is flat
    assert not torch.allclose(mixed[:, 0], values)  # and the images did change
    assert ((mixed[:, 0] >= 0) & (mixed[:, 0] <= values.max())).all()


def test_mixup_splits_the_cross_entropy_with_the_label_of_the_image_each_blend_took_in():
    """With distill.mixup each image i is blended with image j = other[i] (lam_i of its own): the loss gets
    mixed_with = (labels of the j's, lam), so the second cross-entropy term is against the label of the image
    the blend really contains, not the image's own label again (mixup would then teach nothing of image j)."""
    module = _mixup_module(1.0, classes=8)
    calls, seen = [], {}
    loss_fn = module.loss_fn
    module.loss_fn = lambda *a, **kw: calls.append(kw) or loss_fn(*a, **kw)
    module.model.register_forward_pre_hook(lambda m, a: seen.__setitem__("student", a[0].clone()))
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([3, 0, 7, 1, 6, 2, 5, 4])  # one image per class: a label names its image
    index = torch.empty(8, dtype=torch.long)
    index[labels] = torch.arange(8)
    torch.manual_seed(0)
    module.training_loss((x, labels))
    (kw,) = calls
    other_labels, lam = kw["mixed_with"]
    other = index[other_labels]  # the image each blend's label names
    w = lam.view(-1, 1, 1, 1)
    torch.testing.assert_close(seen["student"], w * x + (1 - w) * x[other])
    assert not torch.equal(other_labels, labels)  # the blends do take in other images


def test_mixup_draws_each_images_lam_from_beta_m_m_and_its_partner_from_the_seeded_generator():
    """distill.mixup=m: every image gets a lam of its own, lam ~ Beta(m, m) (mean 1/2, variance 1 / (4 (2m + 1))),
    and a partner from a random permutation of the batch, both drawn from the global generator the module seeds
    each epoch: the same seed draws the same blends (a resumed epoch repeats them), another seed others."""
    m, n = 0.4, 2048
    module = _mixup_module(m)
    blends = []
    loss_fn = module.loss_fn
    module.loss_fn = lambda *a, **kw: blends.append(kw["mixed_with"]) or loss_fn(*a, **kw)
    x, y = torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(0)), torch.arange(n) % 3
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        module.training_loss((x, y))
    (partners, lam), (partners_again, lam_again), (other_partners, _) = blends
    assert lam.shape == (n,)
    assert lam.mean().item() == pytest.approx(0.5, abs=0.03)
    assert lam.var().item() == pytest.approx(1 / (4 * (2 * m + 1)), abs=0.015)
    assert torch.equal(partners, partners_again) and torch.equal(lam, lam_again)
    assert not torch.equal(partners, other_partners)


def test_a_mixup_step_counts_its_images_loss_and_correct_predictions():
    """The training metrics (train/loss, train/acc) are the sums of each step's loss x images, correct predictions
    (against each image's own label) and images: a mixup step adds its batch to them as a plain step does."""
    module = _mixup_module(1.0)
    x, y = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.arange(8) % 3
    torch.manual_seed(0)
    loss = module.training_loss((x, y))
    loss_sum, correct, images = module._train_sums.tolist()
    assert images == 8 and loss_sum == pytest.approx(8 * loss.item()) and 0 <= correct <= 8


@pytest.mark.parametrize("method", sorted(LOSSES))
def test_the_labels_are_smoothed_by_the_block_the_module_trains_with(method):
    # prune's recovery and quantize's fine-tune distil with their own block's label_smoothing
    teacher = build_model("fastnet", 3, widths=[4, 8, 8], stem_width=4).eval()
    student = build_model("fastnet", 3, widths=[4, 4, 4], stem_width=4)
    x, y = torch.rand(8, 3, 32, 32), torch.arange(8) % 3
    losses = []
    for smoothing in (0.0, 0.3):
        module = DistillerModule(student, teacher, method=method, method_kwargs={"temperature": 4.0, "alpha": 0.5},
                                 lr=0.05, weight_decay=5e-4, momentum=0.9, label_smoothing=smoothing,
                                 warmup_fraction=0.1, channels_last=False)
        losses.append(module.loss(student(x), x, y))
    t, s = teacher(x), student(x)
    want = LOSSES[method](s, t, y, temperature=4.0, alpha=0.5, label_smoothing=0.3)
    assert losses[1].item() == pytest.approx(want.item()) and losses[1].item() != pytest.approx(losses[0].item())


def _smoke_with_teacher(tmp_path, *overrides):
    cfg = compose("experiment=smoke", *overrides, tmp=tmp_path)
    for stage in ("prepare", "pretrain", "transfer"):
        run(stage, cfg)
    return cfg


@pytest.mark.parametrize("method", sorted(LOSSES))
def test_every_method_runs_on_the_smoke_experiment(tmp_path, monkeypatch, method):
    cfg = _smoke_with_teacher(tmp_path, f"distill.method={method}")
    trained_with = []  # the registry's losses the stage's training steps call: distill.method's, no other
    for name, loss in list(LOSSES.items()):
        monkeypatch.setitem(LOSSES, name, lambda *a, name=name, loss=loss, **k: trained_with.append(name) or loss(
            *a, **k))
    metrics = run("distill", cfg)
    assert trained_with and set(trained_with) == {method}, sorted(set(trained_with))
    assert 0.0 <= metrics["val_acc"] <= 1.0
    student, ckpt = load_checkpoint(tmp_path / "artifacts" / "distill" / "model.pt", "distill")
    teacher, _ = load_checkpoint(tmp_path / "artifacts" / "transfer" / "model.pt", "transfer")
    assert ckpt["stage"] == "distill"
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in teacher.parameters())


def test_teacher_weights_and_batchnorm_statistics_do_not_change(tmp_path):
    cfg = _smoke_with_teacher(tmp_path)
    teacher, _ = load_checkpoint(tmp_path / "artifacts" / "transfer" / "model.pt", "transfer")
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = build_model("fastnet", 3, widths=[4, 8, 8], stem_width=4)
    pl.seed_everything(0, verbose=False)
    module = DistillerModule(student, teacher, method="kd", method_kwargs={"temperature": 4.0, "alpha": 0.9},
                             lr=0.05, weight_decay=5e-4, momentum=0.9, label_smoothing=0.0,
                             warmup_fraction=0.1)
    task = load_task(tmp_path / "artifacts" / "prepare", "target")
    fit(module, TaskDataModule(task, 16, 64), dict(cfg.trainer), tmp_path / "fit", 2)
    after = teacher.state_dict()
    assert any(k.endswith("running_mean") for k in before)
    assert all(torch.equal(before[k], after[k].to(before[k].dtype)) for k in before)
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())


def test_each_epoch_puts_the_teacher_back_in_eval_mode_whatever_set_the_module_training():
    """Lightning's model.train() at the start of a fit (in versions that call it on the whole module) or a user's
    callback would put the teacher's BatchNorm in train mode: batch statistics in its targets, and running ones
    that drift. Each epoch starts with the teacher in eval mode again."""
    teacher = build_model("fastnet", 3, widths=[4, 8, 8], stem_width=4)
    module = DistillerModule(build_model("fastnet", 3, widths=[4, 8, 8], stem_width=4), teacher, method="kd",
                             method_kwargs={"temperature": 4.0, "alpha": 0.9}, lr=0.05, weight_decay=5e-4,
                             momentum=0.9, label_smoothing=0.0, warmup_fraction=0.1)
    module.train()
    assert module.teacher.training
    module.on_train_epoch_start()
    assert not any(m.training for m in module.teacher.modules()) and module.model.training


def test_student_alone_is_the_same_network_and_budget(tmp_path):
    cfg = _smoke_with_teacher(tmp_path)
    run("student", cfg)
    run("distill", cfg)
    alone, a = load_checkpoint(tmp_path / "artifacts" / "student" / "model.pt", "student")
    distilled, d = load_checkpoint(tmp_path / "artifacts" / "distill" / "model.pt", "distill")
    assert a["arch"] == d["arch"] and a["stage"] == "student"
    assert not torch.equal(alone.head.fc.weight, distilled.head.fc.weight)  # the teacher made a difference


class _Started(Exception):
    """Raised in place of training: the stage built its model."""


def test_distill_and_student_start_from_the_same_weights(tmp_path, monkeypatch):
    """At one seed the baseline and the distilled student begin as one network, so the teacher is the only
    difference (distill loaded its teacher first, whose construction drew from the same random stream)."""
    from transferkit.stages import distill, student

    cfg = _smoke_with_teacher(tmp_path)
    starts = {}

    def started(name):
        def train_stage(cfg, stage, model, *args, **kwargs):
            starts[name] = {k: v.clone() for k, v in model.state_dict().items()}
            raise _Started
        return train_stage

    for module, name in ((student, "student"), (distill, "distill")):
        monkeypatch.setattr(module, "train_stage", started(name))
        with pytest.raises(_Started):
            run(name, cfg)
    assert starts["student"].keys() == starts["distill"].keys()
    assert [k for k in starts["student"] if not torch.equal(starts["student"][k], starts["distill"][k])] == []


def test_mixup_distills_and_recovers_the_pruned_student(tmp_path):
    cfg = _smoke_with_teacher(tmp_path, "distill.mixup=1.0", "prune.epochs=1")
    assert 0.0 <= run("distill", cfg)["val_acc"] <= 1.0
    mixed, _ = load_checkpoint(tmp_path / "artifacts" / "distill" / "model.pt", "distill")
    assert 0.0 <= run("prune", cfg)["val_acc"] <= 1.0
    pruned, _ = load_checkpoint(tmp_path / "artifacts" / "prune" / "model.pt", "prune")
    assert pruned.arch.get("pruned")
    run("distill", compose("experiment=smoke", tmp=tmp_path))  # the same seed without mixup
    plain, _ = load_checkpoint(tmp_path / "artifacts" / "distill" / "model.pt", "distill")
    assert not torch.equal(mixed.head.fc.weight, plain.head.fc.weight)


@pytest.mark.parametrize("override, needle", [
    ("distill.method=fitnet", "unknown distill.method 'fitnet'"),
    ("distill.mixup=-1", "distill.mixup"),
    ("distill.temperature=0", "distill.temperature"),
    ("distill.alpha=1.5", "distill.alpha"),
    ("distill.alpha=-0.1", "distill.alpha"),
])
def test_bad_distill_settings_fail_before_training(tmp_path, monkeypatch, override, needle):
    import transferkit.stages.training as training

    cfg = _smoke_with_teacher(tmp_path)
    run("distill", cfg)
    before = (tmp_path / "artifacts" / "distill" / "model.pt").read_bytes()
    monkeypatch.setattr(training, "fit", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(TransferkitError, match=needle):
        run("distill", compose("experiment=smoke", override, tmp=tmp_path))
    assert (tmp_path / "artifacts" / "distill" / "model.pt").read_bytes() == before


def test_teacher_from_another_task_is_refused(tmp_path):
    _smoke_with_teacher(tmp_path)
    other = compose("experiment=smoke", "data.target.classes=[tgt_a,tgt_b,tgt_x]", tmp=tmp_path)
    run("prepare", other)
    with pytest.raises(TransferkitError, match="teacher .* trained on classes"):
        run("distill", other)


def test_student_larger_than_teacher_warns(tmp_path, caplog):
    cfg = _smoke_with_teacher(tmp_path, "distill.student.widths=[32,64,64]", "distill.student.stem_width=16",
                              "distill.epochs=1")
    with caplog.at_level("WARNING"):
        run("distill", cfg)
    assert "not smaller than its teacher" in caplog.text


def test_mobile_student_distills(tmp_path):
    cfg = _smoke_with_teacher(tmp_path, "model@distill.student=mobilenet", "distill.student.width_mult=0.35",
                              "distill.epochs=1")
    run("distill", cfg)
    student, ckpt = load_checkpoint(tmp_path / "artifacts" / "distill" / "model.pt", "distill")
    assert ckpt["arch"]["name"] == "mobilenet"


@pytest.mark.slow
def test_distill_under_ddp_with_two_cpu_processes(tmp_path):
    single = _smoke_with_teacher(tmp_path)
    cfg = compose("experiment=smoke", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                  "trainer.num_threads=1", tmp=tmp_path)
    (tmp_path / "params.yaml").write_text(params_text(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "transferkit.cli", "distill", "--params",
                           str(tmp_path / "params.yaml")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MEMBER: 1/2" in proc.stderr + proc.stdout and "MEMBER: 2/2" in proc.stderr + proc.stdout  # two ranks ran
    _, ckpt = load_checkpoint(tmp_path / "artifacts" / "distill" / "model.pt", "distill")
    assert ckpt["classes"] == list(single.data.target.classes)


def test_student_init_starts_the_student_from_a_checkpoint_dvc_tracks(tmp_path):
    from transferkit.config.dvcyaml import dvc_yaml

    cfg = _smoke_with_teacher(tmp_path, "distill.epochs=1")
    run("student", cfg)  # a model.pt of the student's architecture
    init = tmp_path / "init.pt"
    init.write_bytes((tmp_path / "artifacts" / "student" / "model.pt").read_bytes())
    weights = {}
    for name, start in (("random", "null"), ("init", str(init))):
        run("distill", compose("experiment=smoke", "distill.epochs=1", f"distill.student_init={start}", tmp=tmp_path))
        weights[name] = load_checkpoint(tmp_path / "artifacts" / "distill" / "model.pt", "distill")[0].state_dict()
    assert any(not torch.equal(weights["random"][k], weights["init"][k]) for k in weights["init"])
    with pytest.raises(TransferkitError, match=r"distill.student_init='.*missing.pt': no such file"):
        run("distill", compose("experiment=smoke", f"distill.student_init={tmp_path / 'missing.pt'}", tmp=tmp_path))
    broken = tmp_path / "broken.pt"  # the user's own file: the fix must not tell them to delete it
    broken.write_bytes(init.read_bytes()[:300])
    with pytest.raises(TransferkitError,
                       match=r"unreadable: damaged, cut off.*Fix: do not use this file; point "
                             r"distill.student_init at a model") as err:
        run("distill", compose("experiment=smoke", f"distill.student_init={broken}", tmp=tmp_path))
    assert "delete" not in str(err.value)
    teacher = tmp_path / "artifacts" / "pretrain" / "model.pt"  # the teacher's architecture, not the student's
    fix = r"Fix: point distill.student_init at a model.pt of that architecture .* or set distill.student to match"
    with pytest.raises(TransferkitError, match=r"holds a fastnet of another architecture than distill.student asks "
                                               r"for \(widths \[8, 16, 16\], not \[4, 8, 8\]; .*\)\. " + fix):
        run("distill", compose("experiment=smoke", f"distill.student_init={teacher}", tmp=tmp_path))
    stages = dvc_yaml({"distill": {"student_init": "models/student.pt"}})["stages"]
    assert "models/student.pt" in stages["distill"]["deps"] and "models/student.pt" in stages["student"]["deps"]


def test_a_killed_run_is_not_resumed_once_its_student_init_file_changed(tmp_path, capsys):
    """DVC reruns the stage when the file changes: the rerun must start from the new file, not go on
    with the old run's checkpoint (a leftover it would resume is read, and set aside as damaged, here)."""
    from conftest import resumable_leftover
    from transferkit.training.trainer import CHECKPOINT, LOG_SNAPSHOT

    cfg = compose("experiment=smoke", "distill.epochs=1", tmp=tmp_path)
    run("prepare", cfg)
    run("student", cfg)
    init = tmp_path / "init.pt"
    init.write_bytes((tmp_path / "artifacts" / "student" / "model.pt").read_bytes())
    cfg = compose("experiment=smoke", "distill.epochs=1", f"distill.student_init={init}", tmp=tmp_path)
    for made_again, resumed in ((False, True), (True, False)):
        work = resumable_leftover("student", cfg)
        (work / LOG_SNAPSHOT).mkdir(parents=True)
        (work / CHECKPOINT).write_bytes(b"the killed run's checkpoint")
        if made_again:
            os.utime(init, ns=(1, 1))
        capsys.readouterr()
        assert 0.0 <= run("student", cfg)["val_acc"] <= 1.0
        assert ("is not a checkpoint of this fit (it is unreadable" in capsys.readouterr().err) == resumed


def test_the_share_of_the_gap_is_given_only_where_the_gap_is_resolved():
    """Teacher 4 points over the student alone on 48 images is within noise: no "recovers -150%"."""
    from transferkit.stages.evaluate import distillation_summary

    def hits(n_right: int, n: int) -> torch.Tensor:
        return torch.arange(n) < n_right

    models = {k: {"top1": a / 48, "params": p, "macs": p} for k, a, p in
              (("transfer", 30, 4), ("student", 28, 1), ("distill", 31, 1))}
    correct = {"transfer": hits(30, 48), "student": hits(28, 48), "distill": hits(31, 48)}
    summary = distillation_summary(models, correct)
    assert summary["gap_recovered"] is None and summary["teacher_vs_student"]["ci95"][0] < 0
    # 900 of 1000 against 700: resolved; distilled 800 recovers half the gap
    models = {k: {"top1": a / 1000, "params": 1, "macs": 1} for k, a in
              (("transfer", 900), ("student", 700), ("distill", 800))}
    correct = {k: hits(round(m["top1"] * 1000), 1000) for k, m in models.items()}
    assert distillation_summary(models, correct)["gap_recovered"] == pytest.approx(0.5)


def test_the_report_says_a_slower_student_is_slower_and_gives_no_share_of_an_unresolved_gap():
    from transferkit.evaluation.report import distillation_section

    models = {k: {"top1": a} for k, a in (("transfer", 0.625), ("student", 0.583), ("distill", 0.646))}
    dist = {"distill_vs_student": {"difference": 0.063, "ci95": [-0.05, 0.17]}, "gap_recovered": None,
            "teacher_vs_student": {"difference": 0.042, "ci95": [-0.09, 0.17]},
            "student_params_ratio": 0.5, "student_macs_ratio": 0.5}
    timing = {"transfer": {"latency_ms_bs1": 1.0}, "distill": {"latency_ms_bs1": 2.0}}
    cfg = {"student": "fastnet", "distill_method": "kd", "distill_temperature": 4.0}
    text = "\n".join(distillation_section(dist, models, timing, cfg))
    assert "the distilled student runs 2.0x slower than the teacher" in text and "faster" not in text
    assert "(+4.2 points, -9.0 to +17.0) is not resolved on these test images" in text and "% of the gap" not in text
    text = "\n".join(distillation_section({**dist, "gap_recovered": 1.5}, models, {}, cfg))
    assert "that is 150% of the gap between the student alone and the teacher" in text
    assert "not measured" not in text and "than the teacher at batch 1" not in text
    beaten = {**dist, "teacher_vs_student": {"difference": -0.10, "ci95": [-0.13, -0.07]}}
    text = "\n".join(distillation_section(beaten, models, timing, cfg))
    assert "the student alone beats the teacher, by 10.0 points (+7.0 to +13.0), so there is no gap" in text
    assert "not resolved" not in text and "| student alone | 58.3% | – | – |" in text  # a timing not measured: –
