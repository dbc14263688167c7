"""Does a representation keep the neighbourhoods of pixel space? k-NN overlap, trustworthiness
and continuity (Venna & Kaski 2001; scikit-learn's `trustworthiness`), and class separation.

Trustworthiness(X -> Z) penalises points that are neighbours in Z but not in X (false
neighbours); continuity is the same measure with the roles swapped (neighbours in X lost in Z).
Both are 1 for a map that keeps every k-neighbourhood's ranks.
"""

from __future__ import annotations

import numpy as np
from sklearn.manifold import trustworthiness
from sklearn.metrics import silhouette_score
from sklearn.neighbors import NearestNeighbors


def flat(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x.reshape(len(x), -1)


def knn_overlap(x: np.ndarray, z: np.ndarray, k: int) -> float:
    """Mean share of each point's k nearest neighbours in x that are also among its k in z."""

    def neighbours(a):
        return NearestNeighbors(n_neighbors=k + 1).fit(a).kneighbors(a, return_distance=False)[:, 1:]

    a, b = neighbours(flat(x)), neighbours(flat(z))
    return float(np.mean([len(np.intersect1d(r, s, assume_unique=True)) / k for r, s in zip(a, b, strict=False)]))


def neighbourhood_scores(x, z, ks: list[int]) -> dict:
    """Per k: k-NN overlap, trustworthiness and continuity of the map x -> z (both (n, ...))."""
    x, z = flat(x), flat(z)
    out = {}
    for k in ks:
        if k >= len(x) / 2:
            continue  # trustworthiness is defined for k < n / 2
        out[str(k)] = {
            "knn_overlap": knn_overlap(x, z, k),
            "trustworthiness": float(trustworthiness(x, z, n_neighbors=k)),
            "continuity": float(trustworthiness(z, x, n_neighbors=k)),
        }
    return out


def class_separation(z, labels: np.ndarray) -> float | None:
    """Silhouette of the classes in this space (Euclidean); None with fewer than two classes."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(np.unique(labels)) < 2:
        return None
    return float(silhouette_score(flat(z), labels))
