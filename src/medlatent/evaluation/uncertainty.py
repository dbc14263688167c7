"""Selective prediction: how well an uncertainty score ranks a classifier's mistakes.

The risk-coverage curve (Geifman & El-Yaniv 2017) keeps the most confident share c of the images
and reports the error rate among them; the area under it (AURC) is the mean risk over coverages
1/n, 2/n, ..., 1. Lower is better; a confidence that ranks every mistake last gives the lowest AURC
for that error rate.
"""

from __future__ import annotations

import numpy as np


def risk_coverage(correct: np.ndarray, confidence: np.ndarray) -> dict:
    """Coverages k/n and the error rate among the k most confident images (ties broken by order)."""
    order = np.argsort(-np.asarray(confidence, float), kind="stable")
    errors = 1.0 - np.asarray(correct, float)[order]
    k = np.arange(1, len(errors) + 1)
    risk = np.cumsum(errors) / k
    return {"coverage": (k / len(errors)).tolist(), "risk": risk.tolist(), "aurc": float(risk.mean())}


def vote_uncertainty(votes: np.ndarray) -> dict[str, np.ndarray]:
    """Per image, from vote counts (n, K): the entropy of the vote shares and the margin between the
    two largest shares (confidence = 1 - entropy / log K, and the margin itself)."""
    shares = votes / np.maximum(votes.sum(1, keepdims=True), 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.nansum(np.where(shares > 0, shares * np.log(shares), 0.0), axis=1)
    top = np.sort(shares, axis=1)[:, ::-1]
    return {"vote_entropy": entropy, "vote_margin": top[:, 0] - (top[:, 1] if shares.shape[1] > 1 else 0)}


def error_gap(mean_errors: np.ndarray) -> np.ndarray:
    """The gap between the two lowest mean errors, relative to the lowest: how clearly one class denoises best."""
    low = np.sort(mean_errors, axis=1)
    return (low[:, 1] - low[:, 0]) / np.maximum(np.abs(low[:, 0]), 1e-12)
