"""Information present against information usable.

Present: mutual information I(X; Y) between a representation (reduced by PCA) and the label, by
k-nearest-neighbour estimators, which Czyz et al. (NeurIPS 2023, "Beyond Normal") found among the
more trustworthy at moderate dimension: KSG (Kraskov, Stogbauer & Grassberger 2004, estimator 1,
their Eq. 8) for two continuous variables, and Ross's (2014) form of it for a discrete label.
Intervals by subsampling (half the points without replacement, Politis & Romano 1994), since
bootstrap duplicates put points at distance 0 and break nearest-neighbour counts. And a neural
variational lower bound, InfoNCE with a separable critic, evaluated on held-out pairs.
(benchmark-mi, the authors' package, pins numpy < 2 and jax < 0.5, so it cannot be installed
beside medlatent; the estimators are written here from the papers, in a few lines each.)

Usable: V-information (Xu et al. 2020), I_V(X -> Y) = H_V(Y) - H_V(Y | X): the plug-in label
entropy of the evaluation set minus the held-out cross-entropy of the best model of a family
(linear, small CNN) trained on other data. It is at most H(Y) (cross-entropy is non-negative), and
the gap between present and usable information is the learnability gap stated in nats.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree
from scipy.special import digamma


def _standardise(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64).reshape(len(a), -1)
    return (a - a.mean(0)) / np.where(a.std(0) > 0, a.std(0), 1.0)


def ksg_mi(x: np.ndarray, y: np.ndarray, k: int = 5) -> float:
    """KSG estimator 1 (Kraskov et al. 2004, Eq. 8), in nats, max-norm in the joint space:
    I = psi(k) + psi(N) - < psi(n_x + 1) + psi(n_y + 1) >, n_x the points strictly closer in x
    than the k-th joint neighbour."""
    x, y = _standardise(x), _standardise(y)
    n = len(x)
    joint = np.hstack([x, y])
    eps = cKDTree(joint).query(joint, k=k + 1, p=np.inf)[0][:, -1]
    radius = np.nextafter(eps, 0)  # strictly closer
    n_x = np.array([len(found) - 1 for found in cKDTree(x).query_ball_point(x, radius, p=np.inf)])
    n_y = np.array([len(found) - 1 for found in cKDTree(y).query_ball_point(y, radius, p=np.inf)])
    return max(0.0, float(digamma(k) + digamma(n) - np.mean(digamma(n_x + 1) + digamma(n_y + 1))))


def label_mi(x: np.ndarray, labels: np.ndarray, k: int = 5) -> float:
    """I(X; Y) for a discrete label, in nats (Ross 2014, Eq. 2): for each point the distance d to
    its k-th neighbour of the same class, m the points of any class within d;
    I = psi(N) - < psi(N_y) > + psi(k) - < psi(m) >. Classes with k points or fewer are left out."""
    x, labels = _standardise(x), np.asarray(labels)
    keep = np.isin(labels, [c for c in np.unique(labels) if (labels == c).sum() > k])
    x, labels = x[keep], labels[keep]
    radius, class_size = np.empty(len(x)), np.empty(len(x))
    for c in np.unique(labels):
        members = labels == c
        radius[members] = cKDTree(x[members]).query(x[members], k=k + 1)[0][:, -1]
        class_size[members] = members.sum()
    m = np.array([len(found) - 1 for found in cKDTree(x).query_ball_point(x, radius)])  # within d, self excluded
    return max(0.0, float(digamma(len(x)) - np.mean(digamma(class_size)) + digamma(k) - np.mean(digamma(m))))


def subsample_interval(
    estimate, x: np.ndarray, y: np.ndarray, reps: int = 100, fraction: float = 0.5, seed: int = 0
) -> dict:
    """The estimate on all points and a 95% subsampling interval: the quantiles of
    sqrt(m) (theta_m - theta_n) over subsets of m = fraction * n points, scaled to n."""
    rng = np.random.default_rng(seed)
    n = len(x)
    m = max(2, int(fraction * n))
    full = estimate(x, y)
    deviations = np.array(
        [
            np.sqrt(m) * (estimate(x[idx], y[idx]) - full)
            for idx in (rng.choice(n, m, replace=False) for _ in range(reps))
        ]
    )
    lo, hi = np.quantile(deviations, [0.025, 0.975])
    return {"value": full, "ci95": [full - hi / np.sqrt(n), full - lo / np.sqrt(n)], "n": n}


def label_entropy(labels: np.ndarray) -> float:
    """Plug-in entropy of the labels, in nats."""
    p = np.bincount(np.asarray(labels)) / len(labels)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def v_information(probs: np.ndarray, labels: np.ndarray) -> dict:
    """I_V = H(Y) - CE: the labels' plug-in entropy minus the held-out cross-entropy of a model's
    predicted probabilities (n, K), in nats; never above H(Y)."""
    labels = np.asarray(labels)
    p = np.clip(np.asarray(probs, dtype=np.float64)[np.arange(len(labels)), labels], 1e-12, 1.0)
    entropy, cross_entropy = label_entropy(labels), float(-np.log(p).mean())
    return {"v_information": entropy - cross_entropy, "label_entropy": entropy, "cross_entropy": cross_entropy}


def pca_reduce(train: np.ndarray, *others: np.ndarray, dims: int = 8) -> list[np.ndarray]:
    """Project onto the first `dims` principal components of `train` (flattened)."""
    from sklearn.decomposition import PCA

    train = np.asarray(train, dtype=np.float64).reshape(len(train), -1)
    pca = PCA(n_components=min(dims, *train.shape), random_state=0).fit(train)
    return [pca.transform(train)] + [
        pca.transform(np.asarray(o, dtype=np.float64).reshape(len(o), -1)) for o in others
    ]


def infonce_mi(
    x: np.ndarray, y: np.ndarray, steps: int = 600, batch: int = 256, hidden: int = 64, seed: int = 0
) -> float:
    """A neural variational lower bound on I(X; Y), in nats: InfoNCE (van den Oord et al. 2018; the
    bound as in Poole et al. 2019, Eq. 12) with a separable critic f(x, y) = g(x) . h(y) (two MLPs:
    one matrix product scores every pair of a batch), trained with Adam on the first half of the
    pairs and evaluated on the second half, so that overfitting does not inflate it. It cannot
    exceed log(batch). y may be labels (one-hot encoded)."""
    import torch

    x = _standardise(x)
    y = np.asarray(y)
    y = np.eye(int(y.max()) + 1)[y] if y.ndim == 1 and np.issubdtype(y.dtype, np.integer) else _standardise(y)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    xt, yt = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)
    half = len(xt) // 2
    order = torch.randperm(len(xt), generator=generator)
    train, test = order[:half], order[half:]

    def mlp(d):
        return torch.nn.Sequential(
            torch.nn.Linear(d, hidden),
            torch.nn.ReLU(),
            torch.nn.Linear(hidden, hidden),
            torch.nn.ReLU(),
            torch.nn.Linear(hidden, 32),
        )

    g, h = mlp(xt.shape[1]), mlp(yt.shape[1])
    optimiser = torch.optim.Adam([*g.parameters(), *h.parameters()], lr=1e-3)
    batch = min(batch, half)

    def bound(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        scores = g(xb) @ h(yb).T  # f(x_i, y_j)
        return (scores.diagonal() - scores.logsumexp(dim=1)).mean() + np.log(len(xb))

    for _ in range(steps):
        idx = train[torch.randint(half, (batch,), generator=generator)]
        loss = -bound(xt[idx], yt[idx])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        chunks = [test[i : i + batch] for i in range(0, len(test) - batch + 1, batch)] or [test]
        return max(0.0, float(np.mean([float(bound(xt[c], yt[c])) for c in chunks])))
