"""The autoencoder interface every family implements.

`encode` takes images in [0, 1] with the autoencoder's own channel count and a size that is a
multiple of `downsampling_factor`, and returns *normalised* latents (scaling and shift applied),
deterministically (posterior mode). `decode` inverts that and returns images in [0, 1].
`prepare` and `restore` adapt a dataset's images (channels, size) at the boundary.

Encoder-only latent spaces (`has_decoder = False`: timm backbones, `encoder:SPEC`) implement
`encode` alone; `decode` then stops with a clear error, and audits drop what needs decoding.

The decoder is also a sequence of named stages (`decoder_stages`), from the normalised latent
("latent") to the unclamped reconstruction in [0, 1] ("reconstruction"), with the family's own
intermediate feature maps between them; `decode_to` computes the features after any stage, so one
can measure where along the decoder information becomes easy to read. A family splits its decoder
by overriding `decoder_steps`; the default is one step, `decode_raw`.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise

import torch
from torch import nn

from ..data.base import resize
from ..errors import MedlatentInputError


class Autoencoder(nn.Module):
    spec: str = ""
    latent_channels: int = 4
    downsampling_factor: int = 8
    image_channels: int = 3
    input_range: tuple[float, float] = (-1.0, 1.0)  # what the wrapped network expects
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    size_multiple: int | None = None  # input sizes must be multiples of this (default: the downsampling factor)
    has_decoder: bool = True  # False: an encoder-only latent space (no reconstructions, no decoding)

    def encode_raw(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def content_hash(self) -> str:
        raise NotImplementedError

    def _to_input_range(self, images: torch.Tensor) -> torch.Tensor:
        lo, hi = self.input_range
        return images * (hi - lo) + lo

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self.check_size(images.shape[-1], images.shape[-2])
        z = self.encode_raw(self._to_input_range(images))
        return (z - self.shift_factor) * self.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if not self.has_decoder:
            raise MedlatentInputError(
                f"--autoencoder {self.spec}: an encoder-only latent space has no "
                "decoder, and this needs decoding; use an autoencoder with a decoder"
            )
        x = self.decode_raw(latents / self.scaling_factor + self.shift_factor)
        lo, hi = self.input_range
        return ((x - lo) / (hi - lo)).clamp(0.0, 1.0)

    def decoder_steps(self) -> list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]]:
        """The decoder as named steps, each mapping the previous step's output onward, the first from
        raw (un-normalised) latents; run in order they must give `decode_raw`. The last step is named
        "reconstruction". Families whose decoder has natural intermediate feature maps override this."""
        return [("reconstruction", self.decode_raw)]

    def decoder_stages(self) -> list[str]:
        """Stage names in decoding order: "latent" (what `encode` returns), the family's intermediate
        stages, then "reconstruction"; only "latent" for an encoder-only latent space."""
        if not self.has_decoder:
            return ["latent"]
        return ["latent", *(name for name, _ in self.decoder_steps())]

    def stage_index(self, stage: int | str) -> int:
        """A stage by name or index (negative counts from the end) -> its index in `decoder_stages`."""
        stages = self.decoder_stages()
        if isinstance(stage, str) and stage in stages:
            return stages.index(stage)
        if isinstance(stage, int) and not isinstance(stage, bool) and -len(stages) <= stage < len(stages):
            return stage % len(stages)
        if not self.has_decoder:
            raise MedlatentInputError(
                f"--autoencoder {self.spec}: an encoder-only latent space has only the stage 'latent', "
                f"not {stage!r}; use an autoencoder with a decoder for later decoder stages"
            )
        raise MedlatentInputError(
            f"--autoencoder {self.spec}: {stage!r} is not a decoder stage; use one of "
            f"{', '.join(stages)} (or an index from 0 to {len(stages) - 1})"
        )

    def decode_to(self, latents: torch.Tensor, stage: int | str) -> torch.Tensor:
        """The features after `stage` (a name or index of `decoder_stages`) from normalised latents:
        the latents themselves at stage 0, and at the last stage `decode`'s images before clamping
        (so `decode_to(z, -1).clamp(0, 1)` equals `decode(z)`)."""
        index = self.stage_index(stage)
        if index == 0:
            return latents
        steps = self.decoder_steps()
        x = latents / self.scaling_factor + self.shift_factor
        for _, step in steps[:index]:
            x = step(x)
        if index == len(steps):
            lo, hi = self.input_range
            x = (x - lo) / (hi - lo)
        return x

    def stage_flops(self, latent_shape: tuple, stage: int | str) -> int:
        """FLOPs (as torch's FlopCounterMode counts them: matmuls and convolutions) of the decoder up
        to `stage` for one latent of shape (C, h, w); 0 at stage 0."""
        from torch.utils.flop_counter import FlopCounterMode

        if self.stage_index(stage) == 0:
            return 0
        weight = next(self.parameters(), None)
        kwargs = {"device": weight.device, "dtype": weight.dtype} if weight is not None else {}
        latents = torch.zeros(1, *latent_shape, **kwargs)
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            self.decode_to(latents, stage)
        return int(counter.get_total_flops())

    def check_size(self, width: int, height: int) -> None:
        f = self.size_multiple or self.downsampling_factor
        if width % f or height % f:
            raise MedlatentInputError(
                f"image size {width}x{height} is not a multiple of {f}, "
                f"as {self.spec} needs; choose --size as a multiple of {f}"
            )

    def working_size(self, size: int) -> int:
        """The nearest multiple of the downsampling factor at or above `size`."""
        f = self.size_multiple or self.downsampling_factor
        return -(-size // f) * f

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Dataset images (n, C, S, S) in [0, 1] -> this autoencoder's channels and a valid size."""
        if images.shape[1] != self.image_channels:
            images = images.expand(-1, 3, -1, -1) if self.image_channels == 3 else to_grayscale(images)
        f = self.size_multiple or self.downsampling_factor
        if images.shape[-1] < f:
            raise MedlatentInputError(
                f"--size {images.shape[-1]} is smaller than {f}, the "
                f"smallest input {self.spec} can take; use --size {f} or more"
            )
        size = self.working_size(images.shape[-1])
        return resize(images, size) if size != images.shape[-1] else images

    def restore(self, images: torch.Tensor, channels: int, size: int) -> torch.Tensor:
        """Decoded images -> the dataset's channels and working size."""
        if images.shape[1] != channels:
            images = to_grayscale(images) if channels == 1 else images.expand(-1, 3, -1, -1)
        return resize(images, size) if images.shape[-1] != size else images

    def describe(self) -> dict:
        return {
            "spec": self.spec,
            "class": type(self).__name__,
            "latent_channels": self.latent_channels,
            "downsampling_factor": self.downsampling_factor,
            "image_channels": self.image_channels,
            "input_range": list(self.input_range),
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
            "content_hash": self.content_hash,
            "has_decoder": self.has_decoder,
            "parameters": sum(p.numel() for p in self.parameters()),
        }


class PretrainedEncoder(Autoencoder):
    """An encoder-only network with its own preprocessing (timm, transformers): images are resized
    to its input size and normalised with its mean and std; `features` maps them to (B, C, h, w),
    whose shape one forward pass at construction finds."""

    has_decoder = False
    input_range = (0.0, 1.0)
    size_multiple = 1

    def set_preprocessing(self, channels: int, input_size: int, mean, std) -> None:
        """Called by a subclass once its network is built."""
        self.image_channels, self.input_size = int(channels), int(input_size)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        with torch.no_grad():
            probe = self.encode_raw(torch.zeros(1, self.image_channels, self.input_size, self.input_size))
        self.latent_channels, self.latent_size = int(probe.shape[1]), int(probe.shape[-1])
        self.downsampling_factor = max(1, self.input_size // self.latent_size)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def working_size(self, size: int) -> int:
        return self.input_size  # the model's own input size, whatever the dataset's

    def encode_raw(self, x: torch.Tensor) -> torch.Tensor:
        return self.features((x - self.mean.to(x.dtype)) / self.std.to(x.dtype))

    def describe(self) -> dict:
        return {**super().describe(), "input_size": self.input_size}


def upsampling_steps(layers: nn.Sequential) -> list[tuple[str, nn.Sequential]]:
    """A plain Sequential decoder (TAESD, diffusers' AutoencoderTiny) cut before each `nn.Upsample`
    and before its final module: "blocks" (everything before the first upsampling), "up1", "up2", ...
    (each upsampling with the convs and blocks after it), and "reconstruction" (the final conv). The
    cuts come from the module types, so any number of stages and blocks per stage works."""
    cuts = [i for i, module in enumerate(layers) if isinstance(module, nn.Upsample)] + [len(layers) - 1]
    names = ["blocks", *(f"up{i}" for i in range(1, len(cuts))), "reconstruction"]
    bounds = [0, *cuts, len(layers)]
    return [(name, layers[start:end]) for name, (start, end) in zip(names, pairwise(bounds), strict=True)]


def to_grayscale(images: torch.Tensor) -> torch.Tensor:
    # The mean, not luminance weights: the inverse of repeating one channel three times.
    return images.mean(dim=1, keepdim=True)
