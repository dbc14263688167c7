"""Figures of the report, returned as PNG bytes (matplotlib, no display)."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

SPACE_COLORS = {"image": "#4c72b0", "reconstruction": "#55a868", "latent": "#c44e52"}


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def scores_plot(rows: list[dict], metric: str = "auroc") -> bytes:
    """Score per space with 95% intervals, one group per (autoencoder, model)."""
    fig, ax = plt.subplots(figsize=(max(4.5, 1.9 * len(rows)), 3.4))
    width = 0.26
    spaces = list(SPACE_COLORS)
    for j, space in enumerate(spaces):
        values = np.array([r["scores"][space][metric]["value"] for r in rows])
        lo = values - np.array([r["scores"][space][metric]["ci95"][0] for r in rows])
        hi = np.array([r["scores"][space][metric]["ci95"][1] for r in rows]) - values
        x = np.arange(len(rows)) + (j - 1) * width
        ax.bar(x, values, width, color=SPACE_COLORS[space], label=space)
        ax.errorbar(x, values, yerr=[lo, hi], fmt="none", ecolor="black", capsize=3, lw=1)
    ax.set_xticks(np.arange(len(rows)), [f"{short(r['autoencoder'])}\n{r['model']}" for r in rows], fontsize=8)
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_ylim(0.0 if metric == "mcc" else 0.4, 1.0)
    ax.legend(fontsize=8, ncol=3, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def roc_plot(row: dict) -> bytes:
    fig, ax = plt.subplots(figsize=(3.4, 3.2))
    for space, curve in row["roc"].items():
        auc = row["scores"][space]["auroc"]["value"]
        ax.plot(curve["fpr"], curve["tpr"], color=SPACE_COLORS[space], label=f"{space} ({auc:.3f})")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(short(row["autoencoder"]), fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    return _png(fig)


def sigma_sweep_plot(row: dict) -> bytes:
    """AUROC and balanced accuracy of each noise-conditioned variant against sigma (log scale)."""
    fig, axes = plt.subplots(1, 2, figsize=(7.2, 3.0))
    for name, variant in row["variants"].items():
        sweep = variant["sigma_sweep"]
        for ax, metric in zip(axes, ("auroc", "balanced_accuracy")):
            ax.plot(sweep["sigma"], sweep[metric], marker="o", ms=3, label=name)
    for ax, metric in zip(axes, ("auroc", "balanced_accuracy")):
        ax.axhline(row["scores"]["latent"][metric]["value"], ls="--", color=SPACE_COLORS["latent"], lw=0.8, label="plain latent (clean)")
        ax.set_xscale("log")
        ax.set_xlabel("sigma")
        ax.set_ylabel(metric.replace("_", " "))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(short(row["autoencoder"]), fontsize=9)
    fig.tight_layout()
    return _png(fig)


def sample_grid(samples: dict) -> bytes:
    """Originals (top row) and each autoencoder's reconstructions below."""
    rows = [("original", samples["original"])] + list(samples["reconstructions"].items())
    cols = len(samples["original"])
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.25 * cols, 1.35 * len(rows)), squeeze=False)
    for r, (name, images) in enumerate(rows):
        for c, image in enumerate(images):
            array = np.asarray(image, dtype=np.uint8)
            axes[r, c].imshow(array[..., 0] if array.shape[-1] == 1 else array, cmap="gray", vmin=0, vmax=255)
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
            if r == 0:
                axes[r, c].set_title(f"y={samples['labels'][c]}", fontsize=7)
        axes[r, 0].set_ylabel(short(name), fontsize=7)
    return _png(fig)


def short(spec: str, limit: int = 28) -> str:
    return spec if len(spec) <= limit else "…" + spec[-(limit - 1):]
