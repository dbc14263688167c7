"""Reference autoencoders with known answers, to check an audit (and medlatent) end to end.

`reference:identity` is lossless: its latent is the image rearranged by pixel unshuffle (4 x 4
pixel blocks become channels) and its reconstruction is the image itself, bit for bit; a fidelity
gap must be exactly 0. `reference:blur` first replaces each 8 x 8 block by its mean (a box blur):
details smaller than a block, such as a small lesion, are lost, so a fidelity gap must appear.
Grayscale by default; `reference:identity:3` for RGB. Inputs in [0, 1], no weights.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F

from ..errors import MedlatentInputError
from .base import Autoencoder
from .registry import register_family

KINDS = ("identity", "blur")


class ReferenceAutoencoder(Autoencoder):
    input_range = (0.0, 1.0)  # no rescaling: the identity is exact in floating point

    def __init__(self, kind: str, image_channels: int = 1, factor: int | None = None):
        super().__init__()
        if kind not in KINDS:
            raise MedlatentInputError(
                f"--autoencoder reference:{kind}: use one of {', '.join(f'reference:{k}' for k in KINDS)}"
            )
        factor = factor or (8 if kind == "blur" else 4)  # blur: 8 x 8 blocks, far larger than a small lesion
        self.kind, self.image_channels, self.downsampling_factor = kind, image_channels, factor
        self.latent_channels = image_channels * factor * factor
        self.spec = f"reference:{kind}" + (f":{image_channels}" if image_channels != 1 else "")

    def encode_raw(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "blur":
            x = F.interpolate(
                F.avg_pool2d(x, self.downsampling_factor), scale_factor=self.downsampling_factor, mode="nearest"
            )
        return F.pixel_unshuffle(x, self.downsampling_factor)

    def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(z, self.downsampling_factor)

    @property
    def content_hash(self) -> str:
        return "sha256:" + hashlib.sha256(f"{self.spec}/f{self.downsampling_factor}".encode()).hexdigest()


@register_family("reference", "reference:identity|blur[:CHANNELS], controls with known answers")
def load_reference(target: str, spec: str, *, device: str, progress: bool, encoder_only: bool) -> ReferenceAutoencoder:
    name, _, channels = target.partition(":")
    if channels and not channels.isdigit():
        raise MedlatentInputError(f"--autoencoder {spec!r}: expected reference:NAME[:CHANNELS]")
    return ReferenceAutoencoder(name, int(channels or 1))
