"""Reconstruction quality: PSNR and SSIM of decode(encode(x)) against x, per image, on [0, 1]."""

from __future__ import annotations

import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity


def reconstruction_quality(originals: torch.Tensor, reconstructions: torch.Tensor) -> dict[str, float]:
    x = originals.float().numpy()
    y = reconstructions.float().numpy()
    psnr, ssim = [], []
    for a, b in zip(x, y):
        psnr.append(peak_signal_noise_ratio(a, b, data_range=1.0))
        ssim.append(structural_similarity(a, b, data_range=1.0, channel_axis=0))
    return {"psnr": float(np.mean(psnr)), "ssim": float(np.mean(ssim)), "psnr_std": float(np.std(psnr)), "ssim_std": float(np.std(ssim))}
