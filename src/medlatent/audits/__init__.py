"""Audits of a latent space. `gap`: image vs reconstruction vs latent learnability."""
