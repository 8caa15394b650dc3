"""The records of an eval output folder as read back: JSONL lines, and the schema every resumed
record must follow before the report (or a resume) trusts it.

A record that is not a JSON object, lacks a key, or has a key of the wrong type is dropped and
counted, never passed on: build_report indexes and converts these fields without further checks.
Keys this schema does not know (such as an optional "judge_scores") are allowed and kept as they are;
the optional keys of sweeps and corpus perplexity ("point", "nll", "tokens") are checked when present.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Iterable, Optional


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _nonneg_int(v: Any) -> bool:
    return _int(v) and v >= 0


def _str(v: Any) -> bool:
    return isinstance(v, str)


def _number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _score_map(v: Any) -> bool:
    """{name: finite number or null} (a null is a value that did not exist, e.g. an empty text)."""
    return isinstance(v, dict) and all(isinstance(k, str) and (x is None or _number(x)) for k, x in v.items())


# key -> check, for one line of generations.jsonl (see runner.py's module doc)
GENERATION_SCHEMA: dict[str, Callable[[Any], bool]] = {
    "prompt_id": _nonneg_int, "prompt": _str, "method": _str, "sample": _nonneg_int, "seed": _nonneg_int,
    "text": _str, "scores": _score_map, "ppl": _score_map, "n_tokens": _nonneg_int, "stop_reason": _str,
}

# key -> check, for one line of timings.jsonl
TIMING_SCHEMA: dict[str, Callable[[Any], bool]] = {
    "prompt_id": _nonneg_int, "method": _str, "n_samples": _nonneg_int, "n_tokens": _nonneg_int,
    "n_prompt_tokens": _nonneg_int, "n_decode_steps": _nonneg_int,
    **{k: _number for k in ("setup_s", "prefill_s", "decode_s", "gen_s", "score_s", "ppl_s")},
}


def _point(v: Any) -> bool:
    """A sweep point: {setting: a JSON scalar or a [start, end] layer range}."""
    return isinstance(v, dict) and all(isinstance(k, str) and (x is None or isinstance(x, (str, bool, int, float))
                                                               or (isinstance(x, list) and len(x) == 2
                                                                   and all(_int(i) for i in x)))
                                       for k, x in v.items())


def _nll_map(v: Any) -> bool:
    """{judge: [summed NLL or null, tokens]}."""
    return isinstance(v, dict) and all(isinstance(k, str) and isinstance(x, list) and len(x) == 2 and
                                       (x[0] is None or _number(x[0])) and _nonneg_int(x[1]) for k, x in v.items())


def _tokens(v: Any) -> bool:
    return isinstance(v, list) and all(_int(t) for t in v)


# keys a record may lack (runs written before they existed), checked when present, in either file
OPTIONAL: dict[str, Callable[[Any], bool]] = {"point": _point, "nll": _nll_map, "tokens": _tokens}


def schema_problem(rec: Any, schema: dict[str, Callable[[Any], bool]]) -> Optional[str]:
    """None for a good record, else what is wrong with it (for messages and tests)."""
    if not isinstance(rec, dict):
        return f"not a JSON object but {type(rec).__name__}"
    for key, ok in schema.items():
        if key not in rec:
            return f"no {key!r}"
        if not ok(rec[key]):
            return f"{key!r} has a wrong type or value: {rec[key]!r:.80}"
    for key, ok in OPTIONAL.items():
        if key in rec and not ok(rec[key]):
            return f"{key!r} has a wrong type or value: {rec[key]!r:.80}"
    return None


def split_valid(recs: Iterable[Any], schema: dict[str, Callable[[Any], bool]]) -> tuple[list[dict], int]:
    """(the records that follow `schema`, how many did not)."""
    good, bad = [], 0
    for r in recs:
        if schema_problem(r, schema) is None:
            good.append(r)
        else:
            bad += 1
    return good, bad


def read_jsonl(path: Path) -> tuple[list[dict], int]:
    """The records of a JSONL file and how many lines were dropped (a truncated last line, a line
    that is not a JSON object)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], 0
    parts = data.split(b"\n")
    tail = parts.pop()                   # b"" when the file ends with a newline, else a cut line
    dropped = int(bool(tail.strip()))
    out = []
    for line in parts:
        if not line.strip():
            continue
        try:
            rec = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            dropped += 1
            continue
        if isinstance(rec, dict):
            out.append(rec)
        else:
            dropped += 1
    return out, dropped


def read_valid(path: Path, schema: dict[str, Callable[[Any], bool]]) -> tuple[list[dict], int]:
    """The records of a JSONL file that follow `schema`, and how many lines were dropped (unreadable
    or not following it)."""
    recs, unreadable = read_jsonl(path)
    good, bad = split_valid(recs, schema)
    return good, unreadable + bad
