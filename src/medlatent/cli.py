"""The `medlatent` command line. Each command builds its config from `--config` (YAML) and its
flags, whose options derive from the config's fields (`config.cli_parameters`), and calls its
`run_x(config)`; `main` turns every error into one `medlatent: error:` line."""

from __future__ import annotations

import inspect
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer

from .errors import MedlatentError

# Plain click help, wrapped to 80 columns, every default shown.
HELP = dict(rich_markup_mode=None, context_settings={"max_content_width": 80}, no_args_is_help=True)
app = typer.Typer(add_completion=False, help="Audit, fix and use the latent spaces of image autoencoders.", **HELP)
autoencoder_app = typer.Typer(help="Built-in autoencoders.", **HELP)
app.add_typer(autoencoder_app, name="autoencoder")
classifier_app = typer.Typer(
    help="Train and evaluate single classifiers (image or latent, noise-conditioned, distilled).", **HELP
)
app.add_typer(classifier_app, name="classifier")


def _with_settings(command, settings: list[inspect.Parameter]):
    """`command(**kwargs)` with its own keyword parameters plus one option per setting: typer
    reads the parameters from the signature, so each option is derived from its dataclass field."""
    own = [
        p
        for p in inspect.signature(command, eval_str=True).parameters.values()
        if p.kind is not inspect.Parameter.VAR_KEYWORD
    ]
    command.__signature__ = inspect.Signature([*own, *settings])
    return command


CONFIG_OPTION = typer.Option(
    help="YAML file with any of these options, keys named as the options (flags override it)."
)
QUIET_OPTION = typer.Option("--quiet", help="No progress bars and no third-party notices.")


def _load(config: Path | None, quiet: bool, settings: dict, cls: type):
    """The command's config from its YAML file and flags; --quiet turns progress and notices off."""
    from .api import load_config
    from .config import leaves

    if quiet:
        _silence_third_party()
        if any(leaf.name == "progress" for leaf in leaves(cls)):
            settings["progress"] = False
    return load_config(config, settings, cls)


def gap(
    config: Annotated[Path | None, CONFIG_OPTION] = None, quiet: Annotated[bool, QUIET_OPTION] = False, **settings
) -> None:
    """Measure the learnability gap: image vs reconstruction vs latent classifiers."""
    from .audits.config import GapConfig
    from .audits.gap import run_gap

    run_config = _load(config, quiet, settings, GapConfig)
    results = run_gap(run_config, log=typer.echo)
    if results is not None:  # None in the other processes of a multi-process launch
        _print_summary(results, run_config.run.out)


def augment(
    config: Annotated[Path | None, CONFIG_OPTION] = None, quiet: Annotated[bool, QUIET_OPTION] = False, **settings
) -> None:
    """Generative augmentation: classifiers on real, real + synthetic and synthetic images from a
    latent diffusion model, tested on the real images it held out."""
    from .audits.augment import run_augment
    from .audits.config import AugmentConfig

    run_config = _load(config, quiet, settings, AugmentConfig)
    results = run_augment(run_config, log=typer.echo)
    _print_augment(results, run_config.run.out)


def audit(
    config: Annotated[Path | None, CONFIG_OPTION] = None, quiet: Annotated[bool, QUIET_OPTION] = False, **settings
) -> None:
    """The encoder audit: perturbations, neighbourhoods, lesion probes (the learnability map),
    robustness under shift, information present against usable; one card per autoencoder."""
    from .audits.config import EncoderAuditConfig
    from .audits.encoder import run_encoder_audit

    run_config = _load(config, quiet, settings, EncoderAuditConfig)
    results = run_encoder_audit(run_config, log=typer.echo)
    for card in results["autoencoders"]:
        s, a = card["sections"], card["autoencoder"]
        cells = [f"{a['name']}{'' if a['has_decoder'] else ' (encoder only)'}:"]
        if "perturbation" in s:
            eq = s["perturbation"]["shift_equivariance"]["error"]
            cells.append(f"shift equivariance error {eq:.3f}" if eq is not None else "shift equivariance n/a")
        if "neighbourhood" in s and s["neighbourhood"]["latent"]:
            k, v = next(iter(s["neighbourhood"]["latent"].items()))
            cells.append(f"trustworthiness {v['trustworthiness']:.3f} continuity {v['continuity']:.3f} (k={k})")
        if "information" in s:
            lat = s["information"]["spaces"]["latent"]
            cells.append(
                f"latent MI {lat['mutual_information']['value']:.3f} nats, V-info "
                f"linear {lat['v_information']['linear']['v_information']:.3f}"
            )
        if "shortcuts" in s:
            rows = s["shortcuts"]["spaces"].items()
            worst = [(k, v["classifier"]["worst_group_accuracy"]["value"]) for k, v in rows]
            cells.append("worst-group accuracy " + ", ".join(f"{k} {v:.3f}" for k, v in worst if v is not None))
        typer.echo("  ".join(cells))
    typer.echo(f"wrote {run_config.run.out}/results.json and {', '.join(results['reports'])}")


def _print_augment(results: dict, out: str) -> None:
    method = "t intervals across seeds" if results["interval_method"] == "t" else "paired bootstrap intervals"
    typer.echo(f"\nmean over seeds with 95% {method}; difference = condition - real, * interval excludes 0")
    for space, rows in results["table"].items():
        for condition, row in rows.items():
            cells = []
            for m in ("auroc", "balanced_accuracy", "mcc"):
                v = row["scores"][m]
                d = row["difference_vs_real"][m] if row["difference_vs_real"] else None
                change = (
                    (
                        f" ({d['value']:+.3f}{'*' if d['excludes_zero'] else ''} "
                        f"[{d['ci95'][0]:+.3f},{d['ci95'][1]:+.3f}])"
                    )
                    if d
                    else ""
                )
                cells.append(f"{m} {v['value']:.3f} [{v['ci95'][0]:.3f},{v['ci95'][1]:.3f}]{change}")
            typer.echo(
                f"{space:6s} {condition:15s} n={row['train_size']:<6d} "
                + "  ".join(cells)
                + ("  FLAGGED" if row["flagged"] else "")
            )
    q = results.get("quality")
    if q:
        consistency = ", ".join(f"{c} {v:.2f}" for c, v in q["class_consistency"].items())
        typer.echo(
            f"synthetic images: class consistency {consistency}; Frechet distance {q['frechet_distance']:.2f}; "
            f"precision {q['precision']:.2f}, recall {q['recall']:.2f}; near copies {q['near_copy_share']:.1%}"
        )
    typer.echo(f"wrote {out}/results.json and {out}/report.html")


def score(
    config: Annotated[Path | None, CONFIG_OPTION] = None, quiet: Annotated[bool, QUIET_OPTION] = False, **settings
) -> None:
    """Score latents with a latent classifier: batched from pinned memory, bf16 and channels-last on a GPU."""
    from .classifiers.scorer import run_score
    from .config import ScoreConfig

    result = run_score(_load(config, quiet, settings, ScoreConfig))
    typer.echo(
        f"wrote {result['out']}: {result['latents']} latents from {result['files']} "
        f"file(s) on {result['device']}{' (compiled)' if result['compiled'] else ''}"
    )


def compare(
    runs: Annotated[
        list[Path] | None, typer.Argument(help="Run folders (or their results.json) of one command.", metavar="RUN")
    ] = None,
    config: Annotated[Path | None, CONFIG_OPTION] = None,
    quiet: Annotated[bool, QUIET_OPTION] = False,
    **settings,
) -> None:
    """Runs of one command side by side: comparison.html (the headline scores and gaps of each run,
    with intervals, and a figure) and comparison.csv (every run's results as one table)."""
    from .config import CompareConfig
    from .results import run_compare

    given = {**settings, "runs": [str(run) for run in runs] if runs else None}
    result = run_compare(_load(config, quiet, given, CompareConfig))
    typer.echo(
        f"wrote {result['out']}/comparison.html and {result['out']}/comparison.csv: {len(result['runs'])} "
        f"`medlatent {result['command']}` run(s), {result['rows']} rows, page showing {result['metric']}"
    )


def push(
    model: Annotated[
        Path, typer.Argument(help="A saved classifier or latent diffusion model folder.", metavar="MODEL_DIR")
    ],
    repo_id: Annotated[str, typer.Argument(help="The Hub repository, OWNER/NAME.", metavar="REPO_ID")],
    config: Annotated[Path | None, CONFIG_OPTION] = None,
    quiet: Annotated[bool, QUIET_OPTION] = False,
    **settings,
) -> None:
    """Upload a saved classifier or latent diffusion model to the Hugging Face Hub with a generated
    model card (README.md; the folder itself is not changed)."""
    from .config import PushConfig
    from .hub import run_push

    given = {**settings, "model": str(model), "repo_id": repo_id}
    result = run_push(_load(config, quiet, given, PushConfig))
    typer.echo(
        f"pushed {model} ({result['kind']}, {len(result['files'])} files with its model card) "
        f"to {result['url']} on {result['revision']}"
    )


def counterfactual(
    config: Annotated[Path | None, CONFIG_OPTION] = None, quiet: Annotated[bool, QUIET_OPTION] = False, **settings
) -> None:
    """Counterfactual images: noise each held-out image's latent, denoise it as the target class (CFG,
    classifier guidance, Latent Drift), decode; validity, proximity, sparsity, realism."""
    from .audits.config import CounterfactualConfig
    from .audits.counterfactual import run_counterfactual

    run_config = _load(config, quiet, settings, CounterfactualConfig)
    r = run_counterfactual(run_config, log=typer.echo)
    out = run_config.run.out
    if "drift_search" in r:
        typer.echo(
            f"drift search at strength {r['drift_search']['strength']}: chose "
            f"{r['drift_search']['chosen']:+.2f} (lowest {r['drift_search']['distance'].replace('_', ' ')} "
            f"of {len(r['drift_search']['curve'])} grid points)"
        )
    for row in r["curves"]:
        cells = [
            f"strength {row['strength']:.2f} drift {row['drift']:+.2f}:",
            f"L1 {row['l1']:.4f}",
            f"SSIM {row['ssim']:.3f}",
            f"changed pixels {row['changed_pixels']:.1%}",
        ]
        if "validity" in row:
            cells += [
                f"validity {row['validity']['rate']:.2f} "
                f"[{row['validity']['ci95'][0]:.2f}, {row['validity']['ci95'][1]:.2f}]",
                f"FD {row['frechet_distance']:.2f}",
            ]
        if "peak_on_lesion" in row:
            cells.append(f"peak on the lesion {row['peak_on_lesion']['rate']:.0%} of {row['peak_on_lesion']['of']}")
        typer.echo("  ".join(cells))
    typer.echo(f"wrote {out}/results.json, {out}/report.html and {out}/counterfactuals/")


def _print_summary(results: dict, out: str) -> None:
    metric = results["primary_metric"]

    def shown(entry: dict | None, fmt: str = ".3f") -> str:  # "value [low,high]", * where a gap's interval excludes 0
        if not entry:
            return "undefined (gap interval contains 0)"
        mark = "*" if entry.get("excludes_zero") else ""
        return f"{entry['value']:{fmt}}{mark} [{entry['ci95'][0]:{fmt}},{entry['ci95'][1]:{fmt}}]"

    def tested(entry: dict) -> str:
        t = entry.get("paired_test")
        if not t:
            return ""
        p = lambda v: "n/a" if v is None else f"{v:.2g}"  # noqa: E731
        return (
            f" (paired across {t['n']} runs: delta {t['mean_difference']:+.3f}, "
            f"t-test p={p(t['t_test_p'])}, Wilcoxon p={p(t['wilcoxon_p'])})"
        )

    method = "t intervals across runs" if results["interval_method"] == "t" else "paired bootstrap intervals"
    runs = len(results["rows"][0]["per_run"]["runs"])
    typer.echo(
        f"\n{metric.upper()}, mean of {runs} run(s) with 95% {method} ({results['dataset']['name']}, "
        f"{results['dataset']['task']}); gap = before - after, * interval excludes 0"
    )
    for row in results["rows"]:
        scores = "  ".join(
            f"{s}={shown(row['scores'][s][metric])}"
            for s in ("image", "reconstruction", "latent")
            if s in row["scores"]
        )
        typer.echo(
            f"{row['autoencoder_name']} ({row['model']}): {scores}"
            + ("  (encoder only: no decoder, no reconstruction)" if row.get("encoder_only") else "")
        )
        for g in row["gaps"]:
            unreliable = "  UNRELIABLE: rests on a flagged classifier" if g in row["unreliable_gaps"] else ""
            what = " (image - latent)" if row.get("encoder_only") else ""
            typer.echo(
                f"    {g} gap{what}={shown(row['gaps'][g][metric], '+.3f')}"
                f"{tested(row['gaps'][g][metric])}{unreliable}"
            )
        for variant, summary in row.get("variants", {}).items():
            flagged = "  FLAGGED" if summary["classifier"]["flagged"] else ""
            typer.echo(
                f"    latent ({variant})={shown(summary['scores'][metric])}  share of gap "
                f"closed={shown(summary['share_of_gap_closed'][metric], '+.2f')}{_throughput(summary)}{flagged}"
            )
        _print_decoder_stages(row, metric, shown)
        for label, d in row.get("diffusion_classifiers", {}).items():
            typer.echo(
                f"    diffusion classifier {label}={shown(d['scores'][metric])}  latent - "
                f"diffusion={shown(d['space_minus_diffusion']['latent'][metric], '+.3f')}  "
                f"({d['evaluations_per_image']:.0f} network evaluations per image)"
            )
    from .reports import health_warnings

    warnings = health_warnings(results["rows"])
    if warnings:
        from .evaluation.health import ADVICE

        typer.echo(
            f"warning: {len(warnings)} classifier run(s) did not train "
            f"properly; gaps resting on them are marked unreliable ({ADVICE}):"
        )
        for line in warnings:
            typer.echo(f"  {line}")
    typer.echo(f"wrote {out}/results.json and {out}/report.html")


def _throughput(variant: dict) -> str:
    """A mapped latent variant's measured inference throughput, decoder prefix FLOPs and stages ("" for the others)."""
    speed = variant.get("throughput")
    if not speed:
        return ""
    from .reports.html import format_flops

    per_second = speed["inference_samples_per_second"]
    stages = (variant.get("decoder_prefix") or {}).get("stages")
    return (
        f"  {f'{per_second:.0f}' if per_second else 'n/a'} samples/s, prefix {format_flops(speed['prefix_flops'])}"
        + (f" ({', '.join(dict.fromkeys(stages))})" if stages else "")
    )


def _print_decoder_stages(row: dict, metric: str, shown) -> None:
    """A row's learnability along the decoder (--decoder-stages): its closing stage, then one line
    per stage: score, reconstruction - stage, FLOPs of the decoder prefix per image, and where the
    features were not held in memory, how they were read."""
    along = row.get("decoder_stages")
    if not along:
        return
    from .reports import format_flops

    typer.echo(
        "    along the decoder (score, reconstruction - stage, decoder prefix FLOPs per image); closing stage: "
        f"{along['closing_stage_by_metric'].get(metric) or 'none'}"
    )
    width = max(len(s["name"]) for s in along["stages"])
    for s in along["stages"]:
        diff = s["difference_to_reconstruction"]
        difference = shown(diff[metric], "+.3f") if diff else "reference"
        held = "" if s["held"] == "held in memory" else f"  ({s['held']})"
        flagged = "  FLAGGED" if s.get("flagged") else ""
        typer.echo(
            f"      {s['name']:<{width}}  {shown(s['scores'][metric])}  {difference:<26}  "
            f"{format_flops(s['prefix_flops'])}{held}{flagged}"
        )


@app.command()
def report(run: Annotated[Path, typer.Argument(help="A run folder (or its results.json).", metavar="RUN")]) -> None:
    """Rebuild report.html from a run's results.json."""
    from .api import report as rebuild

    typer.echo(f"wrote {rebuild(run)}")


def autoencoder_train(
    config: Annotated[Path | None, CONFIG_OPTION] = None, quiet: Annotated[bool, QUIET_OPTION] = False, **settings
) -> None:
    """Train medlatent's small KL autoencoder; load it later with --autoencoder builtin:FOLDER."""
    from .autoencoders.builtin import run_autoencoder_train
    from .config import AutoencoderTrainConfig

    folder = run_autoencoder_train(_load(config, quiet, settings, AutoencoderTrainConfig))
    typer.echo(f"saved {folder}; use it with --autoencoder builtin:{folder}")


def classifier_train(
    config: Annotated[Path | None, CONFIG_OPTION] = None, quiet: Annotated[bool, QUIET_OPTION] = False, **settings
) -> None:
    """Train one classifier on the official split and save it."""
    from .audits.classifier import run_classifier_train
    from .config import ClassifierTrainConfig

    result = run_classifier_train(_load(config, quiet, settings, ClassifierTrainConfig))
    test = result["test"]
    typer.echo(
        f"saved {result['out']}: test AUROC {test['auroc']:.3f}, balanced "
        f"accuracy {test['balanced_accuracy']:.3f}, MCC {test['mcc']:.3f}"
    )


def classifier_eval(
    model: Annotated[Path, typer.Argument(help="A saved classifier folder.", metavar="MODEL")],
    config: Annotated[Path | None, CONFIG_OPTION] = None,
    quiet: Annotated[bool, QUIET_OPTION] = False,
    **settings,
) -> None:
    """Score a saved classifier on the test split, optionally over noise levels."""
    from .audits.classifier import run_classifier_eval
    from .config import ClassifierEvalConfig

    result = run_classifier_eval(_load(config, quiet, {**settings, "model": str(model)}, ClassifierEvalConfig))
    test = result["test"]
    typer.echo(
        f"{model} ({result['space']}): AUROC {test['auroc']:.3f}, balanced "
        f"accuracy {test['balanced_accuracy']:.3f}, MCC {test['mcc']:.3f}"
    )
    for point in result.get("sigma_sweep", []):
        typer.echo(
            f"  sigma {point['sigma']:g}: AUROC {point['auroc']:.3f}, "
            f"balanced accuracy {point['balanced_accuracy']:.3f}"
        )


def _register() -> None:
    """Every command's options derive from its config's fields (see `config.cli_parameters`)."""
    from .audits.config import (
        AugmentConfig,
        CounterfactualConfig,
        DiffusionClassifyConfig,
        EncoderAuditConfig,
        GapConfig,
    )
    from .config import (
        AutoencoderTrainConfig,
        BenchConfig,
        ClassifierEvalConfig,
        ClassifierTrainConfig,
        CompareConfig,
        DiffusionBenchConfig,
        DiffusionTrainConfig,
        EvaluateConfig,
        PushConfig,
        SampleConfig,
        ScoreConfig,
        cli_parameters,
    )

    commands = [
        (app, "gap", gap, GapConfig),
        (app, "audit", audit, EncoderAuditConfig),
        (app, "augment", augment, AugmentConfig),
        (app, "score", score, ScoreConfig),
        (app, "counterfactual", counterfactual, CounterfactualConfig),
        (app, "compare", compare, CompareConfig),
        (app, "push", push, PushConfig),
        (autoencoder_app, "train", autoencoder_train, AutoencoderTrainConfig),
        (classifier_app, "train", classifier_train, ClassifierTrainConfig),
        (classifier_app, "eval", classifier_eval, ClassifierEvalConfig),
        (bench_app, "classifiers", bench_classifiers, BenchConfig),
        (bench_app, "diffusion", bench_diffusion, DiffusionBenchConfig),
        (diffusion_app, "train", diffusion_train, DiffusionTrainConfig),
        (diffusion_app, "sample", diffusion_sample, SampleConfig),
        (diffusion_app, "evaluate", diffusion_evaluate, EvaluateConfig),
        (diffusion_app, "classify", diffusion_classify, DiffusionClassifyConfig),
    ]
    for group, name, command, cls in commands:
        group.command(name)(_with_settings(command, cli_parameters(cls)))


diffusion_app = typer.Typer(help="Class-conditional latent diffusion on the latent cache (EDM or DDPM/VP).", **HELP)
app.add_typer(diffusion_app, name="diffusion")


def diffusion_train(
    config: Annotated[Path | None, CONFIG_OPTION] = None, quiet: Annotated[bool, QUIET_OPTION] = False, **settings
) -> None:
    """Train a class-conditional latent denoiser on the cached latents of one split's training and
    validation images."""
    from .config import DiffusionTrainConfig
    from .pipelines.latent_diffusion import run_diffusion_train

    typer.echo(f"saved {run_diffusion_train(_load(config, quiet, settings, DiffusionTrainConfig))}")


def diffusion_sample(config: Annotated[Path | None, CONFIG_OPTION] = None, **settings) -> None:
    """Generate samples of one class (classifier-free and classifier guidance, Latent Drift)."""
    from .audits.sampling import run_sample
    from .config import SampleConfig

    typer.echo(f"wrote {run_sample(_load(config, False, settings, SampleConfig))}")


def diffusion_evaluate(config: Annotated[Path | None, CONFIG_OPTION] = None, **settings) -> None:
    """Class consistency, Frechet distance, precision/recall and near copies of training images,
    against an untrained model."""
    from .audits.sampling import run_evaluate
    from .config import EvaluateConfig

    result = run_evaluate(_load(config, False, settings, EvaluateConfig))
    for name, r in result.items():
        consistency = ", ".join(f"{c} {v:.2f}" for c, v in r["class_consistency"].items())
        copies = (
            f"; near copies of training images {r['memorisation']['near_copy_share']:.1%}"
            if r.get("memorisation")
            else ""
        )
        fid = f"; Inception FID {r['inception_fid']:.1f}, KID {r['inception_kid']:.4f}" if "inception_fid" in r else ""
        typer.echo(
            f"{name}: class consistency {consistency}; Frechet distance {r['frechet_distance']:.2f}; "
            f"precision {r['precision']:.2f}, recall {r['recall']:.2f}{copies}{fid}"
        )


def diffusion_classify(
    config: Annotated[Path | None, CONFIG_OPTION] = None, quiet: Annotated[bool, QUIET_OPTION] = False, **settings
) -> None:
    """The diffusion model as a classifier: lowest mean error, majority vote, early-stopped vote,
    pruning; uncertainty and explanation maps; results.json and report.html."""
    from .audits.config import DiffusionClassifyConfig
    from .audits.diffusion_classifier import run_diffusion_classifier

    run_config = _load(config, quiet, settings, DiffusionClassifyConfig)
    r = run_diffusion_classifier(run_config, log=typer.echo)
    out = run_config.run.out
    for name, c in r["classifiers"].items():
        cells = "  ".join(
            f"{m} {c['scores'][m]['value']:.3f} [{c['scores'][m]['ci95'][0]:.3f},{c['scores'][m]['ci95'][1]:.3f}]"
            for m in ("auroc", "balanced_accuracy", "mcc")
        )
        typer.echo(f"{name:36s} {cells}  ({c['evaluations_per_image']:.1f} network evaluations per image)")
    for name, e in r["early_stopping"].items():
        d = e["difference_to_full_vote"]
        typer.echo(
            f"{name} - full vote: AUROC {d['auroc']['value']:+.3f}, balanced accuracy "
            f"{d['balanced_accuracy']['value']:+.3f}, with {e['evaluation_share']:.1%} "
            f"of the evaluations; same class {e['same_class_as_full_vote']:.1%}"
        )
    t = r.get("tolerance")
    if t:
        loss = t["test_loss"]
        typer.echo(
            f"tolerance {t['tolerance']:g} ({t['metric']}): the chosen stops use {t['evaluation_share']:.1%} of the "
            f"evaluations; loss against the full vote on the held-out images {loss['value']:+.3f} "
            f"[{loss['ci95'][0]:+.3f}, {loss['ci95'][1]:+.3f}], "
            f"{'within' if t['held'] else 'NOT within'} the tolerance"
        )
        cheapest = t["in_sample_limit"]["cheapest_within_tolerance"]
        if cheapest:
            # the limit is chosen on the images it is scored on: far below the chosen share, the images each stop
            # is chosen on are too few to accept a cheaper one; close to it, the draws carry too little
            why = (
                "more held-out images would let a cheaper stop be chosen"
                if cheapest["evaluation_share"] < t["evaluation_share"] / 2
                else "few draws carry too little to stop sooner"
            )
            typer.echo(
                f"  in-sample limit (optimistic): the cheapest stop within the tolerance on all these images uses "
                f"{cheapest['evaluation_share']:.1%} of the evaluations ({cheapest['stop']}); {why}"
            )
    for name, u in r["uncertainty"].items():
        typer.echo(f"selective prediction, {name}: AURC {u['aurc']:.4f} (error rate {u['error_rate']:.3f})")
    for name, p in (r.get("explanations") or {}).get("peak_on_lesion", {}).items():
        typer.echo(
            f"explanation {name.replace('_', ' ')}: peak on the lesion in "
            f"{p['rate']:.0%} of {p['of']} images [{p['ci95'][0]:.2f}, {p['ci95'][1]:.2f}]"
        )
    typer.echo(f"wrote {out}/results.json and {out}/report.html")


bench_app = typer.Typer(help="Speed and memory benchmarks.", **HELP)
app.add_typer(bench_app, name="bench")


def bench_diffusion(config: Annotated[Path | None, CONFIG_OPTION] = None, **settings) -> None:
    """The latent denoiser: training latents/s (engine step vs bare UNet step) and sampling time per latent
    against network evaluations."""
    from .bench import bench_diffusion as run
    from .config import DiffusionBenchConfig
    from .io import atomic_write_json
    from .rundir import check_json_out

    cfg = _load(config, False, settings, DiffusionBenchConfig)
    check_json_out(cfg.run.json_out)
    result = run(cfg, progress=typer.echo)
    if cfg.run.json_out:
        atomic_write_json(cfg.run.json_out, result)


def bench_classifiers(config: Annotated[Path | None, CONFIG_OPTION] = None, **settings) -> None:
    """(a) image model vs latent model; (b) latent model vs decode + image model. Defaults: the published setup."""
    from .bench import bench_classifiers as run
    from .config import BenchConfig
    from .io import atomic_write_json
    from .rundir import check_json_out

    cfg = _load(config, False, settings, BenchConfig)
    check_json_out(cfg.run.json_out)
    r = run(cfg, progress=lambda m: typer.echo(m, err=True))
    gb = 1 / 2**20
    typer.echo(
        f"device {r['device']}, torch threads {r['torch_threads']}; GFLOPs/sample: "
        + ", ".join(f"{k} {v / 1e9:.3f}" for k, v in r["flops_per_sample"].items())
    )
    for name, run_ in r["runs"].items():
        typer.echo(
            f"  {name:30s} batch {run_['batch']:3d}: {run_['images_per_second']:9.1f} "
            f"img/s, peak memory {run_['peak_memory_bytes'] * gb:8.1f} MiB"
        )
    a, b = r["a_classifier_vs_classifier"], r["b_scoring_latents"]
    typer.echo(
        f"(a) latent vs image classifier: throughput x{a['throughput_ratio']:.1f}, memory x{a['memory_ratio']:.1f}, "
        f"FLOPs x{a['flops_ratio']:.1f}, speedup/FLOPs ratio {a['speedup_over_flops_ratio']:.2f}; train "
        f"step x{a['train_step_time_ratio']:.1f} faster, x{a['train_memory_ratio']:.1f} less memory"
    )
    typer.echo(
        "(b) latent model vs decode + image model: throughput "
        f"x{b['throughput_ratio']:.1f}, memory x{b['memory_ratio']:.1f}, FLOPs "
        f"x{b['flops_ratio']:.1f}, speedup/FLOPs ratio {b['speedup_over_flops_ratio']:.2f}"
    )
    sweep = r.get("sweep")
    if sweep:
        for name, m in sweep["models"].items():
            best = m["best"]
            typer.echo(
                f"  best {name:15s}: {best['images_per_second']:10.0f} img/s at batch "
                f"{best['batch']}, {best['precision']}, compile {best['compile']}; "
                f"{best['tflops']:.1f} TFLOP/s; peak memory {best['peak_memory_bytes'] * gb:.0f} MiB"
            )
        typer.echo(
            f"best against best: latent x{sweep['best_throughput_ratio']:.1f} the image model's "
            f"throughput, FLOPs ratio x{sweep['flops_ratio']:.1f}: the image model achieves "
            f"x{sweep['tflops_ratio']:.1f} the latent model's TFLOP/s (that is where the FLOPs ratio is lost); "
            f"noise-conditioned latent model at {sweep['latent_vs_bare_backbone']:.2f} of its bare backbone"
        )
    if cfg.run.json_out:
        atomic_write_json(cfg.run.json_out, r)


def _silence_third_party() -> None:
    """--quiet: no warnings and no hub progress bars from the libraries medlatent uses."""
    warnings.simplefilter("ignore")
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"


_register()


def main() -> None:
    # Library notices (diffusers' "accelerate not installed", hub notes) never come before
    # medlatent's own one-line errors; Python warnings print once per message, not per call.
    for name in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY", "HF_HUB_VERBOSITY"):
        os.environ.setdefault(name, "error")
    warnings.simplefilter("once")
    click_error, no_args = _click_errors()
    try:
        sys.exit(app(standalone_mode=False) or 0)
    except MedlatentError as err:
        fail(str(err), err.exit_code)
    except no_args as err:  # `medlatent` or a group alone: its help
        err.show()
        sys.exit(err.exit_code)
    except click_error as err:  # a missing or mistyped option or value: one line, no usage block
        ctx = getattr(err, "ctx", None)
        fail(f"{err.format_message()}{f' (see {ctx.command_path} --help)' if ctx is not None else ''}", 2)
    except typer.Abort:
        fail("interrupted; rerun the same command to resume", 130)
    except OSError as err:  # the disk, not the input: full, gone, or no longer writable mid-run
        fail(f"{err.strerror or err}{f': {err.filename}' if err.filename else ''}", 1)


def _click_errors() -> tuple[type, type | tuple]:
    """click's base exception and its no-arguments help, from the click typer runs on (its own
    vendored copy in recent typer, click itself before), found from typer's public BadParameter."""
    base = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
    return base, getattr(sys.modules[base.__module__], "NoArgsIsHelpError", ())


def fail(message: str, code: int) -> None:
    """One line on stderr, then exit with `code`."""
    first = " ".join(message.split())
    typer.echo(f"medlatent: error: {first}", err=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
