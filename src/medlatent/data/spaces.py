"""The spaces of a dataset: its images, their reconstructions decode(encode(x)) and the latents
encode(x), for one autoencoder; in memory or streamed from the latent cache; and which spaces and
gaps an autoencoder has. Every command that trains or scores in a space gets its inputs here.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from ..cache import LatentCache, LatentDataset, encode_batch, from_fixed_point
from .base import ImageDataset, check_finite

SPACES = ("image", "reconstruction", "latent")
GAPS = {"fidelity": ("image", "reconstruction"), "learnability": ("reconstruction", "latent")}  # gap = before - after
# An encoder-only latent space (no decoder) has no reconstruction: its learnability gap is image -
# latent, which mixes what the encoder loses with what is hard to learn (the report says so).
ENCODER_ONLY_SPACES = ("image", "latent")
ENCODER_ONLY_GAPS = {"learnability": ("image", "latent")}


def spaces_of(autoencoder: dict) -> tuple[str, ...]:
    """The spaces audited for an autoencoder (its `describe()`): all three, or image and latent without a decoder."""
    return SPACES if autoencoder.get("has_decoder", True) else ENCODER_ONLY_SPACES


def gaps_of(autoencoder: dict) -> dict[str, tuple[str, str]]:
    return GAPS if autoencoder.get("has_decoder", True) else ENCODER_ONLY_GAPS


class SpaceData:
    """Inputs of one space for every sample of the dataset, indexed by dataset index: a tensor in
    memory (`decode` turns a stored slice into float inputs; reconstructions are held as 16-bit
    fixed point), or a streamed Dataset (`take` then returns a Dataset view, read from disk)."""

    def __init__(self, tensor: torch.Tensor | None, index_of: np.ndarray, decode=None, stream=None):
        self.tensor, self.index_of, self.decode, self.stream = tensor, index_of, decode, stream

    def take(self, indices: np.ndarray):
        if self.stream is not None:
            return self.stream.subset(self.index_of[indices])
        stored = self.tensor[self.index_of[indices]]
        return self.decode(stored) if self.decode is not None else stored


class StreamedImages(Dataset):
    """A dataset's images as a map-style Dataset of {"x": image}, loaded one at a time."""

    def __init__(self, dataset: ImageDataset, positions: np.ndarray | None = None, transform=None):
        self.dataset, self.transform = dataset, transform
        self.positions = np.arange(len(dataset)) if positions is None else np.asarray(positions)

    def __len__(self) -> int:
        return len(self.positions)

    def subset(self, positions: np.ndarray) -> StreamedImages:
        return StreamedImages(self.dataset, self.positions[positions], self.transform)

    def with_transform(self, transform) -> StreamedImages:
        return StreamedImages(self.dataset, self.positions, transform)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x = check_finite(self.dataset.load(self.positions[i : i + 1]), self.dataset.name)
        return {"x": self.transform(x)[0] if self.transform is not None else x[0]}


def should_stream(choice: str, dataset: ImageDataset, autoencoders: list) -> bool:
    """--stream auto: stream when images, reconstructions and latents would take more than half
    the available memory (float32 images and latents, 16-bit reconstructions)."""
    if choice != "auto":
        return choice == "on"
    import psutil

    pixels = len(dataset) * dataset.channels * dataset.size**2
    latents = sum(
        len(dataset) * ae.latent_channels * (ae.working_size(dataset.size) // ae.downsampling_factor) ** 2
        for ae in autoencoders
    )
    return 4 * pixels + len(autoencoders) * 2 * pixels + 4 * latents > 0.5 * psutil.virtual_memory().available


def dataset_parts(dataset: ImageDataset, folds: int | None) -> dict[str, np.ndarray]:
    """What the cache encodes: the official partitions, or everything at once for K folds."""
    return dataset.partitions if folds is None and dataset.partitions else {"all": np.arange(len(dataset))}


def encode_spaces(
    dataset: ImageDataset, parts: dict[str, np.ndarray], ae, cache: LatentCache, device, stream: bool = False
) -> tuple[dict, dict[str, SpaceData]]:
    """Cache entries of every part, and the reconstruction and latent spaces indexed by dataset
    index: read in one pass into memory, or (`stream`) served from the cache's shards."""
    entries = {
        name: cache.encode(dataset, name, idx, ae, device, reconstruct=ae.has_decoder) for name, idx in parts.items()
    }
    if stream:
        order = np.concatenate([entry.read(("indices",))["indices"].numpy() for entry in entries.values()])
        index_of = np.empty(len(dataset), dtype=np.int64)
        index_of[order] = np.arange(len(order))
        listed = list(entries.values())
        spaces = {"latent": SpaceData(None, index_of, stream=LatentDataset(listed, "latents"))}
        if ae.has_decoder:
            spaces["reconstruction"] = SpaceData(None, index_of, stream=LatentDataset(listed, "reconstructions"))
        return entries, spaces
    index_of = np.empty(len(dataset), dtype=np.int64)
    offset = 0
    latents, recons = [], []
    for entry in entries.values():
        stored = entry.read(
            ("latents", "reconstructions", "indices") if ae.has_decoder else ("latents", "indices")
        )  # each shard read once
        idx = stored["indices"].numpy()
        index_of[idx] = np.arange(offset, offset + len(idx))
        offset += len(idx)
        latents.append(stored["latents"])
        recons.append(stored.get("reconstructions"))
    spaces = {"latent": SpaceData(torch.cat(latents), index_of)}
    if ae.has_decoder:
        spaces["reconstruction"] = SpaceData(torch.cat(recons), index_of, from_fixed_point)
    return entries, spaces


def load_images(dataset: ImageDataset, batch: int = 512) -> torch.Tensor:
    return torch.cat(
        [
            check_finite(dataset.load(np.arange(i, min(i + batch, len(dataset)))), dataset.name)
            for i in range(0, len(dataset), batch)
        ]
    )


@torch.no_grad()
def encode_images(
    ae, images: torch.Tensor, device, dataset, batch: int = 64
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Latents (float32, CPU) and, with a decoder, reconstructions at the dataset's size and channels."""
    latents, recons = [], []
    for b in range(0, len(images), batch):
        z, r = encode_batch(ae, images[b : b + batch], device, ae.has_decoder, mixed_precision=False)
        latents.append(z.cpu())
        if r is not None:
            recons.append(ae.restore(r, dataset.channels, dataset.size).cpu())
    return torch.cat(latents), (torch.cat(recons) if recons else None)


def tensor_spaces(ae, images: torch.Tensor, device, dataset) -> dict[str, torch.Tensor]:
    """`images` in each space of `ae` (image, latent and, with a decoder, reconstruction), in memory."""
    z, r = encode_images(ae, images, device, dataset)
    return {"image": images, "latent": z, **({"reconstruction": r} if r is not None else {})}
