"""Sampling from a class-conditional denoiser: EDM's Heun sampler (Karras et al. 2022,
Algorithm 2) and diffusers' schedulers (EDM Euler, EDM DPM-Solver++, DDIM), with classifier-free
and classifier guidance, batched over samples and classes. Every sampler calls the same guided
D(x; sigma, y), so each works for EDM and VP (eps, v) denoisers alike.

Classifier-free guidance (Ho & Salimans 2022): D_w = D(x; sigma, null) + w (D(x; sigma, y) -
D(x; sigma, null)); w = 1 is the conditional model, w = 0 the unconditional one. Both branches run in
one batched forward pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..device import to_device
from .noise import VP_SCHEDULE, karras_sigmas, per_sample, precond


def guided_denoise(
    denoiser: torch.nn.Module,
    x: torch.Tensor,
    sigma: torch.Tensor | float,
    labels: torch.Tensor,
    cfg: float = 1.0,
    guidance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    guidance_scale: float = 0.0,
) -> torch.Tensor:
    """D_w(x; sigma, y); one forward pass of 2B inputs when guidance mixes in the null class.

    Classifier guidance: `guidance(x, sigma)` is grad_x log p(y | x; sigma). Since the score is
    (D - x) / sigma^2 (EDM Eq. 3), adding s * grad log p(y | x) to the score adds
    s * sigma^2 * grad log p(y | x) to D (Dhariwal & Nichol 2021, Eq. 10 with scale s)."""
    if cfg == 1.0:
        denoised = denoiser(x, sigma, labels)
    else:
        labels = denoiser.conditioning(labels)
        null = denoiser.null_labels(labels)
        both = per_sample(sigma, x)
        both = torch.cat([both, both])  # per-sample sigmas for both halves
        conditional, unconditional = denoiser(torch.cat([x, x]), both, torch.cat([labels, null])).chunk(2)
        denoised = unconditional + cfg * (conditional - unconditional)
    if guidance is not None and guidance_scale:
        sigma = per_sample(sigma, x, x.dtype)
        with torch.enable_grad():
            grad = guidance(x, sigma)
        denoised = denoised + guidance_scale * sigma.view(-1, 1, 1, 1) ** 2 * grad
    return denoised


@torch.no_grad()
def sample(
    denoiser: torch.nn.Module,
    labels: torch.Tensor,
    steps: int = 32,
    cfg: float = 1.0,
    generator: torch.Generator | None = None,
    sigma_max: float | None = None,
    sigma_min: float | None = None,
    churn: float = 0.0,
    x_start: torch.Tensor | None = None,
    guidance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    guidance_scale: float = 0.0,
    sampler: str = "heun",
    seeds: list[int] | None = None,
    drift: float | torch.Tensor = 0.0,
    noise_mean: float = 0.0,
) -> torch.Tensor:
    """Latents for `labels` (one per sample), by EDM Algorithm 2 over the Karras schedule (Eq. 5),
    or by a diffusers scheduler (`sampler`). `x_start` (a latent already noised to `sigma_max`)
    starts from a given noise level instead of pure noise; `churn` > 0 adds EDM's stochasticity
    (S_churn); `guidance` and `guidance_scale` add classifier guidance (see `guided_denoise`).
    The noise range defaults to the one the denoiser was trained for (`sigma_range`). With `seeds`
    (one per sample) each sample's noise comes from its own generator: a sample is the same
    whatever batch it is drawn in (so an interrupted run can resume where it stopped).
    `drift` (a scalar or one value per latent channel): Latent Drift at inference, see `drift_shift`.
    `noise_mean`: the mean of the forward noise the denoiser was trained with (`diffusion train
    --drift`): sampling starts from x_T = sigma_max (eps + noise_mean) and then needs no shift, since
    a denoiser trained on x + sigma (eps + delta) makes the plain ODE carry the drifted marginals
    N(sigma delta, sigma^2 + sigma_data^2) down to the data (tested on the exact Gaussian denoiser)."""
    device = next(denoiser.parameters()).device
    shape = (len(labels), denoiser.latent_channels, denoiser.latent_size, denoiser.latent_size)
    labels = labels.to(device)
    low, high = getattr(denoiser, "sigma_range", (0.002, 80.0))
    sigma_min, sigma_max = sigma_min or low, sigma_max or high
    if seeds is not None:
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

        def noise():
            return to_device(torch.stack([torch.randn(shape[1:], generator=g) for g in generators]), device)

    else:

        def noise():
            return to_device(
                torch.randn(shape, generator=generator, device=generator.device if generator is not None else "cpu"),
                device,
            )

    drift = drift.to(device) if isinstance(drift, torch.Tensor) else drift  # copied once, not at every step
    if sampler != "heun":
        if x_start is not None or churn:
            raise ValueError("x_start and churn are for the heun sampler")
        denoise = lambda x, sigma: guided_denoise(denoiser, x, sigma, labels, cfg, guidance, guidance_scale)  # noqa: E731
        return _with_scheduler(
            sampler, denoise, noise, steps, sigma_min, sigma_max, denoiser.sigma_data, device, drift, noise_mean
        )
    t = torch.cat([karras_sigmas(steps, sigma_min, sigma_max).to(device), torch.zeros(1, device=device)])  # t_N = 0
    x = x_start.to(device) if x_start is not None else (noise() + noise_mean) * t[0] + drift_shift(drift, t[0], device)
    for i in range(steps):
        t_cur, t_next = t[i], t[i + 1]
        gamma = min(churn / steps, 2**0.5 - 1) if churn > 0 else 0.0
        t_hat = t_cur * (1 + gamma)
        if gamma > 0:  # Algorithm 2, lines 4-6: raise the noise level to t_hat
            x = x + (t_hat**2 - t_cur**2).sqrt() * noise()
        d = (
            x - guided_denoise(denoiser, x, t_hat, labels, cfg, guidance, guidance_scale)
        ) / t_hat  # Eq. 3's ODE direction
        x_next = x + (t_next - t_hat) * d  # Euler step
        if i + 1 < steps:
            # t_next > 0, asked of the step count, not the GPU: Heun's second-order correction
            # (Algorithm 2, lines 9-11)
            d_next = (
                x_next - guided_denoise(denoiser, x_next, t_next, labels, cfg, guidance, guidance_scale)
            ) / t_next
            x_next = x + (t_next - t_hat) * (d + d_next) / 2
        x = x_next + drift_shift(drift, t_next, device)
    return x


@torch.no_grad()
def invert(
    denoiser: torch.nn.Module,
    x0: torch.Tensor,
    labels: torch.Tensor,
    sigma_max: float,
    steps: int = 32,
    cfg: float = 1.0,
    sigma_min: float | None = None,
) -> torch.Tensor:
    """The probability-flow ODE, dx/dsigma = (x - D(x; sigma)) / sigma (EDM Eq. 3 with sigma(t) = t),
    solved upwards from the clean latent x0 (taken as x at sigma_min) to sigma_max with Heun's method
    on the reverse of `sample`'s Karras grid: the EDM form of DDIM inversion (DDIM is the Euler
    solver of this ODE, EDM Sec. 3). `sample(..., sigma_max=sigma_max, x_start=invert(...))` with the
    same labels, cfg and steps returns x0 up to the solver's error."""
    device = next(denoiser.parameters()).device
    labels = labels.to(device)
    sigma_min = sigma_min or getattr(denoiser, "sigma_range", (0.002, 80.0))[0]
    t = karras_sigmas(steps, sigma_min, sigma_max).to(device).flip(0)  # ascending: sigma_min .. sigma_max
    x = x0.to(device)
    for i in range(steps - 1):
        t_cur, t_next = t[i], t[i + 1]
        d = (x - guided_denoise(denoiser, x, t_cur, labels, cfg)) / t_cur
        x_next = x + (t_next - t_cur) * d
        d_next = (x_next - guided_denoise(denoiser, x_next, t_next, labels, cfg)) / t_next
        x = x + (t_next - t_cur) * (d + d_next) / 2
    return x


def drift_shift(drift: float | torch.Tensor, sigma: torch.Tensor | float, device) -> torch.Tensor | float:
    """Latent Drift (Yeganeh et al., CVPR 2025, Eq. 4) in EDM's variables. The paper shifts the
    mean of every reverse step of the DDPM chain, z_{t-1} ~ N(mu_theta(z_t, t) + delta, Sigma), and
    the mean of the initial noise, z_T ~ N(delta, I). EDM's x is the VP latent divided by its scale,
    x = z_t / s(t) with s = sqrt(abar) = 1 / sqrt(1 + sigma^2) (EDM Table 1, VP column), so the
    same shift of z at noise level sigma moves x by delta * sqrt(1 + sigma^2); at sigma = 0 by
    delta itself. delta: a scalar or one value per latent channel; 0 leaves the sampler exact."""
    if not isinstance(drift, torch.Tensor) and drift == 0:
        return 0.0
    # Numbers stay numbers and tensors stay where they are: a number copied to the GPU at every
    # step would make each step wait for the device.
    delta = drift.to(device=device, dtype=torch.float32) if isinstance(drift, torch.Tensor) else float(drift)
    delta = delta.view(1, -1, 1, 1) if isinstance(delta, torch.Tensor) and delta.ndim == 1 else delta
    return delta * ((1 + sigma**2).sqrt() if isinstance(sigma, torch.Tensor) else math.sqrt(1 + sigma**2))


def _with_scheduler(
    name: str,
    denoise,
    noise,
    steps: int,
    sigma_min: float,
    sigma_max: float,
    sigma_data: float,
    device,
    drift: float | torch.Tensor = 0.0,
    noise_mean: float = 0.0,
) -> torch.Tensor:
    """A diffusers scheduler's loop around D(x; sigma).

    EDM schedulers (euler, dpm) step in x = x_0 + sigma n and precondition the network output
    F themselves (D = c_skip x + c_out F): F is recovered from D as (D - c_skip x) / c_out.
    DDIM steps in VP space, x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) n, with the x_0 prediction
    ("sample") being D(x_t / sqrt(abar_t); sigma_t) (EDM Table 1, VP column)."""
    from diffusers import DDIMScheduler, EDMDPMSolverMultistepScheduler, EDMEulerScheduler

    if name == "ddim":
        scheduler = DDIMScheduler(
            **VP_SCHEDULE, prediction_type="sample", clip_sample=False, timestep_spacing="trailing"
        )
        scheduler.set_timesteps(steps)
        abar = scheduler.alphas_cumprod.to(device)
        x = (
            noise() + noise_mean + drift_shift(drift, 0.0, device)
        )  # VP: unit variance at t = T; drift: z_T ~ N(delta, I)
        for t in scheduler.timesteps:
            a_t = abar[int(t)]  # indexed by a number from the host's schedule: a view, no copy to wait for
            sigma = ((1 - a_t) / a_t).sqrt()
            x = scheduler.step(denoise(x / a_t.sqrt(), sigma), t, x, eta=0.0).prev_sample + drift_shift(
                drift, 0.0, device
            )  # Eq. 4 in the VP chain itself
        return x
    kind = {"euler": EDMEulerScheduler, "dpm": EDMDPMSolverMultistepScheduler}[name]
    scheduler = kind(sigma_min=sigma_min, sigma_max=sigma_max, sigma_data=sigma_data)
    scheduler.set_timesteps(steps, device=device)
    sigmas = scheduler.sigmas.to(
        device
    )  # one copy: the scheduler keeps its own on the host, and copying one per step waits for the GPU
    x = (noise() + noise_mean) * sigmas[0] + drift_shift(drift, sigmas[0], device)
    for i, t in enumerate(scheduler.timesteps):
        sigma = sigmas[i]
        scheduler.scale_model_input(x, t)  # the scheduler's bookkeeping; the input scaling is D's own
        c = precond(sigma, sigma_data)
        x = scheduler.step((denoise(x, sigma) - c.c_skip * x) / c.c_out, t, x).prev_sample + drift_shift(
            drift, sigmas[i + 1], device
        )
    return x
