"""The gap audit's configuration: plain data, also the schema of the YAML config file.

Kept apart from the audit itself so that reading and validating a configuration imports no
deep-learning library (the CLI answers bad options at once).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from ..errors import MedlatentInputError

LATENT_VARIANTS = ("noise-conditioned", "distilled")
VARIANT_INITS = ("plain", "random")
DISTILL_LOSSES = ("mse", "kl")
PROTOCOL_VERSION = 3  # bumped when stored classifiers change (2: c_in preconditioning; 3: training curves, plain latent weights stored)
INTERVALS = ("auto", "bootstrap", "t")  # auto: t interval across runs from 5 runs on, paired bootstrap below


@dataclass
class GapConfig:
    """Everything that defines a gap run; also the schema of the YAML config file."""

    dataset: str = "synthetic"
    size: int = 64
    autoencoders: list[str] = field(default_factory=lambda: ["builtin:kl-f4-synthetic"])
    folds: int | None = None
    seeds: list[int] = field(default_factory=lambda: [0])
    backbone: str = "resnet10t"  # sized for the CPU demo; resnet18/50 or convnext_tiny for real audits
    pretrained: bool = False
    loss: str = "ce"
    epochs: int = 12
    batch_size: int = 64
    lr: float = 1e-3
    patience: int = 4
    latent_std: float = 0.5
    latent_mask: float = 0.2
    latent_variants: list[str] = field(default_factory=list)  # "noise-conditioned", "distilled"
    distill_alpha: float = 0.5
    # Noise-conditioned variants train for this many times the epochs (and patience): with sigma drawn
    # uniformly from the Karras steps only about a third of their samples keep the signal (sigma < 0.5).
    variant_epoch_factor: float = 3.0
    # Where the noise-conditioned variants start: "plain" = the audit's plain latent classifier of the
    # same split and seed (FiLM at identity, so they start at its accuracy), or "random".
    variant_init: str = "plain"
    clean_fraction: float = 0.0  # share of the variants' training samples at sigma_min
    distill_loss: str = "mse"  # the published choice (learnability-gap code): alpha * CE + (1 - alpha) * logit MSE
    temperature: float = 2.0
    sigma_steps: int = 32
    sweep_points: int = 9
    linear_probe: bool = True
    bootstrap: int = 1000
    interval: str = "auto"
    val_fraction: float = 0.15
    out: str = "runs/gap"
    cache_dir: str | None = None
    device: str = "auto"
    progress: bool = True
    image_column: str = "path"
    label_columns: list[str] | None = None
    patient_column: str | None = None
    split_column: str | None = None
    task: str | None = None

    def __post_init__(self) -> None:
        if not self.autoencoders:
            raise MedlatentInputError("give at least one --autoencoder")
        if self.size < 8:
            raise MedlatentInputError(f"--size {self.size}: use at least 8")
        if self.folds is not None and self.folds == 1:
            raise MedlatentInputError("--folds 1: use K >= 2, or leave it out for the official split")
        if not self.seeds:
            raise MedlatentInputError("give at least one --seed")
        unknown = sorted(set(self.latent_variants) - set(LATENT_VARIANTS))
        if unknown:
            raise MedlatentInputError(f"--latent-variants {','.join(unknown)}: use {','.join(LATENT_VARIANTS)}")
        if not 0.0 <= self.distill_alpha < 1.0:
            raise MedlatentInputError(f"--distill-alpha {self.distill_alpha}: use a value in [0, 1) (1 would not distill)")
        if self.variant_init not in VARIANT_INITS:
            raise MedlatentInputError(f"--variant-init {self.variant_init}: use {', '.join(VARIANT_INITS)}")
        if not 0.0 <= self.clean_fraction < 1.0:
            raise MedlatentInputError(f"--clean-fraction {self.clean_fraction}: use a value in [0, 1)")
        if self.distill_loss not in DISTILL_LOSSES:
            raise MedlatentInputError(f"--distill-loss {self.distill_loss}: use {', '.join(DISTILL_LOSSES)}")
        if self.variant_epoch_factor < 1:
            raise MedlatentInputError(f"--variant-epoch-factor {self.variant_epoch_factor}: use 1 or more")
        if self.interval not in INTERVALS:
            raise MedlatentInputError(f"--interval {self.interval}: use {', '.join(INTERVALS)}")
        if self.bootstrap < 100:
            raise MedlatentInputError(f"--bootstrap {self.bootstrap}: use at least 100 resamples for a 95% interval")

    def train_config(self, seed: int, variant: str | None = None):
        """The training configuration of the plain classifiers, or of a latent variant."""
        from ..classifiers.trainer import TrainConfig

        factor = self.variant_epoch_factor if variant else 1.0
        return TrainConfig(
            self.backbone, self.pretrained, self.loss, round(self.epochs * factor), self.batch_size, self.lr, patience=round(self.patience * factor),
            latent_mask=self.latent_mask, seed=seed, noise_conditioned=variant is not None, sigma_steps=self.sigma_steps, sigma_data=self.latent_std, clean_fraction=self.clean_fraction,
            distill_alpha=self.distill_alpha if variant == "distilled" else 1.0, distill_loss=self.distill_loss, temperature=self.temperature,
        )  # fmt: skip

    def protocol_hash(self) -> str:
        """What determines a trained classifier's predictions (not output or display options)."""
        keys = ("dataset", "size", "folds", "backbone", "pretrained", "loss", "epochs", "batch_size", "lr", "patience", "latent_std", "latent_mask", "distill_alpha", "variant_epoch_factor", "variant_init", "clean_fraction", "distill_loss", "temperature", "sigma_steps", "sweep_points", "val_fraction", "image_column", "label_columns", "patient_column", "split_column", "task")
        return hashlib.sha256(json.dumps({"protocol_version": PROTOCOL_VERSION, **{k: getattr(self, k) for k in keys}}, sort_keys=True).encode()).hexdigest()[:12]
