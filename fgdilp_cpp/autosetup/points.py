"""Teacher-forced scores of one steering point, the measurements a fast setup will choose from
(issue 23; docs/results/fast-setup-grid.md). Pure numpy: no model here.

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

    def to_json(self) -> dict:
        d = asdict(self)
        d["layer_range"] = list(self.layer_range)
        d.update(margin=self.margin, random_margin=self.random_margin, specific=self.specific,
                 specificity=self.specificity, fluency_ratio=self.fluency_ratio, benign_ratio=self.benign_ratio)
        return {k: round(v, 5) if isinstance(v, float) else v for k, v in d.items()}


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
