"""Any command's results.json as one tidy table (`medlatent.load_results`), and `medlatent compare`."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

import medlatent
from medlatent.errors import MedlatentInputError
from medlatent.results import COLUMNS

METRICS = ("auroc", "balanced_accuracy", "mcc")


def summary(value: float, half: float = 0.05) -> dict:
    """{metric: {"value", "ci95"}} as `RunScores.summary` writes it (every metric alike)."""
    return {m: {"value": value, "ci95": [value - half, value + half]} for m in METRICS}


def gap_entry(value: float) -> dict:
    return {m: {**e, "excludes_zero": False, "paired_test": None} for m, e in summary(value).items()}


def per_run(*values: float) -> dict:
    return {m: list(values) for m in METRICS}


def gap_results(name: str = "kl-f4", latent: float = 0.7) -> dict:
    """A gap run's results.json: one (autoencoder, model) row of two runs, with a latent variant
    (whose share of the gap is undefined for MCC) and a diffusion classifier row."""
    scores = {"image": 0.9, "reconstruction": 0.85, "latent": latent}
    row = {
        "autoencoder": f"builtin:{name}",
        "autoencoder_name": name,
        "model": "deep",
        "interval_method": "bootstrap",
        "encoder_only": False,
        "scores": {space: summary(v) for space, v in scores.items()},
        "gaps": {"fidelity": gap_entry(0.05), "learnability": gap_entry(0.85 - latent)},
        "unreliable_gaps": {},
        "per_run": {
            "runs": ["official/seed0", "official/seed1"],
            "scores": {space: per_run(v - 0.01, v + 0.01) for space, v in scores.items()},
        },
        "classifiers": {},
        "variants": {
            "noise-conditioned": {
                "scores": summary(0.8),
                "share_of_gap_closed": {
                    "auroc": {"value": 0.6, "ci95": [0.2, 0.9], "method": "bootstrap"},
                    "balanced_accuracy": {"value": 0.5, "ci95": [0.1, 0.8], "method": "bootstrap"},
                    "mcc": None,
                },
                "per_run": per_run(0.79, 0.81),
            }
        },
        "diffusion_classifiers": {
            "ldm: mean error": {
                "scores": summary(0.75),
                "evaluations_per_image": 102.0,
                "space_minus_diffusion": {space: gap_entry(v - 0.75) for space, v in scores.items()},
                "per_run": per_run(0.74, 0.76),
            }
        },
    }
    return {"kind": "medlatent.gap", "dataset": {"name": "synthetic"}, "interval_method": "bootstrap", "rows": [row]}


def augment_results() -> dict:
    def condition(value: float, real: bool) -> dict:
        return {
            "scores": summary(value),
            "per_seed": per_run(value - 0.01, value + 0.01),
            "difference_vs_real": None if real else gap_entry(value - 0.8),
            "train_size": 60,
            "health": [{"run": "seed0", "flags": []}, {"run": "seed1", "flags": []}],
            "flagged": False,
        }

    return {
        "kind": "augment",
        "dataset": {"name": "synthetic"},
        "interval_method": "bootstrap",
        "model": {"autoencoder": "builtin:kl-f4-synthetic"},
        "table": {
            "latent": {
                "real": condition(0.8, True),
                "real+synthetic": condition(0.82, False),
                "synthetic": condition(0.7, False),
            }
        },
        "quality": {
            "class_consistency": {"normal": 0.9, "nodule": 0.8},
            "frechet_distance": 3.5,
            "precision": 0.7,
            "recall": 0.6,
            "near_copy_share": 0.0,
            "seeds": 2,
        },
    }


def audit_results() -> dict:
    section = {
        "families": {
            "noise": {
                "severities": [
                    {"severity": 1, "pixel_displacement": 0.1, "latent_displacement": 0.2, "ratio": 2.0},
                    {"severity": 2, "pixel_displacement": 0.2, "latent_displacement": 0.3, "ratio": 1.5},
                ],
                "rank_correlation": 0.9,
            }
        },
        "shift_equivariance": {"stride": 4, "error": None, "reason": "too small"},
        "clean_reconstruction_psnr": 30.0,
        "seconds": 1.5,
    }
    robustness = {"curves": {"noise": {"latent": [{"severity": 0, "auroc": {"value": 0.8, "ci95": [0.7, 0.9]}}]}}}
    card = {
        "autoencoder": {"name": "kl-f4", "spec": "builtin:kl-f4"},
        "sections": {"perturbation": section, "robustness": robustness},
    }
    return {"kind": "medlatent.audit", "dataset": {"name": "synthetic"}, "autoencoders": [card]}


def diffusion_classify_results() -> dict:
    return {
        "kind": "medlatent.diffusion_classifier",
        "dataset": {"name": "synthetic"},
        "draws": 11,
        "classifiers": {
            "mean error": {"scores": summary(0.7), "evaluations_per_image": 22.0, "kind": "diffusion"},
            "vote (11 draws)": {"scores": summary(0.68), "evaluations_per_image": 22.0, "kind": "diffusion"},
        },
        "difference_to_discriminative": {},
        "early_stopping": {
            "vote, stopped when decided": {
                "difference_to_full_vote": gap_entry(-0.01),
                "evaluation_share": 0.6,
                "same_class_as_full_vote": 0.97,
            }
        },
        "uncertainty": {
            "mean error: error gap": {"coverage": [0.5, 1.0], "risk": [0.1, 0.2], "aurc": 0.15, "error_rate": 0.2}
        },
        "explanations": {"peak_on_lesion": {"class_difference": {"rate": 0.5, "of": 4, "ci95": [0.15, 0.85]}}},
    }


def counterfactual_results() -> dict:
    curve = {"strength": 0.5, "sigma": 1.2, "drift": 0.0, "l1": 0.05, "ssim": 0.9, "changed_pixels": 0.02}
    return {
        "kind": "medlatent.counterfactual",
        "dataset": {"name": "synthetic"},
        "curves": [{**curve, "validity": {"rate": 0.75, "ci95": [0.4, 0.9]}, "frechet_distance": 2.0}],
        "drift_search": {
            "strength": 0.5,
            "distance": "frechet_distance",
            "curve": [{"drift": -0.1, "frechet_distance": 2.5}, {"drift": 0.0, "frechet_distance": 2.0}],
            "chosen": 0.0,
        },
    }


def write_run(folder, results: dict):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(results), encoding="utf-8")
    return folder


def test_a_gap_run_is_one_row_per_autoencoder_model_space_run_and_metric(tmp_path):
    results = gap_results()
    table = medlatent.load_results(write_run(tmp_path / "gap", results))
    # 3 spaces + 2 gaps + 3 spaces x 2 runs; variant: scores, shares, 2 runs; diffusion: scores,
    # evaluations, 3 differences, 2 runs
    assert table.shape == (3 * (3 + 2 + 6) + 3 * (1 + 1 + 2) + 3 * (1 + 3 + 2) + 1, len(COLUMNS))
    assert list(table.columns) == list(COLUMNS)
    assert set(table["command"]) == {"gap"} and set(table["run_folder"]) == {str(tmp_path / "gap")}
    headline = table.query("space == 'latent' and run == 'mean' and metric == 'auroc'").iloc[0]
    json_entry = results["rows"][0]["scores"]["latent"]["auroc"]
    assert headline["value"] == json_entry["value"]
    assert [headline["ci_low"], headline["ci_high"]] == json_entry["ci95"]
    assert (headline["autoencoder"], headline["model"], headline["interval_method"]) == ("kl-f4", "deep", "bootstrap")
    gap = table.query("space == 'learnability gap' and metric == 'mcc'").iloc[0]
    assert gap["quantity"] == "difference" and gap["value"] == pytest.approx(0.15)
    run = table.query("space == 'image' and run == 'official/seed1' and metric == 'auroc'").iloc[0]
    assert run["value"] == pytest.approx(0.91) and math.isnan(run["ci_low"]) and pd.isna(run["interval_method"])
    share = table.query("quantity == 'share' and metric == 'mcc'").iloc[0]  # undefined: its gap's interval holds 0
    assert math.isnan(share["value"])
    assert table.query("space == 'diffusion classifier ldm: mean error' and run == 'official/seed0'").shape[0] == 3
    # a results.json path reads the same as its folder
    pd.testing.assert_frame_equal(medlatent.load_results(tmp_path / "gap" / "results.json"), table)


@pytest.mark.parametrize(
    "results, command, rows, space, metric, value",
    [
        # per condition: 3 headline, 6 per seed, 3 differences but for real; quality: 4 measures + 2 classes
        (augment_results(), "augment", 9 + 12 + 12 + 6, "latent: real+synthetic - real", "auroc", 0.82 - 0.8),
        # perturbation: 3 measures x 2 severities, rank correlation, shift stride, PSNR; robustness: 1 AUROC
        (audit_results(), "audit", 6 + 3 + 1, "robustness/curves/noise/latent/severity=0", "auroc", 0.8),
        # 2 rules x (3 scores + evaluations), 3 differences + 2 measures of the early stop, AURC and error rate, 1 peak
        (diffusion_classify_results(), "diffusion classify", 8 + 5 + 2 + 1, "mean error", "mcc", 0.7),
        # 5 measures with validity, 2 search points and the chosen drift
        (counterfactual_results(), "counterfactual", 5 + 3, "strength 0.5, drift +0", "validity", 0.75),
    ],
)
def test_every_command_s_results_are_read(tmp_path, results, command, rows, space, metric, value):
    table = medlatent.load_results(write_run(tmp_path / "run", results))
    assert table.shape == (rows, len(COLUMNS)) and set(table["command"]) == {command}
    hit = table[(table["space"] == space) & (table["metric"] == metric)]
    assert len(hit) == 1 and hit["value"].iloc[0] == pytest.approx(value)


def test_the_audits_leaves_keep_their_path_and_interval(tmp_path):
    table = medlatent.load_results(write_run(tmp_path / "run", audit_results()))
    ratio = table.query("metric == 'ratio'")
    assert list(ratio["space"]) == [f"perturbation/families/noise/severities/severity={s}" for s in (1, 2)]
    assert "seconds" not in set(table["metric"]) and "error" not in set(table["metric"])  # timing; null
    auroc = table.query("metric == 'auroc'").iloc[0]
    assert (auroc["ci_low"], auroc["ci_high"], auroc["interval_method"]) == (0.7, 0.9, "bootstrap")


@pytest.mark.parametrize(
    "content, fragment",
    [
        ("{not json", "cannot read it as results"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({"kind": "medlatent.sampler", "dataset": {"name": "x"}}), "results of kind 'medlatent.sampler'"),
        (json.dumps({"kind": "medlatent.gap", "dataset": {"name": "x"}}), "not the complete results"),
        (json.dumps({**gap_results(), "rows": [{"scores": "cut"}]}), "not the complete results"),
        (json.dumps({"kind": ["gap"], "dataset": {"name": "x"}}), "results of kind"),
    ],
)
def test_a_bad_results_file_is_one_error_naming_it(tmp_path, content, fragment):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "results.json").write_text(content, encoding="utf-8")
    with pytest.raises(MedlatentInputError) as error:
        medlatent.load_results(folder)
    message = str(error.value)
    assert str(folder / "results.json") in message and fragment in message and "\n" not in message


def test_a_folder_without_results_is_one_error(tmp_path):
    with pytest.raises(MedlatentInputError, match="no results.json here"):
        medlatent.load_results(tmp_path)


def test_compare_writes_the_page_and_a_table_that_round_trips(tmp_path):
    a = write_run(tmp_path / "a" / "run", gap_results("kl-f4", latent=0.7))
    b = write_run(tmp_path / "b" / "run", gap_results("kl-f8", latent=0.6))
    out = tmp_path / "compare"
    result = medlatent.compare(runs=[str(a), str(b)], out=str(out))
    assert result["command"] == "gap" and result["metric"] == "auroc"
    assert result["runs"] == [str(a), str(b)]  # the same folder name twice: headed by their paths
    expected = pd.concat([medlatent.load_results(a), medlatent.load_results(b)], ignore_index=True)
    pd.testing.assert_frame_equal(pd.read_csv(out / "comparison.csv"), expected)
    html = (out / "comparison.html").read_text(encoding="utf-8")
    assert "data:image/png;base64," in html and "<script" not in html  # self-contained
    assert "learnability gap" in html and "+0.150" in html and "+0.250" in html  # each run's gap
    assert "0.700" in html and "[0.650, 0.750]" in html  # a headline with its interval
    with pytest.raises(MedlatentInputError, match="--overwrite"):
        medlatent.compare(runs=[str(a)], out=str(out))
    medlatent.compare(runs=[str(a)], out=str(out), overwrite=True, metric="mcc")
    assert set(pd.read_csv(out / "comparison.csv")["run_folder"]) == {str(a)}
    assert "Headline mcc" in (out / "comparison.html").read_text(encoding="utf-8")


def test_compare_on_the_command_line(tmp_path, run_cli, capsys):
    a = write_run(tmp_path / "a", gap_results("kl-f4"))
    b = write_run(tmp_path / "b", augment_results())
    out = tmp_path / "compare"
    assert run_cli("compare", str(a), str(a / "results.json"), "--out", str(out)) == 0
    assert "comparison.csv" in capsys.readouterr().out
    assert (out / "comparison.html").is_file() and (out / "config.yaml").is_file()
    assert run_cli("compare", str(a), str(b), "--out", str(tmp_path / "mixed")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "different commands" in err[0] and "`medlatent gap`" in err[0]
    assert "`medlatent augment`" in err[0] and not (tmp_path / "mixed").exists()


def test_compare_refuses_mixed_commands_an_unknown_metric_and_no_runs(tmp_path):
    a = write_run(tmp_path / "a", gap_results())
    b = write_run(tmp_path / "b", counterfactual_results())
    with pytest.raises(MedlatentInputError, match="different commands") as error:
        medlatent.compare(runs=[str(a), str(b)], out=str(tmp_path / "out"))
    assert "\n" not in str(error.value)
    with pytest.raises(MedlatentInputError, match="--metric ssim: not among these runs' metrics; use one of auroc"):
        medlatent.compare(runs=[str(a)], out=str(tmp_path / "out"), metric="ssim")
    with pytest.raises(MedlatentInputError, match="give the run folders"):
        medlatent.compare(out=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_real_gap_run_reads_and_compares(tmp_path):
    """The table of a run `medlatent gap` wrote, against its results.json (7 s on 2 CPU cores; 20 s cold)."""
    out = tmp_path / "gap"
    medlatent.gap(
        dataset="synthetic:n_train=60,n_val=20,n_test=40",
        size=16,
        epochs=1,
        out=str(out),
        cache_dir=str(tmp_path / "cache"),
        progress=False,
        linear_probe=False,
        bootstrap=100,
    )
    table = medlatent.load_results(out)
    row = json.loads((out / "results.json").read_text(encoding="utf-8"))["rows"][0]
    # 3 spaces and 2 gaps, and the 3 spaces of the one run, x 3 metrics
    assert table.shape == ((3 + 2 + 3) * 3, len(COLUMNS))
    for space in ("image", "reconstruction", "latent"):
        headline = table.query(f"space == '{space}' and run == 'mean' and metric == 'auroc'").iloc[0]
        assert headline["value"] == row["scores"][space]["auroc"]["value"]
        assert [headline["ci_low"], headline["ci_high"]] == row["scores"][space]["auroc"]["ci95"]
    gap = table.query("space == 'learnability gap' and metric == 'auroc'").iloc[0]
    assert gap["value"] == row["gaps"]["learnability"]["auroc"]["value"]
    assert set(table.query("run != 'mean'")["run"]) == set(row["per_run"]["runs"])
    compared = medlatent.compare(runs=[str(out), str(out)], out=str(tmp_path / "compare"))
    assert compared["rows"] == 2 * len(table)
    pd.testing.assert_frame_equal(
        pd.read_csv(tmp_path / "compare" / "comparison.csv"), pd.concat([table, table], ignore_index=True)
    )
