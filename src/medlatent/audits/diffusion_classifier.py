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

from ..diffusion.classify import (
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
    c = config
    model, draws, seed, sigma, device, batch_size, bootstrap, alpha = (
        c.model,
        c.draws,
        c.seed,
        c.sigma,
        c.device,
        c.batch_size,
        c.bootstrap,
        c.alpha,
    )
    min_draws, prune, classifiers, explain, explain_sigma, explain_draws, progress = (
        c.min_draws,
        c.prune,
        c.classifiers,
        c.explain,
        c.explain_sigma,
        c.explain_draws,
        c.progress,
    )
    compile = c.compile  # noqa: A001
    out = check_out(c.out, "diffusion classify", resumable=True)
    max_draws = default_budget(draws, min_draws) if c.max_draws is None else c.max_draws
    for folder in classifiers:
        if not (Path(folder) / "estimator.json").is_file():
            raise MedlatentInputError(f"--classifier {folder}: not a classifier saved by `medlatent classifier train`")
    started = time.perf_counter()
    ldm = LatentDiffusion(model, device=device)
    if explain:
        ldm.require_decoder("--explain (the maps are drawn over decoded images; use --explain 0)")
    if ldm.denoiser.multilabel:
        raise MedlatentInputError(f"--model {model}: the diffusion classifier is built for single-label models")

    test = ldm.held_out
    if not len(test):
        raise MedlatentInputError(f"--model {model}: its held-out split has no test images")
    k = len(ldm.class_names)
    stages = parse_stages(prune, k) if prune else None
    cfg = ldm.record["config"]
    training = (cfg["p_mean"], cfg["p_std"])
    given = parse_sigma(sigma, training)
    dataset, ae, cache = ldm.data(progress)
    if log:
        log(
            (
                f"diffusion classify: {len(test)} held-out images of {dataset.name}, "
                f"{draws} draws x {len(ldm.class_names)} classes each, "
            )
            + (
                f"ln sigma ~ N({given[0]:g}, {given[1]:g}^2)"
                if given != "auto"
                else "noise levels chosen on the other folds of the images (--sigma auto)"
            )
        )

    test_part = f"{ldm.record['split']['name']}-test"
    x_test, test, raw_test = ldm.encode(dataset, test, "test", ae, cache)
    y_test = dataset.labels[test]
    t0 = time.perf_counter()
    net = (
        torch.compile(ldm.denoiser, mode="reduce-overhead", dynamic=False)
        if compile and ldm.device.type == "cuda"
        else ldm.denoiser
    )
    full = classify_held_out(
        net, x_test, y_test, draws, sigma, training, seed, batch_size, drift=ldm.drift
    )  # noised as in training
    seconds = time.perf_counter() - t0
    temperature = full["temperature"]
    vote = f"vote ({draws} draws)"
    probs = {
        "mean error": error_probabilities(full["mean_errors"], temperature),
        vote: vote_probabilities(full["votes"], full["draws_used"], full["draw_errors"]),
    }
    evaluations = {"mean error": draws * k, vote: draws * k}
    predicted_vote, predicted_error = probs[vote].argmax(1), full["mean_errors"].argmin(1)
    stopped = {}  # name -> the class it returns per image
    budget = f", at most {max_draws} draws" if max_draws < draws else ""
    for rule, name in (
        ("decided", "vote, stopped when decided"),
        ("sequential", f"vote, sequential test (alpha {alpha:g}{budget})"),
        ("paired", f"mean error, paired sequential test (alpha {alpha:g}{budget})"),
    ):
        votes, used, mean_used = replay_early_stop(
            full["draw_errors"], rule, alpha, min_draws, max_draws if rule != "decided" else None
        )
        if rule == "paired":  # a mean-error decision: scored by the mean errors of the draws it used
            probs[name], stopped[name] = error_probabilities(mean_used, temperature), mean_used.argmin(1)
        else:
            probs[name] = vote_probabilities(votes, used, full["draw_errors"])
            stopped[name] = probs[name].argmax(1)  # the vote's leader, a tie to the class of more evidence
        evaluations[name] = float(used.mean() * k)
    if stages is not None:
        pruned = classify_pruned(
            net,
            x_test,
            stages,
            seed=seed,
            batch_size=batch_size,
            p_mean=full["sigma"][:, 0],
            p_std=full["sigma"][:, 1],
            drift=ldm.drift,
        )
        name = f"mean error, pruned ({prune})"
        probs[name], evaluations[name] = (
            pruned_probabilities(pruned["mean_errors"], pruned["prediction"], temperature),
            pruned["evaluations_per_image"],
        )
    discriminative = {}
    for folder in classifiers:
        clf, inputs = _discriminative(folder, ldm, dataset, cache, ae, test, test_part, raw_test, device)
        name = f"{clf.space} classifier {Path(folder).name}"
        probs[name] = discriminative[name] = clf.predict_proba(clf.input_scaler.transform(inputs))
        evaluations[name] = 1.0
    tests = RunTests.build(["held-out"], [y_test], [0], dataset.task, bootstrap, seed=seed)
    scores = {name: RunScores.of(dataset.task, tests, [p]) for name, p in probs.items()}
    full_vote = scores[vote]
    results = {
        "kind": "medlatent.diffusion_classifier",
        "model": str(model),
        "dataset": dataset.describe(),
        "class_names": ldm.class_names,
        "test_images": len(test),
        "draws": draws,
        "seed": seed,
        "alpha": alpha,
        "min_draws": min_draws,
        "max_draws": max_draws,
        "sigma": _sigma_record(sigma, full),
        "temperature": sorted(set(temperature.tolist())),
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
                "difference_to_full_vote": gap_summary(scores[name], full_vote, "bootstrap"),
                "evaluation_share": evaluations[name] / (draws * k),
                "same_class_as_full_vote": float((predicted == predicted_vote).mean()),
            }
            for name, predicted in stopped.items()
        },
        "temperature_fitted_on": (
            "the other folds of the test images (5-fold cross-fitting; "
            "not the validation images, which the model learnt from)"
        ),
        "seconds": {"test draws": seconds, "total": time.perf_counter() - started},
        "images_per_second": len(test) / seconds,
        "compiled": net is not ldm.denoiser,
        "device": str(ldm.device),
    }
    spread = vote_uncertainty(full["votes"])
    confidences = {  # per decision rule, the confidence that ranks its images for selective prediction
        f"{vote}: vote margin": (predicted_vote, spread["vote_margin"]),
        f"{vote}: 1 - vote entropy": (predicted_vote, 1 - spread["vote_entropy"] / np.log(k)),
        "mean error: error gap": (predicted_error, error_gap(full["mean_errors"])),
        "mean error: max probability": (predicted_error, probs["mean error"].max(1)),
        **{f"{name}: max softmax": (p.argmax(1), p.max(1)) for name, p in discriminative.items()},
    }
    results["uncertainty"] = {
        name: {**risk_coverage(pred == y_test, conf), "error_rate": float((pred != y_test).mean())}
        for name, (pred, conf) in confidences.items()
    }
    results["provenance"] = provenance(config=asdict(config), device=ldm.device)
    mark(out, "diffusion classify")
    if explain:
        predicted = torch.from_numpy(predicted_error)
        runner_up = torch.from_numpy(np.argsort(full["mean_errors"], 1, kind="stable")[:, 1])
        results["explanations"] = _explain(
            ldm,
            ae,
            dataset,
            x_test,
            test,
            y_test,
            predicted,
            runner_up,
            explain,
            explain_sigma,
            explain_draws,
            seed,
            Path(out),
        )
    finish_run(out, "diffusion classify", results, config)
    return results


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

    clf = DeepClassifier.from_pretrained(folder, device=device)
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


def _explain(
    ldm,
    ae,
    dataset,
    x_test,
    test,
    y_test,
    predicted,
    runner_up,
    per_class: int,
    sigma: float,
    draws: int,
    seed: int,
    out: Path,
) -> dict:
    """Maps for the first `per_class` held-out images of each class: PNG overlays, and where the
    dataset knows its lesions, how often each map's peak falls on the lesion."""
    from ..diffusion.explain import explanation_maps, peak_in_lesion, saliency
    from ..io import atomic_write
    from ..reports.plots import explanation_figure, to_hwc

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
        seed=seed,
    )
    folder = out / "explanations"
    folder.mkdir(parents=True, exist_ok=True)
    images = dataset.load(test[chosen])
    lesions = dataset.lesions
    heat = {name: saliency(maps[name]).numpy() for name in ("class_difference", "counterfactual_difference")}
    files = []
    for j, i in enumerate(chosen):
        names = ldm.class_names
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
    if lesions is not None:
        has = ~np.isnan(lesions["radius"][test[chosen]])
        if has.any():
            centers, radii = lesions["center"][test[chosen]][has], lesions["radius"][test[chosen]][has]
            record["peak_on_lesion"] = {
                name: {
                    "rate": float(hits.mean()),
                    "of": int(has.sum()),
                    "ci95": wilson_interval(int(hits.sum()), int(has.sum())),
                }
                for name in ("class_difference", "counterfactual_difference")
                for hits in [peak_in_lesion(maps[name][torch.from_numpy(has)], centers, radii)]
            }
            record["peak_on_lesion_rule"] = (
                "the smoothed map's strongest pixel lies within two lesion radii of the lesion's centre"
            )
    return record
