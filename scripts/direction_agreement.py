"""How far two head-direction files of one model shape agree: the per-head cosine of the steered
rows (directions times head_weights, as the hook applies them) and the per-head norm ratio (B / A),
over a layer range, plus the agreement of the probe-selected heads:

    python scripts/direction_agreement.py A.universal.gguf B.universal.gguf --layers 15 17

Used to decide whether directions built on one quantisation may be applied to another
(docs/results/quant-transfer.md).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from fgdilp_cpp.method.vectors import HeadDirections


def agreement(a: HeadDirections, b: HeadDirections, first: int, last: int) -> dict:
    """Cosine / norm-ratio statistics over the heads of layers first..last (inclusive)."""
    if a.model.key() != b.model.key():
        raise SystemExit(f"not one shape: {a.model.key()} vs {b.model.key()}")
    ra, rb = (np.asarray(v.steering_rows(), dtype=np.float64)[first:last + 1] for v in (a, b))
    n_head, head_dim = a.model.n_head, a.model.head_dim
    ha, hb = ra.reshape(-1, n_head, head_dim), rb.reshape(-1, n_head, head_dim)
    na, nb = np.linalg.norm(ha, axis=-1), np.linalg.norm(hb, axis=-1)
    live = (na > 0) & (nb > 0)                  # heads a probe switched off in both have no direction
    cos = (ha * hb).sum(-1)[live] / (na[live] * nb[live])
    ratio = nb[live] / na[live]
    off_a, off_b = na == 0, nb == 0
    return {"layers": [first, last], "heads": int(na.size), "live_heads": int(live.sum()),
            "off_in_a_only": int((off_a & ~off_b).sum()), "off_in_b_only": int((off_b & ~off_a).sum()),
            "cos": _stats(cos), "norm_ratio": _stats(ratio),
            "layer_cos": [float(x) for x in _layer_cos(ra, rb)]}


def _stats(x: np.ndarray) -> dict:
    p = np.percentile(x, [5, 25, 50, 75])
    return {"mean": float(x.mean()), "min": float(x.min()), "p5": float(p[0]), "p25": float(p[1]),
            "median": float(p[2]), "p75": float(p[3]), "max": float(x.max())}


def _layer_cos(ra: np.ndarray, rb: np.ndarray) -> np.ndarray:
    """Cosine of whole layer rows (all heads together), one per layer."""
    return (ra * rb).sum(-1) / np.maximum(np.linalg.norm(ra, axis=-1) * np.linalg.norm(rb, axis=-1), 1e-30)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--layers", type=int, nargs=2, metavar=("FIRST", "LAST"), required=True)
    a = ap.parse_args(argv)
    out = agreement(HeadDirections.load(a.a), HeadDirections.load(a.b), *a.layers)
    print(f"layers {out['layers'][0]}-{out['layers'][1]}: {out['heads']} heads, {out['live_heads']} steered in both "
          f"(off in A only {out['off_in_a_only']}, in B only {out['off_in_b_only']})")
    for what in ("cos", "norm_ratio"):
        s = out[what]
        print(f"{what:>10}: mean {s['mean']:.4f}  min {s['min']:.4f}  p5 {s['p5']:.4f}  p25 {s['p25']:.4f}  "
              f"median {s['median']:.4f}  p75 {s['p75']:.4f}  max {s['max']:.4f}")
    print("layer cos: " + "  ".join(f"{x:.4f}" for x in out["layer_cos"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
