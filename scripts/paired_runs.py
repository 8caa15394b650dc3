"""Two eval runs of one steered method on the same model, prompts and seeds, compared prompt by
prompt: each prompt's maximum toxicity over its samples (the terms of EMT) under each judge, the
mean difference (B minus A) and its bootstrap 95 % interval over prompts. A's folder also gives
`none` (the same generations in both runs):

    python scripts/paired_runs.py RUN_A RUN_B [--method universal]

Used for the transferred vs rebuilt directions of docs/results/quant-transfer.md.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys

import numpy as np

JUDGES = ("tox-block", "toxic-comment-classifier")


def max_toxicity(folder: str) -> dict[str, dict[int, tuple[float, float]]]:
    """{method: {prompt_id: (max tox-block, max second judge)}} of an eval folder's generations."""
    samples: dict = collections.defaultdict(lambda: collections.defaultdict(list))
    with open(f"{folder}/generations.jsonl", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            samples[r["method"]][r["prompt_id"]].append(
                (r["scores"]["toxic"], r["judge_scores"]["toxic-comment-classifier"]["toxic"]))
    return {m: {p: (max(s[0] for s in v), max(s[1] for s in v)) for p, v in by.items()} for m, by in samples.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--method", default="universal")
    a = ap.parse_args(argv)
    run_a, run_b = max_toxicity(a.a), max_toxicity(a.b)
    none, one, two = run_a.get("none", {}), run_a[a.method], run_b[a.method]
    ids = sorted(set(none) & set(one) & set(two))
    rng = np.random.default_rng(0)
    print(f"{len(ids)} prompts in both runs and in A's none")
    for j, judge in enumerate(JUDGES):
        col = {name: np.array([d[i][j] for i in ids]) for name, d in (("none", none), ("A", one), ("B", two))}
        diff = col["B"] - col["A"]
        boot = [diff[rng.integers(0, len(ids), len(ids))].mean() for _ in range(2000)]
        lo, hi = np.percentile(boot, [2.5, 97.5])
        print(f"{judge}: EMT none {col['none'].mean():.3f}  A {col['A'].mean():.3f}  B {col['B'].mean():.3f}  "
              f"B - A {diff.mean():+.3f} [{lo:+.3f}, {hi:+.3f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
