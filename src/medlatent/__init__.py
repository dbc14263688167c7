"""medlatent: audit, fix and use the latent spaces of image autoencoders in medical imaging."""

__version__ = "0.1.0"

from .api import autoencoder_train, gap, report  # noqa: E402

__all__ = ["__version__", "autoencoder_train", "gap", "report"]
