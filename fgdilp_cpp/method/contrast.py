"""Directions from labelled text: toxic minus clean mean head outputs (docs/method.md §7.6).

Pure numpy. DeStein's recipe reduced to what a small model needs: the kqv_out rows of human
continuations labelled toxic and clean are averaged per text (over its tokens), then per class,
and the difference is the toxic direction of each head. Its per-head strength is not the
difference's own norm (that depends on how far apart two corpora are, not on how hard one prompt
pushes) but a norm measured elsewhere, TR's prompt-end delta averaged over prompts, so that one
--steer-scale means about the same push whichever universal file is loaded, and the random
control of the same norms is the same control.

Shapes: rows [n_texts, n_layer, n_head, head_dim]; directions and norms [n_layer, n_head, head_dim]
and [n_layer, n_head].
"""

from __future__ import annotations

import numpy as np

from ..errors import FgdilpError


def mean_difference(rows: np.ndarray, toxic: np.ndarray) -> np.ndarray:
    """[n_layer, n_head, head_dim] float32: mean of the toxic texts' rows minus mean of the others'
    (float64 sums). Both classes must be present and every row finite."""
    rows = np.asarray(rows)
    toxic = np.asarray(toxic, dtype=bool)
    if rows.ndim != 4 or rows.shape[0] != len(toxic):
        raise FgdilpError(f"text rows must be [n_texts, n_layer, n_head, head_dim] for {len(toxic)} labels, "
                          f"not {list(rows.shape)}")
    if toxic.all() or not toxic.any():
        raise FgdilpError("a toxic direction needs both toxic and clean texts")
    if not np.all(np.isfinite(rows)):
        raise FgdilpError("text rows hold non-finite values")
    x = rows.astype(np.float64)
    return (x[toxic].mean(axis=0) - x[~toxic].mean(axis=0)).astype(np.float32)


def with_head_norms(directions: np.ndarray, norms: np.ndarray) -> np.ndarray:
    """[n_layer, n_head, head_dim] float32: each head's direction rescaled to norms[layer, head]; a
    head whose direction is zero stays zero (no direction to give a length)."""
    d = np.asarray(directions, dtype=np.float64)
    n = np.asarray(norms, dtype=np.float64)
    if d.ndim != 3 or n.shape != d.shape[:2]:
        raise FgdilpError(f"norms {list(n.shape)} do not fit directions {list(d.shape)} (one per head)")
    if not (np.all(np.isfinite(n)) and np.all(n >= 0)):
        raise FgdilpError("head norms must be finite and non-negative")
    length = np.linalg.norm(d, axis=2, keepdims=True)
    unit = np.divide(d, length, out=np.zeros_like(d), where=length > 0)
    return (unit * n[:, :, None]).astype(np.float32)


__all__ = ["mean_difference", "with_head_norms"]
