"""Ending a reply early through HTTP: shutdown mid-reply is an error (an error event, or a 503),
never a complete-looking "stop"; a client's hang-up before the first piece and during FGDILP's
setup is honoured (no token generated)."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import fgdilp_cpp.self_generation as self_generation
from fgdilp_cpp.api import Detoxifier
from fgdilp_cpp.serve.server import Limits, create_app
from server_helpers import MSGS, Served, SlowDetoxifier, open_det, wait_until

CHAT = "/v1/chat/completions"


def test_shutdown_mid_reply_is_an_error_not_a_stop(tiny_llama):
    with open_det(tiny_llama) as d:
        slow = SlowDetoxifier(d, 0.05)
        with Served(create_app(slow, Limits())) as s, ThreadPoolExecutor(1) as pool:
            sock = s.open_raw({"messages": MSGS, "seed": 1, "max_tokens": 200, "stream": True})
            seen = b""
            while b'"content"' not in seen:
                seen += sock.recv(4096)
            queued = pool.submit(s.request, "POST", CHAT, {"messages": MSGS, "seed": 1})
            wait_until(lambda: s.service.in_flight == 2, "the second request was not queued")
            s.server.should_exit = True
            sock.settimeout(10)
            while chunk := sock.recv(65536):
                seen += chunk
            sock.close()
            status, _, body = queued.result(10)
        events = [json.loads(line[6:]) for line in seen.decode().split("\n") if line.startswith("data: {")]
        assert events[-1]["error"]["code"] == "shutting_down" and b"[DONE]" not in seen
        assert not any(c["finish_reason"] for e in events[:-1] for c in e["choices"])
        assert slow.pieces < 100
        assert (status, body["error"]["code"]) == (503, "shutting_down")


def test_shutdown_mid_reply_without_streaming_is_a_503(tiny_llama):
    with open_det(tiny_llama) as d:
        slow = SlowDetoxifier(d, 0.05)
        with Served(create_app(slow, Limits())) as s, ThreadPoolExecutor(1) as pool:
            running = pool.submit(s.request, "POST", CHAT, {"messages": MSGS, "seed": 1, "max_tokens": 200})
            wait_until(lambda: slow.pieces >= 2, "the reply did not start")
            s.server.should_exit = True
            status, _, body = running.result(10)
        assert (status, body["error"]["code"]) == (503, "shutting_down") and slow.pieces < 100


class Held(SlowDetoxifier):
    """A Detoxifier whose streams wait before their first piece until `release` is set; records
    the real streams and whether the server cancelled them."""

    def __init__(self, det: Detoxifier):
        super().__init__(det, 0.0)
        self.entered, self.release, self.cancelled, self.streams = (threading.Event(), threading.Event(),
                                                                     threading.Event(), [])

    def stream_chat(self, *args, **kw):
        outer, inner = self, self._det.stream_chat(*args, **kw)
        self.streams.append(inner)

        class Stream:
            def __iter__(self):
                return self

            def __next__(self):
                if not outer.entered.is_set():
                    outer.entered.set()
                    assert outer.release.wait(20)
                return next(inner)

            def cancel(self):
                inner.cancel()
                outer.cancelled.set()

            def close(self):
                inner.close()

            @property
            def result(self):
                return inner.result

        return Stream()


def _hang_up_and_wait(s: Served, held: Held, entered: threading.Event) -> None:
    sock = s.open_raw({"messages": MSGS, "method": "fgdilp", "max_tokens": 50, "stream": True})
    assert entered.wait(20)
    sock.close()
    assert held.cancelled.wait(10)


def test_a_hang_up_before_the_first_piece_is_honoured(tiny_llama):
    """The cancel lands after the job started and before its stream began: FGDILP's setup and
    the reply are skipped (no token), instead of running to the first piece."""
    with open_det(tiny_llama) as d:
        held = Held(d)
        with Served(create_app(held, Limits(allow_methods=("tr", "fgdilp")))) as s:
            _hang_up_and_wait(s, held, held.entered)
            held.release.set()
            wait_until(lambda: s.service.in_flight == 0, "the cancelled job did not end")
            res = held.streams[-1].result
            assert res.stop_reason == "cancelled" and res.tokens == [] and res.explain.get("samples") is None


def test_a_hang_up_during_fgdilp_setup_is_honoured(tiny_llama, monkeypatch):
    with open_det(tiny_llama) as d:
        held = Held(d)
        held.release.set()
        with Served(create_app(held, Limits(allow_methods=("tr", "fgdilp")))) as s:
            in_setup, go, real = threading.Event(), threading.Event(), self_generation.self_generate

            def self_generate(*args, **kw):
                in_setup.set()
                assert go.wait(20)
                return real(*args, **kw)

            monkeypatch.setattr(self_generation, "self_generate", self_generate)
            _hang_up_and_wait(s, held, in_setup)
            go.set()
            wait_until(lambda: s.service.in_flight == 0, "the cancelled job did not end")
            res = held.streams[-1].result
            assert res.stop_reason == "cancelled" and res.tokens == [] and res.prefill_s == 0.0
            monkeypatch.undo()
            assert s.request("POST", CHAT, {"messages": MSGS, "method": "fgdilp", "max_tokens": 2})[0] == 200


def test_a_stream_cancelled_before_it_starts_generates_nothing(tiny_llama):
    """The API piece the server relies on: Stream.cancel() before the first next() is kept."""
    with open_det(tiny_llama) as d:
        for method in ("tr", "fgdilp"):
            stream = d.stream_chat(MSGS, method=method, n_predict=50)
            stream.cancel()
            assert list(stream) == [] and stream.result.stop_reason == "cancelled" and stream.result.tokens == []
        d.cancel()                                  # a stray Detoxifier.cancel() is still forgotten
        assert len(d.chat(MSGS, n_predict=3, method="fgdilp").tokens) == 3
