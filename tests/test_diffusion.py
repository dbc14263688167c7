"""Class-conditional latent diffusion: EDM preconditioning, classifier-free guidance, sampling in
proportion, resume with EMA, and the train / sample commands."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from medlatent.diffusion.noise import SIGMA_MIN, precond
from medlatent.diffusion.sampling import guided_denoise, sample
from medlatent.models import Denoiser
from medlatent.training import DenoisingObjective, LoopConfig, Trainer


def c_skip(sigma, sigma_data):
    return precond(sigma, sigma_data).c_skip


def c_out(sigma, sigma_data):
    return precond(sigma, sigma_data).c_out


def c_in(sigma, sigma_data):
    return precond(sigma, sigma_data).c_in


def test_edm_preconditioning_at_known_sigmas():
    sd = 0.5
    assert c_skip(torch.tensor(sd), sd).item() == pytest.approx(0.5)  # sigma = sigma_data: half skip
    assert c_out(torch.tensor(sd), sd).item() == pytest.approx(sd / math.sqrt(2))
    assert c_in(torch.tensor(sd), sd).item() == pytest.approx(1 / (sd * math.sqrt(2)))
    assert c_skip(torch.tensor(80.0), sd).item() < 1e-4 and c_out(torch.tensor(80.0), sd).item() == pytest.approx(
        sd, rel=1e-4
    )
    model = Denoiser(2, 4, num_classes=2).eval()
    torch.nn.init.zeros_(model.unet.conv_out.weight)
    torch.nn.init.zeros_(model.unet.conv_out.bias)  # F = 0: D(x; sigma) = c_skip(sigma) x (EDM Eq. 7)
    x = torch.randn(3, 2, 4, 4)
    sigma = torch.tensor([0.1, 0.5, 5.0])
    assert torch.allclose(
        model(x, sigma, torch.tensor([0, 1, 2])), c_skip(sigma, 0.5).view(-1, 1, 1, 1) * x, atol=1e-6
    )


def test_guidance_scale_one_is_the_conditional_model_and_zero_the_unconditional():
    torch.manual_seed(0)
    model = Denoiser(2, 4, num_classes=2).eval()
    x, labels = torch.randn(4, 2, 4, 4), torch.tensor([0, 1, 0, 1])
    with torch.no_grad():
        conditional, unconditional = model(x, 1.0, labels), model(x, 1.0, torch.full_like(labels, model.null_class))
        assert torch.equal(guided_denoise(model, x, 1.0, labels, cfg=1.0), conditional)
        assert torch.allclose(guided_denoise(model, x, 1.0, labels, cfg=0.0), unconditional, atol=1e-5)
        assert not torch.allclose(conditional, unconditional)  # the class embedding is used
        mixed = guided_denoise(model, x, 1.0, labels, cfg=3.0)
        assert torch.allclose(mixed, unconditional + 3.0 * (conditional - unconditional), atol=1e-5)


def test_classifier_guidance_adds_sigma_squared_times_the_gradient():
    torch.manual_seed(0)
    model = Denoiser(2, 4, num_classes=2).eval()
    x, labels, sigma = torch.randn(3, 2, 4, 4), torch.tensor([0, 1, 0]), torch.tensor([0.1, 1.0, 3.0])
    gradient = lambda z, s: torch.ones_like(z) * s.view(-1, 1, 1, 1)  # noqa: E731 - a stand-in for grad log p(y | z)
    with torch.no_grad():
        plain = guided_denoise(model, x, sigma, labels, cfg=2.0)
        guided = guided_denoise(model, x, sigma, labels, cfg=2.0, guidance=gradient, guidance_scale=0.5)
    assert torch.allclose(guided, plain + 0.5 * sigma.view(-1, 1, 1, 1) ** 3, atol=1e-5)


def _two_points(n: int = 512):
    """Latents that are one of two points: A (+0.5) for a quarter, B (-0.5) for the rest."""
    g = torch.Generator().manual_seed(0)
    is_a = torch.rand(n, generator=g) < 0.25
    x = torch.where(is_a.view(-1, 1, 1, 1), torch.full((n, 2, 4, 4), 0.5), torch.full((n, 2, 4, 4), -0.5))
    return {"x": x, "y": torch.zeros(n, dtype=torch.long)}


@pytest.fixture(scope="module")
def two_point_model():
    torch.manual_seed(0)
    model = Denoiser(2, 4, num_classes=1, preset="tiny")
    result = Trainer(LoopConfig(), "cpu", progress=False).fit(
        model, DenoisingObjective(), _two_points(), batch_size=128, lr=5e-3, steps=600, warmup=0.05
    )
    return result.model.eval()


@pytest.mark.slow
def test_two_point_distribution_is_sampled_in_its_proportions(two_point_model):
    z = sample(
        two_point_model, torch.zeros(400, dtype=torch.long), steps=16, generator=torch.Generator().manual_seed(1)
    )
    share_a = (z.mean((1, 2, 3)) > 0).float().mean().item()
    assert abs(share_a - 0.25) < 0.1, share_a  # 0.30 measured; an unconditional mean would give 0 or 1
    nearest = torch.where(z.mean((1, 2, 3), keepdim=True) > 0, 0.5, -0.5)
    assert (z - nearest).abs().flatten(1).amax(1).median() < 0.1  # samples lie on the points, not between


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["euler", "dpm", "ddim"])
def test_diffusers_schedulers_also_draw_the_two_points_in_their_proportions(two_point_model, sampler):
    z = sample(
        two_point_model,
        torch.zeros(400, dtype=torch.long),
        steps=24,
        generator=torch.Generator().manual_seed(1),
        sampler=sampler,
    )
    share_a = (z.mean((1, 2, 3)) > 0).float().mean().item()
    assert abs(share_a - 0.25) < 0.1, share_a
    nearest = torch.where(z.mean((1, 2, 3), keepdim=True) > 0, 0.5, -0.5)
    assert (z - nearest).abs().flatten(1).amax(1).median() < 0.15


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_a_vp_denoiser_is_its_network_prediction_seen_as_d(prediction):
    """D(x_t / sqrt(abar_t); sigma_t) = x_0 estimate from the eps or v the network predicts at (x_t, t)."""
    from medlatent.diffusion.noise import vp_scheduler

    torch.manual_seed(0)
    model = Denoiser(2, 4, num_classes=2, parameterisation=prediction).eval()
    abar = vp_scheduler().alphas_cumprod
    t = torch.tensor([10, 400, 900])
    x_t, labels = torch.randn(3, 2, 4, 4), torch.tensor([0, 1, 2])
    a = abar[t].view(-1, 1, 1, 1)
    with torch.no_grad():
        raw = model(x_t, None, labels, timesteps=t)
        eps = raw if prediction == "eps" else a.sqrt() * raw + (1 - a).sqrt() * x_t
        x0 = (x_t - (1 - a).sqrt() * eps) / a.sqrt()
        sigma = ((1 - abar[t]) / abar[t]).sqrt()
        assert torch.allclose(model.timestep(sigma), t.float(), atol=1e-3)
        assert torch.allclose(model(x_t / a.sqrt(), sigma, labels), x0, atol=1e-4)


@pytest.mark.slow
def test_a_vp_model_trained_with_min_snr_samples_the_two_points():
    from medlatent.training import VPDenoisingObjective

    torch.manual_seed(0)
    model = Denoiser(2, 4, num_classes=1, preset="tiny", parameterisation="v")
    model = (
        Trainer(LoopConfig(), "cpu", progress=False)
        .fit(model, VPDenoisingObjective("v", 5.0), _two_points(), batch_size=128, lr=5e-3, steps=600, warmup=0.05)
        .model.eval()
    )
    for sampler in ("heun", "ddim"):
        z = sample(
            model,
            torch.zeros(400, dtype=torch.long),
            steps=24,
            generator=torch.Generator().manual_seed(1),
            sampler=sampler,
        )
        share_a = (z.mean((1, 2, 3)) > 0).float().mean().item()
        assert abs(share_a - 0.25) < 0.1, (sampler, share_a)


@pytest.mark.slow
def test_a_trained_denoiser_returns_nearly_its_input_at_sigma_min(two_point_model):
    x = _two_points(8)["x"] + 0.01 * torch.randn(8, 2, 4, 4)
    with torch.no_grad():
        assert torch.allclose(two_point_model(x, SIGMA_MIN, torch.zeros(8, dtype=torch.long)), x, atol=5e-3)


class _Interrupted(Exception):
    pass


def test_denoiser_training_resumes_to_the_uninterrupted_weights_ema_included(tmp_path):
    data = _two_points(64)

    def train(checkpoints, fail_at: int | None = None):
        torch.manual_seed(0)
        model = Denoiser(2, 4, num_classes=1)
        objective, calls = DenoisingObjective(), [0]

        def flaky(model, batch, generator, epoch):
            calls[0] += 1
            if fail_at is not None and calls[0] == fail_at:
                raise _Interrupted
            return objective(model, batch, generator, epoch)

        return Trainer(LoopConfig(ema_decay=0.9, checkpoint_every=2), "cpu", progress=False).fit(
            model, flaky, data, batch_size=16, lr=1e-3, steps=8, checkpoint_dir=checkpoints, key="two-point"
        )

    reference = train(None)
    with pytest.raises(_Interrupted):
        train(tmp_path, fail_at=6)  # dies in step 6, after the checkpoint of step 4
    resumed = train(tmp_path)
    assert resumed.resumed_from_step == 4
    ref, res = reference.model.state_dict(), resumed.model.state_dict()  # the EMA weights
    assert all(torch.equal(ref[k], res[k]) for k in ref)


def test_cli_diffusion_train_and_sample(tmp_path, run_cli, capsys):
    import json

    from safetensors.torch import load_file

    data = [
        "--dataset",
        "synthetic:n_train=32,n_val=8,n_test=8",
        "--size",
        "16",
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    assert (
        run_cli(
            "diffusion",
            "train",
            "--out",
            str(tmp_path / "ldm"),
            *data,
            "--steps",
            "6",
            "--batch-size",
            "8",
            "--ema-sigma-rel",
            "0.1",
            "--sample-every",
            "3",
            "--quiet",
        )
        == 0
    )
    record = json.loads((tmp_path / "ldm" / "diffusion.json").read_text())
    assert (
        record["class_names"] == ["normal", "nodule"]
        and record["steps"] == 6
        and record["config"]["loop"]["ema_sigma_rel"] == 0.1
    )
    assert sorted(p.name for p in (tmp_path / "ldm-samples").iterdir()) == [
        "step0000003.png",
        "step0000006.png",
    ]  # a grid every 3 steps
    assert (tmp_path / "ldm" / "samples.png").is_file()
    held_out = load_file(tmp_path / "ldm" / "split.safetensors")  # the model never saw the test images
    assert record["split"] == {"name": "official", "train": 32, "val": 8, "test": 8} and len(held_out["test"]) == 8
    assert (
        run_cli(
            "diffusion",
            "sample",
            "--model",
            str(tmp_path / "ldm"),
            "--class",
            "nodule",
            "--n",
            "3",
            "--steps",
            "2",
            "--cfg",
            "2",
            "--out",
            str(tmp_path / "s"),
        )
        == 0
    )
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [
        "00000.png",
        "00001.png",
        "00002.png",
        "grid.png",
        "latents.safetensors",
        "samples.json",
    ]
    capsys.readouterr()
    assert (
        run_cli(
            "diffusion", "sample", "--model", str(tmp_path / "ldm"), "--class", "tumour", "--out", str(tmp_path / "t")
        )
        == 2
    )
    assert (
        run_cli(
            "diffusion",
            "sample",
            "--model",
            str(tmp_path / "ldm"),
            "--class",
            "nodule",
            "--cfg",
            "-1",
            "--out",
            str(tmp_path / "t"),
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "tumour" in err[0] and "--cfg -1" in err[1] and not (tmp_path / "t").exists()


def test_frechet_distance_and_precision_recall_on_known_sets():
    import numpy as np

    from medlatent.diffusion.quality import frechet_distance, precision_recall

    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 3))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shifted = a + np.array([2.0, 0.0, 0.0])  # same covariance: the distance is the squared mean shift
    assert frechet_distance(a, shifted) == pytest.approx(4.0, rel=1e-6)
    assert precision_recall(a, a) == (1.0, 1.0)
    far = a + 100.0
    assert precision_recall(a, far) == (0.0, 0.0)


def test_memorisation_flags_copies_of_training_images_and_nothing_else():
    from medlatent.data import load_dataset
    from medlatent.diffusion.quality import memorisation

    data = load_dataset("synthetic:n_train=64,n_val=8,n_test=8", 32)
    train = data.load(data.partitions["train"])
    fresh = data.load(data.partitions["test"])  # other draws of the same distribution
    copies = train[[5, 17]] + 0.002 * torch.randn(
        2, *train.shape[1:], generator=torch.Generator().manual_seed(0)
    )  # near copies
    result = memorisation(torch.cat([fresh, copies]), train)
    assert result["near_copies"] == [8, 9] and result["nearest_train_index"] == [5, 17]
    assert result["near_copy_share"] == pytest.approx(2 / 10)


def test_evaluate_scores_samples_with_an_independent_classifier(tmp_path):
    import numpy as np

    import medlatent.api as api
    from medlatent.classifiers import DeepClassifier, SpaceScaler, TrainConfig
    from medlatent.data import load_dataset

    spec = "synthetic:n_train=32,n_val=8,n_test=16"
    model = api.diffusion_train(
        tmp_path / "ldm",
        "builtin:kl-f4-synthetic",
        progress=False,
        dataset=spec,
        size=16,
        cache_dir=str(tmp_path / "cache"),
        steps=4,
        batch_size=8,
    )
    data = load_dataset(spec, 16)
    train = data.partitions["train"]
    images = data.load(train)
    judge = DeepClassifier(TrainConfig(epochs=1, batch_size=16), space="image", device="cpu", progress=False)
    judge.input_scaler = SpaceScaler().fit(images)
    judge.fit(
        judge.input_scaler.transform(images),
        data.labels[train],
        judge.input_scaler.transform(images),
        data.labels[train],
        "binary",
    )
    judge.save_pretrained(tmp_path / "judge")
    result = api.diffusion_evaluate(model=model, classifier=tmp_path / "judge", n=8, steps=2, device="cpu")
    # Classifier guidance: a noise-conditioned classifier of the same latent space steers the samples;
    # an image-space one is refused before any sampling.
    from safetensors.torch import load_file

    from medlatent.errors import MedlatentInputError

    api.classifier_train(
        tmp_path / "guide",
        space="latent",
        autoencoder="builtin:kl-f4-synthetic",
        device="cpu",
        progress=False,
        dataset=spec,
        size=16,
        cache_dir=str(tmp_path / "cache"),
        noise_conditioned=True,
        epochs=1,
        batch_size=16,
    )
    plain = api.diffusion_sample(model=model, class_name="nodule", n=4, out=tmp_path / "plain", steps=3, device="cpu")
    guided = api.diffusion_sample(
        model=model,
        class_name="nodule",
        n=4,
        out=tmp_path / "guided",
        steps=3,
        device="cpu",
        guidance_classifier=tmp_path / "guide",
        guidance_scale=5.0,
    )
    z_plain, z_guided = (
        load_file(plain / "latents.safetensors")["latents"],
        load_file(guided / "latents.safetensors")["latents"],
    )
    assert torch.isfinite(z_guided).all() and not torch.allclose(z_plain, z_guided)
    drifted = api.diffusion_sample(
        model=model, class_name="nodule", n=4, out=tmp_path / "drifted", steps=3, device="cpu", drift=0.1
    )
    assert (
        not torch.allclose(z_plain, load_file(drifted / "latents.safetensors")["latents"])
        and json.loads((drifted / "samples.json").read_text())["drift"] == 0.1
    )
    with pytest.raises(MedlatentInputError, match="noise-conditioned latent classifier"):
        api.diffusion_sample(
            model=model,
            class_name="nodule",
            n=4,
            out=tmp_path / "bad",
            steps=3,
            device="cpu",
            guidance_classifier=tmp_path / "judge",
        )
    assert not (tmp_path / "bad").exists()
    for name in ("model", "untrained"):
        r = result[name]
        assert set(r["class_consistency"]) == {"normal", "nodule"} and all(
            0 <= v <= 1 for v in r["class_consistency"].values()
        )
        assert np.isfinite(r["frechet_distance"]) and 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1
        assert 0 <= r["memorisation"]["near_copy_share"] <= 1


@pytest.mark.slow
def test_a_multilabel_denoiser_conditions_on_label_vectors():
    """Channel k of the latents is +0.5 where label k is set, -0.5 where not: asked for a label
    vector, the model draws the matching signs, and the null condition carries no labels."""
    g = torch.Generator().manual_seed(0)
    y = (torch.rand(512, 2, generator=g) < 0.5).float()
    x = (y - 0.5).view(512, 2, 1, 1).expand(512, 2, 4, 4).contiguous()
    torch.manual_seed(0)
    model = Denoiser(2, 4, num_classes=2, preset="tiny", multilabel=True)
    assert model.null_labels(y[:3]).tolist() == [[0.0, 0.0, 1.0]] * 3
    model = (
        Trainer(LoopConfig(), "cpu", progress=False)
        .fit(model, DenoisingObjective(), {"x": x, "y": y}, batch_size=128, lr=5e-3, steps=500, warmup=0.05)
        .model.eval()
    )
    asked = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]]).repeat_interleave(50, 0)
    z = sample(model, asked, steps=16, generator=torch.Generator().manual_seed(1), cfg=2.0)
    drawn = (z.mean((2, 3)) > 0).float()
    assert (drawn == asked).all(1).float().mean() > 0.9


def test_an_interrupted_sampling_run_resumes_to_the_uninterrupted_samples(tmp_path, monkeypatch):
    import medlatent.api as api
    from medlatent.pipelines.latent_diffusion import LatentDiffusion, write_samples

    spec = "synthetic:n_train=16,n_val=4,n_test=4"
    folder = api.diffusion_train(
        tmp_path / "ldm",
        "builtin:kl-f4-synthetic",
        progress=False,
        dataset=spec,
        size=16,
        cache_dir=str(tmp_path / "cache"),
        steps=2,
        batch_size=8,
    )
    ldm = LatentDiffusion(folder, device="cpu")
    whole = write_samples(ldm, "nodule", 5, tmp_path / "whole", steps=2, cfg=2.0, chunk_size=5)  # one chunk, one batch
    real_sample, calls = ldm.sample, []

    def flaky(*args, **kwargs):
        calls.append(kwargs["first_index"])
        if len(calls) == 2:
            raise _Interrupted
        return real_sample(*args, **kwargs)

    monkeypatch.setattr(ldm, "sample", flaky)
    with pytest.raises(_Interrupted):
        write_samples(ldm, "nodule", 5, tmp_path / "parts", steps=2, cfg=2.0, chunk_size=2)
    assert not (tmp_path / "parts").exists()  # nothing that looks complete
    calls.clear()
    monkeypatch.setattr(ldm, "sample", lambda *a, **k: calls.append(k["first_index"]) or real_sample(*a, **k))
    resumed = write_samples(ldm, "nodule", 5, tmp_path / "parts", steps=2, cfg=2.0, chunk_size=2)
    assert calls == [2, 4]  # the first chunk was kept
    from safetensors.torch import load_file

    a, b = load_file(whole / "latents.safetensors")["latents"], load_file(resumed / "latents.safetensors")["latents"]
    assert (a - b).abs().max() < 1e-3 * a.abs().max(), (
        (a - b).abs().max(),
        a.abs().max(),
    )  # each sample's noise depends on its index alone (batch sizes differ: float rounding)
    assert sorted(p.name for p in resumed.iterdir())[-3:] == ["grid.png", "latents.safetensors", "samples.json"]


def test_a_diffusers_unet_folder_can_be_the_denoiser_and_one_that_would_ignore_labels_is_refused(tmp_path):
    from diffusers import UNet2DModel

    import medlatent.api as api
    from medlatent.errors import MedlatentInputError
    from medlatent.pipelines.latent_diffusion import LatentDiffusion

    spec = dict(
        dataset="synthetic:n_train=16,n_val=4,n_test=4",
        size=16,
        cache_dir=str(tmp_path / "cache"),
        steps=2,
        batch_size=8,
    )
    unet = dict(
        sample_size=4,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        add_attention=False,
    )
    torch.manual_seed(0)
    UNet2DModel(**unet, num_class_embeds=3).save_pretrained(tmp_path / "unet")  # 2 classes + null
    model = api.diffusion_train(
        tmp_path / "ldm", "builtin:kl-f4-synthetic", progress=False, preset=str(tmp_path / "unet"), **spec
    )
    loaded = LatentDiffusion(
        model, device="cpu"
    )  # rebuilt from the saved config: the UNet folder is not needed any more
    assert (
        list(loaded.denoiser.unet.config.block_out_channels) == [16, 32]
        and loaded.denoiser.unet.config.num_class_embeds == 3
    )
    assert loaded.sample(torch.tensor([0, 1]), steps=2).shape == (2, 4, 4, 4)
    UNet2DModel(**unet).save_pretrained(tmp_path / "blind")  # no class embedding
    with pytest.raises(MedlatentInputError, match="num_class_embeds=None"):
        api.diffusion_train(
            tmp_path / "bad", "builtin:kl-f4-synthetic", progress=False, preset=str(tmp_path / "blind"), **spec
        )
    with pytest.raises(MedlatentInputError, match="--preset huge"):
        api.diffusion_train(tmp_path / "bad", "builtin:kl-f4-synthetic", progress=False, preset="huge", **spec)


def test_inception_distances_through_torchmetrics_with_a_stand_in_feature_network():
    """The optional extra's plumbing (batches, grey to RGB, FID and KID); the real Inception weights
    need one download, so a small fixed network stands in for them here."""
    pytest.importorskip("torchmetrics", reason="optional extra medlatent[fid] not installed")
    pytest.importorskip("torch_fidelity", reason="optional extra medlatent[fid] not installed")
    from medlatent.diffusion.quality import inception_distances

    class Features(torch.nn.Module):
        num_features = 8

        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv = torch.nn.Conv2d(3, 8, 3)

        def forward(self, x):
            return self.conv(x.float()).mean((2, 3))

    g = torch.Generator().manual_seed(0)
    real = torch.rand(60, 1, 16, 16, generator=g)
    same = inception_distances(real, real.clone(), feature=Features(), batch_size=16)
    shifted = inception_distances(real, (real + 0.3).clamp(0, 1), feature=Features(), batch_size=16)
    assert (
        abs(same["inception_fid"]) < 1e-3
        and shifted["inception_fid"] > 1e-2
        and shifted["inception_kid"] > same["inception_kid"]
    )


class _Linear(torch.nn.Module):
    """D(x; sigma) = c(sigma) x: c = 0 predicts the point 0 (data all at 0); c = sd^2 / (sigma^2 + sd^2)
    is the exact denoiser of Gaussian data N(0, sd^2). Linear in x, so a drift's effect on the sample
    can be derived step by step."""

    latent_channels, latent_size, sigma_data, sigma_range = 2, 4, 0.5, (0.002, 80.0)

    def __init__(self, gaussian: bool):
        super().__init__()
        self.gaussian = gaussian
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, sigma, labels):
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1, 1, 1)
        return x * self.sigma_data**2 / (sigma**2 + self.sigma_data**2) if self.gaussian else x * 0


@pytest.mark.parametrize("sampler", ["heun", "euler", "dpm", "ddim"])
def test_latent_drift_zero_is_exact_and_delta_lands_on_the_predicted_mean(sampler):
    labels, noise = torch.zeros(64, dtype=torch.long), lambda: torch.Generator().manual_seed(3)
    plain = sample(_Linear(False), labels, steps=8, generator=noise(), sampler=sampler)
    assert torch.equal(plain, sample(_Linear(False), labels, steps=8, generator=noise(), sampler=sampler, drift=0.0))
    # A denoiser that predicts 0 contracts x to 0 by the last step (x_next = x sigma_next / sigma), so
    # every earlier shift is scaled away and the sample is the last step's shift: delta at sigma = 0.
    for drift, expected in (
        (0.1, torch.full((1, 2, 1, 1), 0.1)),
        (torch.tensor([0.2, -0.2]), torch.tensor([0.2, -0.2]).view(1, 2, 1, 1)),
    ):
        drifted = sample(_Linear(False), labels, steps=8, generator=noise(), sampler=sampler, drift=drift)
        assert torch.allclose(drifted - plain, expected.expand_as(drifted), atol=1e-4)


def test_latent_drift_shifts_a_gaussian_models_samples_by_the_derived_amount():
    """Heun on D = c(sigma) x is linear: step i maps x to m_i x, so the sample moves by
    sum_i delta sqrt(1 + t_{i+1}^2) prod_{j > i} m_j, plus prod_i m_i times the start's shift."""
    from medlatent.diffusion.noise import karras_sigmas

    model, steps, delta, sd = _Linear(True), 12, 0.05, 0.5
    labels = torch.zeros(256, dtype=torch.long)
    plain = sample(model, labels, steps=steps, generator=torch.Generator().manual_seed(0))
    drifted = sample(model, labels, steps=steps, generator=torch.Generator().manual_seed(0), drift=delta)
    t = torch.cat([karras_sigmas(steps, 0.002, 80.0).double(), torch.zeros(1, dtype=torch.float64)])

    def step_multiplier(t_cur, t_next):  # Heun (EDM Algorithm 2) on dx/dt = (x - D) / t = x (1 - c(t)) / t
        slope = lambda s: (1 - sd**2 / (s**2 + sd**2)) / s  # noqa: E731
        euler = 1 + (t_next - t_cur) * slope(t_cur)
        return euler if t_next == 0 else 1 + (t_next - t_cur) * (slope(t_cur) + slope(t_next) * euler) / 2

    m = [step_multiplier(t[i], t[i + 1]) for i in range(steps)]
    shift = delta * (1 + t[0] ** 2).sqrt() * torch.stack(m).prod()
    for i in range(steps):
        shift = shift + delta * (1 + t[i + 1] ** 2).sqrt() * (torch.stack(m[i + 1 :]).prod() if i + 1 < steps else 1.0)
    assert torch.allclose(drifted - plain, torch.full_like(plain, float(shift)), atol=1e-4), (
        float((drifted - plain).mean()),
        float(shift),
    )


def test_kernel_distance_is_near_zero_for_one_distribution_and_grows_with_a_shift():
    from medlatent.diffusion.quality import kernel_distance

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(400, 16)), rng.normal(size=(400, 16))
    assert abs(kernel_distance(a, b)) < 0.02 and kernel_distance(a, b + 0.5) > 0.1 > kernel_distance(a, b + 0.1)


def test_inversion_follows_the_analytic_ode_and_sampling_returns_the_latent():
    """For Gaussian data N(0, sd^2) the probability-flow ODE is linear: x(sigma) = x(sigma_min) *
    sqrt(sigma^2 + sd^2) / sqrt(sigma_min^2 + sd^2). DDIM inversion must land there, and sampling
    from it with the same steps must come back to the latent."""
    from medlatent.diffusion.sampling import invert

    model, sd, sigma = _Linear(True), 0.5, 5.0
    x0 = torch.randn(16, 2, 4, 4, generator=torch.Generator().manual_seed(0)) * sd
    inverted = invert(model, x0, torch.zeros(16, dtype=torch.long), sigma, steps=32)
    assert torch.allclose(inverted, x0 * (sigma**2 + sd**2) ** 0.5 / (0.002**2 + sd**2) ** 0.5, rtol=1e-2)
    back = sample(model, torch.zeros(16, dtype=torch.long), steps=32, sigma_max=sigma, x_start=inverted)
    assert (back - x0).abs().max() < 5e-3 * x0.abs().max()


def test_counterfactuals_of_a_folder_by_inversion(tmp_path):
    from PIL import Image

    import medlatent.api as api
    from medlatent.errors import MedlatentInputError

    data = dict(dataset="synthetic:n_train=24,n_val=8,n_test=16", size=16, cache_dir=str(tmp_path / "cache"))
    model = api.diffusion_train(
        tmp_path / "ldm", "builtin:kl-f4-synthetic", progress=False, steps=3, batch_size=8, device="cpu", **data
    )
    folder = tmp_path / "mine"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):  # 8-bit grayscale at another size than the model's: resized to 16
        Image.fromarray(rng.integers(0, 256, (24, 24), dtype=np.uint8)).save(folder / f"{name}.png")
    (folder / "notes.txt").write_text("not an image")
    r = api.counterfactual(
        model=model,
        out=tmp_path / "cf",
        target_class="nodule",
        images=folder,
        inversion=True,
        strengths=[1e-4, 1.0],
        steps=4,
        device="cpu",
        progress=False,
    )
    assert r["images"] == 3 and r["input_folder"]["files"] == ["a.png", "b.png", "c.png"] and r["inversion"]
    near, far = r["curves"]
    assert (
        near["changed_pixels"] < 0.01 < far["changed_pixels"]
    )  # inverted to sigma ~ sigma_min and back: the input's reconstruction
    assert sorted(p.name for p in (tmp_path / "cf" / "counterfactuals").glob("*-counterfactual.png")) == [
        "a-counterfactual.png",
        "b-counterfactual.png",
        "c-counterfactual.png",
    ]
    assert "DDIM inversion" in (tmp_path / "cf" / "report.html").read_text()
    (tmp_path / "empty").mkdir()
    for bad, match in (
        (dict(images=tmp_path / "empty"), "no image files"),
        (dict(images=tmp_path / "missing"), "not a folder"),
        (dict(images=folder, source_class="normal"), "no labels"),
    ):
        with pytest.raises(MedlatentInputError, match=match):
            api.counterfactual(
                model=model, out=tmp_path / "bad", target_class="nodule", **bad, device="cpu", progress=False
            )


def test_counterfactuals_measure_and_search_the_drift(tmp_path):
    import medlatent.api as api
    from medlatent.errors import MedlatentInputError

    data = dict(dataset="synthetic:n_train=24,n_val=8,n_test=16", size=16, cache_dir=str(tmp_path / "cache"))
    model = api.diffusion_train(
        tmp_path / "ldm", "builtin:kl-f4-synthetic", progress=False, steps=3, batch_size=8, device="cpu", **data
    )
    api.classifier_train(tmp_path / "judge", space="image", progress=False, epochs=1, device="cpu", **data)
    r = api.counterfactual(
        model=model,
        out=tmp_path / "cf",
        target_class="normal",
        source_class="nodule",
        strengths=[1e-4, 1.0],
        drifts=["auto"],
        drift_grid="-0.1:0.1:0.1",
        judge=tmp_path / "judge",
        steps=4,
        n=6,
        device="cpu",
        progress=False,
    )
    search = r["drift_search"]
    assert [p["drift"] for p in search["curve"]] == [-0.1, 0.0, 0.1] and search["chosen"] == min(
        search["curve"], key=lambda p: p["frechet_distance"]
    )["drift"]
    near, far = r["curves"][0], r["curves"][1]
    assert (
        near["strength"] == 1e-4 and near["changed_pixels"] < 0.01
    )  # strength near 0 returns the input (its reconstruction)
    assert (
        far["changed_pixels"] > near["changed_pixels"]
        and 0 <= far["validity"]["rate"] <= 1
        and near["peak_on_lesion"]["of"] == r["images"]
    )
    assert (tmp_path / "cf" / "results.json").is_file() and len(
        list((tmp_path / "cf" / "counterfactuals").glob("*-difference.png"))
    ) == r["images"]
    assert "Drift search" in (tmp_path / "cf" / "report.html").read_text()
    kid = api.counterfactual(
        model=model,
        out=tmp_path / "kid",
        target_class="normal",
        source_class="nodule",
        strengths=[0.5],
        drifts=["auto"],
        drift_grid="-0.1:0.1:0.1",
        judge=tmp_path / "judge",
        steps=2,
        n=6,
        device="cpu",
        progress=False,
        drift_distance="kid",
    )["drift_search"]
    assert (
        kid["distance"] == "kernel_distance"
        and kid["chosen"] == min(kid["curve"], key=lambda p: p["kernel_distance"])["drift"]
    )
    r = api.counterfactual(
        model=model,
        out=tmp_path / "no-judge",
        target_class="nodule",
        strengths=[0.5],
        steps=2,
        n=3,
        device="cpu",
        progress=False,
    )
    assert "validity" not in r["curves"][0] and "not measured" in (tmp_path / "no-judge" / "report.html").read_text()
    for bad, match in (
        (dict(source_class="normal"), "--source-class"),
        (dict(strengths=[1.5]), "--strength"),
        (dict(drifts=["auto"], drift_grid="0.1:-0.1:0.1"), "--drift-grid"),
        (dict(drifts=["auto"], judge=None), "--judge"),
        (dict(drifts=["auto"], drift_distance="lpips"), "--drift-distance"),
    ):
        with pytest.raises(MedlatentInputError, match=match):
            api.counterfactual(
                model=model,
                out=tmp_path / "bad",
                target_class="normal",
                **{"judge": tmp_path / "judge", **bad},
                device="cpu",
                progress=False,
            )
    with pytest.raises(MedlatentInputError, match="--target-class"):
        api.counterfactual(model=model, out=tmp_path / "bad", target_class="tumour", device="cpu", progress=False)


def test_training_drift_draws_the_forward_noise_from_a_shifted_mean():
    from medlatent.training import DenoisingObjective

    class Spy(torch.nn.Module):
        def forward(self, x, sigma, labels):
            self.seen = (x, sigma)
            return x * 0

        def drop_labels(self, labels, dropped):
            return labels

    spy, x = Spy(), torch.zeros(64, 2, 8, 8)
    DenoisingObjective(p_mean=0.0, p_std=0.0, label_dropout=0.0, drift=0.3)(
        spy, {"x": x, "y": torch.zeros(64, dtype=torch.long)}, torch.Generator().manual_seed(0), 0
    )
    noised, sigma = spy.seen
    assert (
        torch.allclose(sigma, torch.ones(64)) and abs(float(noised.mean()) - 0.3) < 0.03
    )  # x + sigma (eps + delta), sigma = e^0


def test_fine_tuning_starts_from_a_saved_model_and_keeps_its_normalisation(tmp_path):
    from safetensors.torch import load_file

    import medlatent.api as api
    from medlatent.errors import MedlatentInputError

    data = dict(
        dataset="synthetic:n_train=24,n_val=8,n_test=8",
        size=16,
        cache_dir=str(tmp_path / "cache"),
        device="cpu",
        progress=False,
    )
    source = api.diffusion_train(tmp_path / "source", "builtin:kl-f4-synthetic", steps=2, batch_size=8, **data)
    target = dict(data, dataset="synthetic:n_train=24,n_val=8,n_test=8,lesion_contrast=0.6,seed=1")
    tuned = api.diffusion_train(
        tmp_path / "tuned", "builtin:kl-f4-synthetic", steps=2, batch_size=8, init=str(source), drift=0.05, **target
    )
    assert torch.equal(
        load_file(source / "latent_normalisation.safetensors")["mean"],
        load_file(tuned / "latent_normalisation.safetensors")["mean"],
    )
    assert json.loads((tuned / "diffusion.json").read_text())["config"]["drift"] == 0.05
    with pytest.raises(MedlatentInputError, match="--init"):
        api.diffusion_train(
            tmp_path / "bad",
            "builtin:kl-f4-synthetic",
            steps=2,
            batch_size=8,
            init=str(source),
            **dict(target, size=32),
        )


def test_a_model_trained_with_drift_starts_from_noise_of_that_mean(tmp_path):
    import medlatent.api as api
    from medlatent.pipelines.latent_diffusion import LatentDiffusion

    data = dict(
        dataset="synthetic:n_train=24,n_val=8,n_test=8",
        size=16,
        cache_dir=str(tmp_path / "cache"),
        device="cpu",
        progress=False,
    )
    model = api.diffusion_train(tmp_path / "ldm", "builtin:kl-f4-synthetic", steps=2, batch_size=8, drift=0.1, **data)
    ldm = LatentDiffusion(model, device="cpu")
    labels = torch.zeros(3, dtype=torch.long)
    default = ldm.sample(labels, steps=2)
    assert ldm.drift == 0.1 and torch.equal(
        default, ldm.sample(labels, steps=2, drift=0.0)
    )  # no per-step shift unless asked
    assert not torch.equal(default, ldm.sample(labels, steps=2, drift=0.1))  # an inference drift adds to it
    ldm.drift = 0.0
    assert not torch.equal(default, ldm.sample(labels, steps=2))  # the start's mean is the training drift's
    folder = api.diffusion_sample(model=model, class_name="nodule", n=2, out=tmp_path / "s", steps=2, device="cpu")
    record = json.loads((folder / "samples.json").read_text())
    assert record["drift"] == 0.0 and record["training_drift"] == 0.1


def test_the_ode_of_a_denoiser_trained_on_drifted_noise_needs_no_per_step_shift():
    """D(y; sigma) = sd^2 / (sigma^2 + sd^2) (y - sigma delta) is the exact denoiser of N(0, sd^2) data
    noised as x + sigma (eps + delta). Started at sigma_max (eps + delta), the plain ODE lands on the
    data distribution; adding Eq. 4's shift at every step as well moves the samples off it."""

    class Drifted(_Linear):
        def forward(self, x, sigma, labels):
            sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1, 1, 1)
            return (x - sigma * 0.1) * self.sigma_data**2 / (sigma**2 + self.sigma_data**2)

    labels = torch.zeros(2048, dtype=torch.long)
    x = sample(Drifted(True), labels, steps=32, generator=torch.Generator().manual_seed(0), noise_mean=0.1)
    assert abs(float(x.mean())) < 0.01 and abs(float(x.std()) - 0.5) < 0.015
    both = sample(
        Drifted(True), labels, steps=32, generator=torch.Generator().manual_seed(0), noise_mean=0.1, drift=0.1
    )
    assert float(both.mean()) > 0.1  # the shift counted twice


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("sampler", ["heun", "euler", "dpm", "ddim"])
def test_sampling_steps_never_wait_for_the_gpu(sampler):
    """A small denoiser is launch-bound: a step that reads a value back from the GPU (a comparison
    of noise levels, a scalar copied there) leaves it idle while the host queues the next one. The
    synchronising calls of a run (warned by CUDA's sync debug mode) may not grow with its steps."""
    import warnings

    model = Denoiser(4, 8, 2, "tiny").cuda().eval()
    labels = torch.tensor([0, 1])

    def synchronising_calls(steps: int) -> int:
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                sample(
                    model,
                    labels,
                    steps=steps,
                    cfg=2.0,
                    generator=torch.Generator().manual_seed(0),
                    sampler=sampler,
                    drift=0.1,
                )
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    synchronising_calls(4)  # warm-up: first-call set-up (allocator, kernels, the schedulers' lookups)
    assert synchronising_calls(12) == synchronising_calls(4)
