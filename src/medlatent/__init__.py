"""medlatent: audit, fix and use the latent spaces of image autoencoders in medical imaging.

The Python API has the CLI's names: `medlatent.gap(...)`, `medlatent.report(run)`,
`medlatent.autoencoder_train(...)`. They are imported on first use, so `import medlatent`
(and `medlatent --help`) stays fast.
"""

__version__ = "0.1.0"
__all__ = ["__version__", "autoencoder_train", "gap", "report"]


def __getattr__(name: str):
    if name in ("gap", "report", "autoencoder_train"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'medlatent' has no attribute {name!r}")
