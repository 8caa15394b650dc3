"""The fast setup of a model without a profile (`calibrate --fast`, and on first use): the model's
universal directions from the shipped labelled text, a layer range and strength chosen by the
teacher-forced criterion (criterion.py), the prompt-level condition, installed as the model's
profile, marked as made by the fast setup with its figures and the time it took. No sampling:
its cost is forward passes over a fixed number of tokens (docs/method.md §7.7).

    with Detoxifier.from_file("model.gguf", profile=False) as det:
        result = fast_setup(det)
        result.install()
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

from .. import methods
from ..chat.fitting import as_user_message
from ..condition import DEFAULT_CONDITION
from ..errors import FgdilpError
from ..method.vectors import HeadDirections
from ..profiles import FAST_SETUP, Profile, model_identity, profile_path_for, search_path, universal_path_for
from ..safe_defaults import DEFAULT_METHOD, with_safe_entries
from .criterion import Budget, choose, within
from .grid import PointScorer, build_directions, criterion_texts, score_grid
from .points import PointScores, candidate_ranges
from .scoring import SteeredNLL

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Sizes:
    """How much text the setup reads (docs/results/fast-setup.md measures how few keep the
    direction stable and the choice the same)."""
    direction_per_class: int = 128  # labelled texts per class the direction is the mean difference of
    norm_prompts: int = 16          # prompts whose TR delta gives each head its length
    criterion_per_class: int = 12   # toxic and clean continuations scored per point
    probe_scales: tuple[float, float] = (0.5, 1.0)
    n_ranges: int = 2               # the last sixth and the last third of the layers
    max_tokens: int = 96            # per scored (prompt, continuation) pair


@dataclass
class SetupResult:
    directions: HeadDirections
    profile: Profile
    seconds: float
    tokens: int
    points: list[PointScores] = field(default_factory=list)

    def summary(self) -> str:
        """One line: what was chosen and what it costs."""
        f = self.profile.setup
        took = f"{self.tokens} tokens in {self.seconds:.0f} s"
        chosen = f.get("chosen")
        if chosen is None:
            return (f"fast setup: {f['why']}; the profile runs the measured-safe defaults ({self.profile.method} "
                    f"on the last sixth of the layers); {took}")
        s = self.profile.methods[methods.UNIVERSAL]["settings"]
        return (f"fast setup: {methods.UNIVERSAL} on layers {s['steer_layer_range'][0]}-{s['steer_layer_range'][1]} "
                f"at scale {s['steer_scale']:g}, condition {s['condition']:g}; teacher-forced cost "
                f"x{chosen['fluency_ratio']:.2f} on clean continuations, x{chosen['benign_ratio']:.2f} on benign "
                f"text; specificity {chosen['specificity']:.2f}; {took}")

    def install(self, profile_path: Optional[Path] = None) -> tuple[Path, Path]:
        """Write the directions and the profile where the model's profile is looked up first (the
        user's profile folder; FGDILP_PROFILE_PATH's first folder when set), or the profile at
        profile_path with the directions beside it. Returns (profile, directions)."""
        folder = Path(profile_path).parent if profile_path else search_path()[0]
        sha = self.profile.model["weights_sha256"]
        vpath = universal_path_for(sha, folder)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            self.directions.save(vpath)
            entry = self.profile.methods[methods.UNIVERSAL]
            entry["universal_sha256"] = hashlib.sha256(vpath.read_bytes()).hexdigest()
            ppath = self.profile.save(profile_path or profile_path_for(self.profile.model, folder))
        except OSError as exc:
            raise FgdilpError(f"cannot write the fast setup's profile to {folder}: {exc} (set FGDILP_PROFILE_PATH "
                              f"to a folder you can write, or --no-auto-setup)") from None
        return ppath, vpath


def fast_setup(det, progress: Optional[Progress] = None, sizes: Sizes = Sizes(), budget: Optional[Budget] = None,
               chat: Optional[bool] = None, made_by: str = "fgdilp-cpp calibrate --fast") -> SetupResult:
    """Build and choose (nothing is written: SetupResult.install()). det: a Detoxifier of the model
    (its settings' threads are used; its profile is not). chat: the model is used through its chat
    template (None: when its GGUF carries one): the direction's length is measured on prompts as
    user messages and the criterion scores continuations as the assistant's replies."""
    t0 = time.perf_counter()
    budget = budget or Budget()
    info = det.model.info
    if chat is None:
        chat = bool(det.model.meta("tokenizer.chat_template"))
    hd = build_directions(det, sizes.direction_per_class, sizes.norm_prompts, progress, chat=chat)
    toxic, clean, benign = criterion_texts(sizes.criterion_per_class)
    if chat:   # the toxic prompts as user messages (benign text stays plain: the model continuing text)
        toxic = [(as_user_message(det, p), c) for p, c in toxic]
        clean = [(as_user_message(det, p), c) for p, c in clean]
    ranges = candidate_ranges(info.n_layer)[:sizes.n_ranges]
    n_points = len(ranges) * len(sizes.probe_scales) + 1       # the grid, then the chosen point measured
    with SteeredNLL(det.model, n_threads=det.settings.threads, max_tokens=sizes.max_tokens) as judge:
        judge.special_prompts = chat
        scorer = PointScorer(judge, hd, toxic, clean, benign)
        measured = score_grid(scorer, ranges, sizes.probe_scales, progress, extra_steps=1)
        point, why = _choose_and_verify(scorer, measured, budget)
        if progress is not None:
            progress("points", n_points, n_points)
        tokens = scorer.tokens
    seconds = time.perf_counter() - t0
    setup: dict[str, Any] = {
        "kind": FAST_SETUP, "seconds": round(seconds, 1), "tokens": tokens, "chat": chat,
        "sizes": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(sizes).items()},
        "budget": vars(budget), "why": why, "chosen": None if point is None else point.to_json(),
        "points": [p.to_json() for p in measured]}
    entries = {}
    if point is not None:
        entries[methods.UNIVERSAL] = {
            "settings": {"steer_scale": point.scale, "steer_layer_range": list(point.layer_range),
                         "condition": DEFAULT_CONDITION},
            "figures": {"fast_setup": point.to_json()}}
    profile = Profile(model=model_identity(det.model), method=methods.UNIVERSAL if point else DEFAULT_METHOD,
                      methods=entries, budgets={"teacher_forced": vars(budget)}, made_by=made_by,
                      created=datetime.now(timezone.utc).isoformat(timespec="seconds"), setup=setup)
    with_safe_entries(profile, info.n_layer)      # the methods it did not measure: the measured-safe entries
    return SetupResult(hd, profile, seconds, tokens, measured)


def _choose_and_verify(scorer: PointScorer, measured: list[PointScores], budget: Budget
                       ) -> tuple[Optional[PointScores], str]:
    """The criterion's point, measured: stepped down (x0.75, twice at most) while it breaks the
    budget. None (and why) where the directions move the toxic continuations no more than the clean
    ones within the budget: the profile then recommends the measured-safe default method."""
    try:
        choice = choose(measured, budget)
    except ValueError as exc:
        return None, f"no point to steer the directions at: {exc}"
    scale = choice.scale
    for _ in range(3):
        verified = scorer.score(choice.layer_range, scale)
        if within(verified, budget) and verified.margin > 0:
            return verified, choice.why
        scale = round(max(scale * 0.75, 0.05), 2)
    return None, f"the chosen point broke the budget or lost its margin when measured ({verified.to_json()})"
