"""The Python API, with the CLI's names: `gap`, `report`, `train_autoencoder`."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import yaml

from .audits.config import GapConfig
from .errors import MedlatentInputError


def load_config(path: str | Path | None, overrides: dict) -> GapConfig:
    """YAML file values, then explicitly given options on top."""
    values: dict = {}
    if path:
        path = Path(path)
        if not path.is_file():
            raise MedlatentInputError(f"--config {path}: file not found")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise MedlatentInputError(f"--config {path}: not valid YAML ({str(err).splitlines()[0]})") from err
        if not isinstance(values, dict):
            raise MedlatentInputError(f"--config {path}: expected a mapping of option names to values")
        known = {f.name for f in fields(GapConfig)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise MedlatentInputError(f"--config {path}: unknown keys {', '.join(unknown)}; valid keys: {', '.join(sorted(known))}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return GapConfig(**values)
    except TypeError as err:
        raise MedlatentInputError(f"configuration: {err}") from err


def gap(config: str | Path | None = None, **options) -> dict:
    """Measure the learnability gap; same options as `medlatent gap`. Returns the results dict."""
    from .audits.gap import run_gap

    return run_gap(load_config(config, options))


def report(run: str | Path) -> Path:
    """Rebuild report.html of a run folder from its results.json."""
    from .reports import read_results, write_report

    run = Path(run)
    results = read_results(run)
    folder = run if run.is_dir() else run.parent
    return write_report(folder / "report.html", results)


def autoencoder_train(out: str | Path, recipe: str = "kl-f4-synthetic", device: str = "auto", progress: bool = True, **overrides) -> Path:
    """Train a built-in autoencoder from a recipe (fields of `BuiltinRecipe` override it)."""
    from .autoencoders import RECIPES, BuiltinRecipe, train_autoencoder

    if recipe not in RECIPES:
        raise MedlatentInputError(f"--recipe {recipe!r}: use one of {', '.join(RECIPES)}")
    known = set(BuiltinRecipe.__dataclass_fields__)
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise MedlatentInputError(f"unknown recipe options {', '.join(unknown)}")
    from dataclasses import replace

    chosen = replace(RECIPES[recipe], **{k: v for k, v in overrides.items() if v is not None})
    return train_autoencoder(chosen, out, device=device, progress=progress)


def _space_inputs(dataset_spec: str, size: int, space: str, autoencoder: str | None, cache_dir: str | None, device: str, progress: bool, csv_options: dict):
    """The dataset, its official or seeded split, and the inputs of one space."""
    import numpy as np

    from .audits.gap import SpaceData, dataset_parts, encode_spaces, load_images
    from .autoencoders import load_autoencoder
    from .cache import LatentCache
    from .data import load_dataset
    from .device import resolve_device

    if space not in ("image", "reconstruction", "latent"):
        raise MedlatentInputError(f"--space {space!r}: use image, reconstruction or latent")
    if space != "image" and not autoencoder:
        raise MedlatentInputError(f"--space {space} needs --autoencoder")
    ae = load_autoencoder(autoencoder, device=device, progress=progress) if space != "image" else None
    dataset = load_dataset(dataset_spec, size, **{k: v for k, v in csv_options.items() if v is not None})
    if space == "image":
        data = SpaceData(load_images(dataset), np.arange(len(dataset)))
    else:
        _, spaces = encode_spaces(dataset, dataset_parts(dataset, None), ae, LatentCache(cache_dir, progress=progress), resolve_device(device))
        data = spaces[space]
    return dataset, data, ae


def classifier_train(
    out: str | Path, dataset: str = "synthetic", size: int = 64, space: str = "latent", autoencoder: str | None = None,
    noise_conditioned: bool = False, distill_from: str | Path | None = None, init: str = "random", freeze_backbone: bool = False,
    latent_std: float = 0.5, seed: int = 0, cache_dir: str | None = None, device: str = "auto", progress: bool = True,
    csv_options: dict | None = None, **train_options,
) -> dict:
    """Train one classifier on the official split (train/val) and save it with `save_pretrained`.

    init: "random", "imagenet" (timm weights, needs network) or a saved classifier folder.
    distill_from: a saved image-space classifier, used as a frozen teacher on the same images."""
    from dataclasses import fields, replace

    from .classifiers import DeepClassifier, SpaceScaler, TrainConfig
    from .data import make_splits
    from .evaluation.metrics import score

    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(train_options) - known)
    if unknown:
        raise MedlatentInputError(f"unknown training options {', '.join(unknown)}")
    data_set, data, _ = _space_inputs(dataset, size, space, autoencoder, cache_dir, device, progress, csv_options or {})
    split = make_splits(data_set, None, seed=seed)[0]
    config = replace(TrainConfig(seed=seed), **{k: v for k, v in train_options.items() if v is not None})
    config = replace(config, noise_conditioned=noise_conditioned, freeze_backbone=freeze_backbone, pretrained=init == "imagenet", sigma_data=latent_std)
    if noise_conditioned and space != "latent":
        raise MedlatentInputError("--noise-conditioned applies to --space latent")
    scaler = SpaceScaler(latent_std if space == "latent" else 1.0).fit(data.take(split.train))
    x_train, x_val, x_test = (scaler.transform(data.take(p)) for p in (split.train, split.val, split.test))
    teacher_logits = None
    if distill_from is not None:
        teacher = DeepClassifier.from_pretrained(distill_from, device=device)
        if teacher.space != "image" or teacher.input_scaler is None:
            raise MedlatentInputError(f"--distill-from {distill_from}: expected an image-space classifier saved by `medlatent classifier train --space image`")
        from .data.base import check_finite

        train_images = check_finite(data_set.load(split.train), data_set.name)  # the teacher's inputs, from the loaded dataset
        teacher_logits = teacher.logits(teacher.input_scaler.transform(train_images))
        if config.distill_alpha >= 1.0:
            config = replace(config, distill_alpha=0.5)
    start = None
    if init not in ("random", "imagenet"):
        start = DeepClassifier.from_pretrained(init, device=device).model_.state_dict()
    clf = DeepClassifier(config, latent_space=space == "latent", device=device, progress=progress, name=f"{space} classifier", space=space)
    clf.fit(x_train, data_set.labels[split.train], x_val, data_set.labels[split.val], data_set.task, teacher_logits=teacher_logits, init=start, num_outputs=data_set.num_outputs)
    clf.input_scaler = scaler
    clf.save_pretrained(out)
    test = score(data_set.task, data_set.labels[split.test], clf.predict_proba(x_test))
    return {"out": str(out), "space": space, "test": test, "epochs": clf.best_epoch_ + 1, "distilled": teacher_logits is not None}


def classifier_eval(
    model: str | Path, dataset: str = "synthetic", size: int = 64, autoencoder: str | None = None, sigmas: list[float] | None = None,
    cache_dir: str | None = None, device: str = "auto", progress: bool = True, csv_options: dict | None = None, seed: int = 0,
) -> dict:
    """Scores of a saved classifier on the test split; for noise-conditioned latent classifiers also
    at each noise level in `sigmas` (the same noise draw at every level)."""
    import torch

    from .classifiers import DeepClassifier
    from .data import make_splits
    from .evaluation.metrics import score

    clf = DeepClassifier.from_pretrained(model, device=device)
    space = clf.space  # a reconstruction-space model is evaluated on reconstructions
    data_set, data, _ = _space_inputs(dataset, size, space, autoencoder, cache_dir, device, progress, csv_options or {})
    split = make_splits(data_set, None, seed=seed)[0]
    x_test = data.take(split.test)
    x_test = clf.input_scaler.transform(x_test) if clf.input_scaler is not None else x_test
    result = {"model": str(model), "space": space, "test": score(data_set.task, data_set.labels[split.test], clf.predict_proba(x_test))}
    if sigmas:
        if not clf.config.noise_conditioned:
            raise MedlatentInputError(f"{model}: a sigma sweep needs a noise-conditioned classifier")
        noise = torch.randn(x_test.shape, generator=torch.Generator().manual_seed(seed))
        result["sigma_sweep"] = [{"sigma": s, **score(data_set.task, data_set.labels[split.test], clf.predict_proba(x_test + s * noise, sigma=s))} for s in sigmas]
    return result
