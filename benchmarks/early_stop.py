"""The diffusion classifier's early stops against the full 51-draw vote, over several noise seeds.

One `diffusion classify` run is one draw of the noise: whether an early stop stays within the
tolerance of the full vote, and what share of its network evaluations it needs, varies from seed
to seed. For each seed this draws the full run on the model's held-out images (the temperature
cross-fitted on them, as `diffusion classify` does) and shorter runs of the same images at the
other noise-level distributions a stop may draw at (`--candidates`, by default those of
`diffusion classify --tolerance`); then it replays from the same draws

- each fixed early stop at its defaults (alpha 0.01, 5 draws before a test may stop, a budget of
  a fifth of the draws), and
- the stop chosen for `--tolerance` on the other folds of the images (`stopping.cross_fit_stop`),
  once from the run's own distribution only and once from the distribution whose draws rank the
  images best on the other folds,

and prints each one's loss against the full vote on the images it was applied to (the full vote's
AUROC or balanced accuracy minus its own) and its share of the full vote's evaluations, per seed
and as the mean and the worst over the seeds.

Beside them it prints the in-sample limit: of every candidate stop at every distribution, the
lowest loss on all the images among those within `--share` of the full vote's evaluations, and
the cheapest stop whose loss there is within the tolerance. Chosen on the very images it is
scored on, out of hundreds, it is optimistic: no rule that chooses on other images can be
expected to do better. Where even the lowest loss within `--share` misses the tolerance, the draws
themselves (the denoiser and the noise levels) are what falls short; where the cheapest stop within
the tolerance costs far less than the chosen stops, the images each stop is chosen on are too few
to tell it apart. Each fold's record also has the loss of its stop on the images it was applied
to (`applied_loss`) and on all the images (`loss_on_all_images`).

    python benchmarks/early_stop.py --model models/ldm --seed 0 --seed 1 --seed 2 --keep-draws draws --json out.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from medlatent.diffusion.classify import (
    ALPHA,
    MIN_DRAWS,
    STOP_CANDIDATE_DRAWS,
    STOP_SIGMA_CANDIDATES,
    classify,
    default_budget,
    error_probabilities,
    held_out_candidates,
    held_out_result,
    replay_early_stop,
    vote_probabilities,
)
from medlatent.diffusion.stopping import cross_fit_stop, full_vote, in_sample_limit, stopped
from medlatent.evaluation.metrics import score
from medlatent.io import atomic_write, atomic_write_json, savez
from medlatent.pipelines.latent_diffusion import LatentDiffusion
from medlatent.reports.provenance import provenance

METRICS = ("auroc", "balanced_accuracy")


def losses(task: str, y: np.ndarray, reference: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """metric(full vote) - metric(probs) for each metric."""
    full, own = score(task, y, reference), score(task, y, probs)
    return {m: float(full[m] - own[m]) for m in METRICS}


def fixed_stops(full: dict, draws: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The fixed early stops at their defaults (and uncapped), replayed: probabilities and draws used."""
    e, t, budget = full["draw_errors"], full["temperature"], default_budget(draws, MIN_DRAWS)
    out = {}
    for rule, cap in (("sequential", budget), ("paired", budget), ("sequential", None), ("paired", None)):
        votes, used, mean_used = replay_early_stop(e, rule, ALPHA, MIN_DRAWS, cap)
        p = error_probabilities(mean_used, t) if rule == "paired" else vote_probabilities(votes, used, e)
        out[f"{rule}, at most {cap or draws} draws"] = (p, used)
    return out


def draws(ldm, x, y, seed: int, args) -> tuple[dict, dict]:
    """The full run (`classify_held_out`: with `--sigma auto` each image's distribution chosen on
    the other folds) and the alternatives a stop may draw at, as `diffusion classify --tolerance`
    has them: every distribution drawn in full and each candidate's shorter run, for one noise
    seed. With `--keep-draws FOLDER`, each distribution's draws are stored there by name and read
    back on a rerun (replaying the rules again costs no network evaluation); a distribution not
    stored yet, or stored with another number of draws, is drawn."""
    path = Path(args.keep_draws) / f"draws-seed{seed}.npz" if args.keep_draws else None
    stored = dict(np.load(path)) if path is not None and path.is_file() else {}
    drawn = []
    cfg = ldm.record["config"]
    full_runs = held_out_candidates(args.sigma, (float(cfg["p_mean"]), float(cfg["p_std"])))
    short = min(args.candidate_draws, args.draws)

    def run(kind: str, sigma: tuple[float, float], count: int) -> np.ndarray:
        key = f"{kind}/{sigma[0]:g},{sigma[1]:g}"
        if key not in stored or stored[key].shape[1] != count:
            stored[key] = classify(
                ldm.denoiser, x, count, stop="none", seed=seed, p_mean=sigma[0], p_std=sigma[1], drift=ldm.drift
            )["draw_errors"]
            drawn.append(key)
        return stored[key]

    runs = {sigma: run("run", sigma, args.draws) for sigma in full_runs}
    extra = {c: run("candidate", c, short) for c in args.candidates if c not in runs}
    if path is not None and drawn:
        atomic_write(path, lambda tmp: savez(tmp, stored))
    full = held_out_result(runs, extra, y, seed)
    return full, full["candidate_draw_errors"] if len(full["candidate_draw_errors"]) > 1 else {}


def one_seed(ldm, x, y, task: str, seed: int, args) -> dict:
    """Every rule's loss against the full vote and its share of the evaluations, for one noise seed."""
    full, alternatives = draws(ldm, x, y, seed, args)
    reference = vote_probabilities(full["votes"], full["draws_used"], full["draw_errors"])
    rules = fixed_stops(full, args.draws)
    chosen = {}
    for name, alt in (("own distribution", None), ("noise levels that rank best", alternatives or None)):
        if name != "own distribution" and not alternatives:
            continue
        fit = cross_fit_stop(full["draw_errors"], y, args.tolerance, args.metric, task, seed, alternatives=alt)
        key = f"chosen for {args.tolerance:g}, {name}"
        rules[key], chosen[key] = (
            (fit["probs"], fit["draws_used"]),
            fold_losses(fit, full, alternatives, y, task, args),
        )
    row = {"seed": seed, "full_vote": score(task, y, reference)[args.metric], "rules": {}, "chosen": chosen}
    for name, (p, used) in rules.items():
        row["rules"][name] = {"evaluation_share": float(used.mean() / args.draws), **losses(task, y, reference, p)}
    row["in_sample_limit"] = in_sample_limit(
        full["draw_errors"], y, args.tolerance, args.metric, task, alternatives, args.share
    )
    return row


def fold_losses(fit: dict, full: dict, alternatives: dict, y: np.ndarray, task: str, args) -> list[dict]:
    """Each fold's record of `cross_fit_stop` with its stop's loss against the full vote on the images it
    was applied to (`applied_loss`) and on all the images (`loss_on_all_images`)."""
    reference = full_vote(full["draw_errors"])

    def loss(rows: np.ndarray, probs: np.ndarray) -> float:
        return float(score(task, y[rows], reference[rows])[args.metric] - score(task, y[rows], probs)[args.metric])

    records = []
    for f, (record, stop) in enumerate(zip(fit["folds"], fit["stops"], strict=True)):
        apply = fit["fold"] == f
        errors = full["draw_errors"] if stop.sigma is None else alternatives[stop.sigma]
        records.append(
            {
                **record,
                "applied_loss": loss(apply, fit["probs"][apply]),
                "loss_on_all_images": loss(np.ones(len(y), dtype=bool), stopped(errors, stop)[0]),
            }
        )
    return records


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a model saved by `medlatent diffusion train`")
    parser.add_argument("--sigma", default="train", help="train, auto or MEAN,STD of ln sigma: the full run's draws")
    parser.add_argument("--seed", type=int, action="append", help="noise seeds (repeatable; default 0 1 2)")
    parser.add_argument("--draws", type=int, default=51)
    parser.add_argument("--tolerance", type=float, default=0.01)
    parser.add_argument("--metric", default="auroc", choices=METRICS)
    parser.add_argument(
        "--candidates",
        action="append",
        default=[],
        help="MEAN,STD of ln sigma: another distribution the chosen stop may draw at (repeatable; default: "
        "the product's, `STOP_SIGMA_CANDIDATES`)",
    )
    parser.add_argument(
        "--candidate-draws",
        type=int,
        default=STOP_CANDIDATE_DRAWS,
        help="draws of each candidate (the largest budget a stop there has)",
    )
    parser.add_argument(
        "--share", type=float, default=0.1, help="the in-sample limit's share of the full vote's evaluations"
    )
    parser.add_argument("--keep-draws", help="a folder to keep each seed's draws in (a rerun replays them)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="write every seed's figures here")
    args = parser.parse_args(argv)
    args.candidates = [tuple(float(v) for v in c.split(",")) for c in args.candidates] or list(STOP_SIGMA_CANDIDATES)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    ldm = LatentDiffusion(args.model, device=args.device)
    dataset, ae, cache = ldm.data(False)
    x, test, _ = ldm.encode(dataset, ldm.held_out, "test", ae, cache)
    y = dataset.labels[test]
    rows = []
    for seed in args.seed or [0, 1, 2]:
        row = one_seed(ldm, x, y, dataset.task, seed, args)
        rows.append(row)
        print(f"seed {seed}: full vote {args.metric} {row['full_vote']:.3f} on {len(y)} images", flush=True)
        for name, r in row["rules"].items():
            print(
                f"  {name:50s} share {r['evaluation_share']:.3f}  loss: AUROC {r['auroc']:+.3f}  "
                f"balanced accuracy {r['balanced_accuracy']:+.3f}",
                flush=True,
            )
        limit = row["in_sample_limit"]
        best, cheapest = limit["lowest_loss_within_share"], limit["cheapest_within_tolerance"]
        if best:
            share = f"{args.share:.0%}"
            print(f"  in-sample limit: within {share} of the evaluations, loss {best['loss']:+.3f} ({best['stop']})")
        if cheapest:
            print(
                f"  in-sample limit: within the tolerance, share {cheapest['evaluation_share']:.3f} "
                f"({cheapest['stop']})",
                flush=True,
            )
    print(f"over {len(rows)} seeds: mean (worst)")
    for name in rows[0]["rules"]:
        share, auroc, ba = (np.array([r["rules"][name][key] for r in rows]) for key in ("evaluation_share", *METRICS))
        print(
            f"  {name:50s} share {share.mean():.3f} ({share.max():.3f})  loss: AUROC {auroc.mean():+.3f} "
            f"({auroc.max():+.3f})  balanced accuracy {ba.mean():+.3f} ({ba.max():+.3f})"
        )
    limits = [r["in_sample_limit"] for r in rows]
    if all(limit["cheapest_within_tolerance"] for limit in limits):
        cheapest = np.array([limit["cheapest_within_tolerance"]["evaluation_share"] for limit in limits])
        name = "in-sample limit: cheapest within the tolerance"
        print(f"  {name:50s} share {cheapest.mean():.3f} ({cheapest.max():.3f})")
    if all(limit["lowest_loss_within_share"] for limit in limits):
        lowest = np.array([limit["lowest_loss_within_share"]["loss"] for limit in limits])
        name = f"in-sample limit: lowest loss within {args.share:.0%}"
        print(f"  {name:50s} loss: {args.metric} {lowest.mean():+.3f} ({lowest.max():+.3f})")
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k not in ("json", "model", "keep_draws")}
        atomic_write_json(
            args.json,
            {
                "model": args.model,
                "images": len(y),
                **settings,
                "seeds": rows,
                "provenance": provenance(settings, torch.device(args.device)),
            },
        )


if __name__ == "__main__":
    main()
