"""Evaluation metrics on hand-made fixtures with known answers: EMT, TP, Dist-n, bootstrap
intervals, and the report built from hand-written records."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fgdilp_cpp.evaluation.metrics import (any_toxic, bootstrap_ci, distinct_n, expected_max_toxicity,
                                           max_toxicity, paired_bootstrap_ci, toxicity_probability, words)
from fgdilp_cpp.evaluation.report import build_report, report_markdown, write_report

SCORES = [[0.1, 0.9, 0.2], [0.2, 0.3, 0.5], [0.6, 0.0, 0.4]]   # 3 prompts x 3 samples


def test_expected_max_toxicity():
    assert max_toxicity(SCORES).tolist() == [0.9, 0.5, 0.6]
    assert expected_max_toxicity(SCORES) == pytest.approx((0.9 + 0.5 + 0.6) / 3)
    assert expected_max_toxicity([[0.25]]) == 0.25
    assert expected_max_toxicity([np.array([0.1, 0.3]), [0.7]]) == pytest.approx(0.5)   # ragged


def test_toxicity_probability_is_strictly_above_threshold():
    # prompt 2 peaks at exactly 0.5: not toxic
    assert any_toxic(SCORES).tolist() == [1.0, 0.0, 1.0]
    assert toxicity_probability(SCORES) == pytest.approx(2 / 3)
    assert toxicity_probability(SCORES, threshold=0.45) == 1.0
    assert toxicity_probability(SCORES, threshold=0.95) == 0.0


def test_toxicity_metrics_refuse_empty_input():
    with pytest.raises(ValueError):
        expected_max_toxicity([])
    with pytest.raises(ValueError):
        toxicity_probability([[0.1], []])


def test_word_tokenizer():
    assert words("Hi, you!  don't") == ["Hi", ",", "you", "!", "don", "'", "t"]
    assert words("  ") == []


def test_distinct_n_known_answers():
    texts = ["a b a b", "a b"]
    assert distinct_n(texts, 1) == pytest.approx(2 / 6)
    assert distinct_n(texts, 2) == pytest.approx(2 / 6)      # (a b) (b a) (a b) + (a b): n-grams stay in a sample
    assert distinct_n(texts, 3) == pytest.approx(2 / 6)      # (a b a) (b a b); the 2-word sample has none
    assert distinct_n(texts, 5) == 0.0
    assert distinct_n([], 1) == 0.0
    assert distinct_n(["", "  "], 2) == 0.0
    assert distinct_n(["x y z"], 1) == 1.0
    assert distinct_n(["Hi, hi, HI"], 1) == pytest.approx(4 / 5)   # case kept: Hi hi HI and one ','
    with pytest.raises(ValueError):
        distinct_n(["a"], 0)


def test_bootstrap_on_constants_has_zero_width():
    diff, lo, hi = paired_bootstrap_ci([0.2] * 10, [0.5] * 10)
    assert diff == pytest.approx(0.3) and lo == pytest.approx(0.3) and hi == pytest.approx(0.3)
    # a constant paired difference: zero width even though the values vary
    a = np.random.default_rng(1).random(30)
    diff, lo, hi = paired_bootstrap_ci(a, a + 0.1)
    assert (diff, lo, hi) == pytest.approx((0.1, 0.1, 0.1))
    v, lo, hi = bootstrap_ci([0.4] * 7)
    assert (v, lo, hi) == pytest.approx((0.4, 0.4, 0.4))


def test_bootstrap_is_deterministic_and_paired():
    rng = np.random.default_rng(0)
    a = rng.random(50)
    b = a + 0.05 + 0.01 * rng.standard_normal(50)
    r1 = paired_bootstrap_ci(a, b, seed=3)
    assert paired_bootstrap_ci(a, b, seed=3) == r1
    assert paired_bootstrap_ci(a, b, seed=4) != r1
    diff, lo, hi = r1
    assert diff == pytest.approx(float(b.mean() - a.mean()))
    assert lo < diff < hi
    assert 0.0 < lo and hi < 0.1            # pairing removes the large between-prompt spread
    # an unpaired reading of the same data would straddle zero widely; the statistic is pluggable
    d_med, lo_m, hi_m = paired_bootstrap_ci(a, b, stat=np.median, n_boot=200)
    assert d_med == pytest.approx(float(np.median(b) - np.median(a)))
    assert lo_m <= hi_m
    # the interval narrows as alpha grows
    _, lo90, hi90 = paired_bootstrap_ci(a, b, seed=3, alpha=0.1)
    assert lo <= lo90 and hi90 <= hi


def test_bootstrap_shapes():
    with pytest.raises(ValueError):
        paired_bootstrap_ci([1, 2], [1, 2, 3])
    assert all(np.isnan(paired_bootstrap_ci([], [])))


# ---- the report from hand-written records -------------------------------------------------------
LABELS = ["toxic", "insult"]


def rec(pid, method, sample, tox, text="a b c", ppl=10.0):
    return {"prompt_id": pid, "prompt": f"p{pid}", "method": method, "sample": sample, "seed": 1000 * pid + sample,
            "text": text, "scores": {"toxic": tox, "insult": tox / 2}, "ppl": {"gen": ppl}, "n_tokens": 3,
            "stop_reason": "length"}


def records():
    out = []
    for pid, (tn, tt) in enumerate([((0.9, 0.2), (0.3, 0.1)), ((0.6, 0.4), (0.6, 0.4)), ((0.1, 0.2), (0.1, 0.0))]):
        for s in range(2):
            out.append(rec(pid, "none", s, tn[s], text="x x y" if s else "x y z", ppl=[5.0, 20000.0][s] if pid == 0 else 8.0))
            out.append(rec(pid, "tr", s, tt[s], ppl=None if (pid, s) == (2, 1) else 12.0))
    out.append(rec(9, "tr", 0, 0.99))            # a prompt only one method has: left out
    out.append(rec(9, "tr", 1, 0.99))
    return out


def timings():
    return [{"prompt_id": p, "method": m, "n_tokens": 6, "gen_s": 2.0, "setup_s": 0.5 if m == "tr" else 0.0}
            for p in range(3) for m in ("none", "tr")]


def test_report_known_values():
    r = build_report(records(), timings(), LABELS, ["none", "tr", "fgdilp"])
    assert list(r["methods"]) == ["none", "tr"] and r["missing"] == ["fgdilp"]
    assert r["n_prompts"] == 3 and r["baseline"] == "none" and r["judges"] == ["gen"]
    n, t = r["methods"]["none"], r["methods"]["tr"]
    assert n["emt"] == pytest.approx((0.9 + 0.6 + 0.2) / 3)
    assert n["tp"] == pytest.approx(2 / 3)
    assert t["emt"] == pytest.approx((0.3 + 0.6 + 0.1) / 3)
    assert t["tp"] == pytest.approx(1 / 3)
    assert t["excluded_prompts"] == 1 and t["n_prompts"] == 3 and t["n_samples"] == 6
    assert n["labels"]["toxic"] == pytest.approx(np.mean([0.9, 0.2, 0.6, 0.4, 0.1, 0.2]))
    assert n["labels"]["insult"] == pytest.approx(n["labels"]["toxic"] / 2)
    # ppl >= 1e4 dropped and counted; a missing value counted apart
    assert n["ppl"]["gen"] == {"mean": pytest.approx(np.mean([5, 8, 8, 8, 8])), "median": 8.0, "dropped": 1,
                               "nan": 0, "n": 5}
    assert t["ppl"]["gen"]["nan"] == 1 and t["ppl"]["gen"]["n"] == 5 and t["ppl"]["gen"]["dropped"] == 0
    # Dist: none's samples are "x y z" / "x x y" on every prompt, tr's "a b c" twice
    assert n["dist"] == pytest.approx([3 / 6, 3 / 6, 2 / 6])   # unique n-grams / total words
    assert t["dist"] == pytest.approx([3 / 6, 2 / 6, 1 / 6])
    assert n["tokens_per_s"] == pytest.approx(18 / 6) and n["wall_s"] == pytest.approx(6.0)
    assert n["tokens_per_s_median"] == pytest.approx(3.0)
    assert t["setup_s"] == pytest.approx(1.5)
    assert "ci" not in n
    ci = t["ci"]
    assert ci["emt"][0] == pytest.approx(t["emt"] - n["emt"])
    assert ci["tp"][0] == pytest.approx(-1 / 3)
    assert ci["dist2"][0] == pytest.approx(t["dist"][1] - n["dist"][1])
    for k in ("emt", "tp", "ppl_gen", "dist2"):
        assert ci[k][1] <= ci[k][0] <= ci[k][2]
    # per-prompt ppl means after dropping: none (5, 8, 8), tr (12, 12, 12)
    assert ci["ppl_gen"][0] == pytest.approx(12 - 7)
    assert n["ci_abs"]["emt"][0] == pytest.approx(n["emt"])
    # deterministic
    assert build_report(records(), timings(), LABELS, ["none", "tr"]) == build_report(records(), timings(), LABELS,
                                                                                     ["none", "tr"])


def test_report_without_baseline_or_judges(tmp_path):
    recs = [dict(r, ppl={}) for r in records() if r["method"] == "tr"]
    r = build_report(recs, [], LABELS, ["tr"])
    assert r["baseline"] is None and r["judges"] == []
    assert "ci" not in r["methods"]["tr"] and r["methods"]["tr"]["tokens_per_s"] is None
    assert r["methods"]["tr"]["n_prompts"] == 4
    paths = write_report(r, tmp_path)
    assert {p.name for p in paths} == {"report.json", "report.md", "toxicity.png", "labels.png"}
    assert "No `none` baseline" in report_markdown(r)


def test_write_report_files(tmp_path):
    r = build_report(records(), timings(), LABELS, ["none", "tr"])
    paths = write_report(r, tmp_path)
    assert {p.name for p in paths} == {"report.json", "report.md", "toxicity.png", "labels.png", "emt_vs_ppl.png"}
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["methods"]["tr"]["ci"]["emt"] == pytest.approx(r["methods"]["tr"]["ci"]["emt"])
    md = (tmp_path / "report.md").read_text()
    for s in ("| none |", "| tr |", "EMT", "Dist-2", "PPL gen mean", "tokens/s", "insult"):
        assert s in md
    for p in paths:
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
