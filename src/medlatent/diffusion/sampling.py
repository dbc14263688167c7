"""Sampling from a class-conditional denoiser: EDM's Heun sampler (Karras et al. 2022,
Algorithm 2) with classifier-free guidance, batched over samples and classes.

Classifier-free guidance (Ho & Salimans 2022): D_w = D(x; sigma, null) + w (D(x; sigma, y) -
D(x; sigma, null)); w = 1 is the conditional model, w = 0 the unconditional one. Both branches run in
one batched forward pass.
"""

from __future__ import annotations

import torch

from .noise import SIGMA_MAX, SIGMA_MIN, karras_sigmas


def guided_denoise(denoiser: torch.nn.Module, x: torch.Tensor, sigma: torch.Tensor | float, labels: torch.Tensor, cfg: float = 1.0) -> torch.Tensor:
    """D_w(x; sigma, y); one forward pass of 2B inputs when guidance mixes in the null class."""
    if cfg == 1.0:
        return denoiser(x, sigma, labels)
    null = torch.full_like(labels, denoiser.null_class)
    both = denoiser(torch.cat([x, x]), sigma, torch.cat([labels, null]))
    conditional, unconditional = both.chunk(2)
    return unconditional + cfg * (conditional - unconditional)


@torch.no_grad()
def sample(
    denoiser: torch.nn.Module, labels: torch.Tensor, steps: int = 32, cfg: float = 1.0, generator: torch.Generator | None = None,
    sigma_max: float = SIGMA_MAX, sigma_min: float = SIGMA_MIN, churn: float = 0.0, x_start: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """Latents for `labels` (one per sample), by EDM Algorithm 2 over the Karras schedule (Eq. 5).
    `x_start` (a latent already noised to `sigma_max`) starts from a given noise level instead of
    pure noise; `churn` > 0 adds EDM's stochasticity (S_churn)."""
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
        d = (x - guided_denoise(denoiser, x, t_hat, labels, cfg)) / t_hat  # Eq. 3's ODE direction
        x_next = x + (t_next - t_hat) * d  # Euler step
        if t_next > 0:  # Heun's second-order correction (Algorithm 2, lines 9-11)
            d_next = (x_next - guided_denoise(denoiser, x_next, t_next, labels, cfg)) / t_next
            x_next = x + (t_next - t_hat) * (d + d_next) / 2
        x = x_next
    return x
