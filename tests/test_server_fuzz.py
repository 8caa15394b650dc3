"""Property-based fuzzing of the server's request parsing: random JSON bodies (known fields with
wrong types, odd unicode, huge and non-finite numbers, deep nesting), raw bytes and wrong
Content-Types, sent over HTTP to a real server. Never a 5xx; afterwards the model thread is alive
and a valid request gets exactly its one-at-a-time result."""

from __future__ import annotations

import http.client
import json
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fgdilp_cpp.serve.server import Limits, create_app
from server_helpers import MSGS, Served, open_det

ODD_TEXT = st.sampled_from(["\ud800", "a\udfffb", "\x00", "\u202e", "\ufeff", "x" * 300, "", " ", "tr", "user",
                            "\U0001f600", "é" * 50])
TEXT = st.text(max_size=30) | ODD_TEXT
EXTREME = st.sampled_from([10**400, -(10**400), 2**63, 2**32, -1, 0, 1, 1e308, -1e308, 5e-324, -0.0, 0.5, 3])
NUMBER = st.integers(-2**70, 2**70) | st.floats(allow_nan=True, allow_infinity=True) | EXTREME | EXTREME
LEAF = st.none() | st.booleans() | NUMBER | TEXT
JSON = st.recursive(LEAF, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
                    max_leaves=12)

MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "developer", "tool"])
                                 | JSON},
                                optional={"content": TEXT | JSON | st.lists(st.fixed_dictionaries(
                                    {"type": st.sampled_from(["text", "image_url"]) | JSON,
                                     "text": TEXT | JSON}), max_size=3)})
FIELDS = {
    "messages": st.lists(MESSAGE, max_size=3) | JSON, "prompt": TEXT | st.lists(TEXT, max_size=2) | JSON,
    "model": TEXT | JSON, "max_tokens": NUMBER | JSON, "max_completion_tokens": NUMBER,
    "temperature": NUMBER, "top_p": NUMBER, "min_p": NUMBER, "top_k": NUMBER, "seed": NUMBER, "n": NUMBER | JSON,
    "stream": st.booleans() | JSON, "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | JSON,
    "stop": TEXT | st.lists(TEXT, max_size=6) | JSON,
    "method": st.sampled_from(["tr", "none", "fgdilp", "cvec"]) | JSON,
    "steer_scale": NUMBER | JSON, "steer_layer_range": st.lists(NUMBER, max_size=3) | JSON,
    "logprobs": JSON, "frequency_penalty": NUMBER, "logit_bias": JSON, "tools": JSON, "response_format": JSON,
    "user": TEXT, "echo": JSON,
    "n_predict": NUMBER | JSON, "repeat_penalty": NUMBER | JSON, "presence_penalty": NUMBER,
    "repeat_last_n": NUMBER | JSON, "penalty_last_n": NUMBER, "explain": st.booleans() | JSON,
    "grammar": st.sampled_from(['root ::= "a" | "b"', 'root ::= [a-z]+', "root ::= root", 'root ::= "a',
                                "x ::= y", "root ::= [^\\x00]*", ""]) | TEXT | JSON,
    "json_schema": st.sampled_from([{}, {"type": "object"}, {"enum": [1, 2]}, {"$ref": "#/nowhere"},
                                    {"type": "string", "pattern": "("}]) | JSON,
}
BODY = st.fixed_dictionaries({}, optional=FIELDS).flatmap(
    lambda known: st.dictionaries(TEXT, JSON, max_size=3).map(lambda extra: {**extra, **known}))


@st.composite
def requests(draw) -> tuple[str, bytes, str]:
    """(path, body bytes, Content-Type): raw bytes, a valid request, a valid one with one or two
    fields perturbed, or a body of random fields."""
    path = draw(st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
    mode = draw(st.sampled_from(["bytes", "valid", "valid", "valid", "perturbed", "perturbed", "perturbed",
                                 "random", "random", "random"]))
    if mode == "bytes":
        data = draw(st.binary(max_size=200) | st.sampled_from([b"[" * 5000, b"{" * 3000, b'"\\ud800"', b"nul"]))
    else:
        body = draw(BODY)
        if mode != "random":
            text = draw(st.text(min_size=1, max_size=20).filter(str.strip) if mode == "valid" else
                        TEXT.filter(lambda t: t.strip()))
            # (a field the server does not know is a 400: the valid bodies have only known ones)
            body = ({"messages": [{"role": "user", "content": text}]} if path.endswith("chat/completions")
                    else {"prompt": text})
            body["max_tokens"] = 2
            if mode == "perturbed":
                for name in draw(st.lists(st.sampled_from(sorted(FIELDS)), max_size=2, unique=True)):
                    body[name] = draw(FIELDS[name])
        data = json.dumps(body, allow_nan=True).encode()
    kind = draw(st.sampled_from(["application/json"] * 8 + ["text/plain", "application/json; charset=utf-8", ""]))
    return path, data, kind


@pytest.fixture(scope="module")
def srv(tiny_llama):
    with open_det(tiny_llama) as det, \
            Served(create_app(det, Limits(max_tokens=3, allow_methods=("tr", "none")))) as s:
        yield s


def post(port: int, path: str, data: bytes, kind: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", path, body=data, headers={"Content-Type": kind} if kind else {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_fuzzed_requests_never_get_a_5xx(srv, tiny_llama):
    statuses: Counter = Counter()

    @settings(max_examples=200, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(req=requests())
    def one(req) -> None:
        path, data, kind = req
        status, out = post(srv.port, path, data, kind)
        statuses[status] += 1
        assert status < 500, (status, out[:300])
        if status >= 400:
            err = json.loads(out)["error"]
            assert isinstance(err["message"], str) and err["message"]
        elif out.startswith(b"data: "):
            assert b'"error"' not in out and out.endswith(b"data: [DONE]\n\n")
        else:
            assert json.loads(out)["choices"]

    one()
    assert statuses[200] >= 20 and statuses[400] >= 50, statuses
    assert all(t.is_alive() for t in srv.service.executor._threads)
    status, out = post(srv.port, "/v1/chat/completions",
                       json.dumps({"messages": MSGS, "seed": 9, "max_tokens": 3}).encode(), "application/json")
    with open_det(tiny_llama) as ref:
        want = ref.chat(MSGS, trim=False, seed=9, n_predict=3).text
    assert status == 200 and json.loads(out)["choices"][0]["message"]["content"] == want
