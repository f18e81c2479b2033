"""torchvision's ResNet-18 adapted to 32x32 inputs: stride-1 stem and no max pool, so the
last stage still sees 4x4 maps. ImageNet weights come through torchvision's weights API;
they keep the 7x7 stem kernel (weights and shapes must match) but at stride 1."""

from __future__ import annotations

from torch import nn

from transferkit.errors import TransferkitError


def resnet18_blocks(weights: str | None = None, load_weights: bool = True) -> list[nn.Module]:
    """Blocks: [stem, layer1, layer2, layer3, layer4]. load_weights=False builds the
    architecture `weights` implies (7x7 stem) without reading the file: for checkpoints."""
    from torchvision.models import ResNet18_Weights, resnet18  # here: importing torchvision takes seconds

    if weights:
        try:
            enum = ResNet18_Weights[weights]
        except KeyError:
            raise TransferkitError(f"unknown ResNet-18 weights '{weights}'. Fix: use one of "
                                   f"{[w.name for w in ResNet18_Weights]} or null.") from None
        net = resnet18(weights=None)  # 1000 classes, as the published file has
        try:
            if load_weights:  # weights_only: torch.hub unpickles without it, and checks no hash of a cached file
                net.load_state_dict(enum.get_state_dict(progress=False, check_hash=True, weights_only=True))
        except Exception as e:  # offline: URLError / socket errors from the hub download; a file that is no weights
            raise TransferkitError(
                f"could not load ResNet-18 {weights} weights ({type(e).__name__}: {e}). Fix: put the "
                f"published file {enum.url.rsplit('/', 1)[-1]} in $TORCH_HOME/hub/checkpoints/ (replacing a "
                f"copy there that cannot be read) or set model.weights=null.") from e
        net.conv1.stride = (1, 1)
    else:
        net = resnet18(weights=None)
        net.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
    stem = nn.Sequential(net.conv1, net.bn1, net.relu)  # no max pool at 32x32
    return [stem, net.layer1, net.layer2, net.layer3, net.layer4]


def resnet18_normalisation(weights: str) -> tuple[list[float], list[float]]:
    """The mean and std the published weights were trained with (their inputs' normalisation, not CIFAR's)."""
    from torchvision.models import ResNet18_Weights

    transforms = ResNet18_Weights[weights].transforms()
    return list(transforms.mean), list(transforms.std)
