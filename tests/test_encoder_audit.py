"""The encoder audit: known answers of its measures, and the audit end to end on reference encoders."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import medlatent.api as api
from medlatent.autoencoders import load_autoencoder
from medlatent.errors import MedlatentInputError

TINY = dict(
    dataset="synthetic:n_train=64,n_val=16,n_test=48", size=32, epochs=1, batch_size=16, bootstrap=100, progress=False
)


def test_pixel_unshuffle_keeps_every_neighbourhood_and_moves_as_the_pixels(tmp_path):
    r = api.audit(
        **TINY,
        autoencoders=["reference:identity"],
        sections=["perturbation", "neighbourhood"],
        n=40,
        k=[5, 10],
        perturbations=["noise", "translation", "blur"],
        severities=[1, 4],
        out=str(tmp_path / "a"),
        cache_dir=str(tmp_path / "c"),
    )
    s = r["autoencoders"][0]["sections"]
    for k in ("5", "10"):
        assert s["neighbourhood"]["latent"][k] == {"knn_overlap": 1.0, "trustworthiness": 1.0, "continuity": 1.0}
    for family in s["perturbation"]["families"].values():
        assert all(abs(row["ratio"] - 1) < 0.02 for row in family["severities"]) and family["rank_correlation"] > 0.99
    assert s["perturbation"]["shift_equivariance"]["error"] == pytest.approx(0.0, abs=1e-6)
    assert (
        s["perturbation"]["families"]["noise"]["severities"][0]["reconstruction_psnr"] > 60
    )  # lossless: the perturbed image itself
    saved = json.loads((tmp_path / "a" / "results.json").read_text())
    assert saved["autoencoders"][0]["autoencoder"]["spec"] == "reference:identity"
    assert (
        "Perturbations" in (tmp_path / "a" / "report-identity.html").read_text()
        and "report-identity.html" in (tmp_path / "a" / "report.html").read_text()
    )


def test_ksg_recovers_the_mutual_information_of_a_gaussian_pair():
    from medlatent.evaluation.information import ksg_mi, label_mi, subsample_interval

    rng = np.random.default_rng(1)
    for rho in (0.0, 0.5, 0.8):
        pair = rng.multivariate_normal([0, 0], [[1, rho], [rho, 1]], size=2000)
        estimate = subsample_interval(ksg_mi, pair[:, :1], pair[:, 1:], reps=40, seed=0)
        analytic = -0.5 * np.log(1 - rho**2)
        assert estimate["ci95"][0] - 1e-9 <= analytic <= estimate["ci95"][1] + 0.01, (rho, estimate, analytic)
    y = rng.integers(0, 2, 3000)
    assert label_mi(rng.normal(size=(3000, 1)) + 2 * y[:, None], y) == pytest.approx(
        0.3368, abs=0.03
    )  # two unit Gaussians 2 apart (numerical integral)
    assert (
        label_mi(rng.normal(size=(3000, 1)), y) < 0.02 and label_mi(rng.normal(size=(3000, 2)), y) < 0.05
    )  # independent (a small positive bias in 2-D)


def test_the_infonce_bound_approaches_the_mutual_information_from_below():
    from medlatent.evaluation.information import infonce_mi

    rng = np.random.default_rng(0)
    pair = rng.multivariate_normal([0, 0], [[1, 0.8], [0.8, 1]], size=4000)
    assert 0.45 < infonce_mi(pair[:, :1], pair[:, 1:]) < 0.53  # analytic 0.511
    y = rng.integers(0, 2, 4000)
    assert 0.29 < infonce_mi(rng.normal(size=(4000, 1)) + 2 * y[:, None], y) < 0.36  # 0.337 by numerical integration


def test_v_information_never_exceeds_the_label_entropy():
    from medlatent.evaluation.information import label_entropy, v_information

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 200)
    for _ in range(20):
        probs = rng.dirichlet(np.ones(3), size=200)
        assert v_information(probs, labels)["v_information"] <= label_entropy(labels) + 1e-12
    perfect = np.eye(3)[labels]
    assert v_information(perfect, labels)["v_information"] == pytest.approx(
        label_entropy(labels), abs=1e-9
    )  # all of H(Y) is usable


def test_a_lesion_survives_the_blur_autoencoder_only_when_larger_than_its_stride():
    from medlatent.audits.encoder import insert_lesions, survival
    from medlatent.data import load_dataset
    from medlatent.data.spaces import encode_images

    dataset = load_dataset("synthetic:n_train=16,n_val=4,n_test=4", 32)
    ae, device, rng = load_autoencoder("reference:blur"), torch.device("cpu"), np.random.default_rng(0)
    clean = dataset.load(np.arange(16))
    responses = {}
    for diameter in (1.0, 16.0):
        lesioned, maps = insert_lesions(clean, diameter, 0.5, rng)
        responses[diameter] = survival(
            ae, clean, encode_images(ae, lesioned, device, dataset)[1], maps, device, dataset
        ).mean()
    assert responses[16.0] > 0.5 > 0.1 > responses[1.0], (
        responses
    )  # the 8x8 box blur keeps a 16 px disk, smooths a 1 px one away


@pytest.mark.slow
def test_the_audit_with_every_section_writes_a_card_per_autoencoder(tmp_path):
    r = api.audit(
        **TINY,
        autoencoders=["reference:blur", "encoder:reference:blur"],
        n=32,
        k=[5],
        perturbations=["noise", "jpeg"],
        severities=[2],
        lesion_sizes=[2.0, 8.0],
        lesion_contrasts=[0.3],
        probe_images=16,
        ood_n=[4, 16],
        out=str(tmp_path / "a"),
        cache_dir=str(tmp_path / "c"),
    )
    blur, encoder_only = (card["sections"] for card in r["autoencoders"])
    assert set(blur) == {"perturbation", "neighbourhood", "probes", "robustness", "information"}
    assert [c["diameter"] for c in blur["probes"]["cells"]] == [2.0, 8.0] and blur["probes"]["spaces"] == [
        "image",
        "reconstruction",
        "latent",
    ]
    cell = blur["probes"]["cells"][0]
    assert cell["gap"]["linear"]["image-latent"] == pytest.approx(
        cell["auroc"]["image"]["linear"] - cell["auroc"]["latent"]["linear"]
    )
    assert (
        encoder_only["probes"]["cells"][0]["survival"] is None and "no decoder" in encoder_only["probes"]["survival"]
    )
    assert (
        encoder_only["probes"]["spaces"] == ["image", "latent"]
        and "reconstruction" not in encoder_only["information"]["spaces"]
    )
    assert [p["severity"] for p in blur["robustness"]["curves"]["noise"]["latent"]] == [0, 2]
    assert [row["n"] for row in blur["robustness"]["ood_heads"]["heads"]["pooled latent"]] == [4, 16]
    for space in blur["information"]["spaces"].values():
        assert space["v_information"]["cnn"]["v_information"] <= space["v_information"]["cnn"]["label_entropy"]
    html = (tmp_path / "a" / "report-blur.html").read_text()
    for heading in (
        "Perturbations",
        "Neighbourhoods",
        "learnability map",
        "Robustness under shift",
        "Information present",
    ):
        assert heading in html
    assert (
        html.count("data:image/png;base64") == 5
        and "encoder only" in (tmp_path / "a" / "report-blur__encoder_.html").read_text()
    )


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(sections=["perturbation", "colour"]), "--sections colour"),
        (dict(perturbations=["swirl"]), "--perturbation swirl"),
        (dict(severities=[6]), "--severity 6"),
        (dict(shift="blur:9"), "--severity 9"),
        (dict(sections=["robustness"], ood_n=[100000]), "--ood-n 100000"),
        (dict(sections=["robustness"], shift="dataset:medmnist:nowhere.npz"), "not found"),
        ("rgb", "channel"),
    ],
)
def test_bad_audit_input_is_one_clear_error(tmp_path, options, message):
    if options == "rgb":  # a second dataset whose channels cannot be matched
        from PIL import Image

        rows = ["path,label"]
        for i in range(8):
            Image.fromarray(np.full((32, 32, 3), 40 * (i % 2), dtype=np.uint8)).save(tmp_path / f"{i}.png")
            rows.append(f"{i}.png,{['normal', 'nodule'][i % 2]}")
        (tmp_path / "other.csv").write_text("\n".join(rows))
        options = dict(sections=["robustness"], shift=f"dataset:csv:{tmp_path / 'other.csv'}")
    with pytest.raises(MedlatentInputError, match=message):
        api.audit(
            **{**TINY, **options},
            autoencoders=["reference:identity"],
            out=str(tmp_path / "bad"),
            cache_dir=str(tmp_path / "c"),
        )
    assert not (tmp_path / "bad" / "results.json").exists()
