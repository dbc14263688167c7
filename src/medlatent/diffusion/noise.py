"""Noise levels in the EDM formulation (Karras et al., NeurIPS 2022), with the variance-preserving
(DDPM) parameterisation mapped onto it, so that one noise-conditioned classifier serves both.

Variance exploding (VE):   z_sigma = z + sigma * eps
Variance preserving (VP):  z_t = sqrt(abar_t) * z + sqrt(1 - abar_t) * eps
                           z_t / sqrt(abar_t) = z + sigma_t * eps,  sigma_t = sqrt((1 - abar_t) / abar_t)
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0


def karras_sigmas(
    n: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO
) -> torch.Tensor:
    """The discrete schedule of EDM Eq. 5, from sigma_max down to sigma_min:
    sigma_i = (sigma_max^(1/rho) + i / (n - 1) * (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    inv_rho = 1.0 / rho
    return ((sigma_max**inv_rho + ramp * (sigma_min**inv_rho - sigma_max**inv_rho)) ** rho).float()


def per_sample(sigma: torch.Tensor | float, x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Noise levels (a number, or a 0-dim or (n,) tensor) as an (n,) tensor on x's device. A number is
    filled in there: a tensor made of it on the host would be copied with a wait for the GPU."""
    if isinstance(sigma, torch.Tensor):
        return sigma.to(device=x.device, dtype=dtype).expand(x.shape[0])
    return torch.full((x.shape[0],), float(sigma), device=x.device, dtype=dtype)


class Precond(NamedTuple):
    """EDM's preconditioning of a network F at noise level sigma (Karras et al. 2022, Eq. 7):
    D(x; sigma) = c_skip x + c_out F(c_in x; c_noise)."""

    c_skip: torch.Tensor
    c_out: torch.Tensor
    c_in: torch.Tensor
    c_noise: torch.Tensor


def precond(sigma: torch.Tensor, sigma_data: float) -> Precond:
    """EDM Table 1 ("Ours"), as edm2's `Precond`: c_skip = sigma_data^2 / (sigma^2 + sigma_data^2),
    c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2), c_in = 1 / sqrt(sigma^2 + sigma_data^2),
    c_noise = ln(sigma) / 4. The one place they are computed: the denoiser, the samplers and the
    noise-conditioned classifiers use them."""
    return Precond(
        c_skip=sigma_data**2 / (sigma**2 + sigma_data**2),
        c_out=sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt(),
        c_in=1 / torch.sqrt(sigma**2 + sigma_data**2),
        c_noise=torch.log(sigma) / 4,
    )


def sample_training_sigmas(
    batch: int, sigmas: torch.Tensor, generator: torch.Generator | None = None, clean_fraction: float = 0.0
) -> torch.Tensor:
    """One noise level per sample, drawn uniformly from the discrete schedule; with `clean_fraction`
    that share of the samples (in expectation) is at the schedule's smallest sigma instead.
    Drawn on the generator's device (CPU or CUDA)."""
    device = generator.device if generator is not None else sigmas.device
    sigmas = sigmas.to(device)
    drawn = sigmas[torch.randint(0, len(sigmas), (batch,), generator=generator, device=device)]
    if clean_fraction > 0:
        clean = torch.rand(batch, generator=generator, device=device) < clean_fraction
        drawn = torch.where(clean, sigmas.min(), drawn)
    return drawn


def add_noise(z: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
    """VE noising z + sigma * eps, sigma of shape (batch,)."""
    eps = torch.randn_like(z) if eps is None else eps
    return z + sigma.view(-1, *([1] * (z.ndim - 1))) * eps


VP_SCHEDULE = dict(
    num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
)  # Stable Diffusion's


def vp_scheduler():
    """diffusers' DDPMScheduler with Stable Diffusion's schedule (the VP process of latent models)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**VP_SCHEDULE)


def vp_alphas_cumprod() -> torch.Tensor:
    """DDPM's alpha-bar per timestep, from the diffusers scheduler."""
    return vp_scheduler().alphas_cumprod.float()


def vp_to_ve(
    z_t: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A VP latent at timestep t -> the equivalent VE latent and its sigma."""
    abar = alphas_cumprod.to(z_t.device)[timesteps]
    sigma = torch.sqrt((1 - abar) / abar)
    return z_t / torch.sqrt(abar).view(-1, *([1] * (z_t.ndim - 1))), sigma


def sigma_grid(points: int = 9, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX) -> torch.Tensor:
    """Log-spaced noise levels for sweeps."""
    return torch.logspace(math.log10(sigma_min), math.log10(sigma_max), points)
