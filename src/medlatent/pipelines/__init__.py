"""Pipelines: a trained model with what it needs to be used (its normalisation, autoencoder and
split), apart from the models (`medlatent.models`) and the maths (`medlatent.diffusion`).
`LatentDiffusion`: a class-conditional latent denoiser; `train_latent_diffusion` makes one."""

from .latent_diffusion import LatentDiffusion, save_grid, train_latent_diffusion, write_samples

__all__ = ["LatentDiffusion", "save_grid", "train_latent_diffusion", "write_samples"]
