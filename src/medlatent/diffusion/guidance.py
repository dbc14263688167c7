"""Classifier guidance: log p(y | z_sigma) and its gradient with respect to the noised latent,
which a sampler adds to the score (Dhariwal & Nichol 2021, Eq. 10 / Song et al. 2021, Eq. 48:
grad log p(z | y) = grad log p(z) + grad log p(y | z))."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .noise import per_sample, vp_to_ve


def log_prob_and_grad(
    classifier: torch.nn.Module,
    z: torch.Tensor,
    sigma: torch.Tensor | float | None,
    target: torch.Tensor,
    multilabel: bool | None = None,
    timestep: torch.Tensor | None = None,
    alphas_cumprod: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(y | z, sigma) per sample and its gradient with respect to z, from a noise-conditioned
    `models.Classifier` (or a `DeepClassifier`, whose network is used).

    `z` are noised inputs in the classifier's input space: VE latents z + sigma * eps with `sigma`,
    or VP latents sqrt(abar_t) z + sqrt(1 - abar_t) eps with `timestep` and the scheduler's
    `alphas_cumprod` (the gradient is then with respect to the VP latent). Batched; the model is
    not changed."""
    model = getattr(classifier, "model_", classifier)
    if multilabel is None:
        multilabel = getattr(classifier, "task_", None) == "multilabel"
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    z = z.detach().to(device).requires_grad_(True)
    target = torch.as_tensor(target, device=device)
    with torch.enable_grad():
        inputs = z
        if timestep is not None:
            inputs, sigma = vp_to_ve(z, torch.as_tensor(timestep, device=device), alphas_cumprod.to(z.dtype))
        logits = model(inputs, per_sample(sigma, inputs)).to(z.dtype)
        if multilabel:
            log_prob = -F.binary_cross_entropy_with_logits(logits, target.float(), reduction="none").sum(1)
        else:
            log_prob = logits.log_softmax(1).gather(1, target.view(-1, 1)).squeeze(1)
        (grad,) = torch.autograd.grad(log_prob.sum(), z)
    model.train(was_training)
    return log_prob.detach(), grad
