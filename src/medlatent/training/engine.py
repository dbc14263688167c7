"""The one training loop of medlatent, on Hugging Face accelerate.

Whatever is trained (a classifier, a noise-conditioned or distilled classifier, the built-in
autoencoder, a latent diffusion model) plugs in as an *objective*: a callable
`objective(model, batch, generator, epoch) -> loss`. The loop owns everything else:

- device placement, mixed precision (bf16 on CUDA where supported, else fp16 with a gradient
  scaler, fp32 on CPU) and DDP across processes, through `accelerate.Accelerator`;
- gradient accumulation and clipping, AdamW with a one-cycle schedule, an optional EMA of the
  weights (`torch.optim.swa_utils`, buffers included);
- deterministic, resumable, rank-sharded batches (`training.batches`);
- checkpoints written atomically every N steps, every M minutes and at the end (model,
  optimiser, schedule, EMA, gradient scaler, every RNG state, step, early-stopping state and
  history), and automatic resume from the latest one: a run killed at any point and restarted
  ends with the same weights as an uninterrupted one;
- a progress bar with loss and throughput; validation and early stopping as callbacks at the end
  of each epoch;
- experiment tracking through accelerate's trackers (`training.tracking`), one named run per fit.

`train_step` is the one optimisation step; `medlatent bench` times this same step.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm

from ..config import LoopConfig
from ..device import channels_last, fix_threads
from ..io import atomic_write, read_torch
from .batches import Batches
from .callbacks import EarlyStopping, cpu_state
from .tracking import Tracking

CHECKPOINT = "checkpoint.pt"
RESULT_SETTINGS = (
    "mixed_precision",
    "grad_accum_steps",
    "max_grad_norm",
    "ema_decay",
    "ema_sigma_rel",
)  # the loop settings that change the weights


class Objective(Protocol):
    def __call__(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator, epoch: int
    ) -> torch.Tensor: ...


@dataclass
class FitResult:
    model: torch.nn.Module  # the selected weights (best epoch with early stopping, EMA when on), unwrapped
    history: list[dict]
    best_epoch: int | None
    stop_reason: str
    steps: int
    seconds: float
    resumed_from_step: int = 0
    final_loss: float = float("nan")
    samples_per_second: float = float(
        "nan"
    )  # training throughput: time in validation, checkpoints and callbacks excluded


def resolve_mixed_precision(choice: str, device: torch.device) -> str:
    if choice != "auto":
        return choice if device.type == "cuda" else "no"
    if device.type != "cuda":
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def make_accelerator(device: torch.device, mixed_precision: str = "auto", grad_accum_steps: int = 1):
    """An `Accelerator` for `device`. Its state is per process; a single-process run that asks for
    another precision than an earlier fit resets it (a multi-process run keeps one precision)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    precision = resolve_mixed_precision(mixed_precision, device)
    if device.type == "cuda" and device.index is not None and PartialState().num_processes == 1:
        torch.cuda.set_device(device.index)
    kwargs = dict(
        cpu=device.type == "cpu",
        mixed_precision=precision,
        gradient_accumulation_steps=grad_accum_steps,
        step_scheduler_with_optimizer=False,
    )
    try:
        return Accelerator(**kwargs)
    except ValueError:
        if PartialState().num_processes > 1:
            raise
        AcceleratorState._reset_state(reset_partial_state=True)
        return Accelerator(**kwargs)


def run_key(**parts) -> str:
    """A short hash of what defines a training run: a checkpoint of another run is never resumed."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Trainer:
    """`Trainer(config, device, seed).fit(model, objective, data, ...)`; one instance per fit."""

    def __init__(
        self,
        config: LoopConfig | None = None,
        device: str | torch.device = "auto",
        seed: int = 0,
        progress: bool = True,
        name: str = "train",
        distributed: bool = True,
        hparams: dict | None = None,
    ):
        """distributed: under a multi-process launch, train this one model with DDP across the
        processes (True), or in this process alone (False: the processes train different models,
        as the audit's runs do). name: the fit's name, on its progress bar and as its tracked run;
        hparams: the settings that tracked run records (`config.log_with`)."""
        from ..device import resolve_device

        self.config = config or LoopConfig()
        self.device = resolve_device(device)
        self.seed, self.progress, self.name, self.distributed = seed, progress, name, distributed
        self.hparams = hparams

    def fit(
        self,
        model: torch.nn.Module,
        objective: Objective,
        data,
        *,
        batch_size: int,
        lr: float,
        weight_decay: float = 0.0,
        warmup: float = 0.1,
        epochs: int | None = None,
        steps: int | None = None,
        validate: Callable[[torch.nn.Module], dict] | None = None,
        early_stopping: EarlyStopping | None = None,
        checkpoint_dir: str | Path | None = None,
        key: str = "",
        final_checkpoint: bool = True,
        on_step: Callable[[int, torch.nn.Module], None] | None = None,
    ) -> FitResult:
        """Train for `epochs` passes over `data` (validation and early stopping at each epoch's end)
        or for `steps` optimiser steps. `data`: a dict of equally long tensors, or a map-style
        Dataset of such dicts (streamed through a DataLoader). `key` identifies the run (see `run_key`).
        final_checkpoint: also write one at the end (a later call then returns at once); off when
        the caller stores the result itself and deletes the checkpoint.
        on_step: called as on_step(step, model) after each optimiser step, in the writing process,
        with the model that would be returned (the EMA where there is one); e.g. sample grids. It
        may return images ({name: (C, H, W) in [0, 1]}) for the tracked run."""
        cfg = self.config
        fix_threads(cfg.threads)
        accelerator = make_accelerator(self.device, cfg.mixed_precision, cfg.grad_accum_steps)
        ddp = self.distributed and accelerator.num_processes > 1
        rank, world = (accelerator.process_index, accelerator.num_processes) if ddp else (0, 1)
        batches = self._batches(data, batch_size, accelerator.device, rank, world)
        accum = cfg.grad_accum_steps
        total_micro = (epochs * batches.steps_per_epoch) if epochs is not None else steps * accum
        wrapped, optimizer, schedule, ema = self._prepare_model(
            model, accelerator, ddp, lr, weight_decay, warmup, total_steps=max(1, total_micro // accum)
        )
        key = run_key(
            key=key,
            seed=self.seed,
            world=world,
            batch_size=batch_size,
            lr=lr,
            weight_decay=weight_decay,
            warmup=warmup,
            epochs=epochs,
            steps=steps,
            n=batches.num_samples,
            loop={k: getattr(cfg, k) for k in RESULT_SETTINGS},
        )
        run = _Run(
            accelerator,
            wrapped,
            optimizer,
            schedule,
            ema,
            torch.Generator(device=accelerator.device).manual_seed(self.seed * 1_000_003 + rank),
            early_stopping,
            ddp=ddp,
            path=Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir else None,
            key=key,
            stop_reason=f"all {epochs} epochs" if epochs is not None else f"all {steps} steps",
        )
        run.tracking = Tracking(cfg, self.name, self.hparams, active=run.writer)
        try:
            return self._loop(run, objective, batches, total_micro, epochs, validate, on_step, final_checkpoint, world)
        finally:
            run.tracking.finish()  # also after an error or an interrupt: the tracked run is closed and flushed

    def _loop(
        self, run: _Run, objective, batches, total_micro: int, epochs, validate, on_step, final_checkpoint, world
    ) -> FitResult:
        """From a resumed (or fresh) state to the result: the epochs, their ends and the finish."""
        early_stopping, accum = run.early_stopping, self.config.grad_accum_steps
        run.resume()
        resumed = run.state["micro"] // accum
        run.start = time.perf_counter()
        validate = run.timed_aside(validate) if validate is not None else None
        on_step = run.timed_aside(on_step) if on_step is not None else None
        if early_stopping is not None and early_stopping.keep_start and run.fresh() and validate is not None:
            early_stopping.on_start(run.selected(), validate(run.selected()))
        progress = _Progress(total_micro // accum, resumed, self.name, self.progress and run.writer, world)
        run.last_save = time.monotonic()
        while not run.state["done"] and run.state["micro"] < total_micro:
            epoch = self._train_epoch(run, objective, batches, total_micro, progress, on_step)
            if run.state["micro"] % batches.steps_per_epoch == 0 or run.state["micro"] >= total_micro:
                self._end_epoch(run, epoch, validate if epochs is not None else None, progress)
        return self._finish(run, progress, final_checkpoint, resumed)

    def _batches(self, data, batch_size: int, device: torch.device, rank: int, world: int) -> Batches:
        """`data` in deterministic, resumable batches: this process's share (`rank` of `world`), on `device`."""
        cfg = self.config
        return Batches(
            data,
            batch_size,
            seed=self.seed,
            rank=rank,
            world=world,
            device=device,
            num_workers=cfg.num_workers,
            device_memory_share=cfg.device_memory_share,
        )

    def _prepare_model(
        self,
        model: torch.nn.Module,
        accelerator,
        ddp: bool,
        lr: float,
        weight_decay: float,
        warmup: float,
        total_steps: int,
    ) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler, EMA | None]:
        """The model on the device, its optimiser and schedule, its EMA, and the model to train
        (DDP-wrapped across processes)."""
        cfg = self.config
        model = model.to(accelerator.device)
        if accelerator.device.type == "cuda":
            # tensor-core convolutions want NHWC (x1.4 to x1.8 measured, see device.channels_last);
            # CPU keeps its layout
            model = channels_last(model)
        optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay
        )
        if total_steps >= 4:  # one-cycle, with at least two warm-up steps (OneCycleLR divides by zero below that)
            schedule = torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=lr, total_steps=total_steps, pct_start=min(max(warmup, 2 / total_steps), 0.5)
            )
        else:  # a handful of steps: constant rate
            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        ema = make_ema(model, cfg.ema_decay, cfg.ema_sigma_rel)
        if ddp:
            wrapped, optimizer = accelerator.prepare(model, optimizer)
        else:
            # this process alone: no DDP wrapper, but the optimiser keeps accelerate's
            # gradient scaling and accumulation
            wrapped, optimizer = model, accelerator.prepare_optimizer(optimizer)
        return wrapped, optimizer, schedule, ema

    def _train_epoch(
        self,
        run: _Run,
        objective: Objective,
        batches: Batches,
        total_micro: int,
        progress: _Progress,
        on_step: Callable[[int, torch.nn.Module], None] | None,
    ) -> int:
        """The rest of the current epoch, or up to `total_micro` micro-batches; returns the epoch."""
        cfg, accelerator, state = self.config, run.accelerator, run.state
        epoch, first = divmod(state["micro"], batches.steps_per_epoch)
        run.wrapped.train()
        for batch in batches.epoch(epoch, skip=first):
            with accelerator.accumulate(run.wrapped):
                loss = train_step(
                    accelerator,
                    run.wrapped,
                    objective,
                    run.optimizer,
                    run.schedule,
                    batch,
                    run.generator,
                    epoch,
                    cfg.max_grad_norm,
                )
            state["micro"] += 1
            run.running += loss.detach().to(torch.float64)
            state["loss_count"] += 1
            progress.samples += len(next(iter(batch.values())))
            if accelerator.sync_gradients:
                self._after_step(run, loss, total_micro, progress, on_step)
            if state["micro"] >= total_micro:
                break
        return epoch

    def _after_step(
        self,
        run: _Run,
        loss: torch.Tensor,
        total_micro: int,
        progress: _Progress,
        on_step: Callable[[int, torch.nn.Module], None] | None,
    ) -> None:
        """After an optimiser step: the EMA, the progress bar, `on_step`, and a checkpoint when one is due
        (every `checkpoint_every` steps or `checkpoint_minutes`, except at the last step)."""
        cfg = self.config
        if run.ema is not None:
            run.ema.update_parameters(run.accelerator.unwrap_model(run.wrapped))
        progress.step(loss)
        step = run.state["micro"] // cfg.grad_accum_steps
        if run.tracking.active:
            run.timed_aside(run.tracking.log_step)(step, loss, run.schedule, progress.throughput())
        if on_step is not None and run.writer:
            images = on_step(step, run.selected())
            if images:
                run.timed_aside(run.tracking.log_images)(images, step)
        if step < total_micro // cfg.grad_accum_steps and (
            (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
            or time.monotonic() - run.last_save > 60 * cfg.checkpoint_minutes
        ):
            run.save_checkpoint()
            run.last_save = time.monotonic()

    def _end_epoch(
        self, run: _Run, epoch: int, validate: Callable[[torch.nn.Module], dict] | None, progress: _Progress
    ) -> None:
        """Record the epoch's mean loss; with `validate`, its metrics, and ask early stopping whether to go on."""
        state, early_stopping = run.state, run.early_stopping
        record = {"epoch": epoch, "loss": float(run.running) / max(state["loss_count"], 1)}
        state["final_loss"] = record["loss"]
        state["loss_sum"], state["loss_count"] = 0.0, 0
        run.running.zero_()
        if validate is not None:
            metrics = validate(run.selected())
            record.update({f"val_{k}": v for k, v in metrics.items()})
            if early_stopping is not None and early_stopping.on_epoch_end(epoch, run.selected(), metrics):
                state["done"] = True
                state["stop_reason"] = early_stopping.stop_reason
            progress.bar.set_postfix(
                loss=f"{record['loss']:.3f}", val=f"{early_stopping.last if early_stopping else ''}"
            )
        run.history.append(record)
        run.timed_aside(run.tracking.log)(
            {("epoch_loss" if k == "loss" else k): v for k, v in record.items()},
            state["micro"] // self.config.grad_accum_steps,
        )

    def _finish(self, run: _Run, progress: _Progress, final_checkpoint: bool, resumed: int) -> FitResult:
        """The result: the selected weights (the best epoch's with early stopping), in the standard layout."""
        progress.bar.close()
        device = run.accelerator.device
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the queued steps belong to the training time
        training_seconds = time.perf_counter() - run.start - run.aside
        if final_checkpoint:
            run.save_checkpoint()
        final = run.selected()
        if device.type == "cuda":  # back to the standard layout: saved weights must be contiguous (safetensors)
            final = final.to(memory_format=torch.contiguous_format)
        best_epoch = None
        early_stopping = run.early_stopping
        if early_stopping is not None and early_stopping.best_state is not None:
            final.load_state_dict(early_stopping.best_state)
            best_epoch = early_stopping.best_epoch
        samples = progress.samples
        throughput = samples * progress.world / training_seconds if samples else float("nan")
        return FitResult(
            final,
            run.history,
            best_epoch,
            run.state["stop_reason"],
            run.state["micro"] // self.config.grad_accum_steps,
            time.perf_counter() - run.start,
            resumed,
            run.state.get("final_loss", float("nan")),
            throughput,
        )


class _Run:
    """What the steps of one `Trainer.fit` share: the prepared model, optimiser, schedule, EMA and
    generator, the loop's state and history, and the checkpoint that saves and restores them all."""

    def __init__(
        self,
        accelerator,
        wrapped: torch.nn.Module,
        optimizer,
        schedule,
        ema: EMA | None,
        generator: torch.Generator,
        early_stopping: EarlyStopping | None,
        *,
        ddp: bool,
        path: Path | None,
        key: str,
        stop_reason: str,
    ):
        self.accelerator, self.wrapped, self.optimizer, self.schedule = accelerator, wrapped, optimizer, schedule
        self.ema, self.generator, self.early_stopping = ema, generator, early_stopping
        self.ddp, self.path, self.key = ddp, path, key
        self.writer = accelerator.is_main_process or not ddp  # who writes the checkpoint
        self.history: list[dict] = []
        self.state = {"micro": 0, "loss_sum": 0.0, "loss_count": 0, "stop_reason": stop_reason, "done": False}
        self.running: torch.Tensor | None = None
        self.start, self.aside, self.last_save = 0.0, 0.0, 0.0  # aside: seconds outside the training steps
        self.tracking: Tracking | None = None

    def resume(self) -> None:
        """Restore everything from this run's checkpoint, where there is one (another run's is ignored),
        then put the running loss on the device."""
        path, accelerator = self.path, self.accelerator
        if path is not None and path.is_file():
            checkpoint = read_torch(path, "training checkpoint", f"delete {path.parent} to train from the start")
            if isinstance(checkpoint, dict) and checkpoint.get("key") == self.key:
                accelerator.unwrap_model(self.wrapped).load_state_dict(checkpoint["model"])
                self.optimizer.load_state_dict(checkpoint["optimizer"])
                self.schedule.load_state_dict(checkpoint["schedule"])
                if self.ema is not None:
                    self.ema.load_state_dict(checkpoint["ema"])
                if accelerator.scaler is not None and checkpoint.get("scaler"):
                    accelerator.scaler.load_state_dict(checkpoint["scaler"])
                self.generator.set_state(checkpoint["generator"].to(self.generator.get_state().device))
                torch.set_rng_state(checkpoint["torch_rng"])
                if torch.cuda.is_available() and checkpoint.get("cuda_rng") is not None:
                    torch.cuda.set_rng_state_all(checkpoint["cuda_rng"])
                if self.early_stopping is not None:
                    self.early_stopping.load_state_dict(checkpoint["early_stopping"])
                self.history, self.state = checkpoint["history"], checkpoint["state"]
        # The running loss stays on the device (no host synchronisation per step); it is read at
        # checkpoints and epoch ends, and restored exactly, so a resumed run sums the same numbers.
        self.running = torch.tensor(self.state["loss_sum"], dtype=torch.float64, device=accelerator.device)

    def fresh(self) -> bool:
        """Nothing trained yet (not resumed from a checkpoint)."""
        return self.state["micro"] == 0 and not self.history

    def selected(self) -> torch.nn.Module:
        """The model the fit returns: the EMA where there is one."""
        return self.ema.module if self.ema is not None else self.accelerator.unwrap_model(self.wrapped)

    def timed_aside(self, function):
        """`function`, its time counted outside the training steps (validation, checkpoints, callbacks)."""

        def call(*args):
            t0 = time.perf_counter()
            try:
                return function(*args)
            finally:
                self.aside += time.perf_counter() - t0

        return call

    def save_checkpoint(self) -> None:
        self.timed_aside(self._save_checkpoint)()

    def _save_checkpoint(self) -> None:
        if self.path is None:
            return
        accelerator, ema, early_stopping = self.accelerator, self.ema, self.early_stopping
        self.state["loss_sum"] = float(self.running)
        if self.writer:
            checkpoint = {
                "key": self.key,
                "model": cpu_state(accelerator.unwrap_model(self.wrapped).state_dict()),
                "optimizer": self.optimizer.state_dict(),
                "schedule": self.schedule.state_dict(),
                "ema": ema.state_dict() if ema is not None else None,
                "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                "generator": self.generator.get_state().cpu(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "early_stopping": early_stopping.state_dict() if early_stopping is not None else None,
                "history": self.history,
                "state": dict(self.state),
            }
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, lambda tmp: torch.save(checkpoint, tmp))
        if self.ddp:
            self.accelerator.wait_for_everyone()


class _Progress:
    """The progress bar of a fit, with the loss and the throughput (`samples` counts this process's)."""

    def __init__(self, total: int, initial: int, name: str, show: bool, world: int):
        self.bar = tqdm(total=total, initial=initial, desc=name, unit="step", disable=not show, leave=False)
        self.world, self.samples, self.started, self.shown = world, 0, time.perf_counter(), 0.0

    def throughput(self) -> float:
        """Samples per second so far, over every process."""
        return self.samples * self.world / max(time.perf_counter() - self.started, 1e-9)

    def step(self, loss: torch.Tensor) -> None:
        self.bar.update(1)
        # reading the loss waits for the device: once a second
        if not self.bar.disable and time.perf_counter() - self.shown > 1.0:
            self.shown = time.perf_counter()
            self.bar.set_postfix(
                loss=f"{float(loss):.4f}",
                samples_per_s=f"{self.samples * self.world / max(self.shown - self.started, 1e-9):.0f}",
            )


def train_step(
    accelerator,
    model,
    objective: Objective,
    optimizer,
    schedule,
    batch: dict,
    generator: torch.Generator,
    epoch: int = 0,
    max_grad_norm: float = 0.0,
) -> torch.Tensor:
    """One (micro-)batch: forward under autocast, backward (scaled for fp16), clip, step, zero.
    Inside `accelerator.accumulate`, the optimiser steps every `grad_accum_steps` batches."""
    with accelerator.autocast():
        loss = objective(model, batch, generator, epoch)
    accelerator.backward(loss)
    if accelerator.sync_gradients and max_grad_norm > 0:
        accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    if accelerator.sync_gradients and schedule is not None:
        schedule.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def ema_gamma(sigma_rel: float) -> float:
    """The power-function exponent gamma whose EMA profile has relative std `sigma_rel`:
    sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))  (EDM2, Karras et al. 2024, Sec. 3.1),
    solved as the largest real root of gamma^3 + 7 gamma^2 + (16 - t) gamma + (12 - t), t = sigma_rel^-2."""
    import numpy as np

    t = sigma_rel**-2
    return float(np.roots([1, 7, 16 - t, 12 - t]).real.max())


def make_ema(model: torch.nn.Module, decay: float, sigma_rel: float = 0.0) -> EMA | None:
    """An EMA of the weights (buffers included), or None when both are 0.

    - fixed `decay`, warmed up as min(decay, (1 + n) / (10 + n)) after n updates, as in diffusers'
      EMAModel, so that a short run is not stuck near its initial weights;
    - `sigma_rel`: EDM2's power-function profile, decay (1 - 1/t)^(gamma + 1) at update t, which
      averages over a fixed share of the run whatever its length (EDM2, Sec. 3.1)."""
    if not decay and not sigma_rel:
        return None
    if sigma_rel:
        gamma = ema_gamma(sigma_rel)
        return EMA(model, lambda n: (n / (n + 1.0)) ** (gamma + 1.0))  # this is update t = n + 1
    return EMA(model, lambda n: min(decay, (1.0 + n) / (10.0 + n)))


class EMA(AveragedModel):
    """torch's `AveragedModel` (same state dict: `module.*` and `n_averaged`, so checkpoints resume),
    averaged_t = beta(n) averaged + (1 - beta(n)) current after n updates, the first a copy.

    The update never waits for the device: the count `n_averaged` stays on the host, where
    `AveragedModel.update_parameters` copies it to the device with a blocking copy at every step,
    which drains a GPU's queue once per optimiser step."""

    def __init__(self, model: torch.nn.Module, beta: Callable[[int], float]):
        super().__init__(model, use_buffers=True)  # n_averaged is created on the host
        self.beta = beta

    @torch.no_grad()
    def update_parameters(self, model: torch.nn.Module) -> None:
        n = int(self.n_averaged)
        averaged = [*self.module.parameters(), *self.module.buffers()]
        current = [*model.parameters(), *model.buffers()]
        floating = [(a, c) for a, c in zip(averaged, current, strict=True) if a.is_floating_point()]
        if floating:
            targets, sources = [a for a, _ in floating], [c for _, c in floating]
            if n == 0:
                torch._foreach_copy_(targets, sources)
            else:
                torch._foreach_lerp_(targets, sources, 1.0 - self.beta(n))
        for a, c in zip(averaged, current, strict=False):
            if not a.is_floating_point():
                a.copy_(c)  # counters (BatchNorm's num_batches_tracked)
        self.n_averaged += 1
