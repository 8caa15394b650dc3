"""The fast setup of a model without a profile (docs/method.md §7.7): universal directions from
labelled text, then where and how hard to steer chosen by teacher-forced scores against a random
control of the same norms (autosetup.criterion), with no sampling.

Texts (the RTP records past the development and held-out slices, ids 1000 on, cut in two so that
the texts a direction is built from never judge it):
- directions: toxic (>= 0.5) and clean (< 0.1) human continuations of records [DIRECTION_OFFSET,
  CRITERION_OFFSET), the strength per head from TR's delta over STRENGTH_PROMPTS of those prompts;
- criterion: toxic and clean continuations of the records from CRITERION_OFFSET on, as
  continuations of their prompts, and the clean ones alone as benign text.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

from ..errors import FgdilpError
from ..method.vectors import HeadDirections, random_heads
from .criterion import PointScores, candidate_ranges, choose
from .scoring import SteeredNLL

DIRECTION_OFFSET, CRITERION_OFFSET = 1000, 1600
DIRECTION_PER_CLASS = 96         # toxic and clean texts each that the direction is averaged over
STRENGTH_PROMPTS = 16            # prompts whose TR delta gives each head its length
CRITERION_PER_CLASS = 32         # toxic and clean continuations each that judge a point
SCALES = (0.4, 0.8, 1.2, 1.6, 2.4)
RANDOM_SEED = 7
BENIGN_HEAD_WORDS = 6            # a benign text is scored after its first words (its own prompt)

Progress = Callable[[str, int, int], None]


@dataclass
class FastSetup:
    """What the fast setup found: the directions, every point's scores, the chosen one (None: no
    point within the budgets), and what it cost."""
    directions: HeadDirections
    points: list[PointScores]
    chosen: Optional[PointScores]
    seconds: float
    tokens: int                                   # tokens the scorer processed (every pass)
    sizes: dict = field(default_factory=dict)

    def summary(self) -> str:
        if self.chosen is None:
            return (f"fast setup ({self.seconds:.0f} s): no point stayed within the budgets; "
                    "the model runs unsteered unless you choose settings")
        c = self.chosen
        return (f"fast setup ({self.seconds:.0f} s): universal directions on layers {c.layer_range[0]}-"
                f"{c.layer_range[1]} at scale {c.scale:g}: toxic/clean margin +{c.margin:.3f} nats/token "
                f"(random push +{c.random_margin:.3f}), fluency cost x{c.fluency_ratio:.3f}, "
                f"benign x{c.benign_ratio:.3f}")


def criterion_texts(per_class: int = CRITERION_PER_CLASS):
    """(toxic pairs, clean pairs, benign pairs) of (prompt, continuation) from the criterion records."""
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


def build_directions(det, per_class: int = DIRECTION_PER_CLASS, n_prompts: int = STRENGTH_PROMPTS,
                     chat: bool = False, progress: Optional[Progress] = None) -> HeadDirections:
    """The model's universal directions from labelled text (Detoxifier.build_data_vectors) on the
    direction records alone."""
    from ..evaluation.prompts import load_prompts
    from ..universal import labelled_records

    pool = load_prompts("rtp-toxic", CRITERION_OFFSET - DIRECTION_OFFSET, DIRECTION_OFFSET)
    records, labels, how = labelled_records(pool, per_class)
    prompts = [r.text for r in pool[:n_prompts]]
    report = None if progress is None else (lambda i, n: progress("directions", i, n))
    hd = det.build_data_vectors(prompts, [r.continuation for r in records], list(labels), report, chat=chat,
                                labels={**how, "prompts": "rtp-toxic", "offset": DIRECTION_OFFSET,
                                        "end": CRITERION_OFFSET})
    return hd


def score_points(judge: SteeredNLL, hd: HeadDirections, ranges: Sequence[tuple[int, int]],
                 scales: Sequence[float], toxic, clean, benign,
                 progress: Optional[Progress] = None) -> tuple[list[PointScores], int]:
    """Every (range, scale) point's PointScores, and the tokens scored in all."""
    n = hd.n_layer
    rows, e = hd.steering_rows(), hd.e.reshape(n, -1) if hd.e is not None else None
    rnd = random_heads(hd.directions, RANDOM_SEED).reshape(n, -1)
    pairs = list(toxic) + list(clean) + list(benign)
    cut = (len(toxic), len(toxic) + len(clean))
    tokens_per_pass = sum(len(judge._item(0, p, c).tokens) for p, c in pairs if judge._item(0, p, c) is not None)

    def shifts(nll: np.ndarray) -> tuple[float, float, float]:
        d = nll - base
        return (float(np.nanmean(d[:cut[0]])), float(np.nanmean(d[cut[0]:cut[1]])), float(np.nanmean(d[cut[1]:])))

    judge.set_direction(None)
    base = judge.mean_nll(pairs)
    todo = [(r, s) for r in ranges for s in scales]
    out = []
    for k, (r, s) in enumerate(todo):
        mask = np.array([s if r[0] <= il <= r[1] else 0.0 for il in range(n)])
        judge.set_direction(rows, e, mask)
        real = shifts(judge.mean_nll(pairs))
        judge.set_direction(rnd, e, mask)
        control = shifts(judge.mean_nll(pairs))
        out.append(PointScores((int(r[0]), int(r[1])), float(s), *real, *control))
        if progress is not None:
            progress("points", k + 1, len(todo))
    judge.set_direction(None)
    return out, tokens_per_pass * (1 + 2 * len(todo))


def fast_setup(det, chat: bool = False, progress: Optional[Progress] = None,
               scales: Sequence[float] = SCALES, direction_per_class: int = DIRECTION_PER_CLASS,
               criterion_per_class: int = CRITERION_PER_CLASS, n_threads: int = 0) -> FastSetup:
    """Directions, scores of every candidate point, and the choice, for `det`'s model."""
    if chat:
        raise FgdilpError("the fast setup scores plain text; chat models are set up on plain text too "
                          "(pass chat=False)")
    t0 = time.perf_counter()
    hd = build_directions(det, direction_per_class, chat=False, progress=progress)
    toxic, clean, benign = criterion_texts(criterion_per_class)
    ranges = candidate_ranges(det.model.info.n_layer)
    with SteeredNLL(det.model, n_threads=n_threads or det.settings.threads, max_tokens=128) as judge:
        points, tokens = score_points(judge, hd, ranges, scales, toxic, clean, benign, progress)
    sizes = {"direction_texts": 2 * direction_per_class, "strength_prompts": STRENGTH_PROMPTS,
             "toxic": len(toxic), "clean": len(clean), "benign": len(benign), "ranges": [list(r) for r in ranges],
             "scales": list(scales)}
    return FastSetup(hd, points, choose(points), time.perf_counter() - t0, tokens, sizes)
