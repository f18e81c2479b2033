"""Inference runs in channels_last (transferkit/layout.py): same logits as the default layout,
and the model comes back unchanged, in the default layout and still trainable."""

from __future__ import annotations

import pytest
import torch

from test_models import SMALL, _warm_bn
from transferkit.evaluation import speed
from transferkit.evaluation.metrics import predict
from transferkit.layout import all_channels_last, channels_last, to_nhwc
from transferkit.models import build_model


def _model(name: str) -> torch.nn.Module:
    cfg = dict(SMALL[name])
    torch.manual_seed(0)
    model = build_model(cfg.pop("name"), 5, **cfg)
    _warm_bn(model)
    return model


def _images(n: int = 37) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))


def _default_layout(model: torch.nn.Module) -> bool:
    return all(p.is_contiguous() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(SMALL))
@pytest.mark.parametrize("tta", ["none", "flip"])
def test_predict_matches_the_default_layout(name, tta):
    model = _model(name).eval()
    images = _images()
    x = images.float() / 255
    with torch.no_grad():
        want = model(x)
        if tta == "flip":
            want = (want + model(x.flip(-1))) / 2
    got = predict(model, images, batch_size=16, tta=tta)  # 3 batches, the last one short
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert (got.argmax(1) == want.argmax(1)).all()


def test_predict_scores_a_model_left_in_training_mode_as_in_eval_mode():
    """A model handed over in training mode (as a stage's trainer leaves it) is scored with its BatchNorm running
    statistics and no dropout, not with each batch's own statistics: the logits do not depend on the batching."""
    model = _model("fastnet")
    images = _images(8)
    with torch.no_grad():
        want = model.eval()(images.float() / 255)
    model.train()
    torch.testing.assert_close(predict(model, images, batch_size=3), want, rtol=1e-4, atol=1e-5)
    assert not model.training  # left in eval mode, as predict puts it


def test_flip_translate_tta_averages_airbenchs_six_views():
    import torch.nn.functional as F

    model = _model("fastnet").eval()
    images = _images(8)
    x = images.float() / 255
    with torch.no_grad():
        def mirror(v):
            return 0.5 * model(v) + 0.5 * model(v.flip(-1))

        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        want = 0.5 * mirror(x) + 0.5 * (mirror(padded[..., :32, :32]) + mirror(padded[..., 2:, 2:])) / 2
    torch.testing.assert_close(predict(model, images, batch_size=4, tta="flip_translate"), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tta", ["flip", "flip_translate"])
def test_each_test_time_view_counts_with_its_own_weight(tta):
    """A model that sees every pixel (a linear layer on the flattened image) scores each view differently (the
    small networks above barely tell a one-pixel shift apart): flip is the mean of the image's and its mirror's
    logits; flip_translate half that pair's mean and a quarter of each pair shifted one pixel up-left and
    down-right."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 5)).eval()
    images = _images(8)
    x = images.float() / 255
    with torch.no_grad():
        def mirror(v):
            return (model(v) + model(v.flip(-1))) / 2

        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        pairs = [mirror(x), mirror(padded[..., :32, :32]), mirror(padded[..., 2:, 2:])]
        assert min((a - b).abs().max() for a, b in ((pairs[0], model(x)), (pairs[0], pairs[1]),
                                                   (pairs[0], pairs[2]), (pairs[1], pairs[2]))) > 1e-2
        want = pairs[0] if tta == "flip" else 0.5 * pairs[0] + 0.25 * pairs[1] + 0.25 * pairs[2]
    torch.testing.assert_close(predict(model, images, batch_size=4, tta=tta), want, rtol=1e-4, atol=1e-5)


def test_model_comes_back_in_the_default_layout_and_trainable():
    model = _model("fastnet")
    conv = model.blocks[1][0][0].weight
    assert conv.dim() == 4 and conv.is_contiguous()
    seen = []  # each inference call's weights and input: channels_last while it runs
    model.blocks[1].register_forward_pre_hook(lambda module, args: seen.append(
        conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
        and args[0].is_contiguous(memory_format=torch.channels_last)))
    inputs = []  # the images as the model itself receives them, not only as its first convolution hands them on
    model.register_forward_pre_hook(lambda module, args: inputs.append(
        args[0].is_contiguous(memory_format=torch.channels_last) and not args[0].is_contiguous()))
    predict(model, _images(8), batch_size=4, tta="flip_translate")
    speed.cpu_throughput({"a": model}, batch=4, repeats=1)
    speed.cpu_latency_ms({"a": model}, repeats=2)
    assert len(seen) > 20 and all(seen)
    assert len(inputs) == len(seen) and all(inputs)
    assert _default_layout(model)
    assert not any(p.is_inference() for p in model.parameters())
    # a model predicted on can be trained again (the training stages predict, then may go on)
    model.train()
    model(torch.rand(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_inside_the_block_the_weights_are_channels_last():
    model = _model("fastnet")
    conv = model.blocks[1][0][0].weight
    with channels_last(model):
        assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert conv.is_contiguous()


def test_layout_is_restored_when_the_block_raises():
    model = _model("fastnet")
    with pytest.raises(RuntimeError, match="boom"):
        with channels_last(model):
            raise RuntimeError("boom")
    assert _default_layout(model)


def test_every_model_timed_together_runs_in_channels_last_and_comes_back():
    """speed times several models in one block (all_channels_last): each of them in channels_last while it runs,
    each back in the default layout afterwards."""
    models = [_model("fastnet") for _ in range(3)]
    convs = [model.blocks[1][0][0].weight for model in models]
    with all_channels_last(models):
        assert all(c.is_contiguous(memory_format=torch.channels_last) and not c.is_contiguous() for c in convs)
    assert all(_default_layout(model) for model in models)


def test_a_model_run_under_inference_mode_comes_back_trainable():
    """A caller may enter channels_last inside torch.inference_mode: the weights it converts, and converts back as
    the block ends there, stay ordinary tensors, so the model trains afterwards."""
    model = _model("fastnet").eval()
    with torch.inference_mode(), channels_last(model):
        model(to_nhwc(torch.rand(2, 3, 32, 32)))
    assert _default_layout(model)
    assert not any(p.is_inference() for p in model.parameters())
    model.train()
    model(torch.rand(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
