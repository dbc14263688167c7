"""Where the diffusion classifier looks: two per-pixel maps per image (Favero et al., MIDL 2025).

For an image's latent x and two classes, `target` (the prediction) and `other` (the runner-up):

- class difference: noise x to sigma with `draws` noises eps_j and take the decoded difference of
  the two class-conditional denoised predictions, averaged over the draws,
      M(x) = 1/J sum_j [ decode(D(x + sigma eps_j; sigma, target)) - decode(D(x + sigma eps_j; sigma, other)) ];
- counterfactual: noise x to sigma (the first draw's eps) and denoise it with `other` along the
  probability-flow ODE (`counterfactual.counterfactual_latents`), decode, and subtract the
  reconstruction decode(x), so the autoencoder's own error does not show.

Both are in image space at the dataset's channels and size. `peak_in_lesion` says whether a
map's strongest point falls within a known finding (the synthetic benchmark's nodules).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

from ..device import autocast
from .counterfactual import counterfactual_latents


@torch.no_grad()
def explanation_maps(
    ldm,
    autoencoder,
    x: torch.Tensor,
    target: torch.Tensor,
    other: torch.Tensor,
    channels: int,
    size: int,
    sigma: float = 0.8,
    draws: int = 8,
    steps: int = 16,
    seed: int = 0,
    batch_size: int = 32,
) -> dict[str, torch.Tensor]:
    """x: normalised latents (B, C, h, w) of `ldm` (a `LatentDiffusion`); target, other: (B,) classes.
    Returns images in [0, 1] ("reconstruction", "counterfactual") and signed maps ("class_difference",
    "counterfactual_difference"), each (B, channels, size, size), on the CPU. Image i's noise
    comes from seed (seed, i) alone."""
    denoiser, device = ldm.denoiser, ldm.device
    shape = SimpleNamespace(channels=channels, size=size)

    def decode(z: torch.Tensor) -> torch.Tensor:
        return ldm.images(autoencoder, z, shape)

    out: dict[str, list[torch.Tensor]] = {
        "reconstruction": [],
        "class_difference": [],
        "counterfactual": [],
        "counterfactual_difference": [],
    }
    for start in range(0, len(x), batch_size):
        rows = slice(start, min(start + batch_size, len(x)))
        z, y, y_other = x[rows].to(device), target[rows].to(device), other[rows].to(device)
        generators = [torch.Generator().manual_seed(seed * 1_000_003 + i) for i in range(rows.start, rows.stop)]
        eps = [
            torch.stack([torch.randn(z.shape[1:], generator=g) for g in generators]).to(device) for _ in range(draws)
        ]
        s = torch.full((len(z),), sigma, device=device)
        difference = 0.0
        for e in eps:
            noised = z + sigma * e
            with autocast(device):
                both = denoiser(torch.cat([noised, noised]), torch.cat([s, s]), torch.cat([y, y_other])).float()
            decoded = decode(both)
            difference = difference + (decoded[: len(z)] - decoded[len(z) :]) / draws
        reconstruction = decode(z)
        counterfactual = decode(
            counterfactual_latents(ldm, x[rows], other[rows], sigma, steps=steps, seed=seed, first_index=rows.start)
        )
        out["reconstruction"].append(reconstruction)
        out["class_difference"].append(difference)
        out["counterfactual"].append(counterfactual)
        out["counterfactual_difference"].append(counterfactual - reconstruction)
    return {name: torch.cat(parts) for name, parts in out.items()}


def saliency(maps: torch.Tensor, smooth: int = 3) -> torch.Tensor:
    """(B, C, H, W) signed maps -> (B, H, W) magnitude, summed over channels and box-smoothed over
    `smooth` pixels so that one noisy pixel does not make the peak."""
    magnitude = maps.abs().sum(1, keepdim=True)
    return F.avg_pool2d(magnitude, smooth, stride=1, padding=smooth // 2, count_include_pad=False)[:, 0]


def peak_in_lesion(maps: torch.Tensor, centers: np.ndarray, radii: np.ndarray, reach: float = 2.0) -> np.ndarray:
    """(B,) whether each map's strongest point lies within `reach` radii of the lesion's centre
    (a Gaussian nodule of radius r is visible out to about 2 r)."""
    heat = saliency(maps)
    flat = heat.flatten(1).argmax(1).numpy()
    peak = np.stack([flat // heat.shape[2], flat % heat.shape[2]], 1).astype(float)
    return np.linalg.norm(peak - centers, axis=1) <= reach * radii
