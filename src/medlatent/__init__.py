"""medlatent: audit, fix and use the latent spaces of image autoencoders in medical imaging.

The Python API has the CLI's names: `medlatent.gap(...)`, `medlatent.report(run)`,
`medlatent.autoencoder_train(...)`, `medlatent.classifier_train(...)`, `medlatent.score(...)`,
`medlatent.diffusion_train(...)`, `medlatent.diffusion_sample(...)`,
`medlatent.diffusion_evaluate(...)`, `medlatent.diffusion_classify(...)`, `medlatent.augment(...)`,
`medlatent.counterfactual(...)`, `medlatent.audit(...)`, `medlatent.compare(...)`,
`medlatent.push(...)`; and
`medlatent.load_results(run)`, any command's results.json as a tidy pandas DataFrame.
They are imported on first use, so `import medlatent` (and `medlatent --help`) stays fast.
"""

__version__ = "0.1.0"
API = (
    "gap",
    "report",
    "autoencoder_train",
    "classifier_train",
    "classifier_eval",
    "score",
    "augment",
    "diffusion_train",
    "diffusion_sample",
    "diffusion_evaluate",
    "diffusion_classify",
    "counterfactual",
    "audit",
    "compare",
    "push",
)
RESULTS = ("load_results",)  # from medlatent.results
__all__ = ["__version__", *API, *RESULTS]


def __getattr__(name: str):
    if name in API:
        from . import api

        return getattr(api, name)
    if name in RESULTS:
        from . import results

        return getattr(results, name)
    raise AttributeError(f"module 'medlatent' has no attribute {name!r}")
