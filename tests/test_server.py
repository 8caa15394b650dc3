"""The OpenAI-compatible server: a real uvicorn on loopback, driven by the openai client and raw HTTP."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from fgdilp_cpp.serve.openai_api import StopScanner
from fgdilp_cpp.serve.server import Limits, create_app
from server_helpers import MSGS, PROMPT, Gate, Served, SlowDetoxifier, open_det, wait_until

@pytest.fixture(scope="module")
def ref(tiny_llama):
    """A second Detoxifier with the same settings, for the expected results (test thread only)."""
    with open_det(tiny_llama) as det:
        yield det


@pytest.fixture(scope="module")
def served(tiny_llama):
    limits = Limits(max_tokens=512, allow_methods=("tr", "none", "fgdilp"))
    with open_det(tiny_llama) as det, Served(create_app(det, limits)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(served):
    with served.client() as c:
        yield c


def error_of(exc: openai.APIStatusError) -> dict:
    return exc.response.json()["error"]


# ---- endpoints ----------------------------------------------------------------------------------
def test_health_and_models(served, client):
    assert served.request("GET", "/health")[::2] == (200, {"status": "ok", "model": "tiny-llama"})
    models = client.models.list().data
    assert [(m.id, m.owned_by, m.object) for m in models] == [("tiny-llama", "fgdilp-cpp", "model")]
    assert client.models.retrieve("tiny-llama").id == "tiny-llama"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4")
    assert error_of(e.value)["code"] == "model_not_found"


def test_chat_equals_the_api(client, ref):
    want = ref.chat(MSGS, trim=False, seed=3)
    r = client.chat.completions.create(model="whatever", messages=MSGS, seed=3)
    assert r.object == "chat.completion" and r.model == "tiny-llama" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want.text
    assert r.choices[0].finish_reason == "length" and len(want.tokens) == 8
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (want.n_prompt_tokens, 8)
    assert r.usage.total_tokens == want.n_prompt_tokens + 8
    assert r.model_extra["fgdilp"]["method"] == "tr"
    parts = [{"role": "system", "content": [{"type": "text", "text": "be"}, {"type": "text", "text": "nice"}]},
             {"role": "user", "content": [{"type": "text", "text": "hello there"}]}]
    got = client.chat.completions.create(model="m", messages=parts, seed=3, max_tokens=5).choices[0]
    want = ref.chat([{"role": "system", "content": "be\nnice"}, MSGS[0]], trim=False, seed=3, n_predict=5)
    assert got.message.content == want.text


def test_chat_stream_equals_the_api(client, ref):
    want = ref.chat(MSGS, trim=False, seed=4, n_predict=20)
    chunks = list(client.chat.completions.create(model="m", messages=MSGS, seed=4, max_tokens=20, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.text and len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop" if want.stop_reason == "eog" else "length"]
    assert chunks[-1].usage.completion_tokens == len(want.tokens)


def test_completions_and_stream(client, ref):
    want = ref.generate(PROMPT, seed=5, n_predict=12)
    r = client.completions.create(model="m", prompt=PROMPT, seed=5, max_tokens=12)
    assert r.object == "text_completion" and r.choices[0].text == want.text
    assert r.choices[0].finish_reason == "length" and r.usage.prompt_tokens == want.n_prompt_tokens
    r = client.completions.create(model="m", prompt=[PROMPT], seed=5, max_tokens=12)
    assert r.choices[0].text == want.text
    chunks = list(client.completions.create(model="m", prompt=PROMPT, seed=5, max_tokens=12, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want.text
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"


def test_steering_fields_change_the_output(client, ref):
    def reply(**kw) -> str:
        kw = {"seed": 1, **kw}
        return client.chat.completions.create(model="m", messages=MSGS, **kw).choices[0].message.content

    tr, none = reply(), reply(extra_body={"method": "none"})
    assert tr == ref.chat(MSGS, trim=False, seed=1).text
    assert none == ref.chat(MSGS, trim=False, seed=1, method="none").text != tr
    assert reply(extra_body={"steer_scale": 0.0}) == none            # TR with no push is unsteered
    assert reply(extra_body={"method": "fgdilp"}) == ref.chat(MSGS, trim=False, seed=1, method="fgdilp").text
    ranged = reply(extra_body={"steer_layer_range": [1, 2], "steer_scale": 2.0})
    assert ranged == ref.chat(MSGS, trim=False, seed=1, steer_layer_range=(1, 2), steer_scale=2.0).text
    assert reply(temperature=0) == reply(temperature=0, seed=2) == ref.chat(MSGS, trim=False, temp=0.0).text
    extra = reply(extra_body={"top_k": 5, "min_p": 0.1}, top_p=0.5, frequency_penalty=0, user="u")
    assert extra == ref.chat(MSGS, trim=False, seed=1, top_k=5, min_p=0.1, top_p=0.5).text


def test_stop_strings(client, ref):
    text = ref.chat(MSGS, trim=False, seed=2, n_predict=40).text
    stop = next(text[i:i + 2] for i in range(len(text) // 2, len(text))
                if "\ufffd" not in text[i:i + 2] and text[i:i + 2].strip())
    want = text[:text.find(stop)]
    kw = dict(model="m", messages=MSGS, seed=2, max_tokens=40)
    r = client.chat.completions.create(stop=[stop, "\x00never"], **kw)
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (want, "stop")
    chunks = list(client.chat.completions.create(stop=stop, stream=True, **kw))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_stop_scanner_holds_back_a_possible_stop():
    s = StopScanner(("END", "xy"))
    assert [s.feed(p) for p in ("ab", "cE", "N", "x", "q", "E")] == ["ab", "c", "", "EN", "xq", ""]
    assert (s.feed("ND more"), s.stopped, s.text) == ("", True, "abcENxq")
    s = StopScanner(("END",))
    assert s.feed("aEN") == "a" and s.flush() == "EN" and not s.stopped
    assert StopScanner(()).feed("EN") == "EN"


# ---- errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, param", [
    (dict(extra_body={"method": "detox"}), "method"),
    (dict(n=2), "n"),
    (dict(max_tokens=513), "max_tokens"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(temperature=2.5), "temperature"),
    (dict(top_p=0), "top_p"),
    (dict(seed=-1), "seed"),
    (dict(stop=["a", "b", "c", "d", "e"]), "stop"),
    (dict(frequency_penalty=2.5), "frequency_penalty"),
    (dict(extra_body={"steer_scale": "big"}), "steer_scale"),
    (dict(extra_body={"steer_layer_range": [0, 9]}), "steer_layer_range"),
    (dict(extra_body={"steer_layer_range": [0]}), "steer_layer_range"),
    (dict(messages=[{"role": "tool", "content": "x"}]), "messages[0].role"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
     "messages[0].content[0]"),
    (dict(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]), "messages"),
    (dict(messages=[{"role": "user", "content": "word " * 300}]), "messages"),
])
def test_bad_chat_requests_are_400(client, kw, param):
    kw = {"model": "m", "messages": MSGS, **kw}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**kw)
    err = error_of(e.value)
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]
    if "word " in json.dumps(kw["messages"]):
        assert err["code"] == "context_length_exceeded"


def test_bad_bodies_and_routes(served):
    s, _, body = served.request("POST", "/v1/chat/completions", b'{"messages": [')
    assert s == 400 and body["error"]["message"] == "malformed JSON body"
    assert served.request("POST", "/v1/completions", b'{"prompt": NaN}')[0] == 400
    assert served.request("POST", "/v1/completions", b"[" * 200000)[0] == 400
    s, _, body = served.request("POST", "/v1/completions", b'{"prompt": "a", "max_tokens": 1%s}' % (b"0" * 400))
    assert s == 400 and body["error"]["param"] == "max_tokens"
    s, _, body = served.request("POST", "/v1/completions", b'{"prompt": "a", "temperature": 1e400}')
    assert s == 400 and body["error"]["param"] == "temperature"
    assert served.request("POST", "/v1/completions", [PROMPT])[2]["error"]["message"] == \
        "the request body must be a JSON object"
    s, _, body = served.request("POST", "/v1/completions", {"prompt": "word " * 300})
    assert s == 400 and body["error"]["code"] == "context_length_exceeded"
    s, _, body = served.request("POST", "/v1/completions", {"prompt": "x" * (1 << 20)})
    assert s == 413 and body["error"]["type"] == "invalid_request_error"
    s, _, body = served.request("GET", "/v1/nothing")
    assert s == 404 and "/v1/nothing" in body["error"]["message"]
    s, headers, body = served.request("GET", "/v1/chat/completions")
    assert s == 405 and headers["allow"] == "POST" and body["error"]["message"]


def test_body_limit_without_content_length(served):
    """A chunked body is read incrementally and refused once past the limit."""
    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=30)
    try:
        chunks = (b"x" * 65536 for _ in range(40))                      # 2.5 MiB, never all buffered
        conn.request("POST", "/v1/completions", body=chunks, encode_chunked=True,
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 413 and json.loads(resp.read())["error"]["code"] == "request_too_large"
    finally:
        conn.close()


def test_api_key(tiny_llama):
    with open_det(tiny_llama) as det, Served(create_app(det, Limits(api_key="sekrit"))) as srv:
        assert srv.request("GET", "/health")[0] == 200                   # open: for load balancers
        with srv.client() as c, pytest.raises(openai.AuthenticationError):
            c.models.list()
        s, headers, body = srv.request("GET", "/v1/models", headers={"Authorization": "Basic sekrit"})
        assert s == 401 and headers["www-authenticate"] == "Bearer" and body["error"]["code"] == "invalid_api_key"
        with openai.OpenAI(base_url=f"http://127.0.0.1:{srv.port}/v1", api_key="sekrit", max_retries=0) as c:
            assert c.models.list().data[0].id == "tiny-llama"


# ---- the queue ------------------------------------------------------------------------------------
def test_concurrent_requests_run_one_at_a_time(tiny_llama):
    """8 requests at once (streamed and not) each get exactly their sequential result. Without KV
    reuse on both sides: with it, a request's prompt cells come from whichever request ran before
    it, and a reused prefix may round differently from a fresh prefill (docs/method.md §3.3), so
    the expected replies would depend on the order the requests happened to run in."""
    from fgdilp_cpp.api import Detoxifier
    from server_helpers import DET_KW

    seeds = range(10, 18)
    with Detoxifier.from_file(str(tiny_llama[0]), **{**DET_KW, "kv_reuse": False}) as ref:
        want = {s: ref.chat(MSGS, trim=False, seed=s, n_predict=16).text for s in seeds}
    limits = Limits(max_tokens=512, allow_methods=("tr", "none", "fgdilp"))
    with Detoxifier.from_file(str(tiny_llama[0]), **{**DET_KW, "kv_reuse": False}) as det, \
            Served(create_app(det, limits)) as served:
        _ask_all(served, seeds, want)


def _ask_all(served, seeds, want) -> None:
    def ask(seed: int) -> str:
        with served.client() as c:
            kw = dict(model="m", messages=MSGS, seed=seed, max_tokens=16)
            if seed % 2:
                return c.chat.completions.create(**kw).choices[0].message.content
            return "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(stream=True, **kw))

    with ThreadPoolExecutor(8) as pool:
        got = dict(zip(seeds, pool.map(ask, seeds)))
    assert got == want and len(set(got.values())) == 8
    assert served.service.in_flight == 0


def test_full_queue_is_503(tiny_llama):
    with open_det(tiny_llama) as det, Served(create_app(det, Limits(max_queue=1))) as srv, \
            ThreadPoolExecutor(2) as pool:
        gate = Gate(srv)
        body = {"model": "m", "messages": MSGS, "seed": 1}
        waiting = [pool.submit(srv.request, "POST", "/v1/chat/completions", body) for _ in range(2)]
        wait_until(lambda: srv.service.in_flight == 2, "the two requests were not queued")
        s, headers, err = srv.request("POST", "/v1/chat/completions", body)
        assert s == 503 and headers["retry-after"] == "1" and err["error"]["code"] == "queue_full"
        gate.release()
        assert [f.result(10)[0] for f in waiting] == [200, 200]
        assert srv.request("POST", "/v1/chat/completions", body)[0] == 200


def test_hanging_up_cancels_the_generation(tiny_llama):
    with open_det(tiny_llama) as det:
        slow = SlowDetoxifier(det, 0.05)
        with Served(create_app(slow, Limits())) as srv:
            # mid-stream: the decode stops soon after the client leaves
            s = srv.open_raw({"model": "m", "messages": MSGS, "seed": 1, "max_tokens": 200, "stream": True})
            seen = b""
            while b'"content"' not in seen:
                seen += s.recv(4096)
            s.close()
            assert slow.closed.wait(5) and slow.pieces < 20
            wait_until(lambda: srv.service.in_flight == 0, "the cancelled stream still holds its slot")
            # while queued: the request leaves the queue without running
            gate = Gate(srv)
            s = srv.open_raw({"model": "m", "messages": MSGS, "seed": 1})
            wait_until(lambda: srv.service.in_flight == 1, "the request was not queued")
            s.close()
            wait_until(lambda: srv.service.in_flight == 0, "a hung-up request stayed queued")
            gate.release()
            slow.delay = 0.0
            with srv.client() as c:
                r = c.chat.completions.create(model="m", messages=MSGS, seed=1)
            assert r.choices[0].message.content == det.chat(MSGS, trim=False, seed=1).text


def test_a_bug_is_a_logged_500(tiny_llama, caplog):
    class Broken(SlowDetoxifier):
        def stream_chat(self, *args, **kw):
            raise ZeroDivisionError("boom")

    with open_det(tiny_llama) as det, Served(create_app(Broken(det, 0), Limits())) as srv:
        s, _, body = srv.request("POST", "/v1/chat/completions", {"messages": MSGS})
        assert s == 500 and body["error"] == {"message": "internal error (the details are in the server log)",
                                              "type": "server_error", "param": None, "code": None}
        assert srv.request("POST", "/v1/completions", {"prompt": PROMPT})[0] == 200   # still serving
    assert "ZeroDivisionError: boom" in caplog.text


# ---- the command ----------------------------------------------------------------------------------
def test_serve_command_port_zero_and_ctrl_c(tiny_llama):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("FGDILP_DEBUG", None)
    proc = subprocess.Popen([sys.executable, "-m", "fgdilp_cpp.cli", "serve", "-m", str(tiny_llama[0]),
                             "--chat-template", "chatml", "-c", "256", "--method", "tr", "-n", "4",
                             "--allow-methods", "tr,none", "--max-steer-scale", "0.5", "--port", "0"],
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=env)
    try:
        line = proc.stderr.readline()
        assert line.startswith("serving tiny-llama on http://127.0.0.1:") and "(OpenAI API at /v1)" in line
        port = int(line.split("127.0.0.1:")[1].split()[0])
        with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0) as c:
            r = c.chat.completions.create(model="m", messages=MSGS)
            assert c.chat.completions.create(model="m", messages=MSGS, extra_body={"method": "none"}).choices
            for extra, param in (({"method": "fgdilp"}, "method"), ({"steer_scale": 0.6}, "steer_scale")):
                with pytest.raises(openai.BadRequestError) as e:
                    c.chat.completions.create(model="m", messages=MSGS, extra_body=extra)
                assert error_of(e.value)["param"] == param
        assert r.usage.completion_tokens <= 4
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/health", headers={"Host": "rebound.example:%d" % port})
        assert conn.getresponse().status == 421                    # a loopback bind: DNS rebinding refused
        conn.close()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
        assert "stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def test_the_condition_per_request(tiny_llama):
    """"condition" steers a conversation only where the scorer reads one of its messages that toxic.
    The expected replies come from a fresh Detoxifier, in the state of the served one: a kept
    conversation's KV cells are reused from turn to turn, and the module's `ref` has held others
    (docs/method.md §3.3: a reused prefix may round differently from a fresh prefill)."""
    from test_condition import KeywordScorer

    with open_det(tiny_llama) as det, open_det(tiny_llama) as ref, Served(create_app(det, Limits(max_tokens=64))) as srv, \
            srv.client() as c:
        det.generator.rt.scorer = KeywordScorer()          # "hate" reads 0.9, anything else 0.1

        def reply(msgs, **extra) -> str:
            return c.chat.completions.create(model="m", messages=msgs, seed=1, max_tokens=8,
                                             extra_body=extra).choices[0].message.content

        hostile = [{"role": "user", "content": "i hate you"}]
        assert reply(MSGS, condition=0.5) == ref.chat(MSGS, trim=False, seed=1, n_predict=8, method="none").text
        assert reply(hostile, condition=0.5) == ref.chat(hostile, trim=False, seed=1, n_predict=8).text
        assert reply(hostile, condition=0.5) != ref.chat(hostile, trim=False, seed=1, n_predict=8, method="none").text
        with pytest.raises(openai.BadRequestError) as e:
            reply(MSGS, condition=2)
        assert error_of(e.value)["param"] == "condition"
