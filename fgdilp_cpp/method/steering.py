"""The adaptive TR edit and renormalisation (docs/method.md §2.2-2.3), the norm-preserving rotate
edit (§2.6), the gate (§2.7) and per-head strengths: the reference for native/edit.cpp.

Shapes: a layer row is [n_head * head_dim]; head h is row[h*head_dim:(h+1)*head_dim].
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..params import EDIT_RULES


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


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of [n_head, head_dim] arrays; 0 where either vector is zero."""
    na, nb = np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
    den = na * nb
    return np.where(den > 0, np.sum(a * b, axis=-1) / np.where(den > 0, den, 1.0), 0.0)


def _head_scales(head_scales: Optional[np.ndarray], n_head: int) -> np.ndarray:
    """[n_head] float64 of the float32 strengths the hook holds (all 1 without)."""
    return np.ones(n_head) if head_scales is None else np.asarray(head_scales, np.float32).astype(np.float64)


def edited_heads(v: np.ndarray, delta: np.ndarray, n_head: int, scale: float = 1.0,
                 gate: Optional[float] = None, head_scales: Optional[np.ndarray] = None) -> np.ndarray:
    """[n_head] bool: heads the edit touches; the others keep their bits. A head is left alone where
    its strength scale * head_scale is 0, or (gate on) where cos(v_h, delta_h) <= gate."""
    vh = np.asarray(v, np.float32).astype(np.float64).reshape(n_head, -1)
    dh = np.asarray(delta, np.float32).astype(np.float64).reshape(n_head, -1)
    hs = _head_scales(head_scales, n_head)
    on = float(np.float32(scale)) * hs != 0                           # the hook holds float32 strengths
    if gate is not None:
        on &= _cos(vh, dh) > float(np.float32(gate))
    return on


def edit_row(v: np.ndarray, delta: np.ndarray, e: Optional[np.ndarray], n_head: int, *, rule: str = "subtract",
             exp_norm: float = 0.4, exp_sim: float = 0.6, scale: float = 1.0, renorm: bool = True,
             gate: Optional[float] = None, head_scales: Optional[np.ndarray] = None) -> np.ndarray:
    """The hook's edit of one row: per edited head (edited_heads) the strength
    k_h = scale * head_scale_h * lambda_norm_h * lambda_sim_h, and
      subtract: v_h - k_h * delta_h; renorm: the edited heads together rescaled to their norm before;
      rotate: |v_h| * unit(unit(v_h) - k_h * unit(delta_h)) (left as is where v_h or delta_h is zero).
    Heads not edited are returned bit for bit. float64 math, float32 result."""
    if rule not in EDIT_RULES:
        raise ValueError(f"unknown edit rule {rule!r} (expected one of {', '.join(EDIT_RULES)})")
    v32 = np.asarray(v, np.float32)
    vh = v32.astype(np.float64).reshape(n_head, -1)                   # [n_head, head_dim]
    dh = np.asarray(delta, np.float64).reshape(n_head, -1)
    eh = None if e is None else np.asarray(e, np.float64).reshape(n_head, -1)
    hs = _head_scales(head_scales, n_head)
    scale = float(np.float32(scale))
    on = edited_heads(v32, delta, n_head, scale, gate, hs)            # [n_head]
    k = scale * hs * lambda_norm(dh, exp_norm) * lambda_sim(vh, eh, exp_sim)  # [n_head]
    out = v32.reshape(n_head, -1).copy()                              # float32: untouched heads keep their bits
    if rule == "rotate":
        nv, nd = np.linalg.norm(vh, axis=-1), np.linalg.norm(dh, axis=-1)
        on &= (nv > 0) & (nd > 0)
        for h in np.flatnonzero(on):
            u = vh[h] / nv[h] - k[h] * dh[h] / nd[h]
            nu = np.linalg.norm(u)
            if nu > 0:
                out[h] = (u * (nv[h] / nu)).astype(np.float32)
        return out.reshape(-1)
    new = vh[on] - k[on, None] * dh[on]                               # [n_on, head_dim]
    if renorm:
        n_after = np.linalg.norm(new)
        if n_after > 0:
            new = new * (np.linalg.norm(vh[on]) / n_after)
    out[on] = new.astype(np.float32)
    return out.reshape(-1)
