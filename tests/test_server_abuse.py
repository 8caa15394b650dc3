"""The server under abuse (issue 12): who may ask for what, hostile bodies and clients, faults;
each through HTTP on a real uvicorn on loopback (shutdown and cancels: test_server_cancel.py)."""

from __future__ import annotations

import json
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from fgdilp_cpp.api import Detoxifier
from fgdilp_cpp.errors import FgdilpError
from fgdilp_cpp.serve.server import Limits, create_app
from server_helpers import DET_KW, MSGS, PROMPT, Gate, Served, SlowDetoxifier, open_det, wait_until

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


@pytest.fixture(scope="module")
def det(tiny_llama):
    with open_det(tiny_llama) as d:
        yield d


@pytest.fixture(scope="module")
def srv(det):
    limits = Limits(max_tokens=16, allow_methods=("tr", "fgdilp"), read_timeout=1.0)
    with Served(create_app(det, limits)) as s:
        yield s


def chat(srv: Served, path: str = CHAT, **fields) -> tuple[int, dict]:
    """(status, JSON body) of a request with MSGS (or PROMPT) and `fields`, 2 tokens by default."""
    body = {"messages": MSGS} if path == CHAT else {"prompt": PROMPT}
    status, _, out = srv.request("POST", path, {"max_tokens": 2, **body, **fields})
    return status, out


def raw(srv: Served, data: bytes, path: str = CHAT, headers: bytes = b"") -> tuple[int, dict]:
    """(status, JSON body) of a POST whose body is `data` as it is (escapes, huge numbers)."""
    status, _, out = srv.request("POST", path, data, headers={**_parse(headers)})
    return status, out


def _parse(headers: bytes) -> dict:
    return dict(line.split(": ", 1) for line in headers.decode().splitlines() if line)


def raw_exchange(port: int, data: bytes, timeout: float = 10) -> bytes:
    """Send bytes on a fresh connection and read until the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


# ---- who may ask for what -----------------------------------------------------------------------
def test_only_allowed_methods_are_served(srv, det, tiny_llama):
    for method in ("none", "prompt", "cvec", "random", "fgdilp-frozen", "detox", 3, ["tr"]):
        status, body = chat(srv, method=method)
        assert (status, body["error"]["param"]) == (400, "method"), method
    assert chat(srv, method="fgdilp")[0] == 200 and chat(srv, method="tr")[0] == 200
    with Served(create_app(det, Limits())) as only_tr:      # default: the configured method only
        assert chat(only_tr, method="none")[1]["error"]["param"] == "method"
        assert chat(only_tr, method="tr")[0] == 200 and chat(only_tr)[0] == 200


@pytest.mark.parametrize("allow, words", [(("tr", "bogus"), "'bogus'"), (("none",), "--method tr"),
                                          ((), "at least one")])
def test_allow_methods_are_checked_at_start(det, allow, words):
    with pytest.raises(FgdilpError, match=words):
        create_app(det, Limits(allow_methods=allow))


def test_serve_refuses_an_unknown_allowed_method(cli, tiny_llama):
    r = cli("serve", "-m", tiny_llama[0], "--chat-template", "chatml", "-c", "256", "--method", "tr",
            "--allow-methods", "tr,detox", "--port", "0", timeout=120)
    assert r.returncode != 0 and "detox" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("scale", [-0.5, -1e-9, 2.0001, 1e308, "1", True, [1]])
def test_steer_scale_outside_zero_to_the_cap_is_400(srv, scale):
    status, body = chat(srv, steer_scale=scale)
    assert (status, body["error"]["param"]) == (400, "steer_scale")


def test_steer_scale_within_the_cap_runs(srv, ref_replies):
    for scale in (0, 0.5, 2):
        status, body = chat(srv, steer_scale=scale, seed=4)
        assert status == 200 and body["choices"][0]["message"]["content"] == ref_replies(steer_scale=float(scale))
    assert raw(srv, b'{"messages": [{"role": "user", "content": "hi"}], "steer_scale": 1%s}' % (b"0" * 400),
               headers=b"Content-Type: application/json")[1]["error"]["param"] == "steer_scale"


@pytest.fixture(scope="module")
def ref_replies(tiny_llama):
    with open_det(tiny_llama) as ref:
        yield lambda **kw: ref.chat(MSGS, trim=False, n_predict=2, seed=4, **kw).text


def test_contexts_are_made_at_start_up_and_health_waits(tiny_llama):
    with open_det(tiny_llama) as fresh:
        served = Served(create_app(fresh, Limits(allow_methods=("tr", "fgdilp", "none"))), wait_ready=False)
        gate = Gate(served)                     # the warm-up queues behind it
        with served:
            status, _, body = served.request("GET", "/health")
            assert (status, body["status"]) == (503, "loading") and not fresh.generator._ctx
            gate.release()
            wait_until(served.service.ready.is_set, "the warm-up did not finish", 60)
            assert served.request("GET", "/health")[::2] == (200, {"status": "ok", "model": "tiny-llama"})
            made = set(fresh.generator._ctx)
            assert made == {"tr", "fgdilp", "setup", "none"}
            for method in ("tr", "fgdilp", "none"):
                assert chat(served, method=method)[0] == 200
            assert set(fresh.generator._ctx) == made       # no request grows memory later


def test_a_failed_warm_up_stops_the_server_without_details(tiny_llama, caplog):
    class Broken(SlowDetoxifier):
        def generate(self, *args, **kw):
            raise FgdilpError("cannot read the GGUF tensors of /secret/place/model.gguf")

    with open_det(tiny_llama) as d:
        served = Served(create_app(Broken(d, 0), Limits()), wait_ready=False)
        with served:
            wait_until(lambda: served.service.warm_error is not None, "the warm-up did not fail")
            assert served.server.should_exit
    assert "/secret/place" in caplog.text


# ---- hostile requests ---------------------------------------------------------------------------
def test_content_type_must_be_json(srv):
    body = json.dumps({"messages": MSGS, "max_tokens": 1}).encode()
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                 "application/jsonx"):
        status, out = raw(srv, body, headers=b"Content-Type: " + kind.encode())
        assert (status, out["error"]["code"]) == (415, "unsupported_media_type"), kind
    for kind in ("application/json; charset=utf-8", "Application/JSON"):
        assert raw(srv, body, headers=b"Content-Type: " + kind.encode())[0] == 200, kind
    reply = raw_exchange(srv.port, b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    assert reply.startswith(b"HTTP/1.1 415 ")


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8080", "127.0.0.1.evil.example",
                                  "localhost.evil.example", "[::2]:80", "10.0.0.1", "localhost:80x", ""])
def test_a_foreign_host_header_is_refused(srv, host):
    for method, path, body in (("GET", "/health", None), ("GET", "/v1/models", None),
                               ("POST", CHAT, {"messages": MSGS, "max_tokens": 1})):
        status, _, out = srv.request(method, path, body, headers={"Host": host})
        assert (status, out["error"]["code"]) == (421, "invalid_host"), (host, path)


@pytest.mark.parametrize("host", ["localhost", "LOCALHOST:8080", "127.0.0.1", "127.0.0.1:1", "127.5.5.5",
                                  "[::1]", "[::1]:8080"])
def test_loopback_host_headers_are_served(srv, host):
    assert srv.request("GET", "/health", headers={"Host": host})[0] == 200


def test_no_host_header_is_refused_and_other_binds_skip_the_check(srv, det):
    reply = raw_exchange(srv.port, b"GET /health HTTP/1.0\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 421 ")
    with Served(create_app(det, Limits(loopback_host=False))) as open_bind:
        assert open_bind.request("GET", "/health", headers={"Host": "my.lan.example"})[0] == 200


def test_a_slow_body_is_cut_off_and_the_server_stays_healthy(srv, ref_replies):
    """Slowloris: headers, then a byte every 0.2 s; read_timeout is 1 s here. The client gets a 408
    and the connection is closed (a reset when the server closes on bytes it did not read)."""
    def dribble() -> tuple[bytes, float]:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=0.2) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                      b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{")
            t0, got = time.monotonic(), b""
            while time.monotonic() - t0 < 8:
                try:
                    chunk = s.recv(4096)
                except socket.timeout:
                    try:
                        s.sendall(b" ")
                    except OSError:                 # closed by the server
                        break
                    continue
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                got += chunk
            return got, time.monotonic() - t0

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: dribble(), range(4)))
    for got, took in results:
        assert got == b"" or (got.startswith(b"HTTP/1.1 408 ") and b"request_timeout" in got), got
        assert 0.9 < took < 6, took
    assert any(got for got, _ in results)
    status, body = chat(srv, seed=4)
    assert status == 200 and body["choices"][0]["message"]["content"] == ref_replies()


@pytest.mark.parametrize("dribble", [b"", b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: "],
                         ids=["silent", "dribbling"])
def test_slow_or_missing_headers_are_cut_off(srv, dribble):
    """A connection that sends nothing, or dribbles its headers a byte every 0.2 s, is closed after
    read_timeout (1 s here), on a fresh connection and on a kept-alive one after a reply."""
    body = json.dumps({"messages": MSGS, "max_tokens": 1}).encode()
    for kept_alive in (False, True):
        with socket.create_connection(("127.0.0.1", srv.port), timeout=0.2) as s:
            if kept_alive:
                s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                          b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                s.settimeout(10)
                assert s.recv(65536).startswith(b"HTTP/1.1 200 ")
                s.settimeout(0.2)
            t0, sent, closed = time.monotonic(), 0, False
            while not closed and time.monotonic() - t0 < 10:
                try:
                    closed = s.recv(4096) == b""
                except socket.timeout:
                    if sent < len(dribble):
                        try:
                            s.sendall(dribble[sent:sent + 1])
                        except OSError:
                            closed = True
                        sent += 1
                except ConnectionResetError:
                    closed = True
            took = time.monotonic() - t0
            assert closed and 0.8 < took < 6, (kept_alive, took)
    assert chat(srv)[0] == 200


def test_connections_past_the_limit_get_503(det):
    with Served(create_app(det, Limits(max_connections=4))) as s:
        idle = [socket.create_connection(("127.0.0.1", s.port)) for _ in range(4)]
        try:
            wait_until(lambda: len(s.server.server_state.connections) >= 4, "idle connections not accepted")
            reply = raw_exchange(s.port, b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            assert reply.startswith(b"HTTP/1.1 503 ")
        finally:
            for c in idle:
                c.close()
        wait_until(lambda: s.request("GET", "/health")[0] == 200, "the limit did not free up")


@pytest.mark.parametrize("stop", [["a", "b", "c", "d", "e"], "x" * 257, ["ok", "y" * 257], [""], [1]])
def test_stop_strings_are_capped(srv, stop):
    status, body = chat(srv, stop=stop)
    assert (status, body["error"]["param"]) == (400, "stop")


def test_four_stop_strings_of_256_are_fine(srv):
    assert chat(srv, stop=[c * 256 for c in "abcd"])[0] == 200


@pytest.mark.parametrize("data, path, param", [
    (b'{"messages": [{"role": "user", "content": "hi \\ud800"}]}', CHAT, "messages[0].content"),
    (b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}', CHAT,
     "messages[0].content[0].text"),
    (b'{"prompt": "a\\udc00b"}', COMPLETIONS, "prompt"),
    (b'{"prompt": ["\\ud800"]}', COMPLETIONS, "prompt[0]"),
    (b'{"prompt": "a", "model": "\\ud800"}', COMPLETIONS, "model"),
    (b'{"prompt": "a", "stop": ["x", "\\ud800"]}', COMPLETIONS, "stop[1]"),
    (b'{"prompt": "a", "user": "\\ud800"}', COMPLETIONS, "user"),
    (b'{"prompt": "a", "metadata": {"\\ud800": 1}}', COMPLETIONS, "metadata"),
    (b'{"prompt": "a", "method": "tr\\ud800"}', COMPLETIONS, "method"),
])
def test_lone_surrogates_are_400(srv, data, path, param):
    status, body = raw(srv, data, path, headers=b"Content-Type: application/json")
    assert (status, body["error"]["param"]) == (400, param)


def test_a_surrogate_pair_is_text(srv):
    data = b'{"prompt": "smile \\ud83d\\ude00", "max_tokens": 1}'
    assert raw(srv, data, COMPLETIONS, headers=b"Content-Type: application/json")[0] == 200


@pytest.mark.parametrize("field, value, param", [
    ("seed", b"1" + b"0" * 1000, "seed"), ("max_tokens", b"1" + b"0" * 5000, None),
    ("temperature", b"1e999", "temperature"), ("steer_scale", b"-1e999", "steer_scale"),
    ("top_k", b"1" + b"0" * 30, "top_k"), ("n", b"1" + b"0" * 100, "n"), ("top_p", b"NaN", None),
    ("min_p", b"Infinity", None), ("seed", b"-Infinity", None),
    ("steer_layer_range", b"[1%s, 1%s]" % (b"0" * 100, b"0" * 100), "steer_layer_range"),
    ("steer_layer_range", b"[-1, 2]", "steer_layer_range"),
])
def test_huge_and_non_finite_numbers_are_400(srv, field, value, param):
    data = b'{"prompt": "a", "%s": %s}' % (field.encode(), value)
    status, body = raw(srv, data, COMPLETIONS, headers=b"Content-Type: application/json")
    assert status == 400 and body["error"]["param"] == param, body


# ---- faults -------------------------------------------------------------------------------------
def forget_output_projections(det: Detoxifier) -> None:
    """Drop the cached W_O that cvec reads from the model file once (kept in its Runtime's caches)."""
    det.generator.rt.caches.output_projections = None


def test_a_server_fault_is_a_500_without_paths(tiny_llama, tmp_path, caplog):
    """A real cvec fault (W_O unreadable: the model file is gone) and an injected FgdilpError."""
    hidden = tmp_path / "private-dir"
    hidden.mkdir()
    shutil.copy(tiny_llama[0], hidden / "m.gguf")
    with Detoxifier.from_file(str(hidden / "m.gguf"), **DET_KW) as d:
        with Served(create_app(d, Limits(allow_methods=("tr", "cvec")))) as s:
            assert chat(s, method="cvec")[0] == 200
            (hidden / "m.gguf").unlink()
            forget_output_projections(d)        # read again: now it fails
            for stream in (False, True):
                status, _, body = s.request("POST", CHAT, {"messages": MSGS, "method": "cvec", "stream": stream})
                assert status == 500 and body["error"] == {
                    "message": "internal error (the details are in the server log)", "type": "server_error",
                    "param": None, "code": None}
            assert chat(s, method="tr")[0] == 200
    assert "private-dir" in caplog.text

    class Broken(SlowDetoxifier):
        def stream_chat(self, *args, **kw):
            raise FgdilpError("llama.cpp could not load /secret/model.gguf")

    with open_det(tiny_llama) as d, Served(create_app(Broken(d, 0), Limits())) as s:
        status, _, body = s.request("POST", CHAT, {"messages": MSGS})
        assert status == 500 and "secret" not in json.dumps(body)
