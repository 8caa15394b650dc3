"""The settings one call of a Detoxifier runs at: its per-call overrides (settings.PER_CALL) over
the settings the Detoxifier was made with, and another method's own profile entry where nobody
set a value. `det` is an api.Detoxifier (not imported: api imports this module).
"""

from __future__ import annotations

from typing import Any, Mapping

from . import methods
from .errors import FgdilpError
from .settings import PER_CALL, Settings, resolve


def call_settings(det: Any, overrides: Mapping[str, Any]) -> tuple[Settings, dict[str, str]]:
    """The settings a call with these per-call `overrides` runs at, and where each came from
    ("call" for an override). Another method than the one in force gets its own profile entry
    where nobody set a value (the entry of the method in force does not carry over: TR must not
    run at the frozen FGDILP entry's contrast or gate); what shapes the contexts stays."""
    extra = overrides.keys() - PER_CALL
    if extra:
        raise FgdilpError(f"per-call settings are limited to {', '.join(sorted(PER_CALL))} (not "
                          f"{', '.join(sorted(extra))}); create another Detoxifier for other settings")
    if det.profile is None or overrides.get("method", det.settings.method) == det.settings.method:
        return (det.settings.updated(overrides) if overrides else det.settings,
                {**det.sources, **dict.fromkeys(overrides, "call")})
    s, where = resolve({**det.setting_layers, "call": dict(overrides)}, det.setting_command, det.profile)
    return (det.settings.updated({k: getattr(s, k) for k in PER_CALL}),
            {**det.sources, **{k: where[k] for k in PER_CALL}})


def run_settings(det: Any, overrides: Mapping[str, Any]) -> tuple[Settings, str]:
    """The settings a call with `overrides` runs at, and the method it runs as: a former name as
    its name now; with saved vectors, a method that has a saved-vectors form as that form."""
    has_vectors = det.vectors is not None
    if "method" in overrides and methods.is_method(overrides["method"], saved_vectors=has_vectors):
        overrides = {**overrides, "method": methods.run_name(overrides["method"], has_vectors)}
    s = call_settings(det, overrides)[0]
    if not has_vectors:
        return s, det.generator.resolve(s.method).name
    spec = methods.get(s.method)
    if "method" in overrides and spec.with_vectors is None:
        if not spec.heads:            # unsteered methods (the baselines of an eval) run as themselves
            return s, spec.name
        raise FgdilpError(f"this model runs saved vectors (frozen); it cannot run method {s.method!r}")
    return s, methods.saved_vectors().name


def settings_for(det: Any, method: str) -> Settings:
    """The settings a call with `method` runs at (the method's profile entry applied where
    nobody set a value)."""
    return run_settings(det, {"method": method})[0]
