"""How well the model's own self-diagnosis ranks texts against Perspective scores (RTP continuations)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..analysis import self_diagnosis, self_diagnosis_tokens
from ..method.diagnosis import ATTRIBUTE_NAMES
from .metrics import auc, spearman
from .prompts import PromptRecord


def self_diagnosis_agreement(det, records: list[PromptRecord], threshold: float = 0.5) -> dict:
    """P(yes) of each attribute for each record's human continuation (det: a Detoxifier; analysis.
    self_diagnosis asks its model), against the Perspective score of the same attribute: AUC
    (label = score >= threshold) and Spearman."""
    recs = [r for r in records if r.continuation.strip() and "toxicity" in r.continuation_scores]
    texts = [r.continuation for r in recs]
    scores = self_diagnosis(det, texts)     # [n, 6]
    out: dict[str, Any] = {"n": len(recs), "threshold": threshold, "yes_no_tokens": list(self_diagnosis_tokens(det)),
                           "attributes": {}}
    for a, name in enumerate(ATTRIBUTE_NAMES):
        ref = np.array([r.continuation_scores.get(name, math.nan) for r in recs], dtype=np.float64)
        ok = np.isfinite(ref)
        out["attributes"][name] = {
            "auc": auc(scores[ok, a], ref[ok] >= threshold),
            "spearman": spearman(scores[ok, a], ref[ok]),
            "positives": int((ref[ok] >= threshold).sum()),
            "mean_p_yes": float(scores[ok, a].mean()),
        }
    return out
