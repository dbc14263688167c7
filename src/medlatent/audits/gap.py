"""The learnability-gap audit.

For each autoencoder, classifiers are trained with one protocol in three spaces of the same
split: the images, their reconstructions decode(encode(x)), and the latents encode(x).

    fidelity gap     = score(image) - score(reconstruction)   # what the autoencoder loses
    learnability gap = score(reconstruction) - score(latent)  # what is kept but hard to learn

An encoder-only latent space (no decoder: `timm:NAME`, `encoder:SPEC`) has image and latent
spaces only; its learnability gap is score(image) - score(latent), what the encoder loses and what
is hard to learn together, and it has no fidelity gap.

Every (fold, seed) is one run with its own models. The headline of a space or a gap is the mean of
the per-run scores, with a paired bootstrap interval (resamples of each run's test set, the same
for every space) or, from 5 runs on, a t interval across runs (`evaluation.aggregate`). Across
runs, paired tests of the same difference (before - after) accompany each gap. Every classifier's
training health is checked; a gap resting on a flagged classifier is marked unreliable.
Finished classifiers are stored under the run folder, so a rerun after a crash resumes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .. import distributed
from ..autoencoders import load_autoencoder
from ..cache import LatentCache
from ..classifiers.latent_maps import INFERENCE_BATCH, check_latent_variants, inference_samples_per_second
from ..classifiers.space import fit_space_classifier, predict_raw
from ..data import ImageDataset, Split, load_dataset, make_splits
from ..data.spaces import (
    SpaceData,
    StreamedImages,
    dataset_parts,
    encode_spaces,
    gaps_of,
    load_images,
    should_stream,
    spaces_of,
)
from ..data.stages import StageFeatures, audited_stages, decoder_stage_spaces
from ..data.tensors import materialise
from ..device import fix_threads, resolve_device, seed_everything
from ..diffusion.noise import sigma_grid
from ..errors import MedlatentInputError, MedlatentRuntimeError
from ..evaluation.aggregate import RunScores, RunTests, gap_summary, resolve_method, share_closed
from ..evaluation.health import ADVICE
from ..evaluation.metrics import METRICS
from ..evaluation.reconstruction import reconstruction_quality
from ..evaluation.summaries import classifier_summary, pooled_out_of_fold, run_health, sigma_sweep
from ..io import atomic_write, savez
from ..reports import provenance
from ..rundir import check_out, finish_run, mark, stored_or_computed
from .config import NOISE_VARIANTS, GapConfig
from .latent_variants import (
    accuracy_throughput,
    fit_mapped_variant,
    input_map,
    is_mapped,
    mapped_variant_summary,
    variant_fits,
)
from .shortcuts import reliance_over_runs

# Bumped when the diffusion classifier rows are scored differently (2: 5-fold cross-fitted temperature;
# 3: the early stop's budget, vote ties broken by the paired evidence).
DIFFUSION_ROW_VERSION = 3


def run_gap(config: GapConfig, log=None) -> dict | None:
    """Run the audit, write results.json and report.html into `config.run.out`, return the results
    (None in the other processes of a multi-process launch: the main process writes).

    log: called with one line saying what will run, before the work starts (the CLI prints it)."""
    started = time.perf_counter()
    out = check_out(config.run.out, "gap", resumable=True)
    fix_threads(config.train.loop.threads)
    device = resolve_device(config.run.device)
    autoencoders, dataset, splits, diffusion_models = _inputs(config)
    models = ["deep", "linear"] if config.linear_probe else ["deep"]
    spaces = [
        (2 if ae.has_decoder else 1) + len(audited_stages(config.decoder_stages, ae)[1:-1]) for ae in autoencoders
    ]
    variants = [
        variant_fits(config.latent_variants, ae, audited_stages(config.decoder_stages, ae)) for ae in autoencoders
    ]
    per_run = len(models) * (1 + sum(spaces)) + sum(variants)
    total = per_run * len(splits) * len(config.run.seeds)
    if log and distributed.is_main():
        log(_plan(config, dataset, splits, autoencoders, diffusion_models, total))
    timings: dict[str, float] = {}
    everything = np.arange(len(dataset))
    stream = should_stream(config.data.stream, dataset, autoencoders)
    images = (
        SpaceData(None, everything, stream=StreamedImages(dataset))
        if stream
        else SpaceData(load_images(dataset), everything)
    )
    parts_dir = out / "parts" / config.protocol_hash()
    mark(out, "gap")  # before its first part: a resume finds the folder marked
    results_by_ae = [
        _encoded(config, dataset, splits, ae, name, images, stream, device, timings)
        for ae, name in zip(autoencoders, display_names(config.autoencoders), strict=True)
    ]
    counter = tqdm(
        total=total, desc="classifiers", unit="fit", disable=not (config.run.progress and distributed.is_main())
    )
    fit = functools.partial(
        _fit_space, parts_dir, config=config, dataset=dataset, device=device, timings=timings, counter=counter
    )
    predictions = _train_runs(fit, config, splits, results_by_ae, images, models, parts_dir)
    counter.close()
    if predictions is None:
        return None
    diffusion = _diffusion_rows(diffusion_models, config, dataset, splits, results_by_ae, parts_dir, timings)
    results = _summarise(config, dataset, splits, results_by_ae, predictions, models, diffusion)
    if "deep" in models:  # timings, kept apart from the rows (which a rerun reproduces exactly)
        results["training_throughput"] = _training_throughput(
            config, dataset, splits, results_by_ae, predictions, device
        )
    results["timings_seconds"] = {**timings, "total": time.perf_counter() - started}
    _record_run(results, config, predictions, diffusion_models, stream, device)
    results["predictions_file"] = _write_predictions(
        out / "predictions.npz", config, splits, results_by_ae, predictions, models, diffusion
    )
    results["samples"] = _write_samples(out, dataset, splits, results_by_ae)
    finish_run(out, "gap", results, config)
    return results


def _inputs(config: GapConfig) -> tuple[list, ImageDataset, list[Split], list]:
    """The autoencoders, the dataset, its splits and the diffusion models to score, checked before any work."""
    # Cheap checks first: a bad autoencoder spec fails before any data is read.
    autoencoders = [
        load_autoencoder(spec, device=config.run.device, progress=config.run.progress) for spec in config.autoencoders
    ]
    for ae in autoencoders:  # a stage it does not have fails before any data is read
        audited_stages(config.decoder_stages, ae)
        check_latent_variants(config.latent_variants, ae, "--latent-variants")
    dataset = load_dataset(
        config.data.dataset, config.data.size, confounder_column=config.confounder_column, **config.data.csv_options()
    )
    splits = make_splits(
        dataset,
        config.data.folds,
        seed=config.run.seeds[0],
        val_fraction=config.data.val_fraction,
        train_limit=config.data.train_limit,
    )
    if config.train.loss == "ldam" and dataset.task == "multilabel":
        raise MedlatentInputError("--loss ldam is defined for single-label tasks; use ce or cb")
    if config.confounder_column is not None and dataset.task == "multilabel":
        raise MedlatentInputError(
            f"--confounder-column {config.confounder_column}: the shortcuts table is defined for single-label tasks"
        )
    diffusion_models = [
        _diffusion_model(path, config, dataset, splits, autoencoders) for path in config.diffusion_models
    ]
    return autoencoders, dataset, splits, diffusion_models


def _plan(config: GapConfig, dataset: ImageDataset, splits: list[Split], autoencoders, diffusion_models, total) -> str:
    """The line that says what the audit will run."""
    names = display_names(config.autoencoders)
    return (
        f"gap: {len(dataset)} images of {dataset.name} ({dataset.num_outputs} "
        f"{'labels' if dataset.task == 'multilabel' else 'classes'}: "
        f"{', '.join(map(str, dataset.class_names))}), {len(splits)} split(s) x {len(config.run.seeds)} "
        f"seed(s), {len(autoencoders)} autoencoder(s) ({', '.join(names)}), {total} classifier trainings"
        + (
            f", {len(diffusion_models)} diffusion classifier(s) x {config.diffusion_draws} draws"
            if diffusion_models
            else ""
        )
    )


def _encoded(config, dataset, splits, ae, name: str, images: SpaceData, stream: bool, device, timings) -> dict:
    """One autoencoder's spaces of the dataset (from the latent cache), and its reconstruction quality."""
    t0 = time.perf_counter()
    cache = LatentCache(config.data.cache_dir, progress=config.run.progress)
    entries, spaces = encode_spaces(dataset, dataset_parts(dataset, config.data.folds), ae, cache, device, stream)
    spaces["image"] = images
    timings[f"encode {ae.spec}"] = time.perf_counter() - t0
    stages = _decoder_stages(config, dataset, ae, spaces, device, timings)
    test_all = np.concatenate([s.test for s in splits])
    quality = (
        reconstruction_quality(
            materialise(images.take(test_all)), materialise(spaces["reconstruction"].take(test_all))
        )
        if ae.has_decoder
        else None
    )
    return {
        "autoencoder": {**ae.describe(), "name": name},
        "spaces": spaces,
        "quality": quality,
        "cache": {n: str(e.folder) for n, e in entries.items()},
        "cache_reused": all(e.reused for e in entries.values()),
        "latent_shape": list(entries[next(iter(entries))].meta["latent_shape"]),
        "decoder_stages": stages,
        "model": ae,  # the autoencoder itself: the latent variants' decoder prefixes and FLOPs
        "image_shape": (dataset.channels, dataset.size),
    }


def _decoder_stages(config: GapConfig, dataset: ImageDataset, ae, spaces: dict, device, timings: dict) -> list[dict]:
    """With --decoder-stages: the features after each intermediate stage asked for, added to `spaces`
    as "decoder:<stage>" (computed from the cached latents), and a record of every audited stage
    from the latent to the reconstruction (`data.stages.decoder_stage_spaces`); [] without."""
    stages = audited_stages(config.decoder_stages, ae)
    if not stages:
        return []
    t0 = time.perf_counter()
    shape = (dataset.channels, dataset.size, dataset.size)  # the reconstruction space, as its classifiers see it
    features, records = decoder_stage_spaces(ae, stages, spaces["latent"], shape, device)
    spaces.update(features)
    timings[f"decoder stages {ae.spec}"] = time.perf_counter() - t0
    return records


def _stage_spaces(entry: dict) -> list[str]:
    """The spaces of an autoencoder's intermediate decoder stages ("decoder:<stage>"), in decoder order."""
    return [r["space"] for r in entry["decoder_stages"] if r["space"] not in ("latent", "reconstruction")]


def _train_runs(fit, config: GapConfig, splits, results_by_ae, images, models, parts_dir) -> dict | None:
    """Every run's classifiers: the image space once per split and seed (shared by every
    autoencoder), then the reconstruction and latent spaces of each autoencoder, its decoder
    stages and the latent variants. Under a multi-process launch each process trains its share of the runs; the main
    process then gathers every run's stored classifiers from the run folder (None elsewhere)."""
    predictions: dict[tuple, dict] = {}

    def train_run(seed: int, split: Split, gathered: bool = False) -> None:
        for model in models:
            image = fit("image", "image", images, model, split, seed, gathered=gathered, raw=(images, None))
            for a, entry in enumerate(results_by_ae):
                predictions[(a, "image", model, split.name, seed)] = image
                ae_tag = entry["autoencoder"]["content_hash"][7:19]
                for space in [*spaces_of(entry["autoencoder"])[1:], *_stage_spaces(entry)]:
                    predictions[(a, space, model, split.name, seed)] = fit(
                        f"{space.replace(':', '-')}-{ae_tag}",
                        space,
                        entry["spaces"][space],
                        model,
                        split,
                        seed,
                        gathered=gathered,
                        raw=input_map(entry, space),
                    )
                if model != "deep":
                    continue
                _mapped_variants(fit, config, entry, a, split, seed, predictions, gathered)
                plain = (
                    _weights_path(parts_dir, f"latent-{ae_tag}", model, split, seed)
                    if config.variant_init == "plain"
                    else None
                )
                for variant in [v for v in config.latent_variants if not is_mapped(v)]:
                    teacher = image["train_logits"] if variant == "distilled" else None
                    predictions[(a, variant, model, split.name, seed)] = fit(
                        f"latent-{variant}-{ae_tag}",
                        "latent",
                        entry["spaces"]["latent"],
                        model,
                        split,
                        seed,
                        variant,
                        teacher,
                        plain,
                        gathered=gathered,
                        raw=input_map(entry, "latent"),
                    )

    runs = [(seed, split) for seed in config.run.seeds for split in splits]
    for seed, split in distributed.mine(runs):
        train_run(seed, split)
    distributed.barrier()
    if not distributed.is_main():
        return None
    for seed, split in runs:
        if (0, "image", models[0], split.name, seed) not in predictions:
            train_run(seed, split, gathered=True)  # trained by another process: read from its stored files
    return predictions


def _mapped_variants(fit, config: GapConfig, entry: dict, a: int, split: Split, seed: int, predictions, gathered):
    """One run's mapped latent variants of one autoencoder (`latent_variants.fit_mapped_variant`),
    into `predictions`; the decoder-stage classifiers they train join the run's own, keyed by space."""
    run = {
        space: r
        for (b, space, model, s, sd), r in predictions.items()
        if (b, model, s, sd) == (a, "deep", split.name, seed)
    }
    known = set(run)
    for variant in [v for v in config.latent_variants if is_mapped(v)]:
        predictions[(a, variant, "deep", split.name, seed)] = fit_mapped_variant(
            fit,
            variant,
            entry,
            run,
            split,
            seed,
            gathered=gathered,
            device=resolve_device(config.run.device),
            margin=config.prefix_margin,
        )
    for space in set(run) - known:
        predictions[(a, space, "deep", split.name, seed)] = run[space]


def _diffusion_rows(diffusion_models, config, dataset, splits, results_by_ae, parts_dir, timings) -> dict:
    """(autoencoder number, row label, split name, seed) -> the diffusion classifier's test predictions."""
    diffusion = {}
    for ldm, a in diffusion_models:
        for seed in config.run.seeds:
            for split in splits:
                t0 = time.perf_counter()
                for label, record in _diffusion_run(
                    ldm, results_by_ae[a]["spaces"]["latent"], dataset, split, seed, config, parts_dir
                ).items():
                    diffusion[(a, label, split.name, seed)] = record
                timings[f"diffusion classifier {ldm.folder.name} {split.name} seed{seed}"] = time.perf_counter() - t0
    return diffusion


def _record_run(results: dict, config: GapConfig, predictions: dict, diffusion_models, stream: bool, device) -> None:
    """What a run was, beside its scores: its classifiers (trained, resumed, gathered from the
    other processes of a launch), processes, streaming, provenance and the diffusion models scored."""
    # The image space is shared by every autoencoder; a variant may be another space's classifier (its arrays).
    fits = {id(r["probs"]): r for r in predictions.values()}.values()
    results["trained_classifiers"], results["resumed_classifiers"] = len(fits), sum(bool(r["resumed"]) for r in fits)
    results["gathered_classifiers"] = sum(bool(r.get("gathered")) for r in fits)
    results["processes"] = distributed.world_size()
    results["streamed"] = stream  # spaces read from disk while training (--stream)
    results["provenance"] = provenance(config=asdict(config), device=device)
    if diffusion_models:
        results["diffusion_models"] = [
            {
                "folder": str(ldm.folder),
                "autoencoder": ldm.record["autoencoder"],
                "autoencoder_hash": ldm.record["autoencoder_hash"],
                "split": ldm.record["split"],
                "steps": ldm.record.get("steps"),
                "drift": ldm.drift,
                "draws": config.diffusion_draws,
                "sigma": config.diffusion_sigma,
            }
            for ldm, _ in diffusion_models
        ]


def _diffusion_model(path: str, config: GapConfig, dataset: ImageDataset, splits: list[Split], autoencoders: list):
    """A latent diffusion model to score as a diffusion classifier, and the number of the audited
    autoencoder it was trained on; checked before any work: same autoencoder weights, dataset and
    classes, and none of the audit's test images among those it learnt from."""
    from ..diffusion.classify import parse_sigma
    from ..pipelines.latent_diffusion import LatentDiffusion

    where = f"--diffusion-model {path}"
    try:  # the same checks as `diffusion classify`, named by this command's options
        parse_sigma(config.diffusion_sigma, (0.0, 1.0))
    except MedlatentInputError as error:
        raise MedlatentInputError(str(error).replace("--sigma", "--diffusion-sigma", 1)) from None
    try:
        ldm = LatentDiffusion(path, device=config.run.device)
    except MedlatentInputError as error:
        raise MedlatentInputError(str(error).replace(f"--model {path}", where, 1)) from None
    hashes = [ae.content_hash for ae in autoencoders]
    if ldm.record["autoencoder_hash"] not in hashes:
        raise MedlatentInputError(
            f"{where}: trained on the latents of {ldm.record['autoencoder']}, which "
            f"this audit does not include; add --autoencoder {ldm.record['autoencoder']}"
        )
    if ldm.denoiser.multilabel:
        raise MedlatentInputError(f"{where}: the diffusion classifier is built for single-label models")
    trained = ldm.record.get("dataset", {})
    if trained.get("fingerprint") != dataset.fingerprint or trained.get("size") != dataset.size:
        raise MedlatentInputError(
            f"{where}: trained on {trained.get('name', 'another dataset')} at "
            f"{trained.get('size')} px, not on this audit's {dataset.name} at {dataset.size} px"
        )
    if [str(c) for c in dataset.class_names] != ldm.class_names:
        raise MedlatentInputError(
            f"{where}: its classes are {', '.join(ldm.class_names)}, the "
            f"dataset's are {', '.join(map(str, dataset.class_names))}"
        )
    for split in splits:
        seen = np.intersect1d(split.test, ldm.trained_on).size
        if seen:
            raise MedlatentInputError(
                f"{where}: it learnt from {seen} of the test images of split {split.name}; audit the split it held "
                f"out ({ldm.record['split']['name']}: the same --folds, --seed and --train-limit it was trained with)"
            )
    return ldm, hashes.index(ldm.record["autoencoder_hash"])


def _diffusion_run(
    ldm, latents: SpaceData, dataset: ImageDataset, split: Split, seed: int, config: GapConfig, parts_dir: Path
) -> dict[str, dict]:
    """The diffusion classifier on one run's test images, its draws seeded by the run's seed: the
    lowest mean error (a softmax, its temperature cross-fitted on the test images), the majority
    vote (vote shares, ties broken by the paired evidence), and the mean error stopped early by
    the paired sequential test within its default budget of a fifth of the draws (replayed from
    the same draws). Stored under the run folder, so a rerun reuses it."""
    from ..diffusion.classify import (
        MIN_DRAWS,
        STOP_SIGMA_CANDIDATES,
        classify_held_out,
        default_budget,
        error_probabilities,
        replay_early_stop,
        vote_probabilities,
    )

    name, draws = ldm.folder.name, config.diffusion_draws
    cfg = ldm.record["config"]
    labels = {
        "mean error": f"{name}: mean error",
        "vote": f"{name}: vote ({draws} draws)",
        "stopped": f"{name}: mean error, stopped early (paired test)",
    }
    tolerance = config.diffusion_tolerance
    if tolerance is not None:
        labels["tolerance"] = f"{name}: early stop chosen for a tolerance of {tolerance:g}"
    # Keyed by what decides the predictions: the model (its record changes with every training), the draws and
    # the scoring.
    digest = hashlib.sha256(
        json.dumps(
            [ldm.record, draws, config.diffusion_sigma, DIFFUSION_ROW_VERSION]
            + ([tolerance, config.diffusion_tolerance_metric] if tolerance is not None else []),
            sort_keys=True,
            default=str,
        ).encode()
    ).hexdigest()[:12]
    path = parts_dir / f"diffusion-{_slug(name)}-{digest}-{split.name}-seed{seed}.npz"

    def compute() -> dict:
        k = len(ldm.class_names)
        x_test = ldm.normalise(materialise(latents.take(split.test)).float())
        training = (cfg["p_mean"], cfg["p_std"])
        full = classify_held_out(
            ldm.denoiser,
            x_test,
            dataset.labels[split.test],
            draws,
            config.diffusion_sigma,
            training,
            seed,
            drift=ldm.drift,
            stop_candidates=STOP_SIGMA_CANDIDATES if config.diffusion_tolerance is not None else (),
        )
        # cross-fitted on the test images, not the validation images the model may have learnt from
        temperature = full["temperature"]
        # the test's default level, minimum draws and budget
        _, used, mean_used = replay_early_stop(
            full["draw_errors"], "paired", max_draws=default_budget(draws, MIN_DRAWS)
        )
        return {
            **tolerance_stop(full, dataset, split, seed, config),
            "test_indices": split.test,
            "temperature": temperature,
            "probs_mean error": error_probabilities(full["mean_errors"], temperature),
            "evaluations_mean error": draws * k,
            "probs_vote": vote_probabilities(full["votes"], full["draws_used"], full["draw_errors"]),
            "evaluations_vote": draws * k,
            "probs_stopped": error_probabilities(mean_used, temperature),
            "evaluations_stopped": float(used.mean() * k),
        }

    record, _ = stored_or_computed(path, compute, lambda s: np.array_equal(s["test_indices"], split.test))
    return {
        label: {"probs": record[f"probs_{key}"], "evaluations": float(record[f"evaluations_{key}"])}
        for key, label in labels.items()
    }


def tolerance_stop(full: dict, dataset: ImageDataset, split: Split, seed: int, config: GapConfig) -> dict:
    """With --diffusion-tolerance: the early stop chosen for it on the other folds of the run's test
    images (`stopping.cross_fit_stop`, the noise-level candidates `STOP_SIGMA_CANDIDATES` competing),
    its probabilities and evaluations per image, and each fold's choice as JSON."""
    if config.diffusion_tolerance is None:
        return {}
    from ..diffusion.stopping import cross_fit_stop

    fit = cross_fit_stop(
        full["draw_errors"],
        dataset.labels[split.test],
        config.diffusion_tolerance,
        config.diffusion_tolerance_metric,
        dataset.task,
        seed=seed,
        alternatives=full["candidate_draw_errors"] if len(full["candidate_draw_errors"]) > 1 else None,
    )
    return {
        "probs_tolerance": fit["probs"],
        "evaluations_tolerance": float(fit["draws_used"].mean() * full["votes"].shape[1]),
        "folds_tolerance": json.dumps(fit["folds"], default=str),
    }


def _training_throughput(
    config: GapConfig, dataset: ImageDataset, splits: list[Split], results_by_ae: list[dict], predictions: dict, device
) -> dict:
    """The deep classifiers' training throughput per space (mean over runs, measured when each was trained; first
    autoencoder) and, on CUDA, the bare training step of the same model, batch and precision."""
    from ..training.timing import bare_train_throughput

    shapes = {
        "image": (dataset.channels, dataset.size),
        "reconstruction": (dataset.channels, dataset.size),
        "latent": tuple(results_by_ae[0]["latent_shape"][:2]),
    }
    out = {}
    for space, (channels, size) in shapes.items():
        if space not in spaces_of(results_by_ae[0]["autoencoder"]):
            continue
        records = [predictions[(0, space, "deep", split.name, seed)] for _, split, seed in _runs(config, splits)]
        speeds = [
            float(r["train_samples_per_second"])
            for r in records
            if np.isfinite(float(r.get("train_samples_per_second", np.nan)))
        ]
        audit = float(np.mean(speeds)) if speeds else None
        out[space] = {"audit_samples_per_second": audit}
        if device.type == "cuda":
            bare = bare_train_throughput(
                config.train_config(config.run.seeds[0]),
                channels,
                size,
                dataset.num_outputs,
                space == "latent",
                device,
            )
            out[space].update(bare_step_samples_per_second=bare, ratio=audit / bare if audit else None)
    return out


def display_names(specs: list[str]) -> list[str]:
    """Short, unique display names for autoencoder specs (the full spec stays in tables' tooltips)."""
    from ..autoencoders import display_name

    names = [display_name(spec) for spec in specs]
    return [f"{n} ({i + 1})" if names.count(n) > 1 else n for i, n in enumerate(names)]


def _weights_path(parts_dir: Path, tag: str, model: str, split: Split, seed: int) -> Path:
    return parts_dir / f"{tag}-{model}-{split.name}-seed{seed}.safetensors"


def _fit_space(
    parts_dir: Path,
    tag: str,
    space: str,
    data: SpaceData,
    model: str,
    split: Split,
    seed: int,
    variant: str | None = None,
    teacher_logits: np.ndarray | None = None,
    init: Path | None = None,
    *,
    config: GapConfig,
    dataset: ImageDataset,
    device,
    timings: dict,
    counter,
    gathered: bool = False,
    raw: tuple | None = None,
) -> dict:
    """Train one classifier and predict the test split, or reuse the stored predictions.

    Deep models also store their training curve, best epoch and stop reason, and their logits on
    the training split (the distillation teacher's targets); plain latent models also their weights
    (where noise-conditioned variants start, `init`); noise-conditioned variants also store test
    predictions over a sweep of noise levels. raw: (the space the model is given, e.g. the latents,
    and the map to its inputs or None): deep models also store their measured inference throughput
    from those inputs (`latent_maps.inference_samples_per_second`)."""
    path = parts_dir / f"{tag}-{model}-{split.name}-seed{seed}.npz"
    checkpoints = parts_dir / "checkpoints" / path.stem  # the engine's, while this classifier trains
    start = _start_path(parts_dir, tag, space, model, split, seed, variant, config)

    def fit() -> dict:
        if gathered:
            raise MedlatentRuntimeError(
                f"{path}: another process should have trained this classifier; "
                "is the run folder shared by every process?"
            )
        seed_everything(seed)
        t0 = time.perf_counter()
        y = dataset.labels
        if model == "deep":
            counter.set_postfix_str(f"{tag} {split.name} seed {seed}")
        clf = fit_space_classifier(
            space,
            (data.take(split.train), y[split.train]),
            (data.take(split.val), y[split.val]),
            dataset.task,
            _train_config(config, seed, variant, data),
            latent_std=config.run.latent_std,
            num_outputs=dataset.num_outputs,
            model=model,
            device=device,
            progress=config.run.progress and distributed.is_main(),
            name=f"{tag} {split.name} seed {seed}",
            teacher_logits=torch.from_numpy(teacher_logits) if teacher_logits is not None else None,
            init=load_file(init) if init is not None else None,
            checkpoint_dir=checkpoints,
        )
        record = {"test_indices": split.test}
        if model == "deep":
            record.update(_deep_record(clf, data, split, seed, variant, init is not None, config))
            if start is not None:
                _save_start(clf, start)
        record["probs"] = predict_raw(clf, data.take(split.test))
        record["seconds"] = time.perf_counter() - t0
        if model == "deep" and raw is not None:  # last: timing a copy leaves the predictions above as they are
            record["inference_samples_per_second"] = inference_samples_per_second(
                clf, raw[0].take(split.test[:INFERENCE_BATCH]), raw[1]
            )
        return record

    record, stored = stored_or_computed(path, fit, lambda kept: _reusable(kept, split, start))
    counter.update()
    if stored:
        return {**record, "seconds": float(record["seconds"]), "resumed": not gathered, "gathered": gathered}
    shutil.rmtree(checkpoints, ignore_errors=True)
    timings[f"train {model} {tag} {split.name} seed{seed}"] = record["seconds"]
    return {**record, "resumed": False}


def _reusable(stored: dict, split: Split, start: Path | None) -> bool:
    """Whether a stored classifier serves this run: the same test images and, for a plain latent
    classifier the variants start from, its weights beside it (a run that asked no noise-conditioned
    variant stored none: the classifier is trained again rather than read back without them)."""
    return np.array_equal(stored["test_indices"], split.test) and (start is None or start.is_file())


def _start_path(
    parts_dir: Path, tag: str, space: str, model: str, split: Split, seed: int, variant: str | None, config: GapConfig
) -> Path | None:
    """Where a plain latent classifier keeps its weights for the noise-conditioned variants to start
    from, if this run asks for one that starts there (else None)."""
    if model != "deep" or space != "latent" or variant is not None or config.variant_init != "plain":
        return None
    if not any(v in NOISE_VARIANTS for v in config.latent_variants):
        return None
    return _weights_path(parts_dir, tag, model, split, seed)


def _save_start(clf, path: Path) -> None:
    """A plain latent classifier's weights, where the noise-conditioned variants start."""
    state = {k: v.detach().cpu().contiguous() for k, v in clf.model_.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, str(tmp)))


def _train_config(config: GapConfig, seed: int, variant: str | None, data: SpaceData):
    """The training configuration of one classifier; features computed on the fly from the latents
    are read in this process (no loader workers: their autoencoder lives on the run's device)."""
    train = config.train_config(seed, variant)
    if isinstance(data.stream, StageFeatures):
        train = replace(train, loop=replace(train.loop, num_workers=0))
    return train


def _deep_record(clf, data: SpaceData, split: Split, seed: int, variant, warm: bool, config: GapConfig) -> dict:
    """What a deep classifier stores beside its test predictions: its training (curves, best epoch,
    stop reason, throughput), its logits on the training split and, for a noise-conditioned
    variant, a sigma sweep."""
    record = {
        "best_epoch": clf.best_epoch_,
        "train_samples_per_second": clf.train_samples_per_second_,
        "warm_start": warm,
        "stop_reason": np.array(clf.stop_reason_),
        **{f"history_{k}": v for k, v in clf.history_arrays().items()},
        "train_logits": clf.logits(clf.input_scaler.transform(data.take(split.train))).numpy(),
    }
    if clf.config.noise_conditioned:
        sigmas = sigma_grid(config.sweep_points)
        x_test = materialise(clf.input_scaler.transform(data.take(split.test)))
        # The same noise at every sigma.
        noise = torch.randn(x_test.shape, generator=torch.Generator().manual_seed(seed))
        record["sweep_sigmas"] = sigmas.numpy()
        record["sweep_probs"] = np.stack(
            [clf.predict_proba(x_test + float(sigma) * noise, sigma=float(sigma)) for sigma in sigmas]
        )
    return record


def _runs(config: GapConfig, splits: list[Split]) -> list[tuple[int, Split, int]]:
    """Every (split number, split, seed) of the audit, in the order of the per-run tables."""
    return [(k, split, seed) for seed in config.run.seeds for k, split in enumerate(splits)]


def _summarise(
    config: GapConfig,
    dataset: ImageDataset,
    splits: list[Split],
    results_by_ae: list[dict],
    predictions: dict,
    models: list[str],
    diffusion: dict | None = None,
) -> dict:
    runs = _runs(config, splits)
    tests = RunTests.build(
        [f"{split.name}/seed{seed}" for _, split, seed in runs],
        [dataset.labels[split.test] for _, split, _ in runs],
        [k for k, _, _ in runs],
        dataset.task,
        config.run.bootstrap,
        seed=config.run.seeds[0],
    )
    method = resolve_method(config.run.interval, len(runs))
    rows, fronts = [], []
    for a, entry in enumerate(results_by_ae):
        for model in models:
            variants = config.latent_variants if model == "deep" else []
            records = {
                key: [predictions[(a, key, model, split.name, seed)] for _, split, seed in runs]
                for key in [*spaces_of(entry["autoencoder"]), *variants, *_stage_spaces(entry)]
            }
            row, scores = _row(entry, model, records, tests, method, dataset, splits)
            if entry.get("decoder_stages"):
                row["decoder_stages"] = _along_decoder(
                    entry["decoder_stages"], records, scores, tests, method, dataset.task
                )
            if variants:
                learnability = gaps_of(entry["autoencoder"])["learnability"]
                row["variants"] = {
                    v: _variant(dataset.task, records[v], scores, learnability, row, tests, method) for v in variants
                }
                for v in filter(is_mapped, variants):
                    row["variants"][v].update(mapped_variant_summary(v, records[v], entry, tests.names))
            if dataset.confounder is not None:
                row["shortcuts"] = reliance_over_runs(
                    dataset, [split.train for _, split, _ in runs], records, config.run.bootstrap, config.run.seeds[0]
                )
            if model == "deep":  # measured timings: beside the rows, which a rerun reproduces exactly
                fronts.append(accuracy_throughput(row, entry, records))
            labels = list(dict.fromkeys(label for (b, label, _, _) in diffusion or {} if b == a))
            if labels and model == models[0]:  # the diffusion classifier is one more row beside this autoencoder's
                row["diffusion_classifiers"] = {
                    label: _diffusion_summary(
                        dataset.task,
                        [diffusion[(a, label, split.name, seed)] for _, split, seed in runs],
                        scores,
                        tests,
                        method,
                    )
                    for label in labels
                }
            rows.append(row)
    return {
        "kind": "medlatent.gap",
        "dataset": dataset.describe(),
        "splits": [{"name": s.name, **s.sizes()} for s in splits],
        "autoencoders": [
            {
                **e["autoencoder"],
                "reconstruction_quality": e["quality"],
                "latent_shape": e["latent_shape"],
                "cache": e["cache"],
                "cache_reused": e["cache_reused"],
            }
            for e in results_by_ae
        ],
        "interval_method": method,
        "rows": rows,
        "primary_metric": "auroc",
        "accuracy_throughput": fronts,
    }


def _row(entry: dict, model: str, records: dict, tests: RunTests, method: str, dataset, splits) -> tuple[dict, dict]:
    """One autoencoder's row of one model: the score of each space, each gap with its paired test
    (unreliable where it rests on a flagged classifier), per-run scores and the classifiers; and
    the spaces' run scores (for the rows beside)."""
    task, ae = dataset.task, entry["autoencoder"]
    spaces, gaps = spaces_of(ae), gaps_of(ae)
    scores = {space: RunScores.of(task, tests, [r["probs"] for r in records[space]]) for space in spaces}
    classifiers = {space: classifier_summary(task, tests, records[space]) for space in spaces}
    row = {
        "autoencoder": ae["spec"],
        "autoencoder_name": ae["name"],
        "model": model,
        "interval_method": method,
        "encoder_only": not ae["has_decoder"],
        "scores": {space: scores[space].summary(method) for space in spaces},
        "gaps": {},
        "unreliable_gaps": {},
    }
    for gap, (before, after) in gaps.items():
        row["gaps"][gap] = gap_summary(scores[before], scores[after], method)
        reasons = [
            f"{space} {h['run']}: {flag}"
            for space in (before, after)
            for h in classifiers[space]["health"]
            for flag in h["flags"]
        ]
        if reasons:
            row["unreliable_gaps"][gap] = {"reasons": reasons, "advice": ADVICE}
    row["per_run"] = {
        "runs": tests.names,
        "scores": {space: {m: scores[space].points[m].tolist() for m in METRICS} for space in spaces},
    }
    if len(splits) > 1:  # secondary figure only: pools predictions of different models
        row["pooled_out_of_fold"] = {
            space: pooled_out_of_fold(task, dataset.labels, [s.test for s in splits], records[space])
            for space in spaces
        }
    row["classifiers"] = classifiers
    return row, scores


def _along_decoder(stages: list[dict], records: dict, scores: dict, tests: RunTests, method: str, task: str) -> dict:
    """Learnability along the decoder, for one row: each audited stage in decoder order, from the
    latent to the reconstruction, with its record (name, index, space, feature shape, FLOPs of the
    decoder prefix per image, how its features were held), its scores with 95% intervals as the
    spaces report them, the paired difference reconstruction - stage (None at the reconstruction
    itself), its per-run scores, its deep classifiers' mean training throughput (None for a linear
    probe) and their health.

    `closing_stage` is the first stage in decoder order whose score's point estimate (of the
    primary metric, AUROC) lies within the reconstruction space's 95% interval: how much of the
    decoder a classifier needs before it reads the features as well as the reconstruction (None
    when no stage's does, e.g. where that interval is undefined); `closing_stage_by_metric` gives it
    for every metric."""
    reference = scores["reconstruction"]
    rows = []
    for stage in stages:
        space = stage["space"]
        runs = records[space]
        stage_scores = scores.get(space) or RunScores.of(task, tests, [r["probs"] for r in runs])
        speeds = [float(r["train_samples_per_second"]) for r in runs if "train_samples_per_second" in r]
        speeds = [v for v in speeds if np.isfinite(v)]
        health = run_health(task, tests.names, runs)
        rows.append(
            {
                **stage,
                "scores": stage_scores.summary(method),
                "difference_to_reconstruction": None
                if space == "reconstruction"
                else gap_summary(reference, stage_scores, method),
                "per_run": {m: stage_scores.points[m].tolist() for m in METRICS},
                "train_samples_per_second": float(np.mean(speeds)) if speeds else None,
                "flagged": any(h["flags"] for h in health),
                "health": health,
            }
        )
    closing = {m: _closing_stage(rows, m, reference.interval(m, method)) for m in METRICS}
    return {"metric": "auroc", "closing_stage": closing["auroc"], "closing_stage_by_metric": closing, "stages": rows}


def _closing_stage(rows: list[dict], metric: str, interval) -> str | None:
    """The first stage whose point estimate of `metric` lies within `interval` (None if none does)."""
    lo, hi = interval
    for row in rows:
        value = row["scores"][metric]["value"]
        if np.isfinite(value) and lo <= value <= hi:
            return row["name"]
    return None


def _variant(task: str, records: list[dict], scores: dict, learnability, row: dict, tests: RunTests, method) -> dict:
    """A latent variant's scores, the share of the learnability gap it closes, its sigma sweep
    (None for a variant that is not noise-conditioned) and classifier."""
    v_scores = RunScores.of(task, tests, [r["probs"] for r in records])
    before = learnability[0]
    return {
        "scores": v_scores.summary(method),
        "share_of_gap_closed": share_closed(v_scores, scores[before], scores["latent"], row["gaps"]["learnability"]),
        "sigma_sweep": sigma_sweep(task, tests, records) if "sweep_sigmas" in records[0] else None,
        "per_run": {m: v_scores.points[m].tolist() for m in METRICS},
        "classifier": classifier_summary(task, tests, records),
    }


def _diffusion_summary(task: str, records: list[dict], scores: dict, tests: RunTests, method: str) -> dict:
    """A diffusion classifier row: its scores, network evaluations per image, and each space minus it."""
    d_scores = RunScores.of(task, tests, [r["probs"] for r in records])
    return {
        "scores": d_scores.summary(method),
        "evaluations_per_image": float(np.mean([r["evaluations"] for r in records])),
        "space_minus_diffusion": {
            space: gap_summary(space_scores, d_scores, method) for space, space_scores in scores.items()
        },
        "per_run": {m: d_scores.points[m].tolist() for m in METRICS},
    }


def _write_predictions(
    path: Path,
    config: GapConfig,
    splits: list[Split],
    results_by_ae: list[dict],
    predictions: dict,
    models: list[str],
    diffusion: dict | None = None,
) -> str:
    """Per-sample test probabilities of every classifier and run, and every split's membership
    (train, val, test dataset indices), in one compressed npz beside results.json.

    Keys: "split/<split>/<part>", "probs/<autoencoder name>/<space>/<model>/<split>/seed<seed>" and
    "probs/<autoencoder name>/diffusion/<row label>/<split>/seed<seed>"
    (the image space under the first autoencoder's name only is enough, but it is kept for each)."""
    arrays = {f"split/{s.name}/{part}": getattr(s, part) for s in splits for part in ("train", "val", "test")}
    for (a, space, model, split, seed), record in predictions.items():
        arrays[f"probs/{results_by_ae[a]['autoencoder']['name']}/{space}/{model}/{split}/seed{seed}"] = record[
            "probs"
        ].astype(np.float32)
    for (a, label, split, seed), record in (diffusion or {}).items():
        arrays[f"probs/{results_by_ae[a]['autoencoder']['name']}/diffusion/{label}/{split}/seed{seed}"] = record[
            "probs"
        ].astype(np.float32)
    atomic_write(path, lambda tmp: savez(tmp, arrays, compressed=True))
    return path.name


def _write_samples(
    out: Path, dataset: ImageDataset, splits: list[Split], results_by_ae: list[dict], count: int = 8
) -> dict:
    """A few test images and their reconstructions as PNG files in samples/, for the report's grid."""
    from PIL import Image

    rng = np.random.default_rng(0)
    test = splits[0].test
    chosen = np.sort(rng.choice(test, size=min(count, len(test)), replace=False))
    folder = out / "samples"

    def write(images: torch.Tensor, stem: str) -> list[str]:
        arrays = (images.float().clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        names = []
        for index, array in zip(chosen, arrays, strict=False):
            name = f"samples/{stem}-{index}.png"
            image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
            atomic_write(out / name, lambda tmp, image=image: image.save(tmp, format="PNG"))
            names.append(name)
        return names

    folder.mkdir(parents=True, exist_ok=True)
    labels = dataset.labels[chosen]
    return {
        "indices": chosen.tolist(),
        "labels": [", ".join(dataset.class_names[j] for j in np.flatnonzero(row)) or "none" for row in labels]
        if dataset.task == "multilabel"
        else [dataset.class_names[int(c)] for c in labels],
        "original": write(materialise(results_by_ae[0]["spaces"]["image"].take(chosen)), "original"),
        "reconstructions": {
            e["autoencoder"]["name"]: write(
                materialise(e["spaces"]["reconstruction"].take(chosen)), _slug(e["autoencoder"]["name"])
            )
            for e in results_by_ae
            if "reconstruction" in e["spaces"]
        },
    }


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
