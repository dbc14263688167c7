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

from ..errors import MedlatentInputError
from .base import ArrayImageStore, Concepts, Confounder, ImageDataset, fingerprint

GENERATOR_VERSION = 2
MARKERS = ("none", "corner", "stripe", "offset")
MARKER_FIELDS = ("marker", "marker_rate", "marker_test_rate", "marker_contrast")


@dataclass(frozen=True)
class SyntheticConfig:
    """The benchmark's knobs (the `synthetic:k=v,...` options).

    marker: a spurious marker, `none`, `corner` (a small bright square in the top-left corner, 3x3
    pixels at 64 px), `stripe` (a text-like bar of bright dashes near the top edge) or `offset`
    (a global intensity offset); marker_rate: its share among the training and validation nodule
    images (1 - marker_rate among the normal ones; 0.5: no correlation); marker_test_rate: its
    share among the test images, whatever the class; marker_contrast: the intensity it adds."""

    n_train: int = 1000
    n_val: int = 250
    n_test: int = 500
    lesion_size: float = 0.07
    lesion_contrast: float = 0.3
    prevalence: float = 0.5
    noise: float = 0.03
    seed: int = 0
    marker: str = "none"
    marker_rate: float = 0.9
    marker_test_rate: float = 0.5
    marker_contrast: float = 0.3

    def __post_init__(self) -> None:
        if self.marker not in MARKERS:
            raise MedlatentInputError(f"synthetic option marker={self.marker}: use one of {', '.join(MARKERS)}")
        for name in ("marker_rate", "marker_test_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise MedlatentInputError(f"synthetic option {name}={getattr(self, name)}: use a share in [0, 1]")
        if not 0.0 < self.marker_contrast <= 1.0:
            raise MedlatentInputError(
                f"synthetic option marker_contrast={self.marker_contrast}: use an intensity in (0, 1]"
            )

    def settings(self) -> dict:
        """The knobs that define the pixels: the marker's only when there is one, so that the
        benchmark without a marker keeps its fingerprint (and cache entries)."""
        return {k: v for k, v in asdict(self).items() if self.marker != "none" or k not in MARKER_FIELDS}


def make_synthetic(size: int = 64, **overrides) -> ImageDataset:
    """The benchmark at `size` px with the knobs of `SyntheticConfig`; the first `n_train` images
    are its training part, the next `n_val` its validation part and the last `n_test` its test part."""
    config = SyntheticConfig(**overrides)
    n = config.n_train + config.n_val + config.n_test
    rng = np.random.default_rng(config.seed)
    labels = (rng.random(n) < config.prevalence).astype(np.int64)
    markers = draw_markers(labels, config)
    images = np.empty((n, size, size), dtype=np.uint8)
    centers, radii, contrasts = np.full((n, 2), np.nan), np.full(n, np.nan), np.full(n, np.nan)
    for start in range(0, n, 256):  # chunks bound memory at large sizes
        stop = min(start + 256, n)
        images[start:stop], centers[start:stop], radii[start:stop], contrasts[start:stop] = render_radiographs(
            labels[start:stop], size, config, rng, return_lesions=True, markers=markers[start:stop]
        )
    lesions = {"center": centers, "radius": radii, "contrast": contrasts}
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
        fingerprint=fingerprint("synthetic", GENERATOR_VERSION, size, config.settings()),
        partitions=partitions,
        source={"kind": "synthetic", "generator_version": GENERATOR_VERSION, **config.settings()},
        lesions=lesions,
        concepts=synthetic_concepts(labels, lesions, markers, size, config),
        confounder=None
        if config.marker == "none"
        else Confounder(
            name=f"{config.marker} marker",
            codes=markers.astype(np.int64),
            levels=["absent", "present"],
            mask=marker_map(config.marker, size, 1.0) > 0,
        ),
    )


def synthetic_concepts(
    labels: np.ndarray, lesions: dict, markers: np.ndarray, size: int, config: SyntheticConfig
) -> Concepts:
    """The benchmark's known concepts of each image, 0 for an image without a nodule: the nodule;
    a large one (its radius above the configured `lesion_size`) and a bright one (its peak above
    `lesion_contrast`), each drawn within 20% of it; one in the upper half and one in the left half
    of the image; and the marker, where there is one."""
    present = ~np.isnan(lesions["radius"])
    rows, cols = np.nan_to_num(lesions["center"], nan=size).T

    def where(condition: np.ndarray) -> np.ndarray:
        return (present & condition).astype(np.float32)

    with np.errstate(invalid="ignore"):  # NaN (no nodule) compares False
        named = {
            "nodule": (labels == 1).astype(np.float32),
            "large nodule": where(lesions["radius"] > config.lesion_size * size / 2),
            "bright nodule": where(lesions["contrast"] > config.lesion_contrast),
            "nodule in the upper half": where(rows < size / 2),
            "nodule in the left half": where(cols < size / 2),
        }
    if config.marker != "none":
        named[f"{config.marker} marker"] = markers.astype(np.float32)
    return Concepts(names=list(named), values=np.stack(list(named.values()), axis=1), source="synthetic")


def draw_markers(labels: np.ndarray, config: SyntheticConfig) -> np.ndarray:
    """Which images carry the marker (all False without one), from a random stream of their own
    (the seed's first spawned child), so that the anatomy, nodule and noise draws stay those of
    the same parameters without a marker. Training and validation images: `marker_rate` of class
    1, 1 - `marker_rate` of class 0; test images: `marker_test_rate` whatever the class."""
    n = len(labels)
    if config.marker == "none":
        return np.zeros(n, dtype=bool)
    draws = np.random.default_rng(np.random.SeedSequence(config.seed, spawn_key=(1,))).random(n)
    rate = np.where(labels == 1, config.marker_rate, 1.0 - config.marker_rate)
    rate[config.n_train + config.n_val :] = config.marker_test_rate
    return draws < rate


def marker_map(kind: str, size: int, contrast: float) -> np.ndarray:
    """The intensity a marker adds, (size, size): its geometry is stated at 64 px and scales with
    the size (at least one pixel). corner: a square of 3 px, 3 px from the top-left corner;
    stripe: four bright dashes of 2x2 px, 2 px apart, 4 px below the top edge at the right;
    offset: the whole image."""
    out = np.zeros((size, size))
    unit = size / 64

    def px(value: float) -> int:
        return max(1, round(value * unit))

    if kind == "offset":
        out[:] = contrast
    elif kind == "corner":
        out[px(3) : px(3) + px(3), px(3) : px(3) + px(3)] = contrast
    elif kind == "stripe":
        top, dash, right = px(4), px(2), size - px(6)
        for k in range(4):
            start = right - (7 - 2 * k) * dash
            out[top : top + dash, max(start, 0) : start + dash] = contrast
    return out


def _ellipse(x, y, cx, cy, ax, ay, edge):
    """Soft ellipse mask in [0, 1]; `edge` is the width of the sigmoid border."""
    r = np.sqrt(((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2)
    return 1.0 / (1.0 + np.exp((r - 1.0) / edge))


def render_radiographs(
    labels: np.ndarray,
    size: int,
    config: SyntheticConfig,
    rng: np.random.Generator,
    return_lesions: bool = False,
    markers: np.ndarray | None = None,
):
    """uint8 images (n, size, size); with `return_lesions` also each nodule's centre (row, column)
    in pixels, its Gaussian radius in pixels and its peak intensity (NaN for images without one).
    `markers`: which images get `config.marker` (added before the noise, as part of the scene; it
    draws nothing from `rng`, so the other images' pixels do not depend on it)."""
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
    centers, radii, peaks = np.full((n, 2), np.nan), np.full(n, np.nan), np.full(n, np.nan)
    for i in positive:
        mask = (left[i] > 0.7) | (right[i] > 0.7)
        ys_idx, xs_idx = np.nonzero(mask)
        pick = rng.integers(len(ys_idx))
        cy, cx = coords[ys_idx[pick]], coords[xs_idx[pick]]
        r2 = (x[0] - cx) ** 2 + (y[0] - cy) ** 2
        contrast = config.lesion_contrast * rng.uniform(0.8, 1.2)
        spread = radius * rng.uniform(0.8, 1.2)
        lesion[i] = contrast * np.exp(-r2 / (2 * spread**2))
        centers[i], radii[i], peaks[i] = (
            (ys_idx[pick], xs_idx[pick]),
            spread * size / 2,  # coordinates span 2 units across the image
            contrast,
        )
    image = image + lesion
    if markers is not None and markers.any():
        image[markers] += marker_map(config.marker, size, config.marker_contrast)

    # Signal-dependent (quantum-like) plus electronic noise.
    image = image + rng.normal(size=image.shape) * (config.noise * (0.5 + image))
    images = (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return (images, centers, radii, peaks) if return_lesions else images
