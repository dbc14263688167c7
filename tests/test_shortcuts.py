"""Shortcuts: the synthetic benchmark's spurious marker, CSV confounder columns, the subgroup scores
and the encoder audit's shortcuts section, with known answers on tiny data."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

import medlatent.api as api
from medlatent.data import load_dataset, make_synthetic
from medlatent.errors import MedlatentInputError

TINY = dict(size=16, epochs=1, batch_size=32, bootstrap=100, progress=False, n=64)


def binomial_ok(hits: int, n: int, p: float) -> bool:
    """hits of n within 4 standard deviations of a binomial(n, p)."""
    return abs(hits - n * p) <= 4 * np.sqrt(n * p * (1 - p)) + 1


@pytest.fixture
def one_line(capsys):
    """check(code, *fragments): exit 2 and exactly one `medlatent: error:` line holding the fragments."""

    def check(code: int, *fragments: str) -> str:
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert code == 2, captured.err
        assert len(lines) == 1 and lines[0].startswith("medlatent: error: "), captured.err
        assert "Traceback" not in captured.err and captured.out == ""
        for fragment in fragments:
            assert fragment in lines[0], lines[0]
        return lines[0]

    return check


# -- the synthetic marker -------------------------------------------------------------------------


def test_the_marker_is_placed_at_the_stated_rates():
    parts = dict(n_train=1500, n_val=500, n_test=1500)
    ds = make_synthetic(16, **parts, marker="corner", marker_rate=0.9, marker_test_rate=0.3)
    present = ds.confounder.codes.astype(bool)
    fit, test = np.arange(2000), np.arange(2000, 3500)
    for cls, rate in ((1, 0.9), (0, 0.1)):
        members = fit[ds.labels[fit] == cls]
        assert binomial_ok(int(present[members].sum()), len(members), rate), (cls, present[members].mean())
    for cls in (0, 1):  # in the test part, independent of the class
        members = test[ds.labels[test] == cls]
        assert binomial_ok(int(present[members].sum()), len(members), 0.3), (cls, present[members].mean())
    assert ds.confounder.levels == ["absent", "present"] and ds.confounder.name == "corner marker"
    flipped = make_synthetic(16, n_train=10, n_val=0, n_test=400, marker="corner", marker_test_rate=0.0)
    assert not flipped.confounder.codes[10:].any()


def test_without_a_marker_the_benchmark_keeps_its_fingerprint_and_pixels():
    # Recorded before the marker existed: the default benchmark's fingerprint and a small one's pixels.
    assert make_synthetic(64).fingerprint == "014bba53f9c3a01d"
    small = dict(n_train=40, n_val=10, n_test=20, seed=3)
    plain = make_synthetic(32, **small)
    assert plain.fingerprint == "6a21dfc09b7ace53" and plain.confounder is None
    assert (
        hashlib.sha256(plain.images.array.tobytes()).hexdigest()
        == "4f6d5785f2ed75f55ff639dce97a36407446f6010b574a8586df4a7ded3f4894"
    )
    explicit = load_dataset("synthetic:n_train=40,n_val=10,n_test=20,seed=3,marker=none", 32)
    assert explicit.fingerprint == plain.fingerprint and np.array_equal(explicit.images.array, plain.images.array)
    assert "marker" not in plain.describe()
    for kind in ("corner", "stripe", "offset"):
        marked = make_synthetic(32, **small, marker=kind, marker_rate=0.8)
        has = marked.confounder.codes.astype(bool)
        assert marked.fingerprint != plain.fingerprint and 0 < has.sum() < len(has)
        assert np.array_equal(marked.labels, plain.labels)
        assert np.array_equal(marked.lesions["center"], plain.lesions["center"], equal_nan=True)
        assert np.array_equal(marked.images.array[~has], plain.images.array[~has])  # byte-identical without it
        changed = marked.images.array[has] != plain.images.array[has]
        assert changed.any(axis=(1, 2)).all() and not changed[:, ~marked.confounder.mask].any()  # only in its mask


def test_the_markers_geometry_scales_with_the_size_and_the_blur_weakens_the_corner():
    from medlatent.autoencoders import load_autoencoder
    from medlatent.data.spaces import encode_images
    from medlatent.data.synthetic import marker_map

    corner = marker_map("corner", 64, 0.3)
    assert (corner > 0).sum() == 9 and corner.max() == pytest.approx(0.3) and (corner[3:6, 3:6] > 0).all()
    assert (marker_map("corner", 128, 1.0) > 0).sum() == 36 and (marker_map("corner", 16, 1.0) > 0).sum() == 1
    stripe = marker_map("stripe", 64, 1.0) > 0
    assert stripe.sum() == 16 and stripe[:8].sum() == 16  # four 2x2 dashes near the top edge
    assert (marker_map("offset", 32, 0.2) == 0.2).all()
    ds = make_synthetic(64, n_train=8, n_val=0, n_test=8, marker="corner", marker_rate=1.0, marker_test_rate=0.0)
    with_marker, without = ds.load(np.flatnonzero(ds.confounder.codes)), ds.load(np.arange(8, 16))
    ae, mask = load_autoencoder("reference:blur"), torch.from_numpy(ds.confounder.mask)
    recon = [encode_images(ae, x, torch.device("cpu"), ds)[1] for x in (with_marker, without)]
    before = with_marker[..., mask].mean() - without[..., mask].mean()
    after = recon[0][..., mask].mean() - recon[1][..., mask].mean()
    assert before > 0.2 and 0 < after < 0.5 * before  # 8x8 block means spread the 3x3 patch


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("synthetic:marker=blob", "marker=blob"),
        ("synthetic:marker=corner,marker_rate=1.5", "marker_rate=1.5"),
        ("synthetic:marker=corner,marker_test_rate=-0.1", "marker_test_rate=-0.1"),
        ("synthetic:marker=offset,marker_contrast=0", "marker_contrast=0"),
    ],
)
def test_bad_marker_options_are_one_line(spec, fragment, tmp_path, run_cli, one_line):
    with pytest.raises(MedlatentInputError, match=fragment.split("=")[0]):
        load_dataset(spec, 16)
    code = run_cli("audit", "--dataset", spec, "--autoencoder", "reference:identity", "--out", str(tmp_path / "a"))
    one_line(code, fragment)
    assert not (tmp_path / "a").exists()


# -- CSV confounder columns -----------------------------------------------------------------------


def write_manifest(folder, n: int = 48, seed: int = 0):
    """Synthetic images as PNG files with a label, a split and confounder columns: `site` (three
    sites, a and b mostly of one class each), `scanner` (constant) and `uid` (one per image)."""
    from PIL import Image

    ds = make_synthetic(16, n_train=n, n_val=0, n_test=0, seed=seed)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        name = f"img{i}.png"
        Image.fromarray(ds.images.array[i]).save(folder / name)
        label = int(ds.labels[i])
        site = "c" if i % 4 == 0 else ("b" if (rng.random() < 0.8) == bool(label) else "a")
        split = "test" if i % 3 == 0 else ("val" if i % 3 == 1 and i % 2 else "train")
        rows.append(f"{name},{label},{split},{site},x,u{i}")
    csv = folder / "labels.csv"
    csv.write_text("path,label,split,site,scanner,uid\n" + "\n".join(rows) + "\n")
    return csv


def test_a_confounder_column_is_read_as_groups(tmp_path):
    csv = write_manifest(tmp_path, n=24)
    ds = load_dataset(f"csv:{csv}", 16, confounder_column="site", split_column="split")
    assert ds.confounder.name == "site" and ds.confounder.levels == ["a", "b", "c"]
    assert set(np.unique(ds.confounder.codes)) == {0, 1, 2} and (ds.confounder.codes[::4] == 2).all()
    assert load_dataset(f"csv:{csv}", 16).confounder is None


@pytest.mark.parametrize(
    "column, fragment",
    [("hospital", "no such column"), ("scanner", "every row has the value 'x'"), ("uid", "its own value")],
)
def test_bad_confounder_columns_are_one_line(column, fragment, tmp_path, run_cli, one_line):
    csv = write_manifest(tmp_path, n=12)
    args = ["--dataset", f"csv:{csv}", "--split-column", "split", "--autoencoder", "reference:identity"]
    args += ["--sections", "shortcuts", "--confounder-column", column]
    code = run_cli("audit", *args, "--out", str(tmp_path / "a"))
    one_line(code, f"--confounder-column {column}", fragment)
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--dataset", "synthetic:n_train=16,n_val=8,n_test=8"], "has no confounder"),
        (["--dataset", "synthetic:marker=none"], "has no confounder"),
        (["--dataset", "medmnist:breastmnist"], "has no confounder"),
        (["--dataset", "synthetic:marker=corner", "--confounder-column", "site"], "applies to csv: datasets"),
    ],
)
def test_the_shortcuts_section_without_a_confounder_is_one_line(args, fragment, tmp_path, run_cli, one_line):
    code = run_cli("audit", *args, "--sections", "shortcuts", "--out", str(tmp_path / "a"))
    one_line(code, fragment)
    assert not (tmp_path / "a").exists()


# -- the subgroup scores --------------------------------------------------------------------------


def test_subgroup_scores_of_a_classifier_that_reads_only_the_marker():
    from medlatent.evaluation.subgroups import aligned_classes, subgroup_scores

    rng = np.random.default_rng(0)
    labels, codes = rng.integers(0, 2, 400), rng.integers(0, 2, 400)
    assert aligned_classes(np.array([1, 1, 0, 0, 0]), np.array([1, 1, 1, 0, 0]), 2, 3).tolist() == [0, 1, -1]
    # Class 1 is the majority of both values; value 0 is over-represented among class 0's images.
    imbalanced, values = np.array([0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1]), np.array([0, 0, 1, 0, 0, 0, 1, 1, 1, 1, 1])
    assert aligned_classes(imbalanced, values, 2, 2).tolist() == [0, 1]
    probs = np.stack([1 - 0.8 * codes - 0.1, 0.8 * codes + 0.1], axis=1)  # predicts "present -> class 1"
    r = subgroup_scores("binary", labels, codes, probs, np.array([0, 1]), 200, 0)
    assert r["aligned"]["balanced_accuracy"]["value"] == 1.0 and r["conflicting"]["balanced_accuracy"]["value"] == 0.0
    assert (
        r["aligned_minus_conflicting"]["balanced_accuracy"]["value"] == 1.0
        and r["worst_group_accuracy"]["value"] == 0.0
    )
    assert r["aligned"]["images"] + r["conflicting"]["images"] == 400 and len(r["groups"]) == 4
    assert sum(g["aligned"] for g in r["groups"]) == 2
    honest = np.eye(2)[labels] * 0.8 + 0.1  # always right: no gap, interval [0, 0]
    r = subgroup_scores("binary", labels, codes, honest, np.array([0, 1]), 200, 0)
    assert r["aligned_minus_conflicting"]["balanced_accuracy"] == {"value": 0.0, "ci95": [0.0, 0.0]}
    constant = np.tile([0.9, 0.1], (400, 1))  # whatever the mix of classes in each part: no gap either
    r = subgroup_scores("binary", labels, codes, constant, np.array([0, 1]), 200, 0)
    assert r["aligned_minus_conflicting"]["balanced_accuracy"] == {"value": 0.0, "ci95": [0.0, 0.0]}


def test_the_decorrelated_set_is_balanced_or_skipped_with_the_reason():
    from medlatent.audits.shortcuts import decorrelated_subset

    ds = make_synthetic(16, n_train=10, n_val=400, n_test=10, marker="corner", marker_rate=0.9)
    pool = np.arange(10, 410)
    chosen, info = decorrelated_subset(ds, pool, 0.1, np.random.default_rng(0))
    cells = np.bincount(ds.labels[chosen] * 2 + ds.confounder.codes[chosen], minlength=4)
    assert (cells == 10).all() and info == {"images": 40, "per_group": 10, "resampled": False}
    perfect = make_synthetic(16, n_train=10, n_val=100, n_test=10, marker="corner", marker_rate=1.0)
    chosen, info = decorrelated_subset(perfect, np.arange(10, 110), 0.1, np.random.default_rng(0))
    assert chosen is None and "no validation image of class" in info["skipped"]


# -- the section: known answers -------------------------------------------------------------------


def test_without_a_correlation_the_image_classifier_has_no_aligned_gap(tmp_path):
    r = api.audit(
        **TINY,
        dataset="synthetic:n_train=96,n_val=48,n_test=64,marker=corner,marker_rate=0.5,marker_contrast=0.5",
        autoencoders=["reference:blur"],
        sections=["shortcuts"],
        out=str(tmp_path / "a"),
        cache_dir=str(tmp_path / "c"),
    )
    s = r["autoencoders"][0]["sections"]["shortcuts"]
    assert set(s["spaces"]) == {"image", "reconstruction", "latent"} and s["test_images"] == 64
    image = s["spaces"]["image"]
    for metric in ("balanced_accuracy", "auroc"):
        low, high = image["classifier"]["aligned_minus_conflicting"][metric]["ci95"]
        assert low <= 0 <= high, image["classifier"]["aligned_minus_conflicting"]
    low, high = image["confounder_auroc"]["ci95"]
    assert 0 <= low <= image["confounder_auroc"]["value"] <= high <= 1
    assert "decorrelated_head" in image and s["decorrelated"]["per_group"] >= 2
    assert s["confounder"]["levels"] == ["absent", "present"] and len(s["confounder"]["groups"]) == 4
    page = next((tmp_path / "a").glob("report-*.html")).read_text()
    assert "Shortcuts: the confounder" in page and "decorrelated head" in page
    assert page.count("<td>reconstruction</td>") == 1 and "—" not in page.split("Shortcuts")[1].split("Provenance")[0]


@pytest.mark.slow
def test_a_strong_offset_marker_is_a_shortcut_the_decorrelated_head_partly_undoes(tmp_path):
    r = api.audit(
        **{**TINY, "epochs": 2, "n": 200},
        dataset=(
            "synthetic:n_train=200,n_val=600,n_test=200,marker=offset,marker_rate=0.98,"
            "marker_contrast=0.3,lesion_contrast=0.4,lesion_size=0.15"
        ),
        autoencoders=["encoder:reference:blur"],
        sections=["shortcuts"],
        out=str(tmp_path / "a"),
        cache_dir=str(tmp_path / "c"),
    )
    s = r["autoencoders"][0]["sections"]["shortcuts"]
    assert set(s["spaces"]) == {"image", "latent"}  # encoder only: no reconstruction
    learnable = s["spaces"]["image"]["confounder_auroc"]
    assert learnable["ci95"][0] > 0.9  # an offset of every pixel
    assert 0.3 < learnable["v_information"] <= learnable["entropy"] <= np.log(2) + 1e-9  # most of its entropy
    trained, head = s["spaces"]["image"]["classifier"], s["spaces"]["image"]["decorrelated_head"]
    assert trained["worst_group_accuracy"]["value"] < trained["aligned"]["balanced_accuracy"]["value"] - 0.5
    assert trained["aligned_minus_conflicting"]["balanced_accuracy"]["ci95"][0] > 0.5
    assert head["worst_group_accuracy"]["value"] > trained["worst_group_accuracy"]["value"] + 0.2
    assert (
        head["conflicting"]["balanced_accuracy"]["value"] > trained["conflicting"]["balanced_accuracy"]["value"] + 0.2
    )


def test_the_section_on_a_csv_site_column(tmp_path):
    csv = write_manifest(tmp_path, n=96)
    r = api.audit(
        **{**TINY, "n": 32},
        dataset=f"csv:{csv}",
        split_column="split",
        confounder_column="site",
        autoencoders=["encoder:reference:blur"],
        sections=["shortcuts"],
        out=str(tmp_path / "a"),
        cache_dir=str(tmp_path / "c"),
    )
    s = r["autoencoders"][0]["sections"]["shortcuts"]
    assert s["confounder"]["name"] == "site" and s["confounder"]["levels"] == ["a", "b", "c"]
    assert s["confounder"]["aligned_class"][:2] == ["0", "1"]  # site a mostly normal, b mostly positive
    for row in s["spaces"].values():
        assert row["confounder_auroc"]["value"] is not None
        assert {g["confounder"] for g in row["classifier"]["groups"]} <= {0, 1, 2}
    assert "Shortcuts: the confounder site" in next((tmp_path / "a").glob("report-*.html")).read_text()


# -- the gap audit's shortcuts table --------------------------------------------------------------


@pytest.mark.slow
def test_the_gap_audit_reports_each_classifiers_reliance_as_the_mean_over_runs(tmp_path):
    from medlatent.evaluation.subgroups import aligned_classes, subgroup_scores

    r = api.gap(
        dataset="synthetic:n_train=64,n_val=16,n_test=48,marker=offset,marker_rate=0.95,lesion_size=0.15",
        size=16,
        autoencoders=["reference:blur"],
        epochs=1,
        batch_size=16,
        bootstrap=100,
        progress=False,
        linear_probe=False,
        seeds=[0, 1],
        out=str(tmp_path / "g"),
        cache_dir=str(tmp_path / "c"),
    )
    row = r["rows"][0]
    table = row["shortcuts"]
    assert table["confounder"]["aligned_class"] == ["normal", "nodule"]  # the marker goes with the nodule
    assert table["confounder"]["aligned_class_agrees"]  # both seeds train on the same images
    assert set(table["classifiers"]) == {"image", "reconstruction", "latent"}
    ds = make_synthetic(16, n_train=64, n_val=16, n_test=48, marker="offset", marker_rate=0.95, lesion_size=0.15)
    test = np.arange(80, 128)
    aligned = aligned_classes(ds.labels[:64], ds.confounder.codes[:64], 2, 2)
    predictions = np.load(tmp_path / "g" / "predictions.npz")
    for space, summary in table["classifiers"].items():
        per_run = [
            subgroup_scores("binary", ds.labels[test], ds.confounder.codes[test], predictions[key], aligned, 100, 0)
            for key in (f"probs/blur/{space}/deep/official/seed{seed}" for seed in (0, 1))
        ]
        assert summary["runs"] == len(per_run) == 2
        expected = np.mean([p["aligned_minus_conflicting"]["auroc"]["value"] for p in per_run])
        difference = summary["aligned_minus_conflicting"]["auroc"]
        assert difference["value"] == pytest.approx(expected)
        assert difference["ci95"][0] <= difference["value"] <= difference["ci95"][1]
    assert "Shortcuts: reliance on the confounder" in (tmp_path / "g" / "report.html").read_text()


def test_the_gap_audits_confounder_column_is_for_csv_only(tmp_path, run_cli, one_line):
    code = run_cli("gap", "--confounder-column", "site", "--out", str(tmp_path / "g"))
    one_line(code, "--confounder-column site", "applies to csv: datasets")
    assert not (tmp_path / "g").exists()


@pytest.mark.slow
def test_the_blur_keeps_a_strong_marker_and_weakens_a_faint_one():
    from medlatent.audits.config import EncoderAuditConfig
    from medlatent.audits.shortcuts import confounder_auroc
    from medlatent.autoencoders import load_autoencoder
    from medlatent.data.spaces import encode_images

    ae, config = load_autoencoder("reference:blur"), EncoderAuditConfig()
    found = {}
    for contrast in (0.3, 0.03):
        ds = make_synthetic(64, n_train=0, n_val=0, n_test=256, marker="corner", marker_contrast=contrast)
        images, codes = ds.load(np.arange(256)), ds.confounder.codes
        blurred = encode_images(ae, images, torch.device("cpu"), ds)[0]
        spaces = (("image", images), ("latent", blurred))
        found[contrast] = [confounder_auroc(space, x, codes, 2, config) for space, x in spaces]
    # 8x8 block means keep a 3x3 patch's sum: a strong marker stays linearly plain; a faint one sinks
    # towards the noise of the block means, below what the pixels give a linear probe
    assert min(probe["value"] for probe in found[0.3]) > 0.95
    image, blur = found[0.03]
    assert image["value"] > blur["value"] + 0.03 and image["v_information"] > blur["v_information"]
