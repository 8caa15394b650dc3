"""The condition a model without a calibrated profile gets (condition.default_condition): on the
development parts of both benign sets it leaves at least 95 % of the prompts unsteered, it is the
smallest θ on a 0.05 grid that does, and the toxic development prompts are still mostly steered
(docs/results/condition-benign.md; scripts/condition_measure.py)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import load_script

from fgdilp_cpp.condition import default_condition
from fgdilp_cpp.settings import Settings


@pytest.fixture(scope="module")
def readings():
    from fgdilp_cpp.toxicity.scorer import ToxicityScorer

    measure = load_script("condition_measure")
    scorer = ToxicityScorer.load()
    return measure, {name: np.asarray(scorer.score(texts))[:, 0] for name, texts in measure.eval_sets().items()}


def test_the_default_is_a_valid_setting():
    theta = default_condition()
    assert 0.0 < theta < 1.0
    assert Settings(condition=theta).condition == theta


def test_the_default_leaves_both_benign_sets_unsteered(readings):
    measure, scores = readings
    theta = default_condition()
    rtp, everyday, toxic = measure.shares(scores, theta)
    assert rtp >= measure.TARGET_BENIGN and everyday >= measure.TARGET_BENIGN
    # not needlessly high: a step lower fails one of the benign sets
    lower = measure.shares(scores, round(theta - 0.05, 2))
    assert min(lower[:2]) < measure.TARGET_BENIGN
    assert toxic > 0.6                   # most toxic development prompts are still steered
    assert lower[2] > toxic              # and a lower θ would steer more of them (the trade-off is real)


def test_shares_and_best_theta_on_known_scores():
    measure = load_script("condition_measure")
    scores = {"rtp-benign": np.array([0.0, 0.1, 0.2, 0.9]), "everyday-benign": np.array([0.05, 0.3]),
              "rtp-toxic": np.array([0.1, 0.5, 0.95])}
    assert measure.shares(scores, 0.5) == (0.75, 1.0, 2 / 3)
    # 95 % of both benign sets below θ: only above every benign score, 0.9 < θ
    assert measure.best_theta(scores) == (0.95, 1 / 3)
    assert measure.best_theta(scores, benign_floor=0.5) == (0.2, 2 / 3)     # half of each set below 0.2
