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
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..autoencoders.base import Autoencoder
from ..data.base import ImageDataset, check_finite
from ..device import autocast
from ..io import atomic_write, atomic_write_json

FORMAT_VERSION = 1
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

    @property
    def channel_mean(self) -> torch.Tensor:
        return torch.tensor(self.meta["channel_mean"])

    @property
    def channel_std(self) -> torch.Tensor:
        return torch.tensor(self.meta["channel_std"])

    def _shards(self):
        for k in range(self.meta["num_shards"]):
            yield load_file(self.folder / shard_name(k))

    def latents(self) -> torch.Tensor:
        return torch.cat([s["latents"] for s in self._shards()])

    def reconstructions(self) -> torch.Tensor:
        if not self.meta["key"]["reconstruct"]:
            raise ValueError(f"cache entry {self.folder} was built without reconstructions")
        return torch.cat([s["reconstructions"].float() for s in self._shards()])

    def indices(self) -> np.ndarray:
        return np.concatenate([s["indices"].numpy() for s in self._shards()])


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
            return CacheEntry(folder, json.loads((folder / META).read_text()))
        folder.mkdir(parents=True, exist_ok=True)

        indices = np.asarray(indices, dtype=np.int64)
        num_shards = max(1, -(-len(indices) // self.shard_size))
        todo = [k for k in range(num_shards) if not self._shard_ok(folder, k, indices)]
        start = time.perf_counter()
        autoencoder = autoencoder.to(device).eval()
        bar = tqdm(
            total=sum(len(indices[k * self.shard_size : (k + 1) * self.shard_size]) for k in todo),
            desc=f"encode {dataset.name}/{partition} with {autoencoder.spec}",
            unit="img",
            disable=not self.progress,
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
                    recons.append(autoencoder.restore(recon, dataset.channels, dataset.size).half())
                bar.update(len(batch_indices))
            tensors = {"latents": torch.cat(latents).contiguous(), "indices": torch.from_numpy(shard_indices.copy())}
            if reconstruct:
                tensors["reconstructions"] = torch.cat(recons).contiguous()
            if not torch.isfinite(tensors["latents"]).all():
                raise FloatingPointError(f"{autoencoder.spec} produced NaN or Inf latents on {dataset.name}/{partition}")
            atomic_write(folder / shard_name(k), lambda tmp, t=tensors: save_file(t, str(tmp)))
        bar.close()

        entry = CacheEntry(folder, {"key": key, "num_shards": num_shards, "num_samples": len(indices)})
        latents = entry.latents()
        dims = [0, 2, 3]
        entry.meta.update(
            {
                "latent_shape": list(latents.shape[1:]),
                "channel_mean": latents.mean(dims).tolist(),
                "channel_std": latents.std(dims).tolist(),
                "encode_seconds": time.perf_counter() - start,
                "encoded_now": len(todo),
            }
        )
        atomic_write_json(folder / META, entry.meta)
        return entry

    def _shard_ok(self, folder: Path, k: int, indices: np.ndarray) -> bool:
        path = folder / shard_name(k)
        if not path.is_file():
            return False
        try:
            stored = load_file(path)["indices"].numpy()
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
