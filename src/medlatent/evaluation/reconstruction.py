"""Reconstruction quality: MSE, PSNR and SSIM of decode(encode(x)) against x, per image, on [0, 1]."""

from __future__ import annotations

import numpy as np
import torch
from skimage.metrics import structural_similarity

PSNR_CAP_DB = 100.0  # an exact reconstruction has infinite PSNR; it is counted as this (and flagged lossless)


def reconstruction_quality(originals: torch.Tensor, reconstructions: torch.Tensor) -> dict[str, float | bool]:
    x = originals.float().numpy()
    y = reconstructions.float().numpy()
    mse = ((x - y).astype(np.float64) ** 2).reshape(len(x), -1).mean(1)
    psnr = np.minimum(10 * np.log10(1.0 / np.maximum(mse, 1e-300)), PSNR_CAP_DB)
    ssim = [structural_similarity(a, b, data_range=1.0, channel_axis=0) for a, b in zip(x, y, strict=False)]
    return {
        "mse": float(mse.mean()),
        "psnr": float(psnr.mean()),
        "ssim": float(np.mean(ssim)),
        "psnr_std": float(psnr.std()),
        "ssim_std": float(np.std(ssim)),
        "lossless": bool((mse == 0).all()),
    }
