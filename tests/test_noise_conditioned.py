from __future__ import annotations

import numpy as np
import pytest
import torch

from medlatent.classifiers import DeepClassifier, TrainConfig
from medlatent.diffusion.guidance import log_prob_and_grad
from medlatent.diffusion.noise import (
    SIGMA_MAX,
    SIGMA_MIN,
    add_noise,
    karras_sigmas,
    precond,
    vp_alphas_cumprod,
    vp_to_ve,
)
from medlatent.models import Classifier

from .test_classifiers import _toy


def test_karras_schedule_matches_its_formula_at_the_ends():
    sigmas = karras_sigmas(32)
    assert sigmas[0].item() == pytest.approx(SIGMA_MAX, rel=1e-5) and sigmas[-1].item() == pytest.approx(
        SIGMA_MIN, rel=1e-5
    )
    assert torch.all(sigmas[:-1] > sigmas[1:])
    # EDM Eq. 5 at i = 1 of n = 3: the midpoint in sigma^(1/rho).
    mid = ((80 ** (1 / 7) + 0.002 ** (1 / 7)) / 2) ** 7
    assert karras_sigmas(3)[1].item() == pytest.approx(mid, rel=1e-5)
    assert precond(torch.tensor([1.0, np.e**4]), 0.5).c_noise.tolist() == pytest.approx([0.0, 1.0])


def test_vp_maps_onto_ve():
    abar = vp_alphas_cumprod()
    z, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 500, 999])
    z_t = abar[t].sqrt().view(-1, 1, 1, 1) * z + (1 - abar[t]).sqrt().view(-1, 1, 1, 1) * eps
    z_ve, sigma = vp_to_ve(z_t, t, abar)
    assert torch.allclose(z_ve, add_noise(z, sigma, eps), atol=1e-4)


@pytest.mark.parametrize("name", ["resnet10t", "convnext_atto"])
def test_film_starts_as_identity(name):
    torch.manual_seed(0)
    model = Classifier(name, 8, 3, latent_stem=True, noise_conditioned=True).eval()
    backbone = model.backbone  # its own forward, with no FiLM in it
    z = torch.randn(2, 8, 8, 8)
    expected = backbone(z)
    # Zero FiLM is the identity: the output is the backbone's on the c_in-scaled input...
    for sigma in (0.002, 1.0, 80.0):
        scale = model.sigma_data * precond(torch.tensor(sigma), model.sigma_data).c_in
        assert torch.equal(model(z, torch.tensor(sigma)), backbone(z * scale))
    # ...which for clean inputs (sigma_min) is the input itself.
    assert torch.allclose(model(z, torch.tensor(0.002)), expected, atol=1e-4)
    # Once the FiLM weights move, sigma changes the output.
    torch.nn.init.normal_(model.film[0].weight)
    assert not torch.allclose(model(z, torch.tensor(0.01)), model(z, torch.tensor(10.0)))


def test_distillation_reduces_student_teacher_gap():
    x, y = _toy(128, 0)
    xv, yv = _toy(64, 1)
    # A teacher that reads another channel than the label signal: learnable, but not from the labels.
    teacher_of = lambda inputs: torch.stack([-inputs[:, 1].mean((1, 2)), inputs[:, 1].mean((1, 2))], 1) * 8  # noqa: E731
    teacher = teacher_of(x)
    base = dict(
        backbone="resnet10t", epochs=4, batch_size=16, lr=3e-3, patience=10, latent_mask=0.0, distill_loss="mse"
    )
    plain = DeepClassifier(TrainConfig(**base), latent_space=True, device="cpu", progress=False).fit(
        x, y, xv, yv, "binary"
    )
    student = DeepClassifier(
        TrainConfig(**base, distill_alpha=0.0), latent_space=True, device="cpu", progress=False
    ).fit(x, y, xv, yv, "binary", teacher_logits=teacher)
    gap = lambda clf: ((clf.logits(xv) - teacher_of(xv)) ** 2).mean().item()  # noqa: E731
    assert gap(student) < 0.6 * gap(plain)  # seeds 0-3: ratios 0.52, 0.31, 0.26, 0.34; no distillation: about 1


@pytest.fixture(scope="module")
def conditioned():
    x, y = _toy(64, 0)
    cfg = TrainConfig("resnet10t", epochs=1, batch_size=16, noise_conditioned=True, sigma_steps=8, latent_mask=0.0)
    clf = DeepClassifier(cfg, latent_space=True, device="cpu", progress=False).fit(x, y, x[:32], y[:32], "binary")
    torch.nn.init.normal_(clf.model_.film[-1].weight, std=0.1)  # make sigma matter
    return clf, x


def test_guidance_gradient_matches_finite_differences(conditioned):
    clf, x = conditioned
    clf.model_.double()
    try:
        z = x[:3].double()
        target = torch.tensor([0, 1, 1])
        sigma = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
        log_prob, grad = log_prob_and_grad(clf, z, sigma, target)
        assert log_prob.shape == (3,) and grad.shape == z.shape and torch.all(log_prob <= 0)
        direction = torch.randn_like(z)
        h = 1e-6  # small: ReLU kinks lie within 1e-5 of these points
        plus, _ = log_prob_and_grad(clf, z + h * direction, sigma, target)
        minus, _ = log_prob_and_grad(clf, z - h * direction, sigma, target)
        numeric = (plus - minus) / (2 * h)
        analytic = (grad * direction).flatten(1).sum(1)
        assert torch.allclose(numeric, analytic, rtol=1e-4, atol=1e-6)
    finally:
        clf.model_.float()


def test_guidance_with_vp_timesteps_follows_the_chain_rule(conditioned):
    clf, x = conditioned
    abar = vp_alphas_cumprod()
    t = torch.tensor([10, 400, 900])
    z_t = x[:3] * abar[t].sqrt().view(-1, 1, 1, 1)
    target = torch.tensor([1, 0, 1])
    log_p_vp, grad_vp = log_prob_and_grad(clf, z_t, None, target, timestep=t, alphas_cumprod=abar)
    z_ve, sigma = vp_to_ve(z_t, t, abar)
    log_p_ve, grad_ve = log_prob_and_grad(clf, z_ve, sigma, target)
    assert torch.allclose(log_p_vp, log_p_ve, atol=1e-5)
    assert torch.allclose(grad_vp, grad_ve / abar[t].sqrt().view(-1, 1, 1, 1), rtol=1e-4, atol=1e-6)


def test_save_and_load_round_trip_exactly(conditioned, tmp_path):
    clf, x = conditioned
    folder = clf.save_pretrained(tmp_path / "clf")
    loaded = DeepClassifier.from_pretrained(folder, device="cpu")
    assert loaded.config == clf.config and loaded.task_ == "binary"
    for sigma in (None, 0.3, 20.0):
        assert torch.equal(loaded.logits(x[:8], sigma), clf.logits(x[:8], sigma))
    state, loaded_state = clf.model_.state_dict(), loaded.model_.state_dict()
    assert state.keys() == loaded_state.keys() and all(torch.equal(state[k], loaded_state[k]) for k in state)


def test_refuses_a_classifier_saved_in_an_older_format(conditioned, tmp_path):
    import json

    from medlatent.errors import MedlatentInputError

    folder = conditioned[0].save_pretrained(tmp_path / "clf")
    meta = json.loads((folder / "estimator.json").read_text())
    (folder / "estimator.json").unlink()  # the layout of format 2: everything in config.json
    (folder / "config.json").write_text(json.dumps({**meta, "medlatent_format": 2}))
    with pytest.raises(MedlatentInputError, match="train it again"):
        DeepClassifier.from_pretrained(folder, device="cpu")


def test_backbone_sees_inputs_of_one_scale_at_every_noise_level():
    """EDM's c_in: without it an input at sigma = 80 is 160 times the clean scale."""
    torch.manual_seed(0)
    model = Classifier("resnet10t", 8, 2, latent_stem=True, noise_conditioned=True, sigma_data=0.5)
    seen = []
    model.backbone.conv1.register_forward_pre_hook(lambda module, args: seen.append(args[0].std().item()))
    z = 0.5 * torch.randn(64, 8, 8, 8)
    for sigma in (0.002, 0.5, 5.0, 80.0):
        model(add_noise(z, torch.full((64,), sigma)), torch.tensor(sigma))
    assert all(abs(std - 0.5) < 0.05 for std in seen), seen


@pytest.mark.slow
@pytest.mark.parametrize("distill_loss", ["mse", "kl"])
def test_distilled_student_scores_at_least_as_well_as_the_plain_latent_classifier(
    tmp_path, tiny_builtin_folder, distill_loss
):
    """Trained through the audit's own path, on a problem where the image teacher is good,
    a distilled latent student with either loss does not fall below the plain latent classifier."""
    import medlatent

    results = medlatent.gap(
        dataset="synthetic:n_train=96,n_val=48,n_test=64,lesion_size=0.2,lesion_contrast=0.8",
        size=32,
        backbone="resnet10t",
        epochs=4,
        patience=4,
        batch_size=16,
        variant_epoch_factor=1,
        bootstrap=100,
        progress=False,
        linear_probe=False,
        latent_variants=["distilled"],
        distill_loss=distill_loss,
        autoencoders=[f"builtin:{tiny_builtin_folder}"],
        out=str(tmp_path / "run"),
        cache_dir=str(tmp_path / "cache"),
    )
    row = results["rows"][0]
    plain, distilled = (
        row["scores"]["latent"]["auroc"]["value"],
        row["variants"]["distilled"]["scores"]["auroc"]["value"],
    )
    assert row["scores"]["image"]["auroc"]["value"] > 0.85  # the teacher is good
    assert plain > 0.7
    assert distilled >= plain - 0.03, (distilled, plain)
