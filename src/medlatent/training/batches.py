"""Deterministic, resumable, rank-sharded batches.

Epoch e's order is a permutation drawn from (seed, e) alone, so a run resumed in the middle of an
epoch sees the same batches as an uninterrupted one (`epoch(e, skip=k)` starts at batch k), and
every process of a multi-process run draws the same permutation and takes its own share of it.

The data is either a dict of equally long tensors, held on the training device when it fits in a
set share of the device's memory (small latent datasets: no per-batch transfer at all), or a
map-style Dataset of such dicts (e.g. `cache.LatentDataset`, streamed from memory-mapped shards),
served by a DataLoader with workers and pinned memory.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset


def epoch_order(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


class Batches:
    def __init__(
        self,
        data: dict[str, torch.Tensor] | Dataset,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        device: torch.device | str = "cpu",
        num_workers: int = 0,
        device_memory_share: float = 0.25,
    ):
        self.device = torch.device(device)
        self.seed, self.rank, self.world, self.num_workers = seed, rank, world, num_workers
        self.in_memory = isinstance(data, dict)
        self.num_samples = len(next(iter(data.values()))) if self.in_memory else len(data)
        per_rank = self.num_samples // world
        if per_rank < 1:
            raise ValueError(f"{self.num_samples} training samples cannot be shared by {world} processes")
        self.batch_size = min(batch_size, per_rank)
        self.steps_per_epoch = max(1, per_rank // self.batch_size)
        if self.in_memory and _fits(data, self.device, device_memory_share):
            data = {k: v.to(self.device) for k, v in data.items()}
        self.data = data

    def _indices(self, epoch: int) -> list[torch.Tensor]:
        order = epoch_order(self.num_samples, self.seed, epoch)[self.rank :: self.world]
        return [order[b * self.batch_size : (b + 1) * self.batch_size] for b in range(self.steps_per_epoch)]

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        indices = self._indices(epoch)[skip:]
        if self.in_memory:
            # The epoch's order goes to the data's device in one copy: a blocking copy of each
            # batch's indices would make every step wait for the device.
            where = next(iter(self.data.values())).device
            order = torch.cat(indices).to(where, non_blocking=True) if indices else torch.empty(0, dtype=torch.long)
            for idx in order.split(self.batch_size):
                yield {k: v[idx].to(self.device, non_blocking=True) for k, v in self.data.items()}
            return
        loader = DataLoader(
            self.data,
            batch_sampler=[i.tolist() for i in indices],
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
        )
        for batch in loader:
            yield {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}


def _fits(data: dict[str, torch.Tensor], device: torch.device, share: float) -> bool:
    if device.type != "cuda":
        return True  # CPU tensors already are where the model is
    total = torch.cuda.get_device_properties(device).total_memory
    return sum(v.numel() * v.element_size() for v in data.values()) <= share * total
