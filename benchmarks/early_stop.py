"""The diffusion classifier's early stops against the full 51-draw vote, over several noise seeds.

One `diffusion classify` run is one draw of the noise: whether an early stop stays within 0.01
AUROC and balanced accuracy of the full vote, and what share of its network evaluations it needs,
varies from seed to seed on a few hundred test images. This draws the full run for each seed on the
model's held-out images (the temperature cross-fitted on them, as `diffusion classify` does), replays
each early stop at its defaults (alpha 0.01, 5 draws before a test may stop, a budget of a fifth of
the draws) from the same draws, and prints each seed's and the mean and worst differences.

    python benchmarks/early_stop.py --model models/ldm --sigma 1.8,0.6 --seed 0 --seed 1 --seed 2 --json out.json
"""

from __future__ import annotations

import argparse

import numpy as np
from safetensors.torch import load_file
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from medlatent.diffusion.classify import (
    ALPHA,
    MIN_DRAWS,
    classify_held_out,
    default_budget,
    error_probabilities,
    replay_early_stop,
    vote_probabilities,
)
from medlatent.io import atomic_write_json
from medlatent.pipelines.latent_diffusion import LatentDiffusion


def score(y: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    """AUROC (binary: of class 1; else one-vs-rest macro) and balanced accuracy of probabilities p."""
    auroc = roc_auc_score(y, p[:, 1]) if p.shape[1] == 2 else roc_auc_score(y, p, multi_class="ovr")
    return float(auroc), float(balanced_accuracy_score(y, p.argmax(1)))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a model saved by `medlatent diffusion train`")
    parser.add_argument(
        "--sigma", default="train", help="train, auto or MEAN,STD of ln sigma, as in `diffusion classify`"
    )
    parser.add_argument("--seed", type=int, action="append", help="noise seeds (repeatable; default 0 1 2)")
    parser.add_argument("--draws", type=int, default=51)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="write every seed's figures here")
    args = parser.parse_args(argv)
    ldm = LatentDiffusion(args.model, device=args.device)
    dataset, ae, cache = ldm.data(False)
    x, test, _ = ldm.encode(dataset, load_file(f"{args.model}/split.safetensors")["test"].numpy(), "test", ae, cache)
    y = dataset.labels[test]
    cfg = ldm.record["config"]
    budget = default_budget(args.draws, MIN_DRAWS)
    rows = []
    for seed in args.seed or [0, 1, 2]:
        full = classify_held_out(
            ldm.denoiser, x, y, args.draws, args.sigma, (cfg["p_mean"], cfg["p_std"]), seed, drift=ldm.drift
        )
        e, t = full["draw_errors"], full["temperature"]
        vote = score(y, vote_probabilities(full["votes"], full["draws_used"], e))
        row = {
            "seed": seed,
            "full vote": dict(zip(("auroc", "balanced_accuracy"), vote, strict=False)),
            "mean error": dict(
                zip(
                    ("auroc", "balanced_accuracy"), score(y, error_probabilities(full["mean_errors"], t)), strict=False
                )
            ),
            "early_stops": {},
        }
        for rule, cap in (("sequential", budget), ("paired", budget), ("sequential", None), ("paired", None)):
            votes, used, mean_used = replay_early_stop(e, rule, ALPHA, MIN_DRAWS, cap)
            p = error_probabilities(mean_used, t) if rule == "paired" else vote_probabilities(votes, used, e)
            auroc, ba = score(y, p)
            row["early_stops"][f"{rule}, at most {cap or args.draws} draws"] = {
                "evaluation_share": float(used.mean() / args.draws),
                "auroc_difference": auroc - vote[0],
                "balanced_accuracy_difference": ba - vote[1],
            }
        rows.append(row)
        print(f"seed {seed}: full vote AUROC {vote[0]:.3f}, balanced accuracy {vote[1]:.3f}", flush=True)
        for name, r in row["early_stops"].items():
            print(
                f"  {name:32s} share {r['evaluation_share']:.3f}  AUROC {r['auroc_difference']:+.3f}  "
                f"balanced accuracy {r['balanced_accuracy_difference']:+.3f}"
            )
    print(f"over {len(rows)} seeds: mean (worst)")
    for name in rows[0]["early_stops"]:
        share, auroc, ba = (
            np.array([r["early_stops"][name][key] for r in rows])
            for key in ("evaluation_share", "auroc_difference", "balanced_accuracy_difference")
        )
        print(
            f"  {name:32s} share {share.mean():.3f} ({share.max():.3f})  AUROC {auroc.mean():+.3f} "
            f"({auroc.min():+.3f})  balanced accuracy {ba.mean():+.3f} ({ba.min():+.3f})"
        )
    if args.json:
        atomic_write_json(
            args.json,
            {
                "model": args.model,
                "sigma": args.sigma,
                "draws": args.draws,
                "alpha": ALPHA,
                "min_draws": MIN_DRAWS,
                "budget": budget,
                "seeds": rows,
            },
        )


if __name__ == "__main__":
    main()
