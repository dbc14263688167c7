"""Train/val/test splits: the dataset's official one, or seeded K folds stratified by label and
grouped by patient where patient ids exist."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from ..errors import MedlatentInputError
from .base import ImageDataset


@dataclass(frozen=True)
class Split:
    name: str
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


def stratify_key(dataset: ImageDataset) -> np.ndarray:
    """A single label per sample to stratify on (multi-label: the rarest positive label, or none)."""
    if dataset.task != "multilabel":
        return dataset.labels
    labels = dataset.labels
    prevalence = labels.mean(0)
    rarest = np.where(labels.any(1), np.argmin(np.where(labels == 1, prevalence, np.inf), axis=1), -1)
    return rarest + 1


def _kfold(key: np.ndarray, groups: np.ndarray | None, folds: int, seed: int):
    if groups is not None:
        return StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed).split(key, key, groups)
    return StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(key, key)


def make_splits(
    dataset: ImageDataset, folds: int | None = None, seed: int = 0, val_fraction: float = 0.15, train_limit: int = 0
) -> list[Split]:
    """`folds=None` uses the official split (a dataset without one needs --folds). `train_limit`:
    keep at most that many training images of each split (see `limit_train`)."""
    splits = _splits(dataset, folds, seed, val_fraction)
    return (
        [limit_train(split, stratify_key(dataset), train_limit, seed) for split in splits] if train_limit else splits
    )


def limit_train(split: Split, key: np.ndarray, limit: int, seed: int) -> Split:
    """The split with a class-stratified random subset of `limit` training images (validation and
    test unchanged); its name says so, so that cache entries and saved models tell them apart."""
    if limit >= len(split.train):
        return split
    from sklearn.model_selection import train_test_split

    try:
        kept = train_test_split(split.train, train_size=limit, stratify=key[split.train], random_state=seed)[0]
    except ValueError as err:  # fewer images than classes
        raise MedlatentInputError(f"--train-limit {limit}: too few images to keep every class ({err})") from None
    return Split(f"{split.name}-train{limit}", np.sort(kept), split.val, split.test)


def _splits(dataset: ImageDataset, folds: int | None, seed: int, val_fraction: float) -> list[Split]:
    key = stratify_key(dataset)
    groups = dataset.patient_ids
    if folds is None or folds <= 1:
        if dataset.partitions is None:
            raise MedlatentInputError(f"{dataset.name} has no official split; pass --folds K (K >= 2)")
        train = dataset.partitions["train"]
        val = dataset.partitions.get("val")
        if val is None:
            train, val = _carve_val(train, key, groups, val_fraction, seed)
        return [Split("official", train, val, dataset.partitions["test"])]
    counts = np.bincount(key - key.min())
    if counts[counts > 0].min() < folds:
        raise MedlatentInputError(
            f"--folds {folds}: the rarest class of {dataset.name} "
            f"has {counts[counts > 0].min()} samples; use fewer folds"
        )
    splits = []
    everything = np.arange(len(dataset))
    for k, (rest, test) in enumerate(_kfold(key, groups, folds, seed)):
        train, val = _carve_val(everything[rest], key, groups, val_fraction, seed + k)
        splits.append(Split(f"fold{k}", train, val, everything[test]))
    return splits


def _carve_val(indices: np.ndarray, key: np.ndarray, groups: np.ndarray | None, fraction: float, seed: int):
    parts = max(2, round(1.0 / fraction))
    sub_groups = groups[indices] if groups is not None else None
    keep, val = next(_kfold(key[indices], sub_groups, parts, seed))
    return indices[keep], indices[val]
