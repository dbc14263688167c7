"""The diffusion classifier on a model's held-out split (`medlatent diffusion classify`).

The test images are those the latent diffusion model never saw (its saved split). Every image
gets `draws` draws (`diffusion.classify`); from the same draws come: the lowest mean error
(probabilities: a softmax of the negative mean errors, its temperature cross-fitted on the test
images, never on the validation images the model learnt from), the majority vote over all draws
(vote shares, ties broken by the paired evidence), and three early stops replayed from the same
draws, so that their network evaluations are counted exactly: the vote stopped once its leader
cannot be overtaken, the vote stopped by a sequential binomial test, and the mean error stopped by
a paired sequential test on the normalised error differences, the two tests within a budget of
draws (by default a fifth). Optionally: adaptive class pruning (Li et al.), run on its own;
saved discriminative classifiers scored on the same images as rows beside, with their max-softmax
risk-coverage curves; explanation maps. Scores as in the gap audit: AUROC, balanced accuracy and
MCC with bootstrap 95% intervals, and each early stop's paired difference to the full vote.
Writes results.json and report.html.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ..classifiers.space import predict_raw
from ..diffusion.classify import (
    STOP_SIGMA_CANDIDATES,
    classify_held_out,
    classify_pruned,
    default_budget,
    error_probabilities,
    parse_sigma,
    parse_stages,
    pruned_probabilities,
    replay_early_stop,
    vote_probabilities,
)
from ..errors import MedlatentInputError
from ..evaluation.aggregate import RunScores, RunTests, gap_summary
from ..evaluation.metrics import wilson_interval
from ..evaluation.uncertainty import error_gap, risk_coverage, vote_uncertainty
from ..pipelines.latent_diffusion import LatentDiffusion
from ..reports.provenance import provenance
from ..rundir import check_out, finish_run, mark
from .config import DiffusionClassifyConfig


def run_diffusion_classifier(config: DiffusionClassifyConfig, log=None) -> dict:
    """The settings are `DiffusionClassifyConfig`'s. sigma: the draws' noise levels, "train", "auto" or
    "MEAN,STD" of ln sigma (`parse_sigma`).
    compile: on a GPU, the denoiser runs as CUDA graphs (`torch.compile(mode="reduce-overhead")`;
    small denoisers are launch-bound there); ignored on the CPU. prune: Li et al.'s stages, e.g.
    "25:5,100:1", as one more classifier. max_draws: the sequential stops' budget, by default a
    fifth of the draws (`default_budget`); `draws` for none. classifiers: saved
    discriminative classifiers (`medlatent classifier train`) scored on the same held-out images,
    as rows beside the diffusion classifier's and with their max-softmax risk-coverage. explain:
    explanation maps for this many held-out images of each class (PNG overlays in
    `out/explanations`, and the share of maps peaking on the lesion where the dataset knows it)."""
    out = check_out(config.run.out, "diffusion classify", resumable=True)
    max_draws = default_budget(config.draws, config.min_draws) if config.max_draws is None else config.max_draws
    _check_classifier_folders(config.classifiers)
    started = time.perf_counter()
    ldm, stages, training, given = _checked_model(config)
    dataset, ae, cache = ldm.data(config.run.progress)
    if log:
        log(_plan(config, ldm, dataset, given))

    test_part = f"{ldm.record['split']['name']}-test"
    x_test, test, raw_test = ldm.encode(dataset, ldm.held_out, "test", ae, cache)
    y_test = dataset.labels[test]
    t0 = time.perf_counter()
    net = _denoiser(ldm, config.compile)
    full = classify_held_out(
        net,
        x_test,
        y_test,
        config.draws,
        config.sigma,
        training,
        config.run.seed,
        config.batch_size,
        drift=ldm.drift,  # noised as in training
        stop_candidates=STOP_SIGMA_CANDIDATES if config.tolerance is not None else (),
    )
    seconds = time.perf_counter() - t0
    vote = f"vote ({config.draws} draws)"
    probs, evaluations, agreement = _decisions(config, full, vote, max_draws)
    chosen = _tolerance_stop(config, full, y_test, dataset.task, probs, evaluations, agreement, vote)
    if stages is not None:
        name = f"mean error, pruned ({config.prune})"
        probs[name], evaluations[name] = _pruned(config, net, x_test, stages, full, ldm.drift)
    discriminative = _discriminative_probabilities(config, ldm, dataset, cache, ae, test, test_part, raw_test)
    for name, p in discriminative.items():
        probs[name], evaluations[name] = p, 1.0
    tests = RunTests.build(["held-out"], [y_test], [0], dataset.task, config.run.bootstrap, seed=config.run.seed)
    scores = {name: RunScores.of(dataset.task, tests, [p]) for name, p in probs.items()}
    results = _results(config, ldm, dataset, full, max_draws, vote, scores, evaluations, discriminative, agreement)
    if chosen is not None:
        name = chosen["name"]
        test_loss = results["early_stopping"][name]["difference_to_full_vote"][config.tolerance_metric]
        # the difference is stopped - full vote; the loss is full vote - stopped
        loss = {"value": -test_loss["value"], "ci95": [-test_loss["ci95"][1], -test_loss["ci95"][0]]}
        results["tolerance"] = {**chosen, "test_loss": loss, "held": loss["value"] <= config.tolerance}
    results["seconds"] = {"test draws": seconds, "total": time.perf_counter() - started}
    results["images_per_second"] = len(test) / seconds
    results["compiled"] = net is not ldm.denoiser
    results["device"] = str(ldm.device)
    results["uncertainty"] = _uncertainty(full, probs, vote, discriminative, y_test)
    results["provenance"] = provenance(config=asdict(config), device=ldm.device)
    mark(out, "diffusion classify")
    if config.explain:
        results["explanations"] = _explain(config, ldm, ae, dataset, x_test, test, y_test, full, Path(out))
    finish_run(out, "diffusion classify", results, config)
    return results


def _check_classifier_folders(classifiers: list[str]) -> None:
    """Each --classifier must be saved by `medlatent classifier train` (a folder, or hf-hub:OWNER/NAME): checked
    before any work."""
    from ..hub import resolve_model_dir

    for folder in classifiers:
        if not (resolve_model_dir(folder, "--classifier") / "estimator.json").is_file():
            raise MedlatentInputError(f"--classifier {folder}: not a classifier saved by `medlatent classifier train`")


def _checked_model(config: DiffusionClassifyConfig) -> tuple[LatentDiffusion, list | None, tuple, object]:
    """The model, checked before any work: single-label, with held-out test images and, for the
    explanation maps, a decoder. With it: the --prune stages, the training noise levels
    (P_mean, P_std) and the draws' noise levels as given (`parse_sigma`)."""
    ldm = LatentDiffusion(config.model, device=config.run.device)
    if config.explain:
        ldm.require_decoder("--explain (the maps are drawn over decoded images; use --explain 0)")
    if ldm.denoiser.multilabel:
        raise MedlatentInputError(f"--model {config.model}: the diffusion classifier is built for single-label models")
    if not len(ldm.held_out):
        raise MedlatentInputError(f"--model {config.model}: its held-out split has no test images")
    stages = parse_stages(config.prune, len(ldm.class_names)) if config.prune else None
    trained = ldm.record["config"]
    training = (trained["p_mean"], trained["p_std"])
    return ldm, stages, training, parse_sigma(config.sigma, training)


def _plan(config: DiffusionClassifyConfig, ldm: LatentDiffusion, dataset, given) -> str:
    """The line that says what the run will do."""
    return (
        f"diffusion classify: {len(ldm.held_out)} held-out images of {dataset.name}, "
        f"{config.draws} draws x {len(ldm.class_names)} classes each, "
    ) + (
        f"ln sigma ~ N({given[0]:g}, {given[1]:g}^2)"
        if given != "auto"
        else "noise levels chosen on the other folds of the images (--sigma auto)"
    )


def _denoiser(ldm: LatentDiffusion, compile_graphs: bool):
    """The denoiser the draws run through: on a GPU with `compile_graphs`, as CUDA graphs."""
    if compile_graphs and ldm.device.type == "cuda":
        return torch.compile(ldm.denoiser, mode="reduce-overhead", dynamic=False)
    return ldm.denoiser


def _decisions(config: DiffusionClassifyConfig, full: dict, vote: str, max_draws: int) -> tuple[dict, dict, dict]:
    """From the same draws: the lowest mean error, the full vote and the three early stops, replayed
    so that their network evaluations are counted exactly. Returns each decision rule's
    probabilities and network evaluations per image, and for each early stop the share of images
    on which it returns the full vote's class."""
    k = full["votes"].shape[1]
    temperature = full["temperature"]
    probs = {
        "mean error": error_probabilities(full["mean_errors"], temperature),
        vote: vote_probabilities(full["votes"], full["draws_used"], full["draw_errors"]),
    }
    evaluations = {"mean error": config.draws * k, vote: config.draws * k}
    predicted_vote = probs[vote].argmax(1)
    agreement = {}
    budget = f", at most {max_draws} draws" if max_draws < config.draws else ""
    for rule, name in (
        ("decided", "vote, stopped when decided"),
        ("sequential", f"vote, sequential test (alpha {config.alpha:g}{budget})"),
        ("paired", f"mean error, paired sequential test (alpha {config.alpha:g}{budget})"),
    ):
        votes, used, mean_used = replay_early_stop(
            full["draw_errors"], rule, config.alpha, config.min_draws, max_draws if rule != "decided" else None
        )
        if rule == "paired":  # a mean-error decision: scored by the mean errors of the draws it used
            probs[name], predicted = error_probabilities(mean_used, temperature), mean_used.argmin(1)
        else:
            probs[name] = vote_probabilities(votes, used, full["draw_errors"])
            predicted = probs[name].argmax(1)  # the vote's leader, a tie to the class of more evidence
        evaluations[name] = float(used.mean() * k)
        agreement[name] = float((predicted == predicted_vote).mean())
    return probs, evaluations, agreement


def _tolerance_stop(
    config: DiffusionClassifyConfig, full: dict, labels, task: str, probs: dict, evaluations: dict, agreement, vote
) -> dict | None:
    """With --tolerance: the early stop chosen for it on the other folds of the held-out images
    (`stopping.cross_fit_stop`), as one more decision rule beside the others; returns what was chosen
    in each fold, with its loss on the images it was chosen on and its cost, and the cheapest stop
    within the tolerance on all the images (`stopping.in_sample_limit`)."""
    if config.tolerance is None:
        return None
    from ..diffusion.stopping import cross_fit_stop, in_sample_limit

    alternatives = full["candidate_draw_errors"] if len(full["candidate_draw_errors"]) > 1 else None
    tolerance, metric = config.tolerance, config.tolerance_metric
    fit = cross_fit_stop(
        full["draw_errors"], labels, tolerance, metric, task, seed=config.run.seed, alternatives=alternatives
    )
    name = f"early stop chosen for a tolerance of {config.tolerance:g} ({config.tolerance_metric})"
    k = full["votes"].shape[1]
    probs[name], evaluations[name] = fit["probs"], float(fit["draws_used"].mean() * k)
    agreement[name] = float((fit["probs"].argmax(1) == probs[vote].argmax(1)).mean())
    return {
        "name": name,
        "tolerance": config.tolerance,
        "metric": config.tolerance_metric,
        "folds": fit["folds"],
        "evaluations_per_image": evaluations[name],
        "evaluation_share": evaluations[name] / (config.draws * k),
        "in_sample_limit": in_sample_limit(full["draw_errors"], labels, tolerance, metric, task, alternatives),
    }


def _pruned(config: DiffusionClassifyConfig, net, x_test, stages, full: dict, drift) -> tuple[np.ndarray, float]:
    """Adaptive class pruning (Li et al.), run on its own with each image's noise levels of the full
    draws: its probabilities and network evaluations per image."""
    pruned = classify_pruned(
        net,
        x_test,
        stages,
        seed=config.run.seed,
        batch_size=config.batch_size,
        p_mean=full["sigma"][:, 0],
        p_std=full["sigma"][:, 1],
        drift=drift,
    )
    return (
        pruned_probabilities(pruned["mean_errors"], pruned["prediction"], full["temperature"]),
        pruned["evaluations_per_image"],
    )


def _discriminative_probabilities(
    config: DiffusionClassifyConfig, ldm, dataset, cache, ae, test: np.ndarray, test_part: str, raw_test
) -> dict[str, np.ndarray]:
    """Each saved discriminative classifier's probabilities on the held-out images, by row name."""
    discriminative = {}
    for folder in config.classifiers:
        clf, inputs = _discriminative(folder, ldm, dataset, cache, ae, test, test_part, raw_test, config.run.device)
        name = f"{clf.space} classifier {Path(folder).name}"
        discriminative[name] = predict_raw(clf, inputs)
    return discriminative


def _results(
    config: DiffusionClassifyConfig,
    ldm: LatentDiffusion,
    dataset,
    full: dict,
    max_draws: int,
    vote: str,
    scores: dict,
    evaluations: dict,
    discriminative: dict,
    agreement: dict,
) -> dict:
    """The run's settings and scores: each classifier's, the diffusion classifier's differences to
    the discriminative ones, and each early stop's to the full vote."""
    k = len(ldm.class_names)
    return {
        "kind": "medlatent.diffusion_classifier",
        "model": str(config.model),
        "dataset": dataset.describe(),
        "class_names": ldm.class_names,
        "test_images": len(full["mean_errors"]),  # one row per held-out image classified
        "draws": config.draws,
        "seed": config.run.seed,
        "alpha": config.alpha,
        "min_draws": config.min_draws,
        "max_draws": max_draws,
        "sigma": _sigma_record(config.sigma, full),
        "temperature": sorted(set(full["temperature"].tolist())),
        "classifiers": {
            name: {
                "scores": s.summary("bootstrap"),
                "evaluations_per_image": evaluations[name],
                "kind": "discriminative" if name in discriminative else "diffusion",
            }
            for name, s in scores.items()
        },
        "difference_to_discriminative": {
            f"{ours} - {theirs}": gap_summary(scores[ours], scores[theirs], "bootstrap")
            for theirs in discriminative
            for ours in ("mean error", vote)
        },
        "early_stopping": {
            name: {
                "difference_to_full_vote": gap_summary(scores[name], scores[vote], "bootstrap"),
                "evaluation_share": evaluations[name] / (config.draws * k),
                "same_class_as_full_vote": same,
            }
            for name, same in agreement.items()
        },
        "temperature_fitted_on": (
            "the other folds of the test images (5-fold cross-fitting; "
            "not the validation images, which the model learnt from)"
        ),
    }


def _uncertainty(full: dict, probs: dict, vote: str, discriminative: dict, y_test: np.ndarray) -> dict:
    """Risk-coverage for selective prediction: per decision rule, its images ranked by a confidence."""
    k = full["votes"].shape[1]
    predicted_vote, predicted_error = probs[vote].argmax(1), full["mean_errors"].argmin(1)
    spread = vote_uncertainty(full["votes"])
    confidences = {  # per decision rule, the confidence that ranks its images for selective prediction
        f"{vote}: vote margin": (predicted_vote, spread["vote_margin"]),
        f"{vote}: 1 - vote entropy": (predicted_vote, 1 - spread["vote_entropy"] / np.log(k)),
        "mean error: error gap": (predicted_error, error_gap(full["mean_errors"])),
        "mean error: max probability": (predicted_error, probs["mean error"].max(1)),
        **{f"{name}: max softmax": (p.argmax(1), p.max(1)) for name, p in discriminative.items()},
    }
    return {
        name: {**risk_coverage(pred == y_test, conf), "error_rate": float((pred != y_test).mean())}
        for name, (pred, conf) in confidences.items()
    }


def _sigma_record(given: str, full: dict) -> dict:
    """The draws' noise levels: as given, and the distributions used with how many images each."""
    used, counts = np.unique(full["sigma"], axis=0, return_counts=True)
    return {
        "given": given,
        "used": [
            {"ln_sigma_mean": float(m), "ln_sigma_std": float(s), "images": int(c)}
            for (m, s), c in zip(used, counts, strict=False)
        ],
        "calibration_evaluations_per_image": full["calibration_evaluations_per_image"],
    }


def _discriminative(
    folder, ldm, dataset, cache, ae, test: np.ndarray, test_part: str, raw_test: torch.Tensor, device: str
):
    """A saved classifier and its inputs on the held-out images, checked against the model."""
    from ..classifiers import DeepClassifier
    from ..data.base import check_finite

    clf = DeepClassifier.from_pretrained(folder, device=device, option="--classifier")
    if clf.num_outputs_ != len(ldm.class_names):
        raise MedlatentInputError(
            f"--classifier {folder}: {clf.num_outputs_} classes, the diffusion model has {len(ldm.class_names)}"
        )
    if clf.input_scaler is None:
        raise MedlatentInputError(
            f"--classifier {folder}: saved without its input scaler; save it with `medlatent classifier train`"
        )
    if clf.space != "image" and (clf.autoencoder or {}).get("content_hash") != ldm.record["autoencoder_hash"]:
        raise MedlatentInputError(
            f"--classifier {folder}: a {clf.space} classifier of another autoencoder "
            f"({(clf.autoencoder or {}).get('spec', 'unknown')}), not {ldm.record['autoencoder']}"
        )
    if clf.space == "image":
        return clf, check_finite(dataset.load(test), dataset.name)
    if clf.space == "latent":
        return clf, raw_test
    return clf, cache.encode(dataset, test_part, test, ae, ldm.device, reconstruct=True).reconstructions()


def _explain(config: DiffusionClassifyConfig, ldm, ae, dataset, x_test, test, y_test, full: dict, out: Path) -> dict:
    """Maps for the first `config.explain` held-out images of each class, against the class of the
    second-lowest mean error: PNG overlays, and where the dataset knows its lesions, how often
    each map's peak falls on the lesion."""
    from ..diffusion.explain import explanation_maps

    predicted = torch.from_numpy(full["mean_errors"].argmin(1))
    runner_up = torch.from_numpy(np.argsort(full["mean_errors"], 1, kind="stable")[:, 1])
    per_class, sigma, draws = config.explain, config.explain_sigma, config.explain_draws
    chosen = np.concatenate([np.flatnonzero(y_test == c)[:per_class] for c in range(len(ldm.class_names))])
    maps = explanation_maps(
        ldm,
        ae,
        x_test[chosen],
        predicted[chosen],
        runner_up[chosen],
        dataset.channels,
        dataset.size,
        sigma=sigma,
        draws=draws,
        seed=config.run.seed,
    )
    files = _write_explanations(ldm.class_names, dataset, test, y_test, predicted, runner_up, chosen, maps, out)
    record = {
        "images": len(chosen),
        "per_class": per_class,
        "sigma": sigma,
        "draws": draws,
        "files": files,
        "maps": (
            "class difference: decoded D(x_sigma; predicted) - D(x_sigma; runner-up), mean over draws; "
            "counterfactual: x noised to sigma, denoised with the runner-up class, decoded, minus the reconstruction"
        ),
    }
    if dataset.lesions is not None:
        record.update(_peak_on_lesion(maps, dataset.lesions, test[chosen]))
    return record


def _write_explanations(
    names: list[str], dataset, test, y_test, predicted, runner_up, chosen, maps: dict, out: Path
) -> list[str]:
    """One PNG overlay per chosen image, in `out/explanations`; returns their paths relative to `out`."""
    from ..diffusion.explain import saliency
    from ..io import atomic_write
    from ..reports.plots import explanation_figure, to_hwc

    folder = out / "explanations"
    folder.mkdir(parents=True, exist_ok=True)
    images = dataset.load(test[chosen])
    lesions = dataset.lesions
    heat = {name: saliency(maps[name]).numpy() for name in ("class_difference", "counterfactual_difference")}
    files = []
    for j, i in enumerate(chosen):
        title = (
            f"#{test[i]}: true {names[y_test[i]]}, predicted "
            f"{names[int(predicted[i])]}; counterfactual {names[int(runner_up[i])]}"
        )
        lesion = tuple(lesions["center"][test[i]]) + (lesions["radius"][test[i]],) if lesions is not None else None
        png = explanation_figure(
            to_hwc(images[j]),
            {name: h[j] for name, h in heat.items()},
            to_hwc(maps["counterfactual"][j]),
            title,
            lesion,
        )
        file = folder / f"{int(test[i])}.png"
        atomic_write(file, lambda tmp, b=png: tmp.write_bytes(b))
        files.append(str(file.relative_to(out)))
    return files


def _peak_on_lesion(maps: dict, lesions: dict, indices: np.ndarray) -> dict:
    """How often each map's peak falls on the lesion, over the images that have one (none: {})."""
    from ..diffusion.explain import peak_in_lesion

    has = ~np.isnan(lesions["radius"][indices])
    if not has.any():
        return {}
    centers, radii = lesions["center"][indices][has], lesions["radius"][indices][has]
    return {
        "peak_on_lesion": {
            name: {
                "rate": float(hits.mean()),
                "of": int(has.sum()),
                "ci95": wilson_interval(int(hits.sum()), int(has.sum())),
            }
            for name in ("class_difference", "counterfactual_difference")
            for hits in [peak_in_lesion(maps[name][torch.from_numpy(has)], centers, radii)]
        },
        "peak_on_lesion_rule": (
            "the smoothed map's strongest pixel lies within two lesion radii of the lesion's centre"
        ),
    }
