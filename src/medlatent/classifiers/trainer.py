"""A deep classifier with a scikit-learn style API: `fit`, `predict_proba`, `predict`, `score`.

One protocol for every space (image, reconstruction, latent): the same backbone, optimiser,
schedule, loss and early stopping on validation balanced accuracy. Inputs are float tensors
already in the space's representation; `SpaceScaler` normalises them from training statistics.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..config import TrainConfig
from ..data.tensors import channel_sums, input_batches, mean_std
from ..device import autocast, resolve_device, seed_everything
from ..diffusion.noise import SIGMA_MIN, karras_sigmas
from ..errors import MedlatentInputError
from ..evaluation.metrics import score as score_metrics
from ..io import atomic_write_json, read_json_object, read_safetensors
from ..models import Classifier
from ..rundir import finish_folder, partial_folder
from ..training import ClassificationObjective, EarlyStopping, Trainer, nan_last, run_key
from ..training.losses import ClassificationLoss

SAVE_FORMAT = (
    3  # 2: noise-conditioned models scale their input by c_in(sigma); 3: models.Classifier saved with its own config
)
ESTIMATOR_FILE = "estimator.json"
LATENT_MAP_FILE = "latent_map.safetensors"  # a latent variant's fitted map (the whitening's buffers)


def _selection_key(val: dict) -> tuple[float, float]:
    """Early stopping ranks epochs by validation balanced accuracy, then AUROC; NaN (e.g. one class
    in validation) ranks below every number, so a best state always exists."""
    return tuple(nan_last(val[k]) for k in ("balanced_accuracy", "auroc"))


class SpaceScaler:
    """Per-channel standardisation fitted on training inputs, to std `target_std` (0.5 in the reference)."""

    def __init__(self, target_std: float = 1.0):
        self.target_std = target_std

    def fit(self, x: torch.Tensor | Dataset, batch_size: int = 512) -> SpaceScaler:
        """Per-channel mean and (unbiased) std from float64 sums over batches: the same numbers
        whether `x` is a tensor or a streamed Dataset of {"x": ...}."""
        total = total_sq = 0.0
        count = 0
        for batch in input_batches(x, batch_size):
            s, sq, n = channel_sums(batch)
            total, total_sq, count = total + s, total_sq + sq, count + n
        mean, std = mean_std(total, total_sq, count)
        self.mean_ = mean.float().view(1, -1, 1, 1)[0]
        self.std_ = std.float().view(1, -1, 1, 1)[0].clamp_min(1e-6)
        return self

    def transform(self, x: torch.Tensor | Dataset) -> torch.Tensor | Dataset:
        """Standardised inputs; a streamed Dataset gets the transform applied per sample."""
        if not isinstance(x, torch.Tensor):
            return x.with_transform(self.transform)
        return (x - self.mean_) / self.std_ * self.target_std


class DeepClassifier:
    """`fit(x, y, x_val, y_val, task)` on inputs already standardised for their space.

    The network is a `models.Classifier`; with `config.noise_conditioned` it is trained on noised
    inputs and evaluated at `eval_sigma` (sigma_min by default). With `teacher_logits` (a frozen
    image-space model's logits on the same training samples) and `distill_alpha < 1` it is
    distilled from that teacher. Training runs through the engine (`training.Trainer`): with a
    `checkpoint_dir` a killed fit resumes where it stopped and ends with the same weights.
    """

    def __init__(
        self,
        config: TrainConfig | None = None,
        latent_space: bool = False,
        device: str = "auto",
        progress: bool = True,
        name: str = "",
        space: str | None = None,
        distributed: bool = True,
    ):
        """space: what the inputs are ("image", "reconstruction", "latent"), saved with the model;
        by default "latent" or "image" from `latent_space`. distributed: under a multi-process
        launch, train with DDP across the processes (False: in this process alone)."""
        self.distributed = distributed
        self.config = config or TrainConfig()
        self.latent_space = latent_space
        self.space = space or ("latent" if latent_space else "image")
        self.device = resolve_device(device)
        self.progress = progress
        self.name = name
        self.eval_sigma = SIGMA_MIN
        self.input_scaler: SpaceScaler | None = None  # saved with the model, for use on raw inputs
        self.autoencoder: dict | None = (
            None  # {"spec", "content_hash"} of a latent or reconstruction model's autoencoder, saved with it
        )
        # A latent variant that reads the latents through a map (`latent_maps`): its record, saved in
        # estimator.json, and its fitted map where it has weights of its own (the whitening; saved beside).
        self.latent_variant: dict | None = None
        self.latent_map: torch.nn.Module | None = None

    def _build(self, in_chans: int, pretrained: bool, spatial: int | None = None) -> Classifier:
        """A pooled (1x1) latent gets the MLP head whatever the backbone setting: convolutions have nothing to see."""
        cfg = self.config
        backbone = "mlp" if self.latent_space and spatial == 1 else cfg.backbone
        return Classifier(
            backbone,
            in_chans,
            self.num_outputs_,
            latent_stem=stride_one_stem(self.space, self.latent_space, spatial),
            noise_conditioned=cfg.noise_conditioned,
            sigma_data=cfg.sigma_data,
            pretrained=pretrained and backbone != "mlp",
        )

    def _logits(self, inputs: torch.Tensor, sigma: torch.Tensor | float | None = None) -> torch.Tensor:
        if self.config.noise_conditioned:
            return self.model_(inputs, self.eval_sigma if sigma is None else sigma)
        return self.model_(inputs)

    def fit(
        self,
        x: torch.Tensor | Dataset,
        y: np.ndarray,
        x_val: torch.Tensor | Dataset,
        y_val: np.ndarray,
        task: str,
        teacher_logits: torch.Tensor | None = None,
        init: dict[str, torch.Tensor] | None = None,
        num_outputs: int | None = None,
        checkpoint_dir: str | Path | None = None,
        final_checkpoint: bool = True,
    ) -> DeepClassifier:
        """x: a tensor, or a map-style Dataset of {"x": tensor} (streamed, e.g. `cache.LatentDataset`).
        init: the state dict of a classifier of the same backbone to start from; a plain one's
        weights also start a noise-conditioned model (its FiLM layers then start at identity).
        num_outputs: the dataset's number of classes (default: inferred from the labels seen).
        checkpoint_dir: where the engine keeps its checkpoint (resumed when it matches this fit)."""
        cfg = self.config
        seed_everything(cfg.seed)
        self.task_ = task
        self.num_outputs_ = num_outputs or (y.shape[1] if task == "multilabel" else int(max(y.max(), y_val.max()) + 1))
        self.model_ = self._build(_channels(x), cfg.pretrained, _spatial(x))
        if init is not None:
            self._load_init(init)
        if cfg.noise_conditioned and cfg.freeze_backbone:
            self.model_.backbone.requires_grad_(False)
        objective = self._objective(y, task, distilled=teacher_logits is not None)
        data = _training_data(x, y, teacher_logits)

        def validate(model: torch.nn.Module) -> dict:
            self.model_ = model
            return {k: float(v) for k, v in score_metrics(task, y_val, self.predict_proba(x_val)).items()}

        stopping = EarlyStopping(
            _selection_key, cfg.patience, keep_start=init is not None, description="validation balanced accuracy"
        )
        trainer = Trainer(
            cfg.loop,
            self.device,
            seed=cfg.seed,
            progress=self.progress,
            name=f"train {self.name or cfg.backbone}",
            distributed=self.distributed,
            hparams={"space": self.space, "task": task, **asdict(cfg)},
        )
        result = trainer.fit(
            self.model_,
            objective,
            data,
            batch_size=cfg.batch_size,
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            warmup=0.1,
            epochs=cfg.epochs,
            validate=validate,
            early_stopping=stopping,
            checkpoint_dir=checkpoint_dir,
            key=self._run_key(x, y, task, init, teacher_logits),
            final_checkpoint=final_checkpoint,
        )
        self.model_ = result.model.eval()
        self.history_, self.best_epoch_, self.stop_reason_ = result.history, result.best_epoch, result.stop_reason
        self.resumed_from_step_ = result.resumed_from_step
        self.fit_seconds_ = result.seconds
        self.train_samples_per_second_ = result.samples_per_second
        return self

    def _load_init(self, init: dict[str, torch.Tensor]) -> None:
        """Start from `init`; a plain classifier's weights also start a noise-conditioned one."""
        try:
            if self.config.noise_conditioned and not any(k.startswith("film.") for k in init):
                self.model_.load_plain(init)
            else:
                self.model_.load_state_dict(init)
        except RuntimeError as err:  # shapes or keys of another backbone, space or number of classes
            first = " ".join(str(err).split())[:200]
            raise MedlatentInputError(
                f"--init: its weights do not fit this classifier ({first}); "
                "start from a classifier of the same backbone, space and classes"
            ) from err

    def _objective(self, y: np.ndarray, task: str, distilled: bool) -> ClassificationObjective:
        """The training objective: the loss (class weights from the label counts), latent masking,
        noise levels for a noise-conditioned model, distillation from a teacher's logits."""
        cfg = self.config
        counts = y.sum(0) if task == "multilabel" else np.bincount(y, minlength=self.num_outputs_)
        return ClassificationObjective(
            ClassificationLoss(cfg.loss, task, counts, cfg.epochs),
            latent_mask=masked_share(self.space, self.latent_space, cfg.latent_mask),
            sigmas=karras_sigmas(cfg.sigma_steps) if cfg.noise_conditioned else None,
            clean_fraction=cfg.clean_fraction,
            distill_alpha=cfg.distill_alpha if distilled else 1.0,
            distill_loss=cfg.distill_loss,
            temperature=cfg.temperature,
        )

    def _run_key(
        self,
        x: torch.Tensor | Dataset,
        y: np.ndarray,
        task: str,
        init: dict[str, torch.Tensor] | None,
        teacher_logits: torch.Tensor | None,
    ) -> str:
        """What identifies this fit for the engine: its checkpoint is resumed only by the same fit."""
        return run_key(
            train={k: v for k, v in asdict(self.config).items() if k != "loop"},
            task=task,
            outputs=self.num_outputs_,
            latent=stride_one_stem(self.space, self.latent_space, _spatial(x)),
            init=_digest(init),
            teacher=_digest(teacher_logits),
            data=_digest(x, y),
        )

    @torch.inference_mode()
    def logits(self, x: torch.Tensor | Dataset, sigma: float | None = None, batch_size: int = 256) -> torch.Tensor:
        self.model_.eval()
        out = []
        for inputs in input_batches(x, batch_size):
            with autocast(self.device):
                out.append(
                    self._logits(inputs.to(self.device, non_blocking=True), sigma).float()
                )  # on the device until the end: a copy per batch would wait for it
        return torch.cat(out).cpu()

    def predict_proba(
        self, x: torch.Tensor | Dataset, sigma: float | None = None, batch_size: int = 256
    ) -> np.ndarray:
        logits = self.logits(x, sigma, batch_size)
        return (torch.sigmoid(logits) if self.task_ == "multilabel" else logits.softmax(1)).numpy()

    def save_pretrained(self, folder: str | Path) -> Path:
        """The network (`models.Classifier.save_pretrained`: config.json + model.safetensors), the
        estimator's settings (estimator.json: training config, space, task) and the input scaler,
        written into a temporary folder and renamed."""
        from safetensors.torch import save_file

        folder = Path(folder)
        tmp = partial_folder(folder)
        shutil.rmtree(tmp, ignore_errors=True)
        self.model_.save_pretrained(tmp)
        meta = {
            "train_config": asdict(self.config),
            "space": self.space,
            "latent_space": self.latent_space,
            "task": self.task_,
            "num_outputs": self.num_outputs_,
            "eval_sigma": self.eval_sigma,
            "medlatent_format": SAVE_FORMAT,
            "autoencoder": self.autoencoder,
            "latent_variant": self.latent_variant,
        }
        if self.latent_variant is not None and self.latent_map is not None:
            state = {k: v.detach().cpu().contiguous() for k, v in self.latent_map.state_dict().items()}
            save_file(state, str(tmp / LATENT_MAP_FILE))
        if self.input_scaler is not None:
            save_file(
                {"mean": self.input_scaler.mean_.contiguous(), "std": self.input_scaler.std_.contiguous()},
                str(tmp / "input_scaler.safetensors"),
            )
            meta["input_target_std"] = self.input_scaler.target_std
        atomic_write_json(tmp / ESTIMATOR_FILE, meta)
        return finish_folder(tmp, folder, "classifier train")

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str = "auto", option: str | None = None) -> DeepClassifier:
        """A classifier saved by `save_pretrained`, from its folder or from the Hub as
        `hf-hub:OWNER/NAME[@REVISION]` (`hub.resolve_model_dir`); `option` names where it was given
        (e.g. "--init") in the error of a spec that cannot be resolved."""
        from ..hub import resolve_model_dir

        given = folder
        folder = resolve_model_dir(folder, option)
        advice = "the classifier folder is damaged: train it again (`medlatent classifier train`)"
        if not (folder / ESTIMATOR_FILE).is_file() or not (folder / "model.safetensors").is_file():
            if (folder / "config.json").is_file() and "train_config" in read_json_object(
                folder / "config.json", "classifier config", advice
            ):
                raise MedlatentInputError(
                    f"{given}: a classifier saved by an older medlatent (format 2 or earlier); train it again"
                )
            raise MedlatentInputError(
                f"{given}: not a saved medlatent classifier (needs estimator.json, config.json and model.safetensors)"
            )
        meta = read_json_object(folder / ESTIMATOR_FILE, "classifier record", advice)
        try:
            clf = cls(
                TrainConfig(**meta["train_config"]),
                latent_space=meta["latent_space"],
                device=device,
                progress=False,
                space=meta.get("space"),
            )
            clf.task_, clf.num_outputs_, clf.eval_sigma = meta["task"], meta["num_outputs"], meta["eval_sigma"]
            target_std = meta.get("input_target_std")
        except (KeyError, TypeError) as err:
            raise MedlatentInputError(
                f"{folder / ESTIMATOR_FILE}: not a medlatent classifier record (missing or wrong {err}); {advice}"
            ) from err
        clf.autoencoder = meta.get("autoencoder")
        clf.latent_variant = meta.get("latent_variant")
        if (clf.latent_variant or {}).get("name") == "whitened":
            from .latent_maps import ChannelWhitening

            state = read_safetensors(folder / LATENT_MAP_FILE, "latent whitening", advice)
            clf.latent_map = ChannelWhitening(len(state.get("mean", []))).to(clf.device)
            try:
                clf.latent_map.load_state_dict(state)
            except RuntimeError as err:
                raise MedlatentInputError(f"{folder / LATENT_MAP_FILE}: not a latent whitening; {advice}") from err
        clf.model_ = Classifier.from_folder(folder)
        clf.model_.to(clf.device).eval()
        if (folder / "input_scaler.safetensors").is_file():
            stats = read_safetensors(folder / "input_scaler.safetensors", "input scaler", advice)
            if set(stats) != {"mean", "std"} or target_std is None:
                raise MedlatentInputError(
                    f"{folder / 'input_scaler.safetensors'}: not a medlatent input scaler; {advice}"
                )
            clf.input_scaler = SpaceScaler(target_std)
            clf.input_scaler.mean_, clf.input_scaler.std_ = stats["mean"], stats["std"]
        return clf

    def require_autoencoder(self, autoencoder, where: str) -> None:
        """Stop when the classifier was trained on another autoencoder's space than `autoencoder`
        (None for an image classifier); `where` names the option in the error."""
        trained_on = (self.autoencoder or {}).get("content_hash")
        if autoencoder is not None and trained_on is not None and trained_on != autoencoder.content_hash:
            raise MedlatentInputError(
                f"{where}: the classifier was trained on the {self.space} space of "
                f"{self.autoencoder['spec']} ({trained_on}), not of {autoencoder.spec}; give that autoencoder"
            )

    def predict(self, x: torch.Tensor) -> np.ndarray:
        from ..evaluation.metrics import predictions

        return predictions(self.task_, self.predict_proba(x))

    def score(self, x: torch.Tensor, y: np.ndarray) -> float:
        """AUROC, as the gap is reported."""
        return score_metrics(self.task_, y, self.predict_proba(x))["auroc"]

    def describe(self) -> dict:
        return {
            **asdict(self.config),
            "latent_space": self.latent_space,
            "best_epoch": getattr(self, "best_epoch_", None),
            "epochs_run": len(getattr(self, "history_", [])),
            "stop_reason": getattr(self, "stop_reason_", None),
        }

    def history_arrays(self) -> dict[str, np.ndarray]:
        """The training curve as arrays: loss and each validation metric per epoch."""
        return {
            key: np.array([h[key] for h in self.history_], dtype=float) for key in self.history_[0] if key != "epoch"
        }


class _WithLabels(Dataset):
    """A Dataset of {"x": ...} with labels (and teacher logits) beside it, for the training loop."""

    def __init__(self, inputs: Dataset, extra: dict[str, torch.Tensor]):
        self.inputs, self.extra = inputs, extra

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i: int) -> dict:
        return {**self.inputs[i], **{k: v[i] for k, v in self.extra.items()}}

    def __getitems__(self, indices: list[int]) -> list[dict]:
        """A batch of samples at once where the inputs read batches (features computed per batch)."""
        if not hasattr(self.inputs, "__getitems__"):
            return [self[i] for i in indices]
        inputs = self.inputs.__getitems__(indices)
        return [{**x, **{k: v[i] for k, v in self.extra.items()}} for x, i in zip(inputs, indices, strict=True)]


def _training_data(x, y: np.ndarray, teacher_logits: torch.Tensor | None):
    extra = {"y": torch.as_tensor(y)}
    if teacher_logits is not None:
        extra["teacher"] = torch.as_tensor(teacher_logits)
    return {"x": x, **extra} if isinstance(x, torch.Tensor) else _WithLabels(x, extra)


def _channels(x) -> int:
    return x.shape[1] if isinstance(x, torch.Tensor) else x[0]["x"].shape[0]


# A decoder stage's features wider than this are read with the image classifier's downsampling stem:
# a stride-1 stem on them would run the backbone at up to the image's full resolution (16 times the
# work of the image classifier, with a receptive field too small for the finding).
STRIDE_ONE_STEM_MAX_SIDE = 32


def stride_one_stem(space: str, latent_space: bool, side: int | None) -> bool:
    """Whether a classifier of `space` gets the stride-1 stem: latents always; the features after an
    intermediate decoder stage ("decoder:<stage>") up to `STRIDE_ONE_STEM_MAX_SIDE` wide, wider
    ones the image's stem."""
    if space.startswith("decoder:") and side is not None and side > STRIDE_ONE_STEM_MAX_SIDE:
        return False
    return latent_space


def masked_share(space: str, latent_space: bool, share: float) -> float:
    """The share of input entries masked as augmentation (`--latent-mask`): latents' only. Decoder-stage
    features are not masked, so that the stage classifier at the decoder's end reads its output as the
    reconstruction classifier does: masked, it scored clearly below it."""
    return share if latent_space and not space.startswith("decoder:") else 0.0


def _spatial(x) -> int:
    return x.shape[-1] if isinstance(x, torch.Tensor) else x[0]["x"].shape[-1]


def _digest(*values) -> str | None:
    """A short content hash of tensors or arrays (None when absent): a checkpoint of a fit on other
    data or from other initial weights is never resumed."""
    if all(v is None for v in values):
        return None
    h = hashlib.sha256()
    for v in values:
        if isinstance(v, dict):
            for k in sorted(v):
                h.update(k.encode())
                h.update(v[k].detach().cpu().numpy().tobytes()[: 1 << 20])
        elif isinstance(v, torch.Tensor):
            h.update(v.detach().cpu().numpy().tobytes())
        elif isinstance(v, np.ndarray):
            h.update(np.ascontiguousarray(v).tobytes())
        elif v is not None:
            h.update(str(len(v)).encode())  # a streamed dataset: its size (its cache key names its content)
    return h.hexdigest()[:16]
