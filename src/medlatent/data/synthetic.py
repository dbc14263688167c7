"""A deterministic synthetic chest-radiograph benchmark with a controlled local finding.

Each image is a frontal "radiograph": a soft-tissue thorax, two dark lung fields crossed by
ribs, a bright mediastinum and heart, a smooth exposure field and signal-dependent noise.
Positive images carry a nodule: a Gaussian blob of radius `lesion_size` (fraction of the image
width) and peak `lesion_contrast`, at a random position inside a lung. Everything is drawn
from `seed`, so the same parameters always give the same pixels; the parameters are the knobs
of a probe of what a latent space keeps (smaller, fainter lesions are harder to keep).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .base import ArrayImageStore, ImageDataset, fingerprint

GENERATOR_VERSION = 2


@dataclass(frozen=True)
class SyntheticConfig:
    n_train: int = 1000
    n_val: int = 250
    n_test: int = 500
    lesion_size: float = 0.07
    lesion_contrast: float = 0.3
    prevalence: float = 0.5
    noise: float = 0.03
    seed: int = 0


def make_synthetic(size: int = 64, **overrides) -> ImageDataset:
    config = SyntheticConfig(**overrides)
    n = config.n_train + config.n_val + config.n_test
    rng = np.random.default_rng(config.seed)
    labels = (rng.random(n) < config.prevalence).astype(np.int64)
    images = np.empty((n, size, size), dtype=np.uint8)
    centers, radii = np.full((n, 2), np.nan), np.full(n, np.nan)
    for start in range(0, n, 256):  # chunks bound memory at large sizes
        stop = min(start + 256, n)
        images[start:stop], centers[start:stop], radii[start:stop] = render_radiographs(
            labels[start:stop], size, config, rng, return_lesions=True
        )
    order = np.arange(n)
    partitions = {
        "train": order[: config.n_train],
        "val": order[config.n_train : config.n_train + config.n_val],
        "test": order[config.n_train + config.n_val :],
    }
    return ImageDataset(
        name="synthetic",
        task="binary",
        class_names=["normal", "nodule"],
        labels=labels,
        images=ArrayImageStore(images, size),
        size=size,
        channels=1,
        fingerprint=fingerprint("synthetic", GENERATOR_VERSION, size, asdict(config)),
        partitions=partitions,
        source={"kind": "synthetic", "generator_version": GENERATOR_VERSION, **asdict(config)},
        lesions={"center": centers, "radius": radii},
    )


def _ellipse(x, y, cx, cy, ax, ay, edge):
    """Soft ellipse mask in [0, 1]; `edge` is the width of the sigmoid border."""
    r = np.sqrt(((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2)
    return 1.0 / (1.0 + np.exp((r - 1.0) / edge))


def render_radiographs(
    labels: np.ndarray, size: int, config: SyntheticConfig, rng: np.random.Generator, return_lesions: bool = False
):
    """uint8 images (n, size, size); with `return_lesions` also each nodule's centre (row, column)
    in pixels and its Gaussian radius in pixels (NaN for images without one)."""
    n = len(labels)
    coords = (np.arange(size) + 0.5) / size * 2.0 - 1.0
    y, x = np.meshgrid(coords, coords, indexing="ij")
    x, y = x[None], y[None]

    def draw(low, high):
        return rng.uniform(low, high, size=(n, 1, 1))

    # Anatomy with per-patient variation in pose and proportions.
    scale, shift_x, shift_y = draw(0.9, 1.05), draw(-0.06, 0.06), draw(-0.05, 0.05)
    xs, ys = (x - shift_x) / scale, (y - shift_y) / scale
    body = _ellipse(xs, ys, 0.0, 0.05, 0.88, 1.05, 0.04)
    lung_w, lung_h = draw(0.24, 0.3), draw(0.5, 0.6)
    left = _ellipse(xs, ys, -0.38, -0.05, lung_w, lung_h, 0.06)
    right = _ellipse(xs, ys, 0.38, -0.05, lung_w, lung_h, 0.06)
    lungs = np.clip(left + right, 0.0, 1.0)
    rib_freq, rib_phase = draw(4.5, 5.5), draw(0.0, 2 * np.pi)
    ribs = np.maximum(np.cos(np.pi * rib_freq * (ys + 0.25 * xs**2) + rib_phase), 0.0) ** 6
    spine = np.exp(-((xs / 0.09) ** 2)) * body
    heart = _ellipse(xs, ys, draw(0.08, 0.16), draw(0.25, 0.35), draw(0.25, 0.32), 0.24, 0.08)
    exposure = 0.04 * np.cos(np.pi * (draw(0.5, 1.5) * x + draw(0, 2 * np.pi))) * np.cos(np.pi * (draw(0.5, 1.5) * y))

    image = 0.06 + 0.5 * body - 0.3 * lungs + 0.1 * ribs * lungs + 0.15 * spine + 0.18 * heart + exposure

    # The finding: a nodule inside a lung, placed by rejection sampling on the lung mask.
    positive = np.flatnonzero(labels == 1)
    lesion = np.zeros_like(image)
    radius = config.lesion_size
    centers, radii = np.full((n, 2), np.nan), np.full(n, np.nan)
    for i in positive:
        mask = (left[i] > 0.7) | (right[i] > 0.7)
        ys_idx, xs_idx = np.nonzero(mask)
        pick = rng.integers(len(ys_idx))
        cy, cx = coords[ys_idx[pick]], coords[xs_idx[pick]]
        r2 = (x[0] - cx) ** 2 + (y[0] - cy) ** 2
        contrast = config.lesion_contrast * rng.uniform(0.8, 1.2)
        spread = radius * rng.uniform(0.8, 1.2)
        lesion[i] = contrast * np.exp(-r2 / (2 * spread**2))
        centers[i], radii[i] = (
            (ys_idx[pick], xs_idx[pick]),
            spread * size / 2,
        )  # coordinates span 2 units across the image
    image = image + lesion

    # Signal-dependent (quantum-like) plus electronic noise.
    image = image + rng.normal(size=image.shape) * (config.noise * (0.5 + image))
    images = (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return (images, centers, radii) if return_lesions else images
