"""The diffusion classifier on a model's held-out split (`medlatent diffusion classify`).

The test images are those the latent diffusion model never saw (its saved split). Every image
gets `draws` draws (`diffusion.classify`); from the same draws come three classifiers: the lowest
mean error (probabilities: a softmax of the negative mean errors, its temperature fitted on the
validation images), the majority vote over all draws (vote shares), and two early-stopped votes
(each image stops once its leader cannot be overtaken, or once a sequential binomial test decides
at level alpha; replayed from the same draws, so their network evaluations are counted exactly). Scores as in the gap audit: AUROC, balanced accuracy
and MCC with bootstrap 95% intervals, and the early-stopped vote's paired difference to the full vote.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ..cache import LatentCache
from ..config import DataConfig
from ..data import load_dataset
from ..diffusion.classify import classify, error_probabilities, fit_temperature, replay_early_stop
from ..diffusion.pipeline import LatentDiffusion
from ..errors import MedlatentInputError
from ..evaluation.aggregate import RunScores, RunTests, gap_summary
from ..evaluation.uncertainty import error_gap, risk_coverage, vote_uncertainty
from ..io import atomic_write_json


def run_diffusion_classifier(
    model: str | Path, out: str | Path, draws: int = 51, seed: int = 0, device: str = "auto", batch_size: int = 256, bootstrap: int = 1000, alpha: float = 0.01,
    min_draws: int = 5, progress: bool = True, log=None,
) -> dict:  # fmt: skip
    if draws < 1:
        raise MedlatentInputError(f"--draws {draws}: use 1 or more")
    if not 0 < alpha < 0.5:
        raise MedlatentInputError(f"--alpha {alpha}: use a level in (0, 0.5), e.g. 0.01")
    if not 1 <= min_draws <= draws:
        raise MedlatentInputError(f"--min-draws {min_draws}: use 1 to --draws ({draws})")
    started = time.perf_counter()
    ldm = LatentDiffusion(model, device=device)
    if ldm.denoiser.multilabel:
        raise MedlatentInputError(f"--model {model}: the diffusion classifier is built for single-label models")
    data = DataConfig(**ldm.record["data"])
    dataset = load_dataset(data.dataset, data.size, **data.csv_options())
    from safetensors.torch import load_file

    split = load_file(Path(model) / "split.safetensors")
    test, val = split["test"].numpy(), split["val"].numpy()
    if not len(test):
        raise MedlatentInputError(f"--model {model}: its held-out split has no test images")
    from ..autoencoders import load_autoencoder

    ae = load_autoencoder(ldm.record["autoencoder"], device=device, progress=progress)
    if ae.content_hash != ldm.record["autoencoder_hash"]:
        raise MedlatentInputError(f"{ldm.record['autoencoder']}: its weights differ from those the model was trained on")
    if log:
        log(f"diffusion classify: {len(test)} held-out images of {dataset.name}, {draws} draws x {len(ldm.class_names)} classes each (temperature from {len(val)} validation images)")
    cache = LatentCache(data.cache_dir, progress=progress)

    def normalised(indices: np.ndarray, part: str) -> tuple[torch.Tensor, np.ndarray]:
        stored = cache.encode(dataset, part, indices, ae, ldm.device, reconstruct=False).read(("latents", "indices"))
        z = (stored["latents"] - ldm.mean) / ldm.std * ldm.denoiser.sigma_data
        return z, dataset.labels[stored["indices"].numpy()]

    x_test, y_test = normalised(test, f"{ldm.record['split']['name']}-test")
    x_val, y_val = normalised(val, f"{ldm.record['split']['name']}-val")
    cfg = ldm.record["config"]
    options = dict(seed=seed, batch_size=batch_size, p_mean=cfg["p_mean"], p_std=cfg["p_std"])
    t0 = time.perf_counter()
    full = classify(ldm.denoiser, x_test, draws, stop="none", **options)
    seconds = time.perf_counter() - t0
    temperature = fit_temperature(classify(ldm.denoiser, x_val, draws, stop="none", **options)["mean_errors"], y_val) if len(val) else 1.0
    k = len(ldm.class_names)
    probs = {"mean error": error_probabilities(full["mean_errors"], temperature), f"vote ({draws} draws)": full["votes"] / full["draws_used"][:, None]}
    evaluations = {"mean error": draws * k, f"vote ({draws} draws)": draws * k}
    stopped_votes = {}
    for rule, name in (("decided", "vote, stopped when decided"), ("sequential", f"vote, sequential test (alpha {alpha:g})")):
        votes, used = replay_early_stop(full["draw_errors"], rule, alpha, min_draws)
        probs[name], evaluations[name], stopped_votes[name] = votes / used[:, None], float(used.mean() * k), votes
    tests = RunTests.build(["held-out"], [y_test], [0], dataset.task, bootstrap, seed=seed)
    scores = {name: RunScores.of(dataset.task, tests, [p]) for name, p in probs.items()}
    full_vote = scores[f"vote ({draws} draws)"]
    results = {
        "kind": "medlatent.diffusion_classifier", "model": str(model), "dataset": dataset.describe(), "class_names": ldm.class_names,
        "test_images": len(test), "draws": draws, "seed": seed, "alpha": alpha, "min_draws": min_draws, "temperature": temperature,
        "classifiers": {name: {"scores": s.summary("bootstrap"), "evaluations_per_image": evaluations[name]} for name, s in scores.items()},
        "early_stopping": {
            name: {
                "difference_to_full_vote": gap_summary(scores[name], full_vote, "bootstrap"), "evaluation_share": evaluations[name] / (draws * k),
                "same_class_as_full_vote": float((votes.argmax(1) == full["votes"].argmax(1)).mean()),
            }
            for name, votes in stopped_votes.items()
        },
        "temperature_fitted_on": "the validation images (the model was trained on them)",
        "seconds": {"test draws": seconds, "total": time.perf_counter() - started}, "images_per_second": len(test) / seconds,
    }  # fmt: skip
    predicted_vote, predicted_error = full["votes"].argmax(1), full["mean_errors"].argmin(1)
    spread = vote_uncertainty(full["votes"])
    confidences = {  # per decision rule, the confidence that ranks its images for selective prediction
        f"vote ({draws} draws): vote margin": (predicted_vote, spread["vote_margin"]),
        f"vote ({draws} draws): 1 - vote entropy": (predicted_vote, 1 - spread["vote_entropy"] / np.log(k)),
        "mean error: error gap": (predicted_error, error_gap(full["mean_errors"])),
        "mean error: max probability": (predicted_error, probs["mean error"].max(1)),
    }
    results["uncertainty"] = {name: {**risk_coverage(pred == y_test, conf), "error_rate": float((pred != y_test).mean())} for name, (pred, conf) in confidences.items()}
    atomic_write_json(Path(out) / "results.json", results)
    return results
