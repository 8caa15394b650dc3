"""How well a prompt-level condition (docs/method.md §2.10) separates toxic prompts from benign
text of two kinds: the share of benign prompts it leaves unsteered (their output is the unsteered
output bit for bit) and the share of toxic prompts it steers. No generation.

    python scripts/condition_measure.py rules [--thetas 0.01,0.05,...]
    python scripts/condition_measure.py probe [-m MODEL.gguf] [-t 2] [--per-class 150]
    python scripts/condition_measure.py pick --theta 0.25 [--below 10 --above 2] > prompts.txt

The sets (development parts only; the test parts are for validation):
- toxic: rtp-toxic, even ids below TRAIN_FROM (the records from TRAIN_FROM on are the texts the
  fast setup builds from, and the probe's training texts here);
- rtp-benign and everyday-benign: even ids.

`rules` reads each prompt with the two offline judges (tox-block, toxic-comment-classifier; their
"toxic" label) and tries each judge alone and simple combinations (both >= θ, either >= θ, the mean),
and tox-block's other labels, over a grid of θ. `probe` is CAST's idea: a linear probe (shrinkage LDA) on the model's kqv_out rows
at the prompt's last token, one per layer, fitted on labelled RTP texts of the records from
TRAIN_FROM on (never the sets it is judged on); a layer is chosen on a held-out part of those texts,
and the threshold is a quantile of the training clean texts' scores.
docs/results/condition-benign.md records what both printed.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Callable, Sequence

import numpy as np

TRAIN_FROM = 1000                       # autosetup.grid.DIRECTION_OFFSET: the setup's texts start here
TARGET_BENIGN, TARGET_TOXIC = 0.95, 0.85
THETAS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.5)
SHRINK = 0.3                            # method.probes.SHRINK: covariance shrinkage toward its mean variance
CLEAN_QUANTILES = (0.5, 0.75, 0.9, 0.95, 0.975, 0.99)


def eval_sets() -> dict[str, list[str]]:
    """{set name: prompt texts}: the toxic development prompts and both benign development parts."""
    from fgdilp_cpp.evaluation.prompts import load_prompts

    return {"rtp-toxic": [r.text for r in load_prompts("rtp-toxic") if r.id % 2 == 0 and r.id < TRAIN_FROM],
            "rtp-benign": [r.text for r in load_prompts("rtp-benign") if r.id % 2 == 0],
            "everyday-benign": [r.text for r in load_prompts("everyday-benign") if r.id % 2 == 0]}


def shares(scores: dict[str, np.ndarray], theta: float) -> tuple[float, float, float]:
    """(rtp-benign left unsteered, everyday-benign left unsteered, rtp-toxic steered) at θ."""
    return (float(np.mean(scores["rtp-benign"] < theta)), float(np.mean(scores["everyday-benign"] < theta)),
            float(np.mean(scores["rtp-toxic"] >= theta)))


def best_theta(scores: dict[str, np.ndarray], benign_floor: float = TARGET_BENIGN) -> tuple[float, float]:
    """(θ, toxic steered): the θ that steers the most toxic prompts while leaving at least
    benign_floor of each benign set unsteered (the smallest such θ)."""
    for theta in np.unique(np.concatenate(list(scores.values()))):
        b1, b2, tox = shares(scores, float(theta))
        if b1 >= benign_floor and b2 >= benign_floor:
            return float(theta), tox
    return float("inf"), 0.0


# rule -> reading of a text from the two judges' six labels ([n, 6] each; column 0 is "toxic", 4 "insult")
RULES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "tox-block": lambda a, b: a[:, 0],
    "toxic-comment-classifier": lambda a, b: b[:, 0],
    "both >= θ (min)": lambda a, b: np.minimum(a[:, 0], b[:, 0]),
    "either >= θ (max)": lambda a, b: np.maximum(a[:, 0], b[:, 0]),
    "mean": lambda a, b: (a[:, 0] + b[:, 0]) / 2,
    "tox-block, any of its six labels (max)": lambda a, b: a.max(axis=1),
    "tox-block insult": lambda a, b: a[:, 4],
}


def rules(thetas: Sequence[float]) -> int:
    from fgdilp_cpp.evaluation.judges import load_judges

    sets = eval_sets()
    judges = load_judges("toxblock,tcc")
    raw = {name: [np.asarray(j.score(texts)) for j in judges.values()] for name, texts in sets.items()}
    print("sizes: " + ", ".join(f"{k} {len(v)}" for k, v in sets.items()))
    print("\n| rule | θ | rtp-benign unsteered | everyday-benign unsteered | rtp-toxic steered |\n|---|---|---|---|---|")
    best = []
    for rule, f in RULES.items():
        scores = {name: f(*pair) for name, pair in raw.items()}
        for theta in thetas:
            b1, b2, tox = shares(scores, theta)
            mark = " **meets**" if min(b1, b2) >= TARGET_BENIGN and tox >= TARGET_TOXIC else ""
            print(f"| {rule} | {theta:g} | {b1:.3f} | {b2:.3f} | {tox:.3f}{mark} |")
        best.append((rule, *best_theta(scores), auc(scores["rtp-toxic"], scores["rtp-benign"]),
                     auc(scores["rtp-toxic"], scores["everyday-benign"])))
    print(f"\nlargest share of toxic prompts steered with >= {TARGET_BENIGN:.0%} of both benign sets unsteered:")
    for rule, theta, tox, auc_rtp, auc_every in best:
        print(f"  {rule}: θ {theta:.3f} steers {tox:.3f} (AUC toxic vs rtp-benign {auc_rtp:.3f}, "
              f"vs everyday-benign {auc_every:.3f})")
    return 0


def lda(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """(w, b): shrinkage LDA separating y (toxic) from ~y on rows X [n, D]; score = X @ w + b."""
    mu0, mu1 = X[~y].mean(axis=0), X[y].mean(axis=0)
    centred = np.concatenate([X[~y] - mu0, X[y] - mu1])
    cov = centred.T @ centred / max(1, len(centred) - 2)
    D = X.shape[1]
    reg = (1 - SHRINK) * cov + SHRINK * (np.trace(cov) / D + 1e-12) * np.eye(D)
    w = np.linalg.solve(reg, mu1 - mu0)
    return w, float(-w @ (mu0 + mu1) / 2)


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(a positive scores above a negative), ties half."""
    allv = np.concatenate([pos, neg])
    ranks = np.argsort(np.argsort(allv, kind="stable"), kind="stable").astype(np.float64) + 1
    for v in np.unique(allv):                      # average ranks of ties
        m = allv == v
        if m.sum() > 1:
            ranks[m] = ranks[m].mean()
    return float((ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def training_texts(per_class: int, exclude: set[str]) -> tuple[list[str], np.ndarray, list[str]]:
    """(texts, toxic labels, kinds): the toxic (Perspective >= 0.5) and clean (< 0.1) human
    continuations of the records from TRAIN_FROM on (labelled_records), and those records'
    prompts as further toxic texts (every rtp-toxic prompt reads >= 0.5 to Perspective); texts of
    the evaluated sets are left out."""
    from fgdilp_cpp.evaluation.prompts import load_prompts
    from fgdilp_cpp.universal import labelled_records

    pool = [r for r in load_prompts("rtp-toxic", None, TRAIN_FROM) if r.continuation.lstrip() not in exclude]
    recs, labels, _ = labelled_records(pool, per_class)
    texts = [r.continuation.lstrip() for r in recs] + [r.text for r in recs[:per_class]]
    kinds = ["continuation"] * len(recs) + ["prompt"] * min(per_class, len(recs))
    return texts, np.concatenate([labels, np.ones(len(texts) - len(recs), dtype=bool)]), kinds


def probe(model: str | None, threads: int, per_class: int) -> int:
    from fgdilp_cpp import Detoxifier
    from fgdilp_cpp.universal import last_token_rows

    sets = eval_sets()
    texts, y, kinds = training_texts(per_class, set(sets["rtp-benign"]))
    t0 = time.perf_counter()
    with Detoxifier.from_file(model, threads=threads, profile=False) as det:
        rt = det.generator.rt
        info = det.model.info
        rows = {name: last_token_rows(rt, t, threads, 512) for name, t in [("train", texts), *sets.items()]}
    took = time.perf_counter() - t0
    n_texts = sum(len(v) for v in rows.values())
    print(f"model {info.architecture} {info.n_layer} layers x {info.n_head} heads x {info.head_dim}; "
          f"rows of {n_texts} texts in {took:.0f} s; training texts: {int(y.sum())} toxic "
          f"({kinds.count('prompt')} of them prompts), {int((~y).sum())} clean")
    rng = np.random.default_rng(0)
    held = np.zeros(len(y), dtype=bool)
    held[rng.permutation(len(y))[:len(y) // 4]] = True
    flat = {k: v.reshape(len(v), info.n_layer, -1).astype(np.float64) for k, v in rows.items()}
    layer_auc = []
    for layer in range(info.n_layer):
        w, b = lda(flat["train"][~held, layer], y[~held])
        s = flat["train"][held, layer] @ w + b
        layer_auc.append(auc(s[y[held]], s[~y[held]]))
    layer = int(np.argmax(layer_auc))
    print("held-out AUC by layer: " + " ".join(f"{i}:{a:.3f}" for i, a in enumerate(layer_auc)))
    w, b = lda(flat["train"][:, layer], y)
    clean_train = flat["train"][~y, layer] @ w + b
    scores = {k: flat[k][:, layer] @ w + b for k in sets}
    print(f"\nlayer {layer}; AUC toxic vs rtp-benign {auc(scores['rtp-toxic'], scores['rtp-benign']):.3f}, "
          f"vs everyday-benign {auc(scores['rtp-toxic'], scores['everyday-benign']):.3f}")
    print("\n| threshold (quantile of clean training texts) | rtp-benign unsteered | everyday-benign unsteered | "
          "rtp-toxic steered |\n|---|---|---|---|")
    for q in CLEAN_QUANTILES:
        b1, b2, tox = shares(scores, float(np.quantile(clean_train, q)))
        mark = " **meets**" if min(b1, b2) >= TARGET_BENIGN and tox >= TARGET_TOXIC else ""
        print(f"| {q:g} | {b1:.3f} | {b2:.3f} | {tox:.3f}{mark} |")
    theta, tox = best_theta(scores)
    print(f"\nbest on these sets (an upper bound, θ chosen on them): steers {tox:.3f} of the toxic prompts "
          f"with >= {TARGET_BENIGN:.0%} of both benign sets unsteered")
    return 0


def pick(theta: float, n_below: int, n_above: int) -> int:
    """Print the first n_below everyday-benign development prompts that tox-block reads below θ and
    the first n_above it reads at or above θ, one a line (input for `generate -f`)."""
    from fgdilp_cpp.toxicity.scorer import ToxicityScorer

    texts = eval_sets()["everyday-benign"]
    tox = np.asarray(ToxicityScorer.load().score(texts))[:, 0]
    below = [t for t, x in zip(texts, tox) if x < theta][:n_below]
    above = [t for t, x in zip(texts, tox) if x >= theta][:n_above]
    print("\n".join(below + above))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    r = sub.add_parser("rules", help="the offline judges' rules over a grid of θ")
    r.add_argument("--thetas", default=",".join(map(str, THETAS)))
    p = sub.add_parser("probe", help="a linear probe on the model's last-token kqv_out rows")
    p.add_argument("-m", "--model", default=None, help="a GGUF (default: the embedded gemma-3-270m)")
    p.add_argument("-t", "--threads", type=int, default=2)
    p.add_argument("--per-class", type=int, default=150, help="toxic and clean training continuations, each")
    k = sub.add_parser("pick", help="benign prompts below and above θ, for a generate check")
    k.add_argument("--theta", type=float, required=True)
    k.add_argument("--below", type=int, default=10)
    k.add_argument("--above", type=int, default=2)
    a = ap.parse_args(argv)
    if a.what == "pick":
        return pick(a.theta, a.below, a.above)
    if a.what == "rules":
        return rules([float(x) for x in a.thetas.split(",")])
    return probe(a.model, a.threads, a.per_class)


if __name__ == "__main__":
    sys.exit(main())
