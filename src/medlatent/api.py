"""The Python API: one function per command, with the command's name (`gap`, `audit`, `augment`,
`classifier_train`, `diffusion_train`, `diffusion_classify`, `counterfactual`, `score`, ...) and
its settings as keywords, by field or option name, the same as the command's options. Each takes
a YAML file of them (`config`, as `--config`), builds the command's config and calls its
`run_x(config)`."""

from __future__ import annotations

from pathlib import Path

from .audits.config import GapConfig
from .config import check_installed, from_flat, load_yaml, settings_tree
from .errors import MedlatentInputError


def load_config(path: str | Path | None, overrides: dict, cls: type = GapConfig):
    """A `GapConfig` (or `cls`, e.g. `AugmentConfig`) from YAML file values (keys are the option
    names; underscores accepted), then explicitly given options (those not None) on top."""
    values: dict = {}
    if path:
        values = load_yaml(path)
        settings_tree(cls, values, where=f"--config {path}")  # each key checked here, named by the file
    values.update({k: v for k, v in overrides.items() if v is not None})
    config = from_flat(cls, values)
    check_installed(config)
    return config


def gap(config: str | Path | None = None, **options) -> dict:
    """Measure the learnability gap; same settings as `medlatent gap` (by field or option name,
    e.g. `epochs=4, seed=[0, 1], autoencoder="hf:..."`). Returns the results dict."""
    from .audits.gap import run_gap

    return run_gap(load_config(config, options))


def audit(config: str | Path | None = None, **options) -> dict:
    """The encoder audit; same settings as `medlatent audit` (e.g. `autoencoder=["taesd:enc.pth"],
    section=["perturbation", "probes"]`). Writes results.json and one report per autoencoder."""
    from .audits.config import EncoderAuditConfig
    from .audits.encoder import run_encoder_audit

    return run_encoder_audit(load_config(config, options, EncoderAuditConfig))


def augment(config: str | Path | None = None, **options) -> dict:
    """Generative augmentation with a latent diffusion model: classifiers trained on real, real +
    synthetic and synthetic images, tested on the model's held-out real images; same settings as
    `medlatent augment` (e.g. `model="models/ldm", synthetic="balance", seed=[0, 1, 2]`)."""
    from .audits.augment import run_augment
    from .audits.config import AugmentConfig

    return run_augment(load_config(config, options, AugmentConfig))


def report(run: str | Path) -> Path:
    """Rebuild report.html of a run folder from its results.json."""
    from jinja2 import UndefinedError

    from .reports.html import read_results, rebuild_report

    run = Path(run)
    results = read_results(run)
    try:
        folder = run if run.is_dir() else run.parent
        return folder / rebuild_report(results, folder)[0]
    except (
        KeyError,
        TypeError,
        ValueError,
        IndexError,
        UndefinedError,
    ) as err:  # a results file edited by hand or cut short
        raise MedlatentInputError(
            f"{run}: its results.json lacks what its report shows "
            f"({type(err).__name__}: {err}); rerun the command that wrote it"
        ) from err


def autoencoder_train(out: str | Path | None = None, recipe: str | None = None, *, config=None, **options) -> Path:
    """Train a built-in autoencoder from a named recipe into `out`; same settings as `medlatent
    autoencoder train` (any `BuiltinRecipe` or `LoopConfig` setting overrides the recipe's, e.g.
    `steps=500, latent_channels=8`). Returns the folder."""
    from .autoencoders.builtin import run_autoencoder_train
    from .config import AutoencoderTrainConfig

    return run_autoencoder_train(
        load_config(config, {**options, "out": out, "recipe": recipe}, AutoencoderTrainConfig)
    )


def classifier_train(out: str | Path | None = None, *, config=None, **options) -> dict:
    """Train one classifier on the official split (train/val) and save it into `out` with
    `save_pretrained`; same settings as `medlatent classifier train` (`space`, `autoencoder`,
    `init`, `distill_from`, `latent_variant`, any data or training setting: `dataset`, `size`,
    `backbone`, `epochs`, `noise_conditioned`, `ema_decay`, ...). Returns the test scores."""
    from .audits.classifier import run_classifier_train
    from .config import ClassifierTrainConfig

    return run_classifier_train(load_config(config, {**options, "out": out}, ClassifierTrainConfig))


def classifier_eval(model: str | Path | None = None, *, config=None, **options) -> dict:
    """Scores of a saved classifier on the test split (data settings as for `classifier_train`);
    for noise-conditioned latent classifiers also at each noise level of `sigma` (the same noise
    draw at every level); same settings as `medlatent classifier eval`."""
    from .audits.classifier import run_classifier_eval
    from .config import ClassifierEvalConfig

    return run_classifier_eval(load_config(config, {**options, "model": model}, ClassifierEvalConfig))


def diffusion_train(out: str | Path | None = None, autoencoder: str | None = None, *, config=None, **options) -> Path:
    """Train a class-conditional latent denoiser into `out`; same settings as `medlatent diffusion
    train` (any data or diffusion setting: `dataset`, `size`, `steps`, `preset`, `ema_decay`, ...).
    Returns the folder."""
    from .config import DiffusionTrainConfig
    from .pipelines.latent_diffusion import run_diffusion_train

    given = {**options, "out": out, "autoencoder": autoencoder}
    return run_diffusion_train(load_config(config, given, DiffusionTrainConfig))


def diffusion_sample(config: str | Path | None = None, **options) -> Path:
    """Samples of one class into `out` (latents, PNGs, grid); same settings as `medlatent diffusion
    sample` by field or option name (e.g. `model="models/ldm", class_name="nodule", n=16,
    out="samples"`), optionally guided by a noise-conditioned latent classifier of the same latent
    space, and with Latent Drift's delta `drift` added to every reverse step's mean."""
    from .audits.sampling import run_sample
    from .config import SampleConfig

    return run_sample(load_config(config, options, SampleConfig))


def diffusion_evaluate(config: str | Path | None = None, **options) -> dict:
    """Class consistency, Frechet distance and k-NN precision/recall of `n` samples per class,
    against the test images the model held out, in the feature space of an independent
    image-space classifier; with `baseline`, the same for an untrained denoiser of the same
    architecture; and the memorisation check. Same settings as `medlatent diffusion evaluate`."""
    from .audits.sampling import run_evaluate
    from .config import EvaluateConfig

    return run_evaluate(load_config(config, options, EvaluateConfig))


def score(config: str | Path | None = None, **options) -> dict:
    """Probabilities of a saved latent classifier for latent files (.safetensors/.npz/.pt, one or
    a folder) or, with `autoencoder` and `size`, image files encoded on the fly; written to `out`
    (.csv: file, index, p_0..p_K-1; .npz: files, indices, probs) atomically. Same settings as
    `medlatent score` (e.g. `classifier="clf", latents="latents/", out="p.csv"`)."""
    from .classifiers.scorer import run_score
    from .config import ScoreConfig

    return run_score(load_config(config, options, ScoreConfig))


def diffusion_classify(config: str | Path | None = None, **options) -> dict:
    """The latent diffusion model as a classifier on its held-out images: lowest mean error, full
    majority vote and early-stopped vote from the same draws, with AUROC, balanced accuracy and
    MCC and their bootstrap intervals; results.json into `out`. Same settings as `medlatent
    diffusion classify` (e.g. `model="models/ldm", draws=51`)."""
    from .audits.config import DiffusionClassifyConfig
    from .audits.diffusion_classifier import run_diffusion_classifier

    return run_diffusion_classifier(load_config(config, options, DiffusionClassifyConfig))


def counterfactual(config: str | Path | None = None, log=None, **options) -> dict:
    """Counterfactual images of the model's held-out images (or of a folder's) as a target class;
    same settings as `medlatent counterfactual` (e.g. `model="models/ldm", target_class="normal",
    strength=[0.3, 0.5], drift=["auto"], judge="judge"`)."""
    from .audits.config import CounterfactualConfig
    from .audits.counterfactual import run_counterfactual

    return run_counterfactual(load_config(config, options, CounterfactualConfig), log=log)


def compare(config: str | Path | None = None, **options) -> dict:
    """Runs of one command side by side: comparison.html and comparison.csv into `out`; same
    settings as `medlatent compare` (e.g. `runs=["runs/gap-a", "runs/gap-b"], out="runs/compare",
    metric="auroc"`). Returns what was written (folder, command, metric, run labels, rows)."""
    from .config import CompareConfig
    from .results import run_compare

    return run_compare(load_config(config, options, CompareConfig))


def push(model: str | Path | None = None, repo_id: str | None = None, *, config=None, **options) -> dict:
    """Upload a saved classifier or latent diffusion model folder (`model`) to the Hugging Face Hub
    repository `repo_id` with a generated model card; same settings as `medlatent push` (`private`,
    `revision`, `commit_message`, `token`: default the stored login). Returns the repository, its
    URL, the branch and the files uploaded."""
    from .config import PushConfig
    from .hub import run_push

    return run_push(load_config(config, {**options, "model": model, "repo_id": repo_id}, PushConfig))
