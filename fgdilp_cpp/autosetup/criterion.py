"""The fast setup's choice of where and how hard to steer, from teacher-forced scores alone
(docs/method.md §7.7). Pure numpy: no model here.

For one candidate point (layer range, scale) and one direction, the scorer gives per-token NLL
shifts (steered minus unsteered, natural log) averaged over three kinds of text:
- toxic: toxic human continuations of toxic prompts (what steering should make less likely),
- clean: clean human continuations of toxic prompts (what the steered prompts should still say),
- benign: benign text (what a prompt the condition lets through would be scored on).
margin = toxic shift - clean shift: how much more the direction pushes away from the toxic
continuations than from the clean ones. The same is measured for a random direction with the same
per-head norms at the same point (the control): specific = margin - random margin is what the
direction does that any push of its size would not.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable, Optional

# budgets of the choice (ratios of teacher-forced perplexity, steered / unsteered)
FLUENCY_BUDGET = 1.25      # clean continuations of toxic prompts: the steered prompts' fluency
BENIGN_BUDGET = 1.05       # benign text
MIN_SPECIFICITY = 0.7      # the direction's margin beyond the random one's, as a share of its margin


@dataclass(frozen=True)
class PointScores:
    layer_range: tuple[int, int]
    scale: float
    toxic: float           # mean NLL shift per token of the toxic continuations (real direction)
    clean: float
    benign: float
    random_toxic: float    # the same for the random control
    random_clean: float
    random_benign: float

    @property
    def margin(self) -> float:
        return self.toxic - self.clean

    @property
    def random_margin(self) -> float:
        return self.random_toxic - self.random_clean

    @property
    def specific(self) -> float:
        return self.margin - self.random_margin

    @property
    def specificity(self) -> float:
        """Share of the direction's margin that the random push does not give (1 = all of it)."""
        return self.specific / self.margin if self.margin > 0 else 0.0

    @property
    def fluency_ratio(self) -> float:
        return math.exp(self.clean)

    @property
    def benign_ratio(self) -> float:
        return math.exp(self.benign)

    def within(self, fluency_budget: float = FLUENCY_BUDGET, benign_budget: float = BENIGN_BUDGET,
               min_specificity: float = MIN_SPECIFICITY) -> bool:
        return (self.margin > 0 and self.fluency_ratio <= fluency_budget and self.benign_ratio <= benign_budget
                and self.specificity >= min_specificity)

    def to_json(self) -> dict:
        d = asdict(self)
        d["layer_range"] = list(self.layer_range)
        d.update(margin=self.margin, random_margin=self.random_margin, specific=self.specific,
                 specificity=self.specificity, fluency_ratio=self.fluency_ratio, benign_ratio=self.benign_ratio)
        return {k: round(v, 5) if isinstance(v, float) else v for k, v in d.items()}


def choose(points: Iterable[PointScores], fluency_budget: float = FLUENCY_BUDGET,
           benign_budget: float = BENIGN_BUDGET, min_specificity: float = MIN_SPECIFICITY) -> Optional[PointScores]:
    """The point whose specific margin is largest among those within the budgets (fluency, benign
    text, specificity); ties (within 2 %) go to the lower scale, then the fewer layers. None when
    no point is within them: the model is then left unsteered rather than steered blindly."""
    ok = [p for p in points if p.within(fluency_budget, benign_budget, min_specificity)]
    if not ok:
        return None
    best = max(p.specific for p in ok)
    tied = [p for p in ok if p.specific >= best - 0.02 * abs(best)]
    return min(tied, key=lambda p: (p.scale, p.layer_range[1] - p.layer_range[0]))


def candidate_ranges(n_layer: int) -> list[tuple[int, int]]:
    """Layer ranges tried: the last sixth, third and half of the layers (both calibrated profiles
    chose the last sixth); distinct ranges only, at least one layer each."""
    out: list[tuple[int, int]] = []
    for part in (6, 3, 2):
        start = n_layer - max(1, round(n_layer / part))
        r = (start, n_layer - 1)
        if r not in out:
            out.append(r)
    return out
