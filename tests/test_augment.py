"""Generative augmentation (`medlatent augment`) on a tiny problem."""

import json

import numpy as np
import pytest

from medlatent.audits.augment import synthetic_counts


def test_synthetic_counts_balance_and_ratio():
    real = np.array([30, 10, 5])
    balance = synthetic_counts(real, None)
    assert balance["real+synthetic"].tolist() == [0, 20, 25] and balance["synthetic"].tolist() == [30, 10, 5]
    assert synthetic_counts(real, 0.5)["real+synthetic"].tolist() == [
        15,
        5,
        2,
    ]  # round(0.5 * n_c), banker's rounding of 2.5


def test_augment_trains_three_conditions_on_held_out_images_and_resumes(tmp_path, run_cli, capsys):
    import medlatent.api as api
    from medlatent.pipelines.latent_diffusion import LatentDiffusion

    spec = "synthetic:n_train=40,n_val=12,n_test=24"
    model = api.diffusion_train(
        tmp_path / "ldm",
        "builtin:kl-f4-synthetic",
        progress=False,
        dataset=spec,
        size=16,
        cache_dir=str(tmp_path / "cache"),
        steps=4,
        batch_size=16,
    )
    ldm = LatentDiffusion(model, device="cpu")
    assert (
        len(ldm.held_out) == 24 and not np.intersect1d(ldm.held_out, ldm.trained_on).size
    )  # the model never saw the test images

    options = dict(
        model=str(model),
        seed=[0],
        epochs=1,
        batch_size=16,
        sample_steps=2,
        out=str(tmp_path / "run"),
        device="cpu",
        progress=False,
    )
    results = api.augment(**options)
    real_counts = np.array(results["real_train_counts"])
    added = real_counts.max() - real_counts
    assert results["split"]["test"] == 24 and results["synthetic_counts"]["real+synthetic"] == added.tolist()
    for space in ("image", "latent"):
        rows = results["table"][space]
        assert [rows[c]["train_size"] for c in ("real", "real+synthetic", "synthetic")] == [
            real_counts.sum(),
            real_counts.sum() + added.sum(),
            real_counts.sum(),
        ]
        assert rows["real"]["difference_vs_real"] is None
        for condition in ("real+synthetic", "synthetic"):
            d = rows[condition]["difference_vs_real"]["auroc"]
            assert d["value"] == pytest.approx(
                rows[condition]["scores"]["auroc"]["value"] - rows["real"]["scores"]["auroc"]["value"]
            )
            assert d["ci95"][0] <= d["value"] <= d["ci95"][1]
    q = results["quality"]
    assert (
        set(q["class_consistency"]) == {"normal", "nodule"}
        and 0 <= q["near_copy_share"] <= 1
        and np.isfinite(q["frechet_distance"])
    )
    assert (tmp_path / "run" / "report.html").is_file() and (
        tmp_path / "run" / "samples" / "synthetic-1.png"
    ).is_file()

    again = api.augment(**options)  # a rerun reads every stored classifier and synthetic pool
    assert again["resumed_classifiers"] == 6
    assert json.dumps(again["table"], sort_keys=True) == json.dumps(results["table"], sort_keys=True)

    capsys.readouterr()
    assert run_cli("augment", "--model", str(model), "--synthetic", "-1", "--out", str(tmp_path / "bad")) == 2
    assert run_cli("augment", "--model", str(tmp_path / "nothing"), "--out", str(tmp_path / "bad")) == 2
    assert run_cli("augment", "--model", str(model), "--space", "pixels", "--out", str(tmp_path / "bad")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "--synthetic -1" in err[0] and "nothing" in err[1] and "--space pixels" in err[2]
    assert not (tmp_path / "bad").exists()
