"""The features after each decoder stage as spaces of the dataset, from the cached latents.

Between the latent (no decoder) and the reconstruction (all of it), the features after an
intermediate decoder stage (`Autoencoder.decode_to`) are one more space, named `decoder:<stage>`,
so that classifiers can measure where along the decoder information becomes easy to learn. They
are computed from the latent cache in batches on the run's device: held in memory as float16 while
an autoencoder's stage features stay under `STAGE_MEMORY_LIMIT` bytes in all, else recomputed from
the latents batch by batch whenever a classifier reads them (`StageFeatures`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from ..device import autocast
from ..errors import MedlatentInputError
from .spaces import SpaceData
from .tensors import materialise

STAGE_MEMORY_LIMIT = 2 * 1024**3  # bytes of one autoencoder's stage features held in memory, in all
STAGE_DTYPE = torch.float16  # how held stage features are stored (float32 where values exceed float16's range)
DECODE_BATCH = 64  # latents decoded at a time
HELD = "held in memory"
ON_THE_FLY = "computed from the cached latents on the fly"
STREAMED = "streamed from the latent cache"
OFF = "none"


def stage_space(stage: str) -> str:
    """The space name of an intermediate decoder stage: "decoder:<stage>"."""
    return f"decoder:{stage}"


def audited_stages(choice: str, ae) -> list[str]:
    """The decoder stages `--decoder-stages` asks of `ae`, in decoder order from "latent" to
    "reconstruction" inclusive (the two ends always, as the existing spaces), or [] for none;
    checked before any work: one line naming the option, the autoencoder and its stages."""
    if choice == OFF:
        return []
    stages = ae.decoder_stages()
    if not ae.has_decoder:
        raise MedlatentInputError(
            f"--decoder-stages {choice}: {ae.spec} is an encoder-only latent space with no decoder (its only "
            "stage is latent); use --decoder-stages none or an autoencoder with a decoder"
        )
    if choice == "all":
        return stages
    asked = choice.split(",")
    unknown = [s for s in asked if s not in stages]
    if unknown:
        what = "is not a stage" if len(unknown) == 1 else "are not stages"
        raise MedlatentInputError(
            f"--decoder-stages {choice}: {', '.join(unknown)} {what} of the decoder of {ae.spec}; "
            f"its stages are {', '.join(stages)} (or all, or none)"
        )
    return [s for s in stages if s in {"latent", "reconstruction", *asked}]


@torch.no_grad()
def decoded_batches(ae, latents: torch.Tensor, stage: str, device):
    """The float32 features after `stage` of normalised `latents` (on the host), batch by batch:
    decoded on `device` under the same mixed precision as the cache's reconstructions, returned to
    the host."""
    for b in range(0, len(latents), DECODE_BATCH):
        z = latents[b : b + DECODE_BATCH].to(device, non_blocking=True)
        with autocast(device):
            yield ae.decode_to(z, stage).float().cpu()


def stage_features(ae, latents: torch.Tensor, stage: str, device) -> torch.Tensor:
    """The float32 features after `stage` of `latents`, on the host (`decoded_batches` joined)."""
    return torch.cat(list(decoded_batches(ae, latents, stage, device)))


class StageFeatures(Dataset):
    """The features after one decoder stage as a map-style Dataset of {"x": features}, computed
    from the stored latents when read: a batch of reads (`__getitems__`, which the DataLoader
    calls) is decoded at once. `subset(positions)` and `with_transform(f)` return restricted or
    transformed views, as the streamed spaces do; the transform applies to whole batches. Read in
    the main process: its autoencoder lives on the run's device."""

    def __init__(self, ae, stage: str, latents: torch.Tensor, device, positions=None, transform=None):
        self.ae, self.stage, self.latents, self.device, self.transform = ae, stage, latents, device, transform
        self.positions = np.arange(len(latents)) if positions is None else np.asarray(positions)

    def __len__(self) -> int:
        return len(self.positions)

    def subset(self, positions: np.ndarray) -> StageFeatures:
        return StageFeatures(self.ae, self.stage, self.latents, self.device, self.positions[positions], self.transform)

    def with_transform(self, transform) -> StageFeatures:
        return StageFeatures(self.ae, self.stage, self.latents, self.device, self.positions, transform)

    def __getitems__(self, indices) -> list[dict[str, torch.Tensor]]:
        x = stage_features(
            self.ae, self.latents[self.positions[np.asarray(indices, dtype=np.int64)]], self.stage, self.device
        )
        if self.transform is not None:
            x = self.transform(x)
        return [{"x": row} for row in x]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([i])[0]


def stage_shape(ae, latent_shape, stage: str) -> list[int]:
    """The shape (C, h, w) of one image's features after `stage`."""
    weight = next(ae.parameters(), None)
    kwargs = {"device": weight.device, "dtype": weight.dtype} if weight is not None else {}
    with torch.no_grad():
        return list(ae.decode_to(torch.zeros(1, *latent_shape, **kwargs), stage).shape[1:])


def held_features(ae, latents: torch.Tensor, stage: str, device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Every image's features after `stage` in memory as `dtype` (default `STAGE_DTYPE`), or as
    float32 where they exceed float16's range (large decoder activations would become inf)."""
    dtype = dtype or STAGE_DTYPE
    out = []
    for batch in decoded_batches(ae, latents, stage, device):
        if dtype == torch.float16 and batch.abs().amax() > torch.finfo(torch.float16).max:
            return stage_features(ae, latents, stage, device)
        out.append(batch.to(dtype))
    return torch.cat(out)


def stored_latents(latents: SpaceData) -> tuple[torch.Tensor, np.ndarray]:
    """The latents of a space in memory and their positions by dataset index (a streamed latent
    space is read once: the latents are small beside the features decoded from them)."""
    if latents.stream is None:
        return latents.tensor, latents.index_of
    everything = np.arange(len(latents.index_of))
    return materialise(latents.take(everything)), everything


def prefix_space(ae, stage: str, latents: SpaceData, device, dtype: torch.dtype | None = None) -> SpaceData:
    """The features after any decoder stage of every latent, as a space: the latent space itself at
    stage 0, else held in memory as `dtype` (`held_features`) while they fit `STAGE_MEMORY_LIMIT`,
    or computed from the latents on the fly (`StageFeatures`). At "reconstruction" these are the
    decoder's unclamped output at the autoencoder's own channels and size (`Autoencoder.decode_to`),
    not the reconstruction space (clamped, at the dataset's channels and size)."""
    if ae.stage_index(stage) == 0:
        return latents
    stored, index_of = stored_latents(latents)
    shape = stage_shape(ae, tuple(stored.shape[1:]), stage)
    bits = torch.finfo(dtype or STAGE_DTYPE).bits
    if len(stored) * int(np.prod(shape)) * bits // 8 > STAGE_MEMORY_LIMIT:
        return SpaceData(None, index_of, stream=StageFeatures(ae, stage, stored, device))
    return SpaceData(held_features(ae, stored, stage, device, dtype), index_of, _as_float)


def decoder_stage_spaces(ae, stages: list[str], latents: SpaceData, reconstruction_shape, device) -> tuple[dict, list]:
    """The spaces of the intermediate `stages` of `ae` ({"decoder:<stage>": SpaceData}) from its
    latent space, and a record of every stage in `stages` (latent and reconstruction are the
    existing spaces): name, index, feature shape, FLOPs of the decoder prefix per image, and how the
    features are held (and, for an intermediate stage, in which dtype). Stages are held in memory
    in decoder order while their total stays under `STAGE_MEMORY_LIMIT`; the rest are computed from
    the latents on the fly."""
    stored, index_of = stored_latents(latents)
    latent_shape = tuple(stored.shape[1:])
    ends = STREAMED if latents.stream is not None else HELD
    spaces, records, used = {}, [], 0
    for stage in stages:
        index = ae.stage_index(stage)
        record = {"name": stage, "index": index, "prefix_flops": ae.stage_flops(latent_shape, stage), "held": ends}
        if stage == "latent":
            record.update(space="latent", feature_shape=list(latent_shape))
        elif stage == "reconstruction":
            record.update(space="reconstruction", feature_shape=list(reconstruction_shape))
        else:
            shape = stage_shape(ae, latent_shape, stage)
            size = len(stored) * int(np.prod(shape)) * torch.finfo(STAGE_DTYPE).bits // 8
            held = used + size <= STAGE_MEMORY_LIMIT
            if held:
                used += size
                features = held_features(ae, stored, stage, device)
                spaces[stage_space(stage)] = SpaceData(features, index_of, _as_float)
            else:
                spaces[stage_space(stage)] = SpaceData(None, index_of, stream=StageFeatures(ae, stage, stored, device))
            dtype = str(features.dtype).removeprefix("torch.") if held else "float32"
            record.update(
                space=stage_space(stage), feature_shape=shape, held=HELD if held else ON_THE_FLY, dtype=dtype
            )
        records.append(record)
    return spaces, records


def _as_float(stored: torch.Tensor) -> torch.Tensor:
    return stored.float()
