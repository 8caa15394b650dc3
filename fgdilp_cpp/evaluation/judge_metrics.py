"""Toxicity per judge in the evaluation report: EMT, TP and their bootstrap intervals under every
toxicity judge whose scores the records hold, and which judge also served as FGDILP's diagnoser.

A record holds the first (primary) judge's probabilities in ``"scores"`` and every other judge's
in ``"judge_scores": {judge: {label: p}}``. A judge that also diagnosed (``--diagnoser scorer``)
ranked FGDILP's own samples, so its verdict on FGDILP is not independent: the report marks it and
says so when it is the only judge.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from .metrics import any_toxic, bootstrap_ci, max_toxicity, paired_bootstrap_ci


def tox_judges_of(records: Sequence[dict], primary: str) -> list[str]:
    """The primary judge, then the others in the order they first appear in ``judge_scores``."""
    out: dict[str, None] = {primary: None}
    for r in records:
        for k in (r.get("judge_scores") or {}):
            out.setdefault(str(k), None)
    return list(out)


def judge_score(rec: dict, judge: str, primary: str, label: str) -> float:
    """The judge's ``label`` probability of one record; nan when the record has none."""
    scores = rec.get("scores") if judge == primary else (rec.get("judge_scores") or {}).get(judge)
    v = (scores or {}).get(label) if isinstance(scores, dict) else None
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    return math.nan


def _num(x) -> Optional[float]:
    x = float(x)
    return x if math.isfinite(x) else None


def per_judge(groups: dict[str, list[list[dict]]], judges: Sequence[str], primary: str, tox_label: str,
              threshold: float, baseline: Optional[str], n_boot: int, seed: int, alpha: float) -> dict:
    """{method: {judge: {"emt", "tp", "n_prompts", "ci_abs", "ci"}}} from each method's samples
    grouped by prompt (the same prompts, in the same order, for every method). A prompt counts for
    a judge when all of its samples carry that judge's score; paired intervals use the prompts
    both sides count."""
    pp: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    for m, gs in groups.items():
        pp[m] = {}
        for j in judges:
            tox = [np.array([judge_score(r, j, primary, tox_label) for r in g]) for g in gs]
            ok = np.array([bool(np.all(np.isfinite(t))) for t in tox], dtype=bool)
            emt = max_toxicity(tox) if tox else np.zeros(0)
            tp = any_toxic(tox, threshold) if tox else np.zeros(0)
            emt[~ok] = np.nan
            tp[~ok] = np.nan
            pp[m][j] = {"emt": emt, "tp": tp}
    out: dict[str, dict] = {}
    for m in groups:
        out[m] = {}
        for j in judges:
            v = pp[m][j]
            ok = np.isfinite(v["emt"])
            entry = {"emt": _num(v["emt"][ok].mean()) if ok.any() else None,
                     "tp": _num(v["tp"][ok].mean()) if ok.any() else None,
                     "n_prompts": int(ok.sum()),
                     "ci_abs": {k: [_num(x) for x in bootstrap_ci(v[k][ok], n_boot=n_boot, seed=seed,
                                                                  alpha=alpha)]
                                for k in ("emt", "tp")} if ok.any() else {}}
            if baseline in pp and m != baseline:
                b = pp[baseline][j]
                both = ok & np.isfinite(b["emt"])
                entry["ci"] = {k: [_num(x) for x in paired_bootstrap_ci(b[k][both], v[k][both], n_boot=n_boot,
                                                                        seed=seed, alpha=alpha)]
                               for k in ("emt", "tp")}
            out[m][j] = entry
    return out


def judges_markdown(report: dict, fmt, fmt_ci, table) -> list[str]:
    """The "Toxicity per judge" section (empty when there is one judge and it did not diagnose)."""
    judges, diag = report.get("tox_judges") or [], report.get("diagnoser_judge")
    if len(judges) < 2 and diag is None:
        return []
    out = ["## Toxicity per judge", ""]
    rows = []
    for name, m in report["methods"].items():
        for j in judges:
            s = (m.get("tox_judges") or {}).get(j)
            if s is None:
                continue
            ci = s.get("ci", {})
            rows.append([name, j, "yes" if j == diag else "", fmt(s["emt"]), fmt_ci(ci.get("emt")),
                         fmt(s["tp"]), fmt_ci(ci.get("tp")), str(s["n_prompts"])])
    out += [table(["method", "judge", "diagnoser", "EMT", "Δ EMT [95 % CI]", "TP", "Δ TP [95 % CI]",
                   "prompts"], rows), ""]
    if diag is not None:
        others = [j for j in judges if j != diag]
        if diag not in judges:
            out += [f"The diagnoser `{diag}` is not among the judges.", ""]
        elif others:
            out += [f"`{diag}` also ranked FGDILP's samples (diagnoser): its verdict on FGDILP is not "
                    f"independent; {', '.join(f'`{j}`' for j in others)} did not diagnose.", ""]
        else:
            out += [f"**`{diag}` is the only judge and also ranked FGDILP's samples (diagnoser): no "
                    "independent judge of FGDILP in this report.**", ""]
    return out


__all__ = ["tox_judges_of", "judge_score", "per_judge", "judges_markdown"]
