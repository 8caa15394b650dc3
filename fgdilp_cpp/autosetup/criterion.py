"""The fast setup's criterion: where and how hard to steer, from teacher-forced scores alone
(points.PointScores; docs/method.md §7.7 says why). Pure numpy: no model here.

Each candidate layer range is scored at two probe strengths. Every NLL shift (toxic, clean,
benign, and the random control's) is modelled as q(s) = a*s + b*s^2 through zero and the two
measurements: steering at strength 0 changes nothing, and at these strengths the shifts grow
about linearly with a quadratic bend (docs/results/fast-setup-grid.md). Per range the strongest
strength whose predicted costs stay within the budget is taken, and the range whose point gives
the largest *specific* margin (the margin a random direction of the same norms does not give)
wins. The winner is then measured (verify) rather than trusted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from .points import PointScores

SHIFTS = ("toxic", "clean", "benign", "random_toxic", "random_clean", "random_benign")


@dataclass(frozen=True)
class Budget:
    """Teacher-forced costs a fast-setup point may have, as ratios of per-token perplexity:
    fluency = the clean human continuations of toxic prompts, benign = benign text. Anchored at
    the calibrated points of the embedded models, where these costs were x1.29 / x1.10 (gemma) and
    about x1.09 / x1.14 (SmolLM2) while the evaluation's corpus perplexity stayed within x1.25 and
    benign within x1.05 (docs/results/fast-setup-grid.md)."""
    fluency: float = 1.30
    benign: float = 1.10
    min_specificity: float = 0.5     # below it the point is mostly what any push of its size does
    max_scale: float = 2.0
    step: float = 0.05               # strengths are chosen on this grid


@dataclass(frozen=True)
class Choice:
    layer_range: tuple[int, int]
    scale: float
    predicted: PointScores           # the model's prediction at the chosen point
    why: str                         # one line: what bound the strength


def fit_curve(s1: float, q1: float, s2: float, q2: float) -> tuple[float, float]:
    """(a, b) of q(s) = a*s + b*s^2 through (s1, q1) and (s2, q2) (0 < s1 < s2)."""
    m = np.array([[s1, s1 * s1], [s2, s2 * s2]], dtype=np.float64)
    a, b = np.linalg.solve(m, np.array([q1, q2], dtype=np.float64))
    return float(a), float(b)


def predict(low: PointScores, high: PointScores, scale: float) -> PointScores:
    """The PointScores the quadratic model predicts at `scale` from two measurements of one range."""
    if low.layer_range != high.layer_range or not 0 < low.scale < high.scale:
        raise ValueError("two strengths of one layer range, the lower first")
    vals = {}
    for name in SHIFTS:
        a, b = fit_curve(low.scale, getattr(low, name), high.scale, getattr(high, name))
        vals[name] = a * scale + b * scale * scale
    return PointScores(low.layer_range, float(scale), **vals)


def strongest_within(low: PointScores, high: PointScores, budget: Budget) -> tuple[Optional[PointScores], str]:
    """The predicted point at the strongest strength of the grid within the budget that has a
    positive toxic/clean margin (None if there is none), and what bound it."""
    best: Optional[PointScores] = None
    why = f"the largest strength tried ({budget.max_scale:g})"
    n = int(round(budget.max_scale / budget.step))
    for k in range(1, n + 1):
        p = predict(low, high, round(k * budget.step, 6))
        if p.fluency_ratio > budget.fluency:
            why = f"fluency x{p.fluency_ratio:.2f} > x{budget.fluency:g} beyond it"
            break
        if p.benign_ratio > budget.benign:
            why = f"benign x{p.benign_ratio:.2f} > x{budget.benign:g} beyond it"
            break
        if p.margin > 0:         # where the curve dips below zero (small strengths, noise) it is no choice
            best = p
    return best, why


def choose(measured: Sequence[PointScores], budget: Budget = Budget()) -> Choice:
    """The point to steer at: per layer range (two measured strengths each), the strongest strength
    within the budget; of those, the one with the largest specific margin whose specificity is at
    least budget.min_specificity (else the largest specific margin found)."""
    by_range: dict[tuple[int, int], list[PointScores]] = {}
    for p in measured:
        by_range.setdefault(p.layer_range, []).append(p)
    options: list[tuple[PointScores, str]] = []
    for r, pts in by_range.items():
        pts = sorted(pts, key=lambda p: p.scale)
        if len(pts) < 2:
            raise ValueError(f"layer range {r}: two strengths are needed")
        best, why = strongest_within(pts[0], pts[-1], budget)
        if best is not None:
            options.append((best, why))
    if not options:
        raise ValueError("no layer range stays within the budget at the smallest strength")
    specific = [o for o in options if o[0].specificity >= budget.min_specificity] or options
    point, why = max(specific, key=lambda o: (o[0].specific, -o[0].layer_range[0]))
    return Choice(point.layer_range, point.scale, point, why)


def within(p: PointScores, budget: Budget) -> bool:
    """A measured point keeps to the budget."""
    return p.fluency_ratio <= budget.fluency * 1.0001 and p.benign_ratio <= budget.benign * 1.0001 \
        and math.isfinite(p.margin)
