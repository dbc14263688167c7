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
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .. import distributed
from ..autoencoders.base import Autoencoder
from ..data.base import ArrayImageStore, ImageDataset, uint8_to_float_images
from ..data.tensors import channel_sums, mean_std
from ..device import autocast
from ..errors import MedlatentInputError
from ..io import atomic_write, atomic_write_json

FORMAT_VERSION = 2  # 2: per-shard channel sums, shard_size in meta.json, 16-bit fixed-point reconstructions
PIXEL_SCALE = 65535  # reconstructions are stored as round(x * 65535) in uint16
META = "meta.json"
MIN_SHARDS = 8
MAX_SHARD_SIZE = 1024
LOAD_BYTES = 64 << 20  # images read per chunk when the main thread reads them


def default_cache_dir() -> Path:
    return Path(os.environ.get("MEDLATENT_HOME", Path.home() / ".cache" / "medlatent")).expanduser() / "latents"


def cache_key(
    dataset: ImageDataset,
    partition: str,
    indices: np.ndarray,
    autoencoder: Autoencoder,
    precision: str,
    reconstruct: bool,
) -> dict:
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

    def dataset(self, name: str = "latents", transform=None) -> LatentDataset:
        """The entry's `name` tensors as a streamed Dataset (see `LatentDataset`)."""
        return LatentDataset(self, name, transform)


class LatentDataset(Dataset):
    """The latents (or reconstructions) of one or more cache entries, in order, as a map-style
    Dataset of {"x": tensor, "index": dataset index}, read from memory-mapped shards: nothing is
    loaded up front, and at most `open_shards` shards are mapped at a time (per DataLoader worker),
    so a dataset whose latents do not fit in memory trains through a DataLoader. `transform`
    (e.g. a fitted `SpaceScaler.transform`) is applied per sample; `subset(positions)` and
    `with_transform(f)` return restricted or transformed views."""

    def __init__(
        self,
        entries: CacheEntry | list[CacheEntry],
        name: str = "latents",
        transform=None,
        positions: np.ndarray | None = None,
        open_shards: int = 2,
    ):
        self.entries = entries if isinstance(entries, list) else [entries]
        self.name, self.transform, self.open_shards = name, transform, open_shards
        self.shards = [(e.folder / shard_name(k)) for e in self.entries for k in range(e.meta["num_shards"])]
        self.starts = np.cumsum([0] + [size for e in self.entries for size in e.shard_sizes])
        self.positions = np.arange(self.starts[-1]) if positions is None else np.asarray(positions)
        self._handles: dict[int, object] = {}

    def __len__(self) -> int:
        return len(self.positions)

    def subset(self, positions: np.ndarray) -> LatentDataset:
        return LatentDataset(self.entries, self.name, self.transform, self.positions[positions], self.open_shards)

    def with_transform(self, transform) -> LatentDataset:
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
    """shard_size: samples per shard; by default an entry has at least `MIN_SHARDS` shards of at most
    1024 samples (multiples of the batch), because the last shard's write is the one thing nothing
    overlaps: measured on an H100 at 512 px, one 1024-sample shard of TAEF2 latents (0.5 GB) added
    a third to the encoding time.
    num_workers: DataLoader workers that read and decode images while the device encodes. "auto":
    up to 4 on CUDA for images read from files (PNG, DICOM); none for images held in memory, where
    reading is a copy that the main thread does while the device works (workers measured +50%
    slower there on the H100 at 128 px: their start costs more than they save), and none on CPU,
    where they would compete with the encoder for the cores."""

    def __init__(
        self,
        root: str | Path | None = None,
        shard_size: int | None = None,
        batch_size: int = 64,
        progress: bool = True,
        num_workers: int | str = "auto",
    ):
        self.root = Path(root).expanduser() if root else default_cache_dir()
        self.shard_size = shard_size
        self.batch_size = batch_size
        self.progress = progress
        self.num_workers = num_workers
        self.last_timing: dict[
            str, float
        ] = {}  # the last encode's loop time and its writer's breakdown (`_ShardWriter.timing`)

    def workers_for(self, device: torch.device, dataset: ImageDataset | None = None) -> int:
        if self.num_workers != "auto":
            return int(self.num_workers)
        in_memory = dataset is None or isinstance(dataset.images, ArrayImageStore)
        return min(4, max((os.cpu_count() or 1) - 1, 0)) if device.type == "cuda" and not in_memory else 0

    @staticmethod
    def reads_uint8(device: torch.device, dataset: ImageDataset) -> bool:
        """Whether 8-bit pixels held in memory go to the device as they are, converted there: on a
        GPU, a quarter of the bytes to copy and no conversion of every pixel on the host."""
        return (
            device.type == "cuda"
            and isinstance(dataset.images, ArrayImageStore)
            and dataset.images.array.dtype == np.uint8
        )

    def shard_size_for(self, num_samples: int) -> int:
        if self.shard_size is not None:
            return self.shard_size
        per_shard = -(-num_samples // MIN_SHARDS)
        return min(MAX_SHARD_SIZE, max(self.batch_size, -(-per_shard // self.batch_size) * self.batch_size))

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
        """Return the entry, encoding whatever is missing.

        The device never waits on the disk: workers read the next batches into pinned memory, each
        shard stays on the device until it is complete (its channel sums computed there), then one
        non-blocking copy moves it to the host and a writer thread saves it while the next shard is
        encoded. Nothing synchronises the device per batch."""
        precision = "autocast" if (mixed_precision and device.type == "cuda") else "fp32"
        key = cache_key(dataset, partition, indices, autoencoder, precision, reconstruct)
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        folder = self.root / f"{dataset.name}-{partition}-{digest}"
        if (folder / META).is_file():
            return CacheEntry(folder, json.loads((folder / META).read_text()), reused=True)
        folder.mkdir(parents=True, exist_ok=True)

        indices = np.asarray(indices, dtype=np.int64)
        size = self.shard_size_for(len(indices))
        num_shards = max(1, -(-len(indices) // size))
        # Under a multi-process launch each process encodes its own shards (every world_size-th);
        # the main process writes meta.json once all are written, from the shards' channel sums.
        todo = [k for k in distributed.mine(list(range(num_shards))) if not self._shard_ok(folder, k, indices, size)]
        start = time.perf_counter()
        autoencoder = autoencoder.to(device).eval()
        timing = self._encode_shards(
            dataset, partition, autoencoder, device, folder, indices, size, todo, reconstruct, mixed_precision
        )
        self.last_timing = {"encode_loop_seconds": time.perf_counter() - start, **timing}
        distributed.barrier()
        if not distributed.is_main():
            distributed.barrier()  # until meta.json is written
            return CacheEntry(folder, json.loads((folder / META).read_text()))
        entry = self._write_meta(folder, key, len(indices), size, num_shards, start, encoded_now=len(todo))
        distributed.barrier()
        return entry

    def _plan_batches(
        self, dataset: ImageDataset, indices: np.ndarray, todo: list[int], size: int, device: torch.device
    ) -> tuple[list[tuple[int, np.ndarray]], int]:
        """The chunks of images to read, as (shard, dataset indices), and the DataLoader workers that read them."""
        # Images are read in chunks: a batch each when workers read files, else up to LOAD_BYTES at a
        # time (one pinned buffer and one copy for many batches: the main thread's per-batch cost
        # is what limits a fast encoder on small images).
        workers = self.workers_for(device, dataset)
        per_image = dataset.channels * dataset.size**2 * 4
        chunk = (
            self.batch_size
            if workers
            else max(1, min(size, LOAD_BYTES // per_image) // self.batch_size) * self.batch_size
        )
        batches = [
            (k, shard[b : b + chunk])
            for k in todo
            for shard in [indices[k * size : (k + 1) * size]]
            for b in range(0, len(shard), chunk)
        ]
        return batches, workers if len(batches) > 1 else 0

    def _encode_shards(
        self,
        dataset: ImageDataset,
        partition: str,
        autoencoder: Autoencoder,
        device: torch.device,
        folder: Path,
        indices: np.ndarray,
        size: int,
        todo: list[int],
        reconstruct: bool,
        mixed_precision: bool,
    ) -> dict[str, float]:
        """Encode the shards `todo` of the entry in `folder` and save them (see `encode`); returns
        the writer's timing."""
        batches, workers = self._plan_batches(dataset, indices, todo, size, device)
        raw = self.reads_uint8(device, dataset)
        loader = DataLoader(
            _ImageBatches(dataset, batches, raw),
            batch_size=None,
            num_workers=workers,
            pin_memory=device.type == "cuda",
            prefetch_factor=4 if workers else None,
        )
        bar = tqdm(
            total=sum(len(b) for _, b in batches),
            desc=f"encode {dataset.name}/{partition} with {autoencoder.spec}",
            unit="img",
            disable=not (self.progress and distributed.is_main()),
        )
        writer = _ShardWriter(
            folder,
            f"{autoencoder.spec} produced NaN or Inf latents on {dataset.name}/{partition}",
            f"{dataset.name}: image contains NaN or Inf; fix or remove it",
        )
        try:
            left = {k: sum(1 for j, _ in batches if j == k) for k in todo}
            latents, recons, finite = [], [], torch.ones((), dtype=torch.bool, device=device)
            for (k, batch_indices), images in zip(batches, loader, strict=False):
                images = images.to(device, non_blocking=True)
                if raw:
                    images = uint8_to_float_images(images, dataset.size)
                # On the device, read by the writer (no synchronisation here). One reduction: a sum is
                # finite exactly when every pixel is (pixels in [0, 1] cannot overflow it).
                finite = finite & images.sum().isfinite()
                for part in images.split(self.batch_size):
                    z, recon = encode_batch(autoencoder, part, device, reconstruct, mixed_precision)
                    latents.append(z)
                    if reconstruct:
                        recons.append(to_fixed_point(autoencoder.restore(recon, dataset.channels, dataset.size)))
                bar.update(len(batch_indices))
                left[k] -= 1
                if left[k] == 0:
                    shard_indices = torch.from_numpy(indices[k * size : (k + 1) * size].copy())
                    writer.submit(
                        k, torch.cat(latents), torch.cat(recons) if reconstruct else None, shard_indices, finite
                    )
                    latents, recons, finite = [], [], torch.ones((), dtype=torch.bool, device=device)
            writer.wait()
        finally:
            writer.close()
            bar.close()
        return writer.timing

    @staticmethod
    def _write_meta(
        folder: Path, key: dict, num_samples: int, size: int, num_shards: int, start: float, encoded_now: int
    ) -> CacheEntry:
        """meta.json, written last: the entry's per-channel latent mean and std, from its shards' channel sums."""
        entry = CacheEntry(
            folder, {"key": key, "num_shards": num_shards, "num_samples": num_samples, "shard_size": size}
        )
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
                "encoded_now": encoded_now,
            }
        )
        atomic_write_json(folder / META, entry.meta)
        return entry

    def _shard_ok(self, folder: Path, k: int, indices: np.ndarray, size: int) -> bool:
        path = folder / shard_name(k)
        if not path.is_file():
            return False
        try:
            with safe_open(path, framework="pt") as shard:
                stored = shard.get_tensor("indices").numpy()
                shard.get_tensor("channel_sum")  # written by this format
        except Exception:  # noqa: BLE001 - a corrupt shard is simply encoded again
            return False
        return np.array_equal(stored, indices[k * size : (k + 1) * size])


@torch.inference_mode()
def encode_batch(
    autoencoder: Autoencoder,
    images: torch.Tensor,
    device: torch.device,
    reconstruct: bool,
    mixed_precision: bool = True,
):
    """Images (n, C, S, S) in [0, 1] -> (float32 latents, decoded images or None), on `device`.
    The copy is non-blocking (from pinned memory when the loader pins) and the channels are adapted
    on the device, where a grey image repeated to three channels is not copied three times."""
    x = autoencoder.prepare(images.to(device, non_blocking=True))
    with autocast(device, mixed_precision):
        z = autoencoder.encode(x)
        recon = autoencoder.decode(z).float() if reconstruct else None
    return z.float(), recon


class _ImageBatches(Dataset):
    """Batch i of an encode, read and converted in a DataLoader worker. Their finiteness is checked
    on the device, not here: a pass over every pixel on the host is what the encoder waits for when
    it is fast (small images on a GPU)."""

    def __init__(self, dataset: ImageDataset, batches: list[tuple[int, np.ndarray]], raw: bool = False):
        self.dataset, self.batches, self.raw = (
            dataset,
            batches,
            raw,
        )  # raw: the stored 8-bit pixels (`LatentCache.reads_uint8`)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> torch.Tensor:
        if self.raw:
            return torch.from_numpy(self.dataset.images.array[np.asarray(self.batches[i][1])])
        return self.dataset.load(self.batches[i][1])


class _ShardWriter:
    """Saves complete shards in a background thread, at most `pending` behind the encoder.

    A shard's tensors are still on the device when submitted: its channel sums and finiteness
    are computed there, everything is copied to (pinned) host memory without blocking, and the
    thread waits on a CUDA event for that copy before it writes. An error in the thread (NaN
    latents or images, a full disk) is raised in the caller at the next `submit` or at `wait`."""

    def __init__(self, folder: Path, nonfinite_message: str, bad_images_message: str, pending: int = 2):
        self.folder, self.nonfinite_message, self.bad_images_message, self.pending = (
            folder,
            nonfinite_message,
            bad_images_message,
            pending,
        )
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medlatent-shard-writer")
        self.futures: list = []
        # Where the time goes (benchmarks/encode.py): the thread waiting for a shard's copy from the
        # device, the thread saving, and the encoder waiting for the thread.
        self.timing = {"copy_wait_seconds": 0.0, "save_seconds": 0.0, "encoder_blocked_seconds": 0.0}

    def submit(
        self,
        k: int,
        latents: torch.Tensor,
        reconstructions: torch.Tensor | None,
        indices: torch.Tensor,
        images_finite: torch.Tensor,
    ) -> None:
        """images_finite: whether the shard's images were all finite (a device flag, read in the thread)."""
        if latents.device.type not in ("cpu", "cuda"):  # MPS has no float64 for the sums
            latents, reconstructions = latents.cpu(), None if reconstructions is None else reconstructions.cpu()
        channel_sum, channel_sumsq, _ = channel_sums(latents)  # on the device: no second pass later
        finite = (
            channel_sum.isfinite().all() & channel_sumsq.isfinite().all()
        )  # float64 sums: NaN or Inf anywhere shows in them, and float32 values cannot overflow them
        tensors = {
            "latents": latents,
            "channel_sum": channel_sum,
            "channel_sumsq": channel_sumsq,
            "finite": finite,
            "images_finite": images_finite.to(latents.device),
        }
        if reconstructions is not None:
            tensors["reconstructions"] = reconstructions
        on_cuda = latents.device.type == "cuda"
        host = {name: t.to("cpu", non_blocking=True) if on_cuda else t for name, t in tensors.items()}
        copied = None
        if on_cuda:
            copied = torch.cuda.Event()
            copied.record()
        started = time.perf_counter()
        while len(self.futures) >= self.pending:
            self.futures.pop(0).result()
        self.timing["encoder_blocked_seconds"] += time.perf_counter() - started
        self.futures.append(self.pool.submit(self._write, k, host, indices, copied))

    def _write(self, k: int, host: dict[str, torch.Tensor], indices: torch.Tensor, copied) -> None:
        started = time.perf_counter()
        if copied is not None:
            copied.synchronize()
        self.timing["copy_wait_seconds"] += time.perf_counter() - started
        started = time.perf_counter()
        if not bool(host.pop("images_finite")):  # first: NaN images make NaN latents, and the images are what to fix
            raise MedlatentInputError(self.bad_images_message)
        if not bool(host.pop("finite")):
            raise FloatingPointError(self.nonfinite_message)
        tensors = {name: t.contiguous() for name, t in host.items()} | {"indices": indices}
        atomic_write(self.folder / shard_name(k), lambda tmp: save_file(tensors, str(tmp)))
        self.timing["save_seconds"] += time.perf_counter() - started

    def wait(self) -> None:
        started = time.perf_counter()
        while self.futures:
            self.futures.pop(0).result()
        self.timing["encoder_blocked_seconds"] += time.perf_counter() - started

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
