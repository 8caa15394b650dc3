"""The offline toxicity scorer as FGDILP's diagnoser: its six Jigsaw labels mapped onto the paper's six
attributes (diagnosis.ATTRIBUTES), so the self-generated samples can be ranked without asking the
model itself (self-diagnosis is near chance on small models: issue 11).

The mapping was chosen by measurement (docs/scorer-diagnosis.md): for each attribute, the scorer
label whose probability ranks the RealToxicityPrompts human continuations best against that
attribute's Perspective score (AUC, positive = Perspective >= 0.5; tox-block 0.1.2; first 300 / all
2113 continuations with scores). The mean or maximum of two labels never beat the attribute's own
label by more than 0.006 AUC, nor on both sets, so each attribute reads one label:

    toxicity          <- toxic          0.902 / 0.902
    sexually_explicit <- obscene        0.831 / 0.793   (no such label; toxic 0.817 / 0.791,
                                                         insult 0.810 / 0.784)
    threat            <- threat         0.759 / 0.801   (the next best, identity_hate: 0.691 / 0.733)
    identity_attack   <- identity_hate  0.811 / 0.827   (the next best, toxic: 0.721 / 0.722)
    profanity         <- obscene        0.945 / 0.928
    insult            <- insult         0.896 / 0.893   (toxic 0.892 / 0.892)

sexually_explicit and profanity therefore get identical scores: their two sub-toxicity
directions are built from the same ranking.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import FgdilpError
from .diagnosis import ATTRIBUTE_NAMES

# attribute (in ATTRIBUTE_NAMES order) -> the scorer label that diagnoses it
SCORER_LABEL_OF: dict[str, str] = {
    "toxicity": "toxic",
    "sexually_explicit": "obscene",
    "threat": "threat",
    "identity_attack": "identity_hate",
    "profanity": "obscene",
    "insult": "insult",
}


def label_columns(labels: Sequence[str]) -> list[int]:
    """For each attribute (ATTRIBUTE_NAMES order), the column of its label in a scorer's output."""
    labels = list(labels)
    missing = sorted({SCORER_LABEL_OF[a] for a in ATTRIBUTE_NAMES} - set(labels))
    if missing:
        raise FgdilpError(f"the scorer has no label {', '.join(missing)} (its labels: {labels}); "
                          "it cannot diagnose FGDILP's attributes")
    return [labels.index(SCORER_LABEL_OF[a]) for a in ATTRIBUTE_NAMES]


def attribute_scores(probs: np.ndarray, labels: Sequence[str]) -> np.ndarray:
    """Scorer probabilities [n, len(labels)] -> attribute scores [n, 6] in ATTRIBUTE_NAMES order."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] != len(labels):
        raise FgdilpError(f"scorer output of shape {probs.shape}, expected [n, {len(labels)}]")
    if not np.all(np.isfinite(probs)):
        raise FgdilpError("the scorer returned non-finite probabilities")
    return probs[:, label_columns(labels)]


def choose_diagnoser(choice: str, self_auc: float | None = None, scorer_auc: float | None = None) -> str:
    """Which diagnoser ranks the samples: "self" or "scorer". `auto` trusts self-diagnosis only where
    its measured AUC (on the calibration set, from a model profile) reaches the scorer's; without
    both figures it takes the scorer, since self-diagnosis is near chance on the small models this
    tool runs (issue 11: gemma-3-270m 0.39, SmolLM2-135M 0.42-0.61, scorer 0.90)."""
    if choice in ("self", "scorer"):
        return choice
    if choice != "auto":
        raise FgdilpError(f"unknown diagnoser {choice!r} (self, scorer or auto)")
    if self_auc is None or scorer_auc is None:
        return "scorer"
    if not (np.isfinite(self_auc) and np.isfinite(scorer_auc)):
        return "scorer"
    return "self" if self_auc >= scorer_auc else "scorer"


class ScorerDiagnoser:
    """Diagnoses texts with an offline toxicity scorer: ``scores(texts)`` -> [len(texts), 6] in
    ATTRIBUTE_NAMES order, the contract of the self-diagnoser's scores (without its llama context).

    scorer: anything with ``score(texts) -> [n, len(labels)]`` and ``labels`` (or ``LABELS``),
    e.g. ``ToxicityScorer.load()``."""

    source = "scorer"

    def __init__(self, scorer):
        labels = getattr(scorer, "labels", None) or getattr(scorer, "LABELS", None)
        if labels is None:
            raise FgdilpError("the diagnosing scorer does not say its labels")
        self.scorer = scorer
        self.labels = tuple(labels)
        self.columns = label_columns(self.labels)
        self.name = getattr(scorer, "name", type(scorer).__name__)

    def scores(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        if not texts:
            return np.zeros((0, len(ATTRIBUTE_NAMES)))
        probs = np.asarray(self.scorer.score(texts), dtype=np.float64)
        if probs.shape != (len(texts), len(self.labels)):
            raise FgdilpError(f"the scorer returned shape {probs.shape} for {len(texts)} texts, "
                              f"expected {(len(texts), len(self.labels))}")
        return attribute_scores(probs, self.labels)


__all__ = ["SCORER_LABEL_OF", "ScorerDiagnoser", "attribute_scores", "choose_diagnoser", "label_columns"]
