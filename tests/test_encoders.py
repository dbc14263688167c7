"""Encoder-only latent spaces: timm backbones and `encoder:SPEC` audited without a decoder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import medlatent
from medlatent.autoencoders import load_autoencoder
from medlatent.errors import MedlatentInputError

TINY = dict(
    dataset="synthetic:n_train=48,n_val=16,n_test=40,lesion_size=0.12,lesion_contrast=0.5",
    size=32,
    backbone="resnet10t",
    epochs=1,
    batch_size=16,
    bootstrap=100,
    progress=False,
)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # random weights, and no minute of download retries


def test_timm_encoders_give_maps_with_their_own_preprocessing():
    cnn, stage, vit = (load_autoencoder(s) for s in ("timm:test_resnet", "timm:test_resnet:layer2", "timm:test_vit"))
    x = torch.rand(2, 1, 32, 32)
    assert (
        cnn.encode(cnn.prepare(x)).shape == (2, 96, 5, 5) and cnn.input_size == 160
    )  # resized to the model's input size, grey -> RGB
    assert stage.encode(stage.prepare(x)).shape == (2, 48, 20, 20) and stage.downsampling_factor == 8
    assert vit.encode(vit.prepare(x)).shape == (
        2,
        64,
        10,
        10,
    )  # 100 patch tokens as a 10x10 map, the class token dropped
    assert (
        not cnn.has_decoder
        and cnn.describe()["weights"].startswith("random")
        and cnn.content_hash != stage.content_hash
    )
    assert (
        load_autoencoder("timm:test_resnet").content_hash == cnn.content_hash
    )  # random weights from a fixed seed: one cache entry
    with pytest.raises(MedlatentInputError, match="no decoder"):
        cnn.decode(torch.zeros(1, 96, 5, 5))
    from medlatent.autoencoders.timm_encoder import to_map

    assert to_map(torch.ones(3, 7), cnn.model).shape == (3, 7, 1, 1)  # a pooled vector is a 1x1 map


def test_encoder_prefix_needs_no_decoder_file(tmp_path):
    from medlatent.autoencoders.taesd import make_encoder

    path = tmp_path / "mine_encoder.pth"
    torch.save(make_encoder(4, False).state_dict(), path)
    with pytest.raises(MedlatentInputError, match="not found"):
        load_autoencoder(f"taesd:{path}")  # the full autoencoder looks for mine_decoder.pth
    ae = load_autoencoder(f"encoder:taesd:{path}")
    assert (
        not ae.has_decoder
        and ae.spec == f"encoder:taesd:{path}"
        and ae.encode(torch.rand(1, 3, 16, 16)).shape == (1, 4, 2, 2)
    )


@pytest.mark.slow
def test_gap_on_encoder_only_spaces_has_image_and_latent_rows(tmp_path, tiny_builtin_folder):
    specs = ["timm:test_resnet", f"encoder:builtin:{tiny_builtin_folder}"]
    out = tmp_path / "run"
    medlatent.gap(
        **TINY,
        autoencoders=specs,
        out=str(out),
        cache_dir=str(tmp_path / "cache"),
        latent_variants=["noise-conditioned"],
        sweep_points=2,
    )
    saved = json.loads((out / "results.json").read_text())
    for row in saved["rows"]:
        assert (
            row["encoder_only"] and set(row["scores"]) == {"image", "latent"} and set(row["gaps"]) == {"learnability"}
        )
        gap = row["gaps"]["learnability"]["auroc"]["value"]
        assert gap == pytest.approx(
            row["scores"]["image"]["auroc"]["value"] - row["scores"]["latent"]["auroc"]["value"]
        )
    assert "noise-conditioned" in saved["rows"][0]["variants"]
    timm_ae, builtin_ae = saved["autoencoders"]
    assert (
        timm_ae["latent_shape"] == [96, 5, 5]
        and timm_ae["reconstruction_quality"] is None
        and not timm_ae["has_decoder"]
    )
    assert builtin_ae["latent_shape"] == [4, 8, 8] and builtin_ae["name"] == "tiny (encoder)"
    for folder in saved["autoencoders"][0]["cache"].values():  # latents only: nothing decoded
        assert json.loads((Path(folder) / "meta.json").read_text())["key"]["reconstruct"] is False
    html = (out / "report.html").read_text()
    assert "Encoder-only latent spaces" in html and "(image − latent)" in html and "no decoder" in html
    assert saved["samples"]["reconstructions"] == {}
    again = medlatent.gap(
        **TINY,
        autoencoders=specs[:1],
        out=str(tmp_path / "again"),
        cache_dir=str(tmp_path / "cache"),
        linear_probe=False,
    )
    assert again["autoencoders"][0]["cache_reused"]


def test_pooled_latents_go_through_the_mlp_head():
    from medlatent.classifiers import DeepClassifier, TrainConfig

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 64)
    x = (
        torch.from_numpy(rng.normal(size=(64, 16, 1, 1)).astype(np.float32))
        + torch.from_numpy(y.astype(np.float32))[:, None, None, None]
    )
    for noise_conditioned in (False, True):
        clf = DeepClassifier(
            TrainConfig(epochs=2, batch_size=16, noise_conditioned=noise_conditioned),
            latent_space=True,
            device="cpu",
            progress=False,
        )
        clf.fit(x, y, x[:16], y[:16], "binary")
        assert type(clf.model_.backbone).__name__ == "MLPBackbone" and clf.predict_proba(x).shape == (64, 2)


def test_commands_that_decode_refuse_an_encoder_only_model(tmp_path, tiny_builtin_folder):
    import medlatent.api as api

    data = dict(dataset="synthetic:n_train=24,n_val=8,n_test=16", size=16, cache_dir=str(tmp_path / "cache"))
    model = api.diffusion_train(
        tmp_path / "ldm",
        f"encoder:builtin:{tiny_builtin_folder}",
        progress=False,
        steps=2,
        batch_size=8,
        device="cpu",
        **data,
    )
    assert not (model / "samples.png").exists()
    for call in (
        lambda: api.diffusion_sample(model=model, class_name="nodule", n=2, out=tmp_path / "s", steps=2, device="cpu"),
        lambda: api.counterfactual(
            model=model, out=tmp_path / "cf", target_class="nodule", device="cpu", progress=False
        ),
    ):
        with pytest.raises(MedlatentInputError, match="encoder-only"):
            call()


def test_transformers_image_encoder_by_hf_spec(tmp_path):
    transformers = pytest.importorskip("transformers", reason="the transformers extra is not installed")
    folder = tmp_path / "tiny-vit"
    config = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8
    )
    torch.manual_seed(0)
    transformers.ViTModel(config, add_pooling_layer=False).save_pretrained(folder)
    transformers.ViTImageProcessor(
        size={"height": 32, "width": 32}, image_mean=[0.4] * 3, image_std=[0.2] * 3
    ).save_pretrained(folder)
    ae = load_autoencoder(f"hf:{folder}")
    z = ae.encode(ae.prepare(torch.rand(2, 1, 64, 64)))
    assert (
        type(ae).__name__ == "TransformersEncoder" and not ae.has_decoder and z.shape == (2, 32, 4, 4)
    )  # 16 patch tokens, the class token dropped
    assert (
        ae.input_size == 32
        and torch.allclose(ae.mean.flatten(), torch.full((3,), 0.4))
        and ae.content_hash.startswith("sha256:")
    )
    (folder / "model.safetensors").unlink()
    transformers.ViTModel(
        transformers.ViTConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=32,
            patch_size=8,
        ),
        add_pooling_layer=False,
    ).save_pretrained(tmp_path / "one-layer")
    (tmp_path / "one-layer" / "config.json").write_text(
        (folder / "config.json").read_text()
    )  # claims two layers, has weights for one
    with pytest.raises(MedlatentInputError, match="missing"):
        load_autoencoder(f"hf:{tmp_path / 'one-layer'}")
