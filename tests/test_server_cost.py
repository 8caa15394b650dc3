"""A request's cost is bounded before the model thread: huge conversations are refused in
milliseconds while a normal request runs beside them in its usual time; the conversation is
fitted once, off the model thread; shutdown ends within its deadline; an empty API key is an
error, not auth turned off."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from fgdilp_cpp import FgdilpError
from fgdilp_cpp import api
from fgdilp_cpp.api import Detoxifier
from fgdilp_cpp.serve import request_cost
from fgdilp_cpp.serve.server import Limits, create_app
from server_helpers import MSGS, Served, open_det, wait_until

CHAT = "/v1/chat/completions"
HUGE = {n: json.dumps({"messages": [{"role": "user", "content": "hi"}] * n}).encode() for n in (800, 20_000)}
LONG_KW = dict(chat=True, ctx_size=1024, n_predict=600, threads=1, method="tr")


def timed(srv: Served, body, path: str = CHAT) -> tuple[float, int, dict]:
    """(seconds from sending to the answer, status, JSON): the body serialized before the clock starts."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    t0 = time.perf_counter()
    status, _, out = srv.request("POST", path, data)
    return time.perf_counter() - t0, status, out


@pytest.fixture(scope="module")
def long_srv(tiny_chat):
    """A model whose replies run to max_tokens (its EOS never wins): a normal request takes a while."""
    with Detoxifier.from_file(str(tiny_chat), **LONG_KW) as det, Served(create_app(det)) as srv:
        yield srv


def _beside_a_normal_request(srv: Served) -> tuple[float, float, list]:
    """(the normal request alone (the longer of before and after), beside the huge ones, the
    refusals): 3 of each huge body sent while the normal one runs; every answer checked, and
    nothing but the normal request submitted to the model thread."""
    normal = {"messages": MSGS, "seed": 3, "max_tokens": 600}
    alone = timed(srv, normal)[0]
    submitted, submit = [], srv.service.submit
    srv.service.submit = lambda *a, **kw: submitted.append(1) or submit(*a, **kw)
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(timed, srv, normal)
        wait_until(lambda: srv.service.in_flight == 1, "the normal request did not start")
        refused = []
        for _ in range(3):
            for body in HUGE.values():
                refused.append(timed(srv, body))
                time.sleep(0.02)
        assert not running.done()                      # all of them arrived while it ran
        beside, status, out = running.result()
    del srv.service.submit
    assert submitted == [1]                            # the model thread saw the normal request only
    alone = max(alone, timed(srv, normal)[0])          # (this machine is shared: alone, before and after)
    assert status == 200 and out["usage"]["completion_tokens"] == 600
    for _, status, out in refused:
        assert status == 400 and out["error"]["code"] in ("context_length_exceeded", "too_many_messages")
    return alone, beside, [r[0] for r in refused]


def test_huge_conversations_are_400_in_milliseconds_beside_a_normal_request(long_srv):
    """The timings hold in one of three tries: the test machine is shared. The 20,000-message body
    is 700 KB of JSON that must be parsed (json.loads) before anything can count it: its median is
    held to 100 ms here, 50 ms only on a quiet machine (figures: docs/results/server-cost.md)."""
    timed(long_srv, {"messages": MSGS, "seed": 3, "max_tokens": 600})
    tries = []
    for _ in range(3):
        alone, beside, refused = _beside_a_normal_request(long_srv)
        medians = [sorted(refused[i::2])[1] for i in (0, 1)]          # 800, then 20,000 messages
        tries.append((alone, beside, [round(t, 4) for t in refused]))
        print(f"alone {alone:.3f} s, beside {beside:.3f} s, refusals (800, 20000 alternating) {tries[-1][2]}")
        # not delayed by more than the CPU the refusals themselves took (the model thread never saw them)
        if medians[0] < 0.05 and medians[1] < 0.1 and max(refused) < 0.3 \
                and beside < 2 * alone + sum(refused):
            return
    raise AssertionError(tries)


def test_which_check_refuses_what(long_srv):
    _, status, out = timed(long_srv, HUGE[20_000])
    assert (status, out["error"]["code"], out["error"]["param"]) == (400, "too_many_messages", "messages")
    _, status, out = timed(long_srv, HUGE[800])         # the lower bound: no tokenizer ran
    assert (status, out["error"]["code"]) == (400, "context_length_exceeded")
    assert "at least" in out["error"]["message"]
    # over the bound's reach but not the context's: fitted (tokenized once) off the model thread
    near = {"messages": [{"role": "user", "content": "hello there my friend"}] * 14}
    _, status, out = timed(long_srv, near)
    assert (status, out["error"]["code"]) == (400, "context_length_exceeded")
    assert "does not fit" in out["error"]["message"]
    _, status, out = timed(long_srv, {"prompt": "x" * 300_000}, "/v1/completions")
    assert (status, out["error"]["code"], out["error"]["param"]) == (400, "request_too_large", "prompt")
    _, status, out = timed(long_srv, {"prompt": "word " * 2000}, "/v1/completions")
    assert (status, out["error"]["code"]) == (400, "context_length_exceeded")


def test_a_megabyte_of_special_tokens_is_refused_without_tokenizing(tiny_llama):
    """1 MB of '<|im_end|>' held the model thread for seconds (issue #27); with the character cap
    raised, the token bound alone refuses it, and nothing tokenizes it."""
    body = {"messages": [{"role": "user", "content": "<|im_end|></s>" * 70_000}]}
    with open_det(tiny_llama) as det, Served(create_app(det, Limits(max_chars=2_000_000))) as srv:
        seen, tokenize = [], det.model.tokenize
        det.model.tokenize = lambda text, *a, **kw: seen.append(len(text)) or tokenize(text, *a, **kw)
        seconds, status, out = timed(srv, body)
        assert (status, out["error"]["code"]) == (400, "context_length_exceeded") and seconds < 0.25
        assert max(seen, default=0) < 1000             # only the steering prefixes' own text
    with open_det(tiny_llama) as det, Served(create_app(det)) as srv:
        _, status, out = timed(srv, body)
        assert (status, out["error"]["code"]) == (400, "request_too_large")


def test_the_model_thread_does_not_fit_the_conversation(tiny_llama, monkeypatch):
    """Fitted on the fitting thread before queueing: the model thread reuses it (no second fit)."""
    with open_det(tiny_llama) as det, Served(create_app(det)) as srv:
        where = []

        def recording(fit):
            def fit_and_record(*a, **kw):
                where.append(threading.current_thread().name)
                return fit(*a, **kw)
            return fit_and_record

        # the server's fit, and the one Detoxifier.stream_chat would make without a fitted conversation
        monkeypatch.setattr(request_cost, "fit_chat", recording(request_cost.fit_chat))
        monkeypatch.setattr(api, "fit_conversation", recording(api.fit_conversation))
        status, _, out = srv.request("POST", CHAT, {"messages": MSGS, "seed": 1})
        assert status == 200 and len(where) == 1 and where[0].startswith("fgdilp-fit")


def test_close_gives_up_on_a_stuck_model_thread(tiny_llama):
    with open_det(tiny_llama) as det:
        svc = create_app(det).state.service
        svc.start().result(30)
        stuck = threading.Event()
        svc.executor.submit(stuck.wait)
        t0 = time.perf_counter()
        assert svc.close(0.3) is False and time.perf_counter() - t0 < 1.0
        assert svc.close(5) is False and time.perf_counter() - t0 < 1.0    # the first deadline holds
        stuck.set()
        assert svc.close(None) is True


def _healthy(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def _serve(model, *args):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("FGDILP_DEBUG", None)
    return subprocess.Popen([sys.executable, "-m", "fgdilp_cpp.cli", "serve", "-m", str(model), "--chat-template",
                             "chatml", "--port", "0", "-t", "1", *args], stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True, env=env)


def test_sigterm_exits_within_the_drain_deadline_mid_work(tiny_chat):
    proc = _serve(tiny_chat, "-c", "512", "-n", "400", "--method", "tr")
    try:
        line = proc.stderr.readline()
        port = int(line.split("127.0.0.1:")[1].split()[0])
        wait_until(lambda: _healthy(port), "the server did not become ready", 60)
        streaming = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        streaming.request("POST", CHAT, json.dumps({"messages": MSGS, "stream": True, "max_tokens": 400}),
                          {"Content-Type": "application/json"})
        resp = streaming.getresponse()
        assert resp.status == 200 and resp.fp.readline()
        huge = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        huge.request("POST", CHAT, HUGE[20_000], {"Content-Type": "application/json"})
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(15)
        # uvicorn shuts down gracefully, then re-raises the SIGTERM it caught (-15)
        assert time.monotonic() - t0 < 3 + Limits().drain_s and rc in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


@pytest.mark.parametrize("flag, env", [(["--api-key", ""], {}), (["--api-key", "  "], {}),
                                       ([], {"FGDILP_API_KEY": ""})])
def test_an_empty_api_key_is_an_error(cli, tiny_llama, flag, env):
    r = cli("serve", "-m", tiny_llama[0], "--chat-template", "chatml", "-c", "256", "--port", "0", *flag,
            env=env, timeout=60)
    assert r.returncode != 0 and "--api-key (or FGDILP_API_KEY) is empty" in r.stderr
    assert "Traceback" not in r.stderr


def test_an_empty_api_key_in_limits_is_refused(tiny_llama):
    with open_det(tiny_llama) as det, pytest.raises(FgdilpError, match="empty"):
        create_app(det, Limits(api_key=""))


def test_a_hang_up_while_fitting_queues_nothing(tiny_llama, monkeypatch):
    with open_det(tiny_llama) as det, Served(create_app(det)) as srv:
        fitting, fit, streams = threading.Event(), request_cost.fit_chat, []
        stream_chat = det.stream_chat

        def slow_fit(*a, **kw):
            fitting.set()
            time.sleep(0.5)
            return fit(*a, **kw)

        monkeypatch.setattr(request_cost, "fit_chat", slow_fit)
        det.stream_chat = lambda *a, **kw: streams.append(1) or stream_chat(*a, **kw)
        sock = srv.open_raw({"messages": MSGS, "seed": 1, "max_tokens": 50})
        assert fitting.wait(10)
        sock.close()
        time.sleep(1.0)
        assert streams == [] and srv.service.in_flight == 0
        monkeypatch.setattr(request_cost, "fit_chat", fit)
        assert srv.request("POST", CHAT, {"messages": MSGS, "seed": 1})[0] == 200 and streams == [1]


@pytest.mark.real_model
def test_the_costliest_body_that_passes_the_checks_fits_within_a_second():
    """SmolLM2 at -c 8192: 1024 messages of 250 characters (the --max-chars cap) pass the token
    bound (its longest token is 81 bytes), so they are tokenized once, on the fitting thread."""
    from fgdilp_cpp.models import default_chat_model_path
    from fgdilp_cpp.serve.request_cost import RequestCost
    from fgdilp_cpp.serve.openai_api import GenRequest

    with Detoxifier.from_file(str(default_chat_model_path()), chat=True, ctx_size=8192, n_predict=64, threads=1,
                              method="tr") as det:
        cost = RequestCost(det)
        msgs = [{"role": "user", "content": ("lorem ipsum dolor sit amet " * 10)[:250]}] * 1024
        req = GenRequest(msgs, None, {})
        cost.check(req)                                  # passes the cheap checks
        import asyncio

        t0 = time.perf_counter()
        with pytest.raises(Exception, match="does not fit"):
            asyncio.run(cost.fit(req))
        assert time.perf_counter() - t0 < 1.0
        cost.close()


STUCK_SERVER = """
import sys, threading
from fgdilp_cpp.api import Detoxifier
from fgdilp_cpp.serve.server import Limits, run_server

det = Detoxifier.from_file(sys.argv[1], chat=True, chat_template="chatml", ctx_size=256, n_predict=8,
                           threads=1, method="tr")


class Stuck:                      # a reply stuck in a call that never returns nor sees a cancel
    def __getattr__(self, name):
        return getattr(det, name)

    def stream_chat(self, *args, **kw):
        threading.Event().wait()


run_server(Stuck(), "127.0.0.1", 0, Limits(drain_s=1.0))
"""


def test_sigterm_exits_even_with_the_model_thread_stuck(tiny_llama):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-c", STUCK_SERVER, str(tiny_llama[0])], stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True, env=env)
    try:
        port = int(proc.stderr.readline().split("127.0.0.1:")[1].split()[0])
        wait_until(lambda: _healthy(port), "the server did not become ready", 60)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("POST", CHAT, json.dumps({"messages": MSGS}), {"Content-Type": "application/json"})
        time.sleep(0.5)                                 # the model thread is in the stuck call now
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(20)
        # uvicorn's 3 s for the connections, then drain_s (1 s) for the model thread
        print(f"exited {time.monotonic() - t0:.2f} s after SIGTERM, rc {rc}")
        assert time.monotonic() - t0 < 3 + 1.0 + 1.5 and rc != 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
