"""Callbacks of the training loop, called at the end of each epoch with the validation metrics."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


class EarlyStopping:
    """Keep the weights of the best epoch by `key(metrics)` (a tuple, larger is better); stop after
    `patience` epochs without improvement.

    The kept weights are a copy on the model's device: on a GPU that copy is queued like a kernel,
    where a copy to the host waits for every queued training step, at each improving epoch.
    Checkpoints hold them on the host (`state_dict`).

    With `keep_start` (fine-tuning from given weights) the starting weights are scored first and
    returned (best epoch -1) if no epoch beats them. Patience counts from the run's own best epoch,
    not from the start: fine-tuning often dips first and recovers later."""

    def __init__(
        self,
        key: Callable[[dict], tuple],
        patience: int,
        keep_start: bool = False,
        description: str = "validation score",
    ):
        self.key, self.patience, self.keep_start, self.description = key, patience, keep_start, description
        self.best_state: dict | None = None
        self.best_key: tuple | None = None
        self.best_epoch: int | None = None
        self.start_key: tuple | None = None
        self.stale = 0
        self.stop_reason = ""
        self.last = ""

    def on_start(self, model: torch.nn.Module, metrics: dict) -> None:
        if self.keep_start:
            self.start_key = self.key(metrics)
            self.best_state, self.best_epoch = snapshot(model.state_dict()), -1

    def on_epoch_end(self, epoch: int, model: torch.nn.Module, metrics: dict) -> bool:
        """Record the epoch; True when training should stop."""
        key = self.key(metrics)
        self.last = f"{key[0]:.3f}"
        run_best = self.best_key is None or key > self.best_key
        if run_best:
            self.best_key, self.stale = key, 0
            if self.start_key is None or key > self.start_key:
                self.best_state, self.best_epoch = snapshot(model.state_dict()), epoch
            return False
        self.stale += 1
        if self.stale >= self.patience:
            self.stop_reason = f"early stopping: no better {self.description} for {self.patience} epochs"
            return True
        return False

    def state_dict(self) -> dict:
        state = {
            k: getattr(self, k)
            for k in ("best_state", "best_key", "best_epoch", "start_key", "stale", "stop_reason", "last")
        }
        return state | {"best_state": cpu_state(self.best_state) if self.best_state is not None else None}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, tuple(v) if k.endswith("_key") and v is not None else v)


def nan_last(value: float) -> float:
    """NaN (e.g. one class in validation) ranks below every number, so a best state always exists."""
    return -1.0 if value is None or math.isnan(value) else float(value)


def cpu_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict on the host, to be saved at once (checkpoints): host tensors are not copied."""
    return {k: v.detach().cpu() for k, v in state.items()}


def snapshot(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A detached copy of a state dict where its tensors are (kept best weights)."""
    return {k: v.detach().clone() for k, v in state.items()}
