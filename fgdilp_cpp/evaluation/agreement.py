"""How well any diagnoser ranks texts against Perspective: the agreement table of a
``scores(texts) -> [n, 6]`` callable (ATTRIBUTE_NAMES order) on the RTP human continuations.

``selfdiag.self_diagnosis_agreement`` is this with the model's own P(yes) as the scores;
``scorer_agreement`` is this with the offline scorer as diagnoser (method.scorer_diagnosis);
``judge_agreement`` is a toxicity judge's own labels against their Perspective counterparts.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import FgdilpError
from ..method.diagnosis import ATTRIBUTE_NAMES
from ..toxicity.scorer import LABELS, PERSPECTIVE_OF
from .metrics import auc, spearman
from .prompts import PromptRecord


def diagnosis_agreement(scores: Callable[[list[str]], np.ndarray], records: Sequence[PromptRecord],
                        threshold: float = 0.5) -> dict:
    """The diagnoser's score of each attribute for each record's human continuation, against the
    Perspective score of the same attribute: AUC (label = score >= threshold) and Spearman.
    Records without a continuation or without a Perspective toxicity score are left out; per
    attribute, records without that attribute's score too."""
    recs = [r for r in records if r.continuation.strip() and "toxicity" in r.continuation_scores]
    texts = [r.continuation for r in recs]
    s = np.asarray(scores(texts), dtype=np.float64) if recs else np.zeros((0, len(ATTRIBUTE_NAMES)))
    if s.shape != (len(recs), len(ATTRIBUTE_NAMES)):
        raise FgdilpError(f"the diagnoser returned shape {s.shape}, expected {(len(recs), len(ATTRIBUTE_NAMES))}")
    out: dict[str, Any] = {"n": len(recs), "threshold": threshold, "attributes": {}}
    for a, name in enumerate(ATTRIBUTE_NAMES):
        ref = np.array([_num(r.continuation_scores.get(name)) for r in recs], dtype=np.float64)
        ok = np.isfinite(ref)
        pos = ref[ok] >= threshold
        out["attributes"][name] = {
            "auc": auc(s[ok, a], pos) if ok.any() else math.nan,
            "spearman": spearman(s[ok, a], ref[ok]) if ok.sum() > 1 else math.nan,
            "positives": int(pos.sum()),
            "n": int(ok.sum()),
            "mean_score": float(s[ok, a].mean()) if ok.any() else math.nan,
        }
    return out


def scorer_agreement(scorer, records: Sequence[PromptRecord], threshold: float = 0.5) -> dict:
    """diagnosis_agreement of the offline scorer used as diagnoser (its labels mapped onto the
    attributes by method.scorer_diagnosis)."""
    from ..method.scorer_diagnosis import SCORER_LABEL_OF, ScorerDiagnoser

    diag = ScorerDiagnoser(scorer)
    out = diagnosis_agreement(diag.scores, records, threshold)
    out["diagnoser"] = {"source": "scorer", "judge": diag.name, "labels": dict(SCORER_LABEL_OF)}
    return out


def _num(x) -> float:
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return float(x)
    return math.nan


__all__ = ["diagnosis_agreement", "scorer_agreement"]


def judge_agreement(scorer, records: Sequence[PromptRecord], batch_size: int = 256) -> dict:
    """Agreement of each of a toxicity judge's labels with its Perspective counterpart on the
    records' continuations (any judge whose labels are among ``PERSPECTIVE_OF``).

    Records with an empty continuation are skipped; per label, records whose Perspective score is
    missing (None) are left out of that label's AUC (positive: Perspective >= 0.5) and Spearman.
    """
    labels = tuple(getattr(scorer, "labels", LABELS))
    recs = [r for r in records if r.continuation and r.continuation.strip()]
    probs = scorer.score([r.continuation for r in recs], batch_size=batch_size) if recs \
        else np.zeros((0, len(labels)))
    out: dict[str, Any] = {"judge": getattr(scorer, "name", None), "n": len(recs), "labels": {}}
    for j, label in enumerate(labels):
        name = PERSPECTIVE_OF[label]
        ref, ours = [], []
        for r, p in zip(recs, probs[:, j]):
            v = (r.continuation_scores or {}).get(name)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                ref.append(float(v))
                ours.append(float(p))
        ref_a, ours_a = np.asarray(ref), np.asarray(ours)
        pos = ref_a >= 0.5
        out["labels"][label] = {
            "perspective": name,
            "n": int(len(ref_a)),
            "positives": int(pos.sum()),
            "auc": auc(ours_a, pos) if len(ref_a) else float("nan"),
            "spearman": spearman(ours_a, ref_a) if len(ref_a) > 1 else float("nan"),
        }
    return out
