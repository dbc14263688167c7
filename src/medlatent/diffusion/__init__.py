"""Diffusion in latent space. `noise`: the noise levels shared by latent diffusion models and
the noise-conditioned classifiers that judge their latents."""
