"""The one interface every data source delivers: images at a working size, labels, task, groups.

Images are produced on demand by `load(indices)` as float32 tensors in [0, 1] of shape
(n, channels, size, size), so a source can hold pixels in memory (MedMNIST, synthetic) or read
files lazily (CSV manifests). Labels are validated once, here, so everything downstream trusts them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np
import torch

from ..errors import MedlatentInputError

Task = Literal["binary", "multiclass", "multilabel", "ordinal"]
TASKS: tuple[str, ...] = ("binary", "multiclass", "multilabel", "ordinal")


class ImageStore(Protocol):
    """Something that turns sample indices into a float image batch in [0, 1]."""

    def __len__(self) -> int: ...

    def load(self, indices: np.ndarray) -> torch.Tensor: ...


@dataclass
class ArrayImageStore:
    """Pixels held in memory as an integer or float array of shape (N, H, W) or (N, H, W, C)."""

    array: np.ndarray
    size: int

    def __len__(self) -> int:
        return len(self.array)

    def load(self, indices: np.ndarray) -> torch.Tensor:
        batch = self.array[np.asarray(indices)]
        return to_float_images(batch, self.size)

    @property
    def native_min_side(self) -> int:
        """The shorter side of the stored pixels (smaller than the working size: upscaled)."""
        return int(min(self.array.shape[1:3]))


def uint8_to_float_images(batch: torch.Tensor, size: int) -> torch.Tensor:
    """`to_float_images` for 8-bit pixels already in a tensor, on its device: a GPU receives a
    quarter of the bytes and converts them itself, instead of the host converting every pixel."""
    return _channels_first_at(batch.float() / 255.0, size)  # exactly rounded, as on the host


def to_float_images(batch: np.ndarray, size: int) -> torch.Tensor:
    """(n, H, W[, C]) integer or float pixels -> float32 (n, C, size, size) in [0, 1]."""
    if batch.dtype == np.uint8:
        images = torch.from_numpy(batch.astype(np.float32) / 255.0)
    elif batch.dtype == np.uint16:
        images = torch.from_numpy(batch.astype(np.float32) / 65535.0)
    else:
        images = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
    return _channels_first_at(images, size)


def _channels_first_at(images: torch.Tensor, size: int) -> torch.Tensor:
    """(n, H, W[, C]) float pixels -> (n, C, size, size), resized where the side differs."""
    images = images[:, None] if images.ndim == 3 else images.permute(0, 3, 1, 2)
    if images.shape[-1] != size or images.shape[-2] != size:
        images = resize(images, size)
    return images.contiguous()


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Antialiased bilinear resize to size x size, clamped back into [0, 1]."""
    out = torch.nn.functional.interpolate(
        images, size=(size, size), mode="bilinear", antialias=True, align_corners=False
    )
    return out.clamp_(0.0, 1.0)


@dataclass
class Concepts:
    """Human-readable attributes of each image that a clinician could check and correct (a
    nodule's presence, its size, where it lies): what a concept bottleneck predicts the class
    through. Every concept is binary: names: one per column of `values`, (N, L) of 0 or 1; a
    categorical CSV column of more than two values gives one concept per value ("COLUMN=VALUE")."""

    names: list[str]
    values: np.ndarray
    source: str


@dataclass
class Confounder:
    """An attribute of each image that may go with the label without being the finding (a site, a
    scanner, a text marker): the groups a shortcut audit compares.

    name: what it is ("corner marker", or the CSV column's name); codes: (N,) integer ids into
    `levels`, the names of its values (a binary marker: ["absent", "present"]); mask: where a
    synthetic marker is drawn, (size, size) bool at the working size (None when unknown).
    """

    name: str
    codes: np.ndarray
    levels: list[str]
    mask: np.ndarray | None = None


@dataclass
class ImageDataset:
    """A labelled image collection at one working size.

    labels: (N,) integer class ids for binary, multiclass and ordinal tasks; (N, L) 0/1 for multilabel.
    partitions: the dataset's official split as index arrays ("train", "val", "test"), if it has one.
    patient_ids: (N,) group ids, so that folds never split one patient, if known.
    fingerprint: identifies the content (file hashes, generator parameters) for cache keys.
    lesions: where the finding is, for datasets that know it (the synthetic benchmark):
        {"center": (N, 2) row and column in pixels at the working size, "radius": (N,) pixels},
        NaN for images without one; used to check where explanation maps point.
    confounder: a spurious attribute of each image, if known (the synthetic benchmark's marker, a
        CSV column given as --confounder-column); see `Confounder`.
    concepts: binary human-readable attributes of each image, if known (the synthetic benchmark's
        nodule and marker, CSV columns given as --concept-column); see `Concepts`.
    """

    name: str
    task: Task
    class_names: list[str]
    labels: np.ndarray
    images: ImageStore
    size: int
    channels: int
    fingerprint: str
    partitions: dict[str, np.ndarray] | None = None
    patient_ids: np.ndarray | None = None
    source: dict = field(default_factory=dict)
    lesions: dict[str, np.ndarray] | None = None
    confounder: Confounder | None = None
    concepts: Concepts | None = None

    def __post_init__(self) -> None:
        validate_labels(self.labels, self.task, len(self.class_names), where=self.name)
        if self.confounder is not None and len(self.confounder.codes) != len(self.labels):
            raise MedlatentInputError(f"{self.name}: the confounder does not match the number of images")
        if self.concepts is not None and len(self.concepts.values) != len(self.labels):
            raise MedlatentInputError(f"{self.name}: the concepts do not match the number of images")
        if len(self.images) != len(self.labels):
            raise MedlatentInputError(f"{self.name}: {len(self.images)} images but {len(self.labels)} labels")
        if self.patient_ids is not None and len(self.patient_ids) != len(self.labels):
            raise MedlatentInputError(f"{self.name}: patient ids do not match the number of images")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_outputs(self) -> int:
        """Logits a classifier needs: one per class (one per label for multilabel)."""
        return len(self.class_names)

    def load(self, indices: np.ndarray) -> torch.Tensor:
        return self.images.load(np.asarray(indices))

    def describe(self) -> dict:
        counts = (
            self.labels.sum(0) if self.task == "multilabel" else np.bincount(self.labels, minlength=self.num_outputs)
        )
        return {
            "name": self.name,
            "task": self.task,
            "class_names": self.class_names,
            "num_samples": len(self),
            "size": self.size,
            "channels": self.channels,
            "class_counts": counts.tolist(),
            "partitions": {k: len(v) for k, v in (self.partitions or {}).items()},
            "has_patient_ids": self.patient_ids is not None,
            "fingerprint": self.fingerprint,
            # The smallest native image side seen (CSV files: among those loaded so far).
            "native_min_side": getattr(self.images, "native_min_side", None),
            **self.source,
        }


def validate_labels(labels: np.ndarray, task: str, num_classes: int, where: str) -> None:
    """Fail with one line if labels do not fit the task."""
    if task not in TASKS:
        raise MedlatentInputError(f"{where}: unknown task {task!r}; use one of {', '.join(TASKS)}")
    if not np.issubdtype(labels.dtype, np.number):
        raise MedlatentInputError(f"{where}: labels must be numeric, got {labels.dtype}")
    if labels.dtype.kind == "f" and not np.isfinite(labels).all():
        raise MedlatentInputError(f"{where}: labels contain NaN or Inf; fix or drop those rows")
    if task == "multilabel":
        if labels.ndim != 2 or labels.shape[1] != num_classes:
            raise MedlatentInputError(
                f"{where}: a multilabel task needs labels of shape (N, {num_classes}), got {labels.shape}"
            )
        if not np.isin(labels, (0, 1)).all():
            raise MedlatentInputError(f"{where}: multilabel labels must be 0 or 1")
        return
    if labels.ndim != 1:
        raise MedlatentInputError(f"{where}: a {task} task needs one label per image, got shape {labels.shape}")
    if labels.dtype.kind == "f" and not np.all(labels == np.round(labels)):
        raise MedlatentInputError(f"{where}: {task} labels must be whole class ids, found fractional values")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise MedlatentInputError(
            f"{where}: {task} labels must lie in 0..{num_classes - 1}, found {labels.min()}..{labels.max()}"
        )
    if task == "binary" and num_classes != 2:
        raise MedlatentInputError(f"{where}: a binary task has 2 classes, got {num_classes}")


def check_finite(images: torch.Tensor, where: str) -> torch.Tensor:
    if not torch.isfinite(images).all():
        raise MedlatentInputError(f"{where}: image contains NaN or Inf; fix or remove it")
    return images


def fingerprint(*parts: object) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(repr(part).encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]
