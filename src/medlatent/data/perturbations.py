"""Image perturbations with five severities each, for the encoder audit and robustness under shift.

`perturb(images, name, severity, seed)` takes images (n, C, H, W) in [0, 1] and returns the same
shape in [0, 1]. Severity 0 is the identity; 1 to 5 grow roughly as the corruption benchmarks do
(Hendrycks & Dietterich 2019; MedMNIST-C, Di Salvo et al. 2024, whose own package pins versions
medlatent cannot install beside numpy 2, so its corruptions are not wrapped here).
Geometric perturbations (rotation, translation, scaling) fill with the image's border by
reflection, so no black frame is introduced; translation is by whole pixels, so shift
equivariance can be tested exactly.
"""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import MedlatentInputError

SEVERITIES = (1, 2, 3, 4, 5)
# The parameter of each family at severities 1..5.
LEVELS: dict[str, tuple[float, ...]] = {
    "noise": (0.02, 0.04, 0.08, 0.12, 0.18),  # std of additive Gaussian noise
    "blur": (0.5, 1.0, 1.5, 2.0, 3.0),  # Gaussian blur sigma, pixels at the working size
    "contrast": (0.8, 0.65, 0.5, 0.4, 0.3),  # factor around the image mean
    "gamma": (1.2, 1.4, 1.7, 2.0, 2.5),  # x ** gamma
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),  # added
    "rotation": (2.0, 5.0, 10.0, 15.0, 25.0),  # degrees
    "translation": (1, 2, 4, 6, 8),  # pixels, along both axes
    "scaling": (1.05, 1.1, 1.2, 1.3, 1.5),  # zoom factor about the centre
    "jpeg": (80, 60, 40, 25, 12),  # JPEG quality
}
PERTURBATIONS = tuple(LEVELS)


def check_perturbations(names: list[str], severities: list[int]) -> None:
    unknown = [n for n in names if n not in LEVELS]
    if unknown:
        raise MedlatentInputError(f"--perturbation {unknown[0]}: unknown; use {', '.join(PERTURBATIONS)}")
    bad = [s for s in severities if s not in SEVERITIES]
    if bad:
        raise MedlatentInputError(f"--severity {bad[0]}: out of range; use 1 to 5")


def perturb(images: torch.Tensor, name: str, severity: int, seed: int = 0) -> torch.Tensor:
    if name not in LEVELS:
        raise MedlatentInputError(f"--perturbation {name}: unknown; use {', '.join(PERTURBATIONS)}")
    if severity == 0:
        return images.clone()
    if severity not in SEVERITIES:
        raise MedlatentInputError(f"--severity {severity}: out of range; use 1 to 5")
    p = LEVELS[name][severity - 1]
    x = images.float()
    if name == "noise":
        generator = torch.Generator().manual_seed(seed)
        out = x + p * torch.randn(x.shape, generator=generator)
    elif name == "blur":
        out = gaussian_blur(x, p)
    elif name == "contrast":
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        out = mean + p * (x - mean)
    elif name == "gamma":
        out = x.clamp(0, 1) ** p
    elif name == "brightness":
        out = x + p
    elif name == "translation":
        out = translate(x, int(p), int(p))
    else:  # rotation, scaling: one affine resampling, border reflected
        angle, zoom = (np.deg2rad(p), 1.0) if name == "rotation" else (0.0, p)
        cos, sin = np.cos(angle) / zoom, np.sin(angle) / zoom
        theta = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]], dtype=torch.float32).expand(len(x), 2, 3)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    if name == "jpeg":
        out = jpeg(x, int(p))
    return out.clamp(0, 1)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(np.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(t**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    c = x.shape[1]
    x = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def translate(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """out[i, j] = x[i - dy, j - dx]: a shift by whole pixels, the vacated border reflected."""
    h, w = x.shape[-2:]
    pad = max(abs(dy), abs(dx))
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect") if pad else x
    return padded[..., pad - dy : pad - dy + h, pad - dx : pad - dx + w]


def jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    from PIL import Image

    out = torch.empty_like(x)
    for i, image in enumerate((x.clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).numpy()):
        buffer = io.BytesIO()
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="JPEG", quality=quality)
        decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())), dtype=np.float32) / 255
        out[i] = torch.from_numpy(decoded).view(x.shape[2], x.shape[3], -1).permute(2, 0, 1)
    return out
