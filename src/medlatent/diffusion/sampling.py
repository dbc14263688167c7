"""Sampling from a class-conditional denoiser: EDM's Heun sampler (Karras et al. 2022,
Algorithm 2) with classifier-free guidance, batched over samples and classes.

Classifier-free guidance (Ho & Salimans 2022): D_w = D(x; sigma, null) + w (D(x; sigma, y) -
D(x; sigma, null)); w = 1 is the conditional model, w = 0 the unconditional one. Both branches run in
one batched forward pass.
"""

from __future__ import annotations

from typing import Callable

import torch

from .noise import SIGMA_MAX, SIGMA_MIN, karras_sigmas


def guided_denoise(
    denoiser: torch.nn.Module, x: torch.Tensor, sigma: torch.Tensor | float, labels: torch.Tensor, cfg: float = 1.0,
    guidance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None, guidance_scale: float = 0.0,
) -> torch.Tensor:  # fmt: skip
    """D_w(x; sigma, y); one forward pass of 2B inputs when guidance mixes in the null class.

    Classifier guidance: `guidance(x, sigma)` is grad_x log p(y | x; sigma). Since the score is
    (D - x) / sigma^2 (EDM Eq. 3), adding s * grad log p(y | x) to the score adds
    s * sigma^2 * grad log p(y | x) to D (Dhariwal & Nichol 2021, Eq. 10 with scale s)."""
    if cfg == 1.0:
        denoised = denoiser(x, sigma, labels)
    else:
        null = torch.full_like(labels, denoiser.null_class)
        both = torch.as_tensor(sigma, device=x.device)
        both = torch.cat([both, both]) if both.ndim else both  # per-sample sigmas for both halves
        conditional, unconditional = denoiser(torch.cat([x, x]), both, torch.cat([labels, null])).chunk(2)
        denoised = unconditional + cfg * (conditional - unconditional)
    if guidance is not None and guidance_scale:
        sigma = torch.as_tensor(sigma, device=x.device, dtype=x.dtype).expand(x.shape[0])
        with torch.enable_grad():
            grad = guidance(x, sigma)
        denoised = denoised + guidance_scale * sigma.view(-1, 1, 1, 1) ** 2 * grad
    return denoised


@torch.no_grad()
def sample(
    denoiser: torch.nn.Module, labels: torch.Tensor, steps: int = 32, cfg: float = 1.0, generator: torch.Generator | None = None,
    sigma_max: float = SIGMA_MAX, sigma_min: float = SIGMA_MIN, churn: float = 0.0, x_start: torch.Tensor | None = None,
    guidance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None, guidance_scale: float = 0.0,
) -> torch.Tensor:  # fmt: skip
    """Latents for `labels` (one per sample), by EDM Algorithm 2 over the Karras schedule (Eq. 5).
    `x_start` (a latent already noised to `sigma_max`) starts from a given noise level instead of
    pure noise; `churn` > 0 adds EDM's stochasticity (S_churn); `guidance` and `guidance_scale`
    add classifier guidance (see `guided_denoise`)."""
    device = next(denoiser.parameters()).device
    shape = (len(labels), denoiser.latent_channels, denoiser.latent_size, denoiser.latent_size)
    labels = labels.to(device)
    t = torch.cat([karras_sigmas(steps, sigma_min, sigma_max).to(device), torch.zeros(1, device=device)])  # t_N = 0
    noise = lambda: torch.randn(shape, generator=generator, device=generator.device if generator is not None else "cpu").to(device)  # noqa: E731
    x = x_start.to(device) if x_start is not None else noise() * t[0]
    for i in range(steps):
        t_cur, t_next = t[i], t[i + 1]
        gamma = min(churn / steps, 2**0.5 - 1) if churn > 0 else 0.0
        t_hat = t_cur * (1 + gamma)
        if gamma > 0:  # Algorithm 2, lines 4-6: raise the noise level to t_hat
            x = x + (t_hat**2 - t_cur**2).sqrt() * noise()
        d = (x - guided_denoise(denoiser, x, t_hat, labels, cfg, guidance, guidance_scale)) / t_hat  # Eq. 3's ODE direction
        x_next = x + (t_next - t_hat) * d  # Euler step
        if t_next > 0:  # Heun's second-order correction (Algorithm 2, lines 9-11)
            d_next = (x_next - guided_denoise(denoiser, x_next, t_next, labels, cfg, guidance, guidance_scale)) / t_next
            x_next = x + (t_next - t_hat) * (d + d_next) / 2
        x = x_next
    return x
