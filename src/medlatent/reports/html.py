"""results.json and the self-contained report.html built from it and the files beside it (sample images)."""

from __future__ import annotations

import base64
import functools
import json
from pathlib import Path

from ..errors import MedlatentInputError
from ..evaluation.health import ADVICE
from ..io import atomic_write_json, atomic_write_text, read_json_object
from . import plots


def write_results(path: str | Path, results: dict) -> Path:
    return atomic_write_json(path, results)


def read_results(run: str | Path) -> dict:
    """A run's results.json, checked to be one `report` can draw (see `rebuild_report`)."""
    path = Path(run)
    path = path / "results.json" if path.is_dir() else path
    if not path.is_file():
        raise MedlatentInputError(f"{path}: no results.json here; give a run folder written by a medlatent command")
    results = read_json_object(path, "results", "rerun the command that wrote it")
    kind = results.get("kind", "medlatent.gap")  # gap results of older versions carry no kind
    if kind not in REPORTS:
        raise MedlatentInputError(
            f"{path}: results of kind {kind!r}; `medlatent report` "
            f"rebuilds the reports of {', '.join(sorted(REPORTS))}"
        )
    if kind == "medlatent.gap" and (
        not isinstance(results.get("rows"), list) or any("classifiers" not in row for row in results["rows"])
    ):
        raise MedlatentInputError(
            f"{path}: not the results of a complete `medlatent gap` run (no rows with "
            "per-run scores and training health; an older medlatent?); rerun the audit"
        )
    return results


def rebuild_report(results: dict, folder: str | Path) -> list[str]:
    """The report pages of a run folder drawn from its results (each command's own); their names."""
    folder = Path(folder)
    kind = results.get("kind", "medlatent.gap")
    if kind == "medlatent.audit":
        return write_encoder_audit_report(folder, results)
    REPORTS[kind](folder / "report.html", results, folder)
    return ["report.html"]


def _data_uri(png: bytes) -> str:
    return f"data:image/png;base64,{base64.b64encode(png).decode()}"


def _p2(value) -> str:
    """A p-value to 2 significant digits."""
    return "n/a" if value is None else f"{value:.2g}"


def _num(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def format_flops(flops: float | None) -> str:
    """A FLOP count with an SI prefix, to 3 significant digits (e.g. "11.2 MFLOPs")."""
    if flops is None:
        return "n/a"
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(flops) >= scale:
            return f"{flops / scale:.3g} {prefix}FLOPs"
    return f"{flops:.3g} FLOPs"


@functools.lru_cache(maxsize=2)
def template(name: str = "gap_report.html.j2"):
    """A report page's template (HTML: escaped; an undefined name is an error), with the report filters."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("medlatent.reports", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters.update(p2=_p2, num=_num, flops=format_flops)
    return env.get_template(name)


def render_report(results: dict, run_dir: str | Path | None = None) -> str:
    """The report page; `run_dir` holds the files results.json refers to (the sample images)."""
    metric = results.get("primary_metric", "auroc")
    ds, rows = results["dataset"], results["rows"]
    prov = results.get("provenance", {})
    nested = prov.get("config", {})
    config = flat_settings(nested)
    warnings = health_warnings(rows)
    samples = results.get("samples")
    figures = {
        "scores": _data_uri(plots.scores_plot(rows, metric)),
        "sweeps": [
            _data_uri(plots.sigma_sweep_plot(r))
            for r in rows
            if any(v.get("sigma_sweep") for v in r.get("variants", {}).values())
        ],
        "pareto": [
            _data_uri(plots.accuracy_throughput_plot(front))
            for front in results.get("accuracy_throughput", [])
            if any(p["samples_per_second"] for p in front["points"])
        ],
        "rocs": [_data_uri(plots.roc_plot(r)) for r in rows if any(c["roc"] for c in r["classifiers"].values())],
        "calibration": [_data_uri(plots.calibration_plot(r)) for r in rows],
        "curves": [_data_uri(plots.curves_plot(r)) for r in rows if r["model"] == "deep"],
        "decoder": [_data_uri(plots.decoder_stages_plot(r, metric)) for r in rows if r.get("decoder_stages")],
        "samples": _data_uri(plots.sample_grid(samples, run_dir)) if samples and run_dir is not None else None,
    }
    interval_text = _interval_text(results.get("interval_method", "bootstrap"), "runs", "space")
    return template().render(
        results=results,
        ds=ds,
        rows=rows,
        metric=metric,
        spaces=("image", "reconstruction", "latent"),
        other_metrics=("balanced_accuracy", "mcc"),
        config=config,
        prov=prov,
        protocol=_protocol(config),
        interval_text=interval_text,
        warnings=warnings,
        advice=ADVICE,
        upscaled=ds.get("native_min_side") is not None and ds["native_min_side"] < ds["size"],
        axis=plots.SCORE_AXIS[metric],
        pooled_rows=[r for r in rows if r.get("pooled_out_of_fold")],
        variant_rows=[
            (r, n, v, _variant_speed(results, r, n, v)) for r in rows for n, v in r.get("variants", {}).items()
        ],
        decoder_rows=[r for r in rows if r.get("decoder_stages")],
        shortcut_rows=[r for r in rows if r.get("shortcuts")],
        variant_kinds=_variant_kinds(config.get("latent_variants") or []),
        figures=figures,
        prov_json=json.dumps({"provenance": prov, "timings_seconds": results.get("timings_seconds")}, indent=2),
    )


def _variant_kinds(variants: list[str]) -> dict[str, bool]:
    """Which kinds of latent variant a run has, for the report's description of them."""
    return {
        "noisy": any(v in ("noise-conditioned", "distilled") for v in variants),
        "whitened": "whitened" in variants,
        "prefix": any(v.startswith("decoder-prefix:") for v in variants),
    }


def _variant_speed(results: dict, row: dict, name: str, variant: dict) -> dict | None:
    """A latent variant's throughput (measured inference samples/s, decoder prefix FLOPs): its own
    record (whitened, decoder-prefix), else its point of the run's accuracy against throughput."""
    if variant.get("throughput"):
        return variant["throughput"]
    for front in results.get("accuracy_throughput", []):
        if front["autoencoder"] == row["autoencoder_name"]:
            for point in front["points"]:
                if point["classifier"] == f"latent ({name})":
                    return {"inference_samples_per_second": point["samples_per_second"], "prefix_flops": 0}
    return None


def flat_settings(nested: dict) -> dict:
    """A run's settings as its provenance keeps them (nested configs as dicts), flat, as options name them."""
    flat = dict(nested)
    for part in ("data", "train", "run"):
        flat.update(nested.get(part) or {})
    return flat


def _interval_text(method: str, runs: str, compared: str) -> str:
    if method == "t":
        return f"Brackets are 95% t intervals across {runs} (for differences: over the per-run differences)."
    return (
        "Brackets are paired bootstrap 95% intervals: each run's test set is resampled (the "
        f"same resamples for every {compared}) and the replicate is the mean over {runs}."
    )


def render_augment_report(results: dict, run_dir: str | Path) -> str:
    """The generative-augmentation page: the table per space, quality measures, sample grids."""
    prov = results.get("provenance", {})
    nested = prov.get("config", {})
    config = flat_settings(nested)
    warnings = [
        f"{space} / {condition} {h['run']}: {'; '.join(h['flags'])}"
        for space, rows in results["table"].items()
        for condition, row in rows.items()
        for h in row["health"]
        if h["flags"]
    ]
    grids = {}
    for name, file in (results.get("synthetic_grids") or {}).items():
        path = Path(run_dir) / file
        if path.is_file():
            grids[name] = _data_uri(path.read_bytes())
    return template("augment_report.html.j2").render(
        results=results,
        ds=results["dataset"],
        config=config,
        metrics=results["metrics"],
        warnings=warnings,
        advice=ADVICE,
        grids=grids,
        interval_text=_interval_text(results["interval_method"], "seeds", "condition"),
        prov_json=json.dumps({"provenance": prov, "timings_seconds": results.get("timings_seconds")}, indent=2),
    )


def write_augment_report(path: str | Path, results: dict, run_dir: str | Path) -> Path:
    return atomic_write_text(Path(path), render_augment_report(results, run_dir))


def health_warnings(rows: list[dict]) -> list[str]:
    """One line per flagged classifier run: "<space of autoencoder> (<model>) <run>: <flags>"."""
    lines = []
    for r in rows:
        stages = (r.get("decoder_stages") or {}).get("stages", [])
        named = (
            [(space, c) for space, c in r["classifiers"].items()]
            + [(f"latent ({n})", v["classifier"]) for n, v in r.get("variants", {}).items()]
            + [(s["space"], s) for s in stages if s["space"] not in r["classifiers"]]
        )
        for space, c in named:
            where = (
                "images" if space == "image" else f"{space} of {r['autoencoder_name']}"
            )  # the image space is shared by every autoencoder
            lines += [f"{where} ({r['model']}) {h['run']}: {'; '.join(h['flags'])}" for h in c["health"] if h["flags"]]
    return list(dict.fromkeys(lines))


def _protocol(config: dict) -> str:
    if not config:
        return "see provenance"
    init = "ImageNet-pretrained" if config.get("pretrained") else "random init"
    return (
        f"{config.get('backbone')} ({init}), loss {config.get('loss')}, up to {config.get('epochs')} "
        f"epochs with early stopping (patience {config.get('patience')}) on validation "
        f"balanced accuracy; latents standardised to std {config.get('latent_std')} with "
        f"{config.get('latent_mask')} masking; linear probe {'on' if config.get('linear_probe') else 'off'}"
    )


def write_report(path: str | Path, results: dict, run_dir: str | Path | None = None) -> Path:
    path = Path(path)
    return atomic_write_text(path, render_report(results, run_dir if run_dir is not None else path.parent))


def render_diffusion_classifier_report(results: dict, run_dir: str | Path) -> str:
    """The diffusion classifier's page: scores beside the discriminative rows, early stopping,
    uncertainty (risk-coverage) and explanation overlays."""
    from .plots import risk_coverage_plot

    overlays = []
    for file in (results.get("explanations") or {}).get("files", [])[:24]:
        path = Path(run_dir) / file
        if path.is_file():
            overlays.append(_data_uri(path.read_bytes()))
    return template("diffusion_classifier_report.html.j2").render(
        results=results,
        ds=results["dataset"],
        metrics=list(next(iter(results["classifiers"].values()))["scores"]),
        risk_plot=_data_uri(risk_coverage_plot(results["uncertainty"])),
        overlays=overlays,
        timings=json.dumps(
            {"seconds": results["seconds"], "images_per_second": results["images_per_second"]}, indent=2
        ),
    )


def write_diffusion_classifier_report(path: str | Path, results: dict, run_dir: str | Path) -> Path:
    return atomic_write_text(Path(path), render_diffusion_classifier_report(results, run_dir))


def write_counterfactual_report(path: str | Path, results: dict, run_dir: str | Path) -> Path:
    """The counterfactual page: the curves over strength and drift, the drift search, examples."""
    from .plots import drift_curve_plot

    examples = [
        _data_uri((Path(run_dir) / f).read_bytes())
        for f in results.get("examples", [])
        if (Path(run_dir) / f).is_file()
    ]
    search = results.get("drift_search")
    html = template("counterfactual_report.html.j2").render(
        results=results,
        ds=results["dataset"],
        examples=examples,
        drift_plot=_data_uri(drift_curve_plot(search["curve"], search.get("distance", "frechet_distance")))
        if search
        else None,
    )
    return atomic_write_text(Path(path), html)


def write_encoder_audit_report(out: str | Path, results: dict) -> list[str]:
    """One audit card per autoencoder (report-<name>.html) and report.html, the cards side by side."""
    out = Path(out)
    files = []
    for card in results["autoencoders"]:
        sections = card["sections"]
        figures = {
            "perturbation": _data_uri(plots.perturbation_plot(sections["perturbation"]))
            if "perturbation" in sections
            else None,
            "probes": _data_uri(plots.learnability_map(sections["probes"])) if "probes" in sections else None,
            "robustness": _data_uri(plots.robustness_plot(sections["robustness"]))
            if "robustness" in sections
            else None,
            "ood": _data_uri(plots.ood_plot(sections["robustness"]["ood_heads"]))
            if "robustness" in sections
            else None,
            "information": _data_uri(plots.information_plot(sections["information"]))
            if "information" in sections
            else None,
        }
        name = (
            "report-" + "".join(c if c.isalnum() or c in "-_." else "_" for c in card["autoencoder"]["name"]) + ".html"
        )
        atomic_write_text(
            out / name,
            template("encoder_audit_report.html.j2").render(
                results=results, card=card, s=sections, figures=figures, ds=results["dataset"]
            ),
        )
        files.append(name)
    atomic_write_text(
        out / "report.html",
        template("encoder_audit_index.html.j2").render(results=results, files=files, ds=results["dataset"]),
    )
    return ["report.html", *files]


# The report writer of each kind of results (write_encoder_audit_report writes one page per autoencoder).
REPORTS = {
    "medlatent.gap": write_report,
    "augment": write_augment_report,
    "medlatent.diffusion_classifier": write_diffusion_classifier_report,
    "medlatent.counterfactual": write_counterfactual_report,
    "medlatent.audit": write_encoder_audit_report,
}
