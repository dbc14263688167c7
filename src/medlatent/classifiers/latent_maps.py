"""Fixed maps from latents to the features a latent variant's classifier reads, and a classifier
with its map as one model that takes latents.

Two latent variants put a map before a plain latent classifier (the same protocol, runs and seeds):

- "whitened" (`ChannelWhitening`): an invertible linear map of the channels, fitted on the training
  latents and applied at every position. Nothing is lost, so a classifier that gains from it shows
  that the latent is hard because its channels are linearly mixed or badly scaled, not because the
  information is non-linearly entangled (which only a decoder can undo).
- "decoder-prefix:STAGE" (`DecoderPrefix`): the autoencoder's frozen decoder up to a stage
  (`Autoencoder.decode_to`), so that a model that takes latents can buy back learnability with
  part of the decoding; "auto" picks the stage on the validation images (`choose_prefix_stage`).

A saved classifier of either variant records its map in estimator.json (`latent_variant`): the
whitening's fitted buffers are saved beside the network; the decoder prefix is saved by reference,
as the autoencoder's spec and content hash the classifier already records plus the stage, and is
rebuilt from that autoencoder when loaded (`latent_map_of`), its hash checked, so no decoder
weights are copied.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from ..config import DECODER_PREFIX, WHITENED
from ..data.tensors import input_batches, materialise
from ..device import autocast, channels_last
from ..errors import MedlatentInputError
from ..training import nan_last

AUTO = "auto"
INFERENCE_BATCH = 256  # latents (or images) per timed forward pass of a throughput measurement
EIGEN_FLOOR = 1e-6  # eigenvalues of the channel covariance below this share of the largest are raised to it


class ChannelWhitening(nn.Module):
    """ZCA whitening of the channels: y = W (z - mean) at every position, W = C^(-1/2) of the
    training latents' channel covariance C (over images and positions). Of the whitening maps, ZCA
    is the one closest to the identity, so each output channel stays its input channel, decorrelated
    and scaled to unit variance. `inverse` undoes it exactly (up to float error); eigenvalues below
    `EIGEN_FLOOR` of the largest are raised to it, so a constant channel stays finite."""

    mixed_precision = False  # a small matmul: float32 on every device, as it was fitted

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("matrix", torch.eye(channels))
        self.register_buffer("inverse_matrix", torch.eye(channels))

    @torch.no_grad()
    def fit(self, latents, batch_size: int = 512) -> ChannelWhitening:
        """Fit on training latents (a tensor (N, C, ...) or a Dataset of {"x": ...}): float64 sums
        over batches, so the numbers do not depend on how the latents are held."""
        channels = self.mean.numel()
        total = torch.zeros(channels, dtype=torch.float64)
        cross = torch.zeros(channels, channels, dtype=torch.float64)
        count = 0
        for batch in input_batches(latents, batch_size):
            flat = batch.double().transpose(0, 1).reshape(channels, -1)
            total, cross, count = total + flat.sum(1), cross + flat @ flat.T, count + flat.shape[1]
        mean = total / max(count, 1)
        covariance = (cross - count * torch.outer(mean, mean)) / max(count - 1, 1)
        eigenvalues, vectors = torch.linalg.eigh(covariance)
        eigenvalues = eigenvalues.clamp_min(float(eigenvalues.max().clamp_min(1e-30)) * EIGEN_FLOOR)
        self.mean.copy_(mean)
        self.matrix.copy_((vectors * eigenvalues.rsqrt()) @ vectors.T)
        self.inverse_matrix.copy_((vectors * eigenvalues.sqrt()) @ vectors.T)
        return self

    def _mix(self, matrix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("oc,nc...->no...", matrix.to(x.dtype), x)

    def _channel(self, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return v.to(x.dtype).view(1, -1, *[1] * (x.ndim - 2))

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self._mix(self.matrix, latents - self._channel(self.mean, latents))

    def inverse(self, whitened: torch.Tensor) -> torch.Tensor:
        return self._mix(self.inverse_matrix, whitened) + self._channel(self.mean, whitened)


class DecoderPrefix(nn.Module):
    """The frozen decoder of `autoencoder` up to `stage`: normalised latents -> the features after
    that stage (at "reconstruction", the decoder's output in [0, 1] before clamping)."""

    mixed_precision = True  # as the stage features the classifier learnt from were decoded

    def __init__(self, autoencoder, stage: str):
        super().__init__()
        self.autoencoder, self.stage = autoencoder, stage

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode_to(latents, self.stage)


class ReconstructionMap(nn.Module):
    """The whole decoder as the reconstruction space holds it: clamped, at the dataset's channels
    and size; what a reconstruction classifier costs when it is given latents."""

    mixed_precision = True

    def __init__(self, autoencoder, channels: int, size: int):
        super().__init__()
        self.autoencoder, self.channels, self.size = autoencoder, channels, size

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.restore(self.autoencoder.decode(latents), self.channels, self.size)


def mapped_features(latent_map: nn.Module | None, latents: torch.Tensor) -> torch.Tensor:
    """float32 features of `latents` through `latent_map` (the latents themselves without one), in
    the map's own precision: the decoder in mixed precision on a GPU, the whitening in float32."""
    if latent_map is None:
        return latents.float()
    with autocast(latents.device, enabled=getattr(latent_map, "mixed_precision", False)):
        return latent_map(latents).float()


class LatentPipeline(nn.Module):
    """A classifier with its map, as one model of raw inputs: the map (none for a plain classifier),
    the classifier's own input standardisation, then its network (at its evaluation noise level when
    noise-conditioned, channels-last, under the device's mixed precision) -> float32 logits."""

    def __init__(self, network: nn.Module, scaler, latent_map: nn.Module | None = None, sigma: float | None = None):
        super().__init__()
        self.network, self.latent_map, self.sigma = channels_last(network), latent_map, sigma
        self.register_buffer("mean", scaler.mean_.float().reshape(1, -1, 1, 1))
        self.register_buffer("scale", (scaler.target_std / scaler.std_).float().reshape(1, -1, 1, 1))

    @classmethod
    def of(cls, clf, latent_map: nn.Module | None = None, copy_network: bool = False) -> LatentPipeline:
        """The pipeline of a fitted `DeepClassifier` (a copy of its network with `copy_network`,
        so that the channels-last layout leaves the classifier's own predictions as they were)."""
        network = copy.deepcopy(clf.model_) if copy_network else clf.model_
        sigma = clf.eval_sigma if clf.config.noise_conditioned else None
        return cls(network.eval(), clf.input_scaler, latent_map, sigma)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = channels_last((mapped_features(self.latent_map, inputs) - self.mean) * self.scale)
        with autocast(x.device):
            return (self.network(x) if self.sigma is None else self.network(x, self.sigma)).float()


def inference_samples_per_second(clf, raw, latent_map: nn.Module | None = None, repeats: int = 3) -> float:
    """Measured inference throughput of a fitted deep classifier from its raw inputs (latents, or
    images for an image classifier): map, standardisation and network (`LatentPipeline`) on up to
    `INFERENCE_BATCH` of `raw` at once on the classifier's device; the median of `repeats` timed
    passes after one warm-up pass. The classifier's own network is not touched (a copy is timed)."""
    from ..training.timing import timed

    x = materialise(raw)[:INFERENCE_BATCH].float().to(clf.device)
    pipeline = LatentPipeline.of(clf, latent_map, copy_network=True).to(clf.device)

    def step() -> None:
        with torch.inference_mode():
            pipeline(x)

    return len(x) / timed(step, clf.device, repeats, warmup=1)


def prefix_stage(ae, variant: str, option: str) -> str:
    """The decoder stage of "decoder-prefix:STAGE" for `ae` by name ("auto" stays "auto"); a stage
    it lacks (name or index), or any prefix of an encoder-only space, is one error naming `option`
    and the valid stages."""
    given = variant.partition(":")[2].strip()
    if not ae.has_decoder:
        raise MedlatentInputError(
            f"{option} {variant}: {ae.spec} is an encoder-only latent space with no decoder to take a prefix of; "
            f"use {WHITENED} or an autoencoder with a decoder"
        )
    if given == AUTO:
        return AUTO
    stages = ae.decoder_stages()
    key = int(given) if given.lstrip("-").isdigit() else given
    try:
        return stages[ae.stage_index(key)]
    except MedlatentInputError:
        raise MedlatentInputError(
            f"{option} {variant}: {given} is not a stage of the decoder of {ae.spec}; its stages are "
            f"{', '.join(stages)} (or an index from 0 to {len(stages) - 1}, or {AUTO})"
        ) from None


def check_latent_variants(variants: list[str], ae, option: str) -> None:
    """Every decoder-prefix variant's stage exists in `ae` (`prefix_stage`), before any work."""
    for variant in variants:
        if variant.startswith(f"{DECODER_PREFIX}:"):
            prefix_stage(ae, variant, option)


def validation_score(record: dict, metric: str = "auroc") -> float:
    """A deep classifier's validation score at the epoch early stopping kept (its training curve
    `history_val_<metric>` at `best_epoch`); NaN where there is none (a warm start kept)."""
    curve, best = record.get(f"history_val_{metric}"), record.get("best_epoch")
    if curve is None or best is None or int(best) < 0 or int(best) >= len(curve):
        return float("nan")
    return float(curve[int(best)])


def choose_prefix_stage(candidates: list[dict], reference: float, margin: float, metric: str = "auroc") -> dict:
    """decoder-prefix:auto's choice among `candidates` ({"stage", "index", "prefix_flops",
    "validation"}: one per decoder stage): the cheapest (fewest prefix FLOPs, then the earliest)
    whose validation score is at least `reference` (the reconstruction classifier's) minus
    `margin`; when none is, the best validation score (then the cheapest). Returns the chosen
    stage, its index and FLOPs, why, and every candidate (stage, index, FLOPs, validation score)."""
    within = [
        c for c in candidates if math.isfinite(c["validation"]) and c["validation"] >= reference - margin
    ]  # False for all when the reference is NaN
    name = "AUROC" if metric == "auroc" else metric.replace("_", " ")
    if within:
        chosen = min(within, key=lambda c: (c["prefix_flops"], c["index"]))
        reason = (
            f"the cheapest stage whose validation {name} ({chosen['validation']:.3f}) is at least the reconstruction "
            f"classifier's ({reference:.3f}) minus {margin:g}"
        )
    else:
        chosen = min(candidates, key=lambda c: (-nan_last(c["validation"]), c["prefix_flops"], c["index"]))
        reason = (
            f"no stage reaches the reconstruction classifier's validation {name} ({reference:.3f}) minus {margin:g}: "
            f"the best validation {name} ({chosen['validation']:.3f})"
        )
    return {
        "stage": chosen["stage"],
        "index": chosen["index"],
        "prefix_flops": chosen["prefix_flops"],
        "reason": reason,
        "metric": metric,
        "margin": margin,
        "reference_validation": reference,
        "candidates": [{k: c[k] for k in ("stage", "index", "prefix_flops", "validation")} for c in candidates],
    }


def latent_map_of(clf, autoencoder=None) -> nn.Module | None:
    """The map a saved classifier reads its latents through (None for a plain one): its fitted
    whitening, or its decoder prefix rebuilt from `autoencoder` (default: loaded from the spec the
    classifier records), which must have the content hash the classifier was trained with."""
    variant = getattr(clf, "latent_variant", None)
    if not variant:
        return None
    if variant["name"] == WHITENED:
        return clf.latent_map
    trained_on = clf.autoencoder or {}
    if autoencoder is None:
        from ..autoencoders import load_autoencoder

        autoencoder = load_autoencoder(trained_on["spec"], device=str(clf.device), progress=False)
    if autoencoder.content_hash != trained_on.get("content_hash"):
        raise MedlatentInputError(
            f"{trained_on.get('spec')}: its weights (content hash {autoencoder.content_hash}) are not those the "
            f"classifier's decoder prefix was trained with ({trained_on.get('content_hash')}); use that autoencoder"
        )
    return DecoderPrefix(autoencoder.to(clf.device).eval(), variant["stage"])
