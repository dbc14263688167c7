"""The audits' configurations (gap, augment, encoder audit, diffusion classify, counterfactual):
plain data, also the schema of their CLI options and YAML keys.

It nests the data and training concerns (`config.DataConfig`, `config.TrainConfig`) rather than
copying their settings. Kept apart from the audit itself so that reading and validating a
configuration imports no deep-learning library (the CLI answers bad options at once).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace

from ..config import (
    DECODER_PREFIX,
    MAPPED_VARIANTS,
    PREFIX_MARGIN_HELP,
    SAMPLERS,
    WHITENED,
    DataConfig,
    RunConfig,
    TrainConfig,
    check_fields,
    mapped_variant,
    protocol_settings,
    run_settings,
    setting,
)
from ..errors import MedlatentInputError

# Variants trained noise-conditioned (the distilled one too), for variant_epoch_factor times the epochs.
NOISE_VARIANTS = ("noise-conditioned", "distilled")
LATENT_VARIANTS = (*NOISE_VARIANTS, *MAPPED_VARIANTS)
VARIANT_INITS = ("plain", "random")
# Bumped when stored classifiers change (2: c_in preconditioning; 3: training curves;
# 4: the engine, models.Classifier).
PROTOCOL_VERSION = 4
# Training settings an audit sets itself (the seed of each run, a variant's noise conditioning, the
# latent scale) and, in the audits without latent variants, the variants' settings: not their options.
AUDIT_SETS = ("per-run", "derived")
PLAIN_AUDIT_SETS = AUDIT_SETS + ("variant",)


@dataclass
class GapConfig:
    """Everything that defines a gap run."""

    data: DataConfig = setting(factory=DataConfig)
    autoencoders: list[str] = setting(
        factory=lambda: ["builtin:kl-f4-synthetic"],
        help="hf:ID[:SUB] | taesd:ENC.pth | builtin:NAME|DIR | medvae:NAME; repeatable.",
        flag="autoencoder",
        protocol=False,
    )
    train: TrainConfig = setting(factory=TrainConfig, omit=AUDIT_SETS)
    linear_probe: bool = setting(True, "Also train a linear probe in each space.", protocol=False)
    latent_variants: list[str] = setting(
        factory=list,
        help=(
            "Extra latent classifiers: noise-conditioned, distilled, whitened, decoder-prefix:STAGE "
            "(STAGE: a decoder stage name or index, or auto) (repeat or comma-separate)."
        ),
        shown="none",
        protocol=False,
    )
    prefix_margin: float = setting(0.01, PREFIX_MARGIN_HELP, ge=0, protocol=False)
    decoder_stages: str = setting(
        "none",
        "Also classifiers on the features after these decoder stages: all, or a comma list of stage names "
        "(see the stages of each autoencoder in the docs); none: off.",
        protocol=False,
    )
    diffusion_models: list[str] = setting(
        factory=list,
        help=(
            "A latent diffusion model (`medlatent diffusion train`) of an audited autoencoder, "
            "scored as a diffusion classifier on each run's test images; repeatable."
        ),
        flag="diffusion-model",
        shown="none",
        protocol=False,
    )
    diffusion_draws: int = setting(
        51, "(sigma, eps) draws per image of the diffusion classifier rows (Favero et al.: 51).", ge=1, protocol=False
    )
    diffusion_sigma: str = setting(
        "train",
        "The diffusion classifier's noise levels: train (the model's training distribution), "
        "auto (chosen on the other folds of the test images) or MEAN,STD of ln sigma.",
        protocol=False,
    )
    diffusion_tolerance: float | None = setting(
        None,
        "Also the diffusion classifier's cheapest early stop whose loss against its full vote stays within "
        "this tolerance, e.g. 0.01 (chosen on the other folds of each run's test images).",
        gt=0,
        protocol=False,
    )
    diffusion_tolerance_metric: str = setting(
        "auroc",
        "The metric --diffusion-tolerance is stated in.",
        choices=("auroc", "balanced_accuracy"),
        protocol=False,
    )
    # Noise-conditioned variants train for this many times the epochs (and patience): with sigma drawn
    # uniformly from the Karras steps only about a third of their samples keep the signal (sigma < 0.5).
    variant_epoch_factor: float = setting(
        3.0, "Noise-conditioned variants train this many times the epochs and patience.", ge=1
    )
    # "plain": the audit's plain latent classifier of the same split and seed (FiLM at identity, so they
    # start at its accuracy), or "random".
    variant_init: str = setting(
        "plain",
        "Variants start from the plain latent classifier (plain) or from random weights.",
        choices=VARIANT_INITS,
    )
    sweep_points: int = setting(9, "Noise levels in the variants' sigma sweep.")
    confounder_column: str | None = setting(
        None,
        "CSV column of a confounder (a site, a scanner): each classifier's reliance on it in the row's "
        "shortcuts table (the synthetic benchmark's marker without it).",
        protocol=False,
    )
    run: RunConfig = run_settings("out device progress seeds bootstrap interval latent_std", "runs/gap")

    def __post_init__(self) -> None:
        from ..data import check_csv_columns

        check_fields(self)
        check_csv_columns(self.data.dataset.partition(":")[0], self.confounder_column, None)
        if not self.autoencoders:
            raise MedlatentInputError("give at least one --autoencoder")
        self.latent_variants = [v.strip() for item in self.latent_variants for v in item.split(",") if v.strip()]
        self.latent_variants = list(dict.fromkeys(self.latent_variants))
        for variant in self.latent_variants:
            if variant.partition(":")[0] in (WHITENED, DECODER_PREFIX):
                mapped_variant(variant, "--latent-variants")
            elif variant not in NOISE_VARIANTS:
                raise MedlatentInputError(
                    f"--latent-variants {variant}: use {', '.join(LATENT_VARIANTS)} "
                    "(STAGE: a decoder stage name or index, or auto)"
                )
        stages = [s.strip() for s in self.decoder_stages.split(",") if s.strip()]
        self.decoder_stages = ",".join(stages) or "none"
        if len(stages) > 1 and {"all", "none"} & set(stages):
            raise MedlatentInputError(
                f"--decoder-stages {self.decoder_stages}: all and none stand alone; give one of them or stage names"
            )

    def train_config(self, seed: int, variant: str | None = None) -> TrainConfig:
        """The training configuration of the plain classifiers, or of a latent variant: the
        noise-conditioned ones (`NOISE_VARIANTS`) for `variant_epoch_factor` times the epochs; the
        mapped ones (whitened, decoder-prefix) as the plain latent classifier."""
        noisy = variant in NOISE_VARIANTS
        factor = self.variant_epoch_factor if noisy else 1.0
        return replace(
            self.train,
            seed=seed,
            epochs=round(self.train.epochs * factor),
            patience=round(self.train.patience * factor),
            noise_conditioned=noisy,
            sigma_data=self.run.latent_std,
        )

    def protocol_hash(self) -> str:
        """What determines a trained classifier's predictions (not output, display or resource options)."""
        settings = protocol_settings(self)
        return hashlib.sha256(
            json.dumps({"protocol_version": PROTOCOL_VERSION, **settings}, sort_keys=True).encode()
        ).hexdigest()[:12]


AUGMENT_SPACES = ("image", "latent")
CONDITIONS = (
    "real",
    "real+synthetic",
    "synthetic",
)  # what each classifier trains on; all test on the same real images


@dataclass
class AugmentConfig:
    """Generative augmentation: classifiers trained on real, real + synthetic and synthetic images
    by the audit's protocol, tested on the real images the diffusion model held out."""

    model: str = setting(
        "models/ldm",
        "A latent diffusion model saved by `medlatent diffusion train`; its dataset and held-out split are used.",
        protocol=False,
    )
    synthetic: str = setting(
        "balance",
        "How many synthetic images join the real ones: balance (each class topped "
        "up to the largest) | RATIO (that many per real image of each class, e.g. 1).",
    )
    spaces: list[str] = setting(
        factory=lambda: list(AUGMENT_SPACES),
        help="Spaces whose classifiers are trained: image, latent (repeat or comma-separate).",
        flag="space",
        protocol=False,
    )
    cfg: float = setting(2.0, "Classifier-free guidance scale of the synthetic images.", ge=0, le=50)
    sample_steps: int = setting(32, "Sampler steps per synthetic image.", ge=1)
    sampler: str = setting(
        "heun", "heun (EDM Algorithm 2) | euler | dpm | ddim (diffusers schedulers).", choices=SAMPLERS
    )
    train: TrainConfig = setting(factory=TrainConfig, omit=PLAIN_AUDIT_SETS)
    run: RunConfig = run_settings(
        "out device progress seeds bootstrap interval latent_std", "runs/augment", seeds=[0, 1, 2]
    )

    def __post_init__(self) -> None:
        check_fields(self)
        self.spaces = [s.strip() for item in self.spaces for s in item.split(",") if s.strip()]
        unknown = sorted(set(self.spaces) - set(AUGMENT_SPACES))
        if unknown or not self.spaces:
            raise MedlatentInputError(f"--space {','.join(unknown) or '(none)'}: use {', '.join(AUGMENT_SPACES)}")
        self.synthetic_ratio()  # validates

    def synthetic_ratio(self) -> float | None:
        """None for "balance", else the number of synthetic images per real one."""
        if self.synthetic == "balance":
            return None
        try:
            ratio = float(self.synthetic)
        except ValueError:
            ratio = -1.0
        if not 0 < ratio <= 100:
            raise MedlatentInputError(f"--synthetic {self.synthetic}: use balance or a ratio in (0, 100], e.g. 1")
        return ratio

    def train_config(self, seed: int) -> TrainConfig:
        return replace(self.train, seed=seed, noise_conditioned=False, sigma_data=self.run.latent_std)

    def protocol_hash(self, model_hash: str) -> str:
        settings = protocol_settings(self)
        return hashlib.sha256(
            json.dumps(
                {"protocol_version": PROTOCOL_VERSION, "model": model_hash, **settings}, sort_keys=True
            ).encode()
        ).hexdigest()[:12]


AUDIT_SECTIONS = ("perturbation", "neighbourhood", "probes", "robustness", "information", "shortcuts", "concepts")
# Run without --sections: shortcuts needs a confounder, which the default dataset has not; concepts
# trains a concept model per space, asked for where it is wanted.
DEFAULT_AUDIT_SECTIONS = AUDIT_SECTIONS[:5]


@dataclass
class EncoderAuditConfig:
    """The encoder audit (`medlatent audit`): perturbations, neighbourhoods, controlled lesion
    probes, robustness under shift, information present against usable and shortcuts, per autoencoder."""

    data: DataConfig = setting(factory=DataConfig, omit=("stream",))
    autoencoders: list[str] = setting(
        factory=lambda: ["builtin:kl-f4-synthetic"],
        help="Any autoencoder or encoder spec (hf:, taesd:, builtin:, timm:, encoder:, reference:); repeatable.",
        flag="autoencoder",
    )
    sections: list[str] = setting(
        factory=lambda: list(DEFAULT_AUDIT_SECTIONS),
        help=(
            "perturbation, neighbourhood, probes, robustness, information, shortcuts (needs a confounder: "
            "synthetic:marker=KIND or --confounder-column), concepts (needs concepts: the synthetic benchmark's "
            "or --concept-column) (comma-separate or repeat)."
        ),
    )
    perturbations: list[str] = setting(
        factory=lambda: [
            "noise",
            "blur",
            "contrast",
            "gamma",
            "brightness",
            "rotation",
            "translation",
            "scaling",
            "jpeg",
        ],
        help="Perturbation families (repeat or comma-separate).",
        flag="perturbation",
    )
    severities: list[int] = setting(
        factory=lambda: [1, 2, 3, 4, 5], help="Severities, 1 to 5 (repeatable).", flag="severity"
    )
    n: int = setting(256, "Test images for the perturbation, neighbourhood and information sections.")
    neighbours: list[int] = setting(
        factory=lambda: [5, 10, 20], help="k of the neighbourhood measures (repeatable).", flag="k"
    )
    lesion_sizes: list[float] = setting(
        factory=lambda: [1.0, 2.0, 4.0, 8.0],
        help="Diameters in pixels of the inserted lesions (repeatable).",
        flag="lesion-size",
    )
    lesion_contrasts: list[float] = setting(
        factory=lambda: [0.1, 0.3],
        help="Intensities added by the inserted lesions (repeatable).",
        flag="lesion-contrast",
    )
    probe_images: int = setting(256, "Images per class in each lesion-probe cell (half train, half test).")
    shift: str = setting(
        "blur:3",
        "The out-of-distribution shift: FAMILY:SEVERITY of a perturbation, "
        "or dataset:SPEC of a second dataset with the same classes.",
    )
    ood_n: list[int] = setting(
        factory=lambda: [16, 64, 256],
        help="Out-of-distribution samples the linear heads are trained on (repeatable).",
        flag="ood-n",
    )
    pca_dims: int = setting(8, "PCA components of each representation for the mutual-information estimates.")
    confounder_column: str | None = setting(
        None,
        "CSV column of a confounder (a site, a scanner; binary or categorical, its values are the groups) "
        "for the shortcuts section.",
    )
    concept_columns: list[str] = setting(
        factory=list,
        help="CSV column of a concept (binary, or categorical: one concept per value) for the concepts "
        "section's bottlenecks (repeatable).",
        flag="concept-column",
    )
    decorrelated_share: float = setting(
        0.1,
        "Share of the validation images the shortcuts section's decorrelated linear heads train on, "
        "drawn balanced over class and confounder.",
        gt=0,
        le=1,
    )
    train: TrainConfig = setting(factory=TrainConfig, omit=PLAIN_AUDIT_SETS)
    run: RunConfig = run_settings("out device progress seeds bootstrap latent_std", "runs/audit", bootstrap=200)

    def __post_init__(self) -> None:
        from ..data.perturbations import check_perturbations

        check_fields(self)
        self.run.one_seed()
        if not self.autoencoders:
            raise MedlatentInputError("give at least one --autoencoder")
        split = lambda items: [s.strip() for item in items for s in str(item).split(",") if s.strip()]  # noqa: E731
        self.sections, self.perturbations = split(self.sections), split(self.perturbations)
        unknown = sorted(set(self.sections) - set(AUDIT_SECTIONS))
        if unknown or not self.sections:
            raise MedlatentInputError(
                f"--sections {','.join(unknown) or '(none)'}: unknown; use {', '.join(AUDIT_SECTIONS)}"
            )
        check_perturbations(self.perturbations, self.severities)
        kind, _, value = self.shift.partition(":")
        if kind != "dataset":
            family, _, level = self.shift.partition(":")
            check_perturbations([family], [int(level)] if level.isdigit() else [-1])
        elif not value:
            raise MedlatentInputError(f"--shift {self.shift}: give dataset:SPEC, e.g. dataset:csv:other.csv")
        if self.n < 8 or self.probe_images < 8:
            raise MedlatentInputError(f"--n {self.n} / --probe-images {self.probe_images}: use 8 or more")
        if not self.neighbours or min(self.neighbours) < 1:
            raise MedlatentInputError(f"--k {self.neighbours}: use neighbourhood sizes of 1 or more")
        if not self.ood_n or min(self.ood_n) < 2:
            raise MedlatentInputError(f"--ood-n {self.ood_n}: use 2 or more samples")
        if any(s <= 0 for s in self.lesion_sizes) or any(not 0 < c <= 1 for c in self.lesion_contrasts):
            raise MedlatentInputError("--lesion-size: use positive diameters; --lesion-contrast: use values in (0, 1]")
        self.check_columns()

    def check_columns(self) -> None:
        """--confounder-column and --concept-column only with a CSV manifest (--concept-column only
        with the concepts section, which alone reads it); the shortcuts section only with a
        confounder (a synthetic marker or a CSV column), the concepts section only with concepts
        (the synthetic benchmark's or CSV columns), read from the settings alone, before any work."""
        from ..data import check_csv_columns

        kind, _, options = self.data.dataset.partition(":")
        check_csv_columns(kind, self.confounder_column, self.concept_columns)
        if self.concept_columns and "concepts" not in self.sections:
            raise MedlatentInputError(
                f"--concept-column {self.concept_columns[0]}: only the concepts section reads it; "
                "add --sections concepts"
            )
        if "concepts" in self.sections and not (kind == "synthetic" or self.concept_columns):
            raise MedlatentInputError(
                f"--sections concepts: --dataset {self.data.dataset} has no concepts; use the synthetic "
                "benchmark or a CSV manifest with --concept-column COLUMN"
            )
        marker = dict(item.partition("=")[::2] for item in options.split(",") if item).get("marker", "none")
        present = self.confounder_column is not None if kind == "csv" else kind == "synthetic" and marker != "none"
        if "shortcuts" in self.sections and not present:
            raise MedlatentInputError(
                f"--sections shortcuts: --dataset {self.data.dataset} has no confounder; use "
                "synthetic:marker=corner|stripe|offset or a CSV manifest with --confounder-column COLUMN"
            )

    def train_config(self) -> TrainConfig:
        return replace(self.train, seed=self.run.seed, noise_conditioned=False, sigma_data=self.run.latent_std)


@dataclass
class DiffusionClassifyConfig:
    """`medlatent diffusion classify`: the latent diffusion model as a classifier of its held-out images."""

    model: str | None = setting(
        None, "A model saved by `medlatent diffusion train`; its held-out test images are classified.", required=True
    )
    draws: int = setting(51, "(sigma, eps) draws per image, shared by all classes (Favero et al.: 51).", ge=1)
    sigma: str = setting(
        "train",
        "The draws' noise levels: train (the model's training distribution), auto "
        "(chosen on the other folds of the test images) or MEAN,STD of ln sigma.",
    )
    alpha: float = setting(0.01, "Level of the sequential test that stops an image's vote early.", gt=0, lt=0.5)
    min_draws: int = setting(5, "Draws before the sequential test may stop an image.", ge=1)
    max_draws: int | None = setting(
        None,
        "A budget: the sequential tests stop an image after this many draws at most, "
        "with its current leader. Default: a fifth of --draws; --draws for no budget.",
        ge=1,
    )
    prune: str | None = setting(
        None, "Also classify with adaptive class pruning (Li et al.): DRAWS:KEEP stages, e.g. 25:5,100:1."
    )
    tolerance: float | None = setting(
        None,
        "Also the cheapest early stop whose loss against the full vote stays within this tolerance, "
        "e.g. 0.01 (chosen on the other folds of the held-out images, at the upper end of its interval).",
        gt=0,
        lt=1,
    )
    tolerance_metric: str = setting(
        "auroc", "The metric --tolerance is stated in.", choices=("auroc", "balanced_accuracy")
    )
    classifiers: list[str] = setting(
        factory=list,
        help=(
            "A saved discriminative classifier (`medlatent classifier "
            "train`) scored on the same images, as a row beside; repeatable."
        ),
        flag="classifier",
        shown="none",
    )
    explain: int = setting(4, "Explanation maps for this many held-out images of each class (0: none).", ge=0)
    explain_sigma: float = setting(0.8, "Noise level of the explanation maps and counterfactuals.", gt=0)
    explain_draws: int = setting(8, "Draws averaged in the class-difference map.", ge=1)
    batch_size: int = setting(256, "Images per batch (each runs all classes).", ge=1)
    compile: bool = setting(False, "On a GPU: run the denoiser as CUDA graphs (torch.compile); ignored on the CPU.")
    run: RunConfig = run_settings("out device progress seeds bootstrap", "runs/diffusion-classify")

    def __post_init__(self) -> None:
        check_fields(self)
        self.run.one_seed()
        if self.min_draws > self.draws:
            raise MedlatentInputError(f"--min-draws {self.min_draws}: use 1 to --draws ({self.draws})")
        if self.max_draws is not None and not self.min_draws <= self.max_draws <= self.draws:
            raise MedlatentInputError(
                f"--max-draws {self.max_draws}: use --min-draws ({self.min_draws}) to --draws ({self.draws})"
            )


DRIFT_DISTANCES = ("fd", "kid")  # what --drift auto minimises: Frechet distance, unbiased kernel distance


@dataclass
class CounterfactualConfig:
    """`medlatent counterfactual`: held-out images (or a folder's) turned into a target class."""

    model: str | None = setting(
        None,
        "A model saved by `medlatent diffusion train`; its held-out images are edited (or those of --images).",
        required=True,
    )
    target_class: str | None = setting(None, "The class to turn the images into (name or index).", required=True)
    source_class: str | None = setting(
        None, "Edit only held-out images of this class (default: every class but the target)."
    )
    images: str | None = setting(
        None,
        "Edit the image files of this folder (PNG, JPEG, TIFF, DICOM; "
        "resized to the model's size) instead of the model's held-out images.",
    )
    strengths: list[float] = setting(
        factory=lambda: [0.5],
        help="How far to noise, in (0, 1]: 1 is pure noise, near 0 the input itself; repeat for a curve.",
        flag="strength",
        gt=0,
        le=1,
    )
    inversion: bool = setting(
        False,
        "Start from the latent's DDIM inversion (the unconditional probability-flow "
        "ODE up to the strength's noise level) instead of added noise.",
    )
    drifts: list[str] = setting(
        factory=lambda: ["0"],
        help=(
            "Latent Drift delta (normalised latent units), or auto to search --drift-grid; repeat "
            "for a curve (a model trained with --drift is noised as it was trained in any case)."
        ),
        flag="drift",
    )
    drift_grid: str = setting("-0.2:0.2:0.02", "LOW:HIGH:STEP of the --drift auto search (the paper's [-0.2, 0.2]).")
    drift_distance: str = setting(
        "fd",
        "What --drift auto minimises, in the judge's features: "
        "fd (Frechet distance) | kid (unbiased kernel distance).",
        choices=DRIFT_DISTANCES,
    )
    judge: str | None = setting(
        None, "An independent image-space classifier for validity and realism (not the guiding one)."
    )
    guidance_classifier: str | None = setting(None, "A noise-conditioned latent classifier for classifier guidance.")
    guidance_scale: float = setting(1.0, "Classifier guidance scale.", gt=0, le=100)
    cfg: float = setting(1.0, "Classifier-free guidance scale.", ge=0, le=50)
    steps: int = setting(32, "Sampler steps from the starting noise level down to 0.", ge=1)
    n: int = setting(64, "Held-out images to edit at most.", ge=1)
    examples: int = setting(12, "Images shown with their counterfactuals and difference maps in the report.", ge=0)
    run: RunConfig = run_settings("out device progress seeds", "runs/counterfactual")

    def __post_init__(self) -> None:
        self.drifts = [str(d) for d in self.drifts] or ["0"]
        check_fields(self)
        self.run.one_seed()
        if not self.strengths:
            raise MedlatentInputError("--strength: give at least one value in (0, 1]")
        try:
            [float(d) for d in self.drifts if d != "auto"]
        except ValueError:
            raise MedlatentInputError(
                f"--drift {','.join(self.drifts)}: use numbers (the model's normalised latent units) or auto"
            ) from None
        self.grid()  # validates
        if "auto" in self.drifts and self.judge is None:
            raise MedlatentInputError(
                "--drift auto: the search needs --judge, an image-space classifier, for its Frechet distance"
            )

    def grid(self) -> tuple[float, float, float]:
        """--drift-grid as (low, high, step)."""
        try:
            low, high, step = (float(v) for v in self.drift_grid.split(":"))
        except ValueError:
            raise MedlatentInputError(
                f"--drift-grid {self.drift_grid!r}: use LOW:HIGH:STEP, e.g. -0.2:0.2:0.02"
            ) from None
        return low, high, step
