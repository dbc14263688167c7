"""Concepts: the synthetic benchmark's known concepts, CSV concept columns and the encoder audit's
concept bottlenecks, with known answers on tiny data."""

from __future__ import annotations

import numpy as np
import pytest

import medlatent.api as api
from medlatent.data import load_dataset, make_synthetic

from .test_shortcuts import one_line, write_manifest  # noqa: F401 (one_line is a fixture)

TINY = dict(size=16, epochs=1, batch_size=32, bootstrap=100, progress=False, n=64)


def test_the_synthetic_concepts_follow_the_drawn_nodules_and_marker():
    ds = make_synthetic(32, n_train=200, n_val=0, n_test=100, marker="stripe", marker_rate=0.8)
    names, values = ds.concepts.names, ds.concepts.values
    assert names[0] == "nodule" and names[-1] == "stripe marker" and values.shape == (300, 6)
    column = dict(zip(names, values.T, strict=True))
    assert np.array_equal(column["nodule"], ds.labels)
    assert np.array_equal(column["stripe marker"], ds.confounder.codes)
    radius, contrast, center = ds.lesions["radius"], ds.lesions["contrast"], ds.lesions["center"]
    positive = ds.labels == 1
    assert np.isnan(contrast[~positive]).all() and ((contrast[positive] >= 0.24) & (contrast[positive] <= 0.36)).all()
    assert np.array_equal(column["large nodule"][positive], radius[positive] > 0.07 * 32 / 2)
    assert np.array_equal(column["bright nodule"][positive], contrast[positive] > 0.3)
    assert np.array_equal(column["nodule in the upper half"][positive], center[positive, 0] < 16)
    assert np.array_equal(column["nodule in the left half"][positive], center[positive, 1] < 16)
    for name in names[1:5]:  # a nodule's attributes are 0 without one, and take both values with one
        assert not column[name][~positive].any() and 0 < column[name][positive].mean() < 1, name
    assert "stripe marker" not in make_synthetic(32, n_train=20, n_val=0, n_test=10).concepts.names


def test_concept_columns_binary_and_categorical(tmp_path):
    csv = write_manifest(tmp_path, n=24)
    text = csv.read_text().splitlines()
    rows = [f"{line},{'yes' if i % 3 else 'no'}" for i, line in enumerate(text[1:])]
    csv.write_text("\n".join([text[0] + ",calcified", *rows]) + "\n")
    ds = load_dataset(f"csv:{csv}", 16, concept_columns=["calcified", "site"], split_column="split")
    assert ds.concepts.names == ["calcified=yes", "site=a", "site=b", "site=c"]
    assert np.array_equal(ds.concepts.values[:, 0], (np.arange(24) % 3 > 0).astype(np.float32))
    assert (ds.concepts.values[:, 1:].sum(1) == 1).all() and (ds.concepts.values[::4, 3] == 1).all()
    assert load_dataset(f"csv:{csv}", 16).concepts is None


@pytest.mark.parametrize(
    "column, fragment",
    [("hospital", "no such column"), ("scanner", "every row has the value 'x'"), ("uid", "its own value")],
)
def test_bad_concept_columns_are_one_line(column, fragment, tmp_path, run_cli, one_line):  # noqa: F811
    csv = write_manifest(tmp_path, n=12)
    args = ["--dataset", f"csv:{csv}", "--split-column", "split", "--autoencoder", "reference:identity"]
    args += ["--sections", "concepts", "--concept-column", "site", "--concept-column", column]
    code = run_cli("audit", *args, "--out", str(tmp_path / "a"))
    one_line(code, f"--concept-column {column}", fragment)
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--dataset", "medmnist:breastmnist", "--sections", "concepts"], "has no concepts"),
        (["--dataset", "synthetic", "--concept-column", "size"], "applies to csv: datasets"),
        (["--dataset", "csv:labels.csv", "--concept-column", "size"], "add --sections concepts"),
    ],
)
def test_the_concepts_section_without_concepts_is_one_line(args, fragment, tmp_path, run_cli, one_line):  # noqa: F811
    code = run_cli("audit", *args, "--autoencoder", "reference:identity", "--out", str(tmp_path / "a"))
    one_line(code, fragment)
    assert not (tmp_path / "a").exists()


def test_interventions_help_only_through_the_concepts_the_label_model_reads():
    from medlatent.audits.concepts import concept_scores, intervention_curve, label_model
    from medlatent.evaluation.metrics import bootstrap_indices, replicate_scores, score
    from medlatent.evaluation.subgroups import estimate

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    true = np.stack([labels, rng.integers(0, 2, 400), rng.integers(0, 2, 400)], axis=1).astype(float)
    head = label_model(true, labels, 0)  # the class is concept 0; concepts 1 and 2 are noise
    predicted = true.copy()
    predicted[:, 0] = np.clip(0.5 + rng.normal(0, 0.4, 400) * (2 * labels - 1) * -0.2 + rng.normal(0, 0.3, 400), 0, 1)
    idx = bootstrap_indices(labels, "binary", 100, 0)

    def task_score(probs):
        return score("binary", labels, probs)["auroc"], replicate_scores("binary", labels, probs, idx)["auroc"]

    curve = intervention_curve(head, predicted, true, 2, task_score, 0)
    points = [e["value"] for e in curve["auroc"]]
    assert curve["k"] == [0, 1, 2, 3] and points[0] < 0.7 and points[-1] == 1.0
    # every set of k concepts, each once: concept 0 is in 1 of 3 singles and 2 of 3 pairs
    assert points[1] == pytest.approx((1.0 + 2 * points[0]) / 3) and points[2] == pytest.approx((2 + points[0]) / 3)
    scores = concept_scores(["class", "noise a", "noise b"], true, predicted, idx)
    assert scores["per_concept"]["noise a"]["value"] == 1.0 and scores["per_concept"]["class"]["value"] < 0.7
    constant = concept_scores(["c"], np.zeros((400, 1)), predicted[:, :1], idx)
    assert constant["per_concept"]["c"]["value"] is None and constant["mean_auroc"] == estimate(None, None)


@pytest.mark.slow
def test_the_bottleneck_reaches_its_ceiling_with_every_true_concept(tmp_path):
    r = api.audit(
        **{**TINY, "epochs": 2},
        dataset="synthetic:n_train=96,n_val=48,n_test=64,marker=corner,lesion_size=0.15,lesion_contrast=0.5",
        autoencoders=["reference:blur"],
        sections=["concepts"],
        out=str(tmp_path / "a"),
        cache_dir=str(tmp_path / "c"),
    )
    s = r["autoencoders"][0]["sections"]["concepts"]
    assert s["concepts"][0] == "nodule" and len(s["concepts"]) == 6 and s["test_images"] == 64
    # The nodule concept is the class: the label model fitted on true concepts separates the classes.
    assert s["ceiling"]["value"] == pytest.approx(1.0)
    assert set(s["spaces"]) == {"image", "reconstruction", "latent"}
    for row in s["spaces"].values():
        curve = row["independent_interventions"]
        assert curve["k"] == list(range(7)) and curve["auroc"][-1]["value"] == pytest.approx(s["ceiling"]["value"])
        assert curve["auroc"][0]["value"] == pytest.approx(row["independent"]["value"])  # nothing replaced
        difference = row["independent_minus_plain"]
        assert difference["value"] == pytest.approx(row["independent"]["value"] - row["plain"]["value"])
        assert difference["ci95"][0] <= difference["value"] <= difference["ci95"][1]
        per = row["concepts"]["per_concept"]
        assert set(per) == set(s["concepts"]) and all(0 <= e["value"] <= 1 for e in per.values())
    html = (tmp_path / "a" / "report-blur.html").read_text()
    assert "Concepts: bottlenecks in each space" in html and "nodule in the upper half" in html
