"""Counterfactual latents: noise an image's latent part of the way, then denoise it as another class.

The strength s in (0, 1] sets how far: the starting noise level is the point at fraction s of the
Karras schedule (EDM Eq. 5), sigma(s) = (sigma_min^(1/rho) + s (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho,
so s = 1 starts from pure noise (a new sample of the target class) and s -> 0 from the image
itself. The start is x + sigma(s) eps (SDEdit, Meng et al. 2022), or with `inversion` the latent
carried up to sigma(s) by the probability-flow ODE of the unconditional model (`sampling.invert`,
DDIM inversion: deterministic, so what the target class does not change is kept more closely).
From there the ODE is solved down to 0 with the target class (EDM Algorithm 2), with
classifier-free guidance, optional classifier guidance and Latent Drift's delta at every step
(`sampling.drift_shift`).
"""

from __future__ import annotations

import torch

from ..device import autocast
from .noise import RHO
from .sampling import invert, sample


def strength_sigma(strength: float, denoiser: torch.nn.Module, rho: float = RHO) -> float:
    """The starting noise level of `strength` on the Karras schedule of the denoiser's noise range."""
    sigma_min, sigma_max = getattr(denoiser, "sigma_range", (0.002, 80.0))
    return (sigma_min ** (1 / rho) + strength * (sigma_max ** (1 / rho) - sigma_min ** (1 / rho))) ** rho


@torch.no_grad()
def counterfactual_latents(
    ldm,
    z: torch.Tensor,
    target: torch.Tensor,
    sigma: float,
    steps: int = 32,
    cfg: float = 1.0,
    drift: float = 0.0,
    seed: int = 0,
    guidance_classifier=None,
    guidance_scale: float = 0.0,
    batch_size: int = 64,
    first_index: int = 0,
    inversion: bool = False,
) -> torch.Tensor:
    """z: normalised latents (B, C, h, w) of `ldm` (a `LatentDiffusion`); target: (B,) classes;
    sigma: the starting noise level (`strength_sigma`). Returns the counterfactuals' normalised
    latents on the CPU. Image i's noise comes from seed (seed, first_index + i) alone (the first
    draw of that seed), so every strength and drift starts from the same noise; with `inversion`
    there is no noise (the start is `invert`'s, conditioned on the null class)."""
    out = []
    for start in range(0, len(z), batch_size):
        part, labels = z[start : start + batch_size].to(ldm.device), target[start : start + batch_size].to(ldm.device)
        with autocast(ldm.device):
            if inversion:  # cfg 0: the unconditional model, whatever the image's (possibly unknown) class
                x_start = invert(ldm.denoiser, part, labels, sigma, steps=steps, cfg=0.0)
            else:
                eps = torch.stack(
                    [
                        torch.randn(
                            part.shape[1:],
                            generator=torch.Generator().manual_seed(seed * 1_000_003 + first_index + start + i),
                        )
                        for i in range(len(part))
                    ]
                )
                x_start = part + sigma * (
                    eps.to(ldm.device) + ldm.drift
                )  # a model trained on drifted noise (diffusion train --drift) is noised as it was trained
        guidance = ldm.guidance(guidance_classifier, labels) if guidance_classifier is not None else None
        with autocast(ldm.device):
            x = sample(
                ldm.denoiser,
                labels,
                steps=steps,
                cfg=cfg,
                sigma_max=sigma,
                x_start=x_start,
                guidance=guidance,
                guidance_scale=guidance_scale,
                drift=drift,
            )
        out.append(x.float().cpu())
    return torch.cat(out)
