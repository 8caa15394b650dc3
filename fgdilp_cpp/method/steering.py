"""The adaptive TR edit and renormalisation (docs/method.md §2.2-2.3): the reference for native/edit.cpp.

Shapes: a layer row is [n_head * head_dim]; head h is row[h*head_dim:(h+1)*head_dim].
"""

from __future__ import annotations

import numpy as np


def lambda_norm(delta_heads: np.ndarray, exp_norm: float) -> np.ndarray:
    """(1 + |delta_h|)^a per head; delta_heads [n_head, head_dim] -> [n_head]."""
    return (1.0 + np.linalg.norm(delta_heads, axis=-1)) ** exp_norm


def lambda_sim(v_heads: np.ndarray, e_heads: np.ndarray | None, exp_sim: float) -> np.ndarray:
    """(1 + max(0, cos(v_h, e_h)))^b per head (1 without e); zero vectors have cos 0."""
    if e_heads is None:
        return np.ones(v_heads.shape[0])
    nv = np.linalg.norm(v_heads, axis=-1)
    ne = np.linalg.norm(e_heads, axis=-1)
    dots = np.sum(v_heads * e_heads, axis=-1)
    cos = np.where((nv > 0) & (ne > 0), dots / np.where(nv * ne > 0, nv * ne, 1.0), 0.0)
    return (1.0 + np.maximum(cos, 0.0)) ** exp_sim


def tr_edit(v: np.ndarray, delta: np.ndarray, e: np.ndarray | None, n_head: int,
            exp_norm: float = 0.4, exp_sim: float = 0.6, scale: float = 1.0,
            renorm: bool = True) -> np.ndarray:
    """v' = v - scale * lambda_norm * lambda_sim * delta per head, then |v'| = |v| over the row.

    v, delta, e: [n_head * head_dim] (float64 math, float32 result like the native edit)."""
    v64 = np.asarray(v, dtype=np.float64)
    vh = v64.reshape(n_head, -1)                                      # [n_head, head_dim]
    dh = np.asarray(delta, dtype=np.float64).reshape(n_head, -1)
    eh = None if e is None else np.asarray(e, dtype=np.float64).reshape(n_head, -1)
    k = scale * lambda_norm(dh, exp_norm) * lambda_sim(vh, eh, exp_sim)  # [n_head]
    out = (vh - k[:, None] * dh).reshape(-1)
    if renorm:
        n_after = np.linalg.norm(out)
        if n_after > 0:
            out = out * (np.linalg.norm(v64) / n_after)
    return out.astype(np.float32)
