"""The class-conditional latent denoiser: a diffusers `UNet2DModel` in EDM's preconditioning.

    D(x; sigma, y) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma), y)     (EDM Eq. 7)

with c_skip = sigma_data^2 / (sigma^2 + sigma_data^2), c_out = sigma sigma_data / sqrt(sigma^2 +
sigma_data^2), c_in = 1 / sqrt(sigma^2 + sigma_data^2), c_noise = ln(sigma) / 4 (Table 1).

The alternative, `parameterisation="eps"` or `"v"`, is DDPM's variance-preserving process on
diffusers' `DDPMScheduler` timesteps (x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps): the network
predicts eps or v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 from (x_t, t). The same D(x; sigma, y)
is exposed for it (EDM Table 1, VP column): x = x_t / sqrt(abar_t), sigma = sqrt((1 - abar_t) /
abar_t), D = x - sigma eps_hat; so every sampler and guidance serves both parameterisations.
Classes are embedded by the UNet's own class embedding (`num_class_embeds`), with one extra "null"
class (index `num_classes`) for classifier-free guidance: without `num_class_embeds` diffusers'
UNet2DModel would silently ignore the labels. A multi-label model (`multilabel=True`) conditions on
a label vector instead: a linear embedding of (y_1..y_K, null flag) added to the time embedding
(the UNet's `class_embed_type="identity"`); the null condition is the zero vector with the flag set.

Saved and loaded with huggingface_hub's `save_pretrained` / `from_pretrained`.
"""

from __future__ import annotations

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from ..config import PARAMETERISATIONS
from ..diffusion.noise import SIGMA_MAX, SIGMA_MIN, per_sample, precond, vp_alphas_cumprod

PRESETS = {  # block_out_channels, layers_per_block
    "tiny": ((32, 64), 1),  # tests and CPU
    "small": ((64, 128, 128), 1),
    "base": ((128, 256, 256), 2),  # GPU
}
NOISE_INPUT_SCALE = (
    1000.0  # diffusers' positional embedding expects timestep-scale inputs (cf. EDM's VP c_noise = 999 t)
)


def check_unet(config, latent_channels: int, num_classes: int, multilabel: bool) -> None:
    """A given UNet must map the latents to themselves and embed the classes (plus the null class):
    diffusers' UNet2DModel silently ignores class labels without a class embedding."""
    from ..errors import MedlatentInputError

    if config.in_channels != latent_channels or config.out_channels != latent_channels:
        raise MedlatentInputError(
            f"--preset: the UNet has {config.in_channels} input and "
            f"{config.out_channels} output channels; the latents have {latent_channels}"
        )
    if multilabel and config.class_embed_type != "identity":
        raise MedlatentInputError(
            "--preset: a multi-label model needs a UNet with "
            'class_embed_type="identity" (a label-vector embedding is added to it)'
        )
    if not multilabel and config.num_class_embeds != num_classes + 1:
        raise MedlatentInputError(
            f"--preset: the UNet has num_class_embeds={config.num_class_embeds}; this dataset needs "
            f"{num_classes + 1} ({num_classes} classes and the null class), or it would ignore the labels"
        )


class Denoiser(nn.Module, PyTorchModelHubMixin):
    """`denoiser(x, sigma, labels)` -> D(x; sigma, y); labels = `num_classes` is the null class."""

    def __init__(
        self,
        latent_channels: int = 4,
        latent_size: int = 16,
        num_classes: int = 2,
        preset: str = "tiny",
        sigma_data: float = 0.5,
        parameterisation: str = "edm",
        multilabel: bool = False,
        unet_config: dict | None = None,
    ):
        """unet_config: a diffusers `UNet2DModel` configuration to build instead of a preset (e.g.
        read from a UNet folder); saved with the model, so loading needs no folder."""
        super().__init__()
        from diffusers import UNet2DModel

        if preset not in PRESETS and unet_config is None:
            raise ValueError(f"preset {preset!r}: use one of {', '.join(PRESETS)}")
        if parameterisation not in PARAMETERISATIONS:
            raise ValueError(f"parameterisation {parameterisation!r}: use one of {', '.join(PARAMETERISATIONS)}")
        channels, layers = PRESETS.get(preset, PRESETS["tiny"])
        self.num_classes, self.sigma_data, self.latent_channels, self.latent_size = (
            num_classes,
            sigma_data,
            latent_channels,
            latent_size,
        )
        self.parameterisation, self.multilabel = parameterisation, multilabel
        if parameterisation != "edm":  # not saved: rebuilt from diffusers' scheduler
            abar = vp_alphas_cumprod()
            self.register_buffer("alphas_cumprod", abar, persistent=False)
            self.register_buffer("log_sigmas", ((1 - abar) / abar).sqrt().log(), persistent=False)
        if unet_config is not None:
            self.unet = UNet2DModel.from_config(unet_config)
            check_unet(self.unet.config, latent_channels, num_classes, multilabel)
            channels = self.unet.config.block_out_channels
        else:
            self.unet = UNet2DModel(
                sample_size=latent_size,
                in_channels=latent_channels,
                out_channels=latent_channels,
                block_out_channels=channels,
                layers_per_block=layers,
                down_block_types=("DownBlock2D",) * len(channels),
                up_block_types=("UpBlock2D",) * len(channels),
                norm_num_groups=min(32, channels[0]),
                num_class_embeds=None if multilabel else num_classes + 1,
                class_embed_type="identity" if multilabel else None,
                add_attention=False,
            )
        if multilabel:
            self.label_embedding = nn.Linear(num_classes + 1, channels[0] * 4)  # UNet2DModel's time embedding width

    @property
    def null_class(self) -> int:
        return self.num_classes

    def null_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """The unconditional (classifier-free guidance) labels of a batch."""
        if not self.multilabel:
            return torch.full_like(labels, self.null_class)
        null = torch.zeros(len(labels), self.num_classes + 1, device=labels.device, dtype=torch.float32)
        null[:, -1] = 1.0
        return null

    def drop_labels(self, labels: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
        """Labels with the rows in `dropped` (a boolean mask) replaced by the null condition."""
        labels = self.conditioning(labels)
        mask = dropped.view(-1, *([1] * (labels.ndim - 1)))
        return torch.where(mask, self.null_labels(labels), labels)

    def conditioning(self, labels: torch.Tensor) -> torch.Tensor:
        """Class indices, or label vectors (y_1..y_K) extended by a zero null flag."""
        if not self.multilabel:
            return labels.long()
        labels = labels.float()
        return (
            torch.cat([labels, labels.new_zeros(len(labels), 1)], 1) if labels.shape[1] == self.num_classes else labels
        )

    def _embed(self, labels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        labels = self.conditioning(labels)
        return (
            self.label_embedding(labels.to(self.label_embedding.weight.dtype)).to(dtype) if self.multilabel else labels
        )

    @property
    def sigma_range(self) -> tuple[float, float]:
        """The noise levels it was trained for: EDM's sampling range, or the VP timesteps' range."""
        if self.parameterisation == "edm":
            return SIGMA_MIN, SIGMA_MAX
        return float(self.log_sigmas[0].exp()), float(self.log_sigmas[-1].exp())

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The (fractional) VP timestep of a noise level, interpolating ln(sigma_t) over t."""
        log_sigma = sigma.log().clamp(self.log_sigmas[0], self.log_sigmas[-1])
        high = torch.searchsorted(self.log_sigmas, log_sigma).clamp(1, len(self.log_sigmas) - 1)
        lo, hi = self.log_sigmas[high - 1], self.log_sigmas[high]
        return (high - 1).float() + (log_sigma - lo) / (hi - lo)

    def forward(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor | float | None,
        labels: torch.Tensor,
        timesteps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """D(x; sigma, y); for a VP model trained on timesteps, `timesteps` instead of sigma returns
        the network's raw prediction (eps or v) at x = x_t."""
        labels = self._embed(labels, x.dtype)
        if timesteps is not None:
            return self.unet(x, timesteps, class_labels=labels).sample
        sigma = per_sample(sigma, x)
        b = lambda v: v.view(-1, 1, 1, 1).to(x.dtype)  # noqa: E731 - per-sample scalars over (C, H, W)
        if self.parameterisation != "edm":
            abar = 1 / (1 + sigma**2)
            x_t = b(abar.sqrt()) * x
            prediction = self.unet(x_t, self.timestep(sigma), class_labels=labels).sample.to(x.dtype)
            eps = (
                prediction
                if self.parameterisation == "eps"
                else b(abar.sqrt()) * prediction + b((1 - abar).sqrt()) * x_t
            )  # eps = sqrt(abar) v + sqrt(1 - abar) x_t
            return x - b(sigma) * eps
        c = precond(sigma, self.sigma_data)
        F = self.unet(b(c.c_in) * x, NOISE_INPUT_SCALE * c.c_noise, class_labels=labels).sample  # noqa: N806 - F as in the paper
        return b(c.c_skip) * x + b(c.c_out) * F.to(x.dtype)
