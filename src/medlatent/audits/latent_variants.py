"""The gap audit's mapped latent variants and its accuracy against throughput.

"whitened" and "decoder-prefix:STAGE" (`classifiers.latent_maps`) are latent classifiers that read
the latents through a fixed map, each trained per run like the plain latent classifier (the same
protocol, split and seed), beside the noise-conditioned and distilled variants:

- whitened: the ZCA whitening of the channels, fitted on each run's training latents alone;
- decoder-prefix:STAGE: the classifier of the features after that decoder stage, the same
  classifier as `--decoder-stages` trains for the stage (stored under the same name, so either
  reuses the other's), or the plain latent classifier at stage 0;
- decoder-prefix:auto: a classifier per decoder stage, and per run the one `choose_prefix_stage`
  picks on the run's validation images against the reconstruction classifier.

Every deep classifier stores its measured inference throughput from what it is given (images for
the image classifier, latents for the others, the decoder included where it reads decoded
features); `accuracy_throughput` puts them against their scores and marks the Pareto front.
"""

from __future__ import annotations

import numpy as np
import torch

from ..classifiers.latent_maps import (
    AUTO,
    ChannelWhitening,
    DecoderPrefix,
    ReconstructionMap,
    choose_prefix_stage,
    prefix_stage,
    validation_score,
)
from ..config import DECODER_PREFIX, WHITENED
from ..data.spaces import SpaceData
from ..data.stages import prefix_space, stage_space, stored_latents

OPTION = "--latent-variants"


def is_mapped(variant: str) -> bool:
    """Whether a latent variant reads the latents through a map (whitened, decoder-prefix:STAGE)."""
    return variant == WHITENED or variant.startswith(f"{DECODER_PREFIX}:")


def stage_of(space: str) -> str:
    return space.removeprefix("decoder:")


def space_of(ae, stage: str) -> str:
    """The space of a decoder stage's features: "latent" at stage 0, else "decoder:<stage>"."""
    return "latent" if ae.stage_index(stage) == 0 else stage_space(stage)


def prefix_stages(ae, variants: list[str]) -> list[str]:
    """The decoder stages the decoder-prefix variants read, in decoder order (every stage for auto)."""
    stages = set()
    for variant in variants:
        if variant.startswith(f"{DECODER_PREFIX}:"):
            stage = prefix_stage(ae, variant, OPTION)
            stages |= set(ae.decoder_stages()) if stage == AUTO else {stage}
    return [stage for stage in ae.decoder_stages() if stage in stages]


def variant_fits(variants: list[str], ae, audited: list[str]) -> int:
    """How many classifiers the latent variants add to one run of `ae`, beside its spaces and the
    intermediate decoder stages `audited` (which the decoder-prefix variants reuse)."""
    reused = {"latent", *(stage_space(s) for s in audited[1:-1])}
    fresh = [stage for stage in prefix_stages(ae, variants) if space_of(ae, stage) not in reused]
    return sum(not v.startswith(f"{DECODER_PREFIX}:") for v in variants) + len(fresh)


def input_map(entry: dict, space: str):
    """What a classifier of `space` of this autoencoder is given, and the map to its inputs, for its
    inference throughput: latents for every space but the image (a decoder-stage or reconstruction
    classifier decodes them first)."""
    ae, latents = entry["model"], entry["spaces"]["latent"]
    if space == "reconstruction":
        return latents, ReconstructionMap(ae, *entry["image_shape"])
    if space.startswith("decoder:"):
        return latents, DecoderPrefix(ae, stage_of(space))
    return latents, None


def prefix_flops(entry: dict, stage: str) -> int:
    """FLOPs of the decoder up to `stage` for one latent (`Autoencoder.stage_flops`), computed once."""
    known = entry.setdefault("prefix_flops", {})
    if stage not in known:
        known[stage] = entry["model"].stage_flops(tuple(entry["latent_shape"]), stage)
    return known[stage]


def whitened_space(latents: SpaceData, split) -> tuple[SpaceData, ChannelWhitening]:
    """The latents whitened by a `ChannelWhitening` fitted on the split's training latents alone, and the map."""
    stored, index_of = stored_latents(latents)
    whitening = ChannelWhitening(stored.shape[1]).fit(latents.take(split.train))
    with torch.no_grad():
        return SpaceData(torch.cat([whitening(b.float()) for b in stored.split(4096)]), index_of), whitening


def fit_mapped_variant(fit, variant: str, entry: dict, run: dict, split, seed: int, **how) -> dict:
    """One run's record of a mapped latent variant. `fit` trains (or reads back) one classifier as
    the audit does; `run` maps this run's spaces (and decoder stages) to their deep classifiers'
    records, reused where the variant's classifier is one of them and extended by the ones it adds.
    how: `gathered` (read back what another process trained), `device`, `margin` (of auto)."""
    ae, latents = entry["model"], entry["spaces"]["latent"]
    ae_tag, gathered = entry["autoencoder"]["content_hash"][7:19], how["gathered"]
    if variant == WHITENED:
        whitened, whitening = whitened_space(latents, split)
        tag = f"latent-{WHITENED}-{ae_tag}"
        return fit(tag, "latent", whitened, "deep", split, seed, WHITENED, gathered=gathered, raw=(latents, whitening))

    def record_of(stage: str) -> dict:
        space = space_of(ae, stage)
        if space not in run:  # the classifier --decoder-stages trains for the stage: the same file
            cached = entry.setdefault("prefix_spaces", {})
            if stage not in cached:
                cached[stage] = prefix_space(ae, stage, latents, how["device"])
            tag = f"{space.replace(':', '-')}-{ae_tag}"
            run[space] = fit(
                tag, space, cached[stage], "deep", split, seed, gathered=gathered, raw=input_map(entry, space)
            )
        return run[space]

    records = {stage: record_of(stage) for stage in prefix_stages(ae, [variant])}
    if prefix_stage(ae, variant, OPTION) != AUTO:
        return next(iter(records.values()))
    candidates = [
        {
            "stage": stage,
            "index": ae.stage_index(stage),
            "prefix_flops": prefix_flops(entry, stage),
            "validation": validation_score(record),
        }
        for stage, record in records.items()
    ]
    choice = choose_prefix_stage(candidates, validation_score(run["reconstruction"]), how["margin"])
    return {**records[choice["stage"]], "prefix_choice": choice}  # the chosen classifier's arrays: counted once


def mapped_variant_summary(variant: str, records: list[dict], entry: dict, runs: list[str]) -> dict:
    """What a mapped variant's row adds to the noise-conditioned ones' (scores, share of the gap
    closed, classifier): its throughput (measured inference samples/s from latents, map and
    classifier, mean over runs; the decoder prefix FLOPs per latent) and what its map was (the
    whitening, or the decoder stage of each run with auto's choice and reason)."""
    speeds = [float(r.get("inference_samples_per_second", np.nan)) for r in records]
    if variant == WHITENED:
        flops, about = [0] * len(records), {"whitening": {"method": "zca", "fitted_on": "each run's training latents"}}
    else:
        given = prefix_stage(entry["model"], variant, OPTION)
        stages = [r["prefix_choice"]["stage"] if given == AUTO else given for r in records]
        flops = [prefix_flops(entry, stage) for stage in stages]
        about = {
            "decoder_prefix": {
                "stage": given,
                "stages": stages,
                "indices": [entry["model"].stage_index(stage) for stage in stages],
                "choices": [{"run": name, **r["prefix_choice"]} for name, r in zip(runs, records, strict=True)]
                if given == AUTO
                else None,
            }
        }
    throughput = {
        "inference_samples_per_second": mean_speed(records),
        "per_run_samples_per_second": [v if np.isfinite(v) else None for v in speeds],
        "prefix_flops": float(np.mean(flops)),
        "per_run_prefix_flops": flops,
    }
    return {"throughput": throughput, **about}


def mean_speed(records: list[dict]) -> float | None:
    """Mean measured inference samples/s over runs (None where none was measured: an older run)."""
    speeds = [float(r.get("inference_samples_per_second", np.nan)) for r in records]
    finite = [v for v in speeds if np.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def pareto_front(points: list[dict], metric: str) -> list[bool]:
    """Whether each point is on the front: no other point scores at least as well and runs at least
    as fast, and better in one (points without a measured throughput or score are never on it)."""

    def usable(p: dict) -> bool:
        return p["samples_per_second"] is not None and np.isfinite(p[metric]["value"])

    on = []
    for p in points:
        dominated = any(
            usable(q)
            and q[metric]["value"] >= p[metric]["value"]
            and q["samples_per_second"] >= p["samples_per_second"]
            and (q[metric]["value"] > p[metric]["value"] or q["samples_per_second"] > p["samples_per_second"])
            for q in points
            if q is not p
        )
        on.append(usable(p) and not dominated)
    return on


def accuracy_throughput(row: dict, entry: dict, records: dict, metric: str = "auroc") -> dict:
    """The deep row's classifiers as points of score against measured inference throughput: the
    image classifier (from images), the reconstruction classifier (decoder + classifier), the plain
    latent classifier, every latent variant and every intermediate decoder stage (from latents),
    each with its decoder prefix FLOPs per input; and which lie on the Pareto front.
    `records`: each classifier's per-run records, keyed by space or variant."""
    scores = row["scores"]
    shown = [("image", "image", scores["image"], "images", None)]
    if "reconstruction" in scores:
        last = entry["model"].decoder_stages()[-1]
        flops = prefix_flops(entry, last)
        shown.append(
            ("reconstruction (decoder + classifier)", "reconstruction", scores["reconstruction"], "latents", flops)
        )
    shown.append(("latent", "latent", scores["latent"], "latents", 0))
    for name, v in (row.get("variants") or {}).items():
        shown.append(
            (f"latent ({name})", name, v["scores"], "latents", (v.get("throughput") or {}).get("prefix_flops", 0))
        )
    for stage in (row.get("decoder_stages") or {}).get("stages", [])[1:-1]:
        shown.append((stage["space"], stage["space"], stage["scores"], "latents", stage["prefix_flops"]))
    points = [
        {
            "classifier": label,
            "input": given,
            metric: values[metric],
            "samples_per_second": mean_speed(records[key]),
            "prefix_flops": flops,
        }
        for label, key, values, given, flops in shown
    ]
    for point, on in zip(points, pareto_front(points, metric), strict=True):
        point["pareto"] = on
    return {"autoencoder": row["autoencoder_name"], "metric": metric, "points": points}
