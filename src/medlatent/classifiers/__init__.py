"""Estimators for any space, with one `fit` / `predict_proba` / `predict` / `score` API: the deep
classifier (a `models.Classifier` trained through the engine) and the linear probe."""

from ..models import BACKBONES, create_backbone
from ..training.losses import LOSSES, ClassificationLoss
from .linear_probe import LinearProbe
from .trainer import DeepClassifier, SpaceScaler, TrainConfig

__all__ = [
    "BACKBONES",
    "LOSSES",
    "ClassificationLoss",
    "DeepClassifier",
    "LinearProbe",
    "SpaceScaler",
    "TrainConfig",
    "create_backbone",
]
