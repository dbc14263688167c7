"""The acceptance run, shortened: BreastMNIST with TAEF2 from ../shared (skipped without it)."""

from __future__ import annotations

import json

import pytest

import medlatent

from .conftest import shared_or_skip


@pytest.mark.slow
def test_breastmnist_taef2_gap(tmp_path):
    npz = shared_or_skip("data", "medmnist", "breastmnist.npz")
    encoder = shared_or_skip("weights", "taef2", "taef2_encoder.pth")
    out = tmp_path / "breast"
    medlatent.gap(
        dataset=f"medmnist:{npz}",
        size=32,
        autoencoders=[f"taesd:{encoder}"],
        backbone="resnet10t",
        epochs=1,
        batch_size=32,
        bootstrap=200,
        out=str(out),
        cache_dir=str(tmp_path / "cache"),
        progress=False,
    )
    results = json.loads((out / "results.json").read_text())
    assert results["dataset"]["name"] == "breastmnist" and results["dataset"]["partitions"] == {
        "train": 546,
        "val": 78,
        "test": 156,
    }
    ae = results["autoencoders"][0]
    assert ae["latent_shape"] == [32, 4, 4] and ae["content_hash"].startswith("sha256:10a4e1021e89d755")
    assert ae["reconstruction_quality"]["psnr"] > 25  # TAEF2 keeps these images closely
    for row in results["rows"]:
        for space in ("image", "reconstruction", "latent"):
            lo, hi = row["scores"][space]["auroc"]["ci95"]
            assert lo <= row["scores"][space]["auroc"]["value"] <= hi
        for gap in ("fidelity", "learnability"):
            assert "ci95" in row["gaps"][gap]["auroc"]
    # The linear probe is deterministic and clearly above chance on real images.
    linear = next(r for r in results["rows"] if r["model"] == "linear")
    assert linear["scores"]["image"]["auroc"]["value"] > 0.7
