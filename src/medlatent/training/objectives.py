"""What the training loop optimises: one callable per kind of model,
`objective(model, batch, generator, epoch) -> loss`. Random draws (masks, noise levels, noise,
crops) come from the loop's `generator`, whose state is checkpointed, so a resumed run draws the
same numbers as an uninterrupted one."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..diffusion.noise import add_noise, sample_training_sigmas
from .losses import ClassificationLoss, distillation_loss


@dataclass
class ClassificationObjective:
    """Classification (CE, class-balanced, LDAM-DRW) of batch["x"] against batch["y"], with:
    latent masking (`latent_mask`: share of entries zeroed per sample, the reference augmentation);
    noise conditioning (`sigmas`: inputs noised as x + sigma * eps, sigma uniform over the discrete
    schedule, `clean_fraction` of them at its smallest sigma; the model gets sigma);
    distillation (`distill_alpha < 1` and batch["teacher"], a frozen teacher's logits):
    alpha * task loss + (1 - alpha) * distillation loss."""

    criterion: ClassificationLoss
    latent_mask: float = 0.0
    sigmas: torch.Tensor | None = None
    clean_fraction: float = 0.0
    distill_alpha: float = 1.0
    distill_loss: str = "mse"
    temperature: float = 2.0

    def __call__(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator, epoch: int
    ) -> torch.Tensor:
        x, device = batch["x"], batch["x"].device
        self.criterion = self.criterion.to(device)
        self.criterion.set_epoch(epoch)  # LDAM's deferred re-weighting
        if self.latent_mask > 0:
            x = x * (torch.rand(x.shape, generator=generator, device=generator.device).to(device) >= self.latent_mask)
        if self.sigmas is None:
            logits = model(x)
        else:
            if self.sigmas.device != generator.device:  # once: a copy per step would wait for the device
                self.sigmas = self.sigmas.to(generator.device)
            sigma = sample_training_sigmas(len(x), self.sigmas, generator, self.clean_fraction).to(device)
            x = add_noise(x, sigma, torch.randn(x.shape, generator=generator, device=generator.device).to(device))
            logits = model(x, sigma)
        logits = logits.float()
        loss = self.criterion(logits, batch["y"])
        if self.distill_alpha < 1.0 and "teacher" in batch:
            loss = self.distill_alpha * loss + (1 - self.distill_alpha) * distillation_loss(
                logits, batch["teacher"].float(), self.distill_loss, self.temperature, self.criterion.task
            )
        return loss


@dataclass
class AutoencoderObjective:
    """The KL autoencoder's loss without perceptual and adversarial terms: L1 reconstruction of
    random `crop` x `crop` crops plus `kl_weight` times the posterior's KL to N(0, I).
    The model is a diffusers `AutoencoderKL`, whose inputs are in [-1, 1]; batch["x"] in [0, 1]."""

    crop: int = 32
    kl_weight: float = 1e-6

    def __call__(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator, epoch: int
    ) -> torch.Tensor:
        x = random_crop(batch["x"], self.crop, generator)
        posterior = model.encode(x * 2 - 1).latent_dist
        z = posterior.mean + posterior.std * torch.randn(
            posterior.mean.shape, generator=generator, device=generator.device
        ).to(x.device, posterior.mean.dtype)
        recon = (model.decode(z).sample + 1) / 2
        return (recon.float() - x.float()).abs().mean() + self.kl_weight * posterior.kl().float().mean()


def random_crop(images: torch.Tensor, crop: int, generator: torch.Generator) -> torch.Tensor:
    """One random crop position for the batch (convolutions do not care about the crop size)."""
    size = images.shape[-1]
    if crop >= size:
        return images
    i, j = torch.randint(0, size - crop + 1, (2,), generator=generator, device=generator.device).tolist()
    return images[..., i : i + crop, j : j + crop]


@dataclass
class DenoisingObjective:
    """EDM's training loss (Karras et al. 2022, Eq. 2 with Table 1): for sigma with
    ln(sigma) ~ N(P_mean, P_std^2), lambda(sigma) ||D(x + sigma n; sigma, y) - x||^2 with
    lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2. batch["y"] is the class (or label
    vector); a share `label_dropout` of them is replaced by the null condition (classifier-free guidance)."""

    sigma_data: float = 0.5
    p_mean: float = -1.2
    p_std: float = 1.2
    label_dropout: float = 0.1
    # Latent Drift: noise from N(drift, I), x + sigma (eps + drift), the VP forward process
    # z_t = sqrt(abar) x + sqrt(1 - abar) (eps + drift) in EDM's variables
    drift: float = 0.0

    def __call__(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator, epoch: int
    ) -> torch.Tensor:
        x, device = batch["x"], batch["x"].device
        draw = lambda *shape: torch.randn(shape, generator=generator, device=generator.device).to(device)  # noqa: E731
        sigma = (draw(len(x)) * self.p_std + self.p_mean).exp()
        weight = (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2
        labels = batch["y"]
        if self.label_dropout > 0:
            dropped = torch.rand(len(x), generator=generator, device=generator.device).to(device) < self.label_dropout
            labels = getattr(model, "module", model).drop_labels(labels, dropped)
        noised = x + sigma.view(-1, 1, 1, 1) * (draw(*x.shape) + self.drift)
        denoised = model(noised, sigma, labels)
        return (weight.view(-1, 1, 1, 1) * (denoised.float() - x.float()) ** 2).mean()


@dataclass
class VPDenoisingObjective:
    """DDPM's loss with min-SNR weighting (Hang et al. 2023): t uniform over diffusers'
    `DDPMScheduler` timesteps, x_t from its `add_noise`, target eps or v (`get_velocity`), and
    weight min(SNR_t, gamma) / SNR_t for eps, min(SNR_t, gamma) / (SNR_t + 1) for v, with
    SNR_t = abar_t / (1 - abar_t) (gamma 0: no weighting). Labels dropped as in `DenoisingObjective`."""

    prediction: str = "eps"
    min_snr_gamma: float = 5.0
    label_dropout: float = 0.1
    drift: float = 0.0  # Latent Drift: the noise added (and predicted) is drawn from N(drift, I)

    def __post_init__(self) -> None:
        from ..diffusion.noise import vp_scheduler

        self.scheduler = vp_scheduler()

    def __call__(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator, epoch: int
    ) -> torch.Tensor:
        x, device = batch["x"], batch["x"].device
        steps = self.scheduler.config.num_train_timesteps
        t = torch.randint(0, steps, (len(x),), generator=generator, device=generator.device).to(device)
        noise = torch.randn(x.shape, generator=generator, device=generator.device).to(device) + self.drift
        labels = batch["y"]
        if self.label_dropout > 0:
            dropped = torch.rand(len(x), generator=generator, device=generator.device).to(device) < self.label_dropout
            labels = getattr(model, "module", model).drop_labels(labels, dropped)
        x_t = self.scheduler.add_noise(x, noise, t)
        target = noise if self.prediction == "eps" else self.scheduler.get_velocity(x, noise, t)
        abar = self.scheduler.alphas_cumprod.to(device)[t]
        snr = abar / (1 - abar)
        if self.min_snr_gamma > 0:
            weight = snr.clamp(max=self.min_snr_gamma) / (snr if self.prediction == "eps" else snr + 1)
        else:
            weight = torch.ones_like(snr)
        prediction = model(x_t, None, labels, timesteps=t)
        return (weight.view(-1, 1, 1, 1) * (prediction.float() - target.float()) ** 2).mean()
