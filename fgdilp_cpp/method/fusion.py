"""FGDILP fusion of sub-toxicity vectors (docs/method.md §5): the reference for native/fusion.cpp.

Shapes: a sub-toxicity vector Δ_j is one full layer row [W] (W = n_head * head_dim); the n vectors
of one layer are stacked as deltas [n, W], 1 <= n <= MAX_NEG.

Three steps, TIES-merging style:
  1. masking: keep the top-K % entries of each Δ_j by |value| (ties: lower index first);
  2. sign election: s_c = sign(Σ_j sign(m_j[c]) m_j[c]² / ‖m_j‖²), the layer's majority sign where 0;
  3. merge: over the entries that agree with s_c, max |.| (times s_c), mean or sum.

Every step mirrors the C++ loop order where it matters for bit-exactness: masking works on the
float32 values, norms and w_c are float64 sums taken left to right, merges accumulate in float64.
"""

from __future__ import annotations

import math

import numpy as np

from ..params import FUSION_MODES
MAX_NEG = 8  # FGDILP_MAX_NEG


def _k_pct32(k_pct: float) -> float:
    """K as the float32 the C params hold, checked to lie in (0, 100]."""
    k = float(np.float32(k_pct))
    if not (0.0 < k <= 100.0):  # also rejects NaN
        raise ValueError(f"fusion K must be in (0, 100], got {k_pct}")
    return k


def keep_count(width: int, k_pct: float) -> int:
    """n_keep = ceil(K/100 * W), computed as ceil(K * W / 100) in float64 (exact when K*W/100 is
    an integer), clamped to [1, W]."""
    k = _k_pct32(k_pct)
    return min(width, max(1, math.ceil(k * width / 100.0)))


def _check_finite(x: np.ndarray) -> None:
    if not np.all(np.isfinite(x)):
        raise ValueError("fusion input holds NaN or inf")


def mask_top_k(delta: np.ndarray, k_pct: float) -> np.ndarray:
    """Keep the n_keep entries of largest |value| of delta [W] and zero the rest -> float32 [W].

    thr = the n_keep-th largest |value|; every entry with |v| > thr is kept, then entries with
    |v| == thr in increasing index order until n_keep are kept."""
    d = np.asarray(delta, dtype=np.float32)                  # [W]
    if d.ndim != 1 or d.size == 0:
        raise ValueError(f"mask_top_k needs a non-empty vector, got shape {d.shape}")
    _check_finite(d)
    width = d.size
    n_keep = keep_count(width, k_pct)
    mag = np.abs(d)                                          # [W] float32
    thr = np.partition(mag, width - n_keep)[width - n_keep]  # n_keep-th largest |value|
    keep = mag > thr                                         # [W] bool, at most n_keep - 1 set
    ties = np.flatnonzero(mag == thr)[: n_keep - int(keep.sum())]
    keep[ties] = True                                        # exactly n_keep set
    return np.where(keep, d, np.float32(0)).astype(np.float32)


def elect_signs(masked: np.ndarray) -> np.ndarray:
    """The elected sign per coordinate of masked [n, W] -> int8 [W] of ±1.

    w_c = Σ_j sign(m_j[c]) m_j[c]² / ‖m_j‖² (a zero m_j contributes 0), s_c = sign(w_c); where
    s_c = 0 the layer's majority sign sign(Σ_c s_c) is used, and +1 if that is 0 too."""
    m = np.asarray(masked, dtype=np.float32).astype(np.float64)  # [n, W], exact
    if m.ndim != 2:
        raise ValueError(f"elect_signs needs [n, W], got shape {m.shape}")
    sq = m * m                                               # [n, W], exact in float64
    norm2 = np.cumsum(sq, axis=1)[:, -1] if m.shape[1] else np.zeros(m.shape[0])  # [n], left to right
    w = np.zeros(m.shape[1])                                 # [W]
    for j in range(m.shape[0]):                              # summed in j order, like the C++ loop
        if norm2[j] > 0.0:
            w += np.sign(m[j]) * sq[j] / norm2[j]
    s = np.sign(w).astype(np.int8)                           # [W] in {-1, 0, 1}
    majority = np.int8(1 if int(s.sum(dtype=np.int64)) >= 0 else -1)
    return np.where(s == 0, majority, s).astype(np.int8)


def rescale_to_mean_delta(fused: np.ndarray, deltas: np.ndarray, n_heads: int) -> np.ndarray:
    """--fused-norm tr (docs/method.md §5.6): each of the n_heads blocks of fused [W] rescaled to the
    norm of that block of mean_j(deltas[j]) (the TR-style single delta of the same prefixes); a
    block whose mean is zero becomes zero. float32 [W], the same bits as the C++."""
    d = np.asarray(deltas, dtype=np.float32).astype(np.float64)     # [n, W]
    f = np.asarray(fused, dtype=np.float32).astype(np.float64)      # [W]
    if d.ndim != 2 or f.shape != (d.shape[1],) or n_heads < 1 or d.shape[1] % n_heads:
        raise ValueError(f"rescale_to_mean_delta: fused [W], deltas [n, W], W divisible by {n_heads} heads")
    total = np.zeros(d.shape[1])
    for j in range(d.shape[0]):                                      # summed in j order, like the C++
        total += d[j]
    mean = (total / d.shape[0]).reshape(n_heads, -1)                 # [n_heads, head_dim]
    fh = f.reshape(n_heads, -1)
    target2 = np.cumsum(mean * mean, axis=1)[:, -1]                  # [n_heads], left to right
    fused2 = np.cumsum(fh * fh, axis=1)[:, -1]
    ok = (target2 > 0) & (fused2 > 0)
    r = np.where(ok, np.sqrt(target2) / np.sqrt(np.where(ok, fused2, 1.0)), 0.0)
    return ((fh * r[:, None]).astype(np.float32) + np.float32(0)).reshape(-1)


def fuse(deltas: np.ndarray, k_pct: float = 50.0, mode: str = "max", elect: bool = True,
         norm_heads: int = 0) -> np.ndarray:
    """Fuse deltas [n, W] (1 <= n <= 8) into one float32 row [W]: mask, elect signs, merge; with
    norm_heads > 0 then rescale each head block to the mean delta's norm (rescale_to_mean_delta).

    mode: "max" (elect on: s_c * max |m_j[c]| over the agreeing j; elect off: the m_j[c] of largest
    |.|, first j on ties), "mean" or "sum" of the agreeing m_j[c]; 0 where none agrees. With elect
    off, every nonzero m_j[c] agrees. Raises ValueError on bad n, K, mode, or NaN/inf."""
    d = np.asarray(deltas, dtype=np.float32)                 # [n, W]
    if d.ndim != 2:
        raise ValueError(f"fuse needs deltas [n, W], got shape {d.shape}")
    n, width = d.shape
    if not 1 <= n <= MAX_NEG:
        raise ValueError(f"fuse needs 1..{MAX_NEG} vectors, got {n}")
    if width < 1:
        raise ValueError("fuse needs a non-empty row")
    if mode not in FUSION_MODES:
        raise ValueError(f"unknown fusion mode {mode!r} (expected one of {', '.join(FUSION_MODES)})")
    _k_pct32(k_pct)
    _check_finite(d)

    masked = np.stack([mask_top_k(row, k_pct) for row in d])  # [n, W] float32
    nonzero = masked != 0                                      # [n, W]
    if elect:
        s = elect_signs(masked)                                # [W] ±1
        agree = nonzero & (np.sign(masked) == s)               # [n, W]
    else:
        agree = nonzero
    m64 = masked.astype(np.float64)                            # [n, W]
    vals = np.where(agree, m64, 0.0)                           # [n, W], non-agreeing entries zeroed

    if mode == "max":
        if elect:
            out = s * np.max(np.abs(vals), axis=0)             # [W]; 0 where none agrees
        else:
            first_max = np.argmax(np.abs(vals), axis=0)        # [W], first j on ties
            out = vals[first_max, np.arange(width)]
    else:
        total = np.zeros(width)                                # [W] float64, summed in j order
        for j in range(n):
            total += vals[j]
        if mode == "sum":
            out = total
        else:
            count = agree.sum(axis=0)                          # [W] |A_c|
            out = np.where(count > 0, total / np.maximum(count, 1), 0.0)
    fused = np.asarray(out, dtype=np.float32) + np.float32(0)  # + 0 turns -0 into +0, like the C++
    return rescale_to_mean_delta(fused, d, norm_heads) if norm_heads else fused
