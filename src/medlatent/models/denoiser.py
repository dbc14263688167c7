"""The class-conditional latent denoiser: a diffusers `UNet2DModel` in EDM's preconditioning.

    D(x; sigma, y) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma), y)     (EDM Eq. 7)

with c_skip = sigma_data^2 / (sigma^2 + sigma_data^2), c_out = sigma sigma_data / sqrt(sigma^2 +
sigma_data^2), c_in = 1 / sqrt(sigma^2 + sigma_data^2), c_noise = ln(sigma) / 4 (Table 1).
Classes are embedded by the UNet's own class embedding (`num_class_embeds`), with one extra "null"
class (index `num_classes`) for classifier-free guidance: without `num_class_embeds` diffusers'
UNet2DModel would silently ignore the labels.

Saved and loaded with huggingface_hub's `save_pretrained` / `from_pretrained`.
"""

from __future__ import annotations

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from ..diffusion.noise import c_in, c_noise

PRESETS = {  # block_out_channels, layers_per_block
    "tiny": ((32, 64), 1),  # tests and CPU
    "small": ((64, 128, 128), 1),
    "base": ((128, 256, 256), 2),  # GPU
}
NOISE_INPUT_SCALE = 1000.0  # diffusers' positional embedding expects timestep-scale inputs (cf. EDM's VP c_noise = 999 t)


def c_skip(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """EDM Table 1: c_skip = sigma_data^2 / (sigma^2 + sigma_data^2)."""
    return sigma_data**2 / (sigma**2 + sigma_data**2)


def c_out(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """EDM Table 1: c_out = sigma * sigma_data / sqrt(sigma^2 + sigma_data^2)."""
    return sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()


class Denoiser(nn.Module, PyTorchModelHubMixin):
    """`denoiser(x, sigma, labels)` -> D(x; sigma, y); labels = `num_classes` is the null class."""

    def __init__(self, latent_channels: int = 4, latent_size: int = 16, num_classes: int = 2, preset: str = "tiny", sigma_data: float = 0.5):
        super().__init__()
        from diffusers import UNet2DModel

        if preset not in PRESETS:
            raise ValueError(f"preset {preset!r}: use one of {', '.join(PRESETS)}")
        channels, layers = PRESETS[preset]
        self.num_classes, self.sigma_data, self.latent_channels, self.latent_size = num_classes, sigma_data, latent_channels, latent_size
        self.unet = UNet2DModel(
            sample_size=latent_size, in_channels=latent_channels, out_channels=latent_channels, block_out_channels=channels, layers_per_block=layers,
            down_block_types=("DownBlock2D",) * len(channels), up_block_types=("UpBlock2D",) * len(channels), norm_num_groups=min(32, channels[0]),
            num_class_embeds=num_classes + 1, add_attention=False,
        )  # fmt: skip

    @property
    def null_class(self) -> int:
        return self.num_classes

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, labels: torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32).expand(x.shape[0])
        b = lambda v: v.view(-1, 1, 1, 1).to(x.dtype)  # noqa: E731 - per-sample scalars over (C, H, W)
        F = self.unet(b(c_in(sigma, self.sigma_data)) * x, NOISE_INPUT_SCALE * c_noise(sigma), class_labels=labels).sample  # noqa: N806 - F as in the paper
        return b(c_skip(sigma, self.sigma_data)) * x + b(c_out(sigma, self.sigma_data)) * F.to(x.dtype)
