"""Teacher-forced scores of a grid of steering points for a model, against a random control of the
same per-head norms (fgdilp_cpp/autosetup; issue 23): the measurements a fast setup chooses from.

    python scripts/fast_setup_grid.py [-m MODEL.gguf] [--vectors FILE] [--ranges 15-17,12-17]
        [--scales 0.4,0.8,1.6] [--per-class 16] [--direction-per-class 96] [--prompts 16] [-t 2]

Without --vectors it builds the model's universal directions from labelled text first (on records
the scores never use). Prints one line per point and the tokens decoded; docs/results/fast-setup-grid.md
records what it printed for the embedded models.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from fgdilp_cpp import Detoxifier
from fgdilp_cpp.autosetup.grid import build_directions, criterion_texts, score_points
from fgdilp_cpp.autosetup.points import candidate_ranges
from fgdilp_cpp.autosetup.scoring import SteeredNLL
from fgdilp_cpp.method.vectors import HeadDirections


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", default=None)
    ap.add_argument("--vectors", default=None, help="a directions file (default: build them from labelled text)")
    ap.add_argument("--ranges", default=None, help="layer ranges A-B,... (default: the last sixth, third, half)")
    ap.add_argument("--scales", default="0.4,0.8,1.6")
    ap.add_argument("--per-class", type=int, default=16, help="toxic and clean continuations scored, each")
    ap.add_argument("--direction-per-class", type=int, default=96)
    ap.add_argument("--prompts", type=int, default=16, help="prompts whose TR delta gives each head its length")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    with Detoxifier.from_file(a.model, threads=a.threads, profile=False) as det:
        hd = HeadDirections.load(a.vectors) if a.vectors else build_directions(det, a.direction_per_class, a.prompts)
        built = time.perf_counter() - t0
        ranges = ([tuple(int(x) for x in r.split("-")) for r in a.ranges.split(",")] if a.ranges
                  else candidate_ranges(det.model.info.n_layer))
        toxic, clean, benign = criterion_texts(a.per_class)
        with SteeredNLL(det.model, n_threads=a.threads, max_tokens=96) as judge:
            points, tokens = score_points(judge, hd, ranges, [float(s) for s in a.scales.split(",")],
                                          toxic, clean, benign)
    total = time.perf_counter() - t0
    if a.json:
        print(json.dumps({"points": [p.to_json() for p in points], "tokens": tokens, "directions_s": round(built, 1),
                          "total_s": round(total, 1)}, indent=1))
        return 0
    print("layers  scale  margin  random  specificity  fluency x  benign x")
    for p in points:
        print(f"{p.layer_range[0]}-{p.layer_range[1]:<4} {p.scale:5.2f}  {p.margin:+.3f}  {p.random_margin:+.3f}  "
              f"{p.specificity:11.2f}  {p.fluency_ratio:9.3f}  {p.benign_ratio:8.3f}")
    print(f"{tokens} tokens decoded; directions {built:.0f} s, all {total:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
