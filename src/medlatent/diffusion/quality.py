"""Quality of generated samples, measured with an independent image-space classifier (trained by
the audit's protocol, not used for guidance): class consistency (the share of samples it assigns
to their conditioning class), the Frechet distance between real and generated images in its
feature space (Heusel et al. 2017, Eq. 6 applied to these features), and k-NN precision and recall
(Kynkaanniemi et al. 2019, Eq. 1-2). And a memorisation check in pixel space: how close each
sample lies to its nearest training image, against how close training images lie to each other."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import MedlatentInputError


@torch.no_grad()
def features(classifier, images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """The classifier's pooled features before its last layer (`pre_logits`), on raw images."""
    backbone = classifier.model_.backbone.eval()
    out = []
    for b in range(0, len(images), batch_size):
        x = classifier.input_scaler.transform(images[b : b + batch_size]).to(classifier.device)
        out.append(backbone.forward_head(backbone.forward_features(x), pre_logits=True).float().cpu())
    return torch.cat(out).numpy().astype(np.float64)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))."""
    import warnings

    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ridge = 1e-6 * np.eye(len(mu_a))  # fewer samples than feature dimensions make both covariances singular
    s_a, s_b = s_a + ridge, s_b + ridge
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        root = linalg.sqrtm(s_a @ s_b)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * np.real(root)))


def kernel_distance(a: np.ndarray, b: np.ndarray) -> float:
    """KID (Binkowski et al. 2018): the unbiased MMD^2 between the feature sets with the cubic
    polynomial kernel k(x, y) = (x . y / d + 1)^3; unlike the Frechet distance, unbiased at small n."""
    d = a.shape[1]
    k_aa, k_bb, k_ab = ((a @ a.T) / d + 1) ** 3, ((b @ b.T) / d + 1) ** 3, ((a @ b.T) / d + 1) ** 3
    m, n = len(a), len(b)
    return float(
        (k_aa.sum() - np.trace(k_aa)) / (m * (m - 1)) + (k_bb.sum() - np.trace(k_bb)) / (n * (n - 1)) - 2 * k_ab.mean()
    )


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Precision: share of generated samples inside the k-NN ball of some real sample; recall: share
    of real samples inside the k-NN ball of some generated sample."""

    def inside(reference: np.ndarray, query: np.ndarray) -> float:
        d_ref = np.linalg.norm(reference[:, None] - reference[None], axis=-1)
        radius = np.sort(d_ref, axis=1)[:, k]  # k-th neighbour (column 0 is the point itself)
        d = np.linalg.norm(query[:, None] - reference[None], axis=-1)
        return float((d <= radius[None]).any(1).mean())

    return inside(real, fake), inside(fake, real)


def inception_distances(
    real: torch.Tensor,
    fake: torch.Tensor,
    device: str | torch.device = "cpu",
    weights: str | None = None,
    feature=2048,
    batch_size: int = 64,
) -> dict:
    """FID (Heusel et al. 2017) and KID (Binkowski et al. 2018) in Inception-v3 features, through
    torchmetrics (the optional extra `medlatent[fid]`). The Inception weights download once from
    torch-fidelity's release page, or come from `weights` (a local file). Images in [0, 1]; grey
    ones are repeated to RGB, all resized to 299 px by torchmetrics. `feature`: an nn.Module
    instead of Inception (tests)."""
    from ..errors import MedlatentRuntimeError

    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance
    except ImportError as err:
        raise MedlatentInputError(
            "--inception needs the optional extra: pip install 'medlatent[fid]' (torchmetrics with torch-fidelity)"
        ) from err
    try:
        fid = FrechetInceptionDistance(
            feature=feature, normalize=True, **({"feature_extractor_weights_path": str(weights)} if weights else {})
        ).to(device)
    except OSError as err:  # no network: the weights could not be downloaded
        raise MedlatentRuntimeError(
            f"--inception: the Inception weights could not be loaded ({err}); they download "
            "once with network access, or give a local file with --inception-weights"
        ) from err
    kid = KernelInceptionDistance(
        feature=fid.inception, normalize=True, subset_size=min(1000, len(real), len(fake))
    ).to(device)
    for images, is_real in ((real, True), (fake, False)):
        for b in range(0, len(images), batch_size):
            x = images[b : b + batch_size].float().clamp(0, 1).to(device)
            x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
            fid.update(x, real=is_real)
            kid.update(x, real=is_real)
    kid_mean, kid_std = kid.compute()
    return {
        "inception_fid": float(fid.compute()),
        "inception_kid": float(kid_mean),
        "inception_kid_std": float(kid_std),
    }


NEAR_COPY_RATIO = 1 / 3  # a sample 3x closer to a training image than training images are to each other


def memorisation(samples: torch.Tensor, train: torch.Tensor, max_side: int = 64, chunk: int = 512) -> dict:
    """ratio_i = ||s_i - NN_train(s_i)|| / median_j ||x_j - NN_{train - x_j}(x_j)||, in pixels
    (images resized to at most `max_side`). A sample with ratio below NEAR_COPY_RATIO is a near
    copy of a training image: a typical training image has no neighbour that close. Returns the
    share and indices of near copies, the ratio's quantiles and each near copy's training index."""
    from ..data.base import resize

    def flat(x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        x = x.mean(1, keepdim=True) if x.shape[1] != 1 else x
        return (resize(x, max_side) if x.shape[-1] > max_side else x).flatten(1).double()

    a, b = flat(samples), flat(train)

    def nearest(query: torch.Tensor, exclude_self: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        dists, where = [], []
        for i in range(0, len(query), chunk):
            d = torch.cdist(query[i : i + chunk], b)
            if exclude_self:
                d[torch.arange(len(d)), torch.arange(i, i + len(d))] = float("inf")
            value, index = d.min(1)
            dists.append(value)
            where.append(index)
        return torch.cat(dists), torch.cat(where)

    typical = float(nearest(b, exclude_self=True)[0].median())
    distance, index = nearest(a)
    ratio = (distance / max(typical, 1e-12)).numpy()
    copies = np.flatnonzero(ratio < NEAR_COPY_RATIO)
    return {
        "near_copy_share": float(len(copies) / max(len(ratio), 1)),
        "near_copies": copies.tolist(),
        "nearest_train_index": index.numpy()[copies].tolist(),
        "ratio_quantiles": {q: float(np.quantile(ratio, float(q))) for q in ("0.0", "0.05", "0.5")},
        "typical_train_distance": typical,
        "threshold": NEAR_COPY_RATIO,
    }


def score_samples(
    judge,
    images: torch.Tensor,
    labels: np.ndarray,
    class_names: list[str],
    real_images: torch.Tensor,
    train_images: torch.Tensor | None = None,
) -> dict:
    """Quality of generated `images` (conditioned on class `labels`; for a multi-label model, on
    that label alone) as judged by an image-space classifier: per-class consistency; Frechet
    distance, precision and recall against `real_images`; with `train_images` (those the model
    learnt from), the memorisation check."""
    from ..evaluation.metrics import predictions, wilson_interval

    if images.shape[1] != real_images.shape[1]:
        images = images.mean(1, keepdim=True) if real_images.shape[1] == 1 else images.expand(-1, 3, -1, -1)
    predicted = predictions(judge.task_, judge.predict_proba(judge.input_scaler.transform(images)))
    hit = (
        predicted[np.arange(len(labels)), labels] == 1 if predicted.ndim == 2 else predicted == labels
    )  # multi-label: the asked label is predicted
    fake, real = features(judge, images), features(judge, real_images)
    precision, recall = precision_recall(real, fake)
    return {
        "class_consistency": {
            name: float(hit[labels == c].mean()) for c, name in enumerate(class_names) if (labels == c).any()
        },
        "class_consistency_ci95": {
            name: wilson_interval(int(hit[labels == c].sum()), int((labels == c).sum()))
            for c, name in enumerate(class_names)
            if (labels == c).any()
        },
        "frechet_distance": frechet_distance(real, fake),
        "precision": precision,
        "recall": recall,
        "memorisation": memorisation(images, train_images) if train_images is not None else None,
        "real_images": len(real_images),
    }


def evaluate(
    model,
    classifier,
    real_images: torch.Tensor,
    real_labels: np.ndarray,
    n_per_class: int = 100,
    steps: int = 32,
    cfg: float = 1.0,
    seed: int = 0,
    guidance_classifier=None,
    guidance_scale: float = 0.0,
    train_images: torch.Tensor | None = None,
    sampler: str = "heun",
    inception: bool = False,
    inception_weights: str | None = None,
) -> dict:
    """`n_per_class` samples of each class from `model`, scored by `score_samples`; with
    `inception`, also Inception FID and KID against `real_images`."""
    generated, labels = [], []
    for c in range(len(model.class_names)):
        y = torch.full((n_per_class,), c, dtype=torch.long)
        condition = (
            torch.eye(len(model.class_names))[y] if model.denoiser.multilabel else y
        )  # multi-label: that label alone
        generated.append(
            model.decode(
                model.sample(
                    condition,
                    steps=steps,
                    cfg=cfg,
                    seed=seed + c,
                    guidance_classifier=guidance_classifier,
                    guidance_scale=guidance_scale,
                    sampler=sampler,
                )
            )
        )
        labels.append(y.numpy())
    images = torch.cat(generated)
    scores = score_samples(classifier, images, np.concatenate(labels), model.class_names, real_images, train_images)
    if inception:
        scores.update(inception_distances(real_images, images, model.device, inception_weights))
    return {
        **scores,
        "n_per_class": n_per_class,
        "steps": steps,
        "sampler": sampler,
        "cfg": cfg,
        "guidance_scale": guidance_scale if guidance_classifier is not None else 0.0,
    }
