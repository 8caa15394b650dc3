"""The llama.cpp fields of the server (grammar, json_schema / response_format, penalties, n_predict),
unknown fields, explain and the steering report, driven by the real openai client on a tiny model;
and the sampler chain under them."""

from __future__ import annotations

import json
import os
from typing import Literal

import llama_cpp.llama_cpp as ll
import numpy as np
import openai
import pydantic
import pytest

from fgdilp_cpp.engine.sampling import Sampler, grammar_error
from fgdilp_cpp.errors import ParamError
from fgdilp_cpp.params import SamplingParams
from fgdilp_cpp.serve.server import Limits, create_app
from server_helpers import MSGS, PROMPT, Served, open_det

YES_NO = 'root ::= "yes" | "no"'
SCHEMA = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}, "n": {"type": "integer"}},
          "required": ["answer", "n"], "additionalProperties": False}
HOSTILE = [{"role": "user", "content": "i hate you"}]


@pytest.fixture(scope="module")
def ref(tiny_llama):
    with open_det(tiny_llama) as det:
        yield det


@pytest.fixture(scope="module")
def served(tiny_llama):
    limits = Limits(max_tokens=128, allow_methods=("tr", "none", "fgdilp"))
    with open_det(tiny_llama) as det, Served(create_app(det, limits)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(served):
    with served.client() as c:
        yield c


def chat(client, stream: bool = False, **kw):
    """(text, finish_reason, the "fgdilp" object) of one chat request, streamed or not."""
    kw = {"model": "m", "messages": MSGS, "seed": 1, **kw}
    if not stream:
        r = client.chat.completions.create(**kw)
        return r.choices[0].message.content, r.choices[0].finish_reason, r.model_extra["fgdilp"]
    chunks = list(client.chat.completions.create(stream=True, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks[-1].choices[0].finish_reason, chunks[-1].model_extra["fgdilp"]


def error_param(exc: openai.APIStatusError) -> str:
    return exc.response.json()["error"]["param"]


# ---- grammar -------------------------------------------------------------------------------------
@pytest.mark.parametrize("stream", [False, True])
def test_grammar_constrains_the_reply(client, ref, stream):
    free = {chat(client, seed=s)[0] for s in range(4)}
    assert not free & {"yes", "no"}                  # unconstrained, the tiny model says neither
    got = [chat(client, stream, seed=s, extra_body={"grammar": YES_NO}) for s in range(4)]
    assert all(text in ("yes", "no") and finish == "stop" for text, finish, _ in got)
    assert got[0][0] == ref.chat(MSGS, trim=False, seed=0, grammar=YES_NO).text
    r = client.completions.create(model="m", prompt=PROMPT, seed=2, max_tokens=20, extra_body={"grammar": YES_NO})
    assert r.choices[0].text in ("yes", "no")
    assert chat(client, stream, seed=0, extra_body={"grammar": ""})[0] == chat(client, seed=0)[0]   # "": none


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_output_parses_and_matches(client, stream):
    forms = [{"extra_body": {"json_schema": SCHEMA}},
             {"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}}}]
    for seed, form in enumerate(forms):
        text, finish, _ = chat(client, stream, seed=seed, max_tokens=128, **form)
        obj = json.loads(text)
        assert finish == "stop" and set(obj) == {"answer", "n"}
        assert obj["answer"] in ("yes", "no") and type(obj["n"]) is int
    text, finish, _ = chat(client, stream, max_tokens=128, response_format={"type": "json_object", "schema": SCHEMA})
    assert finish == "stop" and set(json.loads(text)) == {"answer", "n"}      # llama.cpp's "schema" in it
    # any object: the random model may still be inside a string at max_tokens; those that end, parse
    got = [chat(client, stream, seed=s, max_tokens=128, response_format={"type": "json_object"}) for s in range(4)]
    assert all(text.startswith("{") for text, _, _ in got)
    ended = [json.loads(text) for text, finish, _ in got if finish == "stop"]
    assert ended and all(isinstance(obj, dict) for obj in ended)


def test_the_clients_structured_output_parses(client):
    """The openai client's own structured outputs: a pydantic model as response_format."""
    class Reply(pydantic.BaseModel):
        answer: Literal["yes", "no"]
        n: int

    for seed in range(2):
        r = client.chat.completions.parse(model="m", messages=MSGS, seed=seed, max_tokens=128, response_format=Reply)
        assert isinstance(r.choices[0].message.parsed, Reply)


def test_the_grammar_leaves_the_fgdilp_setup_alone(ref):
    """The candidates FGDILP generates for itself are not held to the reply's grammar."""
    kw = dict(trim=False, seed=3, method="fgdilp", explain=True, instance_reuse="turn")
    free, held = ref.chat(MSGS, **kw), ref.chat(MSGS, grammar=YES_NO, repeat_penalty=1.5, **kw)
    assert held.text in ("yes", "no") and free.text != held.text
    assert [s["text"] for s in held.explain["samples"]] == [s["text"] for s in free.explain["samples"]]


@pytest.mark.parametrize("extra, param", [
    ({"grammar": 'root ::= "a'}, "grammar"),                 # unterminated string
    ({"grammar": 'foo ::= "a"'}, "grammar"),                 # no root rule
    ({"grammar": 'root ::= root "a"'}, "grammar"),           # left recursion
    ({"grammar": 'root ::= undefined'}, "grammar"),
    ({"grammar": ["root ::= x"]}, "grammar"),
    ({"grammar": "root ::= " + '"a" ' * 20000}, "grammar"),  # past MAX_GRAMMAR_CHARS
    ({"grammar": 'root ::= ("a"{0,2000}){0,2000} "b"{0,9000}'}, "grammar"),     # expanded into rules: capped
    ({"json_schema": {"type": "string", "maxLength": 10**8}}, "json_schema"),
    ({"response_format": {"type": "json_object", "schema": {"type": "string", "pattern": "^a{1,99999}$"}}},
     "response_format"),
    ({"json_schema": {"type": "nonsense"}}, "json_schema"),
    ({"json_schema": {"$ref": "https://example.com/s.json"}}, "json_schema"),   # never fetched
    ({"json_schema": "{}"}, "json_schema"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a"}}}, "response_format"),
    ({"grammar": YES_NO, "json_schema": SCHEMA}, "json_schema"),
])
def test_bad_grammars_are_400_naming_the_field(client, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, extra_body=extra)
    assert error_param(e.value) == param


def test_a_grammar_dead_end_is_an_error_not_an_abort(tiny_llama, ref):
    """Every token rejected (all logits -inf): a ParamError, before llama.cpp would accept a token its
    grammar refuses (which aborts the process)."""
    vocab, n = ref.model.vocab, ref.model.info.n_vocab
    with Sampler(SamplingParams(temp=0.0, grammar='root ::= "a"'), vocab, n) as s:
        with pytest.raises(ParamError) as e:
            s._sample_checked(np.full(n, -np.inf, dtype=np.float32))
        assert e.value.field == "grammar"
    assert grammar_error(vocab, YES_NO) is None and grammar_error(vocab, "root ::= (") is not None


# ---- penalties -----------------------------------------------------------------------------------
def test_default_chain_is_unchanged_and_default_penalties_are_no_ops(client, ref):
    def names(p: SamplingParams) -> list[str]:
        with Sampler(p, ref.model.vocab, ref.model.info.n_vocab) as s:
            return [ll.llama_sampler_name(ll.llama_sampler_chain_get(s._s, i)).decode()
                    for i in range(ll.llama_sampler_chain_n(s._s))]

    assert names(SamplingParams()) == ["top-k", "top-p", "min-p", "temp", "dist"]     # the chain before
    assert names(SamplingParams(temp=0)) == ["greedy"]
    assert names(SamplingParams(repeat_penalty=1.2))[0] == "penalties"
    assert names(SamplingParams(grammar=YES_NO, presence_penalty=1))[:2] == ["grammar", "penalties"]
    plain = chat(client, seed=5, max_tokens=40)[0]
    noop = {"repeat_penalty": 1.0, "repeat_last_n": 64}
    assert chat(client, seed=5, max_tokens=40, presence_penalty=0, frequency_penalty=0, extra_body=noop)[0] == plain
    assert plain == ref.chat(MSGS, trim=False, seed=5, n_predict=40).text


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("field", ["repeat_penalty", "presence_penalty", "frequency_penalty"])
def test_penalties_change_the_output(client, ref, field, stream):
    greedy = dict(temperature=0, max_tokens=64)
    base = ref.chat(MSGS, trim=False, temp=0.0, n_predict=64)
    value = 1.5
    text = chat(client, stream, **greedy, extra_body={field: value})[0]
    want = ref.chat(MSGS, trim=False, temp=0.0, n_predict=64, **{field: value})
    assert text == want.text != base.text
    assert len(set(want.tokens)) > len(set(base.tokens))     # fewer repeats
    # a window of one token penalises only the last one: another reply again
    assert chat(client, stream, **greedy, extra_body={field: value, "penalty_last_n": 1})[0] != text
    assert chat(client, stream, **greedy, extra_body={field: value, "repeat_last_n": 0})[0] == base.text


@pytest.mark.parametrize("extra, param", [
    ({"repeat_penalty": 0}, "repeat_penalty"), ({"repeat_penalty": 11}, "repeat_penalty"),
    ({"presence_penalty": -2.5}, "presence_penalty"), ({"frequency_penalty": "1"}, "frequency_penalty"),
    ({"repeat_last_n": -2}, "repeat_last_n"), ({"repeat_last_n": 1.5}, "repeat_last_n"),
    ({"repeat_last_n": 8, "penalty_last_n": 16}, "penalty_last_n"),
    ({"n_predict": 0}, "n_predict"), ({"n_predict": 129}, "n_predict"), ({"n_predict": True}, "n_predict"),
])
def test_bad_penalties_and_sizes_are_400(client, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, extra_body=extra)
    assert error_param(e.value) == param


# ---- n_predict, unknown fields -------------------------------------------------------------------
def test_n_predict_is_max_tokens(client, ref):
    r = client.chat.completions.create(model="m", messages=MSGS, seed=1, extra_body={"n_predict": 5})
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"
    assert r.choices[0].message.content == ref.chat(MSGS, trim=False, seed=1, n_predict=5).text
    r = client.completions.create(model="m", prompt=PROMPT, seed=1, extra_body={"n_predict": -1})
    assert r.usage.completion_tokens == 128 or r.choices[0].finish_reason == "stop"   # -1: the server's limit


def test_unknown_fields_are_400_and_pass_through_fields_are_not(client):
    for stream, extra in [(False, {"grammer": YES_NO}), (True, {"grammer": YES_NO}), (False, {"samplers": ["top_k"]}),
                          (False, {"prompt": "x"}), (True, {"x-trace": 1})]:
        with pytest.raises(openai.BadRequestError) as e:
            chat(client, stream, extra_body=extra)
        assert error_param(e.value) == next(iter(extra)) and "unknown field" in e.value.response.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="m", prompt=PROMPT, extra_body={"messages": MSGS})
    assert error_param(e.value) == "messages"
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, extra_body={"typical_p": 0.5})             # known, not honoured: only at its no-op value
    assert error_param(e.value) == "typical_p"
    plain = chat(client)[0]
    same = chat(client, user="u", metadata={"k": "v"}, store=False,
                extra_body={"cache_prompt": True, "id_slot": 0, "typical_p": 1, "dry_base": 1.75})[0]
    assert same == plain


# ---- explain and the steering report -------------------------------------------------------------
@pytest.mark.parametrize("stream", [False, True])
def test_explain_and_steered_are_reported(client, stream):
    new_chat = [{"role": "user", "content": f"tell me why {stream}"}]     # its instance is built, not reused
    _, _, info = chat(client, stream, messages=new_chat, extra_body={"method": "fgdilp", "explain": True})
    ex = info["explain"]
    assert info["method"] == "fgdilp" and info["steered"] is True and info["condition"] is None
    assert len(ex["samples"]) == 2 and ex["positive"]["text"] and len(ex["delta_norms"]) > 0
    json.dumps(ex, allow_nan=False)                     # strict JSON
    _, _, info = chat(client, stream, extra_body={"method": "none"})
    assert (info["method"], info["steered"], "explain" in info) == ("none", False, False)
    assert chat(client, stream)[2]["steered"] is True   # tr, the server's method


@pytest.mark.parametrize("stream", [False, True])
def test_the_condition_reading_is_reported(tiny_llama, stream):
    from test_condition import KeywordScorer

    with open_det(tiny_llama) as det, Served(create_app(det, Limits(max_tokens=16))) as srv, srv.client() as c:
        det.generator.rt.scorer = KeywordScorer()          # "hate" reads 0.9, anything else 0.1
        _, _, calm = chat(c, stream, extra_body={"condition": 0.5})
        _, _, hostile = chat(c, stream, messages=HOSTILE, extra_body={"condition": 0.5})
    assert calm["steered"] is False and calm["condition"] == {"threshold": 0.5, "toxicity": 0.1, "steered": False}
    assert hostile["steered"] is True and hostile["condition"]["toxicity"] == 0.9
    assert calm["method"] == hostile["method"] == "tr"


def test_models_created_is_the_file_time(served, client, tiny_llama):
    created = int(os.stat(tiny_llama[0]).st_mtime)
    assert created > 0 and [m.created for m in client.models.list().data] == [created]
    assert client.models.retrieve("tiny-llama").created == created
