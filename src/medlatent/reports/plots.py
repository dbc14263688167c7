"""Figures of the report, returned as PNG bytes (matplotlib, no display)."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

SPACE_COLORS = {"image": "#4c72b0", "reconstruction": "#55a868", "latent": "#c44e52"}
CURVE_COLORS = {
    **SPACE_COLORS,
    "latent (noise-conditioned)": "#8172b2",
}  # the spaces and the extra classifiers of the encoder audit


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


SCORE_AXIS = {"auroc": (0.4, 1.0), "balanced_accuracy": (0.4, 1.0), "mcc": (-0.2, 1.0)}  # stated under the chart


def scores_plot(rows: list[dict], metric: str = "auroc") -> bytes:
    """Score per space with 95% intervals, one group per (autoencoder, model); y axis SCORE_AXIS[metric]."""
    fig, ax = plt.subplots(figsize=(max(4.5, 1.9 * len(rows)), 3.4))
    width = 0.26
    spaces = list(SPACE_COLORS)
    for j, space in enumerate(spaces):
        present = [i for i, r in enumerate(rows) if space in r["scores"]]  # encoder-only rows have no reconstruction
        if not present:
            continue
        values = np.array([rows[i]["scores"][space][metric]["value"] for i in present])
        lo = values - np.array([rows[i]["scores"][space][metric]["ci95"][0] for i in present])
        hi = np.array([rows[i]["scores"][space][metric]["ci95"][1] for i in present]) - values
        x = np.array(present) + (j - 1) * width
        ax.bar(x, values, width, color=SPACE_COLORS[space], label=space)
        ax.errorbar(x, values, yerr=[lo, hi], fmt="none", ecolor="black", capsize=3, lw=1)
    ax.set_xticks(np.arange(len(rows)), [f"{r['autoencoder_name']}\n{r['model']}" for r in rows], fontsize=8)
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_ylim(*SCORE_AXIS[metric])
    ax.legend(fontsize=8, ncol=3, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def roc_plot(row: dict) -> bytes:
    """ROC curves of one (autoencoder, model) row, one per space, averaged over runs."""
    fig, ax = plt.subplots(figsize=(3.4, 3.2))
    for space, summary in row["classifiers"].items():
        curve = summary["roc"]
        if curve:
            ax.plot(
                curve["fpr"],
                curve["tpr"],
                color=SPACE_COLORS[space],
                label=f"{space} ({row['scores'][space]['auroc']['value']:.3f})",
            )
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"{row['autoencoder_name']}: {row['model']} model", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    return _png(fig)


def calibration_plot(row: dict) -> bytes:
    """Reliability diagram of one row: observed accuracy against confidence per bin, per space."""
    fig, ax = plt.subplots(figsize=(3.4, 3.2))
    for space, summary in row["classifiers"].items():
        cal = summary["calibration"]
        points = [(c, a) for c, a, n in zip(cal["confidence"], cal["accuracy"], cal["count"], strict=False) if n > 0]
        if points:
            ax.plot(
                *zip(*points, strict=False),
                marker="o",
                ms=3,
                color=SPACE_COLORS[space],
                label=f"{space} (ECE {cal['ece']:.3f})",
            )
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("observed accuracy")
    ax.set_title(f"{row['autoencoder_name']}: {row['model']} model", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    return _png(fig)


def curves_plot(row: dict) -> bytes:
    """Training loss and validation balanced accuracy per epoch, every run of every space."""
    fig, axes = plt.subplots(1, 2, figsize=(7.2, 3.0))
    for space, summary in row["classifiers"].items():
        for k, curve in enumerate(summary["curves"]):
            epochs = np.arange(1, len(curve["loss"]) + 1)
            label = space if k == 0 else None
            axes[0].plot(epochs, curve["loss"], color=SPACE_COLORS[space], alpha=0.7, lw=1, label=label)
            axes[1].plot(
                epochs, curve["val_balanced_accuracy"], color=SPACE_COLORS[space], alpha=0.7, lw=1, label=label
            )
    axes[0].set_ylabel("training loss")
    axes[1].set_ylabel("validation balanced accuracy")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle(f"{row['autoencoder_name']}: {row['model']} model", fontsize=9)
    fig.tight_layout()
    return _png(fig)


def sigma_sweep_plot(row: dict) -> bytes:
    """AUROC and balanced accuracy of each noise-conditioned variant against sigma (log scale)."""
    fig, axes = plt.subplots(1, 2, figsize=(7.2, 3.0))
    for name, variant in row["variants"].items():
        sweep = variant.get("sigma_sweep")
        if not sweep:  # a variant that is not noise-conditioned (whitened, decoder-prefix)
            continue
        for ax, metric in zip(axes, ("auroc", "balanced_accuracy"), strict=False):
            ax.plot(sweep["sigma"], sweep[metric], marker="o", ms=3, label=name)
    for ax, metric in zip(axes, ("auroc", "balanced_accuracy"), strict=False):
        ax.axhline(
            row["scores"]["latent"][metric]["value"],
            ls="--",
            color=SPACE_COLORS["latent"],
            lw=0.8,
            label="plain latent (clean)",
        )
        ax.set_xscale("log")
        ax.set_xlabel("sigma")
        ax.set_ylabel(metric.replace("_", " "))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(row["autoencoder_name"], fontsize=9)
    fig.tight_layout()
    return _png(fig)


def decoder_stages_plot(row: dict, metric: str = "auroc") -> bytes:
    """Score against decoder stage (latent .. reconstruction) of one row, with 95% intervals; the
    image space as a horizontal reference line and the reconstruction's interval as a band (a
    stage whose point lies in it has closed the gap); y axis SCORE_AXIS[metric]."""
    along = row["decoder_stages"]
    stages = along["stages"]
    values = np.array([s["scores"][metric]["value"] for s in stages])
    lo = values - np.array([s["scores"][metric]["ci95"][0] for s in stages])
    hi = np.array([s["scores"][metric]["ci95"][1] for s in stages]) - values
    x = np.arange(len(stages))
    fig, ax = plt.subplots(figsize=(max(4.5, 0.8 * len(stages) + 1.5), 3.2))
    reference = row["scores"]["reconstruction"][metric]["ci95"]
    ax.axhspan(*reference, color=SPACE_COLORS["reconstruction"], alpha=0.12, lw=0, label="reconstruction 95% interval")
    image = row["scores"]["image"][metric]["value"]
    ax.axhline(image, ls="--", lw=1, color=SPACE_COLORS["image"], label=f"image ({image:.3f})")
    ax.plot(x, values, color="#555555", lw=1, zorder=2)
    ax.errorbar(x, values, yerr=[lo, hi], fmt="none", ecolor="black", capsize=3, lw=1, zorder=3)
    colors = [SPACE_COLORS.get(s["space"], "#555555") for s in stages]
    ax.scatter(x, values, c=colors, s=30, zorder=4)
    ax.set_xticks(x, [s["name"] for s in stages], fontsize=8)
    ax.set_xlabel("decoder stage")
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_ylim(*SCORE_AXIS[metric])
    ax.grid(axis="y", alpha=0.3)
    closing = along["closing_stage_by_metric"].get(metric)
    ax.set_title(f"{row['autoencoder_name']}: {row['model']} model; closing stage: {closing or 'none'}", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    return _png(fig)


def accuracy_throughput_plot(front: dict) -> bytes:
    """One autoencoder's classifiers: score against measured inference throughput (samples/s, log
    scale; the image classifier from images, the others from latents), each point labelled, the
    Pareto front (no other classifier both scores higher and runs faster) joined and ringed."""
    metric = front["metric"]
    points = [p for p in front["points"] if p["samples_per_second"] and np.isfinite(p[metric]["value"])]
    labels: dict[tuple, list[str]] = {}  # one classifier under two names (a variant that is a stage's) is one point
    for p in points:
        labels.setdefault((p["samples_per_second"], p[metric]["value"]), []).append(p["classifier"])
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for p in points:
        color = SPACE_COLORS["image"] if p["input"] == "images" else SPACE_COLORS["latent"]
        marker = "s" if p["input"] == "images" else "o"
        lo, hi = p[metric]["ci95"]
        value = p[metric]["value"]
        x = p["samples_per_second"]
        ax.errorbar(x, value, yerr=[[value - lo], [hi - value]], fmt="none", ecolor="#999999", lw=0.8, zorder=1)
        ax.scatter(x, value, c=color, marker=marker, s=28, zorder=3)
        names = labels.pop((x, value), None)
        if names:
            ax.annotate(" = ".join(names), (x, value), fontsize=6.5, xytext=(4, 3), textcoords="offset points")
    front_points = sorted((p for p in points if p["pareto"]), key=lambda p: p["samples_per_second"])
    if front_points:
        xs, ys = [p["samples_per_second"] for p in front_points], [p[metric]["value"] for p in front_points]
        ax.plot(xs, ys, color="black", lw=1, ls="--", zorder=2, label="Pareto front")
        ax.scatter(xs, ys, facecolors="none", edgecolors="black", s=90, lw=1, zorder=4)
    ax.set_xscale("log")
    ax.set_xlabel("inference samples/s (measured; log scale)")
    ax.set_ylabel(metric.replace("_", " "))
    ax.grid(alpha=0.3)
    ax.set_title(f"{front['autoencoder']}: accuracy against throughput", fontsize=9)
    if front_points:
        ax.legend(fontsize=7, loc="lower left")
    return _png(fig)


def sample_grid(samples: dict, run_dir) -> bytes:
    """Originals (top row) and each autoencoder's reconstructions below, titled by class name."""
    from pathlib import Path

    from PIL import Image

    rows = [("original", samples["original"])] + list(samples["reconstructions"].items())
    cols = len(samples["original"])
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.25 * cols, 1.35 * len(rows)), squeeze=False)
    for r, (name, files) in enumerate(rows):
        for c, file in enumerate(files):
            with Image.open(Path(run_dir) / file) as image:
                array = np.asarray(image)
            axes[r, c].imshow(array, cmap="gray" if array.ndim == 2 else None, vmin=0, vmax=255)
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
            if r == 0:
                axes[r, c].set_title(str(samples["labels"][c]), fontsize=7)
        axes[r, 0].set_ylabel(name, fontsize=7)
    return _png(fig)


def explanation_figure(
    image: np.ndarray,
    maps: dict[str, np.ndarray],
    counterfactual: np.ndarray,
    title: str,
    lesion: tuple[float, float, float] | None = None,
) -> bytes:
    """One image's explanation: the input, each map's magnitude over it, and the counterfactual.
    image, counterfactual: (H, W) or (H, W, 3) in [0, 1]; maps: name -> (H, W) magnitude; lesion:
    (row, column, radius) in pixels, drawn as a circle of twice the radius where known."""
    panels = (
        [("input", image, None)]
        + [(name, image, heat) for name, heat in maps.items()]
        + [("counterfactual", counterfactual, None)]
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(2.1 * len(panels), 2.35))
    for ax, (name, base, heat) in zip(axes, panels, strict=False):
        ax.imshow(base, cmap="gray" if base.ndim == 2 else None, vmin=0, vmax=1)
        if heat is not None:
            ax.imshow(heat / max(float(heat.max()), 1e-12), cmap="inferno", alpha=0.55, vmin=0, vmax=1)
            peak = np.unravel_index(int(heat.argmax()), heat.shape)
            ax.plot(peak[1], peak[0], "c+", ms=9, mew=1.5)
        if lesion is not None and not np.isnan(lesion[0]):
            ax.add_patch(plt.Circle((lesion[1], lesion[0]), 2 * lesion[2], fill=False, color="lime", lw=1))
        ax.set_title(name, fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=8)
    return _png(fig)


def risk_coverage_plot(curves: dict[str, dict]) -> bytes:
    """Error rate among the most confident share of the images, per confidence score (lower is better)."""
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    for name, curve in curves.items():
        ax.plot(curve["coverage"], curve["risk"], lw=1.3, label=f"{name} (AURC {curve['aurc']:.4f})")
    ax.set_xlabel("coverage (share of images kept, most confident first)")
    ax.set_ylabel("error rate among kept")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6.5, frameon=False)
    return _png(fig)


def to_hwc(image) -> np.ndarray:
    """A (C, H, W) tensor in [0, 1] as an (H, W) or (H, W, 3) array for imshow."""
    array = image.float().clamp(0, 1).numpy()
    return array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0)


def drift_curve_plot(curve: list[dict], key: str = "frechet_distance") -> bytes:
    """The drift search: the distance to the real target images (Fréchet or KID) against delta."""
    fig, ax = plt.subplots(figsize=(4.6, 3.0))
    ax.plot([p["drift"] for p in curve], [p[key] for p in curve], "o-", ms=3)
    ax.set_xlabel("drift delta (normalised latent units)")
    ax.set_ylabel("Fréchet distance" if key == "frechet_distance" else "kernel inception-style distance (KID)")
    ax.grid(alpha=0.3)
    return _png(fig)


# -- the encoder audit ----------------------------------------------------------------------------


def perturbation_plot(section: dict) -> bytes:
    """Latent against pixel displacement per family and severity, and their ratio."""
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(9, 3.4))
    for family, data in section["families"].items():
        rows = data["severities"]
        ax.plot(
            [r["pixel_displacement"] for r in rows], [r["latent_displacement"] for r in rows], "o-", ms=3, label=family
        )
        bx.plot([r["severity"] for r in rows], [r["ratio"] for r in rows], "o-", ms=3, label=family)
    limit = max(ax.get_xlim()[1], ax.get_ylim()[1])
    ax.plot([0, limit], [0, limit], color="grey", lw=0.8, ls=":")
    ax.set(xlabel="pixel displacement (channel-std units)", ylabel="latent displacement (channel-std units)")
    bx.axhline(1.0, color="grey", lw=0.8, ls=":")
    bx.set(xlabel="severity", ylabel="latent / pixel displacement")
    bx.legend(fontsize=7, ncol=2)
    return _png(fig)


def learnability_map(section: dict) -> bytes:
    """Test AUROC per (diameter, contrast): one row per probe (linear, CNN), one panel per space,
    and a last panel with the image - latent gap on a diverging scale (negative: the latent is the
    more learnable)."""
    cells = {(c["diameter"], c["contrast"]): c for c in section["cells"]}
    sizes, contrasts = sorted({d for d, _ in cells}), sorted({c for _, c in cells})
    spaces = section["spaces"]
    fig, axes = plt.subplots(2, len(spaces) + 1, figsize=(2.6 * (len(spaces) + 1), 5.2), squeeze=False)
    for row, model in enumerate(("linear", "cnn")):
        for col, panel in enumerate([*spaces, "gap"]):
            gap = panel == "gap"
            value = (
                (lambda c, model=model: c["gap"][model]["image-latent"])
                if gap
                else (lambda c, p=panel, model=model: c["auroc"][p][model])
            )
            grid = np.array([[value(cells[(d, c)]) for c in contrasts] for d in sizes])
            ax = axes[row][col]
            image = ax.imshow(
                grid,
                cmap="RdBu_r" if gap else "viridis",
                vmin=-0.5 if gap else 0.5,
                vmax=0.5 if gap else 1.0,
                origin="lower",
                aspect="auto",
            )
            for i, j in np.ndindex(grid.shape):
                ax.text(
                    j,
                    i,
                    f"{grid[i, j]:+.2f}" if gap else f"{grid[i, j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="black" if gap else "white",
                )
            ax.set_xticks(range(len(contrasts)), [f"{c:g}" for c in contrasts], fontsize=7)
            ax.set_yticks(range(len(sizes)), [f"{d:g}" for d in sizes], fontsize=7)
            ax.set_title(f"{'image - latent' if gap else panel} ({model})", fontsize=8)
            if col == 0:
                ax.set_ylabel("lesion diameter (px)", fontsize=8)
            if row == 1:
                ax.set_xlabel("contrast", fontsize=8)
            fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    return _png(fig)


def robustness_plot(section: dict) -> bytes:
    """Test AUROC against severity, per family (panels) and space (lines), with 95% intervals."""
    families = list(section["curves"])
    cols = min(3, len(families))
    rows = -(-len(families) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for k, family in enumerate(families):
        ax = axes[k // cols][k % cols]
        for space, points in section["curves"][family].items():
            sev = [p["severity"] for p in points]
            value = np.array([p["auroc"]["value"] for p in points])
            lo, hi = (
                np.array([p["auroc"]["ci95"][0] for p in points]),
                np.array([p["auroc"]["ci95"][1] for p in points]),
            )
            ax.plot(sev, value, "o-", ms=3, color=CURVE_COLORS.get(space), label=space)
            ax.fill_between(sev, lo, hi, color=CURVE_COLORS.get(space), alpha=0.15)
        ax.set_title(family, fontsize=9)
        ax.set_ylim(0.4, 1.0)
        ax.set_xlabel("severity", fontsize=8)
        ax.set_ylabel("AUROC", fontsize=8)
    for k in range(len(families), rows * cols):
        axes[k // cols][k % cols].axis("off")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def ood_plot(section: dict) -> bytes:
    """Out-of-distribution AUROC of logistic heads on frozen representations against the number of OOD samples."""
    fig, ax = plt.subplots(figsize=(4.2, 3.2))
    for name, rows in section["heads"].items():
        n = [r["n"] for r in rows]
        ax.plot(n, [r["auroc"] for r in rows], "o-", ms=3, label=name)
        ax.fill_between(n, [r["range"][0] for r in rows], [r["range"][1] for r in rows], alpha=0.15)
    ax.set_xscale("log", base=2)
    ax.set(xlabel="out-of-distribution training samples", ylabel="OOD test AUROC", title=f"shift: {section['shift']}")
    ax.legend(fontsize=7)
    return _png(fig)


def information_plot(section: dict) -> bytes:
    """Information present (kNN mutual information) against usable (V-information) per space, in nats."""
    spaces = list(section["spaces"])
    fig, ax = plt.subplots(figsize=(1.6 + 1.6 * len(spaces), 3.2))
    bars = [
        ("present (kNN MI)", lambda d: d["mutual_information"]["value"]),
        ("usable: linear", lambda d: d["v_information"]["linear"]["v_information"]),
        ("usable: CNN", lambda d: d["v_information"].get("cnn", {}).get("v_information", np.nan)),
    ]
    width = 0.26
    for j, (name, get) in enumerate(bars):
        ax.bar(
            np.arange(len(spaces)) + (j - 1) * width, [get(section["spaces"][s]) for s in spaces], width, label=name
        )
    entropy = section["spaces"][spaces[0]]["v_information"]["linear"]["label_entropy"]
    ax.axhline(entropy, color="grey", ls=":", lw=0.8, label="H(Y)")
    ax.set_xticks(range(len(spaces)), spaces)
    ax.set_ylabel("nats")
    ax.legend(fontsize=7)
    return _png(fig)
