"""Per-head linear probes on kqv_out rows, and head weights from their accuracy (docs/method.md §7.5).

Pure numpy. A probe per (layer, head) separates toxic from non-toxic texts by the head's output at
the text's last token: regularised linear discriminant analysis in closed form (one D x D solve per
head, D = head_dim), chosen over gradient-descent logistic regression because it needs no step size
or iteration count and fits every head of a model in well under a second. With fewer training texts
than head dimensions the pooled covariance is singular, so it is shrunk toward its mean variance
(Ledoit-Wolf style, fixed SHRINK). Accuracy is measured on a held-out split (stratified).

Shapes: X [n_texts, n_layer, n_head, head_dim]; accuracies and weights [n_layer, n_head].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import FgdilpError

SHRINK = 0.3          # covariance shrinkage toward (trace/D) * I
HELD_OUT = 0.3        # fraction of each class kept for the accuracy


@dataclass(frozen=True)
class ProbeResult:
    accuracy: np.ndarray          # [n_layer, n_head] held-out accuracy
    train_accuracy: np.ndarray    # [n_layer, n_head]
    n_train: int
    n_test: int


def split(y: np.ndarray, held_out: float = HELD_OUT, seed: int = 0) -> np.ndarray:
    """A boolean test mask [n]: `held_out` of each class (at least one of each), chosen at random."""
    y = np.asarray(y, dtype=bool)
    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), dtype=bool)
    for cls in (False, True):
        idx = np.flatnonzero(y == cls)
        if len(idx) < 2:
            raise FgdilpError(f"the probes need at least 2 {'toxic' if cls else 'non-toxic'} texts, got {len(idx)}")
        k = min(len(idx) - 1, max(1, int(round(held_out * len(idx)))))
        test[rng.permutation(idx)[:k]] = True
    return test


def fit_probes(X: np.ndarray, y: np.ndarray, test: np.ndarray | None = None, seed: int = 0) -> ProbeResult:
    """Fit one LDA probe per head on the training part; accuracy on the held-out part."""
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=bool)
    if X.ndim != 4 or X.shape[0] != len(y):
        raise FgdilpError(f"probe rows must be [n_texts, n_layer, n_head, head_dim] for {len(y)} labels, "
                          f"not {list(X.shape)}")
    if not np.all(np.isfinite(X)):
        raise FgdilpError("probe rows hold non-finite values")
    test = split(y, seed=seed) if test is None else np.asarray(test, dtype=bool)
    train = ~test
    n, L, H, D = X.shape
    Z = X.reshape(n, L * H, D).transpose(1, 0, 2)                     # [heads, n, D]
    Zt, yt = Z[:, train], y[train]
    mu0, mu1 = Zt[:, ~yt].mean(axis=1), Zt[:, yt].mean(axis=1)        # [heads, D]
    centred = np.concatenate([Zt[:, ~yt] - mu0[:, None], Zt[:, yt] - mu1[:, None]], axis=1)
    cov = np.einsum("hnd,hne->hde", centred, centred) / max(1, centred.shape[1] - 2)
    scale = np.trace(cov, axis1=1, axis2=2) / D                        # [heads]
    eye = np.eye(D)[None]
    reg = (1 - SHRINK) * cov + SHRINK * (scale[:, None, None] + 1e-12) * eye
    w = np.linalg.solve(reg, (mu1 - mu0)[:, :, None])[:, :, 0]        # [heads, D]
    b = -np.einsum("hd,hd->h", w, (mu0 + mu1) / 2)

    def acc(mask: np.ndarray) -> np.ndarray:
        pred = np.einsum("hnd,hd->hn", Z[:, mask], w) + b[:, None] > 0
        return (pred == y[mask][None]).mean(axis=1).reshape(L, H)

    return ProbeResult(acc(test).astype(np.float32), acc(train).astype(np.float32), int(train.sum()), int(test.sum()))


def head_weights(accuracy: np.ndarray, top_k: int = 0, by_accuracy: bool = False) -> np.ndarray:
    """[n_layer, n_head] weights: top_k > 0 keeps the K best heads (1, others 0; ties by order);
    by_accuracy weights heads by (accuracy - 0.5), clipped at 0 and scaled so the best is 1 (over
    the kept heads with top_k). Neither: all 1."""
    acc = np.asarray(accuracy, dtype=np.float64)
    if acc.ndim != 2 or not np.all(np.isfinite(acc)):
        raise FgdilpError(f"probe accuracies must be a finite [n_layer, n_head] array, not {list(acc.shape)}")
    keep = np.ones(acc.shape, dtype=bool)
    if top_k < 0 or top_k > acc.size:
        raise FgdilpError(f"--probe-top-k must be in 0..{acc.size} (the model's heads), not {top_k}")
    if top_k:
        order = np.argsort(-acc.reshape(-1), kind="stable")[:top_k]
        keep = np.zeros(acc.size, dtype=bool)
        keep[order] = True
        keep = keep.reshape(acc.shape)
    if not by_accuracy:
        return keep.astype(np.float32)
    w = np.where(keep, np.clip(acc - 0.5, 0.0, None), 0.0)
    if w.max() <= 0:
        raise FgdilpError("no selected head's probe beats chance (accuracy <= 0.5): nothing to steer")
    return (w / w.max()).astype(np.float32)


__all__ = ["HELD_OUT", "SHRINK", "ProbeResult", "fit_probes", "head_weights", "split"]
