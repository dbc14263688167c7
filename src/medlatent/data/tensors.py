"""Inputs as tensors or as streamed Datasets of {"x": tensor} (`cache.LatentDataset`, the audit's
streamed images), and their per-channel statistics: one implementation for every place that
batches them or standardises them."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader


def input_batches(x, batch_size: int):
    """Consecutive batches of a tensor, or of a Dataset's "x" entries, in order."""
    if isinstance(x, torch.Tensor):
        for b in range(0, len(x), batch_size):
            yield x[b : b + batch_size]
    else:
        for batch in DataLoader(x, batch_size=batch_size, shuffle=False):
            yield batch["x"]


def materialise(x, batch_size: int = 256) -> torch.Tensor:
    """A tensor from a tensor or a Dataset of {"x": ...} (for the parts that need one in memory)."""
    return x if isinstance(x, torch.Tensor) else torch.cat(list(input_batches(x, batch_size)))


def channel_sums(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-channel float64 sum and sum of squares of (N, C, H, W) inputs, and the count per channel."""
    b = x.double()
    return b.sum((0, 2, 3)), (b * b).sum((0, 2, 3)), b.shape[0] * b.shape[2] * b.shape[3]


def mean_std(total: torch.Tensor, total_sq: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and unbiased std (as `torch.std`) from `channel_sums` added up."""
    mean = total / count
    return mean, ((total_sq - count * mean * mean) / max(count - 1, 1)).clamp_min(0).sqrt()
