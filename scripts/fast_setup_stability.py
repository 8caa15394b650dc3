"""How few labelled texts keep the fast setup's direction stable: the directions built from 16, 32,
64 and 128 texts per class (autosetup.grid.build_directions, records 1000-1599) against a reference
file (the shipped universal directions, 300 per class): per-head cosine over the last third of the
layers, the median per-head norm ratio, and the cosine with the previous size.

    python scripts/fast_setup_stability.py [-m MODEL.gguf] REFERENCE.universal.gguf [-t 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from fgdilp_cpp import Detoxifier
from fgdilp_cpp.autosetup.grid import build_directions
from fgdilp_cpp.method.vectors import HeadDirections

SIZES = [(16, 4), (32, 8), (64, 8), (128, 16)]


def head_cosines(a: np.ndarray, b: np.ndarray, first: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-head cosine and norm ratio a/b over layers first.. ([n_layer, n_head, head_dim] each)."""
    a, b = a[first:].astype(np.float64), b[first:].astype(np.float64)
    na, nb = np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
    return (a * b).sum(-1) / (na * nb + 1e-12), na / (nb + 1e-12)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("reference")
    ap.add_argument("-m", "--model", default=None)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--chat", action="store_true", help="the prompts that give the lengths as user messages")
    a = ap.parse_args(argv)
    ref = HeadDirections.load(a.reference).directions
    first = ref.shape[0] - max(1, round(ref.shape[0] / 3))
    prev = None
    with Detoxifier.from_file(a.model, threads=a.threads, profile=False, auto_setup=False) as det:
        for per_class, prompts in SIZES:
            t0 = time.perf_counter()
            hd = build_directions(det, per_class, prompts, chat=a.chat)
            cos, ratio = head_cosines(hd.directions, ref, first)
            line = {"per_class": per_class, "prompts": prompts, "s": round(time.perf_counter() - t0, 1),
                    "cos_mean": round(float(cos.mean()), 3), "cos_p10": round(float(np.percentile(cos, 10)), 3),
                    "cos_min": round(float(cos.min()), 3), "norm_ratio_median": round(float(np.median(ratio)), 3)}
            if prev is not None:
                line["cos_with_previous"] = round(float(head_cosines(hd.directions, prev, first)[0].mean()), 3)
            prev = hd.directions
            print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
