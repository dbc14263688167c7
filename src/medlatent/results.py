"""Any command's results.json as one tidy table (`load_results`), and runs of one command side by
side (`run_compare`, `medlatent compare`: comparison.html and comparison.csv).

The table has one row per (autoencoder, model, space, run, metric), whatever the command:

- command, run_folder, dataset: the command that wrote the run (`gap`, `augment`, `audit`,
  `diffusion classify`, `counterfactual`), its folder and the dataset's name;
- autoencoder: the gap audit's and encoder audit's display name, augment's spec (None where the
  results do not name one); model: the classifier kind (gap: deep | linear; augment: deep;
  diffusion classify: diffusion | discriminative), else None;
- space: what is scored: a space ("latent"), a gap ("learnability gap"), a latent variant
  ("latent (noise-conditioned)"), a condition ("latent: real+synthetic"), a classifier, a
  difference ("latent: synthetic - real"), a counterfactual setting, or an encoder-audit section's
  path ("perturbation/families/noise/severity=1");
- quantity: score (of a classifier), difference (before - after, as the command defines it),
  share (of a gap closed) or measure (anything else: distances, rates, ratios);
- run: "mean" for the headline (the mean over runs), a run's name ("official/seed0") for its own
  score, "pooled out-of-fold" for the gap audit's pooled figure;
- metric, value, ci_low, ci_high (the 95% interval; NaN where none) and interval_method.

Nothing here imports a deep-learning library; pandas, jinja2 and matplotlib load on first use.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

from .errors import MedlatentInputError
from .io import atomic_write, atomic_write_text, read_json_object

COLUMNS = (
    "command",
    "run_folder",
    "dataset",
    "autoencoder",
    "model",
    "space",
    "quantity",
    "run",
    "metric",
    "value",
    "ci_low",
    "ci_high",
    "interval_method",
)
ADVICE = "rerun the command that wrote it"


class Rows:
    """The rows of one table; `under` gives a view that adds its rows with more context set."""

    def __init__(self, items: list[dict] | None = None, **context: Any) -> None:
        self.items = [] if items is None else items
        self.context = context

    def under(self, **context: Any) -> Rows:
        return Rows(self.items, **{**self.context, **context})

    def add(
        self,
        space: str,
        metric: str,
        value: Any,
        ci: Any = None,
        *,
        run: str = "mean",
        quantity: str = "score",
        method: str | None = None,
    ) -> None:
        low, high = (math.nan, math.nan) if ci is None else (number(ci[0]), number(ci[1]))
        self.items.append(
            {
                **self.context,
                "space": space,
                "quantity": quantity,
                "run": run,
                "metric": metric,
                "value": number(value),
                "ci_low": low,
                "ci_high": high,
                # a point without an interval has no interval method
                "interval_method": (method or self.context.get("interval_method")) if ci is not None else None,
            }
        )

    def summary(self, space: str, entries: dict, quantity: str = "score") -> None:
        """Each metric's {"value", "ci95"} (`evaluation.aggregate`); an undefined entry (None) as NaN."""
        for metric, entry in entries.items():
            if entry is None:  # e.g. the share of a gap whose interval contains 0
                self.add(space, metric, None, quantity=quantity)
            else:
                self.add(space, metric, entry["value"], entry["ci95"], quantity=quantity, method=entry.get("method"))

    def per_run(self, space: str, names: list[str], points: dict, quantity: str = "score") -> None:
        """Each run's point scores, {metric: [one per run]}, named by `names` in order."""
        for metric, values in points.items():
            for i, value in enumerate(values):
                self.add(space, metric, value, run=names[i] if i < len(names) else f"run {i}", quantity=quantity)


def number(value: Any) -> float:
    """A number of results.json as a float (null: NaN); anything else is a damaged file."""
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected a number, found {str(value)[:40]!r}")
    return float(value)


def results_path(run: str | Path) -> Path:
    """The results.json of a run folder (or the file itself), which must exist."""
    path = Path(run)
    path = path / "results.json" if path.is_dir() else path
    if not path.is_file():
        raise MedlatentInputError(f"{path}: no results.json here; give a run folder written by a medlatent command")
    return path


def load_results(run: str | Path):
    """A tidy pandas DataFrame of a run's results.json (`run`: its folder or the file), with the
    columns `COLUMNS` (see the module's docstring). A missing, damaged or unknown results.json is
    one MedlatentInputError naming the file."""
    return tidy_results(run)[1]


def tidy_results(run: str | Path) -> tuple[str, Any]:
    """The command that wrote a run (kept even where its table is empty) and `load_results`'s table."""
    import pandas as pd

    path = results_path(run)
    results = read_json_object(path, "results", ADVICE)
    kind = results.get("kind", "medlatent.gap")  # gap results of older versions carry no kind
    if not isinstance(kind, str) or kind not in READERS:
        raise MedlatentInputError(
            f"{path}: results of kind {str(kind)[:60]!r}; load_results reads those of "
            f"{', '.join(command for command, _ in READERS.values())}"
        )
    command, read = READERS[kind]
    try:
        rows = Rows(
            command=command,
            run_folder=str(path.parent),
            dataset=results["dataset"]["name"],
            autoencoder=None,
            model=None,
            interval_method=results.get("interval_method"),
        )
        read(results, rows)
    except MedlatentInputError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:  # cut short or edited by hand
        raise MedlatentInputError(
            f"{path}: not the complete results of a `medlatent {command}` run "
            f"({type(err).__name__}: {' '.join(str(err).split())[:120]}); {ADVICE}"
        ) from err
    frame = pd.DataFrame(rows.items, columns=list(COLUMNS))
    return command, frame.astype({"value": float, "ci_low": float, "ci_high": float})


# -- each command's results --------------------------------------------------------------------------


def gap_rows(results: dict, rows: Rows) -> None:
    """The gap audit: per (autoencoder, model) row, each space's headline and per-run scores, the
    gaps, the latent variants (and the share of the learnability gap each closes), the diffusion
    classifier rows (and each space minus them) and the intermediate decoder stages (and the
    reconstruction minus each)."""
    for row in results["rows"]:
        here = rows.under(
            autoencoder=row.get("autoencoder_name") or row["autoencoder"],
            model=row["model"],
            interval_method=row.get("interval_method", results.get("interval_method")),
        )
        names = row["per_run"]["runs"]
        for space, entries in row["scores"].items():
            here.summary(space, entries)
        for gap, entries in row["gaps"].items():
            here.summary(f"{gap} gap", entries, "difference")
        for space, points in row["per_run"]["scores"].items():
            here.per_run(space, names, points)
        for space, pooled in (row.get("pooled_out_of_fold") or {}).items():
            for metric, value in pooled.items():
                here.add(space, metric, value, run="pooled out-of-fold")
        for variant, v in (row.get("variants") or {}).items():
            space = f"latent ({variant})"
            here.summary(space, v["scores"])
            here.summary(f"{space}: share of learnability gap closed", v["share_of_gap_closed"], "share")
            here.per_run(space, names, v["per_run"])
            for key in ("inference_samples_per_second", "prefix_flops"):  # whitened and decoder-prefix variants
                if (v.get("throughput") or {}).get(key) is not None:
                    here.add(space, key, v["throughput"][key], quantity="measure")
        for label, d in (row.get("diffusion_classifiers") or {}).items():
            space = f"diffusion classifier {label}"
            here.summary(space, d["scores"])
            here.add(space, "evaluations_per_image", d["evaluations_per_image"], quantity="measure")
            for before, entries in d["space_minus_diffusion"].items():
                here.summary(f"{before} - {space}", entries, "difference")
            here.per_run(space, names, d["per_run"])
        for stage in (row.get("decoder_stages") or {}).get("stages", []):
            if stage["space"] in row["scores"]:
                continue  # the latent and the reconstruction: their spaces above
            here.summary(stage["space"], stage["scores"])
            here.summary(f"reconstruction - {stage['space']}", stage["difference_to_reconstruction"], "difference")
            here.per_run(stage["space"], names, stage["per_run"])


def augment_rows(results: dict, rows: Rows) -> None:
    """Generative augmentation: per space and condition, the headline and per-seed scores and the
    difference to real only; and the quality of the synthetic images (mean over seeds)."""
    here = rows.under(autoencoder=(results.get("model") or {}).get("autoencoder"), model="deep")
    for space, conditions in results["table"].items():
        for condition, row in conditions.items():
            where = f"{space}: {condition}"
            here.summary(where, row["scores"])
            if row.get("difference_vs_real"):
                here.summary(f"{where} - real", row["difference_vs_real"], "difference")
            here.per_run(where, [h["run"] for h in row.get("health", [])], row["per_seed"])
    quality = results.get("quality")
    if quality:
        judged = rows.under(autoencoder=here.context["autoencoder"])
        for key in ("frechet_distance", "precision", "recall", "near_copy_share"):
            judged.add("synthetic images", key, quality[key], quantity="measure")
        for name, value in quality["class_consistency"].items():
            judged.add("synthetic images", f"class_consistency: {name}", value, quantity="measure")


# The keys that name an item of a list in the encoder audit's and counterfactual's results.
ITEM_KEYS = ("severity", "n", "diameter", "contrast", "strength", "drift", "class", "confounder")
AUDIT_INTERVALS = {"mutual_information": "subsampling"}  # the others: bootstrap (`_auroc_ci`)


def audit_rows(results: dict, rows: Rows) -> None:
    """The encoder audit: one row per numeric leaf of each section of each autoencoder's card, its
    path in `space` ("perturbation/families/noise/severity=1") and its key in `metric`; a
    {"value", "ci95"} leaf is one row with its interval."""
    for card in results["autoencoders"]:
        here = rows.under(autoencoder=card["autoencoder"].get("name") or card["autoencoder"]["spec"])
        for section, value in card["sections"].items():
            leaf_rows(here, [section], value)


def leaf_rows(rows: Rows, path: list[str], node: Any) -> None:
    """The numeric leaves under `node`, each a row (timings, flags and text left out)."""
    space, key = "/".join(path[:-1]), path[-1]
    if isinstance(node, dict) and {"value", "ci95"} <= set(node):
        method = AUDIT_INTERVALS.get(key, "bootstrap")
        rows.add(space, key, node["value"], node["ci95"], quantity="measure", method=method)
    elif isinstance(node, dict):
        for name, value in node.items():
            if name != "seconds":
                leaf_rows(rows, [*path, str(name)], value)
    elif isinstance(node, list) and all(isinstance(item, dict) for item in node):
        for i, item in enumerate(node):
            label = ",".join(f"{k}={item[k]}" for k in ITEM_KEYS if k in item) or str(i)
            leaf_rows(rows, [*path, label], {k: v for k, v in item.items() if k not in ITEM_KEYS})
    elif isinstance(node, list):
        for i, value in enumerate(node):
            leaf_rows(rows, [*path[:-1], f"{key}[{i}]"], value)
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        rows.add(space, key, node, quantity="measure")


def diffusion_classify_rows(results: dict, rows: Rows) -> None:
    """The diffusion classifier: each decision rule's and discriminative classifier's scores and
    network evaluations per image, the differences to the discriminative classifiers and of each
    early stop to the full vote, selective prediction and the explanation maps' peaks."""
    here = rows.under(interval_method="bootstrap")  # its intervals: bootstrap of the held-out images
    vote = f"vote ({results['draws']} draws)"
    for name, c in results["classifiers"].items():
        rule = here.under(model=c.get("kind"))
        rule.summary(name, c["scores"])
        rule.add(name, "evaluations_per_image", c["evaluations_per_image"], quantity="measure")
    for name, entries in results["difference_to_discriminative"].items():
        here.summary(name, entries, "difference")
    for name, e in results["early_stopping"].items():
        here.summary(f"{name} - {vote}", e["difference_to_full_vote"], "difference")
        for key in ("evaluation_share", "same_class_as_full_vote"):
            here.add(name, key, e[key], quantity="measure")
    for name, u in (results.get("uncertainty") or {}).items():
        for key in ("aurc", "error_rate"):
            here.add(f"selective prediction, {name}", key, u[key], quantity="measure")
    for name, p in ((results.get("explanations") or {}).get("peak_on_lesion") or {}).items():
        here.add(f"explanation {name}", "peak_on_lesion", p["rate"], p["ci95"], quantity="measure", method="wilson")


def counterfactual_rows(results: dict, rows: Rows) -> None:
    """Counterfactuals: per (strength, drift), proximity, sparsity, realism and the rates (validity,
    peak on the lesion) with their Wilson intervals; the drift search's curve and choice."""
    for row in results["curves"]:
        space = f"strength {number(row['strength']):g}, drift {number(row['drift']):+g}"
        for key, value in row.items():
            if isinstance(value, dict):
                rows.add(space, key, value["rate"], value["ci95"], quantity="measure", method="wilson")
            elif key not in ("strength", "drift", "sigma"):  # the setting itself, in `space`
                rows.add(space, key, value, quantity="measure")
    search = results.get("drift_search")
    if search:
        where = f"drift search, strength {number(search['strength']):g}"
        for point in search["curve"]:
            distance = point[search["distance"]]
            rows.add(f"{where}, drift {number(point['drift']):+g}", search["distance"], distance, quantity="measure")
        rows.add(where, "chosen_drift", search["chosen"], quantity="measure")


# Each results kind: the command that writes it and the reader of its rows.
READERS = {
    "medlatent.gap": ("gap", gap_rows),
    "augment": ("augment", augment_rows),
    "medlatent.audit": ("audit", audit_rows),
    "medlatent.diffusion_classifier": ("diffusion classify", diffusion_classify_rows),
    "medlatent.counterfactual": ("counterfactual", counterfactual_rows),
}


# -- medlatent compare ------------------------------------------------------------------------------

FIGURE_SPACES = 24  # the figure draws at most this many spaces; the table and comparison.csv keep every one
FIGURED = ("score", "measure")  # the figure leaves out gaps, differences and shares: they sit on another scale


def run_compare(config) -> dict:
    """Runs of one command side by side (`config`: a `CompareConfig`): comparison.csv (their
    `load_results` tables, concatenated) and comparison.html (the headline of one metric per
    (autoencoder, model, space), one column per run, with intervals, and a figure), built beside
    `config.run.out` and renamed to it when complete. Returns what was written."""
    import pandas as pd

    from .rundir import check_out, finish_folder, mark, partial_folder, write_settings

    out = check_out(config.run.out, "compare", overwrite=config.run.overwrite)
    read = [tidy_results(run) for run in config.runs]
    command = one_command(config.runs, [c for c, _ in read])
    frames, labels = [frame for _, frame in read], run_labels(config.runs)
    table = pd.concat(frames, ignore_index=True)
    metric = chosen_metric(config.metric, table)
    html = render_comparison(command, frames, labels, metric)
    tmp = partial_folder(out)
    shutil.rmtree(tmp, ignore_errors=True)  # a previous attempt's, never a finished run
    mark(tmp, "compare")
    write_settings(tmp / "config.yaml", config)
    atomic_write(tmp / "comparison.csv", lambda path: table.to_csv(path, index=False))
    atomic_write_text(tmp / "comparison.html", html)
    folder = finish_folder(tmp, out, "compare")
    return {
        "out": str(folder),
        "command": command,
        "metric": metric,
        "runs": labels,
        "rows": len(table),
        "files": ["comparison.html", "comparison.csv"],
    }


def one_command(runs: list[str], commands: list[str]) -> str:
    """The command every run was written by; runs of several commands are one error naming them."""
    by_command: dict[str, list[str]] = {}
    for run, command in zip(runs, commands, strict=True):
        by_command.setdefault(command, []).append(str(run))
    if len(by_command) > 1:
        found = "; ".join(f"`medlatent {c}`: {', '.join(r)}" for c, r in by_command.items())
        raise MedlatentInputError(f"compare: these runs come from different commands ({found}); compare runs of one")
    return commands[0]


def run_labels(runs: list[str]) -> list[str]:
    """Each run's column heading: its folder's name; its path where names repeat; numbered where paths do."""
    folders = [results_path(run).parent for run in runs]
    names, paths = [folder.name or str(folder) for folder in folders], [str(folder) for folder in folders]
    names = [
        path if names.count(name) > 1 and paths.count(path) == 1 else name
        for path, name in zip(paths, names, strict=True)
    ]
    return [f"{name} ({i + 1})" if names.count(name) > 1 else name for i, name in enumerate(names)]


def chosen_metric(metric: str | None, table) -> str:
    """The metric the page shows: the one asked for (it must be among the runs' headlines), else
    AUROC where the runs have it, else their first."""
    present = list(dict.fromkeys(table.loc[table["run"] == "mean", "metric"]))
    if metric is None:
        return "auroc" if "auroc" in present or not present else present[0]
    if metric not in present:
        shown = ", ".join(present[:12]) + (", ..." if len(present) > 12 else "")
        raise MedlatentInputError(f"--metric {metric}: not among these runs' metrics; use one of {shown}")
    return metric


def side_by_side(frames: list, labels: list[str], metric: str) -> list[dict]:
    """The headline of `metric` per (autoencoder, model, space), in order of first appearance,
    with one cell per run that has it: {"value", "ci"} as text."""
    table: dict[tuple, dict] = {}
    for label, frame in zip(labels, frames, strict=True):
        headline = frame[(frame["run"] == "mean") & (frame["metric"] == metric)]
        for row in headline.itertuples(index=False):
            key = (row.autoencoder, row.model, row.space)
            entry = table.setdefault(
                key, {"autoencoder": row.autoencoder, "model": row.model, "space": row.space, "cells": {}}
            )
            signed = row.quantity == "difference"
            interval = f"[{shown(row.ci_low, signed)}, {shown(row.ci_high, signed)}]"
            entry["cells"][label] = {
                "value": shown(row.value, signed),
                "ci": interval if math.isfinite(row.ci_low) else "",
            }
    return list(table.values())


def shown(value: float, signed: bool = False) -> str:
    if not math.isfinite(value):
        return "n/a"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def render_comparison(command: str, frames: list, labels: list[str], metric: str) -> str:
    """The comparison page, self-contained (the figure inline)."""
    import base64

    from .reports.html import template

    rows = side_by_side(frames, labels, metric)
    runs = [
        {
            "label": label,
            "folder": frame["run_folder"].iloc[0] if len(frame) else "",
            "dataset": frame["dataset"].iloc[0] if len(frame) else "",
            "intervals": ", ".join(sorted(set(frame["interval_method"].dropna()))) or "none",
        }
        for label, frame in zip(labels, frames, strict=True)
    ]
    png, drawn = comparison_plot(frames, labels, metric)
    return template("comparison.html.j2").render(
        command=command,
        metric=metric,
        runs=runs,
        labels=labels,
        rows=rows,
        show_autoencoder=any(r["autoencoder"] is not None for r in rows),
        show_model=any(r["model"] is not None for r in rows),
        figure=f"data:image/png;base64,{base64.b64encode(png).decode()}" if png else None,
        drawn=drawn,
    )


def comparison_plot(frames: list, labels: list[str], metric: str) -> tuple[bytes | None, dict]:
    """Bars of the headline `metric` per space (scores and measures; at most FIGURE_SPACES), one
    bar per run (per autoencoder and model of a run that has several), with the 95% intervals.
    Returns the PNG (None where nothing is drawn) and how many spaces it draws of how many."""
    import io

    import numpy as np
    from matplotlib.figure import Figure  # no pyplot: no backend to choose, nothing left open

    from .reports.plots import SCORE_AXIS

    series: dict[str, dict] = {}
    for label, frame in zip(labels, frames, strict=True):
        chosen = frame[(frame["run"] == "mean") & (frame["metric"] == metric) & frame["quantity"].isin(FIGURED)]
        keys = list(dict.fromkeys(zip(chosen["autoencoder"], chosen["model"], strict=True)))
        for row in chosen.itertuples(index=False):
            parts = [p for p in (row.autoencoder, row.model) if p is not None]
            name = label if len(keys) == 1 or not parts else f"{label}: {' '.join(map(str, parts))}"
            series.setdefault(name, {})[row.space] = (row.value, row.ci_low, row.ci_high)
    spaces = list(dict.fromkeys(space for points in series.values() for space in points))
    drawn = {"spaces": min(len(spaces), FIGURE_SPACES), "of": len(spaces)}
    if not spaces:
        return None, drawn
    spaces = spaces[:FIGURE_SPACES]
    x, width = np.arange(len(spaces)), 0.8 / len(series)
    fig = Figure(figsize=(min(16.0, max(5.0, 0.3 * len(spaces) * (len(series) + 1))), 3.6))
    ax = fig.subplots()
    for j, (name, points) in enumerate(series.items()):
        value, low, high = (np.array([points.get(s, (np.nan,) * 3)[k] for s in spaces]) for k in range(3))
        at = x + (j - (len(series) - 1) / 2) * width
        ax.bar(at, value, width, label=name)
        ax.errorbar(at, value, yerr=[value - low, high - value], fmt="none", ecolor="black", capsize=2, lw=1)
    crowded = len(spaces) * max(map(len, spaces)) > 60  # the names would overlap side by side
    ax.set_xticks(x, spaces, fontsize=8, rotation=30 if crowded else 0, ha="right" if crowded else "center")
    ax.set_ylabel(metric.replace("_", " "))
    if metric in SCORE_AXIS:
        ax.set_ylim(*SCORE_AXIS[metric])
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=min(3, len(series)), loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue(), drawn
