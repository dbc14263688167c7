"""Experiment tracking for the training loop, through accelerate's trackers (TensorBoard, Weights &
Biases, MLflow, Aim, Comet ML): each fit is one named run, with its configuration as
hyperparameters, the loss, learning rate and throughput every `log_every` steps, the validation
metrics of each epoch, and the images its `on_step` callback returns (e.g. diffusion sample grids).

Only the writing process logs. Reading the loss waits for the device, so it is read every
`log_every` optimiser steps, never per step; with no tracker nothing is read at all.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..config import LoopConfig, check_tracker


def run_name(name: str) -> str:
    """A fit's name as a tracker's run name (a folder name for the trackers that write locally)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "train"


def flat_hparams(values: dict, prefix: str = "") -> dict:
    """Nested settings as one level of scalars, as trackers store hyperparameters (lists as text)."""
    out = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_hparams(value, f"{name}."))
        elif value is None or isinstance(value, (list, tuple)):
            out[name] = str(value)
        else:
            out[name] = value
    return out


class Tracking:
    """The trackers of one fit (none without `config.log_with`, or in a process that does not write)."""

    def __init__(self, config: LoopConfig, name: str, hparams: dict | None, active: bool):
        self.every = config.log_every
        self.trackers = []
        if not (config.log_with and active):
            return
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        check_tracker(config.log_with)
        tracker_class = LOGGER_TYPE_TO_CLASS[config.log_with]
        if tracker_class.requires_logging_directory:
            Path(config.log_dir).mkdir(parents=True, exist_ok=True)
            tracker = tracker_class(run_name(name), config.log_dir)
        else:
            tracker = tracker_class(run_name(name))
        tracker.start()
        tracker.store_init_configuration(flat_hparams(hparams or {}))
        self.trackers = [tracker]

    @property
    def active(self) -> bool:
        return bool(self.trackers)

    def log(self, values: dict, step: int) -> None:
        for tracker in self.trackers:
            tracker.log(values, step=step)

    def log_step(self, step: int, loss: torch.Tensor, schedule, samples_per_second: float) -> None:
        """Every `log_every` optimiser steps: the step's loss, the learning rate and the throughput so far."""
        if self.active and step % self.every == 0:
            lr = schedule.get_last_lr()[0]
            self.log({"loss": float(loss), "lr": float(lr), "samples_per_second": samples_per_second}, step)

    def log_images(self, images: dict[str, torch.Tensor], step: int) -> None:
        """Images in [0, 1], (C, H, W) each, for the trackers that take images (as a batch of one, HWC)."""
        if not self.active:
            return
        arrays = {k: v.float().clamp(0, 1).permute(1, 2, 0)[None].cpu().numpy() for k, v in images.items()}
        for tracker in self.trackers:
            if hasattr(tracker, "log_images"):
                kwargs = {"dataformats": "NHWC"} if tracker.name == "tensorboard" else {}
                tracker.log_images(arrays, step=step, **kwargs)

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []
