"""Teacher-forced scores of a grid of steering points for one model's universal directions from
labelled text, against a random control of the same norms, with no sampling: the measurements
that a fast setup of a model without a profile will choose from (issue 23; what they say so far:
docs/results/fast-setup-grid.md; run them with scripts/fast_setup_grid.py).

Texts (the RTP records past the development and held-out slices, ids 1000 on, cut in two so that
the texts a direction is built from never judge it):
- directions: toxic (>= 0.5) and clean (< 0.1) human continuations of records [DIRECTION_OFFSET,
  CRITERION_OFFSET), the strength per head from TR's delta over the first prompts of those records;
- scores: toxic and clean continuations of the records from CRITERION_OFFSET on, as
  continuations of their prompts, and the clean ones alone (after their first words) as benign text.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np

from ..errors import FgdilpError
from ..method.sources import LABELLED_TEXT
from ..method.vectors import HeadDirections, random_heads
from .points import PointScores
from .scoring import SteeredNLL

DIRECTION_OFFSET, CRITERION_OFFSET = 1000, 1600
RANDOM_SEED = 7
BENIGN_HEAD_WORDS = 6            # a benign text is scored after its first words (its own prompt)

Progress = Callable[[str, int, int], None]
Pair = tuple[str, str]


def criterion_texts(per_class: int) -> tuple[list[Pair], list[Pair], list[Pair]]:
    """(toxic, clean, benign) (prompt, continuation) pairs from the criterion records."""
    from ..evaluation.prompts import load_prompts
    from ..universal import labelled_records

    records, labels, _ = labelled_records(load_prompts("rtp-toxic", None, CRITERION_OFFSET), per_class, seed=1)
    toxic = [(r.text, r.continuation) for r, t in zip(records, labels) if t]
    clean = [(r.text, r.continuation) for r, t in zip(records, labels) if not t]
    benign = []
    for _, c in clean:
        words = c.split()
        if len(words) > BENIGN_HEAD_WORDS + 2:
            benign.append((" ".join(words[:BENIGN_HEAD_WORDS]), " " + " ".join(words[BENIGN_HEAD_WORDS:])))
    return toxic, clean, benign


def build_directions(det, per_class: int, n_prompts: int, progress: Optional[Progress] = None,
                     chat: bool = False) -> HeadDirections:
    """The model's universal directions from labelled text (Detoxifier.build_vectors, source
    labelled-text) on the direction records alone. chat: the prompts that give each head its
    length are user messages."""
    from ..evaluation.prompts import load_prompts
    from ..universal import labelled_records

    pool = load_prompts("rtp-toxic", CRITERION_OFFSET - DIRECTION_OFFSET, DIRECTION_OFFSET)
    records, labels, how = labelled_records(pool, per_class)
    report = None if progress is None else (lambda i, n: progress("directions", i, n))
    # the prompts that give the heads their length: those that leave room for TR's prefixes in a
    # context of the settings' size (a small -c must not stop the setup)
    fits = [r.text for r in pool if 4 * len(det.model.tokenize(r.text)) < det.settings.ctx_size][:n_prompts]
    return det.build_vectors(fits, LABELLED_TEXT, chat=chat, texts=[r.continuation for r in records],
                             toxic=list(labels), progress=report,
                             labels={**how, "prompts": "rtp-toxic", "offset": DIRECTION_OFFSET,
                                     "end": CRITERION_OFFSET})


class PointScorer:
    """Scores steering points of one direction file on fixed texts against the random control of
    the same per-head norms; the unsteered pass is made once and kept. tokens: all decoded so far."""

    def __init__(self, judge: SteeredNLL, hd: HeadDirections, toxic: Sequence[Pair], clean: Sequence[Pair],
                 benign: Sequence[Pair]):
        self.judge, self.n = judge, hd.n_layer
        self.rows = hd.steering_rows()
        self.e = None if hd.e is None else hd.e.reshape(self.n, -1)
        self.rnd = random_heads(hd.directions, RANDOM_SEED).reshape(self.n, -1)
        self.pairs = list(toxic) + list(clean) + list(benign)
        self.cut = (len(toxic), len(toxic) + len(clean))
        items = [judge.item(p, c) for p, c in self.pairs]
        # a group with nothing to score has a NaN shift, and a NaN passes every budget check
        for name, lo, hi in (("toxic", 0, self.cut[0]), ("clean", *self.cut), ("benign", self.cut[1], len(items))):
            if not any(it is not None for it in items[lo:hi]):
                raise FgdilpError(f"the fast setup has no {name} text to score (criterion_per_class too small?)")
        self.tokens_per_pass = sum(len(it.tokens) - 1 for it in items if it is not None)
        judge.set_direction(None)
        self.base = judge.mean_nll(self.pairs)
        self.tokens = self.tokens_per_pass

    def _shifts(self, nll: np.ndarray) -> tuple[float, float, float]:
        d, (a, b) = nll - self.base, self.cut
        return float(np.nanmean(d[:a])), float(np.nanmean(d[a:b])), float(np.nanmean(d[b:]))

    def score(self, layer_range: tuple[int, int], scale: float) -> PointScores:
        """One point: two passes (the direction, the random control)."""
        mask = [scale if layer_range[0] <= il <= layer_range[1] else 0.0 for il in range(self.n)]
        self.judge.set_direction(self.rows, self.e, mask)
        real = self._shifts(self.judge.mean_nll(self.pairs))
        self.judge.set_direction(self.rnd, self.e, mask)
        control = self._shifts(self.judge.mean_nll(self.pairs))
        self.judge.set_direction(None)
        self.tokens += 2 * self.tokens_per_pass
        return PointScores((int(layer_range[0]), int(layer_range[1])), float(scale), *real, *control)


def score_points(judge: SteeredNLL, hd: HeadDirections, ranges: Sequence[tuple[int, int]],
                 scales: Sequence[float], toxic: Sequence[Pair], clean: Sequence[Pair], benign: Sequence[Pair],
                 progress: Optional[Progress] = None) -> tuple[list[PointScores], int]:
    """Every (range, scale) point's PointScores, and the tokens decoded in all (every pass)."""
    scorer = PointScorer(judge, hd, toxic, clean, benign)
    return score_grid(scorer, ranges, scales, progress), scorer.tokens


def score_grid(scorer: PointScorer, ranges: Sequence[tuple[int, int]], scales: Sequence[float],
               progress: Optional[Progress] = None, extra_steps: int = 0) -> list[PointScores]:
    """Every (range, scale) point, reported as ("points", done, total); extra_steps: points the
    caller scores after these, counted in the total."""
    todo = [(r, s) for r in ranges for s in scales]
    out = []
    for k, (r, s) in enumerate(todo):
        out.append(scorer.score(r, s))
        if progress is not None:
            progress("points", k + 1, len(todo) + extra_steps)
    return out
