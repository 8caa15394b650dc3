"""A smaller run of tools/load_test.py (the full one is 64 clients and 320 requests): the server as
a subprocess on loopback, concurrent streaming and non-streaming requests, a quarter hung up
mid-stream, and a dozen huge bodies (800 and 20,000 messages, 900 KB of special-token text) that
must be refused with a 400 before the model thread. None lost, peak RSS within 10 %, the probe
request unchanged, a clean Ctrl-C exit."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

import load_test  # noqa: E402


def test_load_on_loopback(tiny_llama):
    report = load_test.run(Path(tiny_llama[0]), clients=32, total=120, max_tokens=8,
                           server_args=("--max-queue", "8"), retries=10_000)
    assert report["passed"], report["failures"]
    outcomes = report["outcomes"]
    assert outcomes["cancelled"] == report["planned_hang_ups"] == 30
    assert outcomes["ok"] == 90 and outcomes["503 (retried)"] > 0      # the queue limit was reached
    assert outcomes["refused"] == report["planned_refusals"] == 12       # 800 / 20,000 messages, 900 KB
    assert report["rss_kib"]["peak_growth"] <= 0.10 and report["probe_equal"] and report["server_exit"] == 0
