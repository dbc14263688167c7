"""Latent cache: each (dataset, partition, autoencoder, preprocessing) is encoded once.

An entry is a folder named by a key that changes when any input changes. It holds shards
`shard-00000.safetensors`, each written atomically with its latents, reconstructions and sample
indices, and `meta.json`, written last, with per-channel latent mean and std. An entry without
`meta.json` is incomplete: a later run keeps its finished shards and encodes only the rest,
so a killed encode resumes where it stopped and never looks complete.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from .. import distributed
from ..autoencoders.base import Autoencoder
from ..data.base import ImageDataset, check_finite
from ..data.tensors import channel_sums, mean_std
from ..device import autocast
from ..io import atomic_write, atomic_write_json

FORMAT_VERSION = 2  # 2: per-shard channel sums, shard_size in meta.json, 16-bit fixed-point reconstructions
PIXEL_SCALE = 65535  # reconstructions are stored as round(x * 65535) in uint16
META = "meta.json"


def default_cache_dir() -> Path:
    import os

    return Path(os.environ.get("MEDLATENT_HOME", Path.home() / ".cache" / "medlatent")).expanduser() / "latents"


def cache_key(dataset: ImageDataset, partition: str, indices: np.ndarray, autoencoder: Autoencoder, precision: str, reconstruct: bool) -> dict:
    """Everything that determines the cached bytes, as plain data."""
    return {
        "format_version": FORMAT_VERSION,
        "dataset": dataset.fingerprint,
        "partition": partition,
        "indices": hashlib.sha256(np.ascontiguousarray(indices, dtype=np.int64).tobytes()).hexdigest()[:16],
        "autoencoder": autoencoder.spec,
        "autoencoder_hash": autoencoder.content_hash,
        "preprocessing": {
            "size": dataset.size,
            "encode_size": autoencoder.working_size(dataset.size),
            "dataset_channels": dataset.channels,
            "autoencoder_channels": autoencoder.image_channels,
            "input_range": list(autoencoder.input_range),
            "scaling_factor": autoencoder.scaling_factor,
            "shift_factor": autoencoder.shift_factor,
        },
        "precision": precision,
        "reconstruct": reconstruct,
    }


@dataclass
class CacheEntry:
    folder: Path
    meta: dict
    reused: bool = False  # complete before this run: nothing was encoded

    @property
    def channel_mean(self) -> torch.Tensor:
        return torch.tensor(self.meta["channel_mean"])

    @property
    def channel_std(self) -> torch.Tensor:
        return torch.tensor(self.meta["channel_std"])

    @property
    def shard_sizes(self) -> list[int]:
        size, n = self.meta["shard_size"], self.meta["num_samples"]
        return [min(size, n - k * size) for k in range(self.meta["num_shards"])]

    def read(self, names: tuple[str, ...] = ("latents", "reconstructions", "indices")) -> dict[str, torch.Tensor]:
        """The named tensors of every shard, concatenated; each shard is opened and read once."""
        if "reconstructions" in names and not self.meta["key"]["reconstruct"]:
            raise ValueError(f"cache entry {self.folder} was built without reconstructions")
        parts: dict[str, list] = {name: [] for name in names}
        for k in range(self.meta["num_shards"]):
            with safe_open(self.folder / shard_name(k), framework="pt") as shard:
                for name in names:
                    parts[name].append(shard.get_tensor(name))
        return {name: torch.cat(tensors) for name, tensors in parts.items()}

    def latents(self) -> torch.Tensor:
        return self.read(("latents",))["latents"]

    def reconstructions(self) -> torch.Tensor:
        return from_fixed_point(self.read(("reconstructions",))["reconstructions"])

    def indices(self) -> np.ndarray:
        return self.read(("indices",))["indices"].numpy()

    def dataset(self, name: str = "latents", transform=None) -> "LatentDataset":
        """The entry's `name` tensors as a streamed Dataset (see `LatentDataset`)."""
        return LatentDataset(self, name, transform)


class LatentDataset(Dataset):
    """The latents (or reconstructions) of one or more cache entries, in order, as a map-style
    Dataset of {"x": tensor, "index": dataset index}, read from memory-mapped shards: nothing is
    loaded up front, and at most `open_shards` shards are mapped at a time (per DataLoader worker),
    so a dataset whose latents do not fit in memory trains through a DataLoader. `transform`
    (e.g. a fitted `SpaceScaler.transform`) is applied per sample; `subset(positions)` and
    `with_transform(f)` return restricted or transformed views."""

    def __init__(self, entries: CacheEntry | list[CacheEntry], name: str = "latents", transform=None, positions: np.ndarray | None = None, open_shards: int = 2):
        self.entries = entries if isinstance(entries, list) else [entries]
        self.name, self.transform, self.open_shards = name, transform, open_shards
        self.shards = [(e.folder / shard_name(k)) for e in self.entries for k in range(e.meta["num_shards"])]
        self.starts = np.cumsum([0] + [size for e in self.entries for size in e.shard_sizes])
        self.positions = np.arange(self.starts[-1]) if positions is None else np.asarray(positions)
        self._handles: dict[int, object] = {}

    def __len__(self) -> int:
        return len(self.positions)

    def subset(self, positions: np.ndarray) -> "LatentDataset":
        return LatentDataset(self.entries, self.name, self.transform, self.positions[positions], self.open_shards)

    def with_transform(self, transform) -> "LatentDataset":
        return LatentDataset(self.entries, self.name, transform, self.positions, self.open_shards)

    def _shard(self, k: int):
        if k not in self._handles:
            if len(self._handles) >= self.open_shards:
                self._handles.pop(next(iter(self._handles)))  # unmap the oldest
            self._handles[k] = safe_open(self.shards[k], framework="pt")
        return self._handles[k]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        position = int(self.positions[i])
        k = int(np.searchsorted(self.starts, position, side="right") - 1)
        row = position - int(self.starts[k])
        shard = self._shard(k)
        x = shard.get_slice(self.name)[row : row + 1]
        x = (from_fixed_point(x) if self.name == "reconstructions" else x.float())[0]
        index = shard.get_slice("indices")[row : row + 1][0]
        if self.transform is not None:
            x = self.transform(x[None])[0]
        return {"x": x, "index": index}

    def __getstate__(self) -> dict:  # DataLoader workers open their own maps
        return {**self.__dict__, "_handles": {}}


def to_fixed_point(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] as uint16, round(x * 65535): half the bytes of float32, and exact for 8- and
    16-bit sources (k / 255 = 257 k / 65535), so a lossless autoencoder's reconstruction reads back
    equal to the image; float16 would round 16-bit pixels."""
    return (images.float().clamp(0, 1) * PIXEL_SCALE).round().to(torch.uint16)


def from_fixed_point(stored: torch.Tensor) -> torch.Tensor:
    return stored.float() / PIXEL_SCALE


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


class LatentCache:
    def __init__(self, root: str | Path | None = None, shard_size: int = 1024, batch_size: int = 64, progress: bool = True):
        self.root = Path(root).expanduser() if root else default_cache_dir()
        self.shard_size = shard_size
        self.batch_size = batch_size
        self.progress = progress

    def encode(
        self,
        dataset: ImageDataset,
        partition: str,
        indices: np.ndarray,
        autoencoder: Autoencoder,
        device: torch.device,
        reconstruct: bool = True,
        mixed_precision: bool = True,
    ) -> CacheEntry:
        """Return the entry, encoding whatever is missing."""
        precision = "autocast" if (mixed_precision and device.type == "cuda") else "fp32"
        key = cache_key(dataset, partition, indices, autoencoder, precision, reconstruct)
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        folder = self.root / f"{dataset.name}-{partition}-{digest}"
        if (folder / META).is_file():
            return CacheEntry(folder, json.loads((folder / META).read_text()), reused=True)
        folder.mkdir(parents=True, exist_ok=True)

        indices = np.asarray(indices, dtype=np.int64)
        num_shards = max(1, -(-len(indices) // self.shard_size))
        # Under a multi-process launch each process encodes its own shards (every world_size-th);
        # the main process writes meta.json once all are written, from the shards' channel sums.
        todo = [k for k in distributed.mine(list(range(num_shards))) if not self._shard_ok(folder, k, indices)]
        start = time.perf_counter()
        autoencoder = autoencoder.to(device).eval()
        bar = tqdm(
            total=sum(len(indices[k * self.shard_size : (k + 1) * self.shard_size]) for k in todo),
            desc=f"encode {dataset.name}/{partition} with {autoencoder.spec}",
            unit="img",
            disable=not (self.progress and distributed.is_main()),
        )
        for k in todo:
            shard_indices = indices[k * self.shard_size : (k + 1) * self.shard_size]
            latents, recons = [], []
            for b in range(0, len(shard_indices), self.batch_size):
                batch_indices = shard_indices[b : b + self.batch_size]
                images = check_finite(dataset.load(batch_indices), dataset.name)
                z, recon = encode_batch(autoencoder, images, device, reconstruct, mixed_precision)
                latents.append(z)
                if reconstruct:
                    recons.append(to_fixed_point(autoencoder.restore(recon, dataset.channels, dataset.size)))
                bar.update(len(batch_indices))
            z = torch.cat(latents).contiguous()
            # Per-channel sums kept in the shard: the entry's statistics need no second pass.
            channel_sum, channel_sumsq, _ = channel_sums(z)
            tensors = {"latents": z, "indices": torch.from_numpy(shard_indices.copy()), "channel_sum": channel_sum, "channel_sumsq": channel_sumsq}
            if reconstruct:
                tensors["reconstructions"] = torch.cat(recons).contiguous()
            if not torch.isfinite(tensors["latents"]).all():
                raise FloatingPointError(f"{autoencoder.spec} produced NaN or Inf latents on {dataset.name}/{partition}")
            atomic_write(folder / shard_name(k), lambda tmp, t=tensors: save_file(t, str(tmp)))
        bar.close()
        distributed.barrier()
        if not distributed.is_main():
            distributed.barrier()  # until meta.json is written
            return CacheEntry(folder, json.loads((folder / META).read_text()))

        entry = CacheEntry(folder, {"key": key, "num_shards": num_shards, "num_samples": len(indices), "shard_size": self.shard_size})
        total, total_sq, count, shape = 0.0, 0.0, 0, None
        for k in range(num_shards):
            with safe_open(folder / shard_name(k), framework="pt") as shard:
                total = total + shard.get_tensor("channel_sum")
                total_sq = total_sq + shard.get_tensor("channel_sumsq")
                latents = shard.get_slice("latents")
                shape = latents.get_shape()
                count += shape[0] * shape[2] * shape[3]
        mean, std = mean_std(total, total_sq, count)
        entry.meta.update(
            {
                "latent_shape": list(shape[1:]),
                "channel_mean": mean.tolist(),
                "channel_std": std.tolist(),
                "encode_seconds": time.perf_counter() - start,
                "encoded_now": len(todo),
            }
        )
        atomic_write_json(folder / META, entry.meta)
        distributed.barrier()
        return entry

    def _shard_ok(self, folder: Path, k: int, indices: np.ndarray) -> bool:
        path = folder / shard_name(k)
        if not path.is_file():
            return False
        try:
            with safe_open(path, framework="pt") as shard:
                stored = shard.get_tensor("indices").numpy()
                shard.get_tensor("channel_sum")  # written by this format
        except Exception:  # noqa: BLE001 - a corrupt shard is simply encoded again
            return False
        return np.array_equal(stored, indices[k * self.shard_size : (k + 1) * self.shard_size])


@torch.inference_mode()
def encode_batch(autoencoder: Autoencoder, images: torch.Tensor, device: torch.device, reconstruct: bool, mixed_precision: bool = True):
    """Images (n, C, S, S) in [0, 1] -> (latents on CPU as float32, decoded images or None)."""
    x = autoencoder.prepare(images).to(device, non_blocking=True)
    with autocast(device, mixed_precision):
        z = autoencoder.encode(x)
        recon = autoencoder.decode(z).float().cpu() if reconstruct else None
    return z.float().cpu(), recon
