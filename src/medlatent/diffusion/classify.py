"""A class-conditional denoiser as a classifier (Li et al. 2023; Favero et al., MIDL 2025).

Each draw j is a noise level sigma_j (from the training distribution: ln sigma ~ N(P_mean,
P_std^2)) and a noise eps_j, shared by every class; each class's error is the weighted denoising
error of the same noised latent,

    e_jk = lambda(sigma_j) || D(x + sigma_j eps_j; sigma_j, k) - x ||^2 / n
           (EDM Eq. 2's weight; 1 / sigma^2 for VP models, the eps error)

(a model trained with Latent Drift, on x + sigma (eps + delta), is noised the same way: `drift`),

all classes of a draw in one batched forward pass. Decisions: the lowest mean error (Li et al.)
or a majority vote, one vote per draw for the class of lowest error (Favero et al.). The vote can
stop early for an image: "decided", once its leader cannot be overtaken by the draws left (it
returns the full vote's class); or "sequential", once a one-sided binomial test of the leader's
votes against the runner-up's (a fair coin between them) rejects at level alpha, after a minimum
number of draws (it decides at about that error rate); or "paired", once a one-sided t-test of
the per-draw normalised error differences (`pair_terms`) decides for the lowest-error class.
`max_draws` caps the sequential stops (`default_budget`). `classify_pruned` prunes classes in
stages (Li et al.). Scores: a softmax of the negative mean errors with a temperature cross-fitted
on the held-out images (`classify_held_out`, which can also choose the noise levels), and the
vote shares, ties broken by the paired evidence (`vote_probabilities`).
"""

from __future__ import annotations

import numpy as np
import torch

from ..device import autocast, to_device


def loss_weight(denoiser: torch.nn.Module, sigma: torch.Tensor) -> torch.Tensor:
    """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 (EDM), or 1 / sigma^2 (VP: the eps error)."""
    if getattr(denoiser, "parameterisation", "edm") == "edm":
        sd = denoiser.sigma_data
        return (sigma**2 + sd**2) / (sigma * sd) ** 2
    return 1 / sigma**2


@torch.no_grad()
def draw_errors(
    denoiser: torch.nn.Module,
    x: torch.Tensor,
    generators: list[torch.Generator],
    p_mean: float | torch.Tensor = -1.2,
    p_std: float | torch.Tensor = 1.2,
    classes: torch.Tensor | None = None,
    drift: float = 0.0,
) -> torch.Tensor:
    """One draw for a batch of clean (normalised) latents: (B, K') errors of the classes in
    `classes` (B, K'), by default all K. Image i's (sigma, eps) comes from generators[i]; every
    class denoises that same noised latent, the K' classes of all images as one batch of K' * B.
    ln sigma ~ N(p_mean, p_std^2), each a number or one per image. drift: the mean of the noise the
    model was trained with (Latent Drift), x + sigma (eps + drift)."""
    b = len(x)
    classes = torch.arange(denoiser.num_classes).expand(b, -1) if classes is None else classes
    k = classes.shape[1]
    noise = draw_noise(generators, x.shape[1:], p_mean, p_std)
    sigma, eps = (to_device(v, x.device) for v in noise)
    noised = (x + sigma.view(-1, 1, 1, 1) * (eps + drift)).repeat(k, 1, 1, 1)
    labels = to_device(classes.T.reshape(-1), x.device)  # class column c of every image, then column c + 1
    with autocast(x.device):
        denoised = denoiser(noised, sigma.repeat(k), labels).float()
    error = ((denoised - x.float().repeat(k, 1, 1, 1)) ** 2).flatten(1).mean(1) * loss_weight(denoiser, sigma).repeat(
        k
    )
    return error.view(k, b).T


def draw_noise(
    generators: list[torch.Generator],
    shape: torch.Size,
    p_mean: float | torch.Tensor = -1.2,
    p_std: float | torch.Tensor = 1.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's next draw on the host, (B,) sigma and (B, *shape) eps: from generators[i], first
    ln sigma ~ N(p_mean_i, p_std_i^2), then eps ~ N(0, I). One generator per image, on the CPU,
    makes a draw the same whatever the batch, the device or when other images stopped; its cost
    grows with the latent's size (about 7-11 ns per value on one core here), so on a fast GPU it
    can rival the forward pass (`medlatent bench diffusion` reports its share; `classify` draws it
    while the device computes the previous draw)."""
    n = len(generators)
    p_mean, p_std = per_image(p_mean, n), per_image(p_std, n)
    sigma = torch.stack(
        [(torch.randn(1, generator=g)[0] * p_std[i] + p_mean[i]).exp() for i, g in enumerate(generators)]
    )
    return sigma, torch.stack([torch.randn(shape, generator=g) for g in generators])


def per_image(value: float | np.ndarray | torch.Tensor, n: int) -> torch.Tensor:
    """(n,) float32: a number repeated, or one value per image."""
    value = torch.as_tensor(value, dtype=torch.float32)
    return value.expand(n) if value.ndim == 0 else value


STOP_RULES = ("none", "decided", "sequential", "paired")
ALPHA, MIN_DRAWS = 0.01, 5  # the sequential tests' default level and the draws before they may stop an image


def default_budget(draws: int, min_draws: int) -> int:
    """The sequential stops' default `max_draws`: a fifth of the draws (at least `min_draws`). The
    uncapped tests spend most of their evaluations on the few images whose classes stay close,
    where further draws barely change the score: on BreastMNIST the paired test at alpha 0.05
    needs 21% of the full vote's evaluations, 4% of its images all 51 draws. A fifth, the budget
    the issue set, caps that tail; images reaching it take their current leader."""
    return min(draws, max(min_draws, draws // 5))


def should_stop(
    votes: torch.Tensor,
    draws_left: int,
    rule: str,
    alpha: float = ALPHA,
    min_draws: int = MIN_DRAWS,
    pairs: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_draws: int | None = None,
) -> torch.Tensor:
    """(B,) whether each image stops drawing under `rule`; "paired" needs `pairs` (see `pair_terms`).
    `max_draws` truncates the sequential rules: an image still undecided after that many draws
    takes its current leader (a budget on the evaluations)."""
    if rule == "none":
        return torch.zeros(len(votes), dtype=torch.bool)
    if rule == "decided":
        return decided(votes, draws_left)
    count = votes.sum(1)
    budget = count >= max_draws if max_draws else torch.zeros(len(votes), dtype=torch.bool)
    if rule == "paired":
        return budget | ((count >= min_draws) & paired_test(*pairs, count, alpha))
    from scipy.stats import binom

    top = votes.topk(min(2, votes.shape[1]), dim=1).values
    lead, second = top[:, 0], (top[:, 1] if top.shape[1] > 1 else torch.zeros_like(top[:, 0]))
    p_value = torch.from_numpy(
        binom.sf(lead.numpy() - 1, (lead + second).numpy(), 0.5)
    )  # P(X >= lead) for a fair coin between the two
    return budget | decided(votes, draws_left) | ((count >= min_draws) & (p_value < alpha))


def pair_terms(errors: torch.Tensor) -> torch.Tensor:
    """(B, K, K) per-draw evidence r[a, c] = (e_c - e_a) / (e_c + e_a) in [-1, 1] that class a
    denoises better than class c: the paired difference of one draw's errors (same sigma, same
    eps), divided by their sum so that draws at small sigma, whose weighted errors are large and
    heavy-tailed, do not dominate."""
    e_a, e_c = errors.unsqueeze(2), errors.unsqueeze(1)
    return (e_c - e_a) / (e_c + e_a).clamp_min(1e-12)


def paired_test(pair_sum: torch.Tensor, pair_sq: torch.Tensor, count: torch.Tensor, alpha: float) -> torch.Tensor:
    """(B,) whether the class with the largest mean evidence beats every other class in a one-sided
    t-test of the mean of r at level alpha / (K - 1) (Bonferroni over the K - 1 comparisons)."""
    from scipy.stats import t as student

    n, k = count.double().clamp_min(2), pair_sum.shape[1]
    mean = pair_sum / n.view(-1, 1, 1)
    var = ((pair_sq - n.view(-1, 1, 1) * mean**2) / (n.view(-1, 1, 1) - 1)).clamp_min(0)
    leader = mean.sum(2).argmax(1)
    rows = torch.arange(len(leader))
    m, v = mean[rows, leader], var[rows, leader]  # (B, K): the leader against each class
    t_stat = m / (v / n.view(-1, 1)).sqrt().clamp_min(1e-12)
    critical = torch.from_numpy(student.ppf(1 - alpha / max(k - 1, 1), (n - 1).numpy()))
    others = torch.ones_like(m, dtype=torch.bool)
    others[rows, leader] = False
    return ((t_stat > critical.view(-1, 1)) | ~others).all(1)


def decided(votes: torch.Tensor, draws_left: int) -> torch.Tensor:
    """(B,) whether each image's vote is decided: its leader is ahead of the runner-up by more than
    the draws left (ties go to the lower class index, as argmax does, so 'more than' is safe)."""
    top = votes.topk(min(2, votes.shape[1]), dim=1).values
    lead = top[:, 0] - (top[:, 1] if top.shape[1] > 1 else 0)
    return lead > draws_left


@torch.no_grad()
def classify(
    denoiser: torch.nn.Module,
    x: torch.Tensor,
    draws: int = 51,
    stop: str = "decided",
    seed: int = 0,
    batch_size: int = 256,
    p_mean: float | np.ndarray = -1.2,
    p_std: float | np.ndarray = 1.2,
    alpha: float = ALPHA,
    min_draws: int = MIN_DRAWS,
    max_draws: int | None = None,
    drift: float = 0.0,
) -> dict:
    """Per image: mean errors over the draws it used (B, K), vote counts (B, K), draws used (B,)
    and, with `stop="none"`, every draw's errors (B, draws, K). Otherwise an image stops drawing
    once `should_stop` says so. Image i's draws come from its own seed (seed, i), so its errors
    do not depend on the batch or on when the others stopped: an early-stopped run's draws are the
    first draws of the full run (see `replay_early_stop`)."""
    device = next(denoiser.parameters()).device
    n, k = len(x), denoiser.num_classes
    p_mean, p_std = per_image(p_mean, n), per_image(p_std, n)
    sums, votes, used = torch.zeros(n, k, dtype=torch.float64), torch.zeros(n, k), torch.zeros(n, dtype=torch.long)
    every = torch.zeros(n, draws, k, dtype=torch.float64) if stop == "none" else None
    for start in range(0, n, batch_size):
        idx = torch.arange(start, min(start + batch_size, n))
        generators = [torch.Generator().manual_seed(seed * 1_000_003 + int(i)) for i in idx]
        x_batch = x[idx].to(device)
        if stop == "none":
            errors = _every_draw(denoiser, x_batch, generators, p_mean[idx], p_std[idx], draws, drift)  # (b, draws, K)
            every[idx], sums[idx], used[idx] = errors, errors.sum(1), draws
            votes[idx] = torch.nn.functional.one_hot(errors.argmin(2), k).sum(1).to(votes.dtype)
        else:
            sums[idx], votes[idx], used[idx] = _draws_until_stopped(
                denoiser, x_batch, generators, p_mean[idx], p_std[idx], draws, stop, alpha, min_draws, max_draws, drift
            )
    result = {
        "mean_errors": (sums / used.clamp_min(1).unsqueeze(1)).numpy(),
        "votes": votes.numpy(),
        "draws_used": used.numpy(),
        "evaluations_per_image": float(used.float().mean() * k),
    }
    if every is not None:
        result["draw_errors"] = every.numpy()
    return result


def _every_draw(
    denoiser: torch.nn.Module,
    x: torch.Tensor,
    generators: list[torch.Generator],
    p_mean: torch.Tensor,
    p_std: torch.Tensor,
    draws: int,
    drift: float,
) -> torch.Tensor:
    """(b, draws, K) errors of all `draws` draws of a batch, on the host, as float64."""
    # nothing to decide between draws: the errors stay on the device until the last, so the host draws the
    # next noise while the device computes
    return (
        torch.stack([draw_errors(denoiser, x, generators, p_mean, p_std, drift=drift) for _ in range(draws)], 1)
        .double()
        .cpu()
    )


def _draws_until_stopped(
    denoiser: torch.nn.Module,
    x: torch.Tensor,
    generators: list[torch.Generator],
    p_mean: torch.Tensor,
    p_std: torch.Tensor,
    draws: int,
    stop: str,
    alpha: float,
    min_draws: int,
    max_draws: int | None,
    drift: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch's error sums (b, K), vote counts (b, K) and draws used (b,), each image drawing until
    `should_stop` stops it or the draws run out."""
    b, k = len(x), denoiser.num_classes
    sums, votes, used = torch.zeros(b, k, dtype=torch.float64), torch.zeros(b, k), torch.zeros(b, dtype=torch.long)
    pair_sum, pair_sq = torch.zeros(b, k, k, dtype=torch.float64), torch.zeros(b, k, k, dtype=torch.float64)
    active = torch.ones(b, dtype=torch.bool)
    for j in range(draws):
        rows = active.nonzero().flatten()
        if not len(rows):
            break
        # the host decides which images draw again: each draw's errors come back to it
        errors = (
            draw_errors(denoiser, x[rows], [generators[r] for r in rows], p_mean[rows], p_std[rows], drift=drift)
            .double()
            .cpu()
        )
        sums[rows] += errors
        votes[rows, errors.argmin(1)] += 1
        used[rows] += 1
        r = pair_terms(errors)
        pair_sum[rows] += r
        pair_sq[rows] += r * r
        active[rows] = ~should_stop(
            votes[rows], draws - j - 1, stop, alpha, min_draws, (pair_sum[rows], pair_sq[rows]), max_draws
        )
    return sums, votes, used


def replay_early_stop(
    draw_errors: np.ndarray,
    rule: str = "decided",
    alpha: float = ALPHA,
    min_draws: int = MIN_DRAWS,
    max_draws: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`classify(stop=rule)` replayed from a full run's per-draw errors (B, J, K): vote counts when
    each image stopped, the draws it used, and its mean errors over those draws."""
    n, draws, k = draw_errors.shape
    errors_all = torch.from_numpy(draw_errors)
    votes, used = torch.zeros(n, k), torch.full((n,), draws, dtype=torch.long)
    pair_sum, pair_sq = torch.zeros(n, k, k, dtype=torch.float64), torch.zeros(n, k, k, dtype=torch.float64)
    active = torch.ones(n, dtype=torch.bool)
    winners = errors_all.argmin(2)
    for j in range(draws):
        rows = active.nonzero().flatten()
        if not len(rows):
            break
        votes[rows, winners[rows, j]] += 1
        r = pair_terms(errors_all[rows, j])
        pair_sum[rows] += r
        pair_sq[rows] += r * r
        stop = should_stop(
            votes[rows], draws - j - 1, rule, alpha, min_draws, (pair_sum[rows], pair_sq[rows]), max_draws
        )
        used[rows[stop]] = j + 1
        active[rows[stop]] = False
    seen = torch.arange(draws).view(1, -1, 1) < used.view(-1, 1, 1)
    mean_errors = (errors_all * seen).sum(1) / used.view(-1, 1)
    return votes.numpy(), used.numpy(), mean_errors.numpy()


def vote_probabilities(votes: np.ndarray, used: np.ndarray, draw_errors: np.ndarray) -> np.ndarray:
    """(B, K) vote shares votes / used, ties broken by each class's mean paired evidence over the
    draws the image used (`mean_evidence`). A few draws give few distinct shares (3 of 3, 2 of 3,
    ...), so many images would tie; the evidence orders them without reordering distinct shares: it
    is scaled to move a share by at most 1 / (4 n^2), n the most draws used, and two distinct
    shares differ by at least 1 / n^2."""
    k = draw_errors.shape[2]
    scale = 1 / (4 * max(k - 1, 1) * float(used.max()) ** 2)
    p = np.clip(votes / used[:, None] + scale * (k - 1) * mean_evidence(draw_errors, used), 0, None)
    return p / p.sum(1, keepdims=True)


def mean_evidence(draw_errors: np.ndarray, used: np.ndarray) -> np.ndarray:
    """(B, K) each class a's paired evidence against the others, averaged over the draws each image
    used: s_a = mean_j sum_{c != a} r_j[a, c] / (K - 1) (`pair_terms`), in [-1, 1], summing to 0
    over the classes."""
    n, draws, k = draw_errors.shape
    errors, used_t = torch.from_numpy(draw_errors), torch.from_numpy(used)
    total = torch.zeros(n, k, dtype=torch.float64)
    for j in range(int(used.max())):  # a draw at a time: (n, K, K) terms, not (n, draws, K, K)
        total += pair_terms(errors[:, j]).sum(2) * (j < used_t).view(-1, 1)
    return (total / used_t.view(-1, 1) / max(k - 1, 1)).numpy()


def evidence_probabilities(draw_errors: np.ndarray, used: np.ndarray) -> np.ndarray:
    """(B, K) (1 + s_a) / K from each class's mean evidence s_a (`mean_evidence`): probabilities
    without a temperature, so that images scored from different numbers of draws, noise levels or
    folds rank on one scale."""
    return (1 + mean_evidence(draw_errors, used)) / draw_errors.shape[2]


def fit_temperature(mean_errors: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """The temperature T of softmax(-errors / T) with the lowest negative log-likelihood on held-out
    images (a log-spaced grid; errors are scaled by their median first, so the grid fits any model),
    and that negative log-likelihood."""
    scale = float(np.median(np.abs(mean_errors))) or 1.0
    best, best_nll = 1.0, np.inf
    for t in np.logspace(-3, 2, 61):
        p = error_probabilities(mean_errors, t * scale)
        nll = -np.log(p[np.arange(len(labels)), labels] + 1e-12).mean()
        if nll < best_nll:
            best, best_nll = t * scale, nll
    return float(best), float(best_nll)


# The noise-level distributions --sigma auto chooses from (ln sigma ~ N(mean, 0.6^2)), besides the
# model's training distribution: from fine detail (small sigma) to global shape (large sigma).
SIGMA_CANDIDATES = ((-1.2, 0.6), (-0.6, 0.6), (0.0, 0.6), (0.6, 0.6), (1.2, 0.6), (1.8, 0.6))
# The distributions an early stop chosen for a tolerance may draw at (`stopping`), each drawn
# `STOP_CANDIDATE_DRAWS` times on the held-out images: wider than SIGMA_CANDIDATES, down to the
# finest detail, where a small faint finding shows and nowhere else.
STOP_SIGMA_CANDIDATES = tuple((m, 0.6) for m in (-3.0, -2.4, -1.8, -1.2, -0.6, 0.0, 0.6, 1.2, 1.8, 2.4))
STOP_CANDIDATE_DRAWS = 15


def cross_fit(
    candidate_errors: list[np.ndarray], labels: np.ndarray, seed: int = 0, folds: int = 5
) -> tuple[np.ndarray, np.ndarray]:
    """Per image, a candidate (each candidate's (B, K) mean errors) and a temperature chosen on the
    other folds of the same held-out images only: the candidate whose softmax, at its best
    temperature there, has the lowest negative log-likelihood. No image calibrates its own score,
    and nothing is fitted on images the model learnt from (it memorises them: on its validation
    images it classifies almost perfectly, so a temperature fitted there is over-confident).
    Each fit sees (folds - 1) / folds of the images, so the folds' temperatures barely differ and
    pooling their scores barely reorders them. Fewer folds below two images per fold; below four
    images, everything is fitted on all of them."""
    n = len(labels)
    folds = min(folds, n // 2)
    fold = np.random.default_rng(seed).permutation(n) % folds if folds >= 2 else np.zeros(n, dtype=int)
    choice, temperature = np.zeros(n, dtype=int), np.ones(n)
    for f in np.unique(fold):
        fit = fold != f if folds >= 2 else np.ones(n, dtype=bool)
        fits = [
            fit_temperature(errors[fit], labels[fit]) for errors in candidate_errors
        ]  # (temperature, its NLL) per candidate
        best = int(np.argmin([nll for _, nll in fits]))
        choice[fold == f], temperature[fold == f] = best, fits[best][0]
    return choice, temperature


def classify_held_out(
    denoiser: torch.nn.Module,
    x: torch.Tensor,
    labels: np.ndarray,
    draws: int = 51,
    sigma: str = "train",
    training: tuple[float, float] = (-1.2, 1.2),
    seed: int = 0,
    batch_size: int = 256,
    drift: float = 0.0,
    stop_candidates: tuple = (),
) -> dict:
    """`classify(stop="none")` on held-out images whose labels are used across folds only (`cross_fit`):
    each image's mean-error temperature and, with sigma "auto", its noise-level distribution (the
    training one or a `SIGMA_CANDIDATES`) are chosen on the other folds of the images. Adds per image
    "temperature" and "sigma" (ln sigma's mean and std); "candidate_draw_errors", each candidate
    distribution's full run, and each of `stop_candidates` not among them drawn
    `STOP_CANDIDATE_DRAWS` times (for an early stop chosen for a tolerance); and
    "calibration_evaluations_per_image", the network evaluations spent on the candidates not
    chosen (a one-off cost of calibration)."""
    candidates = held_out_candidates(sigma, training)
    runs = {
        tuple(c): classify(
            denoiser, x, draws, stop="none", seed=seed, batch_size=batch_size, p_mean=c[0], p_std=c[1], drift=drift
        )["draw_errors"]
        for c in candidates
    }
    short = min(STOP_CANDIDATE_DRAWS, draws)
    extra = {  # each distribution drawn once: one in both lists is drawn in full
        tuple(c): classify(
            denoiser, x, short, stop="none", seed=seed, batch_size=batch_size, p_mean=c[0], p_std=c[1], drift=drift
        )["draw_errors"]
        for c in stop_candidates
        if tuple(c) not in runs
    }
    return held_out_result(runs, extra, labels, seed)


def held_out_candidates(sigma: str, training: tuple[float, float]) -> list[tuple[float, float]]:
    """The noise-level distributions `classify_held_out` draws in full: the training one and
    `SIGMA_CANDIDATES` for sigma "auto" (each once), else the one `sigma` names."""
    if sigma != "auto":
        return [tuple(parse_sigma(sigma, training))]
    return list(dict.fromkeys([tuple(training), *SIGMA_CANDIDATES]))  # once each, where training is one of them


def held_out_result(runs: dict, extra: dict, labels: np.ndarray, seed: int = 0) -> dict:
    """`classify_held_out`'s result from its draws: `runs` maps each distribution drawn in full
    (`held_out_candidates`) to its draw errors (B, J, K), `extra` each further distribution to its
    shorter run (B, J', K) (those also in `runs` are left out). Each image's distribution and
    temperature are chosen on the other folds (`cross_fit`)."""
    candidates = list(runs)
    extra = {c: e for c, e in extra.items() if c not in runs}
    errors = np.stack([runs[c] for c in candidates])  # (C, B, J, K)
    choice, temperature = cross_fit(list(errors.mean(2)), labels, seed)
    draw_errors = errors[choice, np.arange(errors.shape[1])]
    n, draws, k = draw_errors.shape
    calibration = (len(candidates) - 1) * draws + sum(e.shape[1] for e in extra.values())
    return {
        "mean_errors": draw_errors.mean(1),
        "votes": np.eye(k, dtype=np.float32)[draw_errors.argmin(2)].sum(1),
        "draws_used": np.full(n, draws, dtype=np.int64),
        "draw_errors": draw_errors,
        "evaluations_per_image": float(draws * k),
        "temperature": temperature,
        "sigma": np.asarray(candidates)[choice],
        "candidates": candidates,
        "candidate_draw_errors": {**runs, **extra},
        "calibration_evaluations_per_image": float(calibration * k),
    }


def error_probabilities(mean_errors: np.ndarray, temperature: float | np.ndarray) -> np.ndarray:
    """softmax(-errors / T); T one number or one per image."""
    z = -mean_errors / (np.reshape(temperature, (-1, 1)) if np.ndim(temperature) else temperature)
    z = z - z.max(1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(1, keepdims=True)


def parse_sigma(text: str, training: tuple[float, float]) -> tuple[float, float] | str:
    """The draws' noise levels, ln sigma ~ N(mean, std^2): "train", the model's training
    distribution (`training`, its P_mean and P_std), "MEAN,STD", or "auto" (returned as is: chosen
    per image on the other folds of the held-out images, `classify_held_out`). Which levels carry
    the class depends on the finding: fine lesions show at small sigma, large masses at large sigma."""
    from ..errors import MedlatentInputError

    if text == "train":
        return training
    if text == "auto":
        return text
    try:
        mean, std = (float(v) for v in text.split(","))
        assert std > 0 and np.isfinite(mean)
    except (ValueError, AssertionError):
        raise MedlatentInputError(
            f"--sigma {text!r}: use train, auto, or MEAN,STD of ln sigma with STD > 0, e.g. 1.5,0.5"
        ) from None
    return mean, std


def parse_stages(text: str, num_classes: int) -> list[tuple[int, int]]:
    """'25:5,100:1' -> [(25, 5), (100, 1)]: stage s draws its draws for the classes still in, then
    keeps the `keep` of lowest mean error; the last stage keeps 1, the prediction."""
    from ..errors import MedlatentInputError

    try:
        stages = [tuple(int(v) for v in part.split(":")) for part in text.split(",")]
        assert all(len(st) == 2 and st[0] >= 1 and st[1] >= 1 for st in stages)
    except (ValueError, AssertionError):
        raise MedlatentInputError(
            f"--prune {text!r}: use DRAWS:KEEP stages, e.g. 25:5,100:1 (each at least 1)"
        ) from None
    keeps = [keep for _, keep in stages]
    if keeps[-1] != 1 or any(b > a for a, b in zip(keeps, keeps[1:], strict=False)):
        raise MedlatentInputError(
            f"--prune {text!r}: the classes kept must not grow from stage to stage and the last stage keeps 1"
        )
    if keeps[0] >= num_classes and len(stages) > 1:
        raise MedlatentInputError(
            f"--prune {text!r}: the first stage keeps {keeps[0]} of {num_classes} classes, so it prunes nothing"
        )
    return stages


@torch.no_grad()
def classify_pruned(
    denoiser: torch.nn.Module,
    x: torch.Tensor,
    stages: list[tuple[int, int]],
    seed: int = 0,
    batch_size: int = 256,
    p_mean: float | np.ndarray = -1.2,
    p_std: float | np.ndarray = 1.2,
    drift: float = 0.0,
) -> dict:
    """Adaptive class pruning (Li et al. 2023, Sec. 3.3): every class gets the first stage's draws,
    the `keep` classes of lowest mean error go on to the next stage's draws, and so on; the last
    stage's survivor is the prediction. The draws continue image i's own sequence, so stage 1's
    draws are the first draws of an unpruned run. Returns per image the mean error of each class
    over the draws it saw (B, K), the survivor, and the mean network evaluations per image."""
    device = next(denoiser.parameters()).device
    n, k = len(x), denoiser.num_classes
    p_mean, p_std = per_image(p_mean, n), per_image(p_std, n)
    sums, seen = torch.zeros(n, k, dtype=torch.float64), torch.zeros(n, k, dtype=torch.float64)
    survivors, evaluations = torch.zeros(n, dtype=torch.long), 0
    for start in range(0, n, batch_size):
        idx = torch.arange(start, min(start + batch_size, n))
        generators = [torch.Generator().manual_seed(seed * 1_000_003 + int(i)) for i in idx]
        classes = torch.arange(k).expand(len(idx), -1).clone()
        x_batch = x[idx].to(device)
        for draws, keep in stages:
            for _ in range(draws):
                errors = (
                    draw_errors(denoiser, x_batch, generators, p_mean[idx], p_std[idx], classes, drift).double().cpu()
                )
                sums[idx] = sums[idx].scatter_add(1, classes, errors)
                seen[idx] = seen[idx].scatter_add(1, classes, torch.ones_like(errors))
            evaluations += draws * classes.shape[1] * len(idx)
            mean = sums[idx].gather(1, classes) / seen[idx].gather(1, classes)
            classes = classes.gather(1, mean.argsort(dim=1, stable=True)[:, : min(keep, classes.shape[1])])
        survivors[idx] = classes[:, 0]
    return {
        "mean_errors": (sums / seen).numpy(),
        "prediction": survivors.numpy(),
        "evaluations_per_image": evaluations / n,
    }


def pruned_probabilities(mean_errors: np.ndarray, prediction: np.ndarray, temperature: float) -> np.ndarray:
    """A softmax of the negative mean errors in which the survivor ranks first: the other classes'
    errors are raised to at least the survivor's (a pruned class never outranks it)."""
    survivor = mean_errors[np.arange(len(prediction)), prediction][:, None]
    errors = np.maximum(mean_errors, survivor + 1e-12)
    errors[np.arange(len(prediction)), prediction] = survivor[:, 0]
    return error_probabilities(errors, temperature)
