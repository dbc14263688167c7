"""`medlatent classifier train` and `classifier eval`: one classifier of one space on the official
split, trained by the audits' protocol (`classifiers.space.fit_space_classifier`) and
saved with its input scaler and autoencoder, and beside it what the run measured of it
(`TRAINING_RECORD`); or a saved one scored on the test split."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from ..classifiers import DeepClassifier
from ..classifiers.space import fit_space_classifier, predict_raw
from ..config import WHITENED, ClassifierEvalConfig, ClassifierTrainConfig, DataConfig
from ..data import load_dataset, make_splits
from ..data.base import check_finite
from ..errors import MedlatentInputError
from ..evaluation.metrics import score
from ..io import atomic_write_json
from ..rundir import check_json_out, check_out

# What `classifier train` measured of the model it saved, kept in its folder for the model card
# (`medlatent push`): the dataset, the split, the held-out scores with intervals, the training health.
TRAINING_RECORD = "training.json"


def space_inputs(
    data: DataConfig, space: str, autoencoder: str | None, device: str, progress: bool, trained=None, check=None
):
    """The dataset and the inputs of one space; `trained`: a saved classifier whose autoencoder
    must be this one, as (classifier, option naming it), checked before any encoding; `check`:
    called with the autoencoder before any data is read (e.g. that it has a decoder stage)."""
    from ..autoencoders import load_autoencoder
    from ..cache import LatentCache
    from ..data.spaces import SpaceData, dataset_parts, encode_spaces, load_images
    from ..device import resolve_device

    ae = load_autoencoder(autoencoder, device=device, progress=progress) if space != "image" else None
    if trained is not None:
        trained[0].require_autoencoder(ae, trained[1])
    if check is not None:
        check(ae)
    dataset = load_dataset(data.dataset, data.size, **data.csv_options())
    if space == "image":
        return dataset, SpaceData(load_images(dataset), np.arange(len(dataset))), ae
    cache = LatentCache(data.cache_dir, progress=progress)
    _, spaces = encode_spaces(dataset, dataset_parts(dataset, None), ae, cache, resolve_device(device))
    return dataset, spaces[space], ae


def _initial(config: ClassifierTrainConfig) -> DeepClassifier | None:
    """The saved classifier `--init` starts from (None: random or ImageNet weights), of the same space and backbone."""
    if config.init in ("random", "imagenet"):
        return None
    initial = DeepClassifier.from_pretrained(config.init, device=config.run.device, option="--init")
    if initial.space != config.space:
        raise MedlatentInputError(
            f"--init {config.init}: {'an' if initial.space[0] in 'aeiou' else 'a'} {initial.space}-space "
            f"classifier; --space {config.space} starts from a classifier of the same space"
        )
    if initial.config.backbone != config.train.backbone:
        raise MedlatentInputError(
            f"--init {config.init}: a {initial.config.backbone} classifier; pass "
            f"--backbone {initial.config.backbone} or start from a {config.train.backbone}"
        )
    return initial


def _teacher_logits(config: ClassifierTrainConfig, dataset, train: np.ndarray):
    """The frozen image-space teacher's logits on the training images (`--distill-from`), or None."""
    if config.distill_from is None:
        return None
    teacher = DeepClassifier.from_pretrained(config.distill_from, device=config.run.device, option="--distill-from")
    if teacher.space != "image" or teacher.input_scaler is None:
        raise MedlatentInputError(
            f"--distill-from {config.distill_from}: expected an image-space "
            "classifier saved by `medlatent classifier train --space image`"
        )
    images = check_finite(dataset.load(train), dataset.name)  # the teacher's inputs, from the loaded dataset
    return teacher.logits(teacher.input_scaler.transform(images))


def run_classifier_train(config: ClassifierTrainConfig) -> dict:
    """Train one classifier on the official split (train/val), save it into `config.run.out` with
    `save_pretrained` (its input scaler and autoencoder with it) and score it on the test split."""
    out = check_out(config.run.out, "classifier train", config.run.overwrite)
    train = replace(
        config.train,
        pretrained=config.train.pretrained or config.init == "imagenet",
        sigma_data=config.run.latent_std,
    )
    initial = _initial(config)
    dataset, inputs, ae = space_inputs(
        config.data,
        config.space,
        config.autoencoder,
        config.run.device,
        config.run.progress,
        (initial, f"--init {config.init}") if initial is not None else None,
        check=_check_variant(config),
    )
    data = config.data
    split = make_splits(dataset, None, seed=train.seed, val_fraction=data.val_fraction, train_limit=data.train_limit)[
        0
    ]
    teacher_logits = _teacher_logits(config, dataset, split.train)
    y = dataset.labels

    def fit(space_inputs, space: str = config.space, what: str = ""):
        return fit_space_classifier(
            space,
            (space_inputs.take(split.train), y[split.train]),
            (space_inputs.take(split.val), y[split.val]),
            dataset.task,
            train,
            latent_std=config.run.latent_std,
            num_outputs=dataset.num_outputs,
            device=config.run.device,
            progress=config.run.progress,
            name=f"{config.space} classifier{what} -> {Path(config.run.out).name}",
            teacher_logits=teacher_logits,
            init=initial.model_.state_dict() if initial is not None else None,
            distributed=True,
        )

    if config.latent_variant is None:
        clf = fit(inputs)
    else:  # the classifier reads the variant's features of the latents; its map is saved with it
        clf, inputs, variant, latent_map = _mapped_variant(config, split, inputs, ae, fit)
        clf.latent_variant, clf.latent_map = variant, latent_map
    clf.autoencoder = {"spec": ae.spec, "content_hash": ae.content_hash} if ae is not None else None
    folder = clf.save_pretrained(out)
    probs = predict_raw(clf, inputs.take(split.test))
    _write_training_record(folder, config, dataset, split, clf, probs, warm_start=initial is not None)
    return {
        "out": str(config.run.out),
        "space": config.space,
        "latent_variant": clf.latent_variant,
        "test": score(dataset.task, y[split.test], probs),
        "best_epoch": clf.best_epoch_,
        "distilled": teacher_logits is not None,
    }


def _check_variant(config: ClassifierTrainConfig):
    """What checks `--latent-variant` against the autoencoder before any data is read (None without one)."""
    if config.latent_variant is None:
        return None
    from ..classifiers.latent_maps import check_latent_variants

    return lambda ae: check_latent_variants([config.latent_variant], ae, "--latent-variant")


def _mapped_variant(config: ClassifierTrainConfig, split, latents, ae, fit) -> tuple:
    """`--latent-variant`: the classifier of a mapped latent variant (`classifiers.latent_maps`),
    the features it read, its record for estimator.json and its fitted map (the whitening; None for
    a decoder prefix, saved by reference to the autoencoder and stage). The whitening is fitted on
    the training latents; decoder-prefix:auto trains the reconstruction classifier and one
    classifier per decoder stage and keeps the one `choose_prefix_stage` picks on the validation
    split. Features are held in float32, so that scoring latents later reproduces these predictions."""
    import torch

    from ..classifiers.latent_maps import AUTO, ChannelWhitening, prefix_stage
    from ..data.spaces import SpaceData
    from ..data.stages import prefix_space, stored_latents
    from ..device import resolve_device

    stored, index_of = stored_latents(latents)
    variant = config.latent_variant
    record = {"name": variant.partition(":")[0], "variant": variant, "latent_channels": int(stored.shape[1])}
    if variant == WHITENED:
        whitening = ChannelWhitening(stored.shape[1]).fit(latents.take(split.train))
        with torch.no_grad():
            features = SpaceData(torch.cat([whitening(b.float()) for b in stored.split(4096)]), index_of)
        return fit(features), features, {**record, "method": "zca"}, whitening
    stage, device = prefix_stage(ae, variant, "--latent-variant"), resolve_device(config.run.device)
    stages = ae.decoder_stages() if stage == AUTO else [stage]
    fitted = {}
    for name in stages:
        features = prefix_space(ae, name, latents, device, torch.float32)
        fitted[name] = fit(features, "latent", f" ({name})" if stage == AUTO else ""), features
    flops = {name: ae.stage_flops(tuple(stored.shape[1:]), name) for name in stages}
    choice = None
    if stage == AUTO:
        choice = _auto_stage(config, ae, fit, {name: clf for name, (clf, _) in fitted.items()}, flops)
        stage = choice["stage"]
    clf, features = fitted[stage]
    prefix = {"stage": stage, "index": ae.stage_index(stage), "prefix_flops": flops[stage], "choice": choice}
    return clf, features, {**record, **prefix}, None


def _auto_stage(config: ClassifierTrainConfig, ae, fit, classifiers: dict, flops: dict) -> dict:
    """decoder-prefix:auto: the stage `choose_prefix_stage` picks from each stage classifier's
    validation AUROC against the reconstruction classifier's (trained here on the same split)."""
    from ..classifiers.latent_maps import choose_prefix_stage, validation_score

    def validation(clf) -> float:
        return validation_score(
            {"history_val_auroc": clf.history_arrays()["val_auroc"], "best_epoch": clf.best_epoch_}
        )

    _, reconstructions, _ = space_inputs(config.data, "reconstruction", config.autoencoder, config.run.device, False)
    reference = fit(reconstructions, "reconstruction", " (reconstruction reference)")
    candidates = [
        {"stage": name, "index": ae.stage_index(name), "prefix_flops": flops[name], "validation": validation(clf)}
        for name, clf in classifiers.items()
    ]
    return choose_prefix_stage(candidates, validation(reference), config.prefix_margin)


def _write_training_record(
    folder, config: ClassifierTrainConfig, dataset, split, clf, probs, warm_start: bool
) -> None:
    """`TRAINING_RECORD` in the saved model's folder: the data and split it learnt from, its test
    scores with 95% bootstrap intervals (stratified resamples of the test set) and its
    training-health flags (`evaluation.health`)."""
    from dataclasses import asdict

    from .. import __version__
    from ..evaluation.aggregate import RunScores, RunTests
    from ..evaluation.summaries import run_health

    seed, n_boot = config.train.seed, config.run.bootstrap
    tests = RunTests.build(["test"], [dataset.labels[split.test]], [0], dataset.task, n_boot, seed)
    history = clf.history_arrays() if getattr(clf, "history_", None) else {}
    fit = {"probs": probs, "best_epoch": clf.best_epoch_, "warm_start": warm_start, "stop_reason": clf.stop_reason_}
    health = run_health(dataset.task, ["test"], [{**fit, **{f"history_{k}": v for k, v in history.items()}}])[0]
    record = {
        "dataset": dataset.describe(),
        "data": asdict(config.data),
        "split": {"name": split.name, "seed": seed, **split.sizes()},
        "space": config.space,
        "init": config.init,
        "distill_from": config.distill_from,
        "latent_variant": clf.latent_variant,
        "latent_std": config.run.latent_std,
        "test": RunScores.of(dataset.task, tests, [probs]).summary("bootstrap"),
        "interval": {"method": "bootstrap", "resamples": n_boot, "level": 0.95},
        "health": {k: v for k, v in health.items() if k != "run"},
        "medlatent": __version__,
    }
    atomic_write_json(folder / TRAINING_RECORD, record)


def _mapped_latents(clf: DeepClassifier, latents, ae):
    """The features a mapped latent variant's classifier reads of `latents` (`latent_maps`), in
    batches on its device, on the host."""
    import torch

    from ..classifiers.latent_maps import latent_map_of, mapped_features
    from ..data.tensors import input_batches

    latent_map = latent_map_of(clf, ae).to(clf.device).eval()
    with torch.no_grad():
        return torch.cat([mapped_features(latent_map, b.to(clf.device)).cpu() for b in input_batches(latents, 256)])


def run_classifier_eval(config: ClassifierEvalConfig) -> dict:
    """Scores of a saved classifier on the test split; for a noise-conditioned latent classifier
    also at each noise level of `sigmas` (the same noise draw at every level); also written to
    `json_out` when given."""
    import torch

    check_json_out(config.run.json_out)
    clf = DeepClassifier.from_pretrained(config.model, device=config.run.device, option="MODEL")
    if config.sigmas and not clf.config.noise_conditioned:
        raise MedlatentInputError(f"{config.model}: a sigma sweep needs a noise-conditioned classifier")
    space = clf.space  # a reconstruction-space model is evaluated on reconstructions
    if space != "image" and not config.autoencoder:
        raise MedlatentInputError(f"--autoencoder: required for {config.model}, a {space}-space classifier")
    data, seed = config.data, config.run.seed
    dataset, inputs, ae = space_inputs(
        data,
        space,
        config.autoencoder,
        config.run.device,
        config.run.progress,
        (clf, f"--autoencoder {config.autoencoder}"),
    )
    split = make_splits(dataset, None, seed=seed, val_fraction=data.val_fraction, train_limit=data.train_limit)[0]
    x_test, y_test = inputs.take(split.test), dataset.labels[split.test]
    if clf.latent_variant:  # a mapped latent variant reads its features of the latents
        x_test = _mapped_latents(clf, x_test, ae)
    x_test = clf.input_scaler.transform(x_test) if clf.input_scaler is not None else x_test
    result = {
        "model": str(config.model),
        "space": space,
        "test": score(dataset.task, y_test, clf.predict_proba(x_test)),
    }
    if config.sigmas:
        noise = torch.randn(x_test.shape, generator=torch.Generator().manual_seed(seed))
        result["sigma_sweep"] = [
            {"sigma": s, **score(dataset.task, y_test, clf.predict_proba(x_test + s * noise, sigma=s))}
            for s in config.sigmas
        ]
    if config.run.json_out is not None:
        atomic_write_json(config.run.json_out, result)
    return result
