"""Request fields that shape sampling: llama.cpp's penalties, and a grammar for the reply (GBNF
text, a JSON schema, OpenAI's response_format), each checked here (a 400 naming the field).
The fields and their limits are listed in server.py's docstring.
"""

from __future__ import annotations

import json
import re
from typing import Any, Optional

from llama_cpp.llama_grammar import json_schema_to_gbnf

from ..engine.sampling import grammar_error
from .openai_checks import bad_field as _bad
from .openai_checks import checked_number as _number
from .openai_checks import show_value as _show
from ..params import MAX_REPEAT_LAST_N, MAX_REPEAT_PENALTY

MAX_GRAMMAR_CHARS = 1 << 16     # llama.cpp echoes a grammar it cannot parse on stderr: kept short
# repetition counts ({m,n} in GBNF and patterns; a schema's maxLength, maxItems...) are expanded into
# rules, by llama.cpp's parser and by the schema converter, on the event loop: their sum is capped
MAX_REPEATS = 10_000
_REPEAT = re.compile(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")
_SCHEMA_COUNTS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties")
_ANY_CHAR, _JSON_CHAR = r'char ::= [^"\\] |', r'char ::= [^"\\\x7F\x00-\x1F] |'


def penalties(body: dict, max_tokens: int) -> dict[str, Any]:
    """llama.cpp's penalties: repeat_penalty (0, 10], presence_penalty and frequency_penalty [-2, 2]
    over the last repeat_last_n (alias penalty_last_n; -1: all) tokens of the reply."""
    ov: dict[str, Any] = {}
    if (v := _number(body, "repeat_penalty", 0, MAX_REPEAT_PENALTY, lo_open=True)) is not None:
        ov["repeat_penalty"] = float(v)
    for name in ("presence_penalty", "frequency_penalty"):
        if (v := _number(body, name, -2, 2)) is not None:
            ov[name] = float(v)
    windows = {name: v for name in ("repeat_last_n", "penalty_last_n")
               if (v := _number(body, name, -1, MAX_REPEAT_LAST_N, integer=True)) is not None}
    if len(set(windows.values())) > 1:
        raise _bad("penalty_last_n", "repeat_last_n and penalty_last_n are one setting: give one of them")
    if windows:
        n = next(iter(windows.values()))
        # the window covers the reply only: past the longest reply it is the same as the whole reply
        ov["repeat_last_n"] = max_tokens if n == -1 else min(n, max_tokens)
    return ov


def reply_grammar(body: dict, vocab) -> Optional[str]:
    """The GBNF grammar the reply must follow: grammar (GBNF text), json_schema (a JSON schema),
    or response_format json_object / json_schema (JSON schemas converted by llama-cpp-python's
    converter); at most one of them. Checked by llama.cpp's own grammar parser (400 naming the field)."""
    found: list[tuple[str, str]] = []
    if (g := body.get("grammar")) is not None:
        if not isinstance(g, str):
            raise _bad("grammar", "grammar must be a string of GBNF rules")
        _check_repeats("grammar", _repeats(g))
        if g.strip():                            # "": no grammar (as llama-server reads it)
            found.append(("grammar", g))
    if (schema := body.get("json_schema")) is not None:
        found.append(("json_schema", _schema_grammar("json_schema", schema)))
    if (rf := body.get("response_format")) is not None:
        kind = rf.get("type") if isinstance(rf, dict) else None
        if kind == "json_object":
            found.append(("response_format", _schema_grammar("response_format", rf.get("schema") or {"type": "object"})))
        elif kind == "json_schema":
            spec = rf.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else rf.get("schema")
            if schema is None:
                raise _bad("response_format", "response_format json_schema needs json_schema.schema")
            found.append(("response_format", _schema_grammar("response_format", schema)))
        elif kind != "text":
            raise _bad("response_format", "response_format type must be text, json_object or json_schema, not "
                       f"{_show(kind)}")
    if len(found) > 1:
        raise _bad(found[1][0], f"{found[0][0]} and {found[1][0]} both constrain the reply: give one of them")
    if not found:
        return None
    name, text = found[0]
    if len(text) > MAX_GRAMMAR_CHARS:
        raise _bad(name, f"{name} gives a grammar of {len(text)} characters, more than {MAX_GRAMMAR_CHARS}")
    if (why := grammar_error(vocab, text)) is not None:
        raise _bad(name, f"{name} {why}")
    return text


def _schema_grammar(name: str, schema: Any) -> str:
    """A JSON schema as GBNF (llama-cpp-python's converter; remote $refs are not fetched)."""
    if not isinstance(schema, dict):
        raise _bad(name, f"{name} must be a JSON schema (an object)")
    _check_repeats(name, _schema_repeats(schema))
    try:
        # the converter's string characters include the control characters that JSON forbids
        # unescaped (llama.cpp's own converter excludes them too)
        return json_schema_to_gbnf(json.dumps(schema)).replace(_ANY_CHAR, _JSON_CHAR)
    except Exception as exc:  # noqa: BLE001 - the converter fails with asserts, KeyErrors, RecursionError...
        raise _bad(name, f"{name} is not a JSON schema this server can follow: {str(exc)[:200] or type(exc).__name__}") \
            from None


def _repeats(text: str) -> int:
    """The sum of the {m}, {m,} and {m,n} repetition counts in GBNF or regex text."""
    return sum(max(int(m), int(n or 0)) for m, n in _REPEAT.findall(text))


def _schema_repeats(schema: dict) -> int:
    """The sum of a JSON schema's repetition counts (the length and size bounds, its patterns')."""
    total, todo = 0, [schema]
    while todo:                                  # iterative: a schema may nest deeply
        v = todo.pop()
        if isinstance(v, dict):
            for k, x in v.items():
                if k in _SCHEMA_COUNTS and type(x) is int:
                    total += max(x, 0)
                elif k == "pattern" and isinstance(x, str):
                    total += _repeats(x)
                else:
                    todo.append(x)
        elif isinstance(v, list):
            todo.extend(v)
    return total


def _check_repeats(name: str, total: int) -> None:
    if total > MAX_REPEATS:
        raise _bad(name, f"{name} asks for {total} repetitions in all (maxLength, maxItems, {{m,n}}...), "
                   f"more than {MAX_REPEATS}")
