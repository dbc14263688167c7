"""Classifiers for any space: timm backbones (`create_backbone`), losses, the deep classifier and
the linear probe, all with the same `fit` / `predict_proba` / `predict` / `score` API."""

from .backbones import BACKBONES, create_backbone
from .linear_probe import LinearProbe
from .losses import LOSSES, ClassificationLoss
from .trainer import DeepClassifier, SpaceScaler, TrainConfig

__all__ = ["BACKBONES", "LOSSES", "ClassificationLoss", "DeepClassifier", "LinearProbe", "SpaceScaler", "TrainConfig", "create_backbone"]
