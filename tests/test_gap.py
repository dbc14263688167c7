from __future__ import annotations

import json
import subprocess
import sys
import typing

import numpy as np
import pytest

import medlatent
from medlatent.api import load_config
from medlatent.audits.config import GapConfig
from medlatent.errors import MedlatentInputError


def medlatent_version():
    from importlib.metadata import version

    return version("medlatent")


TINY = dict(
    dataset="synthetic:n_train=48,n_val=16,n_test=40,lesion_size=0.12,lesion_contrast=0.5",
    size=32,
    backbone="resnet10t",
    epochs=1,
    batch_size=16,
    bootstrap=100,
    progress=False,
)


def test_gap_end_to_end_writes_results_and_report(tmp_path, tiny_builtin_folder):
    out = tmp_path / "run"
    results = medlatent.gap(
        **TINY, autoencoders=[f"builtin:{tiny_builtin_folder}"], out=str(out), cache_dir=str(tmp_path / "cache")
    )
    saved = json.loads((out / "results.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(results["rows"]))
    assert [r["model"] for r in saved["rows"]] == ["deep", "linear"]
    row = saved["rows"][0]
    for space in ("image", "reconstruction", "latent"):
        auroc = row["scores"][space]["auroc"]
        assert 0 <= auroc["ci95"][0] <= auroc["value"] <= auroc["ci95"][1] <= 1
    gap = row["gaps"]["learnability"]["auroc"]
    assert gap["value"] == pytest.approx(
        row["scores"]["reconstruction"]["auroc"]["value"] - row["scores"]["latent"]["auroc"]["value"]
    )
    ae = saved["autoencoders"][0]
    assert (
        ae["content_hash"].startswith("sha256:")
        and ae["latent_shape"] == [4, 8, 8]
        and ae["reconstruction_quality"]["psnr"] > 5
    )
    prov = saved["provenance"]
    assert prov["config"]["run"]["seeds"] == [0] and prov["packages"]["torch"] and prov["packages"]["diffusers"]
    # Training curves and health of every classifier; diagnostics for the report.
    deep = row["classifiers"]["latent"]
    assert (
        deep["health"][0]["epochs_run"] == 1
        and deep["health"][0]["stop_reason"]
        and len(deep["curves"][0]["val_balanced_accuracy"]) == 1
    )
    assert np.sum(deep["confusion"]) == 40 and len(deep["per_class"]) == 2 and 0 <= deep["calibration"]["ece"] <= 1
    # results.json stays small: samples are PNG files, predictions a compact npz beside it.
    assert (out / "results.json").stat().st_size < 300_000
    assert all((out / f).is_file() for f in saved["samples"]["original"]) and saved["samples"]["labels"][0] in (
        "normal",
        "nodule",
    )
    stored = np.load(out / saved["predictions_file"])
    assert stored["probs/tiny/latent/deep/official/seed0"].shape == (40, 2) and len(stored["split/official/val"]) == 16
    assert saved["provenance"]["medlatent"] == medlatent_version()
    html = (out / "report.html").read_text()
    assert "Learnability gap" in html and html.count("data:image/png;base64") >= 6
    for section in ("Per run", "Calibration", "Training curves", "Confusion matrices", "ROC curves", "nodule"):
        assert section in html
    # Rebuilding the report from results.json alone gives the same page.
    (out / "report.html").unlink()
    medlatent.report(out)
    assert (out / "report.html").read_text().count("data:image/png;base64") == html.count("data:image/png;base64")


def test_gap_resumes_finished_classifiers_and_supports_folds(tmp_path, tiny_builtin_folder):
    options = dict(
        TINY,
        autoencoders=[f"builtin:{tiny_builtin_folder}"],
        out=str(tmp_path / "run"),
        cache_dir=str(tmp_path / "cache"),
        folds=2,
        linear_probe=False,
    )
    first = medlatent.gap(**options)
    assert [s["name"] for s in first["splits"]] == ["fold0", "fold1"]
    row = first["rows"][0]
    assert row["gaps"]["learnability"]["auroc"]["paired_test"]["n"] == 2
    # The headline is the mean of the per-fold scores, and every table uses before - after.
    per_run = row["per_run"]["scores"]
    for space in ("image", "reconstruction", "latent"):
        assert row["scores"][space]["auroc"]["value"] == pytest.approx(np.mean(per_run[space]["auroc"]))
    learn = row["gaps"]["learnability"]["auroc"]
    assert learn["value"] == pytest.approx(
        np.mean(per_run["reconstruction"]["auroc"]) - np.mean(per_run["latent"]["auroc"])
    )
    assert learn["paired_test"]["mean_difference"] == pytest.approx(learn["value"])
    assert set(row["pooled_out_of_fold"]) == {"image", "reconstruction", "latent"}  # secondary, labelled
    second = medlatent.gap(**options)
    assert second["rows"][0]["scores"] == first["rows"][0]["scores"]  # reused, not retrained
    assert all(ae["cache_reused"] for ae in second["autoencoders"]) and not any(
        ae["cache_reused"] for ae in first["autoencoders"]
    )
    assert second["resumed_classifiers"] == second["trained_classifiers"] == 6 and first["resumed_classifiers"] == 0


def test_yaml_config_and_overrides(tmp_path):
    cfg = tmp_path / "gap.yaml"
    cfg.write_text("dataset: synthetic\nsize: 32\nautoencoders: [builtin:kl-f4-synthetic]\nepochs: 3\n")
    config = load_config(cfg, {"epochs": 5, "size": None})
    assert (config.data.size, config.train.epochs, config.autoencoders) == (32, 5, ["builtin:kl-f4-synthetic"])
    cfg.write_text("datset: synthetic\n")
    with pytest.raises(MedlatentInputError, match="unknown key datset"):
        load_config(cfg, {})


def test_yaml_keys_are_the_option_names_and_scalars_become_lists(tmp_path):
    cfg = tmp_path / "gap.yaml"
    cfg.write_text(
        "autoencoder: builtin:kl-f4-synthetic\nseed: 1\nbatch-size: 8\n"
        "label_column: finding\nema-decay: 0.9\nlatent-variants: distilled\n"
    )
    config = load_config(cfg, {})
    assert (
        config.autoencoders == ["builtin:kl-f4-synthetic"] and config.run.seeds == [1] and config.train.batch_size == 8
    )
    assert (
        config.data.label_columns == ["finding"]
        and config.train.loop.ema_decay == 0.9
        and config.latent_variants == ["distilled"]
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('epochs: "2"\n', "key epochs: expected an integer, got the string '2'"),
        ("seeds: [1, two]\n", "key seeds: expected an integer, got the string 'two'"),
        ("linear-probe: 1\n", "key linear-probe: expected true or false, got 1 \\(int\\)"),
        ("lr: fast\n", "key lr: expected a number"),
        ("- 1\n", "expected a mapping"),
    ],
)
def test_a_wrong_yaml_type_is_one_clear_line(tmp_path, text, message):
    cfg = tmp_path / "gap.yaml"
    cfg.write_text(text)
    with pytest.raises(MedlatentInputError, match=message) as err:
        load_config(cfg, {})
    assert str(cfg) in str(err.value) and "\n" not in str(err.value)


def test_every_setting_is_declared_once_with_one_default():
    """The gap's and `classifier train`'s options come from the same fields: same names, same defaults."""
    from medlatent.config import TrainConfig, cli_parameters, flat, leaves

    gap_options = {p.name: p for p in cli_parameters(GapConfig)}
    train_options = {p.name: p for p in cli_parameters(TrainConfig)}
    shared = set(gap_options) & set(train_options)
    assert {"backbone", "epochs", "patience", "batch_size", "lr", "ema_decay"} <= shared
    option = lambda p: typing.get_args(p.annotation)[1]  # noqa: E731 - typer's OptionInfo
    assert all(
        option(gap_options[n]).help == option(train_options[n]).help
        and option(gap_options[n]).param_decls == option(train_options[n]).param_decls
        for n in shared
    )
    defaults = flat(GapConfig())
    set_by_audit = {"seed", "noise_conditioned", "freeze_backbone", "sigma_data"}
    assert {leaf.name for leaf in leaves(TrainConfig)} - {leaf.name for leaf in leaves(GapConfig)} == set_by_audit
    assert all(defaults[leaf.name] == leaf.default for leaf in leaves(TrainConfig) if leaf.name not in set_by_audit)
    names = [leaf.name for leaf in leaves(GapConfig)]
    assert len(names) == len(set(names))  # no setting declared twice


def _cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "medlatent.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dataset", "medmnist:missing.npz"], "file not found"),
        (["--dataset", "csv:nope.csv"], "file not found"),
        (["--autoencoder", "hf:no-such-org/no-such-vae"], "cannot resolve"),
        (["--autoencoder", "taesd:missing_encoder.pth"], "not found"),
        (["--autoencoder", "timm:resnet1"], "is not a timm model"),
        (["--autoencoder", "timm:test_resnet:layer9"], "has no layer 'layer9'"),
        (["--folds", "1"], "--folds 1"),
        (["--size", "4"], "--size 4"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, tiny_builtin_folder, args, message, monkeypatch, capsys):
    """In process (fast); the fresh-process smoke test below checks that no library notice comes first."""
    from medlatent.cli import main

    defaults = {
        "--dataset": "synthetic:n_train=20,n_val=4,n_test=8",
        "--autoencoder": f"builtin:{tiny_builtin_folder}",
    }
    defaults.update(zip(args[::2], args[1::2], strict=False))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(
        sys,
        "argv",
        ["medlatent", "gap", "--out", str(tmp_path / "out"), "--quiet", *(x for kv in defaults.items() for x in kv)],
    )
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main()
    captured = capsys.readouterr()
    assert exit_.value.code == 2, captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("medlatent: error:") and message in lines[0] and not captured.out
    assert not (tmp_path / "out" / "results.json").exists()


@pytest.mark.slow
def test_cli_bad_input_in_a_fresh_process_prints_only_the_error(tmp_path):
    result = _cli("gap", "--out", str(tmp_path / "out"), "--dataset", "csv:nope.csv", cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and "file not found" in result.stderr


def test_cli_unknown_option_is_a_usage_error_not_a_traceback(tmp_path):
    result = _cli("gap", "--no-such-option", cwd=tmp_path)
    assert result.returncode == 2
    assert "No such option" in result.stderr and "Traceback" not in result.stderr


def test_cli_report_of_missing_run(tmp_path):
    result = _cli("report", str(tmp_path / "nothing"), cwd=tmp_path)
    assert result.returncode == 2 and "no results.json" in result.stderr


@pytest.mark.parametrize("flag, labels_dim, classes, rgb", [("chestmnist", 14, 2, False), ("dermamnist", 1, 7, True)])
def test_gap_multilabel_and_multiclass_rgb(tmp_path, tiny_kl_folder, flag, labels_dim, classes, rgb):
    from .test_data import _write_npz

    npz = _write_npz(
        tmp_path / f"{flag}.npz", n=(40, 14, 21), size=28, labels_dim=labels_dim, classes=classes, rgb=rgb
    )
    results = medlatent.gap(
        **{**TINY, "dataset": f"medmnist:{npz}", "size": 16},
        autoencoders=[f"hf:{tiny_kl_folder}"],
        out=str(tmp_path / "run"),
        cache_dir=str(tmp_path / "cache"),
    )
    assert results["dataset"]["task"] == ("multilabel" if labels_dim > 1 else "multiclass")
    for row in results["rows"]:
        for space in ("image", "reconstruction", "latent"):
            value = row["scores"][space]["auroc"]["value"]
            assert 0.0 <= value <= 1.0  # random labels: any value, but a real number
    assert (tmp_path / "run" / "report.html").is_file()


@pytest.mark.slow
def test_cli_autoencoder_train(tmp_path):
    out = tmp_path / "my-kl"
    result = _cli(
        "autoencoder",
        "train",
        "--out",
        str(out),
        "--dataset",
        "synthetic:n_train=16,n_val=2,n_test=2",
        "--size",
        "16",
        "--steps",
        "2",
        "--quiet",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert (out / "config.json").is_file() and (out / "diffusion_pytorch_model.safetensors").is_file()
    record = json.loads((out / "medlatent_training.json").read_text())
    assert record["recipe"]["steps"] == 2 and record["dataset"]["num_samples"] == 20
    assert not list(tmp_path.glob(".my-kl.partial"))


def test_variant_training_configuration():
    config = load_config(None, {"epochs": 12, "patience": 4, "distill_alpha": 0.3, "latent_std": 0.7})
    plain, conditioned, distilled = (
        config.train_config(0),
        config.train_config(0, "noise-conditioned"),
        config.train_config(0, "distilled"),
    )
    assert (plain.epochs, plain.patience, plain.noise_conditioned) == (12, 4, False)
    assert (conditioned.epochs, conditioned.patience, conditioned.noise_conditioned) == (36, 12, True)
    assert (distilled.epochs, distilled.noise_conditioned, distilled.distill_alpha, distilled.sigma_data) == (
        36,
        True,
        0.3,
        0.7,
    )
    with pytest.raises(MedlatentInputError, match="--variant-epoch-factor"):
        GapConfig(variant_epoch_factor=0.5)


def test_gap_latent_variants(tmp_path, tiny_builtin_folder):
    common = dict(
        TINY,
        autoencoders=[f"builtin:{tiny_builtin_folder}"],
        out=str(tmp_path / "run"),
        cache_dir=str(tmp_path / "cache"),
        linear_probe=False,
        sweep_points=3,
    )
    # A first run without variants stores the plain latent classifier without the weights the
    # variants start from: the run that asks for them trains it again instead of failing.
    medlatent.gap(**common)
    assert not list((tmp_path / "run").rglob("*.safetensors"))
    results = medlatent.gap(**common, latent_variants=["noise-conditioned", "distilled"])
    assert [p.name.split("-")[0] for p in (tmp_path / "run").rglob("*.safetensors")] == ["latent"]
    assert results["resumed_classifiers"] == 2  # the image and reconstruction classifiers
    variants = results["rows"][0]["variants"]
    assert set(variants) == {"noise-conditioned", "distilled"}
    for v in variants.values():
        assert 0 <= v["scores"]["auroc"]["value"] <= 1
        assert len(v["sigma_sweep"]["sigma"]) == 3 and len(v["sigma_sweep"]["auroc"]) == 3
        share = v["share_of_gap_closed"]["auroc"]
        gap_ci = results["rows"][0]["gaps"]["learnability"]["auroc"]["ci95"]
        assert (share is None) == (gap_ci[0] <= 0 <= gap_ci[1])
    html = (tmp_path / "run" / "report.html").read_text()
    assert "Sigma sweep" in html and "latent (distilled)" in html


@pytest.mark.slow
def test_cli_classifier_train_distill_and_eval(tmp_path, tiny_builtin_folder):
    data = [
        "--dataset",
        "synthetic:n_train=48,n_val=16,n_test=24,lesion_size=0.12,lesion_contrast=0.5",
        "--size",
        "32",
    ]
    common = [
        *data,
        "--backbone",
        "resnet10t",
        "--epochs",
        "1",
        "--patience",
        "1",
        "--batch-size",
        "16",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--quiet",
    ]
    teacher = _cli(
        "classifier", "train", "--out", str(tmp_path / "teacher"), "--space", "image", *common, cwd=tmp_path
    )
    assert teacher.returncode == 0, teacher.stderr
    student = _cli(
        "classifier",
        "train",
        "--out",
        str(tmp_path / "student"),
        "--space",
        "latent",
        "--autoencoder",
        f"builtin:{tiny_builtin_folder}",
        "--noise-conditioned",
        "--distill-from",
        str(tmp_path / "teacher"),
        "--distill-loss",
        "mse",
        *common,
        cwd=tmp_path,
    )
    assert student.returncode == 0, student.stderr
    assert "test AUROC" in student.stdout and (tmp_path / "student" / "input_scaler.safetensors").is_file()
    config = json.loads((tmp_path / "student" / "estimator.json").read_text())
    assert (
        config["train_config"]["noise_conditioned"]
        and config["train_config"]["distill_alpha"] < 1
        and config["train_config"]["patience"] == 1
    )
    result = _cli(
        "classifier",
        "eval",
        str(tmp_path / "student"),
        *data,
        "--autoencoder",
        f"builtin:{tiny_builtin_folder}",
        "--sigma",
        "0.1",
        "--sigma",
        "10",
        "--json",
        str(tmp_path / "eval.json"),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--quiet",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    sweep = json.loads((tmp_path / "eval.json").read_text())["sigma_sweep"]
    assert [p["sigma"] for p in sweep] == [0.1, 10.0]
    bad = _cli("classifier", "train", "--out", str(tmp_path / "x"), "--space", "latent", *common, cwd=tmp_path)
    assert bad.returncode == 2 and "needs --autoencoder" in bad.stderr


def test_collapsed_classifiers_are_flagged_and_their_gaps_marked_unreliable(tmp_path, tiny_builtin_folder):
    # A learning rate of ~0 leaves the randomly initialised models where they started: near-constant outputs.
    results = medlatent.gap(
        **{**TINY, "epochs": 2, "lr": 1e-12},
        autoencoders=[f"builtin:{tiny_builtin_folder}"],
        out=str(tmp_path / "run"),
        cache_dir=str(tmp_path / "cache"),
        linear_probe=False,
    )
    row = results["rows"][0]
    assert row["classifiers"]["image"]["flagged"] and row["classifiers"]["latent"]["flagged"]
    assert any("constant" in f for f in row["classifiers"]["image"]["health"][0]["flags"])
    assert (
        set(row["unreliable_gaps"]) == {"fidelity", "learnability"}
        and "--epochs" in row["unreliable_gaps"]["learnability"]["advice"]
    )
    html = (tmp_path / "run" / "report.html").read_text()
    assert "unreliable" in html and "Training health" in html


def test_cli_help_fits_80_columns_and_shows_every_default(tmp_path):
    import os

    result = subprocess.run(
        [sys.executable, "-m", "medlatent.cli", "gap", "--help"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "COLUMNS": "200"},
        timeout=120,
    )
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert max(map(len, lines)) <= 80
    options = [line.split()[0] for line in lines if line.startswith("  --") and not line.startswith("  --help")]
    assert len(options) > 30 and result.stdout.count("[default:") >= len(options) - 2  # --config and --quiet have none
    text = " ".join(result.stdout.split())  # help wraps long lines
    assert "[default: resnet10t]" in text and "[default: official split]" in text


@pytest.mark.slow
def test_streamed_spaces_give_the_in_memory_results(tmp_path, tiny_builtin_folder):
    """--stream on reads images, reconstructions and latents from disk while training: the same
    classifiers, scores and predictions as holding them in memory."""
    options = dict(
        TINY,
        autoencoders=[f"builtin:{tiny_builtin_folder}"],
        cache_dir=str(tmp_path / "cache"),
        latent_variants="distilled",
    )
    held = medlatent.gap(**options, out=str(tmp_path / "memory"), stream="off")
    streamed = medlatent.gap(**options, out=str(tmp_path / "streamed"), stream="on")
    assert streamed["streamed"] and not held["streamed"]
    assert streamed["rows"] == held["rows"]
    a, b = np.load(tmp_path / "memory" / "predictions.npz"), np.load(tmp_path / "streamed" / "predictions.npz")
    assert all(np.array_equal(a[k], b[k]) for k in a.files)


def test_a_diffusion_classifier_is_a_row_beside_the_spaces(tmp_path, tiny_builtin_folder):
    import medlatent.api as api

    data = {k: TINY[k] for k in ("dataset", "size")}
    ae = f"builtin:{tiny_builtin_folder}"
    model = api.diffusion_train(
        tmp_path / "ldm",
        ae,
        progress=False,
        steps=3,
        batch_size=8,
        cache_dir=str(tmp_path / "cache"),
        preset="tiny",
        device="cpu",
        **data,
    )
    options = dict(
        TINY,
        autoencoders=[ae],
        out=str(tmp_path / "run"),
        cache_dir=str(tmp_path / "cache"),
        linear_probe=False,
        diffusion_models=[str(model)],
        diffusion_draws=4,
    )
    results = medlatent.gap(**options)
    row = results["rows"][0]
    rows = row["diffusion_classifiers"]
    assert set(rows) == {"ldm: mean error", "ldm: vote (4 draws)", "ldm: mean error, stopped early (paired test)"}
    vote = rows["ldm: vote (4 draws)"]
    assert (
        vote["evaluations_per_image"] == 8
        and rows["ldm: mean error, stopped early (paired test)"]["evaluations_per_image"] <= 8
    )
    for space in ("image", "reconstruction", "latent"):  # paired differences, space - diffusion
        assert vote["space_minus_diffusion"][space]["auroc"]["value"] == pytest.approx(
            row["scores"][space]["auroc"]["value"] - vote["scores"]["auroc"]["value"]
        )
    stored = np.load(tmp_path / "run" / results["predictions_file"])
    assert stored["probs/tiny/diffusion/ldm: mean error/official/seed0"].shape == (40, 2)
    assert "Diffusion classifiers on the same test images" in (tmp_path / "run" / "report.html").read_text()
    assert (
        len(list((tmp_path / "run" / "parts").glob("*/diffusion-ldm-*-official-seed0.npz"))) == 1
    )  # stored with the run: a rerun reuses it
    assert medlatent.gap(**options)["rows"][0]["diffusion_classifiers"] == rows
    with pytest.raises(MedlatentInputError, match="learnt from .* test images of split fold0"):
        medlatent.gap(
            **dict(options, folds=2)
        )  # the model trained on the official training images, which fold 0 tests on
    with pytest.raises(MedlatentInputError, match="--diffusion-sigma 'wide'"):
        medlatent.gap(**dict(options, diffusion_sigma="wide"))
    tolerant = medlatent.gap(**dict(options, diffusion_tolerance=0.05))["rows"][0]["diffusion_classifiers"]
    chosen = tolerant["ldm: early stop chosen for a tolerance of 0.05"]
    assert 0 < chosen["evaluations_per_image"] <= 8 and tolerant["ldm: vote (4 draws)"] == rows["ldm: vote (4 draws)"]
    with pytest.raises(MedlatentInputError, match="--diffusion-model .*nothing: not a latent diffusion model"):
        medlatent.gap(**dict(options, diffusion_models=[str(tmp_path / "nothing")]))
    with pytest.raises(MedlatentInputError, match="does not include"):
        medlatent.gap(**dict(options, autoencoders=["builtin:kl-f4-synthetic"]))


def test_the_saved_config_yaml_runs_the_same_configuration_again(tmp_path):
    from medlatent.api import load_config
    from medlatent.rundir import write_settings

    config = load_config(
        None,
        {
            "epochs": 3,
            "seed": [0, 4],
            "autoencoder": ["reference:blur"],
            "latent-variants": ["noise-conditioned"],
            "out": str(tmp_path / "run"),
        },
    )
    write_settings(tmp_path / "config.yaml", config)
    assert load_config(tmp_path / "config.yaml", {}) == config


def test_protocol_membership_is_field_metadata_and_the_hash_is_stable():
    from medlatent.api import load_config
    from medlatent.audits.config import AugmentConfig

    # The stored classifiers of earlier runs stay valid: these hashes must not change by accident.
    assert GapConfig().protocol_hash() == "a40017b221ce"
    assert AugmentConfig().protocol_hash("abc") == "132aa98b0793"
    given = {"epochs": 3, "seed": [0, 4], "autoencoder": ["reference:blur"], "latent-variants": ["noise-conditioned"]}
    base = load_config(None, {**given, "stream": "on"})
    assert base.protocol_hash() == "1b17db481e05"
    resources = {"out": "x", "threads": 2, "checkpoint-every": 5, "cache-dir": "c", "bootstrap": 500, "device": "cpu"}
    assert load_config(None, {**given, "stream": "on", **resources}).protocol_hash() == base.protocol_hash()
    assert load_config(None, {**given, "stream": "on", "lr": 0.01}).protocol_hash() != base.protocol_hash()
    augment = load_config(
        None,
        {"epochs": 2, "seed": [1], "space": ["image"], "out": "y", "threads": 1, "cfg": 3.0},
        AugmentConfig,
    )
    assert augment.protocol_hash("abc") == "f26332625a50"
