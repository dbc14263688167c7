"""timm backbones by name, with input channels adapted and, for latents, a stem that keeps
small inputs: an 8x8 latent through a stride-4 stem (and more) would collapse to nothing.
`mlp` is the head for pooled (1x1) latents, where a convolutional network has nothing to do."""

from __future__ import annotations

import timm
from torch import nn

from ..errors import MedlatentInputError

BACKBONES = ("resnet10t", "resnet18", "resnet50", "convnext_atto", "convnext_tiny", "mlp")


class MLPBackbone(nn.Module):
    """Global average pool, two hidden layers, a linear head: for pooled (1x1) latent vectors.
    The hidden layers are `stages` in timm's `feature_info` form, so noise conditioning puts a FiLM
    layer after each, as it does after a ResNet's stages."""

    def __init__(self, in_chans: int, num_classes: int, hidden: tuple[int, ...] = (512, 256), drop: float = 0.1):
        super().__init__()
        self.stem = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        widths = (in_chans, *hidden)
        self.stages = nn.Sequential(
            *(
                nn.Sequential(nn.Linear(a, b), nn.LayerNorm(b), nn.GELU(), nn.Dropout(drop))
                for a, b in zip(widths, widths[1:], strict=False)
            )
        )
        self.head = nn.Linear(widths[-1], num_classes)
        self.feature_info = [{"module": f"stages.{i}", "num_chs": b} for i, b in enumerate(hidden)]

    def forward_head(self, h):
        return self.head(h)

    def forward(self, x):
        return self.head(self.stages(self.stem(x)))


def create_backbone(
    name: str, in_chans: int, num_classes: int, pretrained: bool = False, latent_stem: bool = False, **kwargs
) -> nn.Module:
    """`latent_stem=True` replaces the downsampling stem by a stride-1 3x3 convolution."""
    if name == "mlp":
        return MLPBackbone(in_chans, num_classes)
    if name not in timm.list_models() and name not in timm.list_models(pretrained=True):
        raise MedlatentInputError(f"--backbone {name!r} is not a timm model; try one of {', '.join(BACKBONES)}")
    try:
        model = timm.create_model(name, pretrained=pretrained, in_chans=in_chans, num_classes=num_classes, **kwargs)
    except Exception as err:  # noqa: BLE001 - offline pretrained download is the usual cause
        raise MedlatentInputError(
            f"--backbone {name}: could not create it{' with pretrained weights' if pretrained else ''} "
            f"({type(err).__name__}); without network access use --no-pretrained"
        ) from err
    if latent_stem:
        replace_stem(model, name, in_chans)
    return model


def replace_stem(model: nn.Module, name: str, in_chans: int) -> None:
    if hasattr(model, "conv1") and hasattr(model, "maxpool"):  # ResNet family (incl. deep stems)
        first = model.conv1 if isinstance(model.conv1, nn.Conv2d) else model.conv1[0]
        out = model.bn1.num_features if isinstance(model.conv1, nn.Conv2d) else model.conv1[-1].out_channels
        model.conv1 = nn.Conv2d(in_chans, out, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
        del first
        return
    if hasattr(model, "stem") and hasattr(model, "stages") and isinstance(model.stem[0], nn.Conv2d):  # ConvNeXt
        dims = model.stem[0].out_channels
        model.stem[0] = nn.Conv2d(in_chans, dims, 3, stride=1, padding=1)
        return
    raise MedlatentInputError(
        f"--backbone {name}: no latent stem is defined for this family; use a resnet or convnext backbone"
    )
