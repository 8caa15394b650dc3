"""OpenAI request bodies: parsing, validation (400s that name the field) and stop strings.

The fields and their limits are listed in server.py's docstring.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from starlette.requests import Request

from .. import methods
from ..errors import FgdilpError, ParamError
from .openai_checks import ApiError
from .openai_checks import bad_field as _bad
from .openai_checks import checked_number as _number
from .openai_checks import show_value as _show
from ..settings import SPECS, TYPES

if TYPE_CHECKING:
    from ..api import Detoxifier

# OpenAI and llama.cpp fields this server cannot honour: accepted only at these no-op values (or null)
_INERT: dict[str, tuple] = {
    "logit_bias": ({},), "logprobs": (False, 0), "top_logprobs": (0,), "echo": (False,), "best_of": (1,),
    "suffix": ("",), "tools": ([],), "functions": ([],), "tool_choice": ("none", "auto"),
    "n_probs": (0,), "typical_p": (1,), "mirostat": (0,), "dynatemp_range": (0,), "xtc_probability": (0,),
    "dry_multiplier": (0,), "ignore_eos": (False,),
}

# fields common clients send that do not change the reply: accepted and not used (server.py's
# docstring); the settings of a llama.cpp sampler that is off (the switch above at its no-op value)
# change nothing either
PASS_THROUGH = frozenset({
    "user", "metadata", "store", "service_tier", "parallel_tool_calls", "prompt_cache_key", "safety_identifier",
    "cache_prompt", "id_slot", "timings_per_token",
    "mirostat_tau", "mirostat_eta", "dynatemp_exponent", "xtc_threshold", "dry_base", "dry_allowed_length",
    "dry_penalty_last_n", "dry_sequence_breakers",
})

# the request fields that set a setting (declared with each field of settings.Settings: api=...)
REQUEST_FIELDS = {name: spec for name, spec in SPECS.items() if spec.api}
# Settings fields whose request field has another name
JSON_FIELDS = {name: spec.api for name, spec in REQUEST_FIELDS.items() if spec.api != name}
# the fields parse_request reads (both endpoints; messages only on chat, prompt only on completions)
_READ = frozenset({
    "model", "n", "stop", "stream", "stream_options", "json_schema", "response_format", "explain",
    *(spec.api for spec in REQUEST_FIELDS.values()), *(a for spec in REQUEST_FIELDS.values() for a in spec.api_aliases),
})


def param_error(exc: ParamError) -> "ApiError":
    """A setting out of range, as a 400 naming the request field."""
    name = JSON_FIELDS.get(exc.field, exc.field)
    return ApiError(400, f"{name} {exc.reason}", param=name)


MAX_STOPS, MAX_STOP_CHARS = 4, 256      # the hold-back scan costs O(longest stop) per piece


def known_methods() -> tuple[str, ...]:
    """Every method a request or --allow-methods may name (the registry's listed methods)."""
    return methods.names()


def check_methods(names: "tuple[str, ...] | list[str]", has_vectors: bool = False) -> tuple[str, ...]:
    """--allow-methods checked against the known methods (FgdilpError naming the unknown one), each
    as the method a request runs (methods.run_name: a former name, or with has_vectors a method
    that applies the vectors file, becomes that)."""
    for name in names:
        if not methods.is_method(name, saved_vectors=has_vectors):
            raise FgdilpError(f"--allow-methods: unknown method {name!r} (one of {', '.join(known_methods())})")
    if not names:
        raise FgdilpError("--allow-methods needs at least one method")
    return tuple(dict.fromkeys(methods.run_name(n, has_vectors) for n in names))




@dataclass(frozen=True)
class Policy:
    """What a request may ask for on this server (--max-tokens, --allow-methods, --max-steer-scale)."""
    max_tokens: int
    methods: tuple[str, ...]
    max_steer_scale: float


@dataclass(frozen=True)
class GenRequest:
    """A validated completion request: messages (chat) or prompt, and the per-call settings."""
    messages: Optional[list[dict]]
    prompt: Optional[str]
    overrides: dict[str, Any]
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    explain: bool = False          # the reply's explain block in its "fgdilp" object


class StopScanner:
    """Cuts generated text before the first stop string; feed() returns the text that is safe to
    send now, holding back a tail that may be the start of a stop string."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops, self.text, self.stopped, self._sent = stops, "", False, 0
        self._longest = max((len(s) for s in stops), default=0)

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        start = max(0, len(self.text) - self._longest + 1)     # earlier text was already searched
        self.text += piece
        hits = [i for s in self.stops if (i := self.text.find(s, start)) >= 0]
        if hits:
            self.text, self.stopped = self.text[:min(hits)], True
            return self.flush()
        hold = next((k for k in range(min(len(self.text), self._longest - 1), 0, -1)
                     if any(s.startswith(self.text[-k:]) for s in self.stops)), 0)
        return self._take(len(self.text) - hold)

    def flush(self) -> str:
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        out, self._sent = self.text[self._sent:end], max(self._sent, end)
        return out


# ---- request parsing ----------------------------------------------------------------------------


def _no_nul(text: str, param: str) -> str:
    if "\x00" in text:
        raise _bad(param, f"{param} contains a NUL character")
    return text


def _text_content(content: Any, param: str) -> str:
    if isinstance(content, str):
        return _no_nul(content, param)
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise _bad(f"{param}[{j}]", f"only text content parts are supported, not {_show(kind)}")
            parts.append(_no_nul(part["text"], f"{param}[{j}].text"))
        return "\n".join(parts)
    raise _bad(param, "content must be a string or a list of text parts")


def _messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("messages", "messages must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}]", "each message must be an object with role and content")
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise _bad(f"messages[{i}].role", f"role must be system, developer, user or assistant, not "
                       f"{json.dumps(role)}")
        out.append({"role": role, "content": _text_content(m.get("content"), f"messages[{i}].content")})
    if out[-1]["role"] != "user":
        raise _bad("messages", "the last message must be the user's")
    return out


def _prompt(body: dict) -> str:
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1:
        p = p[0]
    if not isinstance(p, str):
        raise _bad("prompt", "prompt must be a string (or a list of exactly one string)")
    if not p.strip():
        raise _bad("prompt", "the prompt is empty")
    return _no_nul(p, "prompt")


def _plain_fields(body: dict) -> dict[str, Any]:
    """The numeric request fields read as their declaration says (settings.Settings: api=...,
    api_range or range); the others (api_custom) are read by hand below."""
    ov: dict[str, Any] = {}
    for name, spec in REQUEST_FIELDS.items():
        r = spec.api_range or spec.range
        if spec.api_custom or r is None:
            continue
        integer = TYPES[name] == "int"
        if (v := _number(body, spec.api, r.lo, r.hi, r.lo_open, r.hi_open, integer=integer)) is not None:
            ov[name] = v if integer else float(v)
    return ov


def parse_request(body: dict, chat: bool, det: "Detoxifier", policy: Policy) -> GenRequest:
    """The request's fields checked and turned into Detoxifier arguments (ApiError 400 otherwise).
    Everything a client can get wrong is caught here, so that an error while generating is the
    server's fault (a 500), apart from a conversation longer than the context."""
    text_field = "messages" if chat else "prompt"
    for name in body:
        if name not in _READ and name not in _INERT and name not in PASS_THROUGH and name != text_field:
            raise _bad(name, f"unknown field {_show(name)}: this server does not support it (and does not "
                       "ignore fields silently)")
    for name, fine in _INERT.items():
        if body.get(name) is not None and body[name] not in fine:
            raise _bad(name, f"{name} is not supported by this server")
    if body.get("n") is not None and (isinstance(body["n"], bool) or body["n"] != 1):
        raise _bad("n", "only n=1 is supported")
    if not isinstance(body.get("model", ""), str):
        raise _bad("model", "model must be a string")
    ov: dict[str, Any] = {}
    if body.get("n_predict") == -1 and type(body["n_predict"]) is int:
        body = {**body, "n_predict": policy.max_tokens}        # llama.cpp's "no limit": the server's
    sizes = [_number(body, name, 1, policy.max_tokens, integer=True)
             for name in ("max_completion_tokens", "max_tokens", "n_predict")]     # the first one given wins
    if (n := next((v for v in sizes if v is not None), None)) is not None:
        ov["n_predict"] = n
    ov.update(_plain_fields(body))
    if (method := body.get("method")) is not None:
        if methods.is_method(method, saved_vectors=det.vectors is not None):    # as it runs: a former name,
            method = methods.run_name(method, det.vectors is not None)          # --vectors' form
        if method not in policy.methods:
            raise _bad("method", f"method must be one of {', '.join(policy.methods)} on this server, "
                       f"not {_show(method)}")
        ov["method"] = method
    if (scale := _number(body, "steer_scale", 0, policy.max_steer_scale)) is not None:
        ov["steer_scale"] = float(scale)     # negative would toxify; past the cap, fluency is gone
    if (lr := body.get("steer_layer_range")) is not None:
        if not (isinstance(lr, list) and len(lr) == 2 and all(type(x) is int for x in lr)):
            raise _bad("steer_layer_range", "steer_layer_range must be [start, end] layer numbers")
        try:
            det.settings.updated({"steer_layer_range": lr}).steer().check(det.model.info.n_layer)
        except FgdilpError as exc:
            raise _bad("steer_layer_range", str(exc)) from None
        ov["steer_layer_range"] = (lr[0], lr[1])
    from .openai_sampling import penalties, reply_grammar      # (that module uses this one's helpers)

    ov.update(penalties(body, policy.max_tokens))
    if (grammar := reply_grammar(body, det.model.vocab)) is not None:
        ov["grammar"] = grammar
    explain = body.get("explain")
    if explain is not None and not isinstance(explain, bool):
        raise _bad("explain", "explain must be a boolean")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else (stop or [])
    if not (isinstance(stop, list) and len(stop) <= MAX_STOPS
            and all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stop)):
        raise _bad("stop", f"stop must be a string or a list of up to {MAX_STOPS} strings of 1 to "
                   f"{MAX_STOP_CHARS} characters")
    stream = body.get("stream") or False
    opts = body.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(opts, dict):
        raise _bad("stream", "stream must be a boolean and stream_options an object")
    return GenRequest(_messages(body) if chat else None, None if chat else _prompt(body), ov, tuple(stop),
                      stream, bool(opts.get("include_usage")), bool(explain))


async def read_json(request: Request, limit: int, timeout: float) -> dict:
    """The body as a JSON object: Content-Type application/json (415 otherwise: a web page can
    send text/plain to localhost without asking), read incrementally, refused past `limit` bytes
    (413) or when it takes longer than `timeout` seconds (408: a client dribbling its body would
    hold a connection forever), with no lone surrogate in any string (400)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise ApiError(415, f"Content-Type must be application/json, not {_show(kind or None)}",
                       code="unsupported_media_type")
    too_large = ApiError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise too_large if length.isdigit() else ApiError(400, "invalid Content-Length header")

    async def read() -> bytes:
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > limit:
                raise too_large
        return bytes(data)

    try:
        data = await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:               # (TimeoutError itself only from Python 3.11)
        raise ApiError(408, f"the request body did not arrive within {timeout:g} s", code="request_timeout",
                       headers={"Connection": "close"}) from None
    try:
        body = json.loads(data, parse_constant=_reject_constant)
    except (ValueError, RecursionError):      # RecursionError: nested too deep; ValueError: also an
        raise ApiError(400, "malformed JSON body") from None     # integer past Python's 4300 digits
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    if _may_hold_surrogates(data) and (where := _lone_surrogate(body)) is not None:
        raise _bad(where, f"{where} holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not text")
    return body


def _may_hold_surrogates(data: bytes) -> bool:
    """False when the body cannot decode to a surrogate (json.loads decodes with surrogatepass:
    from a \\uD800-\\uDFFF escape, UTF-8 bytes ED A0-BF .., or a UTF-16/32 body): one regex pass
    over the bytes instead of the walk below over every string of a 20,000-message body."""
    return json.detect_encoding(data) != "utf-8" or _SURROGATE_BYTES.search(data) is not None


def _lone_surrogate(body: dict) -> Optional[str]:
    """The path of the first string (key or value) with a lone surrogate: JSON's \\ud800 escapes
    decode to one, and it cannot be encoded as UTF-8 for the tokenizer."""
    todo: list[tuple[str, Any]] = [("", body)]
    while todo:                                # iterative: bodies may nest 1000 levels deep
        path, v = todo.pop()
        if isinstance(v, str):
            if _SURROGATE.search(v):
                return path or "body"
        elif isinstance(v, dict):
            for k, x in v.items():
                name = f"{path}.{k}" if path else k
                if _SURROGATE.search(k):
                    return path or "body"
                todo.append((name, x))
        elif isinstance(v, list):
            todo.extend((f"{path}[{i}]", x) for i, x in enumerate(v))
    return None


_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_BYTES = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")
