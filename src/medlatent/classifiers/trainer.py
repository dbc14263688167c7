"""A deep classifier with a scikit-learn style API: `fit`, `predict_proba`, `predict`, `score`.

One protocol for every space (image, reconstruction, latent): the same backbone, optimiser,
schedule, loss and early stopping on validation balanced accuracy. Inputs are float tensors
already in the space's representation; `SpaceScaler` normalises them from training statistics.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..device import autocast, resolve_device
from ..diffusion.noise import SIGMA_MIN, add_noise, karras_sigmas, sample_training_sigmas, vp_to_ve
from ..errors import MedlatentInputError
from ..evaluation.metrics import score as score_metrics
from ..io import atomic_write_json
from .backbones import create_backbone
from .losses import ClassificationLoss, distillation_loss
from .noise_conditioned import NoiseConditionedClassifier

SAVE_FORMAT = 2  # 2: noise-conditioned models scale their input by c_in(sigma)


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
    # Noise conditioning (latent space): FiLM on sigma, trained on z + sigma * eps over a discrete Karras schedule.
    noise_conditioned: bool = False
    sigma_steps: int = 32
    sigma_data: float = 0.5  # std of the clean inputs, i.e. the latent scaler's target std (EDM's sigma_data)
    clean_fraction: float = 0.0  # share of training samples at sigma_min instead of a uniform Karras step
    # Distillation from a frozen image-space teacher: alpha * task loss + (1 - alpha) * distillation loss.
    distill_alpha: float = 1.0
    distill_loss: str = "mse"  # "mse" (on logits, as published) or "kl" (temperature-scaled)
    temperature: float = 2.0
    freeze_backbone: bool = False


def _selection_key(val: dict) -> tuple[float, float]:
    """Early stopping ranks epochs by validation balanced accuracy, then AUROC; NaN (e.g. one class
    in validation) ranks below every number, so a best state always exists."""
    return tuple(float(np.nan_to_num(val[k], nan=-1.0)) for k in ("balanced_accuracy", "auroc"))


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
    """`fit(x, y, x_val, y_val, task)` on inputs already standardised for their space.

    With `config.noise_conditioned` the model is a `NoiseConditionedClassifier`, trained on
    noised inputs and evaluated at `eval_sigma` (sigma_min by default). With `teacher_logits`
    (a frozen image-space model's logits on the same training samples) and `distill_alpha < 1`
    it is distilled from that teacher.
    """

    def __init__(self, config: TrainConfig | None = None, latent_space: bool = False, device: str = "auto", progress: bool = True, name: str = "", space: str | None = None):
        """space: what the inputs are ("image", "reconstruction", "latent"), saved with the model;
        by default "latent" or "image" from `latent_space`."""
        self.config = config or TrainConfig()
        self.latent_space = latent_space
        self.space = space or ("latent" if latent_space else "image")
        self.device = resolve_device(device)
        self.progress = progress
        self.name = name
        self.eval_sigma = SIGMA_MIN
        self.input_scaler: SpaceScaler | None = None  # saved with the model, for use on raw inputs

    def _build(self, in_chans: int, pretrained: bool) -> torch.nn.Module:
        cfg = self.config
        model = create_backbone(cfg.backbone, in_chans, self.num_outputs_, pretrained, latent_stem=self.latent_space)
        return NoiseConditionedClassifier(model, sigma_data=cfg.sigma_data) if cfg.noise_conditioned else model

    def _logits(self, inputs: torch.Tensor, sigma: torch.Tensor | float | None = None) -> torch.Tensor:
        if self.config.noise_conditioned:
            return self.model_(inputs, self.eval_sigma if sigma is None else sigma)
        return self.model_(inputs)

    def fit(self, x: torch.Tensor, y: np.ndarray, x_val: torch.Tensor, y_val: np.ndarray, task: str, teacher_logits: torch.Tensor | None = None, init: dict[str, torch.Tensor] | None = None, num_outputs: int | None = None) -> "DeepClassifier":
        """init: the state dict of a classifier of the same backbone to start from; a plain one's
        weights also start a noise-conditioned model (its FiLM layers then start at identity).
        num_outputs: the dataset's number of classes (default: inferred from the labels seen)."""
        cfg = self.config
        generator = torch.Generator().manual_seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.task_ = task
        self.num_outputs_ = num_outputs or (y.shape[1] if task == "multilabel" else int(max(y.max(), y_val.max()) + 1))
        self.model_ = self._build(x.shape[1], cfg.pretrained).to(self.device)
        if init is not None:
            plain_into_conditioned = cfg.noise_conditioned and not any(k.startswith("backbone.") for k in init)
            (self.model_.backbone if plain_into_conditioned else self.model_).load_state_dict(init)
        if cfg.noise_conditioned and cfg.freeze_backbone:
            self.model_.backbone.requires_grad_(False)
        distill = teacher_logits is not None and cfg.distill_alpha < 1.0
        sigmas = karras_sigmas(cfg.sigma_steps)
        counts = y.sum(0) if task == "multilabel" else np.bincount(y, minlength=self.num_outputs_)
        criterion = ClassificationLoss(cfg.loss, task, counts, cfg.epochs).to(self.device)
        optimizer = torch.optim.AdamW([p for p in self.model_.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay)
        steps_per_epoch = max(1, len(x) // cfg.batch_size)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch, pct_start=0.1)
        target = torch.as_tensor(y)

        # Fine-tuning that never beats its starting weights on validation returns them (best epoch
        # -1) instead of a worse, partly re-trained model. Patience counts from the run's own best
        # epoch, not from the start: fine-tuning often dips first and recovers later.
        start_state = copy.deepcopy(self.model_.state_dict()) if init is not None else None
        start_key = _selection_key(score_metrics(task, y_val, self.predict_proba(x_val))) if init is not None else None
        best, best_key, stale = None, (-np.inf, -np.inf), 0
        self.history_ = []
        self.stop_reason_ = f"all {cfg.epochs} epochs"
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
                sigma = None
                if cfg.noise_conditioned:
                    sigma = sample_training_sigmas(len(idx), sigmas, generator, cfg.clean_fraction).to(self.device)
                    inputs = add_noise(inputs, sigma, torch.randn(inputs.shape, generator=generator).to(self.device))
                with autocast(self.device):
                    logits = self._logits(inputs, sigma).float()
                    loss = criterion(logits, target[idx].to(self.device))
                    if distill:
                        loss = cfg.distill_alpha * loss + (1 - cfg.distill_alpha) * distillation_loss(logits, teacher_logits[idx].to(self.device), cfg.distill_loss, cfg.temperature, task)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                total += loss.item()
            val = score_metrics(task, y_val, self.predict_proba(x_val))
            key = _selection_key(val)
            self.history_.append({"epoch": epoch, "loss": total / steps_per_epoch, **{f"val_{k}": v for k, v in val.items()}})
            bar.set_postfix(loss=f"{total / steps_per_epoch:.3f}", val_bacc=f"{val['balanced_accuracy']:.3f}")
            if best is None or key > best_key:
                best, best_key, stale = copy.deepcopy(self.model_.state_dict()), key, 0
                self.best_epoch_ = epoch
            else:
                stale += 1
                if stale >= cfg.patience:
                    self.stop_reason_ = f"early stopping: no better validation balanced accuracy for {cfg.patience} epochs"
                    break
        if start_key is not None and start_key >= best_key:
            best, self.best_epoch_ = start_state, -1
        self.model_.load_state_dict(best)
        self.fit_seconds_ = time.perf_counter() - start
        return self

    @torch.inference_mode()
    def logits(self, x: torch.Tensor, sigma: float | None = None, batch_size: int = 256) -> torch.Tensor:
        self.model_.eval()
        out = []
        for b in range(0, len(x), batch_size):
            with autocast(self.device):
                out.append(self._logits(x[b : b + batch_size].to(self.device), sigma).float().cpu())
        return torch.cat(out)

    def predict_proba(self, x: torch.Tensor, sigma: float | None = None, batch_size: int = 256) -> np.ndarray:
        logits = self.logits(x, sigma, batch_size)
        return (torch.sigmoid(logits) if self.task_ == "multilabel" else logits.softmax(1)).numpy()

    def log_prob_and_grad(
        self, z: torch.Tensor, sigma: torch.Tensor | float | None, target: torch.Tensor, timestep: torch.Tensor | None = None, alphas_cumprod: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Classifier guidance: log p(y | z, sigma) per sample and its gradient with respect to z.

        `z` are noised inputs in this classifier's input space: VE latents z + sigma * eps with
        `sigma`, or VP latents sqrt(abar_t) z + sqrt(1 - abar_t) eps with `timestep` and the
        scheduler's `alphas_cumprod` (the gradient is then with respect to the VP latent).
        Batched; the model is not changed."""
        self.model_.eval()
        z = z.detach().to(self.device).requires_grad_(True)
        target = torch.as_tensor(target, device=self.device)
        with torch.enable_grad():
            inputs = z
            if timestep is not None:
                inputs, sigma = vp_to_ve(z, torch.as_tensor(timestep, device=self.device), alphas_cumprod.to(z.dtype))
            logits = self._logits(inputs, torch.as_tensor(sigma, device=self.device)).to(z.dtype)
            if self.task_ == "multilabel":
                log_prob = -torch.nn.functional.binary_cross_entropy_with_logits(logits, target.float(), reduction="none").sum(1)
            else:
                log_prob = logits.log_softmax(1).gather(1, target.view(-1, 1)).squeeze(1)
            (grad,) = torch.autograd.grad(log_prob.sum(), z)
        return log_prob.detach(), grad

    def save_pretrained(self, folder: str | Path) -> Path:
        """model.safetensors + config.json, written into a temporary folder and renamed."""
        import shutil

        from safetensors.torch import save_file

        folder = Path(folder)
        tmp = folder.with_name(f".{folder.name}.partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.model_.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        meta = {"train_config": asdict(self.config), "space": self.space, "latent_space": self.latent_space, "task": self.task_, "num_outputs": self.num_outputs_, "in_chans": self._in_chans(), "eval_sigma": self.eval_sigma, "medlatent_format": SAVE_FORMAT}
        if self.input_scaler is not None:
            save_file({"mean": self.input_scaler.mean_.contiguous(), "std": self.input_scaler.std_.contiguous()}, str(tmp / "input_scaler.safetensors"))
            meta["input_target_std"] = self.input_scaler.target_std
        atomic_write_json(tmp / "config.json", meta)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
        return folder

    def _in_chans(self) -> int:
        backbone = self.model_.backbone if self.config.noise_conditioned else self.model_
        first = next(m for m in backbone.modules() if isinstance(m, torch.nn.Conv2d))
        return first.in_channels

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str = "auto") -> "DeepClassifier":
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
            raise MedlatentInputError(f"{folder}: not a saved medlatent classifier (needs config.json and model.safetensors)")
        meta = json.loads((folder / "config.json").read_text())
        if meta.get("medlatent_format", 1) < SAVE_FORMAT and meta["train_config"].get("noise_conditioned"):
            raise MedlatentInputError(f"{folder}: a noise-conditioned classifier saved before input preconditioning (format {meta.get('medlatent_format', 1)}); train it again")
        clf = cls(TrainConfig(**meta["train_config"]), latent_space=meta["latent_space"], device=device, progress=False, space=meta.get("space"))
        clf.task_, clf.num_outputs_, clf.eval_sigma = meta["task"], meta["num_outputs"], meta["eval_sigma"]
        clf.model_ = clf._build(meta["in_chans"], pretrained=False)
        try:
            clf.model_.load_state_dict(load_file(folder / "model.safetensors"), strict=True)
        except RuntimeError as err:
            raise MedlatentInputError(f"{folder}: weights do not match the saved configuration ({str(err).splitlines()[0]})") from err
        clf.model_.to(clf.device).eval()
        if (folder / "input_scaler.safetensors").is_file():
            stats = load_file(folder / "input_scaler.safetensors")
            clf.input_scaler = SpaceScaler(meta["input_target_std"])
            clf.input_scaler.mean_, clf.input_scaler.std_ = stats["mean"], stats["std"]
        return clf

    def predict(self, x: torch.Tensor) -> np.ndarray:
        from ..evaluation.metrics import predictions

        return predictions(self.task_, self.predict_proba(x))

    def score(self, x: torch.Tensor, y: np.ndarray) -> float:
        """AUROC, as the gap is reported."""
        return score_metrics(self.task_, y, self.predict_proba(x))["auroc"]

    def describe(self) -> dict:
        return {**asdict(self.config), "latent_space": self.latent_space, "best_epoch": getattr(self, "best_epoch_", None), "epochs_run": len(getattr(self, "history_", [])), "stop_reason": getattr(self, "stop_reason_", None)}

    def history_arrays(self) -> dict[str, np.ndarray]:
        """The training curve as arrays: loss and each validation metric per epoch."""
        return {key: np.array([h[key] for h in self.history_], dtype=float) for key in self.history_[0] if key != "epoch"}
