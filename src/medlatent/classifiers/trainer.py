"""A deep classifier with a scikit-learn style API: `fit`, `predict_proba`, `predict`, `score`.

One protocol for every space (image, reconstruction, latent): the same backbone, optimiser,
schedule, loss and early stopping on validation balanced accuracy. Inputs are float tensors
already in the space's representation; `SpaceScaler` normalises them from training statistics.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ..device import autocast, resolve_device
from ..evaluation.metrics import score as score_metrics
from .backbones import create_backbone
from .losses import ClassificationLoss


@dataclass
class TrainConfig:
    backbone: str = "resnet18"
    pretrained: bool = False
    loss: str = "ce"
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    patience: int = 6
    latent_mask: float = 0.2  # share of latent entries zeroed per sample during training (reference augmentation)
    seed: int = 0


class SpaceScaler:
    """Per-channel standardisation fitted on training inputs, to std `target_std` (0.5 in the reference)."""

    def __init__(self, target_std: float = 1.0):
        self.target_std = target_std

    def fit(self, x: torch.Tensor) -> "SpaceScaler":
        dims = [0, 2, 3]
        self.mean_ = x.mean(dims, keepdim=True)[0]
        self.std_ = x.std(dims, keepdim=True)[0].clamp_min(1e-6)
        return self

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean_) / self.std_ * self.target_std


class DeepClassifier:
    def __init__(self, config: TrainConfig | None = None, latent_space: bool = False, device: str = "auto", progress: bool = True, name: str = ""):
        self.config = config or TrainConfig()
        self.latent_space = latent_space
        self.device = resolve_device(device)
        self.progress = progress
        self.name = name

    def fit(self, x: torch.Tensor, y: np.ndarray, x_val: torch.Tensor, y_val: np.ndarray, task: str) -> "DeepClassifier":
        cfg = self.config
        generator = torch.Generator().manual_seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.task_ = task
        self.num_outputs_ = y.shape[1] if task == "multilabel" else int(max(y.max(), y_val.max()) + 1)
        self.model_ = create_backbone(cfg.backbone, x.shape[1], self.num_outputs_, cfg.pretrained, latent_stem=self.latent_space).to(self.device)
        counts = y.sum(0) if task == "multilabel" else np.bincount(y, minlength=self.num_outputs_)
        criterion = ClassificationLoss(cfg.loss, task, counts, cfg.epochs).to(self.device)
        optimizer = torch.optim.AdamW(self.model_.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        steps_per_epoch = max(1, len(x) // cfg.batch_size)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch, pct_start=0.1)
        target = torch.as_tensor(y)

        best, best_key, stale = None, (-np.inf, -np.inf), 0
        self.history_ = []
        start = time.perf_counter()
        bar = tqdm(range(cfg.epochs), desc=f"train {self.name or cfg.backbone}", unit="epoch", disable=not self.progress, leave=False)
        for epoch in bar:
            self.model_.train()
            criterion.set_epoch(epoch)
            order = torch.randperm(len(x), generator=generator)
            total = 0.0
            for b in range(steps_per_epoch):
                idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
                inputs = x[idx].to(self.device, non_blocking=True)
                if self.latent_space and cfg.latent_mask > 0:
                    keep = torch.rand(inputs.shape, generator=generator).to(self.device) >= cfg.latent_mask
                    inputs = inputs * keep
                with autocast(self.device):
                    loss = criterion(self.model_(inputs).float(), target[idx].to(self.device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                total += loss.item()
            val = score_metrics(task, y_val, self.predict_proba(x_val))
            key = (val["balanced_accuracy"], val["auroc"])
            self.history_.append({"epoch": epoch, "loss": total / steps_per_epoch, **{f"val_{k}": v for k, v in val.items()}})
            bar.set_postfix(loss=f"{total / steps_per_epoch:.3f}", val_bacc=f"{key[0]:.3f}")
            if key > best_key:
                best, best_key, stale = copy.deepcopy(self.model_.state_dict()), key, 0
                self.best_epoch_ = epoch
            else:
                stale += 1
                if stale >= cfg.patience:
                    break
        self.model_.load_state_dict(best)
        self.fit_seconds_ = time.perf_counter() - start
        return self

    @torch.inference_mode()
    def predict_proba(self, x: torch.Tensor, batch_size: int = 256) -> np.ndarray:
        self.model_.eval()
        out = []
        for b in range(0, len(x), batch_size):
            with autocast(self.device):
                logits = self.model_(x[b : b + batch_size].to(self.device)).float()
            out.append((torch.sigmoid(logits) if self.task_ == "multilabel" else logits.softmax(1)).cpu())
        return torch.cat(out).numpy()

    def predict(self, x: torch.Tensor) -> np.ndarray:
        from ..evaluation.metrics import predictions

        return predictions(self.task_, self.predict_proba(x))

    def score(self, x: torch.Tensor, y: np.ndarray) -> float:
        """AUROC, as the gap is reported."""
        return score_metrics(self.task_, y, self.predict_proba(x))["auroc"]

    def describe(self) -> dict:
        return {**asdict(self.config), "latent_space": self.latent_space, "best_epoch": getattr(self, "best_epoch_", None), "epochs_run": len(getattr(self, "history_", []))}
