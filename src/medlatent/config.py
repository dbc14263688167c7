"""Configuration from one source.

One dataclass per concern: `DataConfig` (what is read), `LoopConfig` (how the engine trains),
`TrainConfig` (how a classifier is trained; it nests a LoopConfig), `RunConfig` (what runs share:
output, device, seeds, intervals, latent scale) and one config per command that nests them
(`ClassifierTrainConfig`, `DiffusionTrainConfig`, `ScoreConfig`, ...; the audits' in
`audits.config`). Each setting is declared once, as a field with its default, help text, range and
metadata: whether it belongs to the protocol, and its role when a workflow sets it itself. A
nesting field says which settings of the nested config its command does not take. The CLI options
(`--batch-size`), the YAML keys (the option's own name, `batch-size`, underscores accepted) and the
Python API's keywords are derived from the fields, so a default agrees everywhere.

This module imports no deep-learning library: the CLI validates options before loading any.
"""

from __future__ import annotations

import inspect
import os
import types
import typing
from dataclasses import MISSING, Field, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Union

from .errors import MedlatentInputError
from .rundir import OVERWRITE_HELP


def setting(
    default: Any = MISSING,
    help: str = "",
    *,
    factory: Any = MISSING,
    flag: str | None = None,
    shown: str | None = None,
    cli: bool = True,  # noqa: A002
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: tuple[str, ...] | None = None,
    required: bool = False,
    protocol: bool = True,
    role: str | None = None,
    omit: tuple[str, ...] = (),
) -> Any:
    """A configuration field. flag: the option's name when it is not the field's (e.g. `seed` for
    the list `seeds`); shown: how --help shows the default; cli: False for derived settings.
    ge, gt, le, lt: the range of a number (of each number of a list); choices: the allowed strings.
    Both are checked by `check_fields` when the config is made, and stated in --help.
    required: the command needs it given (where its default is None). protocol: False for a setting
    that does not change what is trained (output, display, resources), left out of `protocol_settings`.
    role: what sets the setting when a workflow nests its config (e.g. "per-run": an audit sets the
    training seed of each run itself). omit, on a field holding a nested config: the settings of it
    that this command does not take, by name or role; they keep the nested config's defaults and are
    no option, YAML key or API keyword of the command."""
    bounds = {name: value for name, value in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if value is not None}
    metadata = {
        "help": help,
        "flag": flag,
        "shown": shown,
        "cli": cli,
        "protocol": protocol,
        "bounds": bounds,
        "choices": choices,
        "required": required,
        "role": role,
        "omit": tuple(omit),
    }
    if factory is not MISSING:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


BOUND_TESTS = {
    "ge": (lambda v, b: v >= b, ">="),
    "gt": (lambda v, b: v > b, ">"),
    "le": (lambda v, b: v <= b, "<="),
    "lt": (lambda v, b: v < b, "<"),
}


def allowed(f: Field) -> str:
    """The values a field allows, as --help and the errors state them ('' when any)."""
    if f.metadata.get("choices"):
        return "one of " + ", ".join(f.metadata["choices"])
    bounds = f.metadata.get("bounds") or {}
    return " and ".join(f"{BOUND_TESTS[name][1]} {value:g}" for name, value in bounds.items())


def check_fields(instance: Any, required: bool = True) -> None:
    """Every field of `instance` within its declared range or choices, and every setting it requires
    (nested configs' included) given; else one error naming the option. required=False: a nested
    config's own check (the command that nests it decides what it requires)."""
    if required:
        for leaf in leaves(type(instance)):
            if leaf.required and leaf.value_in(instance) in (None, "", []):
                # an argument of the command line (cli=False: MODEL, REPO_ID) is named as its usage line shows it
                name = f"--{leaf.option}" if leaf.field.metadata.get("cli", True) else leaf.name.upper()
                raise MedlatentInputError(f"{name}: required; {leaf.field.metadata.get('help', '')}")
    for f in fields(instance):
        value = getattr(instance, f.name)
        option = f.metadata.get("flag") or f.name.replace("_", "-")
        values = value if isinstance(value, (list, tuple)) else [value]
        bounds, choices = f.metadata.get("bounds") or {}, f.metadata.get("choices")
        bad = [
            v
            for v in values
            if v is not None
            and not isinstance(v, bool)
            and (
                (choices and v not in choices)
                or (
                    bounds
                    and isinstance(v, (int, float))
                    and not all(BOUND_TESTS[k][0](v, b) for k, b in bounds.items())
                )
            )
        ]
        if bad:
            raise MedlatentInputError(f"--{option} {bad[0]}: use {allowed(f)}")


# -- the concerns ---------------------------------------------------------------------------------

STREAM_CHOICES = ("auto", "on", "off")


@dataclass
class DataConfig:
    """What is read: the dataset, its working size, its split, the CSV columns, the latent cache."""

    dataset: str = setting("synthetic", "synthetic[:k=v,...] | medmnist:FLAG|PATH.npz | csv:PATH.csv")
    size: int = setting(64, "Working resolution in pixels.")
    folds: int | None = setting(
        None, "K stratified (patient-grouped) folds instead of the official split.", shown="official split"
    )
    val_fraction: float = setting(
        0.15, "Share of the training part held out for validation (folds and splits without one)."
    )
    train_limit: int = setting(
        0,
        "Train on at most this many of the split's training images: a "
        "class-stratified subset drawn from the seed, e.g. a small target set (0: all).",
    )
    image_column: str = setting("path", "CSV column of image paths.")
    label_columns: list[str] | None = setting(
        None, "CSV label column; repeat for one-hot or multi-label columns.", flag="label-column", shown="label"
    )
    patient_column: str | None = setting(None, "CSV column of patient ids (folds never split a patient).")
    split_column: str | None = setting(None, "CSV column with train/val/test.")
    task: str | None = setting(None, "binary | multiclass | multilabel | ordinal (CSV).", shown="inferred")
    cache_dir: str | None = setting(None, "Latent cache folder.", shown="~/.cache/medlatent/latents", protocol=False)
    stream: str = setting(
        "auto",
        "Read images, reconstructions and latents from disk while training instead of "
        "holding them in memory: on | off | auto (when they exceed half the available memory).",
    )

    def __post_init__(self) -> None:
        if self.size < 8:
            raise MedlatentInputError(f"--size {self.size}: use at least 8")
        if self.folds is not None and self.folds < 2:
            raise MedlatentInputError(f"--folds {self.folds}: use K >= 2, or leave it out for the official split")
        if not 0.0 < self.val_fraction < 1.0:
            raise MedlatentInputError(f"--val-fraction {self.val_fraction}: use a value in (0, 1)")
        if self.train_limit < 0:
            raise MedlatentInputError(f"--train-limit {self.train_limit}: use 0 (all) or a number of images")
        if self.stream not in STREAM_CHOICES:
            raise MedlatentInputError(f"--stream {self.stream}: use {', '.join(STREAM_CHOICES)}")

    def csv_options(self) -> dict:
        return {
            "image_column": self.image_column,
            "label_columns": self.label_columns,
            "patient_column": self.patient_column,
            "split_column": self.split_column,
            "task": self.task,
        }


INTERVALS = ("auto", "bootstrap", "t")  # auto: t interval across runs from 5 runs on, paired bootstrap below
DEVICE_HELP = "auto | cpu | cuda[:N]"


@dataclass
class RunConfig:
    """The settings runs share: where a command writes, what it computes on, its seeds, its
    intervals and the latent scale. Each command nests one, with its own defaults (the nesting
    field's factory) and without the settings it does not take (the field's `omit`)."""

    out: str | None = setting(
        None, "Where the command writes: its run folder (score: a .csv or .npz file).", required=True, protocol=False
    )
    overwrite: bool = setting(False, OVERWRITE_HELP, protocol=False)
    device: str = setting("auto", DEVICE_HELP, protocol=False)
    progress: bool = setting(True, "Progress bars.", cli=False, protocol=False)
    seeds: list[int] = setting(
        factory=lambda: [0],
        help="Seed of the training, sampling and noise draws; gap and augment take several (repeat), one run each.",
        flag="seed",
        ge=0,
        required=True,
        protocol=False,
    )
    bootstrap: int = setting(1000, "Bootstrap resamples for the 95% intervals.", ge=100, protocol=False)
    interval: str = setting(
        "auto",
        "auto (t across runs from 5 runs, else bootstrap) | bootstrap | t",
        choices=INTERVALS,
        protocol=False,
    )
    latent_std: float = setting(
        0.5,
        "Latents are standardised per channel to this std (also the noise-conditioned models' sigma_data).",
        gt=0,
    )
    json_out: str | None = setting(None, "Also write the results here, as JSON.", flag="json", protocol=False)

    def __post_init__(self) -> None:
        check_fields(self, required=False)
        if not self.seeds:
            raise MedlatentInputError("--seed: give at least one seed")

    @property
    def seed(self) -> int:
        """The seed of a command that takes one (`one_seed`)."""
        return self.seeds[0]

    def one_seed(self) -> None:
        """For the commands that take one seed: more is one clear error."""
        if len(self.seeds) != 1:
            raise MedlatentInputError(f"--seed {' --seed '.join(map(str, self.seeds))}: this command takes one seed")


def run_settings(takes: str, out: str | None = None, **defaults: Any) -> Any:
    """The field of a command's config holding its `RunConfig`: `takes` names the run settings the
    command takes (space-separated; the others are no options of it), `out` and `defaults` are its
    own defaults."""
    taken = takes.split()
    unknown = set(taken) - {f.name for f in fields(RunConfig)}
    if unknown:  # a programming error in a config's declaration
        raise ValueError(f"run_settings: no run setting {', '.join(sorted(unknown))}")
    omit = tuple(f.name for f in fields(RunConfig) if f.name not in taken)
    return setting(factory=lambda: RunConfig(out=out, **defaults), omit=omit)


MIXED_PRECISIONS = ("auto", "no", "bf16", "fp16")
TRACKERS = ("tensorboard", "wandb", "mlflow", "aim", "comet_ml")  # accelerate's trackers, each its package


def check_tracker(log_with: str | None) -> None:
    """--log-with, checked before any work: a tracker whose package is installed (None: no tracking)."""
    import importlib.util

    if log_with is not None and importlib.util.find_spec(log_with) is None:
        raise MedlatentInputError(f"--log-with {log_with}: its package is not installed; pip install {log_with}")


def check_installed(config: Any) -> None:
    """What a command's settings need installed beyond medlatent's own dependencies (a tracker's
    package), checked when the command's config is built from the user's settings."""
    for leaf in leaves(type(config)):
        if leaf.name == "log_with":
            check_tracker(leaf.value_in(config))


PARAMETERISATIONS = ("edm", "eps", "v")  # the denoiser's: EDM, or DDPM/VP predicting eps or v
SAMPLERS = ("heun", "euler", "dpm", "ddim")  # heun: EDM Algorithm 2; the others: diffusers schedulers


@dataclass
class LoopConfig:
    """How any model is trained, whatever its objective (the settings of the loop itself)."""

    mixed_precision: str = setting(
        "auto", "auto (bf16 on CUDA where supported, else fp16; fp32 on CPU) | no | bf16 | fp16"
    )
    grad_accum_steps: int = setting(1, "Accumulate gradients over this many batches per optimiser step.", ge=1)
    max_grad_norm: float = setting(0.0, "Clip the gradient norm to this value (0: no clipping).", ge=0)
    ema_decay: float = setting(
        0.0, "EMA of the weights with this fixed decay, used for validation and the result (0: off)."
    )
    ema_sigma_rel: float = setting(
        0.0,
        "Power-function EMA (EDM2) whose averaging profile has this "
        "relative width, e.g. 0.05 to 0.15; instead of --ema-decay (0: off).",
    )
    checkpoint_every: int = setting(
        0, "Write a training checkpoint every N optimiser steps (0: by time only).", ge=0, protocol=False
    )
    checkpoint_minutes: float = setting(
        10.0, "Write a training checkpoint at least this often, in minutes.", gt=0, protocol=False
    )
    num_workers: int = setting(0, "DataLoader workers for data streamed from disk.", ge=0, protocol=False)
    threads: int = setting(
        0,
        "CPU threads each process computes with (0: the CPUs it may run on, whatever a "
        "launcher sets); on a CPU the results depend on it, not on the number of processes.",
        ge=0,
        protocol=False,
    )
    device_memory_share: float = setting(
        0.25,
        "Hold the training data on the device when it fits in this share of its memory.",
        ge=0,
        le=1,
        protocol=False,
    )
    log_with: str | None = setting(
        None,
        "Log each training run to this tracker (accelerate's): tensorboard | wandb | mlflow | aim | comet_ml.",
        choices=TRACKERS,
        protocol=False,
    )
    log_dir: str = setting(
        "runs/logs",
        "Where the trackers that write locally (tensorboard, mlflow, aim) keep their runs.",
        protocol=False,
    )
    log_every: int = setting(
        50,
        "Log the loss, learning rate and throughput every N optimiser steps (reading the loss waits for the device).",
        ge=1,
        protocol=False,
    )

    def __post_init__(self) -> None:
        check_fields(self)
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise MedlatentInputError(f"--mixed-precision {self.mixed_precision}: use {', '.join(MIXED_PRECISIONS)}")
        if self.grad_accum_steps < 1:
            raise MedlatentInputError(f"--grad-accum-steps {self.grad_accum_steps}: use 1 or more")
        if not 0.0 <= self.ema_decay < 1.0:
            raise MedlatentInputError(f"--ema-decay {self.ema_decay}: use a value in [0, 1)")
        if not 0.0 <= self.ema_sigma_rel < 0.28:  # sigma_rel = 0.289 at gamma = 0 (EDM2, Sec. 3.1)
            raise MedlatentInputError(f"--ema-sigma-rel {self.ema_sigma_rel}: use a value in [0, 0.28), e.g. 0.05")
        if self.ema_decay and self.ema_sigma_rel:
            raise MedlatentInputError("--ema-decay and --ema-sigma-rel: give one EMA, not both (set the other to 0)")


DISTILL_LOSSES = ("mse", "kl")


@dataclass
class TrainConfig:
    """How a classifier is trained, in every space. The defaults are sized for the CPU demo; for
    real audits use e.g. resnet18 with 30 epochs and patience 6."""

    backbone: str = setting("resnet10t", "timm backbone: resnet10t, resnet18, resnet50, convnext_tiny, ...")
    pretrained: bool = setting(False, "ImageNet weights (needs network).")
    loss: str = setting("ce", "ce | cb (class-balanced) | ldam (with deferred re-weighting)")
    epochs: int = setting(12, "Training epochs at most.", ge=1)
    batch_size: int = setting(64, "Training batch size.", ge=1)
    lr: float = setting(1e-3, "Peak learning rate (one-cycle schedule).", gt=0)
    weight_decay: float = setting(0.05, "AdamW weight decay.", ge=0)
    patience: int = setting(4, "Early stopping on validation balanced accuracy.", ge=1)
    latent_mask: float = setting(0.2, "Share of latent entries masked as augmentation.")
    seed: int = setting(0, "Training seed.", role="per-run")
    # Noise conditioning (latent space): FiLM on sigma, trained on z + sigma * eps over a discrete Karras schedule.
    noise_conditioned: bool = setting(False, "FiLM on the noise level; trained on noised latents.", role="per-run")
    sigma_steps: int = setting(
        32, "Steps of the Karras schedule the training noise levels are drawn from.", ge=1, role="variant"
    )
    sigma_data: float = setting(
        0.5, "Std of the clean inputs (the latent scaler's target, EDM's sigma_data).", cli=False, role="derived"
    )
    clean_fraction: float = setting(
        0.0, "Share of the noise-conditioned training samples at sigma_min.", role="variant"
    )
    # Distillation from a frozen image-space teacher (only when one is given):
    # alpha * task loss + (1 - alpha) * distillation loss.
    distill_alpha: float = setting(
        0.5, "alpha * task loss + (1 - alpha) * distillation loss, when distilling.", role="variant"
    )
    distill_loss: str = setting("mse", "mse (logits, as published) | kl (temperature-scaled)", role="variant")
    temperature: float = setting(2.0, "Distillation temperature for kl.", role="variant")
    freeze_backbone: bool = setting(False, "Train only the FiLM layers of a noise-conditioned model.", role="per-run")
    loop: LoopConfig = setting(factory=LoopConfig)

    def __post_init__(self) -> None:
        Bad = MedlatentInputError  # noqa: N806

        check_fields(self)
        if not 0.0 <= self.latent_mask < 1.0:
            raise Bad(f"--latent-mask {self.latent_mask}: use a value in [0, 1)")
        if not 0.0 <= self.distill_alpha < 1.0:
            raise Bad(f"--distill-alpha {self.distill_alpha}: use a value in [0, 1) (1 would not distill)")
        if not 0.0 <= self.clean_fraction < 1.0:
            raise Bad(f"--clean-fraction {self.clean_fraction}: use a value in [0, 1)")
        if self.distill_loss not in DISTILL_LOSSES:
            raise Bad(f"--distill-loss {self.distill_loss}: use {', '.join(DISTILL_LOSSES)}")
        if isinstance(self.loop, dict):  # from JSON (a saved model's config)
            self.loop = LoopConfig(**self.loop)


@dataclass(frozen=True)
class BuiltinRecipe:
    """Architecture and training recipe of medlatent's built-in autoencoder (`medlatent autoencoder train`)."""

    block_out_channels: tuple[int, ...] = setting((16, 32, 64), "Channels per resolution level.", cli=False)
    latent_channels: int = setting(4, "Latent channels.", shown="from --recipe", ge=1)
    layers_per_block: int = setting(1, "ResNet layers per level.", ge=1)
    image_channels: int = setting(1, "1 for grayscale data, 3 for RGB.", ge=1, le=4)
    dataset: str = setting("synthetic", "Training data (its train split), a --dataset spec.")
    size: int = setting(64, "Working resolution in pixels.", ge=8)
    crop: int = setting(32, "Random crop size for training.", ge=8)
    steps: int = setting(3000, "Optimisation steps.", ge=1)
    batch_size: int = setting(16, "Training batch size.", ge=1)
    lr: float = setting(2e-3, "Peak learning rate (one-cycle schedule).", gt=0)
    kl_weight: float = setting(1e-6, "Weight of the KL term.", ge=0)
    seed: int = setting(0, "Training seed.", ge=0)
    extra: dict = setting(factory=dict, help="Free-form notes kept with the recipe.", cli=False)

    def __post_init__(self) -> None:
        check_fields(self)
        if self.crop % self.downsampling_factor or self.size % self.downsampling_factor:
            raise MedlatentInputError(
                f"--crop {self.crop} and --size {self.size}: use multiples "
                f"of {self.downsampling_factor} (the downsampling factor)"
            )

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


SPACES = ("image", "reconstruction", "latent")
# Latent variants that read the latents through a fixed map before a plain latent classifier:
# "whitened" (per-channel whitening fitted on the training latents) and "decoder-prefix:STAGE" (the
# frozen decoder up to STAGE, a stage name or index, or "auto": chosen on the validation images).
WHITENED = "whitened"
DECODER_PREFIX = "decoder-prefix"
MAPPED_VARIANTS = (WHITENED, f"{DECODER_PREFIX}:STAGE")
PREFIX_MARGIN_HELP = (
    "decoder-prefix:auto takes the cheapest decoder stage whose validation AUROC is at least the reconstruction "
    "classifier's minus this margin (else the best validation AUROC)."
)


def mapped_variant(text: str, option: str) -> str:
    """`text` if it names a mapped latent variant (whitened, decoder-prefix:STAGE), else one error
    naming `option`; the stage itself is checked against each autoencoder's decoder later."""
    name, colon, stage = text.partition(":")
    if text == WHITENED or (name == DECODER_PREFIX and colon and stage.strip()):
        return text
    if name == DECODER_PREFIX:
        raise MedlatentInputError(
            f"{option} {text}: name the decoder stage, e.g. {DECODER_PREFIX}:up1, {DECODER_PREFIX}:2 or "
            f"{DECODER_PREFIX}:auto"
        )
    raise MedlatentInputError(f"{option} {text}: use {', '.join(MAPPED_VARIANTS)} (STAGE: a name, an index or auto)")


@dataclass
class ClassifierTrainConfig:
    """`medlatent classifier train`: one classifier of a space on the official split, saved."""

    space: str = setting("latent", "The classifier's space: image | reconstruction | latent.", choices=SPACES)
    autoencoder: str | None = setting(None, "The autoencoder of the latent and reconstruction spaces.")
    distill_from: str | None = setting(None, "A saved image-space classifier to distil from.")
    init: str = setting("random", "random | imagenet | a saved classifier folder to start from.")
    latent_variant: str | None = setting(
        None,
        "With --space latent: whitened (per-channel whitening fitted on the training latents) or "
        "decoder-prefix:STAGE (the frozen decoder up to STAGE, a name or index, or auto), then the classifier.",
    )
    prefix_margin: float = setting(0.01, PREFIX_MARGIN_HELP, ge=0)
    # One classifier of the official split, held in memory: folds and streaming are the gap audit's.
    data: DataConfig = setting(factory=DataConfig, omit=("folds", "stream"))
    train: TrainConfig = setting(factory=TrainConfig, omit=("derived",))
    run: RunConfig = run_settings("out overwrite device progress bootstrap latent_std")

    def __post_init__(self) -> None:
        check_fields(self)
        if self.space != "image" and not self.autoencoder:
            raise MedlatentInputError(f"--space {self.space} needs --autoencoder")
        if self.train.noise_conditioned and self.space != "latent":
            raise MedlatentInputError("--noise-conditioned applies to --space latent")
        if self.latent_variant is not None:
            mapped_variant(self.latent_variant, "--latent-variant")
            if self.space != "latent":
                raise MedlatentInputError(f"--latent-variant {self.latent_variant} applies to --space latent")
            if self.train.noise_conditioned:
                raise MedlatentInputError(
                    f"--latent-variant {self.latent_variant}: its classifier reads mapped latents, where noise "
                    "would not be the diffusion's; train it without --noise-conditioned"
                )


@dataclass
class ClassifierEvalConfig:
    """`medlatent classifier eval`: a saved classifier scored on the test split, optionally over noise levels."""

    model: str | None = setting(None, "A saved classifier folder.", required=True, cli=False)
    autoencoder: str | None = setting(None, "The autoencoder of latent and reconstruction models.")
    sigmas: list[float] = setting(
        factory=list, help="Noise levels of a sweep (repeatable).", flag="sigma", shown="none", ge=0
    )
    data: DataConfig = setting(factory=DataConfig, omit=("folds", "stream"))
    run: RunConfig = run_settings("device progress seeds json_out")

    def __post_init__(self) -> None:
        check_fields(self)
        self.run.one_seed()


@dataclass
class DiffusionConfig:
    """How a class-conditional latent denoiser is trained (EDM parameterisation)."""

    preset: str = setting(
        "tiny",
        "Denoiser size: tiny (CPU, tests) | small | base (GPU) | a diffusers "
        "UNet2DModel folder (its architecture, and its weights if present).",
    )
    parameterisation: str = setting(
        "edm", "edm (Karras et al. 2022) | eps | v (DDPM/VP on diffusers' DDPMScheduler, min-SNR weighted)."
    )
    min_snr_gamma: float = setting(5.0, "Min-SNR weighting gamma of eps and v training (0: unweighted).")
    steps: int = setting(4000, "Optimisation steps.", ge=1)
    batch_size: int = setting(64, "Training batch size.", ge=1)
    lr: float = setting(2e-3, "Peak learning rate (one-cycle schedule).", gt=0)
    sigma_data: float = setting(0.5, "Std the latents are normalised to (EDM's sigma_data).", gt=0)
    p_mean: float = setting(-1.2, "Mean of ln(sigma) during training (EDM's P_mean).")
    p_std: float = setting(1.2, "Std of ln(sigma) during training (EDM's P_std).", gt=0)
    label_dropout: float = setting(0.1, "Share of labels replaced by the null class (classifier-free guidance).")
    fold: int = setting(
        0,
        "With --folds K: the fold whose test images are held out (the "
        "model trains on the rest; `medlatent augment` tests on them).",
        ge=0,
    )
    sample_every: int = setting(
        0,
        "Write a decoded sample grid per class every N steps into the model's run folder (0: only at the end).",
        ge=0,
    )
    seed: int = setting(0, "Training seed (also the split's).", ge=0)
    init: str = setting(
        "",
        "Fine-tune: start from this saved latent diffusion model (its architecture, "
        "weights and latent normalisation; same autoencoder and classes count).",
    )
    drift: float = setting(
        0.0,
        "Latent Drift in training: the forward process's noise is drawn from "
        "N(delta, I) (normalised latent units; 0: off). Sample with the same --drift.",
    )
    loop: LoopConfig = setting(factory=lambda: LoopConfig(ema_sigma_rel=0.05))  # EDM2's power-function EMA by default

    def __post_init__(self) -> None:
        if isinstance(self.loop, dict):
            self.loop = LoopConfig(**self.loop)
        check_fields(self)
        if not 0.0 <= self.label_dropout < 1.0:
            raise MedlatentInputError(f"--label-dropout {self.label_dropout}: use a value in [0, 1)")
        if self.parameterisation not in PARAMETERISATIONS:
            raise MedlatentInputError(
                f"--parameterisation {self.parameterisation}: use {', '.join(PARAMETERISATIONS)}"
            )
        if self.preset not in ("tiny", "small", "base") and not (Path(self.preset) / "config.json").is_file():
            raise MedlatentInputError(
                f"--preset {self.preset}: use tiny, small, base or a folder with a diffusers UNet2DModel config.json"
            )
        if self.min_snr_gamma < 0:
            raise MedlatentInputError(f"--min-snr-gamma {self.min_snr_gamma}: use 0 (off) or a positive value, e.g. 5")


@dataclass
class DiffusionTrainConfig:
    """`medlatent diffusion train`: a class-conditional latent denoiser on the cached latents of one
    split's training and validation images."""

    autoencoder: str = setting("builtin:kl-f4-synthetic", "The autoencoder whose latent space is modelled.")
    data: DataConfig = setting(factory=DataConfig, omit=("stream",))
    diffusion: DiffusionConfig = setting(factory=DiffusionConfig)
    run: RunConfig = run_settings("out overwrite device progress")

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class SampleConfig:
    """`medlatent diffusion sample`: samples of one class from a latent diffusion model."""

    model: str | None = setting(None, "A model saved by `medlatent diffusion train`.", required=True)
    class_name: str | None = setting(None, "Class name (or index) to generate.", flag="class", required=True)
    n: int = setting(16, "Number of samples.", ge=1)
    steps: int = setting(
        32, "Sampler steps (heun: 2 network evaluations each, 1 for the last; the others: 1 each).", ge=1
    )
    sampler: str = setting(
        "heun",
        "heun (EDM Algorithm 2) | euler (EDM Euler) | dpm (EDM "
        "DPM-Solver++ 2M) | ddim: diffusers schedulers but heun.",
        choices=SAMPLERS,
    )
    cfg: float = setting(1.0, "Classifier-free guidance scale (1: conditional, 0: unconditional).", ge=0, le=50)
    guidance_classifier: str | None = setting(
        None, "A noise-conditioned latent classifier of the same autoencoder, for classifier guidance."
    )
    guidance_scale: float = setting(1.0, "Classifier guidance scale.", gt=0, le=100)
    drift: float | None = setting(
        None,
        "Latent Drift (Yeganeh et al., Eq. 4): delta added to the mean of every reverse step and of the "
        "initial noise, in the model's normalised latent units (the paper searches [-0.2, 0.2]; 0: off). "
        "A model trained with --drift starts from noise of that mean without it.",
    )
    chunk_size: int = setting(
        256, "Samples per stored chunk (an interrupted run resumes from the stored chunks).", ge=1, cli=False
    )
    run: RunConfig = run_settings("out overwrite device seeds")

    def __post_init__(self) -> None:
        check_fields(self)
        self.run.one_seed()


@dataclass
class EvaluateConfig:
    """`medlatent diffusion evaluate`: the samples' quality against the images the model held out."""

    model: str | None = setting(None, "A model saved by `medlatent diffusion train`.", required=True)
    classifier: str | None = setting(
        None, "An independent image-space classifier (`medlatent classifier train --space image`).", required=True
    )
    n: int = setting(100, "Samples per class.", ge=1)
    steps: int = setting(32, "Sampler steps.", ge=1)
    sampler: str = setting("heun", "heun | euler | dpm | ddim (see `diffusion sample`).", choices=SAMPLERS)
    cfg: float = setting(1.0, "Classifier-free guidance scale.", ge=0, le=50)
    guidance_classifier: str | None = setting(None, "A noise-conditioned latent classifier for classifier guidance.")
    guidance_scale: float = setting(1.0, "Classifier guidance scale.", gt=0, le=100)
    baseline: bool = setting(True, "Also score an untrained denoiser of the same architecture.")
    inception: bool = setting(
        False, "Also Inception FID and KID (optional extra medlatent[fid]; the weights download once)."
    )
    inception_weights: str | None = setting(
        None, "A local Inception weights file for --inception (torch-fidelity's pt_inception-2015-12-05)."
    )
    run: RunConfig = run_settings("device seeds json_out")

    def __post_init__(self) -> None:
        check_fields(self)
        self.run.one_seed()


SCORE_OUTPUTS = (".csv", ".npz")


@dataclass
class ScoreConfig:
    """`medlatent score`: probabilities of a saved latent classifier for latent (or image) files."""

    classifier: str | None = setting(
        None, "A saved latent classifier (`medlatent classifier train --space latent`).", required=True
    )
    latents: str | None = setting(
        None,
        "A latent file (.safetensors/.npz/.pt) or a folder of them; image files with --autoencoder.",
        required=True,
    )
    autoencoder: str | None = setting(None, "Encode image files with this autoencoder first (the classifier's).")
    size: int | None = setting(None, "Working size of the images, with --autoencoder.", ge=8)
    batch_size: int = setting(8192, "Latents per batch.", ge=1)
    compile: bool = setting(False, "torch.compile with CUDA graphs (measured slower than eager at large batches).")
    run: RunConfig = run_settings("out device progress")

    def __post_init__(self) -> None:
        check_fields(self)
        if Path(self.run.out).suffix not in SCORE_OUTPUTS:
            raise MedlatentInputError(f"--out {self.run.out}: use a .csv or .npz file")
        if self.autoencoder is not None and self.size is None:
            raise MedlatentInputError(
                "--size: give the working size the classifier's latents were made at (as --size of classifier train)"
            )


@dataclass
class CompareConfig:
    """`medlatent compare`: runs of one command side by side (comparison.html and comparison.csv)."""

    runs: list[str] | None = setting(
        None, "Run folders (or their results.json) of one command, compared side by side.", required=True, cli=False
    )
    metric: str | None = setting(
        None,
        "The metric of the page's table and figure (comparison.csv keeps every one).",
        shown="auroc where the runs have it, else their first",
    )
    run: RunConfig = run_settings("out overwrite", "runs/compare")

    def __post_init__(self) -> None:
        if not self.runs:  # the runs are the command's arguments, not an option
            raise MedlatentInputError("compare: give the run folders to compare (RUN RUN ..., or runs: in --config)")
        check_fields(self)


@dataclass
class PushConfig:
    """`medlatent push`: a saved classifier or latent diffusion model uploaded to the Hugging Face Hub,
    with a model card generated from what its folder records."""

    model: str | None = setting(
        None,
        "A folder saved by `medlatent classifier train` or `medlatent diffusion train`.",
        required=True,
        cli=False,
    )
    repo_id: str | None = setting(
        None, "The Hub repository, OWNER/NAME (made when missing).", required=True, cli=False
    )
    private: bool = setting(
        False, "Make the repository private when it is made (an existing one keeps its visibility).", protocol=False
    )
    revision: str | None = setting(
        None,
        "The branch to push to, made from main when missing (huggingface_hub's revision).",
        shown="main",
        protocol=False,
    )
    commit_message: str | None = setting(
        None, "The commit's message.", shown="Upload medlatent classifier (or latent diffusion model)", protocol=False
    )
    token: str | None = setting(
        None,
        "A Hub token with write access; prefer `hf auth login` or HF_TOKEN (a token on the command line shows "
        "in the process list and the shell's history).",
        shown="the stored login",
        protocol=False,
    )
    run: RunConfig = run_settings("progress")

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class BenchConfig:
    """`medlatent bench classifiers`; the defaults are the published setup."""

    image_backbone: str = setting("resnet50", "Image-space model (timm).")
    image_size: int = setting(256, "Image side in pixels.", ge=8)
    image_channels: int = setting(3, "Image channels.", ge=1)
    latent_backbone: str = setting("convnext_tiny", "Latent-space model (timm).")
    latent_channels: int = setting(32, "Latent channels.", ge=1)
    latent_size: int = setting(32, "Latent side.", ge=1)
    latent_stem: str = setting(
        "standard",
        "standard (as published) | latent (stride-1, as the audit's latent models)",
        choices=("standard", "latent"),
    )
    noise_conditioned: bool = setting(
        True,
        "The latent model with its FiLM noise conditioning (the "
        "method), scored at sigma_min; off: the plain backbone.",
    )
    decoder: str = setting(
        "flux2", "Decoder whose decode precedes the image model in (b); random weights, same cost.", choices=("flux2",)
    )
    batch_size: int = setting(64, "Batch size.", ge=1)
    decode_batch_size: int = setting(4, "Batch for decode + image model (the decoder is large).", ge=1)
    num_classes: int = setting(2, "Classes.", ge=2)
    repeats: int = setting(3, "Timed repeats (the best is kept).", ge=1)
    # On CUDA, each model is also measured over a sweep and compared at its best configuration.
    sweep_batch: list[int] = setting(
        factory=lambda: [64, 256, 1024, 4096], help="CUDA sweep: batch sizes (repeat).", flag="sweep-batch"
    )
    sweep_precision: list[str] = setting(
        factory=lambda: ["fp32", "bf16"],
        help="CUDA sweep: fp32, bf16 (repeat or comma-separate).",
        flag="sweep-precision",
    )
    sweep_compile: list[str] = setting(
        factory=lambda: ["off", "on"],
        help="CUDA sweep: torch.compile with CUDA graphs off, on (repeat or comma-separate).",
        flag="sweep-compile",
    )
    run: RunConfig = run_settings("device json_out")

    def __post_init__(self) -> None:
        if isinstance(self.run, dict):  # from asdict, in the benchmark's child processes
            object.__setattr__(self, "run", RunConfig(**self.run))
        check_fields(self)
        for name, choices in (("sweep_precision", ("fp32", "bf16")), ("sweep_compile", ("off", "on"))):
            values = [v.strip() for item in getattr(self, name) for v in str(item).split(",") if v.strip()]
            if not values or set(values) - set(choices):
                raise MedlatentInputError(f"--{name.replace('_', '-')} {','.join(values)}: use {', '.join(choices)}")
            object.__setattr__(self, name, values)  # frozen: normalised once, here
        if not self.sweep_batch or min(self.sweep_batch) < 1:
            raise MedlatentInputError("--sweep-batch: use sizes of 1 or more")


@dataclass
class DiffusionBenchConfig:
    """`medlatent bench diffusion`: the denoiser's training and sampling speed on random latents."""

    latent_channels: int = setting(32, "Latent channels (TAEF2 / FLUX.2: 32).", ge=1)
    latent_size: int = setting(8, "Latent side (64-px images at f8: 8).", ge=4)
    preset: str = setting("small", "Denoiser size: tiny | small | base.", choices=("tiny", "small", "base"))
    parameterisation: str = setting("edm", "edm | eps | v", choices=PARAMETERISATIONS)
    num_classes: int = setting(2, "Classes.", ge=2)
    batch_size: int = setting(128, "Training and sampling batch.")
    train_steps: int = setting(20, "Timed training steps (after 3 warm-up steps).")
    sample_steps: list[int] = setting(
        factory=lambda: [8, 16, 32], help="Sampler steps to time (repeat).", flag="sample-steps"
    )
    samplers: list[str] = setting(
        factory=lambda: list(SAMPLERS), help="Samplers to time (repeat or comma-separate).", flag="sampler"
    )
    cfg: float = setting(
        2.0, "Classifier-free guidance scale while sampling (not 1: two branches per evaluation).", ge=0, le=50
    )
    classify_draws: int = setting(51, "Draws per image when timing the diffusion classifier (0: skip it).", ge=0)
    run: RunConfig = run_settings("device json_out")

    def __post_init__(self) -> None:
        check_fields(self)
        self.samplers = [v.strip() for item in self.samplers for v in item.split(",") if v.strip()]
        unknown = sorted(set(self.samplers) - set(SAMPLERS))
        if unknown:
            raise MedlatentInputError(f"--sampler {','.join(unknown)}: use {', '.join(SAMPLERS)}")
        if self.parameterisation not in PARAMETERISATIONS:
            raise MedlatentInputError(
                f"--parameterisation {self.parameterisation}: use {', '.join(PARAMETERISATIONS)}"
            )
        if min([self.batch_size, self.train_steps, *self.sample_steps]) < 1:
            raise MedlatentInputError("--batch-size, --train-steps and --sample-steps: use 1 or more")


# -- the schema: fields -> options, YAML keys, nested instances ------------------------------------


@dataclass(frozen=True)
class Leaf:
    path: tuple[str, ...]  # e.g. ("train", "loop", "ema_decay")
    field: Field
    type: Any
    inherited: Any = MISSING  # the default set by an enclosing config's factory (e.g. diffusion's EMA), if any

    @property
    def name(self) -> str:
        return self.path[-1]

    @property
    def option(self) -> str:
        return self.field.metadata.get("flag") or self.name.replace("_", "-")

    @property
    def keys(self) -> set[str]:
        """The names it is given by: field or option name, hyphens and underscores alike."""
        return {self.name, self.option, self.name.replace("_", "-"), self.option.replace("-", "_")}

    @property
    def required(self) -> bool:
        """The command needs it given: declared required, and no default of the command's own."""
        return bool(self.field.metadata.get("required")) and self.default is None

    def value_in(self, instance: Any) -> Any:
        """This setting's value in an instance of the config it belongs to."""
        for part in self.path:
            instance = getattr(instance, part)
        return instance

    @property
    def default(self) -> Any:
        if self.inherited is not MISSING:
            return self.inherited
        return self.field.default_factory() if self.field.default_factory is not MISSING else self.field.default


def _nested_default(f: Field, enclosing: Any) -> Any:
    """The default instance of a nested config: the enclosing default's, else the field's factory."""
    if enclosing is not None:
        return getattr(enclosing, f.name)
    return f.default_factory() if f.default_factory is not MISSING else None


def leaves(cls: type, prefix: tuple[str, ...] = (), defaults: Any = None, omit: tuple[str, ...] = ()) -> list[Leaf]:
    """Every setting of `cls`, nested dataclasses flattened, in declaration order, less those a
    nesting field omits (by name or role). A nested config's defaults are those of the instance its
    field's factory makes (so `DiffusionConfig` can default to an EMA while `TrainConfig` does not)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in fields(cls):
        if f.name in omit or f.metadata.get("role") in omit:
            continue
        tp = hints[f.name]
        if is_dataclass(tp):
            inner = omit + tuple(f.metadata.get("omit", ()))
            out += leaves(tp, prefix + (f.name,), _nested_default(f, defaults), inner)
        else:
            out.append(Leaf(prefix + (f.name,), f, tp, getattr(defaults, f.name) if defaults is not None else MISSING))
    return out


def _inner(tp: Any) -> tuple[Any, bool]:
    """(type without None, whether None is allowed)."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}s (or one)"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def coerce(value: Any, tp: Any, where: str) -> Any:
    """`value` checked against the field type `tp`; a scalar where a list is expected becomes a
    one-element list. A wrong type is one MedlatentInputError naming `where`."""
    tp, optional = _inner(tp)
    if value is None:
        if optional:
            return None
        raise MedlatentInputError(f"{where}: expected {_describe(tp)}, got nothing")
    if typing.get_origin(tp) is list:
        items = value if isinstance(value, (list, tuple)) else [value]
        return [coerce(v, typing.get_args(tp)[0], where) for v in items]
    if tp is str and isinstance(value, os.PathLike):  # a path where a path string is expected (the Python API)
        value = os.fspath(value)
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)  # a class index or a drift given as a number where the option takes text
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(tp, True)
    if not ok:
        shown = f"the string {value!r}" if isinstance(value, str) else f"{value!r} ({type(value).__name__})"
        raise MedlatentInputError(f"{where}: expected {_describe(tp)}, got {shown}")
    return float(value) if tp is float else value


def from_flat(cls: type, values: dict[str, Any], where: str = "configuration", base: Any = None) -> Any:
    """An instance of `cls` from flat settings keyed by field name, option name or either with
    hyphens and underscores swapped (`batch-size`, `batch_size`; `seed` or `seeds`). Settings the
    config omits are not accepted; those not given come from `base` (default: the defaults; a
    config whose defaults depend on a setting, as a recipe's, says so with a `base_for(values)`)."""
    tree = settings_tree(cls, values, where)
    if base is None and hasattr(cls, "base_for"):
        base = cls.base_for(values)
    return _build(cls, tree, base)


def settings_tree(cls: type, values: dict[str, Any], where: str = "configuration") -> dict:
    """Flat settings as the nested mapping of `cls`'s fields, each key known and each value of its
    field's type; else one error naming `where` and the key (e.g. a --config file's)."""
    by_key = {key: leaf for leaf in leaves(cls) for key in leaf.keys}
    tree: dict = {}
    unknown = []
    for key, value in values.items():
        leaf = by_key.get(key)
        if leaf is None:
            unknown.append(key)
            continue
        node = tree
        for part in leaf.path[:-1]:
            node = node.setdefault(part, {})
        node[leaf.name] = coerce(value, leaf.type, f"{where}: key {key}")
    if unknown:
        options = sorted({leaf.option for leaf in leaves(cls)})
        raise MedlatentInputError(
            f"{where}: unknown key{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(map(str, unknown))}; valid keys: {', '.join(options)}"
        )
    return tree


def _build(cls: type, tree: dict, base: Any = None) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in fields(cls):
        inherited = getattr(base, f.name, MISSING)
        if is_dataclass(hints[f.name]):
            kwargs[f.name] = _build(
                hints[f.name], tree.get(f.name, {}), _nested_default(f, None) if inherited is MISSING else inherited
            )
        elif f.name in tree:
            kwargs[f.name] = tree[f.name]
        elif inherited is not MISSING:
            kwargs[f.name] = inherited
    return cls(**kwargs)


def flat(instance: Any) -> dict[str, Any]:
    """Settings of an instance, flat, keyed by field name (the inverse of `from_flat`)."""
    out = {}
    for leaf in leaves(type(instance)):
        out[leaf.name] = leaf.value_in(instance)
    return out


def protocol_settings(instance: Any) -> dict[str, Any]:
    """The settings of `instance` that decide what is trained, keyed by field name: every leaf but
    those declared `protocol=False` and those its config omits (the ones the workflow sets itself)."""
    return {
        leaf.name: leaf.value_in(instance)
        for leaf in leaves(type(instance))
        if leaf.field.metadata.get("protocol", True)
    }


def load_yaml(path: str | Path) -> dict:
    """A YAML file's mapping of settings (validated later by `from_flat`)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise MedlatentInputError(f"--config {path}: file not found")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as err:
        raise MedlatentInputError(
            f"--config {path}: not a text file (byte {err.start} is "
            "not UTF-8); give a YAML file of option names and values"
        ) from err
    except yaml.YAMLError as err:
        raise MedlatentInputError(f"--config {path}: not valid YAML ({' '.join(str(err).split())[:160]})") from err
    except OSError as err:
        raise MedlatentInputError(f"--config {path}: cannot read it ({err.strerror})") from err
    if not isinstance(values, dict):
        raise MedlatentInputError(f"--config {path}: expected a mapping of option names to values")
    return {str(key): value for key, value in values.items()}


def shown_default(leaf: Leaf) -> str:
    """A default as --help shows it."""
    if leaf.field.metadata.get("shown"):
        return leaf.field.metadata["shown"]
    value = leaf.default
    if value is None or value == []:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return ", ".join(map(str, value)) if isinstance(value, list) else str(value)


def cli_parameters(cls: type) -> list[inspect.Parameter]:
    """Typer options for every CLI setting of `cls` (nested included): `--option-name`, help text
    with the default, None when not given (so a YAML value or the default applies)."""
    from typing import Annotated

    import typer

    params = []
    for leaf in leaves(cls):
        if not leaf.field.metadata.get("cli", True):
            continue
        tp, _ = _inner(leaf.type)
        decls = [f"--{leaf.option}/--no-{leaf.option}"] if tp is bool else [f"--{leaf.option}"]
        metavar = typing.get_args(tp)[0].__name__.upper() if typing.get_origin(tp) is list else None
        rule = allowed(leaf.field)
        shown = "required" if leaf.required else f"default: {shown_default(leaf)}"
        help_text = f"{leaf.field.metadata.get('help', '')}  [{shown}{f'; {rule}' if rule else ''}]"
        option = typer.Option(*decls, help=help_text, show_default=False, metavar=metavar)
        params.append(
            inspect.Parameter(
                leaf.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[tp | None, option]
            )
        )
    return params


# -- the built-in autoencoder's recipes (instances: after the schema their checks use) ----------------

RECIPES: dict[str, BuiltinRecipe] = {
    "kl-f4-synthetic": BuiltinRecipe(),
    "kl-f8-synthetic": BuiltinRecipe(block_out_channels=(16, 32, 64, 64), latent_channels=8),
}


@dataclass
class AutoencoderTrainConfig:
    """`medlatent autoencoder train`: a built-in autoencoder from a named recipe, any of whose
    settings the options override."""

    recipe: str = setting("kl-f4-synthetic", "Architecture recipe.", choices=tuple(RECIPES))
    architecture: BuiltinRecipe = setting(factory=BuiltinRecipe)
    loop: LoopConfig = setting(factory=LoopConfig)
    run: RunConfig = run_settings("out overwrite device progress")

    def __post_init__(self) -> None:
        check_fields(self)

    @classmethod
    def base_for(cls, values: dict[str, Any]) -> Any:
        """The defaults the given settings apply to (for `from_flat`): the architecture of the recipe they name."""
        recipe = values.get("recipe", cls.recipe)
        if recipe not in RECIPES:
            raise MedlatentInputError(f"--recipe {recipe}: use {allowed(fields(cls)[0])}")
        return types.SimpleNamespace(architecture=RECIPES[recipe])
