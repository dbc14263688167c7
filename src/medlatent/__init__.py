"""medlatent: audit, fix and use the latent spaces of image autoencoders in medical imaging."""

__version__ = "0.1.0"
