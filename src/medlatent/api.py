"""The Python API: one function per command, with the command's name (`gap`, `audit`, `augment`,
`diffusion_sample`, `diffusion_classify`, `counterfactual`, `score`, ...) and its settings as
keywords, by field or option name. The audits and the sampling, scoring and counterfactual
commands also take a YAML file of them first (as `--config`)."""

from __future__ import annotations

from pathlib import Path

from .audits.config import SET_BY_AUDIT, GapConfig
from .config import DataConfig, TrainConfig, from_flat, load_yaml, split_given
from .errors import MedlatentInputError
from .rundir import check_out


def load_config(
    path: str | Path | None, overrides: dict, cls: type = GapConfig, exclude: tuple[str, ...] = SET_BY_AUDIT
):
    """A `GapConfig` (or `cls`, e.g. `AugmentConfig`) from YAML file values (keys are the option
    names; underscores accepted), then explicitly given options (those not None) on top."""
    values: dict = {}
    if path:
        values = load_yaml(path)
        from_flat(cls, values, where=f"--config {path}", exclude=exclude)  # each key checked here, named by the file
    values.update({k: v for k, v in overrides.items() if v is not None})
    return from_flat(cls, values, exclude=exclude)


def gap(config: str | Path | None = None, **options) -> dict:
    """Measure the learnability gap; same settings as `medlatent gap` (by field or option name,
    e.g. `epochs=4, seed=[0, 1], autoencoder="hf:..."`). Returns the results dict."""
    from .audits.gap import run_gap

    return run_gap(load_config(config, options))


def audit(config: str | Path | None = None, **options) -> dict:
    """The encoder audit; same settings as `medlatent audit` (e.g. `autoencoder=["taesd:enc.pth"],
    section=["perturbation", "probes"]`). Writes results.json and one report per autoencoder."""
    from .audits.config import SET_BY_ENCODER_AUDIT, EncoderAuditConfig
    from .audits.encoder import run_encoder_audit

    return run_encoder_audit(load_config(config, options, EncoderAuditConfig, SET_BY_ENCODER_AUDIT))


def augment(config: str | Path | None = None, **options) -> dict:
    """Generative augmentation with a latent diffusion model: classifiers trained on real, real +
    synthetic and synthetic images, tested on the model's held-out real images; same settings as
    `medlatent augment` (e.g. `model="models/ldm", synthetic="balance", seed=[0, 1, 2]`)."""
    from .audits.augment import run_augment
    from .audits.config import SET_BY_AUGMENT, AugmentConfig

    return run_augment(load_config(config, options, AugmentConfig, SET_BY_AUGMENT))


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


def autoencoder_train(
    out: str | Path,
    recipe: str = "kl-f4-synthetic",
    device: str = "auto",
    progress: bool = True,
    overwrite: bool = False,
    **settings,
) -> Path:
    """Train a built-in autoencoder from a named recipe; any `BuiltinRecipe` or `LoopConfig`
    setting (by field or option name) overrides it. overwrite: replace a previous run in `out`."""
    from .autoencoders import RECIPES, train_autoencoder
    from .config import BuiltinRecipe, LoopConfig

    check_out(out, "autoencoder train", overwrite)
    if recipe not in RECIPES:
        raise MedlatentInputError(f"--recipe {recipe!r}: use one of {', '.join(RECIPES)}")
    loop_settings, recipe_settings = split_given(settings, LoopConfig)
    chosen = from_flat(BuiltinRecipe, recipe_settings, base=RECIPES[recipe])
    loop = from_flat(LoopConfig, loop_settings)
    return train_autoencoder(chosen, out, device=device, progress=progress, loop=loop)


def _space_inputs(
    data: DataConfig, space: str, autoencoder: str | None, device: str, progress: bool, trained=None, where: str = ""
):
    """The dataset and the inputs of one space; `trained`: a saved classifier whose autoencoder
    must be this one (checked before any encoding; `where` names the option in the error)."""
    import numpy as np

    from .autoencoders import load_autoencoder
    from .cache import LatentCache
    from .data import load_dataset
    from .data.spaces import SpaceData, dataset_parts, encode_spaces, load_images
    from .device import resolve_device

    if space not in ("image", "reconstruction", "latent"):
        raise MedlatentInputError(f"--space {space!r}: use image, reconstruction or latent")
    if space != "image" and not autoencoder:
        raise MedlatentInputError(f"--space {space} needs --autoencoder")
    ae = load_autoencoder(autoencoder, device=device, progress=progress) if space != "image" else None
    if trained is not None:
        trained.require_autoencoder(ae, where)
    dataset = load_dataset(data.dataset, data.size, **data.csv_options())
    if space == "image":
        inputs = SpaceData(load_images(dataset), np.arange(len(dataset)))
    else:
        _, spaces = encode_spaces(
            dataset,
            dataset_parts(dataset, None),
            ae,
            LatentCache(data.cache_dir, progress=progress),
            resolve_device(device),
        )
        inputs = spaces[space]
    return dataset, inputs, ae


def classifier_train(
    out: str | Path,
    space: str = "latent",
    autoencoder: str | None = None,
    distill_from: str | Path | None = None,
    init: str = "random",
    latent_std: float = 0.5,
    device: str = "auto",
    progress: bool = True,
    overwrite: bool = False,
    **settings,
) -> dict:
    """Train one classifier on the official split (train/val) and save it with `save_pretrained`.

    settings: any `DataConfig` or `TrainConfig` setting by field or option name (`dataset`,
    `size`, `backbone`, `epochs`, `noise-conditioned`, `ema-decay`, ...), the same as the CLI's.
    init: "random", "imagenet" (timm weights, needs network) or a saved classifier folder.
    distill_from: a saved image-space classifier, used as a frozen teacher on the same images.
    overwrite: replace a previous `classifier train` run in `out`."""
    from dataclasses import replace

    from .classifiers import DeepClassifier, SpaceScaler
    from .data import make_splits
    from .evaluation.metrics import score

    check_out(out, "classifier train", overwrite)
    data_settings, train_settings = split_given(settings, DataConfig)
    data = from_flat(DataConfig, data_settings)
    config = from_flat(TrainConfig, train_settings, exclude=("sigma_data",))
    config = replace(config, pretrained=config.pretrained or init == "imagenet", sigma_data=latent_std)
    if config.noise_conditioned and space != "latent":
        raise MedlatentInputError("--noise-conditioned applies to --space latent")
    start = initial = None
    if init not in ("random", "imagenet"):
        initial = DeepClassifier.from_pretrained(init, device=device)
        if initial.space != space:
            raise MedlatentInputError(
                f"--init {init}: {'an' if initial.space[0] in 'aeiou' else 'a'} {initial.space}-space "
                f"classifier; --space {space} starts from a classifier of the same space"
            )
        if initial.config.backbone != config.backbone:
            raise MedlatentInputError(
                f"--init {init}: a {initial.config.backbone} classifier; pass "
                f"--backbone {initial.config.backbone} or start from a {config.backbone}"
            )
        start = initial.model_.state_dict()
    data_set, inputs, ae = _space_inputs(data, space, autoencoder, device, progress, initial, f"--init {init}")
    split = make_splits(
        data_set, None, seed=config.seed, val_fraction=data.val_fraction, train_limit=data.train_limit
    )[0]
    scaler = SpaceScaler(latent_std if space == "latent" else 1.0).fit(inputs.take(split.train))
    x_train, x_val, x_test = (scaler.transform(inputs.take(p)) for p in (split.train, split.val, split.test))
    teacher_logits = None
    if distill_from is not None:
        teacher = DeepClassifier.from_pretrained(distill_from, device=device)
        if teacher.space != "image" or teacher.input_scaler is None:
            raise MedlatentInputError(
                f"--distill-from {distill_from}: expected an image-space "
                "classifier saved by `medlatent classifier train --space image`"
            )
        from .data.base import check_finite

        train_images = check_finite(
            data_set.load(split.train), data_set.name
        )  # the teacher's inputs, from the loaded dataset
        teacher_logits = teacher.logits(teacher.input_scaler.transform(train_images))
    clf = DeepClassifier(
        config,
        latent_space=space == "latent",
        device=device,
        progress=progress,
        name=f"{space} classifier",
        space=space,
    )
    clf.fit(
        x_train,
        data_set.labels[split.train],
        x_val,
        data_set.labels[split.val],
        data_set.task,
        teacher_logits=teacher_logits,
        init=start,
        num_outputs=data_set.num_outputs,
    )
    clf.input_scaler = scaler
    clf.autoencoder = {"spec": ae.spec, "content_hash": ae.content_hash} if ae is not None else None
    clf.save_pretrained(out)
    test = score(data_set.task, data_set.labels[split.test], clf.predict_proba(x_test))
    return {
        "out": str(out),
        "space": space,
        "test": test,
        "best_epoch": clf.best_epoch_,
        "distilled": teacher_logits is not None,
    }


def classifier_eval(
    model: str | Path,
    autoencoder: str | None = None,
    sigmas: list[float] | None = None,
    device: str = "auto",
    progress: bool = True,
    seed: int = 0,
    **data_settings,
) -> dict:
    """Scores of a saved classifier on the test split (data settings as for `classifier_train`);
    for noise-conditioned latent classifiers also at each noise level in `sigmas` (the same noise
    draw at every level)."""
    import torch

    from .classifiers import DeepClassifier
    from .data import make_splits
    from .evaluation.metrics import score

    data = from_flat(DataConfig, {k: v for k, v in data_settings.items() if v is not None})
    clf = DeepClassifier.from_pretrained(model, device=device)
    space = clf.space  # a reconstruction-space model is evaluated on reconstructions
    data_set, inputs, _ = _space_inputs(
        data, space, autoencoder, device, progress, clf, f"--autoencoder {autoencoder}"
    )
    split = make_splits(data_set, None, seed=seed, val_fraction=data.val_fraction, train_limit=data.train_limit)[0]
    x_test = inputs.take(split.test)
    x_test = clf.input_scaler.transform(x_test) if clf.input_scaler is not None else x_test
    result = {
        "model": str(model),
        "space": space,
        "test": score(data_set.task, data_set.labels[split.test], clf.predict_proba(x_test)),
    }
    if sigmas:
        if not clf.config.noise_conditioned:
            raise MedlatentInputError(f"{model}: a sigma sweep needs a noise-conditioned classifier")
        noise = torch.randn(x_test.shape, generator=torch.Generator().manual_seed(seed))
        result["sigma_sweep"] = [
            {
                "sigma": s,
                **score(data_set.task, data_set.labels[split.test], clf.predict_proba(x_test + s * noise, sigma=s)),
            }
            for s in sigmas
        ]
    return result


def diffusion_train(
    out: str | Path, autoencoder: str, device: str = "auto", progress: bool = True, overwrite: bool = False, **settings
) -> Path:
    """Train a class-conditional latent denoiser; settings: any `DataConfig` or `DiffusionConfig`
    setting by field or option name (`dataset`, `size`, `steps`, `preset`, `ema-decay`, ...).
    overwrite: replace a previous `diffusion train` run in `out`."""
    from .config import DiffusionConfig
    from .pipelines.latent_diffusion import train_latent_diffusion

    check_out(out, "diffusion train", overwrite)
    data_settings, diffusion_settings = split_given(settings, DataConfig)
    data = from_flat(DataConfig, data_settings)
    config = from_flat(DiffusionConfig, diffusion_settings)
    return train_latent_diffusion(out, data, autoencoder, config, device=device, progress=progress)


def diffusion_sample(config: str | Path | None = None, **options) -> Path:
    """Samples of one class into `out` (latents, PNGs, grid); same settings as `medlatent diffusion
    sample` by field or option name (e.g. `model="models/ldm", class_name="nodule", n=16,
    out="samples"`), optionally guided by a noise-conditioned latent classifier of the same latent
    space, and with Latent Drift's delta `drift` added to every reverse step's mean."""
    from .audits.sampling import run_sample
    from .config import SampleConfig

    return run_sample(load_config(config, options, SampleConfig, ()))


def diffusion_evaluate(config: str | Path | None = None, **options) -> dict:
    """Class consistency, Frechet distance and k-NN precision/recall of `n` samples per class,
    against the test images the model held out, in the feature space of an independent
    image-space classifier; with `baseline`, the same for an untrained denoiser of the same
    architecture; and the memorisation check. Same settings as `medlatent diffusion evaluate`."""
    from .audits.sampling import run_evaluate
    from .config import EvaluateConfig

    return run_evaluate(load_config(config, options, EvaluateConfig, ()))


def score(config: str | Path | None = None, **options) -> dict:
    """Probabilities of a saved latent classifier for latent files (.safetensors/.npz/.pt, one or
    a folder) or, with `autoencoder` and `size`, image files encoded on the fly; written to `out`
    (.csv: file, index, p_0..p_K-1; .npz: files, indices, probs) atomically. Same settings as
    `medlatent score` (e.g. `classifier="clf", latents="latents/", out="p.csv"`)."""
    from .classifiers.scorer import run_score
    from .config import ScoreConfig

    return run_score(load_config(config, options, ScoreConfig, ()))


def diffusion_classify(config: str | Path | None = None, **options) -> dict:
    """The latent diffusion model as a classifier on its held-out images: lowest mean error, full
    majority vote and early-stopped vote from the same draws, with AUROC, balanced accuracy and
    MCC and their bootstrap intervals; results.json into `out`. Same settings as `medlatent
    diffusion classify` (e.g. `model="models/ldm", draws=51`)."""
    from .audits.config import DiffusionClassifyConfig
    from .audits.diffusion_classifier import run_diffusion_classifier

    return run_diffusion_classifier(load_config(config, options, DiffusionClassifyConfig, ()))


def counterfactual(config: str | Path | None = None, log=None, **options) -> dict:
    """Counterfactual images of the model's held-out images (or of a folder's) as a target class;
    same settings as `medlatent counterfactual` (e.g. `model="models/ldm", target_class="normal",
    strength=[0.3, 0.5], drift=["auto"], judge="judge"`)."""
    from .audits.config import CounterfactualConfig
    from .audits.counterfactual import run_counterfactual

    return run_counterfactual(load_config(config, options, CounterfactualConfig, ()), log=log)
