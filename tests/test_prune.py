"""Pruning: channels really go, outputs stay finite, a pruned model reloads without the
pruning plan, every criterion runs on the smoke experiment, and bad input is refused."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from conftest import compose, run
from transferkit.errors import TransferkitError
from transferkit.evaluation.cost import count_macs, count_params
from transferkit.models import build_model, load_checkpoint, save_checkpoint
from transferkit.prune.structured import CRITERIA, SCOPES, conv_widths, group_regularizer, prune_channels
from transferkit.prune.unstructured import make_permanent, prune_weights, sparsity
from transferkit.training.freeze import freeze_blocks


def _student():
    torch.manual_seed(0)
    return build_model("fastnet", 5, widths=[16, 32, 32], stem_width=8).eval()


def test_an_unreachable_ratio_is_named_as_given_without_float_noise():
    """The stage computes a cut's ratio (1 - (1 - 0.3) is 0.30000000000000004): the refusal gives 0.3."""
    with pytest.raises(TransferkitError, match=r"could not reach prune\.ratio=0\.3 of MACs \(reached 0\.14"):
        prune_channels(_student(), criterion="l2", target="macs", ratio=1 - (1 - 0.3),
                       keep=["head", "blocks.0", "blocks.1", "blocks.2"])


@pytest.mark.parametrize("criterion", sorted(CRITERIA))
def test_structured_pruning_removes_channels(criterion):
    model = _student()
    before_params, before_macs, before_widths = count_params(model), count_macs(model), conv_widths(model)
    calib = (torch.rand(16, 3, 32, 32), torch.randint(0, 5, (16,)))
    result = prune_channels(model, criterion=criterion, target="macs", ratio=0.5, keep=["head"], calibration=calib)
    assert count_macs(model) <= 0.5 * before_macs and count_params(model) < before_params
    assert result["macs_after"] < result["macs_before"]
    assert all(a <= b for a, b in zip(conv_widths(model), before_widths)) and conv_widths(model) != before_widths
    assert model.head.fc.out_features == 5  # the kept head still predicts every class
    out = model(torch.rand(4, 3, 32, 32))
    assert out.shape == (4, 5) and torch.isfinite(out).all()


@pytest.mark.parametrize("criterion", ["l1", "l2", "bn_scale", "random"])
def test_the_criterion_decides_which_channels_go(criterion):
    """A block whose channel k has weights, BatchNorm scale and next-layer inputs all (k+1) times
    larger: the magnitude criteria keep the upper half, the random control does not. A tag in the
    BatchNorm's running mean says which channels survived."""
    model = _student()
    conv, bn, following = model.blocks[1][0][0], model.blocks[1][0][2], model.blocks[1][1][0]
    scale = torch.arange(1, 17, dtype=torch.float32)
    with torch.no_grad():
        conv.weight.mul_(scale.view(-1, 1, 1, 1))
        bn.weight.copy_(0.1 * scale)
        following.weight.mul_(scale.view(1, -1, 1, 1))
        bn.running_mean.copy_(torch.arange(16, dtype=torch.float32))
    torch.manual_seed(1)
    prune_channels(model, criterion=criterion, target="channels", ratio=0.5, keep=["head"])
    kept = sorted(int(t) for t in model.blocks[1][0][2].running_mean)
    assert len(kept) == 8
    assert (kept == list(range(8, 16))) == (criterion != "random"), kept


@pytest.mark.parametrize("scope", sorted(SCOPES))
def test_every_scope_reaches_the_macs_target(scope):
    model = build_model("fastnet", 5, widths=[32, 64, 64], stem_width=16).eval()
    before = count_macs(model)
    prune_channels(model, criterion="l2", target="macs", ratio=0.5, keep=["head"], scope=scope)
    widths = conv_widths(model)
    assert count_macs(model) <= 0.5 * before and torch.isfinite(model(torch.rand(2, 3, 32, 32))).all()
    shares = [w / b for w, b in zip(widths[1:], [32, 32, 64, 64, 64, 64])]
    # only the layer scope removes the same share everywhere (up to rounding to whole channels)
    assert (max(shares) - min(shares) < 0.05) == (scope == "layer"), widths


def test_rates_spare_the_blocks_they_slow_down():
    model = build_model("fastnet", 5, widths=[32, 64, 64], stem_width=16).eval()
    before = count_macs(model)
    prune_channels(model, criterion="l2", target="macs", ratio=0.5, keep=["head"], rates=[1, 1, 1, 0.25])
    widths = conv_widths(model)  # stem, block 1 (2 convs), block 2 (2), block 3 (2)
    assert count_macs(model) <= 0.5 * before
    assert widths[5] / 64 > widths[3] / 64 and widths[5] == widths[6], widths
    faster = build_model("fastnet", 5, widths=[32, 64, 64], stem_width=16).eval()
    prune_channels(faster, criterion="l2", target="macs", ratio=0.5, keep=["head"], rates=[1, 1, 1, 2])
    widths = conv_widths(faster)  # a rate above 1 makes a block lose channels faster than the rest
    assert count_macs(faster) <= 0.5 * before and widths[5] < widths[3] and widths[5] == widths[6], widths
    with pytest.raises(TransferkitError, match="one rate per block"):
        prune_channels(_student(), criterion="l2", target="macs", ratio=0.5, keep=["head"], rates=[1, 0.5])


def test_channel_target_removes_that_share_of_each_layer():
    model = _student()
    prune_channels(model, criterion="l1", target="channels", ratio=0.5, keep=["head"])
    assert conv_widths(model)[1:] == [8, 8, 16, 16, 16, 16]


@pytest.mark.parametrize("target", ["macs", "channels"])
def test_round_to_keeps_channel_counts_a_multiple(target):
    model = build_model("fastnet", 5, widths=[32, 64, 64], stem_width=16).eval()
    before = count_macs(model)
    result = prune_channels(model, criterion="l2", target=target, ratio=0.5, keep=["head"], round_to=8)
    assert result["round_to"] == 8
    widths = conv_widths(model)
    assert all(w % 8 == 0 for w in widths), widths
    assert widths != conv_widths(build_model("fastnet", 5, widths=[32, 64, 64], stem_width=16))
    if target == "macs":
        assert count_macs(model) <= 0.5 * before
    assert torch.isfinite(model(torch.rand(2, 3, 32, 32))).all()


@pytest.mark.parametrize("round_to, ratio, widths", [(16, 0.7, [16, 16, 16, 112, 112, 112, 112]),
                                                      (None, 0.7, [13, 26, 26, 105, 105, 105, 105]),
                                                      (16, 0.05, [16, 32, 32, 176, 176, 176, 176]),
                                                      (16, 0.3, [16, 32, 32, 176, 176, 176, 176])])
def test_a_macs_target_with_round_to_costs_a_narrow_layer_more(round_to, ratio, widths):
    """docs/deploy.md's widths for the default student at the default cut (target macs, ratio 0.7, scope
    layer): Torch-Pruning rounds each layer down to round_to at every step of its search, so the 48-channel
    layers keep a third and the 192-channel ones 58%; with no rounding every layer keeps about the same share.
    The search's first step already rounds: any ratio up to 0.3 makes one cut, 31% of the MACs."""
    model = build_model("fastnet", 3, widths=[48, 192, 192], stem_width=24, activation="relu").eval()
    result = prune_channels(model, criterion="l2", target="macs", ratio=ratio, keep=["head"], round_to=round_to)
    assert conv_widths(model) == widths
    if ratio < 0.7:
        assert 1 - result["macs_after"] / result["macs_before"] == pytest.approx(0.306, abs=0.0005)


def test_channels_target_removes_the_ratio_to_the_nearest_multiple_of_round_to():
    """target=channels, ratio 0.3: every layer keeps the multiple of round_to nearest 70% of its channels
    (24 -> 16, 64 -> 48, 256 -> 176), not the one below it (64 -> 32 was half the layer gone)."""
    model = build_model("fastnet", 5, widths=[64, 256, 256], stem_width=24).eval()  # the default's widths
    before = conv_widths(model)
    prune_channels(model, criterion="l2", target="channels", ratio=0.3, keep=["head"], round_to=16)
    nearest = [max(16, round(0.7 * w / 16) * 16) for w in before]
    assert conv_widths(model) == nearest and 48 in nearest and 176 in nearest, (before, conv_widths(model))
    assert all(abs((b - a) / b - 0.3) <= 8 / b for b, a in zip(before, conv_widths(model)))
    # a layer the nearest multiple would leave whole (32 channels at 0.2 keep 25.6 -> 32): the ratio wins,
    # as round_to is a preference (any channel count, result["round_to"] None and the stage's warning)
    narrow = build_model("fastnet", 5, widths=[16, 32, 32], stem_width=8).eval()
    result = prune_channels(narrow, criterion="l2", target="channels", ratio=0.2, keep=["head"], round_to=16)
    assert result["round_to"] is None and all(a < b for a, b in zip(conv_widths(narrow), [8, 16, 16, 32, 32, 32, 32]))


def test_the_random_criterion_cuts_the_channels_the_round_to_trial_tried():
    """With round_to, prune_channels first cuts a copy to see that the multiples reach the target: the real
    cut must draw the same random ranking, not the next one (which the trial never checked)."""
    from transferkit.prune.structured import _prune

    models = [build_model("fastnet", 5, widths=[32, 64, 64], stem_width=16).eval() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    settings = dict(criterion="random", target="channels", ratio=0.3, keep=["head"])
    torch.manual_seed(0)
    assert prune_channels(models[0], round_to=8, **settings)["round_to"] == 8
    torch.manual_seed(0)
    _prune(models[1], round_to=8, calibration=None, input_size=32, max_search_steps=40, scope="layer", rates=[],
           widths=None, **settings)  # the trial's cut alone
    assert all(torch.equal(a, b) for a, b in zip(models[0].state_dict().values(), models[1].state_dict().values()))


@pytest.mark.parametrize("target", ["macs", "channels"])
@pytest.mark.parametrize("keep", [[], ["blocks.0"]])
def test_the_classifier_keeps_every_class_whatever_keep_lists(target, keep):
    """prune.keep=[blocks.0] drops the default [head]: the head's outputs are the classes, never channels
    to cut (Torch-Pruning cut 5 to 2, and the recovery failed on a label out of range)."""
    model = _student()
    prune_channels(model, criterion="l2", target=target, ratio=0.5, keep=keep)
    assert model.head.fc.out_features == 5 and model(torch.rand(2, 3, 32, 32)).shape == (2, 5)


@pytest.mark.parametrize("mode", ["channels", "macs", "unstructured layer", "unstructured global"])
def test_the_layers_keep_names_lose_no_channel_and_no_weight(mode):
    """prune.keep=[head, blocks.2]: the channel cut leaves every output channel of blocks.2's convolutions (and
    its BatchNorm statistics) and cuts the layers around it; unstructured pruning zeroes none of its weights and
    reaches the ratio over the layers it may prune."""
    model = _student()
    block = {k: v.clone() for k, v in model.blocks[2].state_dict().items() if "running" in k}
    weights = {k: v.clone() for k, v in model.blocks[2].state_dict().items() if v.dim() == 4}  # the convolutions'
    keep = ["head", "blocks.2"]
    if mode.startswith("unstructured"):
        prune_weights(model, 0.5, keep, criterion="l1", scope=mode.split()[1])
        make_permanent(model)
        assert weights and all(torch.equal(model.blocks[2].state_dict()[k], w) for k, w in weights.items())
        assert sparsity(model, keep) == pytest.approx(0.5, abs=0.01)
        return
    prune_channels(model, criterion="l2", target=mode, ratio=0.5, keep=keep)
    widths = conv_widths(model)  # stem, blocks 1, 2 and 3 (two convolutions each)
    assert widths[3:5] == [32, 32] and all(w < b for w, b in zip(widths[:3] + widths[5:], [8, 16, 16, 32, 32]))
    assert all(torch.equal(v, model.blocks[2].state_dict()[k]) for k, v in block.items())


@pytest.mark.parametrize("mode", ["channels", "macs", "unstructured layer", "unstructured global"])
def test_a_keep_list_that_leaves_no_layer_to_prune_is_refused(mode):
    """prune.keep=[blocks] keeps every layer: a channel cut reported a reduction of 1.0x and unstructured pruning a
    sparsity of 0 without a word, and unstructured pruning with scope global failed on a traceback (torch.cat)."""
    with pytest.raises(TransferkitError, match=r"prune.keep=\['blocks'\] keeps every convolution and linear layer"):
        if mode.startswith("unstructured"):
            prune_weights(_student(), 0.5, ["blocks"], criterion="l2", scope=mode.split()[1])
        else:
            prune_channels(_student(), criterion="l2", target=mode, ratio=0.5, keep=["blocks"])


def test_a_channel_ratio_that_would_empty_a_layer_is_refused():
    """Torch-Pruning leaves whole a layer whose kept count rounds to 0 channels: the cut reported a
    reduction of nothing, or left the narrow layers alone, without a word."""
    for round_to in (None, 16):
        with pytest.raises(TransferkitError, match=r"prune.ratio=0.9 would leave 1 layer\(s\) no channel "
                                                   r"\(blocks.0.0; the narrowest has 8\).*prune.ratio <= 0.875"):
            prune_channels(_student(), criterion="l2", target="channels", ratio=0.9, keep=["head"], round_to=round_to)


def test_a_channel_ratio_above_the_rates_cap_is_checked_at_the_share_the_cut_takes():
    """0.95 caps the share of a block with a rate of its own; a block at rate 1 is cut at the ratio itself, which the
    check read as capped: at 0.97 fastnet's 24-filter stem was left whole without a word."""
    with pytest.raises(TransferkitError, match=r"prune.ratio=0.97 would leave \d+ layer\(s\) no channel .*Fix: set "
                                               r"prune.ratio <= 0.958"):
        prune_channels(build_model("fastnet", 4, widths=[48, 192, 192], stem_width=24).eval(), criterion="l2",
                       target="channels", ratio=0.97, keep=["head"])


def test_a_pruned_model_fitted_with_sync_batchnorm_reads_back(tmp_path):
    """A DDP fit under trainer.sync_batchnorm=true gives the BatchNorms back as Lightning's _BatchNormXd, whose
    widths layer_shapes did not record: the pruned checkpoint was refused as altered by export and evaluate."""
    from pytorch_lightning.plugins.layer_sync import TorchSyncBatchNorm

    model = _student()
    prune_channels(model, criterion="l2", target="macs", ratio=0.5, keep=["head"])
    model.arch["pruned"] = True  # as the stage marks it
    holder = torch.nn.Module()
    holder.model = model
    model = TorchSyncBatchNorm().revert(TorchSyncBatchNorm().apply(holder)).model  # what the fit does to it
    assert any(type(m).__name__ == "_BatchNormXd" for m in model.modules())
    x = torch.rand(2, 3, 32, 32)
    save_checkpoint(model.eval(), tmp_path / "model.pt", [str(i) for i in range(5)])
    loaded, _ = load_checkpoint(tmp_path / "model.pt", "prune")
    assert torch.equal(loaded.eval()(x), model(x))


@pytest.mark.parametrize("width, ratio, bound", [(10, 0.9, 0.899), (12, 0.92, 0.916), (8, 0.9, 0.875)])
def test_the_bound_a_refusal_gives_is_one_the_cut_takes(width, ratio, bound):
    """10 x (1 - 0.9) is just under 1 in floats: the bound to set must itself pass."""
    def model():
        torch.manual_seed(0)
        return build_model("vgg_mini", 5, widths=[width] * 9, fc_width=16).eval()

    with pytest.raises(TransferkitError, match=rf"prune.ratio <= {bound}\b"):
        prune_channels(model(), criterion="l2", target="channels", ratio=ratio, keep=["head"])
    pruned = model()
    prune_channels(pruned, criterion="l2", target="channels", ratio=bound, keep=["head"])
    assert all(w == 1 for w in conv_widths(pruned)), conv_widths(pruned)


def test_a_ratio_that_would_empty_a_fully_connected_block_is_refused():
    """vgg_mini's blocks 9 and 10 are linear layers, which Torch-Pruning cuts as it cuts convolutions, and leaves
    whole without a word where the cut would empty them."""
    with pytest.raises(TransferkitError, match=r"prune.ratio=0.9 would leave 2 layer\(s\) no channel \(blocks.10.0, "
                                               r"blocks.9.1; the narrowest has 8\)\. Fix: set prune.ratio <= 0.875"):
        prune_channels(build_model("vgg_mini", 5, widths=[64] * 9, fc_width=8).eval(), criterion="l2",
                       target="channels", ratio=0.9, keep=["head"])


def test_rounds_of_a_channel_cut_are_checked_as_a_whole(tmp_path):
    """prune.steps=2 at a ratio one cut can take: the second round's own ratio, on layers the first
    narrowed, may round a layer to no channel; the trial cut checked prune.ratio before any training,
    so that round prunes what it can rather than fail after the first round's recovery."""
    cfg = _smoke_with_student(tmp_path, "prune.target=channels", "prune.ratio=0.7", "prune.steps=2",
                              "prune.round_to=null", "prune.epochs=2")
    metrics = run("prune", cfg)
    assert metrics["macs_after"] < metrics["macs_before"]


def test_a_rate_that_would_empty_a_block_is_refused():
    """A block of rate 2 loses twice the common share (at most 0.95): 16 channels keep int(16 x 0.05) = 0,
    where Torch-Pruning leaves the block whole without a word."""
    with pytest.raises(TransferkitError, match=r"prune.ratio=0.5 would leave \d layer\(s\) no channel \(blocks.1.0.0"
                                               r".*the first has 16\). Fix: set prune.ratio <= 0.468, lower the"):
        prune_channels(_student(), criterion="l2", target="channels", ratio=0.5, keep=["head"], rates=[1, 2, 1, 1])
    model = _student()
    prune_channels(model, criterion="l2", target="channels", ratio=0.468, keep=["head"], rates=[1, 2, 1, 1])
    assert conv_widths(model)[1] == 1  # 16 x (1 - 0.936): the block is cut as the rate says


def test_rounds_of_a_cut_with_rates_end_where_one_cut_does():
    """Each round's rates make a block of rate r lose r x the ratio after the last round, as one cut does,
    not r x each round's share of what the earlier rounds left, compounded."""
    from transferkit.prune.structured import round_rates

    rates, ratio, steps = [0, 0.5, 1, 1.2], 0.7, 3
    kept = [1.0] * len(rates)
    for step in range(1, steps + 1):
        common = 1 - (1 - ratio * step / steps) / (1 - ratio * (step - 1) / steps)
        kept = [k * (1 - min(r * common, 0.95)) for k, r in zip(kept, round_rates(rates, ratio, step, steps))]
    assert kept == pytest.approx([1 - min(r * ratio, 0.95) for r in rates])
    assert round_rates(rates, ratio, 1, steps) == pytest.approx(rates)  # the first round: the rates as given


def test_round_to_stays_where_the_cut_leaves_a_layer_whole_whatever_the_rounding():
    """resnet18's first block's convolutions feed residual additions with the kept stem: no cut reaches
    them, with rounding or without, so they are no reason to give up round_to for the whole model."""
    torch.manual_seed(0)
    model = build_model("resnet18", 5).eval()
    before = conv_widths(model)
    result = prune_channels(model, criterion="l2", target="channels", ratio=0.5, keep=["head", "blocks.0"],
                            round_to=16)
    assert result["round_to"] == 16
    assert all(w == b or w % 16 == 0 for w, b in zip(conv_widths(model), before)) and conv_widths(model) != before


def test_round_to_gives_way_when_the_model_is_too_narrow_for_it():
    model = _student()  # 8-32 channels: multiples of 32 cannot remove half the MACs
    before = count_macs(model)
    result = prune_channels(model, criterion="l2", target="macs", ratio=0.5, keep=["head"], round_to=32)
    assert result["round_to"] is None and count_macs(model) <= 0.5 * before


@pytest.mark.parametrize("arch, kwargs", [("fastnet", {"widths": [16, 32, 32], "stem_width": 8}),
                                          ("mobilenet", {"width_mult": 0.35}), ("resnet18", {})])
def test_pruned_model_reloads_without_the_plan(tmp_path, arch, kwargs):
    model = build_model(arch, 5, **kwargs).eval()
    prune_channels(model, criterion="l2", target="channels", ratio=0.3, keep=["head"])
    model.arch["pruned"] = True
    save_checkpoint(model, tmp_path / "model.pt", list("abcde"))
    loaded, ckpt = load_checkpoint(tmp_path / "model.pt", "prune")
    x = torch.rand(3, 3, 32, 32)
    assert torch.equal(loaded.eval()(x), model(x))
    assert count_params(loaded) == count_params(model)


def test_frozen_parameters_do_not_break_the_dependency_graph():
    model = _student()
    freeze_blocks(model, 2)  # requires_grad=False on the first blocks, as after transfer
    before = count_macs(model)
    prune_channels(model, criterion="l2", target="macs", ratio=0.5, keep=["head"])
    assert count_macs(model) <= 0.5 * before
    assert torch.isfinite(model(torch.rand(2, 3, 32, 32))).all()


def test_group_regularizer_pulls_the_weakest_channel_group_hardest():
    model = _student()
    first, bn, second = model.blocks[1][0][0], model.blocks[1][0][2], model.blocks[1][1][0]
    with torch.no_grad():  # channel 0 of block 1's first conv, its BatchNorm entry and the next conv's input
        first.weight[0] *= 0.01
        bn.weight[0] *= 0.01
        second.weight[:, 0] *= 0.01
    regularize = group_regularizer(model, reg=1e-3, keep=["head"])
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    regularize()
    pull = (bn.weight.grad / bn.weight.detach()).tolist()  # reg x (1 .. 16), by the group's importance
    assert pull[0] == pytest.approx(16e-3) and min(pull) == pytest.approx(1e-3)
    assert int((first.weight.grad / first.weight.detach()).flatten(1).mean(1).argmax()) == 0


def test_taylor_gradients_leave_the_batchnorm_statistics_and_the_mode_as_they_were():
    """taylor ranks by the cross-entropy's gradients on the calibration images, computed in eval mode: a model
    in train mode comes back in train mode, its BatchNorm statistics those it had, its gradients filled."""
    from transferkit.prune.structured import taylor_gradients

    model = _student().train()
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    taylor_gradients(model, (torch.rand(16, 3, 32, 32), torch.randint(0, 5, (16,))))
    assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in stats.items())
    assert all(p.grad is not None and p.grad.any() for p in model.head.parameters())


def test_unstructured_pruning_is_sparsity_not_smaller_tensors():
    model = _student()
    shapes = {n: p.shape for n, p in model.named_parameters()}
    prune_weights(model, 0.7, ["head"], criterion="l1", scope="global")
    make_permanent(model)
    assert {n: p.shape for n, p in model.named_parameters()} == shapes
    assert sparsity(model, ["head"]) == pytest.approx(0.7, abs=0.01)
    assert not any(n.endswith("_orig") for n, _ in model.named_parameters())
    head = _student()  # the head's outputs are the classes: kept, as the structured cut keeps it, whatever keep lists
    weights = {n: w.detach().clone() for n, w in head.head.named_parameters()}
    prune_weights(head, 0.7, [], criterion="l1", scope="layer")
    make_permanent(head)
    assert weights and all(torch.equal(w, weights[n]) for n, w in head.head.named_parameters())


def _zeroed(model, before: dict) -> dict:
    """Each pruned layer's zeroed weights, as a mask over its weights before pruning."""
    return {name: m.weight == 0 for name, m in model.named_modules() if name + ".weight" in before}


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("criterion", ["l2", "taylor", "random"])
def test_unstructured_pruning_zeroes_the_lowest_scoring_weights_of_each_layer_or_of_all(criterion, scope):
    model = _student()
    calib = (torch.rand(16, 3, 32, 32), torch.randint(0, 5, (16,)))
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(calib[0]), calib[1]).backward()
    layers = {name: m for name, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
              and not name.startswith("head")}
    weight = {name + ".weight": m.weight.detach().clone() for name, m in layers.items()}
    score = {k: (w.abs() if criterion == "l2" else (w * layers[k[:-7]].weight.grad).abs()) for k, w in weight.items()}
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    prune_weights(model, 0.6, ["head"], criterion=criterion, scope=scope, calibration=calib)
    make_permanent(model)
    zeroed = _zeroed(model, weight)
    shares = [float(z.float().mean()) for z in zeroed.values()]
    assert sparsity(model, ["head"]) == pytest.approx(0.6, abs=0.01)
    if scope == "layer":  # every layer loses the same share
        assert all(s == pytest.approx(0.6, abs=0.01) for s in shares), shares
    if criterion == "random":  # the control: zeroed and kept weights alike in size, as they are in no other criterion
        gone, kept = (torch.cat([weight[k + ".weight"][z == zero].abs() for k, z in zeroed.items()]) for zero in (1, 0))
        assert 0.9 < gone.mean() / kept.mean() < 1.1
        return
    if scope == "global":  # one threshold for all: every zeroed weight scores at most any kept one
        kept = torch.cat([score[k + ".weight"][~z] for k, z in zeroed.items()])
        gone = torch.cat([score[k + ".weight"][z] for k, z in zeroed.items()])
        assert gone.max() <= kept.min() and len({round(s, 2) for s in shares}) > 1  # layers lose unlike shares
    else:
        for k, z in zeroed.items():
            assert score[k + ".weight"][z].max() <= score[k + ".weight"][~z].min(), k


def test_unstructured_pruning_refuses_channel_criteria_and_scopes():
    for criterion, scope, needle in (("bn_scale", "layer", "prune.criterion=bn_scale"),
                                     ("l1", "isomorphic", "prune.scope=isomorphic")):
        with pytest.raises(TransferkitError, match=needle):
            prune_weights(_student(), 0.5, ["head"], criterion=criterion, scope=scope)


def _smoke_with_student(tmp_path, *overrides):
    cfg = compose("experiment=smoke", *overrides, tmp=tmp_path)
    for stage in ("prepare", "pretrain", "transfer", "distill"):
        run(stage, cfg)
    return cfg


@pytest.mark.parametrize("criterion", sorted(CRITERIA))
def test_every_criterion_runs_the_prune_stage(tmp_path, criterion):
    cfg = _smoke_with_student(tmp_path, f"prune.criterion={criterion}", "prune.epochs=1")
    metrics = run("prune", cfg)
    assert metrics["macs_after"] <= (1 - 0.7) * metrics["macs_before"]
    model, ckpt = load_checkpoint(tmp_path / "artifacts" / "prune" / "model.pt", "prune")
    assert ckpt["arch"]["pruned"] and count_macs(model) == metrics["macs_after"]
    assert metrics["macs_reduction"] == pytest.approx(metrics["macs_before"] / metrics["macs_after"])


def test_recovery_can_learn_from_the_unpruned_student(tmp_path):
    cfg = _smoke_with_student(tmp_path, "prune.teacher=student", "prune.epochs=1")
    (tmp_path / "artifacts" / "transfer" / "model.pt").unlink()  # the transfer teacher is not read at all
    metrics = run("prune", cfg)
    assert metrics["macs_after"] <= (1 - 0.7) * metrics["macs_before"]


def test_the_stage_says_when_the_student_is_too_narrow_for_round_to(tmp_path, caplog):
    cfg = _smoke_with_student(tmp_path, "prune.epochs=1", "prune.round_to=16")  # fastnet_micro: 4-8 channels
    with caplog.at_level(logging.WARNING, logger="transferkit.stages.prune"):
        metrics = run("prune", cfg)
    assert metrics["round_to"] is None and metrics["macs_after"] <= (1 - 0.7) * metrics["macs_before"]
    assert "prune.round_to=16" in caplog.text and "too narrow" in caplog.text


def test_the_stage_says_when_round_to_cuts_far_more_than_the_ratio_asked(tmp_path, caplog):
    """In multiples of 4 channels fastnet_micro's 4-8 channel layers can only halve: 5% of the MACs asked for
    removes 23%, which the stage says, naming the fix (walk K85); so do rounds and one cut in whole channels (walk
    M86); 70% in multiples of 2 is not overshot."""
    cfg = _smoke_with_student(tmp_path, "prune.epochs=1", "prune.round_to=4", "prune.ratio=0.05")
    with caplog.at_level(logging.WARNING, logger="transferkit.stages.prune"):
        metrics = run("prune", cfg)
    removed = 1 - metrics["macs_after"] / metrics["macs_before"]
    assert metrics["round_to"] == 4 and removed > 0.1, removed
    assert (f"prune.ratio=0.05 asked for 5% of the MACs removed; in multiples of prune.round_to=4 channels the cut "
            f"removed {100 * removed:.0f}%. Fix: set prune.round_to to a smaller multiple, or null (finer channel "
            f"steps).") in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="transferkit.stages.prune"):
        metrics = run("prune", compose("experiment=smoke", "prune.epochs=1", "prune.round_to=2", tmp=tmp_path))
    assert metrics["round_to"] == 2 and "asked for" not in caplog.text
    # in whole channels too: rounds each overshoot their goal, and the last one's cut goes past it (walk M86)
    with caplog.at_level(logging.WARNING, logger="transferkit.stages.prune"):
        metrics = run("prune", compose("experiment=smoke", "prune.epochs=1", "prune.steps=3", tmp=tmp_path))
    removed = 1 - metrics["macs_after"] / metrics["macs_before"]
    assert metrics["round_to"] is None and removed > 0.75, removed
    assert (f"prune.ratio=0.7 asked for 70% of the MACs removed; in whole channels over 3 rounds the cut removed "
            f"{100 * removed:.0f}%. Fix: fewer prune.steps (the last round cuts a narrower model).") in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="transferkit.stages.prune"):  # no setting cuts finer: the cause
        metrics = run("prune", compose("experiment=smoke", "prune.epochs=1", "prune.ratio=0.05", tmp=tmp_path))
    removed = 1 - metrics["macs_after"] / metrics["macs_before"]
    assert (f"prune.ratio=0.05 asked for 5% of the MACs removed; in whole channels the cut removed {100 * removed:.0f}"
            f"%. The search cuts every layer at once, a whole channel each: one of its steps removes that much of this "
            f"student.") in caplog.text


def test_rounds_too_narrow_for_round_to_name_the_widths_they_end_with(tmp_path, monkeypatch, caplog):
    """Rounds of a channel cut say so at the first round: the widths the warning names are the saved model's, not
    the first round's."""
    import transferkit.stages.prune as prune_stage

    monkeypatch.setattr(prune_stage, "_recover", _untrained)  # the cuts are under test, not the training
    cfg = _smoke_with_student(tmp_path, "prune.epochs=1", "prune.round_to=16", "prune.target=channels",
                              "prune.ratio=0.5", "prune.steps=2")
    with caplog.at_level(logging.WARNING, logger="transferkit.stages.prune"):
        run("prune", cfg)
    saved = conv_widths(load_checkpoint(tmp_path / "artifacts" / "prune" / "model.pt", "prune")[0])
    assert f"(conv widths {'/'.join(map(str, saved))})" in caplog.text, (saved, caplog.text)


def test_sparse_learning_runs_before_the_cut(tmp_path, monkeypatch):
    import transferkit.stages.prune as prune_stage
    from transferkit.stages.common import load_task

    calls = []

    def counted(*args, **kwargs):  # the regulariser the stage builds, counting each optimiser step's call
        regularize = group_regularizer(*args, **kwargs)
        return lambda: (calls.append(1), regularize())

    monkeypatch.setattr(prune_stage, "group_regularizer", counted)
    cfg = _smoke_with_student(tmp_path, "prune.sparse_epochs=2", "prune.sparse_reg=0.01", "prune.epochs=1")
    metrics = run("prune", cfg)
    assert metrics["macs_after"] <= (1 - 0.7) * metrics["macs_before"]
    assert (tmp_path / "artifacts" / "prune" / "rounds" / "sparse" / "dvclive").is_dir()
    steps = len(load_task(tmp_path / "artifacts" / "prepare", "target")["train_y"]) // cfg.prune.batch_size
    assert len(calls) == 2 * steps  # before every step of the two sparse epochs, and only then


def test_iterative_and_unstructured_modes_run(tmp_path):
    cfg = _smoke_with_student(tmp_path, "prune.steps=2", "prune.epochs=2")
    metrics = run("prune", cfg)
    assert metrics["macs_after"] <= (1 - 0.7) * metrics["macs_before"]
    # rounds of a channel target remove the share once in all, not once per round
    halved = compose("experiment=smoke", "prune.target=channels", "prune.ratio=0.5", "prune.steps=2",
                     "prune.round_to=null", "prune.epochs=2", tmp=tmp_path)
    run("prune", halved)
    artifacts = tmp_path / "artifacts"
    before, after = (conv_widths(load_checkpoint(artifacts / stage / "model.pt", stage)[0])
                     for stage in ("distill", "prune"))
    assert all(abs(a - b / 2) <= 1 for a, b in zip(after, before)), (before, after)
    un = compose("experiment=smoke", "prune.mode=unstructured", "prune.ratio=0.5", "prune.epochs=1", tmp=tmp_path)
    metrics = run("prune", un)
    assert metrics["sparsity"] == pytest.approx(0.5, abs=0.02)
    saved = json.loads((tmp_path / "artifacts" / "prune" / "metrics.json").read_text())
    assert saved["sparsity"] == metrics["sparsity"]


def _untrained(cfg, model, *args):
    """A recovery round that trains nothing (its Fit counts no time)."""
    from transferkit.training.trainer import Fit

    return Fit(model, "32-true", "cpu", None, 0.0, 0)


def test_the_prune_stage_counts_the_training_of_every_fit_it_runs(tmp_path, monkeypatch):
    """Sparse learning and the rounds' recoveries train too: timing.json's seconds and images are theirs and the
    final fit's together, not the final fit's alone. Each round before the last recovers for its share of
    prune.epochs (prune.epochs // prune.steps), sparse learning for prune.sparse_epochs."""
    from transferkit.training import trainer

    fits, fit = [], trainer.fit
    monkeypatch.setattr("transferkit.stages.training.fit", lambda *a, **k: fits.append(fit(*a, **k)) or fits[-1])
    cfg = _smoke_with_student(tmp_path, "prune.steps=2", "prune.sparse_epochs=1", "prune.epochs=2")
    fits.clear()
    run("prune", cfg)
    timing = json.loads((tmp_path / "artifacts" / "prune" / "timing.json").read_text())
    assert len(fits) == 3  # sparse learning, round 1's recovery, the final fit
    epoch = fits[0].images  # one epoch of the target's train split
    assert epoch > 0 and [f.images for f in fits] == [epoch, epoch, 2 * epoch]
    assert timing["train_seconds"] == round(sum(f.seconds for f in fits), 2)
    assert timing["train_images_per_second"] == round(sum(f.images for f in fits) / sum(f.seconds for f in fits), 1)


def test_rounds_of_a_macs_target_end_where_one_cut_does(tmp_path, monkeypatch, caplog):
    """Each round's search stops past its goal; the next round aims from the MACs left, so the overshoots
    do not add up (three rounds aiming by the plan alone removed 0.78 of the MACs for a ratio of 0.7)."""
    import transferkit.stages.prune as prune_stage

    monkeypatch.setattr(prune_stage, "_recover", _untrained)  # the cuts are under test, not the training
    wide = ("model@distill.student=fastnet_student", "distill.epochs=1", "prune.epochs=1", "prune.round_to=16")
    one = run("prune", _smoke_with_student(tmp_path, *wide))
    three = run("prune", compose("experiment=smoke", *wide, "prune.steps=3", tmp=tmp_path))
    removed = [1 - m["macs_after"] / m["macs_before"] for m in (one, three)]
    assert 0.7 <= removed[1] <= removed[0] + 0.02, removed
    # rounds of a channel cut take their part of the way to one cut's widths in multiples of 16: a round's small
    # share is no longer rounded back to a layer's whole width, nor the student called too narrow
    with caplog.at_level(logging.WARNING, logger="transferkit.stages.prune"):
        channels = run("prune", compose("experiment=smoke", *wide, "prune.steps=3", "prune.target=channels",
                                        "prune.ratio=0.5", tmp=tmp_path))
    assert "prune.round_to" not in caplog.text and channels["round_to"] == 16


@pytest.mark.parametrize("more", [[], ["prune.rates=[1,0.5,1,2]"], ["prune.round_to=null"]])
def test_rounds_of_a_channel_cut_end_with_the_widths_of_one_cut(tmp_path, monkeypatch, more):
    """Each round aims, layer by layer, at its share of the original widths: a round's rounding (to multiples of
    round_to, or down to whole channels) is not compounded by the next (five rounds left 10 of 24 channels where one
    cut leaves 16, and a block of rate 0.5 lost 42% of its channels for a share of 22.5%)."""
    import transferkit.stages.prune as prune_stage

    monkeypatch.setattr(prune_stage, "_recover", _untrained)  # the cuts are under test, not the training
    wide = ("model@distill.student=fastnet_student", "distill.epochs=1", "prune.epochs=1", "prune.round_to=16",
            "prune.target=channels", "prune.ratio=0.45", *more)
    widths = []
    rounds = compose("experiment=smoke", *wide, "prune.steps=5", tmp=tmp_path)
    for cfg in (_smoke_with_student(tmp_path, *wide), rounds):
        run("prune", cfg)
        widths.append(conv_widths(load_checkpoint(tmp_path / "artifacts" / "prune" / "model.pt", "prune")[0]))
    assert widths[0] == widths[1]


def test_the_trial_cut_before_the_rounds_draws_nothing_from_the_runs_random_stream(smoke_artifacts, tmp_path,
                                                                                    monkeypatch):
    """Rounds (or sparse learning) first try the whole cut on a copy, to fail an unreachable target before any
    training; a random criterion's draws for that trial are not taken from the run: its first real cut draws
    what it would draw with no trial before it."""
    import shutil
    from pathlib import Path

    import transferkit.stages.prune as prune_stage

    states, real = [], prune_stage.prune_channels
    monkeypatch.setattr(prune_stage, "prune_channels",
                        lambda *a, **k: states.append(torch.get_rng_state()) or real(*a, **k))
    monkeypatch.setattr(prune_stage, "_recover", _untrained)  # the cuts are under test, not the training
    shutil.copytree(Path(smoke_artifacts[0].paths.artifacts_dir), tmp_path / "artifacts")
    run("prune", compose("experiment=smoke", "prune.criterion=random", "prune.steps=2", "prune.epochs=1",
                         tmp=tmp_path))
    assert len(states) == 3  # the trial, then the two rounds
    assert torch.equal(states[0], states[1])
    assert not torch.equal(states[1], states[2])  # the first round's cut drew from the stream


def test_an_unreachable_ratio_fails_before_sparse_learning_or_a_round_trains(tmp_path, monkeypatch):
    import transferkit.stages.prune as prune_stage

    _smoke_with_student(tmp_path, "prune.epochs=1")  # prepare .. distill, then no training may follow

    def no_training(*args, **kwargs):
        raise AssertionError("the stage trained before it refused the ratio")

    monkeypatch.setattr(prune_stage, "fit_stage", no_training)
    monkeypatch.setattr(prune_stage, "train_stage", no_training)
    for more in (["prune.sparse_epochs=2"], ["prune.steps=3"]):
        with pytest.raises(TransferkitError, match="could not reach prune.ratio=0.999"):
            run("prune", compose("experiment=smoke", "prune.epochs=1", "prune.ratio=0.999", *more, tmp=tmp_path))


def test_the_stage_refuses_a_rate_that_would_empty_a_block_and_takes_the_bound_it_names(tmp_path):
    """The smoke student's block 1 has 4 channels: at rate 2 and ratio 0.4 it would keep int(4 x 0.2) = 0."""
    sets = ("prune.target=channels", "prune.rates=[1,2,1,1]", "prune.round_to=null", "prune.epochs=1")
    _smoke_with_student(tmp_path, *sets)
    with pytest.raises(TransferkitError, match=r"prune.ratio <= 0.375, lower the rates of their blocks"):
        run("prune", compose("experiment=smoke", *sets, "prune.ratio=0.4", tmp=tmp_path))
    run("prune", compose("experiment=smoke", *sets, "prune.ratio=0.375", tmp=tmp_path))
    model, _ = load_checkpoint(tmp_path / "artifacts" / "prune" / "model.pt", "prune")
    assert conv_widths(model)[1] == 1  # 4 x (1 - 0.75): block 1 cut at twice the share


@pytest.mark.parametrize("override, needle", [
    ("prune.ratio=0", "prune.ratio"),
    ("prune.ratio=1", "prune.ratio"),
    ("prune.ratio=1.5", "prune.ratio"),
    ("prune.criterion=entropy", "unknown prune.criterion 'entropy'"),
    ("prune.keep=[head,classifier]", "prune.keep names \\['classifier'\\]"),
    ("prune.keep=[blocks]", "keeps every convolution and linear layer"),
    ("prune.ratio=0.999", "could not reach prune.ratio"),
    ("prune.mode=magic", "prune.mode"),
])
def test_bad_prune_settings_fail_and_keep_outputs(tmp_path, override, needle):
    cfg = _smoke_with_student(tmp_path, "prune.epochs=1")
    run("prune", cfg)
    before = (tmp_path / "artifacts" / "prune" / "model.pt").read_bytes()
    with pytest.raises(TransferkitError, match=needle):
        run("prune", compose("experiment=smoke", "prune.epochs=1", override, tmp=tmp_path))
    assert (tmp_path / "artifacts" / "prune" / "model.pt").read_bytes() == before


def test_report_describes_unstructured_pruning_by_its_sparsity():
    from transferkit.evaluation.report import prune_section

    models = {"distill": {"top1": 0.78, "params": 1.1e6, "macs": 69e6, "size_bytes": 4.4e6},
              "prune": {"top1": 0.77, "params": 1.1e6, "macs": 69e6, "size_bytes": 4.4e6}}
    timing = {"distill": {"latency_ms_bs1": 2.0}, "prune": {"latency_ms_bs1": 2.0}}
    settings = {"criterion": "l2", "target": "macs", "ratio": 0.5, "steps": 1, "scope": "layer"}
    weights = "\n".join(prune_section({**settings, "mode": "unstructured", "sparsity": 0.4987}, models, timing))
    assert "unstructured: single weights zeroed, criterion `l2`, scope layer, sparsity 49.9%" in weights
    assert "of the MACs removed" not in weights and "MACs do not fall" in weights and "x fewer" not in weights
    channels = "\n".join(prune_section({**settings, "mode": "structured"},
                                       {**models, "prune": {**models["prune"], "macs": 23e6}}, timing))
    # what was asked and what the cut did: round_to and whole channels overshoot a small share (walk K85)
    assert "structured, criterion `l2`, asked to remove 50% of the MACs: 67% of the MACs removed, 1 step(s)" in channels
    by_channels = "\n".join(prune_section({**settings, "mode": "structured", "target": "channels", "ratio": 0.9},
                                          {**models, "prune": {**models["prune"], "macs": 50e6}}, timing))
    assert "asked to remove 90% of the channels: 28% of the MACs removed" in by_channels
    assert "MACs 3.00x fewer" in channels
    # a pruned model that runs slower says so: 3.5 times the latency is "3.50x higher", not "0.29x lower"
    slower = "\n".join(prune_section({**settings, "mode": "structured"}, models,
                                     {"distill": {"latency_ms_bs1": 2.0, "latency_ms_bs1_1thread": 2.0},
                                      "prune": {"latency_ms_bs1": 7.0, "latency_ms_bs1_1thread": 1.0}}))
    assert "measured batch-1 latency 3.50x higher (2.00x lower on one thread)" in slower
    assert "(not measured on one thread)" in channels


@pytest.mark.parametrize("criterion, survivors", [("l1", "flat"), ("l2", "spiky")])
def test_l1_ranks_a_channel_by_the_sum_of_its_weights_magnitudes_and_l2_by_their_squares(criterion, survivors):
    """Block 1's even channels hold one weight of 20 (l1 20, l2 400), its odd ones 72 weights of 1 (l1 72, l2 72):
    l1 keeps the odd channels, l2 the even ones. BatchNorm and the next layer weigh every channel alike; a tag in
    the BatchNorm's running mean says which channels survived."""
    model = _student()
    conv, bn, following = model.blocks[1][0][0], model.blocks[1][0][2], model.blocks[1][1][0]
    with torch.no_grad():
        conv.weight.fill_(1.0)
        conv.weight[::2] = 0.0
        conv.weight[::2, 0, 0, 0] = 20.0
        bn.weight.fill_(1.0)
        following.weight.fill_(1.0)
        bn.running_mean.copy_(torch.arange(16, dtype=torch.float32))
    prune_channels(model, criterion=criterion, target="channels", ratio=0.5, keep=["head", "blocks.0"])
    kept = sorted(int(t) for t in model.blocks[1][0][2].running_mean)
    assert kept == list(range(1 if survivors == "flat" else 0, 16, 2)), kept


def test_group_regularizer_leaves_the_channels_keep_names_alone():
    """prune.keep=[head, blocks.2]: sparse learning pulls no output channel of blocks.2 towards zero (its
    BatchNorm entries get no pull), as the cut removes none of them; the other blocks' are pulled."""
    model = _student()
    regularize = group_regularizer(model, reg=1e-3, keep=["head", "blocks.2"])
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    regularize()
    norms = lambda block: [m for m in block.modules() if isinstance(m, torch.nn.BatchNorm2d)]  # noqa: E731
    assert all(not bn.weight.grad.any() for bn in norms(model.blocks[2]))
    assert all(bn.weight.grad.any() for bn in norms(model.blocks[1]) + norms(model.blocks[3]))


def test_unstructured_keep_names_a_block_not_every_block_whose_number_starts_alike():
    """prune.keep=[head, blocks.1] keeps vgg_mini's blocks.1, not blocks.10 (its second linear layer) too."""
    torch.manual_seed(0)
    model = build_model("vgg_mini", 5, widths=[8] * 9, fc_width=16).eval()
    kept = {k: v.clone() for k, v in model.blocks[1].state_dict().items()}
    prune_weights(model, 0.5, ["head", "blocks.1"], criterion="l1", scope="layer")
    make_permanent(model)
    assert all(torch.equal(v, model.blocks[1].state_dict()[k]) for k, v in kept.items())
    linear = next(m for m in model.blocks[10].modules() if isinstance(m, torch.nn.Linear))
    assert float((linear.weight == 0).float().mean()) == pytest.approx(0.5, abs=0.01)


def test_sparsity_counts_the_weights_that_are_exactly_zero():
    """A weight of 1e-4 is a weight that computes: only zeros count as pruned."""
    model = _student()
    layers = [m for name, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
              and not name.startswith("head")]
    with torch.no_grad():
        for m in layers:
            m.weight.fill_(1e-4)
        layers[1].weight.zero_()
    total = sum(m.weight.numel() for m in layers)
    assert sparsity(model, ["head"]) == layers[1].weight.numel() / total


def test_the_unstructured_stage_reports_the_sparsity_of_the_layers_it_may_prune(tmp_path):
    """prune.keep=[head, blocks.1]: blocks.1 keeps every weight, and the sparsity the stage reports is that of
    the layers it pruned (the ratio), not diluted by the ones it kept."""
    cfg = _smoke_with_student(tmp_path, "prune.mode=unstructured", "prune.ratio=0.5", "prune.keep=[head,blocks.1]",
                              "prune.epochs=1")
    metrics = run("prune", cfg)
    model, _ = load_checkpoint(tmp_path / "artifacts" / "prune" / "model.pt", "prune")
    assert all((m.weight != 0).all() for m in model.blocks[1].modules() if isinstance(m, torch.nn.Conv2d))
    assert metrics["sparsity"] == pytest.approx(0.5, abs=0.02) == sparsity(model, ["head", "blocks.1"])


def test_a_round_of_a_channel_cut_keeps_the_channel_count_it_names_for_a_layer():
    """`widths` (a round of a channel cut) names the channels each layer keeps: 24 cut to 8 keeps 8 and 24 cut to
    11 keeps 11, where the share 1 - k/24 in floats kept int(24 x (1 - share)) = k - 1."""
    model = build_model("fastnet", 5, widths=[24, 32, 32], stem_width=8).eval()
    prune_channels(model, criterion="l2", target="channels", ratio=0.5, keep=["head"],
                   widths={"blocks.1.0.0": 8, "blocks.1.1.0": 11})
    assert conv_widths(model)[1:3] == [8, 11], conv_widths(model)
