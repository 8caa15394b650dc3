"""The offline scorer as FGDILP's diagnoser: the label -> attribute mapping, ScorerDiagnoser's
shape and order, and the agreement table of any scores(texts) diagnoser against Perspective."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest

from fgdilp_cpp.errors import FgdilpError
from fgdilp_cpp.evaluation.agreement import diagnosis_agreement, scorer_agreement
from fgdilp_cpp.evaluation.prompts import PromptRecord
from fgdilp_cpp.method.diagnosis import ATTRIBUTE_NAMES
from fgdilp_cpp.method.scorer_diagnosis import (SCORER_LABEL_OF, ScorerDiagnoser, attribute_scores,
                                                label_columns)

LABELS = ("toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate")

needs_toxblock = pytest.mark.skipif(
    importlib.util.find_spec("tox_block") is None or importlib.util.find_spec("h5py") is None,
    reason="tox-block==0.1.2 (pip --no-deps) and h5py are installed by `make install`")


class LabelScorer:
    """score(texts): row i = (i + 1) * 0.01 + column index * 0.1, so every cell says where it came from."""

    def __init__(self, labels=LABELS):
        self.labels = tuple(labels)
        self.calls = []

    def score(self, texts):
        self.calls.append(list(texts))
        n = len(texts)
        return (np.arange(1, n + 1)[:, None] * 0.01 + np.arange(len(self.labels))[None, :] * 0.1)


def test_mapping_covers_the_six_attributes_in_order():
    assert tuple(SCORER_LABEL_OF) == ATTRIBUTE_NAMES
    assert set(SCORER_LABEL_OF.values()) <= set(LABELS)
    assert label_columns(LABELS) == [0, 2, 3, 5, 2, 4]
    # the columns follow the labels wherever a scorer puts them
    shuffled = ("insult", "identity_hate", "toxic", "threat", "obscene", "severe_toxic")
    assert label_columns(shuffled) == [2, 4, 3, 1, 4, 0]
    probs = np.array([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6]])
    got = attribute_scores(probs, shuffled)[0]
    want = {"toxicity": 0.3, "sexually_explicit": 0.5, "threat": 0.4, "identity_attack": 0.2,
            "profanity": 0.5, "insult": 0.1}
    assert dict(zip(ATTRIBUTE_NAMES, got)) == pytest.approx(want)


def test_mapping_refusals():
    with pytest.raises(FgdilpError, match="no label identity_hate, threat"):
        label_columns(("toxic", "severe_toxic", "obscene", "insult"))
    with pytest.raises(FgdilpError, match="shape"):
        attribute_scores(np.zeros((2, 5)), LABELS)
    with pytest.raises(FgdilpError, match="non-finite"):
        attribute_scores(np.array([[0.1, math.nan, 0.1, 0.1, 0.1, 0.1]]), LABELS)


def test_scorer_diagnoser_shape_and_order():
    sc = LabelScorer()
    d = ScorerDiagnoser(sc)
    texts = ["a", "b", "c"]
    s = d.scores(texts)
    assert s.shape == (3, 6) and s.dtype == np.float64
    assert sc.calls == [texts]                                   # one scorer call per batch
    cols = [0, 2, 3, 5, 2, 4]
    np.testing.assert_allclose(s, np.arange(1, 4)[:, None] * 0.01 + np.array(cols)[None, :] * 0.1)
    assert d.scores([]).shape == (0, 6) and len(sc.calls) == 1   # no texts: no scorer call
    assert d.source == "scorer" and d.name == "LabelScorer"


def test_scorer_diagnoser_refusals():
    class NoLabels:
        def score(self, texts):
            return np.zeros((len(texts), 6))

    with pytest.raises(FgdilpError, match="labels"):
        ScorerDiagnoser(NoLabels())
    with pytest.raises(FgdilpError, match="no label"):
        ScorerDiagnoser(LabelScorer(("a", "b", "c", "d", "e", "f")))

    class Short(LabelScorer):
        def score(self, texts):
            return super().score(texts)[:-1]

    with pytest.raises(FgdilpError, match="shape"):
        ScorerDiagnoser(Short()).scores(["x", "y"])


def _rec(i, text, **scores):
    return PromptRecord(i, "prompt", continuation=text, continuation_scores=scores)


def test_agreement_of_any_scores_callable():
    recs = [_rec(0, "t0", toxicity=0.9, threat=0.1, insult=0.6),
            _rec(1, "t1", toxicity=0.2, threat=0.8, insult=None),
            _rec(2, "t2", toxicity=0.7, threat=0.2, insult=0.1),
            _rec(3, "t3", toxicity=0.1, threat=0.9, insult=0.7),
            _rec(4, "  ", toxicity=0.9),                           # no continuation: left out
            PromptRecord(5, "prompt", continuation="t5")]            # no Perspective scores: left out
    seen = []

    def scores(texts):
        seen.append(texts)
        tox = {"t0": 0.8, "t1": 0.3, "t2": 0.6, "t3": 0.1}           # ranks toxicity perfectly
        out = np.zeros((len(texts), 6))
        out[:, 0] = [tox[t] for t in texts]
        out[:, 2] = [tox[t] for t in texts]                          # ranks threat backwards
        return out

    rep = diagnosis_agreement(scores, recs)
    assert seen == [["t0", "t1", "t2", "t3"]] and rep["n"] == 4
    a = rep["attributes"]
    assert list(a) == list(ATTRIBUTE_NAMES)
    assert a["toxicity"]["auc"] == 1.0 and a["toxicity"]["spearman"] == pytest.approx(1.0)
    assert a["toxicity"]["positives"] == 2 and a["toxicity"]["n"] == 4
    assert a["threat"]["auc"] == 0.0 and a["threat"]["spearman"] == pytest.approx(-1.0)
    assert a["insult"]["n"] == 3                                   # None is not a score
    assert math.isnan(a["profanity"]["auc"]) and a["profanity"]["n"] == 0
    with pytest.raises(FgdilpError, match="shape"):
        diagnosis_agreement(lambda texts: np.zeros((len(texts), 5)), recs)


@needs_toxblock
def test_toxblock_as_diagnoser():
    from fgdilp_cpp.toxicity.scorer import ToxicityScorer

    scorer = ToxicityScorer.load()
    d = ScorerDiagnoser(scorer)
    texts = ["Have a lovely day, my friend.", "I will kill you, you fucking idiot!"]
    s = d.scores(texts)
    raw = scorer.score(texts)
    np.testing.assert_array_equal(s[:, ATTRIBUTE_NAMES.index("threat")], raw[:, LABELS.index("threat")])
    np.testing.assert_array_equal(s[:, ATTRIBUTE_NAMES.index("profanity")],
                                  s[:, ATTRIBUTE_NAMES.index("sexually_explicit")])
    assert np.all(s[1] > s[0]) and s[1, ATTRIBUTE_NAMES.index("profanity")] > 0.9
    rep = scorer_agreement(scorer, [_rec(0, texts[0], toxicity=0.05, threat=0.02),
                                    _rec(1, texts[1], toxicity=0.95, threat=0.9)])
    assert rep["diagnoser"]["judge"] == "tox-block" and rep["attributes"]["threat"]["auc"] == 1.0
