"""The mapped latent variants: `whitened` (per-channel whitening of the latents, a lossless control)
and `decoder-prefix:STAGE` (the frozen decoder up to a stage, then a latent classifier), in the gap
audit's variants table and accuracy-throughput front, and as saved models that take latents
(`classifier train --latent-variant`, `classifier eval`, `score`)."""

from __future__ import annotations

import contextlib
import io
import json
import sys

import numpy as np
import pytest
import torch

import medlatent
from medlatent.classifiers.latent_maps import ChannelWhitening, choose_prefix_stage

DATASET = "synthetic:n_train=32,n_val=12,n_test=24,lesion_size=0.2,lesion_contrast=0.5"
BUILTIN_STAGES = ["latent", "mid", "up0", "up1", "up2", "reconstruction"]
VARIANTS = "whitened,decoder-prefix:up1,decoder-prefix:auto"


@pytest.fixture(scope="module")
def gap_run(tmp_path_factory, tiny_builtin_folder):
    """One gap run through the command line with the three variants and the up1 stage: (folder,
    results, printed summary)."""
    from medlatent.cli import main

    root = tmp_path_factory.mktemp("prefix-gap")
    args = ["medlatent", "gap", "--dataset", DATASET, "--size", "16", "--epochs", "1", "--batch-size", "16"]
    args += ["--bootstrap", "100", "--quiet", "--no-linear-probe", "--autoencoder", f"builtin:{tiny_builtin_folder}"]
    args += ["--cache-dir", str(root / "cache"), "--out", str(root / "run"), "--decoder-stages", "up1"]
    args += ["--latent-variants", VARIANTS]
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed):
        patch.setenv("MEDLATENT_HOME", str(root / "home"))
        patch.setattr(sys, "argv", args)
        with contextlib.suppress(SystemExit):
            main()
    results = json.loads((root / "run" / "results.json").read_text())
    return root / "run", results, printed.getvalue()


def test_whitening_is_invertible_and_whitens_the_training_latents():
    g = torch.Generator().manual_seed(0)
    mixing = torch.randn(4, 4, generator=g) + 2 * torch.eye(4)
    shift = torch.tensor([1.0, -2.0, 3.0, 0.5]).view(1, -1, 1, 1)
    z = torch.einsum("oc,nchw->nohw", mixing, torch.randn(64, 4, 4, 4, generator=g)) + shift
    train = z[:48]
    whitening = ChannelWhitening(4).fit(train)
    assert torch.allclose(whitening.inverse(whitening(z)), z, atol=1e-4)
    assert torch.allclose(whitening(whitening.inverse(z)), z, atol=1e-4)
    channels = whitening(train).double().transpose(0, 1).reshape(4, -1)  # every image and position
    assert torch.allclose(torch.cov(channels), torch.eye(4, dtype=torch.float64), atol=1e-4)
    assert torch.allclose(channels.mean(1), torch.zeros(4, dtype=torch.float64), atol=1e-5)
    assert set(whitening.state_dict()) == {"mean", "matrix", "inverse_matrix"}  # saved with the model
    streamed = ChannelWhitening(4).fit([{"x": x} for x in train])  # a Dataset of {"x": ...}: the same map
    assert torch.allclose(streamed.matrix, whitening.matrix, atol=1e-6)


def test_auto_takes_the_cheapest_stage_within_the_margin_else_the_best():
    candidates = [
        {"stage": s, "index": i, "prefix_flops": f, "validation": v}
        for i, (s, f, v) in enumerate([("latent", 0, 0.70), ("mid", 10, 0.86), ("up0", 30, 0.90), ("out", 90, 0.88)])
    ]
    within = choose_prefix_stage(candidates, reference=0.88, margin=0.02)
    assert within["stage"] == "mid" and within["prefix_flops"] == 10 and "cheapest" in within["reason"]
    assert [c["stage"] for c in within["candidates"]] == ["latent", "mid", "up0", "out"]
    best = choose_prefix_stage(candidates, reference=0.95, margin=0.01)
    assert best["stage"] == "up0" and "no stage reaches" in best["reason"]
    assert choose_prefix_stage(candidates, reference=float("nan"), margin=0.01)["stage"] == "up0"


def test_the_variants_table_has_the_share_of_the_gap_closed_and_the_throughput(gap_run):
    out, results, printed = gap_run
    row = results["rows"][0]
    variants = row["variants"]
    assert list(variants) == VARIANTS.split(",")
    gap_ci = row["gaps"]["learnability"]["auroc"]["ci95"]
    for v in variants.values():
        assert (v["share_of_gap_closed"]["auroc"] is None) == (gap_ci[0] <= 0 <= gap_ci[1])
        assert v["sigma_sweep"] is None and v["throughput"]["inference_samples_per_second"] > 0
    assert variants["whitened"]["throughput"]["prefix_flops"] == 0
    assert variants["whitened"]["whitening"]["method"] == "zca"
    up1, stage = variants["decoder-prefix:up1"], row["decoder_stages"]["stages"][1]
    assert stage["name"] == "up1" and up1["throughput"]["prefix_flops"] == stage["prefix_flops"] > 0
    assert up1["scores"] == stage["scores"]  # the stage's own classifier, trained once
    assert up1["decoder_prefix"]["stages"] == ["up1"] and up1["decoder_prefix"]["indices"] == [3]
    # image, reconstruction, latent, decoder:up1, whitened; auto adds mid, up0, up2 and the full decoder
    assert (results["trained_classifiers"], results["resumed_classifiers"]) == (9, 0)
    stored = np.load(out / "predictions.npz")
    prefix, stage_probs = (
        stored[f"probs/tiny/{k}/deep/official/seed0"] for k in ("decoder-prefix:up1", "decoder:up1")
    )
    assert np.array_equal(prefix, stage_probs) and stored[
        "probs/tiny/decoder:reconstruction/deep/official/seed0"
    ].shape == (24, 2)
    assert "latent (decoder-prefix:up1)=" in printed and "samples/s, prefix" in printed and "(up1)" in printed
    table = medlatent.load_results(out)
    measured = table[(table["space"] == "latent (whitened)") & (table["metric"] == "inference_samples_per_second")]
    assert len(measured) == 1 and measured["value"].iloc[0] > 0


def test_the_accuracy_throughput_front_and_its_figure(gap_run):
    out, results, _ = gap_run
    front = results["accuracy_throughput"][0]
    points = {p["classifier"]: p for p in front["points"]}
    assert list(points) == [
        "image",
        "reconstruction (decoder + classifier)",
        "latent",
        *(f"latent ({v})" for v in VARIANTS.split(",")),
        "decoder:up1",
    ]
    assert all(p["samples_per_second"] > 0 for p in points.values())
    assert points["image"]["input"] == "images" and points["latent"]["prefix_flops"] == 0
    best = max(p["auroc"]["value"] for p in points.values())
    fastest_best = max(
        (p for p in points.values() if p["auroc"]["value"] == best), key=lambda p: p["samples_per_second"]
    )
    assert fastest_best["pareto"] and max(points.values(), key=lambda p: p["samples_per_second"])["pareto"]
    for p in points.values():  # on the front: no other point both scores at least as well and runs at least as fast
        others = [q for q in points.values() if q is not p]
        dominated = any(
            q["auroc"]["value"] >= p["auroc"]["value"]
            and q["samples_per_second"] >= p["samples_per_second"]
            and (q["auroc"]["value"], q["samples_per_second"]) != (p["auroc"]["value"], p["samples_per_second"])
            for q in others
        )
        assert p["pareto"] == (not dominated)
    html = (out / "report.html").read_text()
    assert "Accuracy against throughput" in html and "Pareto front" in html and "latent (decoder-prefix:auto)" in html
    assert "Latent classifier variants" in html and "Sigma sweep" not in html  # no noise-conditioned variant here


def test_auto_records_the_stage_it_chose_on_the_validation_images_and_why(gap_run):
    out, results, _ = gap_run
    auto = results["rows"][0]["variants"]["decoder-prefix:auto"]["decoder_prefix"]
    assert auto["stage"] == "auto" and len(auto["choices"]) == 1
    choice = auto["choices"][0]
    candidates = choice["candidates"]
    assert choice["run"] == "official/seed0" and [c["stage"] for c in candidates] == BUILTIN_STAGES
    assert auto["stages"] == [choice["stage"]] and auto["indices"] == [BUILTIN_STAGES.index(choice["stage"])]
    reference, margin = choice["reference_validation"], choice["margin"]
    assert margin == 0.01 and np.isfinite(reference) and choice["reason"]
    within = [c for c in candidates if c["validation"] >= reference - margin]
    expected = (
        min(within, key=lambda c: (c["prefix_flops"], c["index"]))
        if within
        else max(candidates, key=lambda c: (c["validation"], -c["prefix_flops"]))
    )
    assert choice["stage"] == expected["stage"]
    space = "latent" if choice["stage"] == "latent" else f"decoder:{choice['stage']}"
    stored = np.load(out / "predictions.npz")
    assert np.array_equal(
        stored["probs/tiny/decoder-prefix:auto/deep/official/seed0"], stored[f"probs/tiny/{space}/deep/official/seed0"]
    )


def _test_latents(tmp_path, spec: str):
    """The autoencoder, the latents of the official test split, and its training latents."""
    from medlatent.audits.classifier import space_inputs
    from medlatent.config import DataConfig
    from medlatent.data import make_splits

    data = DataConfig(dataset=DATASET, size=16, cache_dir=str(tmp_path / "cache"))
    dataset, latents, ae = space_inputs(data, "latent", spec, "cpu", False)
    split = make_splits(dataset, None, seed=0, val_fraction=data.val_fraction, train_limit=data.train_limit)[0]
    return ae, latents.take(split.test), latents.take(split.train)


@pytest.mark.parametrize("variant", ["decoder-prefix:reconstruction", "whitened"])
def test_a_saved_variant_loads_and_scores_latents_as_in_its_run(
    tmp_path, tiny_builtin_folder, run_cli, monkeypatch, variant
):
    import medlatent.audits.classifier as classifier_module
    from medlatent import api
    from medlatent.classifiers import DeepClassifier
    from medlatent.classifiers.latent_maps import latent_map_of

    in_run = []
    predict = classifier_module.predict_raw
    monkeypatch.setattr(
        classifier_module, "predict_raw", lambda *a, **k: in_run.append(predict(*a, **k)) or in_run[-1]
    )
    spec = f"builtin:{tiny_builtin_folder}"
    given = dict(dataset=DATASET, size=16, cache_dir=str(tmp_path / "cache"), epochs=1, batch_size=16, progress=False)
    result = api.classifier_train(tmp_path / "clf", autoencoder=spec, latent_variant=variant, **given)
    assert result["latent_variant"]["variant"] == variant and len(in_run) == 1  # the run's test probabilities
    ae, z_test, z_train = _test_latents(tmp_path, spec)
    clf = DeepClassifier.from_pretrained(tmp_path / "clf", device="cpu")
    assert clf.space == "latent" and clf.latent_variant == result["latent_variant"]
    record = json.loads((tmp_path / "clf" / "training.json").read_text())["latent_variant"]
    assert record == result["latent_variant"]
    features = latent_map_of(clf)(z_test)
    if variant == "whitened":  # the fitted buffers came back with the model
        assert torch.allclose(clf.latent_map.matrix, ChannelWhitening(4).fit(z_train).matrix, atol=1e-5)
        assert torch.allclose(clf.latent_map.inverse(features), z_test, atol=1e-4)
    else:  # by reference: the full decoder, rebuilt from the autoencoder the classifier records
        assert (record["stage"], record["index"]) == ("reconstruction", 5)
        assert record["prefix_flops"] == ae.stage_flops(tuple(z_test.shape[1:]), "reconstruction") > 0
        assert not (tmp_path / "clf" / "latent_map.safetensors").exists()
        assert torch.allclose(features, ae.decode_to(z_test, "reconstruction"), atol=1e-6)
        assert torch.allclose(features.clamp(0, 1), ae.decode(z_test), atol=1e-6)  # the reconstruction, unclamped
    from safetensors.torch import save_file

    save_file({"latents": z_test.contiguous()}, str(tmp_path / "z.safetensors"))
    code = run_cli(
        "score", "--classifier", str(tmp_path / "clf"), "--latents", str(tmp_path / "z.safetensors"),
        "--out", str(tmp_path / "p.npz"), "--device", "cpu", "--quiet",
    )  # fmt: skip
    assert code == 0
    assert np.allclose(np.load(tmp_path / "p.npz")["probs"], in_run[0], atol=1e-5)
    evaluated = api.classifier_eval(
        tmp_path / "clf", autoencoder=spec, dataset=DATASET, size=16, cache_dir=str(tmp_path / "cache")
    )
    assert evaluated["test"]["auroc"] == pytest.approx(result["test"]["auroc"], abs=1e-6)


@pytest.mark.slow
def test_classifier_train_auto_keeps_the_stage_it_chose_and_scores_with_it(tmp_path, run_cli):
    from medlatent import api
    from medlatent.classifiers.scorer import LatentScorer

    given = dict(dataset=DATASET, size=16, cache_dir=str(tmp_path / "cache"), epochs=1, batch_size=16, progress=False)
    result = api.classifier_train(
        tmp_path / "clf", autoencoder="reference:identity", latent_variant="decoder-prefix:auto", **given
    )
    record = result["latent_variant"]
    choice = record["choice"]  # the reconstruction classifier and one classifier per stage, on the validation split
    assert [c["stage"] for c in choice["candidates"]] == ["latent", "reconstruction"] and choice["reason"]
    assert (record["stage"], record["index"]) == (choice["stage"], ["latent", "reconstruction"].index(choice["stage"]))
    estimator = json.loads((tmp_path / "clf" / "estimator.json").read_text())
    assert estimator["latent_variant"] == record and estimator["autoencoder"]["spec"] == "reference:identity"
    _, z_test, _ = _test_latents(tmp_path, "reference:identity")
    scorer = LatentScorer(tmp_path / "clf", device="cpu", batch_size=7, progress=False)
    assert scorer.channels == 16 and scorer.predict_proba(z_test).shape == (24, 2)


@pytest.mark.parametrize(
    "command, autoencoder, variant, fragments",
    [
        (
            "gap",
            "builtin",
            "decoder-prefix:nope",
            ["--latent-variants decoder-prefix:nope: nope is not a stage", "up2"],
        ),
        ("gap", "builtin", "decoder-prefix:9", ["9 is not a stage", "an index from 0 to 5, or auto"]),
        ("gap", "builtin", "decoder-prefix", ["--latent-variants decoder-prefix: name the decoder stage"]),
        ("gap", "encoder:reference:identity", "decoder-prefix:auto", ["encoder-only", "use whitened"]),
        (
            "classifier",
            "builtin",
            "decoder-prefix:nope",
            ["--latent-variant decoder-prefix:nope: nope is not a stage"],
        ),
    ],
)
def test_a_bad_stage_is_one_line_naming_the_option_and_the_stages(
    tmp_path, tiny_builtin_folder, run_cli, capsys, command, autoencoder, variant, fragments
):
    spec = f"builtin:{tiny_builtin_folder}" if autoencoder == "builtin" else autoencoder
    option = "--latent-variants" if command == "gap" else "--latent-variant"
    given = ["--dataset", DATASET, "--size", "16", "--quiet", "--autoencoder", spec, option, variant]
    given += ["--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out")]
    capsys.readouterr()
    code = run_cli(*(["gap"] if command == "gap" else ["classifier", "train"]), *given)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("medlatent: error: ") and not captured.out
    assert all(fragment in lines[0] for fragment in fragments), lines[0]
    if autoencoder == "builtin" and ":" in variant:
        assert ", ".join(BUILTIN_STAGES) in lines[0]
    assert not (tmp_path / "cache").exists()  # checked before any data is read or encoded
