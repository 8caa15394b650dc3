"""Helpers of the server tests: a real uvicorn on loopback (the server's own Server class), raw
HTTP, a gate that holds the model thread, and a Detoxifier that writes slowly."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import openai

from fgdilp_cpp.api import Detoxifier
from fgdilp_cpp.serve.server import Server

MSGS = [{"role": "user", "content": "hello there"}]
PROMPT = "the cat sat on a mat"
DET_KW = dict(chat=True, chat_template="chatml", ctx_size=256, n_predict=8, threads=1, method="tr",
              selfgen_samples=2, selfgen_tokens=4, selfgen_min_tokens=1)


def open_det(tiny_llama) -> Detoxifier:
    return Detoxifier.from_file(str(tiny_llama[0]), **DET_KW)


class Served:
    """An app served by uvicorn in a background thread on 127.0.0.1 (an ephemeral port)."""

    def __init__(self, app, wait_ready: bool = True):
        self.app, self.service, self.wait_ready = app, app.state.service, wait_ready
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = Server(app, self.service.limits)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "Served":
        self.thread.start()
        wait_until(lambda: self.server.started, "the server did not start")
        if self.wait_ready:
            wait_until(self.service.ready.is_set, "the allowed methods were not warmed up", 60)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        assert not self.thread.is_alive()

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="x", max_retries=0,
                             timeout=30, **kw)

    def request(self, method: str, path: str, body=None, headers=None) -> tuple[int, dict, dict]:
        """(status, headers, JSON body) of one raw request; body: bytes, or an object sent as JSON."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
            conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), json.loads(resp.read() or b"null")
        finally:
            conn.close()

    def open_raw(self, body: dict) -> socket.socket:
        """A POST /v1/chat/completions sent on a bare socket (to hang up on it later)."""
        data = json.dumps(body).encode()
        s = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
        return s


def wait_until(cond, what: str, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(what)
        time.sleep(0.005)


class Gate:
    """Holds the model thread of a served app until released."""

    def __init__(self, srv: Served):
        self.event = threading.Event()
        self.done = srv.service.executor.submit(self.event.wait)

    def release(self) -> None:
        self.event.set()
        self.done.result(5)


class SlowDetoxifier:
    """A Detoxifier whose chat streams pause before every piece (a slow model, for hang-ups)."""

    def __init__(self, det: Detoxifier, delay: float):
        self._det, self.delay, self.pieces, self.closed = det, delay, 0, threading.Event()

    def __getattr__(self, name):
        return getattr(self._det, name)

    def stream_chat(self, *args, **kw):
        outer, inner = self, self._det.stream_chat(*args, **kw)

        class Slow:
            def __iter__(self):
                return self

            def __next__(self):
                time.sleep(outer.delay)
                piece = next(inner)
                outer.pieces += 1
                return piece

            def cancel(self):
                inner.cancel()

            def close(self):
                inner.close()
                outer.closed.set()

            @property
            def result(self):
                return inner.result

        return Slow()
