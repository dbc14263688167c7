"""Classification losses: cross-entropy, class-balanced (Cui et al., CVPR 2019) and LDAM with
deferred re-weighting (Cao et al., NeurIPS 2019)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MedlatentInputError

LOSSES = ("ce", "cb", "ldam")


def class_balanced_weights(counts: np.ndarray, beta: float) -> torch.Tensor:
    """w_c = (1 - beta) / (1 - beta^n_c), normalised to sum to the number of classes (Cui et al. Eq. 3)."""
    effective = (1.0 - np.power(beta, counts)) / (1.0 - beta)
    weights = 1.0 / np.maximum(effective, 1e-12)
    return torch.tensor(weights / weights.sum() * len(counts), dtype=torch.float32)


class ClassificationLoss(nn.Module):
    """One object for every loss; `set_epoch` switches LDAM's deferred re-weighting on."""

    def __init__(
        self,
        kind: str,
        task: str,
        counts: np.ndarray,
        epochs: int,
        beta: float = 0.999,
        ldam_max_margin: float = 0.5,
        ldam_scale: float = 30.0,
        drw_epoch: int | None = None,
    ):
        super().__init__()
        if kind not in LOSSES:
            raise MedlatentInputError(f"--loss {kind!r}: use one of {', '.join(LOSSES)}")
        if kind == "ldam" and task == "multilabel":
            raise MedlatentInputError("--loss ldam is defined for single-label tasks; use ce or cb for multilabel")
        self.kind, self.task = kind, task
        self.register_buffer(
            "weights", class_balanced_weights(counts, beta) if kind == "cb" else torch.ones(len(counts))
        )
        if kind == "ldam":
            margins = 1.0 / np.power(np.maximum(counts, 1), 0.25)  # m_c proportional to n_c^(-1/4) (Cao et al. Eq. 13)
            self.register_buffer(
                "margins", torch.tensor(margins * (ldam_max_margin / margins.max()), dtype=torch.float32)
            )
            self.register_buffer("drw_weights", class_balanced_weights(counts, 0.9999))
            self.scale = ldam_scale
            self.drw_epoch = drw_epoch if drw_epoch is not None else epochs // 2
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """LDAM switches to re-weighted loss at `drw_epoch`; the other losses ignore the epoch."""
        self.epoch = epoch

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.task == "multilabel":
            # "cb" for multi-label: weight each label's terms by its class-balanced weight
            loss = F.binary_cross_entropy_with_logits(logits, target.float(), reduction="none")
            return (loss * self.weights).mean()
        if self.kind == "ldam":
            margin = F.one_hot(target, logits.shape[1]) * self.margins
            weight = self.drw_weights if self.epoch >= self.drw_epoch else None
            return F.cross_entropy(self.scale * (logits - margin), target, weight=weight)
        return F.cross_entropy(logits, target, weight=self.weights if self.kind == "cb" else None)


def distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, kind: str, temperature: float, task: str
) -> torch.Tensor:
    """Logit MSE, or KL(teacher || student) at temperature T scaled by T^2 (Hinton et al., 2015)."""
    if kind == "mse":
        return F.mse_loss(student, teacher)
    if kind != "kl":
        raise MedlatentInputError(f"--distill-loss {kind!r}: use kl or mse")
    t = temperature
    if task == "multilabel":  # per-label Bernoulli KL
        p = torch.sigmoid(teacher / t)
        return (
            F.binary_cross_entropy_with_logits(student / t, p) * t * t
            - F.binary_cross_entropy_with_logits(teacher / t, p) * t * t
        )
    return (
        F.kl_div(
            F.log_softmax(student / t, dim=1),
            F.log_softmax(teacher / t, dim=1),
            log_target=True,
            reduction="batchmean",
        )
        * t
        * t
    )
