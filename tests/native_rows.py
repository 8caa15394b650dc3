"""The native edit and fusion rules applied to one row from Python (libfgdilp's fgdilp_tr_edit_row,
fgdilp_edit_row, fgdilp_fuse): what the tests hold against the numpy references of method/ (C++ =
numpy for every rule). The hook itself runs the same C functions inside the graph (native.py)."""

from __future__ import annotations

import ctypes

import numpy as np

from fgdilp_cpp.errors import FgdilpError
from fgdilp_cpp.native import (EDIT_RULE_IDS, ERR_ARG, ERR_NONFINITE, OK, FusionError, as_fptr,
                               fusion_params, load_library)


def tr_edit_row(v, delta, e, n_head: int, exp_norm: float, exp_sim: float, scale: float = 1.0,
                renorm: bool = True) -> np.ndarray:
    """The native TR edit of one row (for tests against the numpy reference); returns a new row."""
    lib = load_library()
    out = np.array(v, dtype=np.float32, copy=True)
    d = np.ascontiguousarray(delta, dtype=np.float32)
    ev = None if e is None else np.ascontiguousarray(e, dtype=np.float32)
    head_dim = out.size // n_head
    rc = lib.fgdilp_tr_edit_row(as_fptr(out), as_fptr(d), None if ev is None else as_fptr(ev), n_head,
                                head_dim, exp_norm, exp_sim, scale, renorm)
    if rc != OK:
        raise FgdilpError(f"fgdilp_tr_edit_row failed ({rc})")
    return out


def edit_row(v, delta, e, n_head: int, *, rule: str = "subtract", exp_norm: float = 0.4, exp_sim: float = 0.6,
             scale: float = 1.0, renorm: bool = True, gate: float | None = None,
             head_scales=None) -> tuple[np.ndarray, int]:
    """The native edit (fgdilp_edit_row) of one row, as the hook runs it: (new row, heads edited).
    For tests against method/steering.py; gate None = off; head_scales [n_head] or None."""
    lib = load_library()
    if rule not in EDIT_RULE_IDS:
        raise FgdilpError(f"unknown edit rule {rule!r} (expected one of {', '.join(EDIT_RULE_IDS)})")
    out = np.array(v, dtype=np.float32, copy=True)
    d = np.ascontiguousarray(delta, dtype=np.float32)
    ev = None if e is None else np.ascontiguousarray(e, dtype=np.float32)
    hs = None if head_scales is None else np.ascontiguousarray(head_scales, dtype=np.float32)
    if d.size != out.size or (ev is not None and ev.size != out.size) or (hs is not None and hs.size != n_head):
        raise FgdilpError("edit_row: delta, e and v need the same size, head_scales n_head values")
    p = lib.fgdilp_edit_default_params()
    p.rule, p.exp_norm, p.exp_sim, p.scale, p.renorm = EDIT_RULE_IDS[rule], exp_norm, exp_sim, scale, renorm
    p.gated, p.gate = gate is not None, 0.0 if gate is None else gate
    rc = lib.fgdilp_edit_row(as_fptr(out), as_fptr(d), None if ev is None else as_fptr(ev),
                             None if hs is None else as_fptr(hs), n_head, out.size // n_head, ctypes.byref(p))
    if rc < 0:
        raise FgdilpError(f"fgdilp_edit_row failed ({rc})")
    return out, rc


def fuse(deltas, k_pct: float = 50.0, mode: str | int = "max", elect: bool = True,
         norm_heads: int = 0) -> np.ndarray:
    """The native fusion (fgdilp_fuse) of deltas [n, W] -> float32 [W]; see method/fusion.py.
    norm_heads > 0: each of that many head blocks rescaled to the mean delta's norm (--fused-norm mean-delta).

    Raises FusionError (a ValueError) where the C function refuses its input."""
    lib = load_library()
    d = np.ascontiguousarray(deltas, dtype=np.float32)
    if d.ndim != 2:
        raise FusionError(f"fuse needs deltas [n, W], got shape {d.shape}", ERR_ARG)
    n, width = d.shape
    p = fusion_params(lib, k_pct, mode, elect, norm_heads)
    out = np.zeros(max(width, 1), np.float32)
    src = d if d.size else np.zeros(1, np.float32)  # a valid pointer even for n = 0 or W = 0
    rc = lib.fgdilp_fuse(as_fptr(src), n, width, ctypes.byref(p), as_fptr(out))
    if rc == ERR_NONFINITE:
        raise FusionError("fusion input holds NaN or inf", rc)
    if rc != OK:
        raise FusionError(f"fgdilp_fuse refused n={n}, width={width}, K={k_pct}, mode={mode!r}, "
                          f"norm_heads={norm_heads} (status {rc})", rc)
    return out[:width]


__all__ = ["edit_row", "fuse", "tr_edit_row"]
