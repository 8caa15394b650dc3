"""Sweeps: `eval --sweep KEY=V1,V2,...` over steering settings, the grid (a cross product of the
sweeps), and the point each method actually runs at.

A point is a dict {Settings field: value} applied per call (Detoxifier.generate(**point)); the
empty point is the run's own settings. A method runs only at the projection of each grid point on
the keys that change it (SWEEPABLE): methods without steering (`none`, `prompt`) run once, at the
empty point; `tr` under a sweep of mask_k x steer_scale runs once per steer_scale. So the runs
that would give identical output are never repeated, and every record's "point" names exactly the
settings that made it.

A setting is sweepable where its declaration (settings.Settings) says sweep=... (and per_call=True).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import fields
from typing import Any, Iterable, Mapping, Sequence

from .. import methods as registry
from ..errors import FgdilpError
from ..setting_spec import STEERING
from ..settings import OFF_WORDS, SWEEPABLE, Settings

# SWEEPABLE (settings.py): Settings field -> the methods it changes, the settings declared sweep=...

Point = dict[str, Any]


def _field_types() -> dict[str, str]:
    return {f.name: str(f.type) for f in fields(Settings)}


def _parse_value(key: str, typ: str, raw: str) -> Any:
    raw = raw.strip()
    try:
        if typ == "float":
            return float(raw)
        if typ == "Optional[float]":                 # e.g. gate: a number, or off
            return None if raw.lower() in OFF_WORDS else float(raw)
        if typ == "int":
            return int(raw)
        if typ == "bool":
            low = raw.lower()
            if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError(raw)
            return low in ("1", "true", "yes", "on")
        if typ == "Optional[tuple[int, int]]":       # a layer range: START-END, or "all"
            if raw.lower() == "all":
                return None
            a, b = raw.split("-")
            return (int(a), int(b))
    except ValueError:
        raise FgdilpError(f"--sweep {key}: {raw!r} is not a valid {typ.lower()}"
                          + (" (a layer range is START-END, e.g. 12-17, or all)" if "tuple" in typ else "")) from None
    return raw


def parse_sweep(spec: str) -> tuple[str, list[Any]]:
    """'steer-scale=0.5,1' -> ("steer_scale", [0.5, 1.0]); FgdilpError for an unknown or unsweepable
    key, a missing '=', a bad or repeated value."""
    key, sep, vals = spec.partition("=")
    name = key.strip().replace("-", "_")
    if not sep or not name:
        raise FgdilpError(f"--sweep needs KEY=V1,V2,... (e.g. steer-scale=0.5,1), not {spec!r}")
    types = _field_types()
    if name not in types:
        raise FgdilpError(f"--sweep {key.strip()}: not a setting (sweepable: {sweepable_names()})")
    if name not in SWEEPABLE:
        raise FgdilpError(f"--sweep {key.strip()}: this setting cannot be swept within one run (it shapes the "
                          f"contexts or is not a steering setting); sweepable: {sweepable_names()}")
    items = [v for v in vals.split(",") if v.strip()]
    if not items:
        raise FgdilpError(f"--sweep {key.strip()}: no values")
    values = [_parse_value(key.strip(), types[name], v) for v in items]
    try:                                   # the Settings type check (e.g. fusion must be a string)
        for v in values:
            Settings().updated({name: v})
    except FgdilpError as exc:
        raise FgdilpError(f"--sweep {key.strip()}: {exc}") from None
    if len({point_key({name: v}) for v in values}) != len(values):
        raise FgdilpError(f"--sweep {key.strip()}: a value is repeated")
    return name, values


def sweepable_names() -> str:
    return ", ".join(k.replace("_", "-") for k in SWEEPABLE)


def make_grid(specs: Iterable[str]) -> list[Point]:
    """The cross product of the sweeps ([{}] without any); a key swept twice is refused."""
    axes: dict[str, list[Any]] = {}
    for spec in specs:
        name, values = parse_sweep(spec)
        if name in axes:
            raise FgdilpError(f"--sweep {name.replace('_', '-')} is given twice; list all its values in one")
        axes[name] = values
    if not axes:
        return [{}]
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]


def grid_from(axes: Mapping[str, Sequence[Any]]) -> list[Point]:
    """The cross product of {Settings field: [values]} (e.g. for calibrate: {"steer_scale": [0.5, 1],
    "steer_layer_range": [(12, 17), None]}); keys and values are checked as --sweep's."""
    typed: dict[str, list[Any]] = {}
    for k, vals in axes.items():
        if k not in SWEEPABLE:
            raise FgdilpError(f"not sweepable: {k} (sweepable: {sweepable_names()})")
        if not vals:
            raise FgdilpError(f"sweep {k}: no values")
        typed[k] = [getattr(Settings().updated({k: v}), k) for v in vals]   # 1 -> 1.0 for a float setting
    axes = typed
    grid = [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())] if axes else [{}]
    for k, vals in axes.items():
        if len({point_key({k: v}) for v in vals}) != len(vals):
            raise FgdilpError(f"sweep {k}: a value is repeated")
    return grid


def check_grid(settings: Settings, grid: Sequence[Point], n_layer: int) -> None:
    """Every point's settings valid for this model, before anything is generated."""
    for p in grid:
        unknown = [k for k in p if k not in SWEEPABLE]
        if unknown:
            raise FgdilpError(f"not sweepable: {', '.join(unknown)} (sweepable: {sweepable_names()})")
        try:
            s = settings.updated(dict(p))
            s.steer().check(n_layer)
            s.fgdilp()
        except FgdilpError as exc:
            raise FgdilpError(f"sweep point {point_label(p)}: {exc}") from None


def project(point: Mapping[str, Any], method: str) -> Point:
    """The part of `point` that changes `method` (its keys in grid order)."""
    spec = registry.get(method)
    return {k: v for k, v in point.items() if SWEEPABLE.get(k, STEERING)(spec)}


def normalize(point: Mapping[str, Any] | None) -> Point:
    """A point as JSON gives it back (tuples as lists): records and grid compare equal."""
    return json.loads(json.dumps(dict(point or {})))


def point_key(point: Mapping[str, Any] | None) -> str:
    """A canonical string of a point (resume groups, report variants)."""
    return json.dumps(normalize(point), sort_keys=True, separators=(",", ":"))


def point_label(point: Mapping[str, Any] | None) -> str:
    """'steer_scale=0.5 steer_layer_range=12-17' ('' for the empty point)."""
    parts = []
    for k, v in (point or {}).items():
        if isinstance(v, (list, tuple)) and len(v) == 2:
            v = f"{v[0]}-{v[1]}"
        elif v is None:                  # every layer; a gate or other option: off
            v = "all" if k == "steer_layer_range" else "off"
        parts.append(f"{k}={v}")
    return " ".join(parts)


def variant_name(method: str, point: Mapping[str, Any] | None) -> str:
    """The report's name of a method at a point: 'tr' or 'tr[steer_scale=0.5 ...]'."""
    label = point_label(point)
    return f"{method}[{label}]" if label else method


def per_method(methods: Sequence[str], grid: "Sequence[Point] | Mapping[str, Sequence[Point]]") -> list[tuple[Point, list[str]]]:
    """[(point, the methods that run at it)] in grid order. grid: points for every method, or
    {method: its own points} (e.g. each method's chosen point, to confirm them; a method not in
    it runs at the empty point)."""
    if not isinstance(grid, Mapping):
        points = [dict(p) for p in grid] or [{}]
        return [(p, list(methods)) for p in points]
    extra = [m for m in grid if m not in methods]
    if extra:
        raise FgdilpError(f"the grid names methods that are not run: {', '.join(extra)}")
    order: dict[str, tuple[Point, list[str]]] = {}
    for m in methods:
        for p in (grid.get(m) or [{}]):
            order.setdefault(point_key(p), (dict(p), []))[1].append(m)
    return list(order.values())


def schedule(methods: Sequence[str], grid: "Sequence[Point] | Mapping[str, Sequence[Point]]"
             ) -> list[tuple[Point, str, Point]]:
    """(grid point, method, the method's projected point) in point-major, then method order, each
    (method, projected point) once: where a method runs in a sweep."""
    seen, out = set(), []
    for p, ms in per_method(methods, grid):
        for m in ms:
            proj = project(p, m)
            k = (m, point_key(proj))
            if k not in seen:
                seen.add(k)
                out.append((p, m, proj))
    return out
