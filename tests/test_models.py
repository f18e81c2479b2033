"""Model zoo: architectures, block structure, truncation, checkpoints, ImageNet weights
(from a fake local hub cache, never the network) and cost counting."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.hub
import yaml
from torch import nn

from conftest import CONF
from transferkit.errors import TransferkitError
from transferkit.evaluation.cost import count_macs, count_params
from transferkit.models import (ARCHITECTURES, BlockNet, build_model, load_backbone, load_checkpoint,
                                model_from_config, save_checkpoint)
from transferkit.training.freeze import freeze_blocks, frozen_depth

# small settings per architecture so every test runs in a fraction of a second
SMALL = {
    "fastnet": {"name": "fastnet", "widths": [8, 16, 16], "stem_width": 8},
    "vgg_mini": {"name": "vgg_mini", "widths": [4, 4, 4, 8, 8, 8, 8, 8, 8], "fc_width": 16},
    "resnet18": {"name": "resnet18", "weights": None},
    "mobilenet": {"name": "mobilenet", "width_mult": 0.35},
}
BLOCKS = {"fastnet": 4, "vgg_mini": 11, "resnet18": 5, "mobilenet": 5}


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """torch.hub may read its cache but never download in these tests."""
    def refuse(url, *a, **k):
        raise ConnectionError(f"network disabled in tests: {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def _x(n=2, seed=0):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _warm_bn(model: nn.Module) -> None:
    """Move BatchNorm running statistics away from their init, so a round trip must keep them."""
    model.train()
    with torch.no_grad():
        model(_x(4, seed=1))
    model.eval()


def test_every_architecture_is_tested():
    assert set(ARCHITECTURES) == set(SMALL) == set(BLOCKS)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_default_config_builds_with_documented_blocks(name):
    cfg = yaml.safe_load((CONF / "model" / f"{name}.yaml").read_text())
    model = model_from_config(cfg, 5).eval()
    assert model.num_blocks == BLOCKS[name]
    assert model.num_classes == 5
    with torch.no_grad():
        out = model(_x(2))
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    assert model.arch["name"] == name


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_small_models_train_step(name):
    cfg = dict(SMALL[name])
    model = build_model(cfg.pop("name"), 5, **cfg)
    assert model.num_blocks == BLOCKS[name]
    out = model(_x(3))
    assert out.shape == (3, 5)
    out.logsumexp(1).mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_vgg_freeze_depth_6_is_the_first_six_convs():
    model = model_from_config(SMALL["vgg_mini"], 5)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 9
    linears = [m for b in model.blocks for m in b.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 2  # fc1, fc2 are blocks; fc3 is the head
    freeze_blocks(model, 6)
    assert frozen_depth(model) == 6
    frozen = [m for b in model.blocks[:6] for m in b.modules() if isinstance(m, nn.Conv2d)]
    assert frozen == convs[:6]
    assert all(not p.requires_grad for c in convs[:6] for p in c.parameters())
    assert all(p.requires_grad for c in convs[6:] for p in c.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    assert not any(isinstance(m, nn.Linear) for b in model.blocks[:6] for m in b.modules())


@pytest.mark.parametrize("name,depth,features", [
    ("fastnet", 1, 8), ("fastnet", 2, 8), ("fastnet", 3, 16),
    ("vgg_mini", 3, 4), ("vgg_mini", 6, 8), ("vgg_mini", 10, 16),
    ("resnet18", 2, 64), ("resnet18", 4, 256),
])
def test_truncate_probes_an_earlier_block(name, depth, features):
    cfg = dict(SMALL[name])
    full = build_model(cfg["name"], 5, **{k: v for k, v in cfg.items() if k != "name"})
    model = build_model(cfg.pop("name"), 5, depth=depth, **cfg).eval()
    assert model.num_blocks == depth and model.arch["depth"] == depth
    assert model.head.fc.in_features == features
    assert model.features(_x(2)).shape[1] == features
    assert model.features(_x(2)).shape[1] == full.eval().features(_x(2), depth).shape[1]
    with torch.no_grad():
        assert model(_x(2)).shape == (2, 5)


def test_a_linear_probe_averages_its_blocks_features_through_a_layer_with_a_bias():
    """truncate's probe head is the same for every architecture: the features averaged over the map, then a linear
    layer with a bias (fastnet's own head takes the max and has none): the probe stage scores, and its model.pt
    holds, that head."""
    model = build_model("fastnet", 3, widths=[8, 16, 16], stem_width=8, depth=2).eval()
    fc = model.head.fc
    assert fc.bias is not None
    with torch.no_grad():
        nn.init.normal_(fc.bias)
        features = model.features(_x(2))
        assert torch.allclose(model(_x(2)), fc(features.mean((2, 3))) * model.head.scale)


@pytest.mark.parametrize("name", ["fastnet", "vgg_mini"])
def test_checkpoint_round_trip(tmp_path, name):
    model = model_from_config(SMALL[name], 5)
    _warm_bn(model)
    save_checkpoint(model, tmp_path / "model.pt", ["a", "b", "c", "d", "e"], epoch=3)
    loaded, ckpt = load_checkpoint(tmp_path / "model.pt", "pretrain")
    loaded.eval()
    assert ckpt["classes"] == ["a", "b", "c", "d", "e"] and ckpt["epoch"] == 3
    assert loaded.arch == model.arch
    x = _x(4, seed=2)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_truncated_model_checkpoint_round_trip(tmp_path):
    model = build_model("fastnet", 3, widths=[8, 16, 16], stem_width=8, depth=2)
    _warm_bn(model)
    save_checkpoint(model, tmp_path / "probe.pt", ["a", "b", "c"])
    loaded, _ = load_checkpoint(tmp_path / "probe.pt", "probe")
    assert loaded.num_blocks == 2
    with torch.no_grad():
        assert torch.equal(loaded.eval()(_x(2)), model(_x(2)))


# the side of the square feature maps after each block of SMALL's models (None: a block of flat features)
SIDES = {
    "fastnet": [31, 15, 7, 3],  # 2x2 stem without padding, then a pool per group
    "vgg_mini": [32, 32, 16, 16, 16, 8, 8, 8, 4, None, None],  # pooling after conv3, conv6 and conv9, then fc1, fc2
    "resnet18": [32, 32, 16, 8, 4],  # stride-1 stem, no max pool: the last stage sees 4x4
    "mobilenet": [32, 16, 8, 4, 4],  # by resolution stage; the last 1x1 conv keeps 4x4
}


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_each_block_downsamples_where_its_architecture_says(name):
    """The resolution after each block is the documented one: freeze_depth and a probe at depth k cut the network
    at the stage the docs name, and 32x32 images end at the stated map size."""
    cfg = dict(SMALL[name])
    model = build_model(cfg.pop("name"), 5, **cfg).eval()
    with torch.no_grad():
        sides = [None if f.dim() == 2 else f.shape[-1] for f in
                 (model.features(_x(1), depth) for depth in range(1, model.num_blocks + 1))]
    assert sides == SIDES[name]


def test_the_model_scales_plain_images_by_the_mean_and_std_it_records():
    """A model takes [0, 1] images and normalises them itself: an image one std above the mean reads as 1."""
    mean, std = [0.5, 0.25, 0.125], [0.5, 0.2, 0.1]
    model = build_model("fastnet", 3, widths=[8, 16, 16], stem_width=8, mean=mean, std=std)
    image = (torch.tensor(mean) + torch.tensor(std)).view(1, 3, 1, 1).expand(1, 3, 4, 4)
    assert torch.allclose(model.normalize(image), torch.ones(1, 3, 4, 4))
    assert model.arch["mean"] == mean and model.arch["std"] == std


def test_dirac_init_starts_each_convolution_as_the_identity_on_its_first_channels():
    """model.dirac_init=true (fastnet_airbench): every 3x3 convolution of the groups passes its first
    min(in, out) channels through unchanged at first."""
    model = build_model("fastnet", 3, widths=[8, 16, 16], stem_width=8, dirac_init=True)
    convs = [m for block in model.blocks[1:] for m in block.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 6
    for conv in convs:
        x, kept = _x(1)[:, :1].expand(1, conv.in_channels, 32, 32), min(conv.in_channels, conv.out_channels)
        with torch.no_grad():
            assert torch.allclose(conv(x)[:, :kept], x[:, :kept])


def test_models_come_back_in_the_mode_they_were_made_in(tmp_path):
    """build_model, truncate, new_head and load_checkpoint (a pruned model's too) size the head by a dry run in eval
    mode: what they give back is in a new module's training mode (BatchNorm learning its statistics, dropout on)."""
    model = model_from_config(SMALL["vgg_mini"], 5)
    assert all(m.training for m in model.modules())
    model.new_head(3)
    assert all(m.training for m in model.modules())
    assert all(m.training for m in build_model("vgg_mini", 5, widths=[4] * 9, fc_width=16, depth=4).modules())
    save_checkpoint(model_from_config(SMALL["fastnet"], 3), tmp_path / "model.pt", ["a", "b", "c"])
    _pruned_checkpoint(tmp_path / "pruned.pt")
    for path in (tmp_path / "model.pt", tmp_path / "pruned.pt"):
        assert all(m.training for m in load_checkpoint(path, "prune")[0].modules()), path


def test_the_size_a_truncated_checkpoint_is_checked_against_counts_both_its_heads():
    """A truncated model is loaded by building every block and the full head, then a probe head: the bytes its
    file's size is checked against (before anything is allocated) are never fewer than those."""
    from transferkit.models import _weight_bytes

    model = build_model("fastnet", 1000, widths=[8, 16, 64], stem_width=8)
    built = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    probe = build_model("fastnet", 1000, widths=[8, 16, 64], stem_width=8, depth=2).head
    assert _weight_bytes({**model.arch, "depth": 2}, 1000) >= built + sum(
        t.numel() * t.element_size() for t in probe.state_dict().values())


def test_load_backbone_matching_config_gets_fresh_head(tmp_path):
    model = model_from_config(SMALL["fastnet"], 10)
    _warm_bn(model)
    save_checkpoint(model, tmp_path / "model.pt", [str(i) for i in range(10)])
    backbone = load_backbone(tmp_path / "model.pt", SMALL["fastnet"], 3, "pretrain").eval()
    assert backbone.num_classes == 3
    x = _x(2)
    with torch.no_grad():
        assert torch.equal(backbone.features(x), model.features(x))
        assert backbone(x).shape == (2, 3)


@pytest.mark.parametrize("other", [
    {"name": "fastnet", "widths": [8, 16, 32], "stem_width": 8},
    {"name": "fastnet", "widths": [8, 16, 16], "stem_width": 4},
    SMALL["vgg_mini"],
])
def test_load_backbone_with_other_config_names_architecture(tmp_path, other):
    model = model_from_config(SMALL["fastnet"], 10)
    save_checkpoint(model, tmp_path / "model.pt", [str(i) for i in range(10)])
    with pytest.raises(TransferkitError) as e:
        load_backbone(tmp_path / "model.pt", other, 3, "pretrain")
    msg = str(e.value)
    assert "holds a fastnet of another architecture than model asks for (" in msg
    # the settings that differ, each with the checkpoint's value and the config's
    assert all(f"{k} {SMALL['fastnet'].get(k)!r}, not {v!r}" in msg for k, v in other.items()
               if SMALL["fastnet"].get(k) != v), msg
    assert "dvc repro pretrain" in msg


def test_load_backbone_compares_the_settings_a_checkpoint_left_to_its_builder(tmp_path):
    """A checkpoint built without `activation` (fastnet's default, gelu) is no backbone for a config asking
    for relu, and is one for a config that spells the default out."""
    save_checkpoint(model_from_config(SMALL["fastnet"], 10), tmp_path / "model.pt", [str(i) for i in range(10)])
    with pytest.raises(TransferkitError, match="architecture"):
        load_backbone(tmp_path / "model.pt", {**SMALL["fastnet"], "activation": "relu"}, 3, "pretrain")
    loaded = load_backbone(tmp_path / "model.pt", {**SMALL["fastnet"], "activation": "gelu"}, 3, "pretrain")
    assert isinstance(loaded.blocks[0][1], nn.GELU)


def test_scratch_builds_the_architecture_of_published_weights_from_random_init(tmp_path, monkeypatch):
    """resnet18 with ImageNet weights keeps their 7x7 stem: scratch trains that network (never the 3x3
    stem of weights=null) and never reads the weights."""
    from torchvision.models import ResNet18_Weights

    from transferkit.stages import scratch

    from conftest import compose, run

    def no_download(*args, **kwargs):
        raise AssertionError("scratch read published weights")

    monkeypatch.setattr(ResNet18_Weights.IMAGENET1K_V1, "get_state_dict", no_download, raising=False)
    cfg = compose("experiment=smoke", "model=resnet18", "model.weights=IMAGENET1K_V1", "scratch.epochs=1",
                  tmp=tmp_path)
    run("prepare", cfg)
    built = []
    monkeypatch.setattr(scratch, "init_from_data", lambda model, images: built.append(model))
    run("scratch", cfg)
    assert built[0].blocks[0][0].weight.shape == (64, 3, 7, 7)
    reference = build_model("resnet18", 3, weights="IMAGENET1K_V1", fetch_weights=False)
    assert count_params(built[0]) == count_params(reference)


def test_published_weights_bring_their_own_normalisation_into_checkpoints(tmp_path):
    """ImageNet weights were trained on inputs normalised with ImageNet's mean and std, not CIFAR's; the checkpoint
    records them, so every later stage and the export normalise as the weights expect."""
    from torchvision.models import ResNet18_Weights

    published = ResNet18_Weights.IMAGENET1K_V1.transforms()
    model = build_model("resnet18", 3, weights="IMAGENET1K_V1", fetch_weights=False)
    assert torch.allclose(model.normalize.mean.flatten(), torch.tensor(published.mean))
    assert torch.allclose(model.normalize.std.flatten(), torch.tensor(published.std))
    save_checkpoint(model, tmp_path / "model.pt", ["a", "b", "c"])
    assert load_checkpoint(tmp_path / "model.pt", "pretrain")[0].arch["mean"] == list(published.mean)
    assert build_model("resnet18", 3).arch["mean"] == model_from_config(SMALL["fastnet"], 3).arch["mean"]


@pytest.mark.parametrize("doctor, needle", [
    # one value strided over 20000x20000: a few bytes in the file, 1.6 GB once made dense
    (lambda ck: ck["state_dict"].update({"head.fc.weight": torch.zeros(1).expand(20000, 20000)}),
     "its tensor head.fc.weight has 400,000,000 values, more than the file holds"),
    (lambda ck: ck["arch"].update(widths=[4096, 4096, 4096]), "its architecture has 3,02"),
    # too deep for 32x32 images: named as this file's fault, not the config's
    (lambda ck: ck["arch"].update(widths=[8] * 6), r"model \(model 'fastnet', .*\) does not fit 32x32 images"),
])
def test_a_doctored_checkpoint_is_refused_before_it_allocates_what_it_names(tmp_path, doctor, needle):
    """Files are data: the sizes a stranger's model.pt names are checked against the file before memory is taken."""
    save_checkpoint(model_from_config(SMALL["fastnet"], 3), tmp_path / "model.pt", ["a", "b", "c"])
    ckpt = torch.load(tmp_path / "model.pt", weights_only=True)
    doctor(ckpt)
    torch.save(ckpt, tmp_path / "doctored.pt")
    with pytest.raises(TransferkitError, match=rf"does not fit its own architecture .*\({needle}"):
        load_checkpoint(tmp_path / "doctored.pt", "pretrain")


@pytest.mark.parametrize("width_mult, needle", [(float("inf"), "cannot convert float infinity to integer"),
                                                (-1.0, "Error.* ...")])
def test_a_checkpoint_whose_arch_builds_no_such_model_is_one_short_error(tmp_path, width_mult, needle):
    """An infinite width was torchvision's OverflowError traceback; a negative one, torch's message naming every
    key of the state dict (25 KB on one line)."""
    save_checkpoint(model_from_config(SMALL["mobilenet"], 3), tmp_path / "model.pt", ["a", "b", "c"])
    ckpt = torch.load(tmp_path / "model.pt", weights_only=True)
    ckpt["arch"]["width_mult"] = width_mult
    torch.save(ckpt, tmp_path / "doctored.pt")
    with pytest.raises(TransferkitError, match=rf"does not fit its own architecture .*\({needle}\): it was altered"
                                               rf" after a stage wrote it\. Fix: ") as e:
        load_checkpoint(tmp_path / "doctored.pt", "pretrain")
    assert len(str(e.value)) < 1000 and "\n" not in str(e.value), str(e.value)


def test_widths_that_leave_nothing_of_a_32x32_image_are_one_error():
    with pytest.raises(TransferkitError, match=r"model \(model 'fastnet', .*\) does not fit 32x32 images: .*Fix: give "
                                               r"it fewer downsampling stages"):
        build_model("fastnet", 3, widths=[8, 8, 8, 8, 8], stem_width=8)


def test_load_backbone_refuses_a_truncated_probe(tmp_path):
    model = build_model("fastnet", 3, widths=[8, 16, 16], stem_width=8, depth=2)
    save_checkpoint(model, tmp_path / "probe.pt", ["a", "b", "c"])
    with pytest.raises(TransferkitError, match="architecture"):
        load_backbone(tmp_path / "probe.pt", SMALL["fastnet"], 3, "probe")


def _pruned_checkpoint(path: Path) -> BlockNet:
    """A small fastnet with half its channels cut, saved to `path` as the prune stage saves one."""
    from transferkit.prune.structured import prune_channels

    model = model_from_config(SMALL["fastnet"], 3).eval()
    prune_channels(model, criterion="l2", target="channels", ratio=0.5, keep=["head"])
    model.arch["pruned"] = True
    save_checkpoint(model, path, ["a", "b", "c"])
    return model


def test_load_backbone_refuses_a_pruned_model(tmp_path):
    """A pruned model's arch records the widths it had before the cut: as a backbone (distill.student_init)
    it would train a narrower network than the config and the report say."""
    from transferkit.prune.structured import conv_widths

    model = _pruned_checkpoint(tmp_path / "pruned.pt")
    assert conv_widths(load_checkpoint(tmp_path / "pruned.pt", "prune")[0]) == conv_widths(model)
    with pytest.raises(TransferkitError, match=r"another architecture than model asks for \(its layers pruned\)\. Fix: "
                                               r"rerun 'pretrain'"):
        load_backbone(tmp_path / "pruned.pt", SMALL["fastnet"], 3, "pretrain")


def test_non_checkpoint_files_give_clear_errors(tmp_path):
    whole, junk = tmp_path / "whole.pt", tmp_path / "junk.pt"  # a copy cut short
    save_checkpoint(model_from_config(SMALL["fastnet"], 3), whole, ["a", "b", "c"])
    junk.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(TransferkitError) as e:
        load_checkpoint(junk, "pretrain")
    assert str(junk) in str(e.value) and "unreadable" in str(e.value)

    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(TransferkitError, match="not a transferkit checkpoint"):
        load_checkpoint(foreign, "pretrain")

    with pytest.raises(TransferkitError, match="not found.*run the 'pretrain' stage"):
        load_checkpoint(tmp_path / "absent.pt", "pretrain")

    saved = torch.load(whole, weights_only=True)
    edited = tmp_path / "edited.pt"
    torch.save({k: v for k, v in saved.items() if k != "classes"}, edited)  # no class names
    with pytest.raises(TransferkitError, match="not a transferkit checkpoint.*'classes'"):
        load_checkpoint(edited, "pretrain")
    one_class = tmp_path / "one_class.pt"  # a whole model of one class: no classifier, as prepare refuses one
    save_checkpoint(model_from_config(SMALL["fastnet"], 1), one_class, ["a"])
    with pytest.raises(TransferkitError, match="not a transferkit checkpoint.*two or more distinct names"):
        load_checkpoint(one_class, "pretrain")
    torch.save({**saved, "state_dict": dict(list(saved["state_dict"].items())[1:])}, edited)  # a tensor gone
    with pytest.raises(TransferkitError, match=r"does not fit its own architecture .*Missing key.* altered after "
                                                r"a stage wrote it\. Fix: write it again \(`dvc repro pretrain`\)"):
        load_checkpoint(edited, "pretrain")


def test_truncated_checkpoint_says_rerun_the_stage(tmp_path):
    path = tmp_path / "model.pt"
    save_checkpoint(model_from_config(SMALL["fastnet"], 5), path, list("abcde"))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(TransferkitError) as e:
        load_checkpoint(path, "transfer")
    msg = str(e.value)
    assert str(path) in msg and "rerun the 'transfer' stage" in msg and "dvc repro -s -f transfer" in msg


# ------------------------------------------------------------------ ImageNet weights, offline
def _fake_imagenet_cache(tmp_path: Path, monkeypatch) -> dict:
    from torchvision.models import ResNet18_Weights, resnet18

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    torch.manual_seed(123)
    state = resnet18().state_dict()  # random init, but a real ResNet-18 (1000 classes) state dict
    fname = ResNet18_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1]
    target = tmp_path / "torch" / "hub" / "checkpoints" / fname
    target.parent.mkdir(parents=True)
    torch.save(state, target)
    return state


def test_resnet18_imagenet_weights_from_local_cache(tmp_path, monkeypatch):
    state = _fake_imagenet_cache(tmp_path, monkeypatch)
    model = build_model("resnet18", 5, weights="IMAGENET1K_V1").eval()
    stem_conv = model.blocks[0][0]
    assert stem_conv.kernel_size == (7, 7) and stem_conv.stride == (1, 1)  # 7x7 kernel kept, stride 1
    assert torch.equal(stem_conv.weight, state["conv1.weight"])
    assert torch.equal(model.blocks[4][1].conv2.weight, state["layer4.1.conv2.weight"])
    assert torch.equal(model.blocks[0][1].running_mean, state["bn1.running_mean"])
    assert model.arch["weights"] == "IMAGENET1K_V1"
    with torch.no_grad():
        assert model(_x(2)).shape == (2, 5)


class _RunsCode:
    """A pickle that calls os.mkdir when unpickled: what a planted weights file would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_resnet18_imagenet_file_is_read_as_data_never_code(tmp_path, monkeypatch):
    """The message for missing weights asks users to copy the file into the hub cache, and torch.hub
    checks no hash of a cached file: reading it must never run code."""
    from torchvision.models import ResNet18_Weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    target = tmp_path / "torch" / "hub" / "checkpoints" / ResNet18_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1]
    target.parent.mkdir(parents=True)
    torch.save({"conv1.weight": _RunsCode(tmp_path / "ran")}, target)
    with pytest.raises(TransferkitError, match="could not load ResNet-18 IMAGENET1K_V1 weights"):
        build_model("resnet18", 5, weights="IMAGENET1K_V1")
    assert not (tmp_path / "ran").exists()


def test_resnet18_unknown_weights_name(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(TransferkitError, match="unknown ResNet-18 weights 'IMAGENET9K'.*IMAGENET1K_V1"):
        build_model("resnet18", 5, weights="IMAGENET9K")


def test_resnet18_weights_missing_offline_is_explained(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    with pytest.raises(TransferkitError) as e:
        build_model("resnet18", 5, weights="IMAGENET1K_V1")
    msg = str(e.value)
    assert "resnet18-f37072fd.pth" in msg and "TORCH_HOME" in msg and "model.weights=null" in msg


def test_imagenet_initialised_checkpoint_loads_without_imagenet_file(tmp_path, monkeypatch):
    _fake_imagenet_cache(tmp_path, monkeypatch)
    model = build_model("resnet18", 5, weights="IMAGENET1K_V1").eval()
    save_checkpoint(model, tmp_path / "model.pt", list("abcde"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "other-machine"))  # no hub cache here
    loaded, _ = load_checkpoint(tmp_path / "model.pt", "pretrain")
    with torch.no_grad():
        assert torch.equal(loaded.eval()(_x(2)), model(_x(2)))


def test_unknown_architecture_and_bad_settings():
    with pytest.raises(TransferkitError, match="unknown model.name 'vgg'"):
        build_model("vgg", 5)
    with pytest.raises(TransferkitError, match=r"bad settings for model \(model 'fastnet'\).*conf/model/fastnet.yaml"):
        build_model("fastnet", 5, widths=[8], depthh=3)
    with pytest.raises(TransferkitError, match=r"bad settings for distill.student \(model 'fastnet'\).*give "
                                               r"distill.student only the keys"):
        build_model("fastnet", 5, widths=[8], width_mult=0.5, key="distill.student")
    # another architecture by its name alone keeps the other's keys, which `~key` cannot delete: the group can
    with pytest.raises(TransferkitError, match=r"unexpected keyword argument 'widths'.* \(to change the architecture, "
                                               r"choose it whole: model@distill.student=mobilenet\)\.$"):
        build_model("mobilenet", 5, widths=[8], key="distill.student")


# ------------------------------------------------------------------ cost
def test_count_macs_of_a_single_conv_by_hand():
    conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False))
    assert count_params(conv) == 8 * 3 * 3 * 3
    assert count_macs(conv) == 8 * 3 * 9 * 32 * 32  # C_out * C_in * k*k * H_out * W_out
    assert count_macs(conv, input_size=16) == 8 * 3 * 9 * 16 * 16
    strided = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=True))
    assert count_params(strided) == 8 * 27 + 8
    assert count_macs(strided) == 8 * 27 * 16 * 16


def test_count_macs_conv_plus_linear():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(8, 5, bias=False))
    assert count_params(net) == 216 + 40
    assert count_macs(net) == 216 * 32 * 32 + 40


def test_count_params_counts_frozen_parameters_too():
    """A model's size is every parameter it holds: a probe's frozen backbone counts, not its trainable head alone."""
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(8, 5, bias=False))
    net[0].requires_grad_(False)
    assert count_params(net) == 216 + 40


def test_resnet18_cost_is_plausible():
    model = build_model("resnet18", 5)
    # CIFAR ResNet-18 (3x3 stride-1 stem): ~11.17M parameters and ~0.56 GMACs at 32x32
    assert count_params(model) == 11_173_962 - 5 * 513
    assert 0.50e9 < count_macs(model) < 0.60e9
    tiny = model_from_config(SMALL["fastnet"], 5)
    assert 0 < count_macs(tiny) < count_macs(model) / 100


def test_loading_a_model_file_does_not_import_torchvision():
    # torchvision's import brings torch._dynamo with it (seconds): `transferkit predict model.pt`, export and
    # evaluate build fastnet and vgg_mini without it; resnet18 and mobilenet import it when built
    code = ("import sys\nimport transferkit.deploy.predict, transferkit.models as m\n"
            "m.build_model('fastnet', 3, widths=[4, 8, 8], stem_width=4)\n"
            "assert 'torchvision' not in sys.modules, 'imported torchvision'\n"
            "m.build_model('mobilenet', 3)\nassert 'torchvision' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("per_class", [10, 2_500, 5_000])
def test_the_whitening_subset_takes_images_of_every_class(monkeypatch, per_class):
    """Prepared tasks are sorted by class: a stride rounded down took the first 5,000 of 7,500 images,
    two classes of three."""
    import transferkit.models as models

    seen = []
    monkeypatch.setattr(models, "whiten_stem", lambda conv, x: seen.append(x))
    images = torch.arange(3, dtype=torch.uint8).repeat_interleave(per_class).mul(100)[:, None, None, None]
    models.init_from_data(build_model("fastnet", 3, widths=[8, 16, 16], stem_width=8), images.expand(-1, 3, 32, 32))
    assert len(seen[0]) <= 5_000 and len(seen[0][:, 0, 0, 0].unique()) == 3


def test_the_whitening_stem_takes_the_strongest_directions_first_and_their_negatives():
    """fastnet's stem after init_from_data: on the 0..1 images it normalises, each filter's response has unit
    variance (whitened), a narrow stem keeps the highest-variance directions (the smallest filters, scaled by
    1/sqrt(eigenvalue)), the second half are the first half's negatives, and no filter has an offset."""
    from transferkit.models import build_model, init_from_data

    torch.manual_seed(0)
    base = torch.rand(64, 1, 16, 16)  # channels that share most of their variance: eigenvalues far apart
    images = ((0.8 * base + 0.2 * torch.rand(64, 3, 16, 16)) * 255).to(torch.uint8)
    model = build_model("fastnet", 3, widths=[8, 8, 8], stem_width=24)
    assert init_from_data(model, images)
    conv = model.blocks[0][0]
    w = conv.weight.detach()
    assert torch.equal(w[12:], -w[:12])
    assert torch.equal(conv.bias, torch.zeros_like(conv.bias))  # centred patches: no offset to start from
    norms = w[:12].flatten(1).norm(dim=1)
    assert bool((norms[1:] >= norms[:-1] - 1e-6).all())  # strongest direction first
    x = model.normalize(images.float() / 255)
    out = torch.nn.functional.conv2d(x, w[:12])  # no bias: centred below
    var = out.transpose(0, 1).flatten(1).var(dim=1)
    assert var[0] == pytest.approx(1.0, rel=0.1)  # whitened: the strongest direction at unit variance
