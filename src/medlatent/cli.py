"""The `medlatent` command line: `gap`, `report`, `autoencoder train`."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer

from .errors import MedlatentError, MedlatentInputError

# Plain click help, wrapped to 80 columns, every default shown.
HELP = dict(rich_markup_mode=None, context_settings={"max_content_width": 80}, no_args_is_help=True)
app = typer.Typer(add_completion=False, help="Audit, fix and use the latent spaces of image autoencoders.", **HELP)
autoencoder_app = typer.Typer(help="Built-in autoencoders.", **HELP)
app.add_typer(autoencoder_app, name="autoencoder")
classifier_app = typer.Typer(help="Train and evaluate single classifiers (image or latent, noise-conditioned, distilled).", **HELP)
app.add_typer(classifier_app, name="classifier")


def _default(name: str) -> str:
    """The GapConfig default of an option, as --help shows it (GapConfig declares every default)."""
    from dataclasses import MISSING, fields

    from .audits.config import GapConfig

    field = next(f for f in fields(GapConfig) if f.name == name)
    value = field.default_factory() if field.default_factory is not MISSING else field.default
    shown = {"folds": "official split", "cache_dir": "~/.cache/medlatent/latents", "label_columns": "label", "task": "inferred", "latent_variants": "none"}
    if value is None or value == []:
        return shown.get(name, "none")
    if isinstance(value, bool):
        return "on" if value else "off"
    return ", ".join(map(str, value)) if isinstance(value, list) else str(value)


def _opt(name: str, help: str = "", *flags: str, metavar: str | None = None):  # noqa: A002 - typer's own keyword
    return typer.Option(*flags, help=f"{help}  [default: {_default(name)}]", show_default=False, metavar=metavar)


@app.command()
def gap(
    config: Annotated[Optional[Path], typer.Option(help="YAML file with any of these options (flags override it).")] = None,
    dataset: Annotated[Optional[str], _opt("dataset", "synthetic[:k=v,...] | medmnist:FLAG|PATH.npz | csv:PATH.csv")] = None,
    size: Annotated[Optional[int], _opt("size", "Working resolution in pixels.")] = None,
    autoencoder: Annotated[Optional[list[str]], _opt("autoencoders", "hf:ID[:SUB] | taesd:ENC.pth | builtin:NAME|DIR | medvae:NAME; repeatable.", metavar="SPEC")] = None,
    folds: Annotated[Optional[int], _opt("folds", "K stratified (patient-grouped) folds instead of the official split.")] = None,
    seed: Annotated[Optional[list[int]], _opt("seeds", "Training seed; repeat for several.", metavar="INT")] = None,
    backbone: Annotated[Optional[str], _opt("backbone", "timm backbone: resnet18, resnet50, convnext_tiny, ...")] = None,
    pretrained: Annotated[Optional[bool], _opt("pretrained", "ImageNet weights (needs network).", "--pretrained/--no-pretrained")] = None,
    loss: Annotated[Optional[str], _opt("loss", "ce | cb (class-balanced) | ldam (with deferred re-weighting)")] = None,
    epochs: Annotated[Optional[int], _opt("epochs", "Training epochs at most.")] = None,
    batch_size: Annotated[Optional[int], _opt("batch_size", "Training batch size.")] = None,
    lr: Annotated[Optional[float], _opt("lr", "Peak learning rate (one-cycle schedule).")] = None,
    patience: Annotated[Optional[int], _opt("patience", "Early stopping on validation balanced accuracy.")] = None,
    latent_std: Annotated[Optional[float], _opt("latent_std", "Latents are standardised per channel to this std.")] = None,
    latent_mask: Annotated[Optional[float], _opt("latent_mask", "Share of latent entries masked as augmentation.")] = None,
    linear_probe: Annotated[Optional[bool], _opt("linear_probe", "Also train a linear probe in each space.", "--linear-probe/--no-linear-probe")] = None,
    latent_variants: Annotated[Optional[str], _opt("latent_variants", "Extra latent classifiers: noise-conditioned,distilled.")] = None,
    distill_alpha: Annotated[Optional[float], _opt("distill_alpha", "alpha * task loss + (1 - alpha) * distillation loss.")] = None,
    distill_loss: Annotated[Optional[str], _opt("distill_loss", "mse (logits, as published) | kl (temperature-scaled)")] = None,
    temperature: Annotated[Optional[float], _opt("temperature", "Distillation temperature for kl.")] = None,
    variant_epoch_factor: Annotated[Optional[float], _opt("variant_epoch_factor", "Noise-conditioned variants train this many times the epochs and patience.")] = None,
    variant_init: Annotated[Optional[str], _opt("variant_init", "Variants start from the plain latent classifier (plain) or from random weights.")] = None,
    clean_fraction: Annotated[Optional[float], _opt("clean_fraction", "Share of the variants' training samples at sigma_min.")] = None,
    bootstrap: Annotated[Optional[int], _opt("bootstrap", "Bootstrap resamples for the 95% intervals.")] = None,
    interval: Annotated[Optional[str], _opt("interval", "auto (t across runs from 5 runs, else bootstrap) | bootstrap | t")] = None,
    out: Annotated[Optional[str], _opt("out", "Run folder for results.json and report.html.")] = None,
    cache_dir: Annotated[Optional[str], _opt("cache_dir", "Latent cache folder.")] = None,
    device: Annotated[Optional[str], _opt("device", "auto | cpu | cuda[:N]")] = None,
    image_column: Annotated[Optional[str], _opt("image_column", "CSV column of image paths.")] = None,
    label_column: Annotated[Optional[list[str]], _opt("label_columns", "CSV label column; repeat for one-hot or multi-label columns.", metavar="COLUMN")] = None,
    patient_column: Annotated[Optional[str], _opt("patient_column", "CSV column of patient ids (folds never split a patient).")] = None,
    split_column: Annotated[Optional[str], _opt("split_column", "CSV column with train/val/test.")] = None,
    task: Annotated[Optional[str], _opt("task", "binary | multiclass | multilabel | ordinal (CSV).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars and no third-party notices.")] = False,
) -> None:
    """Measure the learnability gap: image vs reconstruction vs latent classifiers."""
    from .api import load_config

    if quiet:
        _silence_third_party()

    options = dict(
        dataset=dataset, size=size, autoencoders=autoencoder or None, folds=folds, seeds=seed or None, backbone=backbone,
        pretrained=pretrained, loss=loss, epochs=epochs, batch_size=batch_size, lr=lr, patience=patience, latent_std=latent_std,
        latent_mask=latent_mask, linear_probe=linear_probe, distill_alpha=distill_alpha, distill_loss=distill_loss, temperature=temperature,
        variant_epoch_factor=variant_epoch_factor, variant_init=variant_init, clean_fraction=clean_fraction, latent_variants=[v.strip() for v in latent_variants.split(",") if v.strip()] if latent_variants else None,
        bootstrap=bootstrap, interval=interval, out=out, cache_dir=cache_dir, device=device,
        image_column=image_column, label_columns=label_column or None, patient_column=patient_column, split_column=split_column, task=task,
        progress=False if quiet else None,
    )  # fmt: skip
    config = load_config(config, options)
    from .audits.gap import run_gap

    results = run_gap(config, log=typer.echo)
    _print_summary(results)


def _print_summary(results: dict) -> None:
    metric = results["primary_metric"]
    out = results["provenance"]["config"]["out"]

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
        return f" (paired across {t['n']} runs: delta {t['mean_difference']:+.3f}, t-test p={p(t['t_test_p'])}, Wilcoxon p={p(t['wilcoxon_p'])})"

    method = "t intervals across runs" if results["interval_method"] == "t" else "paired bootstrap intervals"
    runs = len(results["rows"][0]["per_run"]["runs"])
    typer.echo(f"\n{metric.upper()}, mean of {runs} run(s) with 95% {method} ({results['dataset']['name']}, {results['dataset']['task']}); gap = before - after, * interval excludes 0")
    for row in results["rows"]:
        scores = "  ".join(f"{s}={shown(row['scores'][s][metric])}" for s in ("image", "reconstruction", "latent"))
        typer.echo(f"{row['autoencoder_name']} ({row['model']}): {scores}")
        for g in ("fidelity", "learnability"):
            unreliable = "  UNRELIABLE: rests on a flagged classifier" if g in row["unreliable_gaps"] else ""
            typer.echo(f"    {g} gap={shown(row['gaps'][g][metric], '+.3f')}{tested(row['gaps'][g][metric])}{unreliable}")
        for variant, summary in row.get("variants", {}).items():
            flagged = "  FLAGGED" if summary["classifier"]["flagged"] else ""
            typer.echo(f"    latent ({variant})={shown(summary['scores'][metric])}  share of gap closed={shown(summary['share_of_gap_closed'][metric], '+.2f')}{flagged}")
    from .reports import health_warnings

    warnings = health_warnings(results["rows"])
    if warnings:
        from .evaluation.health import ADVICE

        typer.echo(f"warning: {len(warnings)} classifier run(s) did not train properly; gaps resting on them are marked unreliable ({ADVICE}):")
        for line in warnings:
            typer.echo(f"  {line}")
    typer.echo(f"wrote {out}/results.json and {out}/report.html")


@app.command()
def report(run: Annotated[Path, typer.Argument(help="A run folder (or its results.json).")]) -> None:
    """Rebuild report.html from a run's results.json."""
    from .api import report as rebuild

    typer.echo(f"wrote {rebuild(run)}")


@autoencoder_app.command("train")
def autoencoder_train(
    out: Annotated[Path, typer.Option(help="Folder to save the trained autoencoder (diffusers layout).")],
    recipe: Annotated[str, typer.Option(help="Architecture recipe: kl-f4-synthetic | kl-f8-synthetic")] = "kl-f4-synthetic",
    dataset: Annotated[Optional[str], typer.Option(help="Training data (train split), a --dataset spec.")] = None,
    size: Annotated[Optional[int], typer.Option()] = None,
    latent_channels: Annotated[Optional[int], typer.Option()] = None,
    image_channels: Annotated[Optional[int], typer.Option(help="1 for grayscale data, 3 for RGB.")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Optimisation steps.")] = None,
    seed: Annotated[Optional[int], typer.Option()] = None,
    device: Annotated[str, typer.Option()] = "auto",
    quiet: Annotated[bool, typer.Option()] = False,
) -> None:
    """Train medlatent's small KL autoencoder; load it later with --autoencoder builtin:FOLDER."""
    from .api import autoencoder_train as train

    folder = train(out, recipe, device=device, progress=not quiet, dataset=dataset, size=size, latent_channels=latent_channels, image_channels=image_channels, steps=steps, seed=seed)
    typer.echo(f"saved {folder}; use it with --autoencoder builtin:{folder}")


@classifier_app.command("train")
def classifier_train(
    out: Annotated[Path, typer.Option(help="Folder for model.safetensors + config.json.")],
    dataset: Annotated[str, typer.Option()] = "synthetic",
    size: Annotated[int, typer.Option()] = 64,
    space: Annotated[str, typer.Option(help="image | reconstruction | latent")] = "latent",
    autoencoder: Annotated[Optional[str], typer.Option(help="Needed for latent and reconstruction spaces.")] = None,
    backbone: Annotated[Optional[str], typer.Option()] = None,
    noise_conditioned: Annotated[bool, typer.Option("--noise-conditioned", help="FiLM on the noise level; trained on noised latents.")] = False,
    distill_from: Annotated[Optional[Path], typer.Option(help="A saved image-space classifier to distil from.")] = None,
    distill_alpha: Annotated[Optional[float], typer.Option()] = None,
    distill_loss: Annotated[Optional[str], typer.Option(help="kl | mse")] = None,
    temperature: Annotated[Optional[float], typer.Option()] = None,
    init: Annotated[str, typer.Option(help="random | imagenet | a saved classifier folder")] = "random",
    freeze_backbone: Annotated[bool, typer.Option("--freeze-backbone")] = False,
    epochs: Annotated[Optional[int], typer.Option()] = None,
    batch_size: Annotated[Optional[int], typer.Option()] = None,
    lr: Annotated[Optional[float], typer.Option()] = None,
    loss: Annotated[Optional[str], typer.Option()] = None,
    patience: Annotated[Optional[int], typer.Option(help="Early stopping on validation balanced accuracy.")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    cache_dir: Annotated[Optional[str], typer.Option()] = None,
    device: Annotated[str, typer.Option()] = "auto",
    quiet: Annotated[bool, typer.Option()] = False,
) -> None:
    """Train one classifier on the official split and save it (load with DeepClassifier.from_pretrained)."""
    from .api import classifier_train as train

    result = train(
        out, dataset, size, space, autoencoder, noise_conditioned=noise_conditioned, distill_from=distill_from, init=init, freeze_backbone=freeze_backbone,
        seed=seed, cache_dir=cache_dir, device=device, progress=not quiet, backbone=backbone, distill_alpha=distill_alpha, distill_loss=distill_loss,
        temperature=temperature, epochs=epochs, batch_size=batch_size, lr=lr, loss=loss, patience=patience,
    )  # fmt: skip
    test = result["test"]
    typer.echo(f"saved {result['out']}: test AUROC {test['auroc']:.3f}, balanced accuracy {test['balanced_accuracy']:.3f}, MCC {test['mcc']:.3f}")


@classifier_app.command("eval")
def classifier_eval(
    model: Annotated[Path, typer.Argument(help="A saved classifier folder.")],
    dataset: Annotated[str, typer.Option()] = "synthetic",
    size: Annotated[int, typer.Option()] = 64,
    autoencoder: Annotated[Optional[str], typer.Option()] = None,
    sigma: Annotated[Optional[list[float]], typer.Option(help="Noise levels for a sweep (repeatable).")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the scores here.")] = None,
    cache_dir: Annotated[Optional[str], typer.Option()] = None,
    device: Annotated[str, typer.Option()] = "auto",
    quiet: Annotated[bool, typer.Option()] = False,
) -> None:
    """Score a saved classifier on the test split, optionally over noise levels."""
    from .api import classifier_eval as evaluate
    from .io import atomic_write_json

    result = evaluate(model, dataset, size, autoencoder, sigma, cache_dir=cache_dir, device=device, progress=not quiet)
    test = result["test"]
    typer.echo(f"{model} ({result['space']}): AUROC {test['auroc']:.3f}, balanced accuracy {test['balanced_accuracy']:.3f}, MCC {test['mcc']:.3f}")
    for point in result.get("sigma_sweep", []):
        typer.echo(f"  sigma {point['sigma']:g}: AUROC {point['auroc']:.3f}, balanced accuracy {point['balanced_accuracy']:.3f}")
    if json_out:
        atomic_write_json(json_out, result)


bench_app = typer.Typer(help="Speed and memory benchmarks.", **HELP)
app.add_typer(bench_app, name="bench")


@bench_app.command("classifiers")
def bench_classifiers(
    image_backbone: Annotated[str, typer.Option()] = "resnet50",
    image_size: Annotated[int, typer.Option()] = 256,
    latent_backbone: Annotated[str, typer.Option()] = "convnext_tiny",
    latent_channels: Annotated[int, typer.Option()] = 32,
    latent_size: Annotated[int, typer.Option()] = 32,
    latent_stem: Annotated[str, typer.Option(help="standard (as published) | latent (stride-1, as the audit's latent models)")] = "standard",
    noise_conditioned: Annotated[bool, typer.Option(help="Benchmark the latent model with its FiLM noise conditioning (the method), or the plain backbone.")] = True,
    batch_size: Annotated[int, typer.Option()] = 64,
    decode_batch_size: Annotated[int, typer.Option(help="Batch for decode + image model (the decoder is large).")] = 4,
    repeats: Annotated[int, typer.Option()] = 3,
    device: Annotated[str, typer.Option()] = "auto",
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write all figures here.")] = None,
) -> None:
    """(a) image model vs latent model; (b) latent model vs decode + image model. Defaults: the published setup."""
    from .bench import BenchConfig
    from .bench import bench_classifiers as run
    from .io import atomic_write_json

    cfg = BenchConfig(image_backbone=image_backbone, image_size=image_size, latent_backbone=latent_backbone, latent_channels=latent_channels, latent_size=latent_size, latent_stem=latent_stem, noise_conditioned=noise_conditioned, batch_size=batch_size, decode_batch_size=decode_batch_size, repeats=repeats, device=device)
    r = run(cfg, progress=lambda m: typer.echo(m, err=True))
    gb = 1 / 2**20
    typer.echo(f"device {r['device']}, torch threads {r['torch_threads']}; GFLOPs/sample: " + ", ".join(f"{k} {v / 1e9:.3f}" for k, v in r["flops_per_sample"].items()))
    for name, run_ in r["runs"].items():
        typer.echo(f"  {name:30s} batch {run_['batch']:3d}: {run_['images_per_second']:9.1f} img/s, peak memory {run_['peak_memory_bytes'] * gb:8.1f} MiB")
    a, b = r["a_classifier_vs_classifier"], r["b_scoring_latents"]
    typer.echo(f"(a) latent vs image classifier: throughput x{a['throughput_ratio']:.1f}, memory x{a['memory_ratio']:.1f}, FLOPs x{a['flops_ratio']:.1f}, speedup/FLOPs ratio {a['speedup_over_flops_ratio']:.2f}; train step x{a['train_step_time_ratio']:.1f} faster, x{a['train_memory_ratio']:.1f} less memory")
    typer.echo(f"(b) latent model vs decode + image model: throughput x{b['throughput_ratio']:.1f}, memory x{b['memory_ratio']:.1f}, FLOPs x{b['flops_ratio']:.1f}, speedup/FLOPs ratio {b['speedup_over_flops_ratio']:.2f}")
    if json_out:
        atomic_write_json(json_out, r)


def _silence_third_party() -> None:
    """--quiet: no warnings and no hub progress bars from the libraries medlatent uses."""
    warnings.simplefilter("ignore")
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"


def main() -> None:
    # Library notices (diffusers' "accelerate not installed", hub notes) never come before
    # medlatent's own one-line errors; Python warnings print once per message, not per call.
    for name in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY", "HF_HUB_VERBOSITY"):
        os.environ.setdefault(name, "error")
    warnings.simplefilter("once")
    # Standalone mode: typer reports usage errors (bad options) itself, with exit code 2.
    try:
        app()
    except MedlatentError as err:
        typer.echo(f"medlatent: error: {err}", err=True)
        sys.exit(err.exit_code)


if __name__ == "__main__":
    main()
