"""A linear probe: logistic regression on standardised, flattened inputs (scikit-learn)."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ..evaluation.metrics import predictions
from ..evaluation.metrics import score as score_metrics


class LinearProbe:
    def __init__(self, C: float = 0.01, max_iter: int = 300, seed: int = 0):
        self.C, self.max_iter, self.seed = C, max_iter, seed

    def fit(self, x: torch.Tensor, y: np.ndarray, task: str) -> LinearProbe:
        self.task_ = task
        logistic = LogisticRegression(C=self.C, max_iter=self.max_iter, random_state=self.seed)
        head = OneVsRestClassifier(logistic) if task == "multilabel" else logistic
        self.model_ = make_pipeline(StandardScaler(), head)
        self.model_.fit(x.reshape(len(x), -1).numpy(), y)
        return self

    def predict_proba(self, x: torch.Tensor) -> np.ndarray:
        return self.model_.predict_proba(x.reshape(len(x), -1).numpy())

    def predict(self, x: torch.Tensor) -> np.ndarray:
        return predictions(self.task_, self.predict_proba(x))

    def score(self, x: torch.Tensor, y: np.ndarray) -> float:
        return score_metrics(self.task_, y, self.predict_proba(x))["auroc"]
