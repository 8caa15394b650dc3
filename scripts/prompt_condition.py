"""What a prompt-level condition would give, read from a finished eval run: steer only the prompts
the offline scorer reads as toxic (toxicity >= THETA), leave the others unsteered.

An unsteered prompt's samples are none's own records of the same run (same prompts and seeds), so
no generation is needed; the steered variant's records stand for the flagged prompts. Prints per
variant EMT, TP (judge's 'toxic' > 0.5) and corpus perplexity ratio (generator judge) for none, the
variant as run, and the variant under the condition, with paired bootstrap differences to none.
(A real conditioned run decodes the unflagged prompts in other batches than none did, so its
samples may differ by the engine's float noise; the figures here are none's.)

    .venv/bin/python scripts/prompt_condition.py RUN_DIR --variant VARIANT [--theta 0.2] [--judge tcc]
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np

from fgdilp_cpp.evaluation.judge_metrics import judge_score
from fgdilp_cpp.evaluation.metrics import any_toxic, max_toxicity, paired_bootstrap_ci
from fgdilp_cpp.evaluation.records import GENERATION_SCHEMA, read_valid
from fgdilp_cpp.evaluation.sweep import variant_name

JUDGE_NAMES = {"tcc": "toxic-comment-classifier"}


def conditioned(run_dir: Path, variant: str, theta: float, judge: str = "", flags: dict | None = None,
                n_boot: int = 1000) -> dict:
    """{"flagged": share of prompts steered, "rows": {name: {emt, tp, ppl_ratio[, emt_delta, tp_delta]}}}.
    flags: {prompt_id: steered?} instead of the scorer's reading (tests)."""
    recs, _ = read_valid(run_dir / "generations.jsonl", GENERATION_SCHEMA)
    by: dict[str, dict[tuple[int, int], dict]] = defaultdict(dict)
    for r in recs:
        by[variant_name(r["method"], r.get("point"))][(int(r["prompt_id"]), int(r["sample"]))] = r
    if variant not in by or "none" not in by:
        raise SystemExit(f"{run_dir} has no records of none and {variant!r} (it has: {', '.join(sorted(by))})")
    none, steered = by["none"], by[variant]
    prompts = {pid: r["prompt"] for (pid, _), r in none.items()}
    pids = sorted(prompts)
    if flags is None:
        from fgdilp_cpp.toxicity.scorer import ToxicityScorer

        tox = np.asarray(ToxicityScorer.load().score([prompts[p] for p in pids]))[:, 0]
        flags = {p: bool(t >= theta) for p, t in zip(pids, tox)}
    variants = {"none": none, variant: steered,
                f"{variant} if prompt >= {theta}": {k: (steered[k] if flags[k[0]] else r) for k, r in none.items()}}
    rows, base = {}, None
    for name, got in variants.items():
        per = defaultdict(list)
        for (pid, _), r in sorted(got.items()):
            per[pid].append(judge_score(r, judge, "", "toxic"))     # "": the run's first judge ("scores")
        scores = [np.asarray(per[p]) for p in pids]
        emt, tp = max_toxicity(scores), any_toxic(scores)
        nll = sum(r["nll"]["self"][0] for r in got.values()) / sum(r["nll"]["self"][1] for r in got.values())
        row = {"emt": float(emt.mean()), "tp": float(tp.mean()), "ppl": float(np.exp(nll))}
        if base is None:
            base = (emt, tp, row["ppl"])
        else:
            row["emt_delta"] = paired_bootstrap_ci(base[0], emt, n_boot=n_boot)
            row["tp_delta"] = paired_bootstrap_ci(base[1], tp, n_boot=n_boot)
        row["ppl_ratio"] = row["ppl"] / base[2]
        rows[name] = row
    return {"flagged": float(np.mean([flags[p] for p in pids])), "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--variant", required=True, help="e.g. 'fgdilp-frozen[steer_scale=0.6 gate=off]'")
    ap.add_argument("--theta", type=float, default=0.2)
    ap.add_argument("--judge", default="", help="toxicity judge of the records (default: the run's first; tcc)")
    a = ap.parse_args()
    res = conditioned(a.run_dir, a.variant, a.theta, JUDGE_NAMES.get(a.judge, a.judge))
    print(f"prompts steered (scorer toxicity >= {a.theta}): {res['flagged']:.2f}; judge {a.judge or 'first'}")
    for name, r in res["rows"].items():
        d = r.get("emt_delta")
        ds = f"{d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}]" if d else "-"
        print(f"{name:<60} EMT {r['emt']:.3f} {ds:>26}  TP {r['tp']:.3f}  PPL x{r['ppl_ratio']:.3f}")


if __name__ == "__main__":
    main()
