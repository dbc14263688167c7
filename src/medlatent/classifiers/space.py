"""One classifier of one space, fitted the same way by every command that trains one (the gap
audit, augment, the encoder audit, `classifier train`): the space's input scaler fitted on the
training inputs, then the estimator on the scaled inputs. The estimator keeps the scaler as
`input_scaler`, as a scikit-learn pipeline keeps its preprocessing, so raw inputs of the space can
be scored later (`predict_raw`) and the scaler is saved with a deep classifier."""

from __future__ import annotations

import numpy as np
import torch

from ..config import TrainConfig
from ..data.tensors import materialise
from .linear_probe import LinearProbe
from .trainer import DeepClassifier, SpaceScaler


def latent_like(space: str) -> bool:
    """Whether a space's classifier is built as the latent's (stride-1 stem, inputs standardised to
    `latent_std`): the latent and the features after an intermediate decoder stage
    ("decoder:<stage>"), so that the stages between the two ends are read alike; a stage as wide as
    an image gets the image's stem (`trainer.stride_one_stem`), and only latents are masked
    (`trainer.masked_share`)."""
    return space == "latent" or space.startswith("decoder:")


def space_scaler(space: str, latent_std: float) -> SpaceScaler:
    """Latents (and decoder-stage features) are standardised per channel to `latent_std` (the
    noise-conditioned models' sigma_data); images and reconstructions to 1."""
    return SpaceScaler(latent_std if latent_like(space) else 1.0)


def fit_space_classifier(
    space: str,
    train: tuple,
    val: tuple | None,
    task: str,
    config: TrainConfig,
    *,
    latent_std: float,
    num_outputs: int,
    model: str = "deep",
    device="cpu",
    progress: bool = False,
    name: str = "",
    teacher_logits: torch.Tensor | None = None,
    init: dict | None = None,
    checkpoint_dir=None,
    distributed: bool = False,
) -> DeepClassifier | LinearProbe:
    """A classifier of `space` fitted on `train` = (inputs, labels) and, for a deep model,
    early-stopped on `val`. Inputs are raw inputs of the space (tensors, or streamed datasets of
    {"x": ...}); the fitted scaler is the estimator's `input_scaler`. A linear probe (scikit-learn)
    reads streamed inputs into memory. checkpoint_dir: where a killed deep fit resumes from."""
    x, y = train
    scaler = space_scaler(space, latent_std).fit(x)
    if model == "linear":
        clf = LinearProbe(seed=config.seed).fit(materialise(scaler.transform(x)), y, task)
    else:
        clf = DeepClassifier(
            config,
            latent_space=latent_like(space),
            device=str(device),
            progress=progress,
            name=name,
            space=space,
            distributed=distributed,
        )
        clf.fit(
            scaler.transform(x),
            y,
            scaler.transform(val[0]),
            val[1],
            task,
            teacher_logits=teacher_logits,
            init=init,
            num_outputs=num_outputs,
            checkpoint_dir=checkpoint_dir,
            final_checkpoint=checkpoint_dir is None,
        )
    clf.input_scaler = scaler
    return clf


def predict_raw(clf: DeepClassifier | LinearProbe, x, **kwargs) -> np.ndarray:
    """Probabilities for raw inputs of the classifier's space: its own scaler first."""
    scaled = clf.input_scaler.transform(x)
    return clf.predict_proba(scaled if isinstance(clf, DeepClassifier) else materialise(scaled), **kwargs)
