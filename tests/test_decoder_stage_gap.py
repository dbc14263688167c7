"""Learnability along the decoder (`gap --decoder-stages`): classifiers of the audit's protocol on the
features after each decoder stage, from the latent (stage 0) to the reconstruction (the last)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import medlatent
import medlatent.data.stages as stages_module

SMALL = dict(
    dataset="synthetic:n_train=32,n_val=12,n_test=24,lesion_size=0.2,lesion_contrast=0.5",
    size=16,
    backbone="resnet10t",
    epochs=1,
    batch_size=16,
    bootstrap=100,
    progress=False,
)
BUILTIN_STAGES = ["latent", "mid", "up0", "up1", "up2", "reconstruction"]


def options(tmp_path, autoencoder: str, out: str = "run", **extra) -> dict:
    return dict(SMALL, autoencoders=[autoencoder], out=str(tmp_path / out), cache_dir=str(tmp_path / "cache"), **extra)


def check_along(row: dict, names: list[str], decoder: list[str] | None = None) -> dict:
    """The properties every row's stages share (`names` of the `decoder`'s stages, all by default);
    returns the row's `decoder_stages`."""
    along = row["decoder_stages"]
    stages = along["stages"]
    assert [s["name"] for s in stages] == names
    assert [s["index"] for s in stages] == [(decoder or names).index(name) for name in names]
    assert stages[0]["space"] == "latent" and stages[-1]["space"] == "reconstruction"
    assert all(s["space"] == f"decoder:{s['name']}" for s in stages[1:-1])
    for s in stages:
        for metric in ("auroc", "balanced_accuracy"):
            entry = s["scores"][metric]
            assert np.isfinite(entry["value"]) and entry["ci95"][0] <= entry["value"] <= entry["ci95"][1]
    # The two ends are the existing spaces: the same numbers as their rows.
    assert stages[0]["scores"] == row["scores"]["latent"] and stages[-1]["scores"] == row["scores"]["reconstruction"]
    assert stages[0]["difference_to_reconstruction"] == row["gaps"]["learnability"]
    assert stages[-1]["difference_to_reconstruction"] is None
    for s in stages[1:-1]:
        diff = s["difference_to_reconstruction"]["auroc"]["value"]
        assert diff == pytest.approx(row["scores"]["reconstruction"]["auroc"]["value"] - s["scores"]["auroc"]["value"])
    flops = [s["prefix_flops"] for s in stages]
    assert flops[0] == 0 and all(a <= b for a, b in zip(flops, flops[1:], strict=False))
    speeds = [s["train_samples_per_second"] for s in stages]
    assert all(v > 0 for v in speeds) if row["model"] == "deep" else speeds == [None] * len(stages)
    # The closing stage: the first whose point estimate lies in the reconstruction's interval.
    lo, hi = row["scores"]["reconstruction"]["auroc"]["ci95"]
    inside = [s["name"] for s in stages if lo <= s["scores"]["auroc"]["value"] <= hi]
    assert along["closing_stage"] == (inside[0] if inside else None) == along["closing_stage_by_metric"]["auroc"]
    return along


def test_every_stage_in_decoder_order_from_the_latent_to_the_reconstruction(
    tmp_path, tiny_builtin_folder, run_cli, capsys
):
    out = tmp_path / "run"
    data = ["--dataset", SMALL["dataset"], "--size", "16", "--epochs", "1", "--batch-size", "16"]
    code = run_cli(
        "gap",
        *data,
        *("--bootstrap", "100", "--quiet", "--autoencoder", f"builtin:{tiny_builtin_folder}"),
        *("--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--decoder-stages", "all"),
    )
    printed = capsys.readouterr().out
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["model"] for r in results["rows"]] == ["deep", "linear"]
    for row in results["rows"]:
        stages = check_along(row, BUILTIN_STAGES)["stages"]
        assert stages[0]["feature_shape"] == results["autoencoders"][0]["latent_shape"] == [4, 4, 4]
        assert stages[-1]["feature_shape"] == [1, 16, 16]
        assert [s["feature_shape"][-1] for s in stages[1:-1]] == [4, 8, 16, 16]
        assert all(s["held"] == "held in memory" for s in stages)
        flops = [s["prefix_flops"] for s in stages]
        assert all(a < b for a, b in zip(flops, flops[1:], strict=False))  # every stage has convolutions
    assert results["trained_classifiers"] == 2 * 7  # image, reconstruction, latent and 4 stages; deep and linear
    assert np.load(out / "predictions.npz")["probs/tiny/decoder:up1/deep/official/seed0"].shape == (24, 2)
    assert printed.count("along the decoder") == 2 and printed.count("closing stage: ") == 2
    assert all(f"      {name}" in printed for name in BUILTIN_STAGES)
    html = (out / "report.html").read_text()
    assert "Learnability along the decoder" in html and "score along the decoder" in html and "MFLOPs" in html
    table = medlatent.load_results(out)
    assert {f"decoder:{name}" for name in BUILTIN_STAGES[1:-1]} < set(table["space"])


def test_an_autoencoder_without_intermediate_stages_has_the_latent_and_the_reconstruction(tmp_path):
    results = medlatent.gap(**options(tmp_path, "reference:identity", linear_probe=False, decoder_stages="all"))
    row = results["rows"][0]
    stages = check_along(row, ["latent", "reconstruction"])["stages"]
    assert stages[0]["feature_shape"] == results["autoencoders"][0]["latent_shape"] == [16, 4, 4]  # pixel unshuffle
    assert stages[-1]["feature_shape"] == [1, 16, 16] and stages[-1]["prefix_flops"] == 0  # no convolution
    assert results["trained_classifiers"] == 3  # nothing beyond the existing spaces


def test_features_computed_on_the_fly_give_the_scores_of_features_held_in_memory(
    tmp_path, tiny_builtin_folder, monkeypatch
):
    monkeypatch.setattr(stages_module, "STAGE_DTYPE", torch.float32)  # both paths in float32: the same inputs
    common = options(tmp_path, f"builtin:{tiny_builtin_folder}", decoder_stages="mid, up1", linear_probe=False)
    held = medlatent.gap(**{**common, "out": str(tmp_path / "held")})
    monkeypatch.setattr(stages_module, "STAGE_MEMORY_LIMIT", 0)
    computed = medlatent.gap(**{**common, "out": str(tmp_path / "computed")})
    for a, b in zip(held["rows"], computed["rows"], strict=True):
        check_along(a, ["latent", "mid", "up1", "reconstruction"], BUILTIN_STAGES)
        check_along(b, ["latent", "mid", "up1", "reconstruction"], BUILTIN_STAGES)
        pairs = list(zip(a["decoder_stages"]["stages"], b["decoder_stages"]["stages"], strict=True))
        assert [(x["held"], y["held"]) for x, y in pairs[1:-1]] == [
            ("held in memory", "computed from the cached latents on the fly")
        ] * 2
        for x, y in pairs:
            for metric, entry in x["scores"].items():
                assert y["scores"][metric]["value"] == pytest.approx(entry["value"], abs=1e-6)
    first, second = np.load(tmp_path / "held" / "predictions.npz"), np.load(tmp_path / "computed" / "predictions.npz")
    assert sorted(first.files) == sorted(second.files)
    assert all(np.allclose(first[k], second[k], rtol=0, atol=1e-5) for k in first.files)


def test_stage_features_held_or_computed_on_the_fly_are_the_same_inputs(tiny_builtin_folder, monkeypatch):
    """What each classifier reads: a view of any samples (by dataset index), with its scaler's transform."""
    from medlatent.autoencoders import load_autoencoder
    from medlatent.data.spaces import SpaceData
    from medlatent.data.tensors import materialise

    ae = load_autoencoder(f"builtin:{tiny_builtin_folder}", device="cpu")
    latents = torch.randn(10, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    space = SpaceData(latents, np.arange(10)[::-1].copy())  # stored in reverse order of the dataset indices
    asked = ["latent", "up0", "up1", "reconstruction"]
    half, records = stages_module.decoder_stage_spaces(ae, asked, space, (1, 16, 16), torch.device("cpu"))
    assert [r["held"] for r in records] == ["held in memory"] * 4
    assert [r.get("dtype") for r in records] == [None, "float16", "float16", None]
    assert half["decoder:up0"].tensor.dtype == torch.float16 and set(half) == {"decoder:up0", "decoder:up1"}
    monkeypatch.setattr(stages_module, "STAGE_DTYPE", torch.float32)
    held, _ = stages_module.decoder_stage_spaces(ae, asked, space, (1, 16, 16), torch.device("cpu"))
    # Held in decoder order while the total fits: up0 (10 x 16 x 8 x 8 float32) fits, up1 then does not.
    monkeypatch.setattr(stages_module, "STAGE_MEMORY_LIMIT", 10 * 16 * 8 * 8 * 4)
    mixed, records = stages_module.decoder_stage_spaces(ae, asked, space, (1, 16, 16), torch.device("cpu"))
    assert [r["held"] for r in records[1:3]] == ["held in memory", "computed from the cached latents on the fly"]
    monkeypatch.setattr(stages_module, "STAGE_MEMORY_LIMIT", 0)
    computed, records = stages_module.decoder_stage_spaces(ae, asked, space, (1, 16, 16), torch.device("cpu"))
    assert [r["feature_shape"] for r in records] == [[4, 4, 4], [16, 8, 8], [8, 16, 16], [1, 16, 16]]
    indices = np.array([7, 2, 9, 0])
    for name in ("decoder:up0", "decoder:up1"):
        expected = held[name].take(indices)
        assert torch.allclose(half[name].take(indices), expected, rtol=2e-3, atol=1e-3)  # float16
        assert all(
            torch.allclose(materialise(o.take(indices)), expected, atol=1e-6) for o in (mixed[name], computed[name])
        )
        view = computed[name].take(indices)
        assert len(view) == 4 and torch.allclose(view[1]["x"], expected[1], atol=1e-6)
        assert torch.allclose(materialise(view.with_transform(lambda x: 2 * x + 1)), 2 * expected + 1, atol=1e-5)
    assert mixed["decoder:up0"].stream is None and mixed["decoder:up1"].stream is not None
    stage = ae.decode_to(latents[[2, 7, 0, 9]], "up1")  # dataset index i is stored at 9 - i
    assert torch.allclose(materialise(computed["decoder:up1"].take(indices)), stage, atol=1e-6)


def test_stages_added_to_a_finished_run_reuse_its_classifiers_and_resume(tmp_path, tiny_builtin_folder):
    common = options(tmp_path, f"builtin:{tiny_builtin_folder}", linear_probe=False)
    before = medlatent.gap(**common)
    assert before["trained_classifiers"] == 3 and "decoder_stages" not in before["rows"][0]
    first = medlatent.gap(**common, decoder_stages="up1")
    assert (first["trained_classifiers"], first["resumed_classifiers"]) == (4, 3)  # only the stage is new
    assert first["rows"][0]["scores"] == before["rows"][0]["scores"]
    second = medlatent.gap(**common, decoder_stages="up1")
    assert second["trained_classifiers"] == second["resumed_classifiers"] == 4
    assert second["rows"][0]["decoder_stages"]["stages"] == first["rows"][0]["decoder_stages"]["stages"]


@pytest.mark.parametrize(
    "autoencoder, stages, fragments",
    [
        (
            "builtin",
            "mid,nope",
            ["--decoder-stages mid,nope: nope is not a stage", "latent, mid, up0, up1, up2, reconstruction"],
        ),
        ("reference:identity", "blocks", ["blocks is not a stage", "reference:identity", "latent, reconstruction"]),
        ("encoder:reference:identity", "all", ["--decoder-stages all", "encoder:reference:identity", "encoder-only"]),
        ("builtin", "all,mid", ["--decoder-stages all,mid: all and none stand alone"]),
    ],
)
def test_a_stage_the_decoder_lacks_is_one_line_and_exit_2(
    tmp_path, tiny_builtin_folder, run_cli, capsys, autoencoder, stages, fragments
):
    spec = f"builtin:{tiny_builtin_folder}" if autoencoder == "builtin" else autoencoder
    capsys.readouterr()
    code = run_cli(
        "gap",
        *("--dataset", SMALL["dataset"], "--size", "16", "--quiet", "--autoencoder", spec),
        *("--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out"), "--decoder-stages", stages),
    )
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("medlatent: error: ") and not captured.out
    assert all(fragment in lines[0] for fragment in fragments), lines[0]
    assert not (tmp_path / "cache").exists()  # checked before any data is read or encoded
    assert not (tmp_path / "out" / "results.json").exists()


@pytest.mark.parametrize(("side", "stride_one"), [(16, True), (32, True), (64, False)])
def test_a_stage_as_wide_as_an_image_gets_the_image_stem(side, stride_one):
    from medlatent.classifiers.trainer import DeepClassifier
    from medlatent.config import TrainConfig

    clf = DeepClassifier(TrainConfig(backbone="resnet10t", pretrained=False), latent_space=True, space="decoder:up1")
    clf.num_outputs_ = 2
    stem = clf._build(8, pretrained=False, spatial=side).backbone.conv1
    first = stem if isinstance(stem, torch.nn.Conv2d) else stem[0]
    assert (first.stride == (1, 1)) is stride_one
    latent = DeepClassifier(TrainConfig(backbone="resnet10t", pretrained=False), latent_space=True, space="latent")
    latent.num_outputs_ = 2
    assert latent._build(8, pretrained=False, spatial=64).backbone.conv1.stride == (1, 1)  # latents keep theirs


def test_only_latents_are_masked_as_augmentation():
    from medlatent.classifiers.trainer import masked_share

    assert masked_share("latent", True, 0.2) == 0.2 and masked_share("image", False, 0.2) == 0.0
    assert masked_share("decoder:up1", True, 0.2) == 0.0 and masked_share("decoder:reconstruction", True, 0.2) == 0.0
