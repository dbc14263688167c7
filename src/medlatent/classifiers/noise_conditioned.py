"""A latent classifier modulated by the diffusion noise level.

The noise level enters as in EDM2: c_noise = ln(sigma) / 4, random Fourier features, a small MLP.
After every backbone stage a FiLM layer scales and shifts each channel,
h <- h * (1 + gamma(sigma)) + beta(sigma), with gamma and beta initialised to zero so that
training starts from the plain classifier (the output at initialisation equals the backbone's).

The noised input z + sigma * eps is first scaled by EDM's c_in (Table 1), times sigma_data, so the
backbone sees one input scale at every noise level (without it an input at sigma = 80 is 160 times
a clean one; BreastMNIST + TAEF2 noise-conditioned AUROC 0.69 without, 0.85 with).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..diffusion.noise import c_in, c_noise
from ..errors import MedlatentInputError


class FourierFeatures(nn.Module):
    """EDM2's MPFourier: cos(2 pi (f x + phi)) * sqrt(2) with fixed random f and phi."""

    def __init__(self, channels: int, bandwidth: float = 1.0):
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.randn(channels) * bandwidth)
        self.register_buffer("phases", 2 * math.pi * torch.rand(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cos(x.to(self.freqs.dtype)[:, None] * self.freqs + self.phases) * math.sqrt(2)


def backbone_stages(model: nn.Module) -> tuple[list[nn.Module], list[int]]:
    """The stage modules of a timm ResNet or ConvNeXt and their output channels."""
    infos = [info for info in model.feature_info if info["module"].startswith(("layer", "stages"))]
    if not infos:
        raise MedlatentInputError("noise conditioning needs a backbone with stages (resnet or convnext families)")
    modules = dict(model.named_modules())
    return [modules[info["module"]] for info in infos], [info["num_chs"] for info in infos]


class NoiseConditionedClassifier(nn.Module):
    def __init__(self, backbone: nn.Module, embedding_dim: int = 128, sigma_data: float = 0.5):
        super().__init__()
        self.backbone = backbone
        self.sigma_data = sigma_data  # the std of the clean inputs (the latent scaler's target)
        stages, channels = backbone_stages(backbone)
        self.fourier = FourierFeatures(embedding_dim)
        self.mlp = nn.Sequential(nn.Linear(embedding_dim, embedding_dim), nn.SiLU(), nn.Linear(embedding_dim, embedding_dim), nn.SiLU())
        self.film = nn.ModuleList(nn.Linear(embedding_dim, 2 * c) for c in channels)
        for layer in self.film:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self._modulation: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        for i, stage in enumerate(stages):
            stage.register_forward_hook(self._film_hook(i))

    def _film_hook(self, i: int):
        def hook(module, inputs, output):
            if self._modulation is None:
                return output
            gamma, beta = self._modulation[i]
            return output * (1 + gamma[:, :, None, None].to(output.dtype)) + beta[:, :, None, None].to(output.dtype)

        return hook

    def forward(self, z: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, device=z.device, dtype=self.fourier.freqs.dtype).expand(z.shape[0])
        embedding = self.mlp(self.fourier(c_noise(sigma)))
        self._modulation = [layer(embedding).chunk(2, dim=1) for layer in self.film]
        scale = (self.sigma_data * c_in(sigma, self.sigma_data)).to(z.dtype)  # 1 for clean inputs
        try:
            return self.backbone(z * scale.view(-1, *([1] * (z.ndim - 1))))
        finally:
            self._modulation = None
