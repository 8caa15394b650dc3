"""What runs on a model without a measured profile: never the papers' all-layer settings (they
broke text on both embedded models: perplexity x18-33 on gemma-3-270m, docs/results/runs-01-03-early.md),
but the last sixth of the layers at strengths that stayed within the fluency budget (corpus PPL
<= x1.25, benign <= x1.05) on BOTH embedded models in their calibrations (the shipped profiles'
entries; docs/method.md §7.7 and docs/results/fast-setup.md list them). It takes the form of a
profile (kind "safe-defaults"), so every path that applies a profile applies it the same way, and a
fast-setup profile carries the same entries for the methods it did not measure.
"""

from __future__ import annotations

from typing import Any, Mapping

from . import methods
from .condition import DEFAULT_CONDITION
from .profiles import Profile

KIND = "safe-defaults"
DEFAULT_METHOD = "fgdilp"      # per prompt, self-diagnosed by the scorer: measured safe on both models
HOW_TO_PROFILE = "`fgdilp-cpp calibrate --fast MODEL` makes one in minutes (or drop --no-auto-setup)"


def last_sixth(n_layer: int) -> tuple[int, int]:
    """The last sixth of the layers (both calibrated profiles chose it: 15-17 of 18, 25-29 of 30)."""
    return (n_layer - max(1, round(n_layer / 6)), n_layer - 1)


def safe_entries(n_layer: int) -> dict[str, dict[str, Any]]:
    """{method: settings} at the last sixth of the layers: each strength is at most the one the
    calibrations measured within the budgets on both embedded models (fgdilp 0.25 / 0.25, frozen 0.3
    / 0.2 under the reply contrast, TR 1.0 / 0.15 (reply), the random control 0.15 / 0.3, cvec 1.0
    / 0.25; the universal directions 0.8 / 0.9, condition 0.05 / 0.1)."""
    r = list(last_sixth(n_layer))
    return {
        "fgdilp": {"steer_scale": 0.25, "steer_layer_range": r, "diagnoser": "scorer"},
        "fgdilp-frozen": {"steer_scale": 0.2, "steer_layer_range": r, "contrast": "reply", "diagnoser": "scorer"},
        "tr": {"steer_scale": 0.15, "steer_layer_range": r, "contrast": "reply"},
        "random": {"steer_scale": 0.15, "steer_layer_range": r, "contrast": "reply"},
        "cvec": {"steer_scale": 0.25, "steer_layer_range": r},
        methods.UNIVERSAL: {"steer_scale": 0.5, "steer_layer_range": r, "condition": DEFAULT_CONDITION},
    }


def safe_profile(identity: Mapping[str, str], n_layer: int) -> Profile:
    """The stand-in profile of a model nobody measured."""
    entries = {m: {"settings": s, "figures": {}} for m, s in safe_entries(n_layer).items()}
    return Profile(model=dict(identity), method=DEFAULT_METHOD, methods=entries,
                   made_by="fgdilp-cpp's measured-safe defaults (no profile for this model)",
                   setup={"kind": KIND})


def with_safe_entries(profile: Profile, n_layer: int) -> Profile:
    """The profile with the safe entry of every method it has none for (a fast-setup profile
    measures only the universal directions)."""
    for m, s in safe_entries(n_layer).items():
        profile.methods.setdefault(m, {"settings": s, "figures": {"not_measured": "the measured-safe defaults"}})
    return profile


def is_safe_defaults(profile) -> bool:
    return profile is not None and profile.setup.get("kind") == KIND
