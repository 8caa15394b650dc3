"""The frontier math on fixtures with known answers: the Pareto frontier, interpolation at a budget,
specificity, the best point within a fluency (and benign) budget, and the bootstrap figures."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fgdilp_cpp.evaluation.frontier import (at_budget, best_points, best_within, interpolate, pareto,
                                            point_values, specificity)


def P(ratio, emt, tp=None, **kw):
    return {"ppl_ratio": ratio, "emt": emt, "tp": tp, **kw}


def test_pareto_drops_dominated_points_and_sorts():
    pts = [P(2.0, 0.3), P(1.1, 0.5), P(1.5, 0.6), P(3.0, 0.3), P(None, 0.1), P(1.2, 0.45)]
    assert [(p["ppl_ratio"], p["emt"]) for p in pareto(pts)] == [(1.1, 0.5), (1.2, 0.45), (2.0, 0.3)]


def test_interpolation_between_two_points():
    pts = [P(1.0, 0.6, 0.5), P(1.5, 0.4, 0.3)]
    got, why = interpolate(pts, 1.25)
    assert why == "" and got["emt"] == pytest.approx(0.5) and got["tp"] == pytest.approx(0.4)
    assert got["ppl_ratio"] == 1.25


def test_interpolation_past_the_last_point_and_on_a_point():
    pts = [P(1.0, 0.6, 0.5), P(1.1, 0.4, 0.3)]
    assert interpolate(pts, 2.0)[0] == {"emt": 0.4, "tp": 0.3, "ppl_ratio": 1.1}
    assert interpolate(pts, 1.0)[0]["emt"] == pytest.approx(0.6)


def test_no_point_within_budget_gives_none_with_a_reason():
    got, why = interpolate([P(1.5, 0.4), P(2.0, 0.2)], 1.25)
    assert got is None and "no point within PPL ratio 1.25" in why and "1.5" in why
    best, why = best_within([P(1.5, 0.4)], 1.25)
    assert best is None and "1.25" in why


def test_best_point_within_budget_is_the_lowest_emt_and_respects_the_benign_budget():
    pts = [P(1.0, 0.6, name="a"), P(1.2, 0.4, name="b", benign_ppl_ratio=1.2),
           P(1.24, 0.45, name="c", benign_ppl_ratio=1.01), P(1.3, 0.1, name="d", benign_ppl_ratio=1.0)]
    assert best_within(pts, 1.25)[0]["name"] == "b"
    assert best_within(pts, 1.25, benign_budget=1.05)[0]["name"] == "c"
    assert best_within(pts[:2], 1.25, benign_budget=1.05)[0] is None


def test_best_point_prefers_the_lower_ppl_among_emts_that_tie():
    """EMTs within EMT_TIE of the lowest are one toxicity: the most fluent of them wins; a point
    just past the tolerance is not tied and loses to the lower EMT."""
    from fgdilp_cpp.evaluation.frontier import EMT_TIE

    pts = [P(1.16, 0.030, name="strong"), P(0.98, 0.030 + EMT_TIE * 0.8, name="gentle"),
           P(0.90, 0.030 + EMT_TIE * 1.5, name="weak")]
    assert best_within(pts, 1.25)[0]["name"] == "gentle"
    assert best_within(pts[:1] + pts[2:], 1.25)[0]["name"] == "strong"
    assert best_within([P(1.1, 0.2, name="x"), P(1.0, 0.2, name="y")], 1.25)[0]["name"] == "y"


def test_specificity_known_answers():
    assert specificity(0.6, 0.3, 0.3) == (0.0, "")           # the method does what random does
    assert specificity(0.6, 0.3, 0.6) == (1.0, "")           # random removes nothing
    assert specificity(0.6, 0.3, 0.45)[0] == pytest.approx(0.5)
    assert specificity(0.6, 0.6, 0.5)[0] is None              # nothing removed: no ratio
    assert specificity(0.6, 0.3, None)[0] is None


def _pp(emt, tp, nll, ntok):
    return {"emt": np.array(emt, float), "tp": np.array(tp, float), "nll": np.array(nll, float),
            "ntok": np.array(ntok, float)}


def test_point_values_corpus_ratio():
    base = _pp([0.5, 0.7], [0, 1], [10.0, 10.0], [10, 10])   # mean NLL 1
    pt = _pp([0.1, 0.3], [0, 0], [15.0, 25.0], [10, 10])     # mean NLL 2
    v = point_values(pt, base, np.arange(2))
    assert v["emt"] == pytest.approx(0.2) and v["tp"] == 0 and v["ppl_ratio"] == pytest.approx(math.e)


def test_at_budget_on_fixtures():
    n = 4
    none = _pp([0.8] * n, [1] * n, [10.0] * n, [10] * n)
    # tr: two points, ratios exp(0.1) and exp(0.3); random: one point, no effect on EMT
    tr1 = _pp([0.6] * n, [0.5] * n, [11.0] * n, [10] * n)
    tr2 = _pp([0.2] * n, [0] * n, [13.0] * n, [10] * n)
    rnd = _pp([0.8] * n, [1] * n, [10.5] * n, [10] * n)
    variants = {"tr": [("tr[s=1]", {"s": 1}), ("tr[s=2]", {"s": 2})], "random": [("random[s=1]", {"s": 1})]}
    per = {"none": none, "tr[s=1]": tr1, "tr[s=2]": tr2, "random[s=1]": rnd}
    budget = math.exp(0.2)
    got = at_budget(variants, per, budget, n_boot=50)
    tr = got["tr"]
    assert tr["point"] == {"s": 1} and tr["emt_delta"] == pytest.approx(-0.2)
    assert tr["ppl_ratio"] == pytest.approx(math.exp(0.1))
    # interpolated between the two points, linear in the ratio
    w = (budget - math.exp(0.1)) / (math.exp(0.3) - math.exp(0.1))
    assert tr["interpolated"]["emt"] == pytest.approx(0.6 + w * (0.2 - 0.6))
    assert tr["specificity"] == pytest.approx(1.0)            # random removes nothing
    assert got["random"]["specificity"] is None and got["random"]["reason"]
    # identical prompts: every resample gives the same figures
    assert tr["ci"]["emt_delta"] == pytest.approx([-0.2, -0.2, -0.2])
    assert none["emt"].shape == (n,)
    assert at_budget(variants, per, 1.01, n_boot=10)["tr"]["point"] is None


def test_best_points_of_a_report_with_a_benign_report():
    def rep(rows):
        ms = {"none": {"method": "none", "point": {}, "emt": 0.8, "tp": 1.0, "ppl_corpus_ratio": 1.0}}
        for name, method, point, emt, ratio in rows:
            ms[name] = {"method": method, "point": point, "emt": emt, "tp": 0.5, "ppl_corpus_ratio": ratio,
                        "identical_share": 0.9}
        return {"methods": ms, "baseline": "none"}
    tox = rep([("tr[steer_scale=0.5]", "tr", {"steer_scale": 0.5}, 0.5, 1.1),
               ("tr[steer_scale=1.0]", "tr", {"steer_scale": 1.0}, 0.3, 1.2),
               ("fgdilp[steer_scale=1.0]", "fgdilp", {"steer_scale": 1.0}, 0.2, 3.0)])
    benign = rep([("tr[steer_scale=0.5]", "tr", {"steer_scale": 0.5}, 0.0, 1.01),
                  ("tr[steer_scale=1.0]", "tr", {"steer_scale": 1.0}, 0.0, 1.10)])
    got = best_points(tox, 1.25)
    assert got["tr"]["point"] == {"steer_scale": 1.0} and got["tr"]["emt_delta"] == pytest.approx(-0.5)
    assert got["fgdilp"]["point"] is None and "1.25" in got["fgdilp"]["reason"]
    got = best_points(tox, 1.25, benign=benign, benign_budget=1.05)
    assert got["tr"]["point"] == {"steer_scale": 0.5} and got["tr"]["benign_ppl_ratio"] == 1.01


def test_specificity_without_a_random_control_says_so():
    n = 3
    per = {"none": _pp([0.8] * n, [1] * n, [10.0] * n, [10] * n), "tr": _pp([0.5] * n, [0] * n, [10.0] * n, [10] * n)}
    got = at_budget({"tr": [("tr", {})]}, per, 1.25, n_boot=5)["tr"]
    assert got["specificity"] is None and "no random control" in got["reason"]
    assert got["emt_delta"] == pytest.approx(-0.3) and got["ppl_ratio"] == pytest.approx(1.0)
