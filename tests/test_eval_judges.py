"""Evaluation with two toxicity judges: the records keep the first judge's "scores" and add
"judge_scores", the report gives EMT / TP and their intervals per judge and marks the judge that
also diagnosed (hand-written records, then a run on the tiny model with two fake scorers)."""

from __future__ import annotations

import hashlib
import json
from contextlib import ExitStack

import numpy as np
import pytest

from fgdilp_cpp.errors import FgdilpError
from fgdilp_cpp.evaluation.report import build_report, report_markdown, write_report
from fgdilp_cpp.evaluation.runner import GENERATIONS, RUN, read_jsonl

LABELS = ["toxic", "insult"]


def rec(pid, method, sample, tox, tcc=None):
    r = {"prompt_id": pid, "prompt": f"p{pid}", "method": method, "sample": sample, "seed": sample,
         "text": "a b c", "scores": {"toxic": tox, "insult": tox / 2}, "ppl": {}, "n_tokens": 3,
         "stop_reason": "length"}
    if tcc is not None:
        r["judge_scores"] = {"tcc": {"toxic": tcc, "insult": 0.0}}
    return r


def records():
    # (tox-block, tcc) per sample; prompt 2's second "tr" sample has no tcc score
    data = {"none": [[(0.9, 0.8), (0.2, 0.1)], [(0.6, 0.7), (0.4, 0.3)], [(0.1, 0.6), (0.2, 0.1)]],
            "tr": [[(0.3, 0.1), (0.1, 0.2)], [(0.6, 0.4), (0.4, 0.3)], [(0.1, 0.9), (0.0, None)]]}
    return [rec(p, m, s, tb, tc) for m, prompts in data.items() for p, samples in enumerate(prompts)
            for s, (tb, tc) in enumerate(samples)]


def test_report_per_judge_known_values():
    r = build_report(records(), [], LABELS, ["none", "tr"], primary_judge="tox-block", n_boot=200)
    assert r["tox_judges"] == ["tox-block", "tcc"] and r["primary_judge"] == "tox-block"
    assert r["diagnoser_judge"] is None
    n, t = r["methods"]["none"], r["methods"]["tr"]
    # the primary judge's numbers are the report's usual ones
    for m in (n, t):
        tb = m["tox_judges"]["tox-block"]
        assert (tb["emt"], tb["tp"], tb["n_prompts"]) == (m["emt"], m["tp"], 3)
        assert tb["ci_abs"]["emt"] == m["ci_abs"]["emt"]
    assert t["tox_judges"]["tox-block"]["ci"]["emt"] == t["ci"]["emt"]
    # tcc: none's maxima 0.8, 0.7, 0.6 on all three prompts
    tn = n["tox_judges"]["tcc"]
    assert tn["emt"] == pytest.approx(0.7) and tn["tp"] == pytest.approx(1.0) and tn["n_prompts"] == 3
    # tr's prompt 2 lacks a tcc score: it counts for tox-block only (maxima 0.2, 0.4)
    tt = t["tox_judges"]["tcc"]
    assert tt["n_prompts"] == 2 and tt["emt"] == pytest.approx(0.3) and tt["tp"] == 0.0
    assert tt["ci"]["emt"][0] == pytest.approx(0.3 - 0.75)             # paired on prompts 0 and 1
    assert tt["ci"]["tp"][0] == pytest.approx(-1.0)
    assert tt["ci"]["emt"][1] <= tt["ci"]["emt"][0] <= tt["ci"]["emt"][2]
    assert "ci" not in tn
    assert tt["ci_abs"]["emt"][0] == pytest.approx(0.3)


def test_report_marks_the_diagnosing_judge(tmp_path):
    r = build_report(records(), [], LABELS, ["none", "tr"], diagnoser_judge="tox-block", n_boot=50)
    assert r["diagnoser_judge"] == "tox-block"
    md = report_markdown(r)
    assert "## Toxicity per judge" in md and "| diagnoser |" in md
    rows = [line for line in md.splitlines() if line.startswith("| tr | ")]
    assert any("| tox-block | yes |" in line for line in rows)
    assert any("| tcc |  |" in line for line in rows)
    assert "`tcc` did not diagnose" in md
    write_report(r, tmp_path)
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["diagnoser_judge"] == "tox-block"
    assert data["methods"]["tr"]["tox_judges"]["tcc"]["n_prompts"] == 2


def test_report_with_one_judge():
    one = [dict(r, judge_scores=None) for r in records()]
    r = build_report(one, [], LABELS, ["none", "tr"], n_boot=50)
    assert r["tox_judges"] == ["tox-block"]
    assert "Toxicity per judge" not in report_markdown(r)              # unchanged report
    r = build_report(one, [], LABELS, ["none", "tr"], n_boot=50, diagnoser_judge="tox-block")
    assert "no independent judge of FGDILP" in report_markdown(r)


# ---- a run on the tiny model ----------------------------------------------------------------------
class HashScorer:
    """Deterministic scores from a hash of the text and a salt (one judge per salt)."""

    LABELS = ("toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate")

    def __init__(self, salt: str, name: str | None = None, rows_off: int = 0):
        self.salt, self.rows_off = salt, rows_off
        if name:
            self.name = name

    def score(self, texts):
        return np.array([[b / 255.0 for b in hashlib.sha256((self.salt + t).encode()).digest()[:6]]
                         for t in texts][self.rows_off:])


def run(model_path, out, scorer, **kw):
    from fgdilp_cpp.api import Detoxifier
    from fgdilp_cpp.evaluation.prompts import PromptRecord
    from fgdilp_cpp.evaluation.runner import run_eval
    from fgdilp_cpp.settings import Settings

    prompts = [PromptRecord(0, "the cat sat on"), PromptRecord(3, "where is Paris")]
    with ExitStack() as st:
        det = st.enter_context(Detoxifier(Settings(model=str(model_path), ctx_size=256, threads=1), max_samples=2,
                                          max_new=8))
        return run_eval(det, prompts, ["none", "tr"], 2, 4, 0.9, 7, out, scorer, {}, progress=False,
                        n_boot=50, **kw)


def test_run_eval_with_two_judges(tiny_llama, tmp_path):
    out = tmp_path / "two"
    a, b = HashScorer("a", name="ignored: the mapping's key names it"), HashScorer("b")
    res = run(tiny_llama[0], out, {"tox-block": a, "toxic-comment-classifier": b},
              diagnoser_judge="tox-block")
    recs, bad = read_jsonl(out / GENERATIONS)
    assert bad == 0 and len(recs) == 2 * 2 * 2
    for r in recs:
        want_a = dict(zip(HashScorer.LABELS, a.score([r["text"]])[0]))
        want_b = dict(zip(HashScorer.LABELS, b.score([r["text"]])[0]))
        assert r["scores"] == pytest.approx(want_a)
        assert list(r["judge_scores"]) == ["toxic-comment-classifier"]
        assert r["judge_scores"]["toxic-comment-classifier"] == pytest.approx(want_b)
    rep = res["report"]
    assert rep["tox_judges"] == ["tox-block", "toxic-comment-classifier"]
    assert rep["primary_judge"] == "tox-block" and rep["diagnoser_judge"] == "tox-block"
    emt_b = {m: np.mean([max(r["judge_scores"]["toxic-comment-classifier"]["toxic"] for r in recs
                             if (r["method"], r["prompt_id"]) == (m, p)) for p in (0, 3)])
             for m in ("none", "tr")}
    for m in ("none", "tr"):
        assert rep["methods"][m]["tox_judges"]["toxic-comment-classifier"]["emt"] == pytest.approx(emt_b[m])
    assert "| toxic-comment-classifier |" in (out / "report.md").read_text()
    cfg = json.loads((out / RUN).read_text())["config"]
    assert cfg["tox_judges"] == ["tox-block", "toxic-comment-classifier"]
    # the same folder with one judge holds other settings: refused before anything is rewritten
    before = (out / GENERATIONS).read_bytes()
    with pytest.raises(FgdilpError, match="tox_judges"):
        run(tiny_llama[0], out, {"tox-block": a})
    assert (out / GENERATIONS).read_bytes() == before
    # the same judges resume: nothing generated again
    assert run(tiny_llama[0], out, {"tox-block": a, "toxic-comment-classifier": b})["generated"] == 0


def test_run_eval_one_scorer_keeps_the_old_records(tiny_llama, tmp_path):
    out = tmp_path / "one"
    res = run(tiny_llama[0], out, HashScorer("a", name="tox-block"))
    recs, _ = read_jsonl(out / GENERATIONS)
    assert recs and all("judge_scores" not in r for r in recs)
    assert "tox_judges" not in json.loads((out / RUN).read_text())["config"]
    assert res["report"]["tox_judges"] == ["tox-block"]


def test_run_eval_refuses_a_bad_second_judge(tiny_llama, tmp_path):
    with pytest.raises(FgdilpError, match="scorer tcc returned shape"):
        run(tiny_llama[0], tmp_path / "bad", {"tox-block": HashScorer("a"), "tcc": HashScorer("b", rows_off=1)})
    with pytest.raises(FgdilpError, match="no toxicity judge"):
        run(tiny_llama[0], tmp_path / "none", {})
