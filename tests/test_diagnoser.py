"""--diagnoser on the tiny model: a (fake) scorer ranks the self-generated samples instead of the model,
`auto`'s decision, the explain text, and the settings/CLI plumbing."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fgdilp_cpp.engine import SamplingParams
from fgdilp_cpp.errors import FgdilpError, ParamError
from fgdilp_cpp.explain import explain_lines
from fgdilp_cpp.generation import EngineParams, Generator
from fgdilp_cpp.method.scorer_diagnosis import choose_diagnoser
from fgdilp_cpp.params import FgdilpParams, SteerParams
from fgdilp_cpp.settings import Settings

PROMPT = "the cat sat on a mat"
LABELS = ("toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate")
SMALL = dict(samples=5, selfgen_tokens=6, selfgen_min_tokens=2)


class LengthScorer:
    """Scores a text by its length (all labels): the longest sample is the most 'toxic'; sign=-1
    ranks the other way round. Records every call."""

    labels = LABELS
    name = "length-scorer"

    def __init__(self, sign: float = 1.0):
        self.sign, self.calls = sign, []

    def score(self, texts):
        self.calls.append(list(texts))
        n = np.array([len(t) for t in texts], dtype=np.float64)
        return np.repeat((0.5 + self.sign * n / (2 * (n.max() + 1)))[:, None], len(LABELS), axis=1)


def _instance(model, diagnoser: str, scorer=None, **aucs):
    with Generator(model, EngineParams(ctx_size=256), SteerParams(), FgdilpParams(**SMALL, diagnoser=diagnoser),
                   **aucs) as gen:
        gen.rt.scorer = scorer
        return gen.generate(PROMPT, "fgdilp", 4, SamplingParams(seed=7), explain=True).explain


def test_scorer_ranks_the_samples_and_changes_the_prefixes(model):
    mine = _instance(model, "self")
    up, down = LengthScorer(), LengthScorer(-1.0)
    by_len = _instance(model, "scorer", up)
    by_short = _instance(model, "scorer", down)
    texts = [s["text"] for s in mine["samples"]]
    # the same self-generated samples (same seed): only the ranking differs
    assert [s["text"] for s in by_len["samples"]] == texts == [s["text"] for s in by_short["samples"]]
    assert up.calls == [texts]
    lengths = [len(t) for t in texts]
    assert by_len["negatives"][0]["sample"] == int(np.argmax(lengths))
    assert by_len["positive"]["sample"] == int(np.argmin(lengths))
    assert by_short["negatives"][0]["sample"] == int(np.argmax(-np.array(lengths)))
    assert by_short["positive"]["sample"] != by_len["positive"]["sample"]
    assert by_len["diagnoser"] == {"source": "scorer", "choice": "scorer", "scorer": "length-scorer"}
    assert mine["diagnoser"]["source"] == "self" and "yes_no_tokens" in mine
    # the explained scores are the scorer's
    got = [s["scores"]["toxicity"] for s in by_len["samples"]]
    np.testing.assert_allclose(got, up.score(texts)[:, 0])


def test_auto_uses_the_scorer_unless_self_diagnosis_measures_as_well(model):
    ex = _instance(model, "auto", LengthScorer())
    assert ex["diagnoser"] == {"source": "scorer", "choice": "auto", "scorer": "length-scorer"}
    ex = _instance(model, "auto", LengthScorer(), self_diagnosis_auc=0.91, scorer_auc=0.90)
    assert ex["diagnoser"]["source"] == "self"


@pytest.mark.parametrize("choice, self_auc, scorer_auc, want", [
    ("self", None, None, "self"), ("scorer", 0.99, 0.5, "scorer"),
    ("auto", None, None, "scorer"), ("auto", 0.95, None, "scorer"), ("auto", None, 0.9, "scorer"),
    ("auto", 0.39, 0.90, "scorer"), ("auto", 0.90, 0.90, "self"), ("auto", 0.93, 0.90, "self"),
    ("auto", math.nan, 0.90, "scorer"),
])
def test_choose_diagnoser(choice, self_auc, scorer_auc, want):
    assert choose_diagnoser(choice, self_auc, scorer_auc) == want


def test_choose_diagnoser_refuses_unknown():
    with pytest.raises(FgdilpError, match="diagnoser"):
        choose_diagnoser("oracle")


def test_explain_names_the_diagnoser(model):
    text = "\n".join(explain_lines(_instance(model, "scorer", LengthScorer())))
    assert "scorer scores (length-scorer" in text and "--diagnoser scorer" in text and "P(yes)" not in text
    text = "\n".join(explain_lines(_instance(model, "self")))
    assert "self-diagnosis P(yes)" in text and "--diagnoser self" in text and "scorer" not in text


def test_diagnoser_setting_and_check():
    assert Settings().fgdilp().diagnoser == "self"
    assert Settings().updated({"diagnoser": "scorer"}).fgdilp().diagnoser == "scorer"
    assert Settings.from_env({"FGDILP_DIAGNOSER": "auto"}) == {"diagnoser": "auto"}
    with pytest.raises(ParamError, match="diagnoser"):
        Settings().updated({"diagnoser": "oracle"}).fgdilp()


def test_diagnoser_flag_is_checked(cli, tiny_llama):
    proc = cli("generate", "-m", tiny_llama[0], "-p", "x", "--method", "fgdilp", "--diagnoser", "oracle")
    assert proc.returncode != 0 and "oracle" in proc.stderr and "Traceback" not in proc.stderr
