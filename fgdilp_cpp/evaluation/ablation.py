"""Ablations: one lever at a time around a method's base point (`eval --ablate KEY=V`,
`calibrate --ablate KEY=V`), and the report's table of what each change does to toxicity and
fluency, paired with the base point on the same prompts and seeds (pure numpy).

A base point is a {Settings field: value} point as in sweep.py ({} = the run's own settings).
Each `--ablate KEY=V1,V2` adds, per method, the base point with KEY set to each value; a value
that does not change the method (KEY is not one of its settings, or V is its base value) adds
nothing, so every variant differs from its base in exactly one setting.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from .metrics import paired_bootstrap_ci
from .sweep import Point, normalize, parse_sweep, point_key, point_label, project


def parse_ablations(specs: Sequence[str]) -> list[tuple[str, list[Any]]]:
    """['edit=rotate', 'gate=0,0.2'] -> [("edit", ["rotate"]), ("gate", [0.0, 0.2])] (checked as
    --sweep's keys and values); a key given twice is refused."""
    from ..errors import FgdilpError

    out: list[tuple[str, list[Any]]] = []
    for spec in specs:
        name, values = parse_sweep(spec)
        if any(name == k for k, _ in out):
            raise FgdilpError(f"--ablate {name.replace('_', '-')} is given twice; list all its values in one")
        out.append((name, values))
    return out


def ablation_points(method: str, base: Mapping[str, Any], changes: Sequence[tuple[str, Sequence[Any]]]) -> list[Point]:
    """[base, then base with one setting changed, for each change that changes `method`], each
    projected on the settings of `method` (sweep.project), none repeated."""
    first = project(dict(base), method)
    out, seen = [first], {point_key(first)}
    for key, values in changes:
        for v in values:
            p = project({**dict(base), key: v}, method)
            k = point_key(p)
            if k not in seen:
                seen.add(k)
                out.append(p)
    return out


def _changed(base: Mapping[str, Any], point: Mapping[str, Any]) -> dict[str, list[Any]]:
    b, p = normalize(base), normalize(point)
    # a key given in one point only is a change even when its value is None (condition=off against
    # the run's condition): None given is "off" / "all", a key not given is the default
    return {k: [b.get(k), p.get(k)] for k in list(b) + [k for k in p if k not in b]
            if b.get(k) != p.get(k) or (k in b) != (k in p)}


def add_ablation(report: dict, per_prompt: Mapping[str, Mapping[str, np.ndarray]], bases: Mapping[str, Point],
                 n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> None:
    """report["ablation"] = {method: {"base": variant, "rows": [...]}} for each method of `bases`
    (method -> its base point) that has records at its base point. A row: the variant, the setting
    it changes ({key: [base value, value]}), its EMT / TP / corpus PPL ratio, and the paired
    differences to the base point with intervals (paired bootstrap over prompts)."""
    ms = report["methods"]
    out: dict[str, dict] = {}
    for method, base in bases.items():
        base_key = point_key(project(dict(base), method))
        variants = [v for v, m in ms.items() if m.get("method") == method]
        base_v = next((v for v in variants if point_key(ms[v].get("point")) == base_key), None)
        if base_v is None or base_v not in per_prompt:
            continue
        rows = []
        for v in variants:
            if v == base_v or v not in per_prompt:
                continue
            m, row = ms[v], {"variant": v, "change": _changed(ms[base_v].get("point") or {}, ms[v].get("point") or {})}
            row.update({k: m.get(k) for k in ("emt", "tp", "ppl_corpus_ratio")})
            for k in ("emt", "tp"):
                a, b = per_prompt[base_v][k], per_prompt[v][k]
                ok = np.isfinite(a) & np.isfinite(b)
                d, lo, hi = paired_bootstrap_ci(a[ok], b[ok], n_boot=n_boot, seed=seed, alpha=alpha)
                row[f"{k}_vs_base"] = [_num(d), _num(lo), _num(hi)]
            rows.append(row)
        b = ms[base_v]
        out[method] = {"base": base_v, "point": b.get("point") or {}, "emt": b.get("emt"), "tp": b.get("tp"),
                       "ppl_corpus_ratio": b.get("ppl_corpus_ratio"), "rows": rows}
    report["ablation"] = out


def _num(x: float) -> Optional[float]:
    return float(x) if np.isfinite(x) else None


def ablation_markdown(report: Mapping[str, Any], f: Callable, ci: Callable, table: Callable) -> list[str]:
    """The ablation table (empty without one); f, ci, table: report.py's number, interval and
    table formats."""
    ab = report.get("ablation") or {}
    if not ab:
        return []
    ms, base_name = report["methods"], report.get("baseline")
    rows = []
    for method, a in ab.items():
        none_ci = (ms.get(a["base"]) or {}).get("ci", {})
        rows.append([method, "base: " + (point_label(a["point"]) or "the run's settings"), f(a["emt"]),
                     ci(none_ci.get("emt")), "–", f(a["tp"]), "–", f(a["ppl_corpus_ratio"], 3)])
        for r in a["rows"]:
            given = (ms.get(r["variant"]) or {}).get("point") or {}
            change = ", ".join(f"{k}: {_v(x, k, k in a['point'])} → {_v(y, k, k in given)}"
                               for k, (x, y) in r["change"].items())
            vs_none = (ms.get(r["variant"]) or {}).get("ci", {})
            rows.append(["", change, f(r["emt"]), ci(vs_none.get("emt")), ci(r["emt_vs_base"]), f(r["tp"]),
                         ci(r["tp_vs_base"]), f(r["ppl_corpus_ratio"], 3)])
    return ["## Ablation: one setting at a time", "",
            table(["method", "setting", "EMT", f"Δ EMT vs {base_name} [95 % CI]", "Δ EMT vs base [95 % CI]", "TP",
                   "Δ TP vs base [95 % CI]", "corpus PPL ratio"], rows), "",
            "Each row changes one setting of the method's base point; the differences to the base are paired "
            "(the same prompts and seeds), with 95 % paired-bootstrap intervals over prompts.", ""]


def _v(v, key: str = "", given: bool = False) -> str:
    if v is None:
        return ("all" if key == "steer_layer_range" else "off") if given else "default"
    if isinstance(v, (list, tuple)) and len(v) == 2:
        return f"{v[0]}-{v[1]}"
    return str(v)
