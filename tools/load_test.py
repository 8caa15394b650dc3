#!/usr/bin/env python
"""Load test of `fgdilp-cpp serve` on loopback.

    .venv/bin/python tools/load_test.py [--clients 64] [--requests 320] [--model M.gguf] [--json]

Starts the server as a subprocess (by default on the tiny random-weight model of the tests, built
in a temporary folder), then `--clients` threads send `--requests` requests in all: a mix of
streaming and non-streaming chat and completion requests, a quarter of them streams that the
client hangs up on after the first text, and --huge more that the server must refuse (400)
before they reach the model: 800 and 20,000 messages, and 900 KB of special-token text (issue
#27: such bodies once held the model thread for minutes). A request answered 503 (queue or connection limit) is
retried after a short pause, up to --retries times (the 503s are counted apart). Checks (exit
status 1 if one fails):
- every request is answered: a whole reply, a 503 or, for the hang-ups, cancelled by the
  client; none lost (no error, no timeout, no cut stream); every huge body a 400 with its code;
- the server's peak RSS after the load is within 10 % of its peak after a warm-up round;
- a fixed request answers after the load exactly as it did one at a time before it;
- the server logs no error (nor asyncio's complaint about writing to a hung-up client).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
MSGS = [{"role": "user", "content": "hello there"}]
PROBE = {"messages": MSGS, "seed": 7, "max_tokens": 12}
# bodies refused before the model thread, serialized once (the client's time is not the server's)
HUGE = [(json.dumps({"messages": [{"role": "user", "content": "hi"}] * n}).encode(), code)
        for n, code in ((800, "context_length_exceeded"), (20_000, "too_many_messages"))]
HUGE.append((json.dumps({"messages": [{"role": "user", "content": "<|im_end|>" * 90_000}]}).encode(),
             "request_too_large"))


def tiny_model(folder: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_model import TinyConfig, build_tiny_llama

    path = folder / "tiny-llama.gguf"
    build_tiny_llama(path, TinyConfig())
    return path


class ServerProcess:
    """`fgdilp-cpp serve` on 127.0.0.1 with port 0; .port once it is listening."""

    def __init__(self, model: Path, args: list[str]):
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fgdilp_cpp.cli", "serve", "-m", str(model), "--chat-template", "chatml",
             "-c", "256", "--port", "0", *args], stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
            env=env, cwd=ROOT)
        line = self.proc.stderr.readline()
        if "127.0.0.1:" not in line:
            self.stop()
            raise SystemExit(f"the server did not start: {line.strip()}")
        self.port = int(line.split("127.0.0.1:")[1].split()[0])
        self.log: list[str] = []
        self.drained = threading.Event()
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self.log.append(line.rstrip())
        self.drained.set()

    def rss_kib(self) -> tuple[int, int]:
        """(current, peak) resident set size of the server process."""
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines())
        return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])

    def stop(self) -> int:
        """Ctrl-C, as a user stops it: exit status 0 expected."""
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def request(port: int, body, path: str = "/v1/chat/completions", hang_up: bool = False,
            timeout: float = 120, refused_with: Optional[str] = None) -> tuple[str, str]:
    """(outcome, text): outcome "ok", "busy" (503), "cancelled" (hung up after the first text),
    "refused" (the 400 with code `refused_with` that a huge body must get) or "lost: why".
    body: a dict, or JSON bytes."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = body if isinstance(body, bytes) else json.dumps(body)
        conn.request("POST", path, body=data, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status == 503:
            resp.read()
            return "busy", ""
        if refused_with is not None:
            out = resp.read()
            code = json.loads(out)["error"]["code"] if resp.status == 400 else None
            return ("refused", "") if code == refused_with else (f"lost: HTTP {resp.status} {out[:200]!r}", "")
        if resp.status != 200:
            return f"lost: HTTP {resp.status} {resp.read()[:200]!r}", ""
        if not body.get("stream"):   # (a bytes body is a huge one: refused above)
            out = json.loads(resp.read())
            choice = out["choices"][0]
            if choice["finish_reason"] not in ("stop", "length"):
                return f"lost: finish_reason {choice['finish_reason']}", ""
            return "ok", choice["message"]["content"] if "message" in choice else choice["text"]
        return _read_stream(resp, hang_up)
    except (OSError, http.client.HTTPException, ValueError, KeyError) as exc:
        return f"lost: {type(exc).__name__}: {exc}", ""
    finally:
        conn.close()


def _read_stream(resp, hang_up: bool) -> tuple[str, str]:
    text, finish = [], None
    while line := resp.fp.readline():
        if not line.startswith(b"data: "):
            continue
        if line.strip() == b"data: [DONE]":
            return ("ok", "".join(text)) if finish in ("stop", "length") else ("lost: no finish", "")
        event = json.loads(line[6:])
        if "error" in event:
            return f"lost: error event {event['error']}", ""
        for choice in event["choices"]:
            piece = choice.get("delta", {}).get("content") or choice.get("text") or ""
            text.append(piece)
            finish = choice.get("finish_reason") or finish
            if piece and hang_up:
                return "cancelled", ""
    return "lost: the stream was cut", ""


def load(port: int, clients: int, total: int, hang_up_share: float, max_tokens: int, seed: int,
         retries: int, huge: int = 0) -> dict:
    """`total` requests and `huge` refused bodies over `clients` threads, each retried up to
    `retries` times after a 503; outcome counts (the 503s that were retried apart), latencies
    and the refusals' latencies."""
    rng = random.Random(seed)
    plan = []
    for i in range(total):
        hang = i < round(total * hang_up_share)
        stream = hang or rng.random() < 0.5
        chat = hang or rng.random() < 0.75
        body = {"seed": i, "max_tokens": rng.randint(2, max_tokens), "stream": stream}
        body.update({"messages": MSGS} if chat else {"prompt": "the cat sat on"})
        plan.append((body, "/v1/chat/completions" if chat else "/v1/completions", hang, None))
    plan += [(*HUGE[i % len(HUGE)][:1], "/v1/chat/completions", False, HUGE[i % len(HUGE)][1]) for i in range(huge)]
    rng.shuffle(plan)
    outcomes: Counter = Counter()
    lost: list[str] = []
    latencies: list[float] = []
    refusals: list[float] = []
    lock = threading.Lock()
    todo = iter(plan)

    def client() -> None:
        backoff = random.Random(threading.get_ident())
        while True:
            with lock:
                job = next(todo, None)
            if job is None:
                return
            body, path, hang, refused_with = job
            t0 = time.monotonic()
            for attempt in range(retries + 1):
                outcome, _ = request(port, body, path, hang, refused_with=refused_with)
                if outcome != "busy" or attempt == retries:
                    break
                with lock:
                    outcomes["503 (retried)"] += 1
                time.sleep(backoff.uniform(0.01, 0.1))      # as a client honouring Retry-After would
            with lock:
                outcomes[outcome.split(":")[0]] += 1
                (refusals if refused_with else latencies).append(time.monotonic() - t0)
                if outcome.startswith("lost"):
                    lost.append(outcome)

    t0 = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    latencies.sort()
    refusals.sort()
    return {"requests": total, "clients": clients, "seconds": round(time.monotonic() - t0, 2),
            "outcomes": dict(outcomes), "lost": lost[:10],
            "planned_hang_ups": sum(1 for _, _, h, _ in plan if h), "planned_refusals": huge,
            "refusal_latency_s": {"p50": round(refusals[len(refusals) // 2], 3),
                                  "max": round(refusals[-1], 3)} if refusals else None,
            "latency_s": {"p50": round(latencies[len(latencies) // 2], 3),
                          "p95": round(latencies[int(len(latencies) * 0.95)], 3),
                          "max": round(latencies[-1], 3)}}


def run(model: Optional[Path], clients: int, total: int, hang_up_share: float = 0.25, max_tokens: int = 16,
        server_args: tuple[str, ...] = (), seed: int = 0, retries: int = 100, huge: int = 12) -> dict:
    """The whole test; returns its figures with "passed" (bool) and "failures" (list)."""
    with tempfile.TemporaryDirectory() as tmp:
        model = model or tiny_model(Path(tmp))
        srv = ServerProcess(model, ["--method", "tr", "-n", str(max_tokens), "-t", "1", *server_args])
        try:
            deadline = time.monotonic() + 120
            while not _healthy(srv.port):
                if time.monotonic() > deadline or srv.proc.poll() is not None:
                    raise SystemExit("the server did not become ready: " + " | ".join(srv.log[-5:]))
                time.sleep(0.1)
            alone = request(srv.port, PROBE)
            warm = load(srv.port, min(8, clients), 16, hang_up_share, max_tokens, seed + 1, retries, min(huge, 6))
            rss_before = srv.rss_kib()
            report = load(srv.port, clients, total, hang_up_share, max_tokens, seed, retries, huge)
            rss_after = srv.rss_kib()
            after = request(srv.port, PROBE)
        finally:
            code = srv.stop()
            srv.drained.wait(10)
    failures = []
    noise = [line for line in srv.log if any(w in line for w in ("Traceback", "ERROR", "raised exception"))]
    if noise:
        failures.append(f"the server logged errors: {noise[:5]}")
    counted = sum(n for k, n in report["outcomes"].items() if k != "503 (retried)")
    if report["lost"] or counted != total + huge:
        failures.append(f"{total + huge - counted + len(report['lost'])} requests lost: {report['lost']}")
    if report["outcomes"].get("refused", 0) != huge:
        failures.append(f"{huge - report['outcomes'].get('refused', 0)} huge bodies were not refused")
    if warm["lost"]:
        failures.append(f"warm-up round lost requests: {warm['lost']}")
    growth = rss_after[1] / rss_before[1] - 1
    if growth > 0.10:
        failures.append(f"peak RSS grew {growth:.1%} (more than 10 %)")
    if alone[0] != "ok" or after != alone:
        failures.append(f"the probe request differs after the load: {alone} vs {after}")
    if code != 0:
        failures.append(f"the server exited with {code}")
    report.update({"rss_kib": {"before": {"rss": rss_before[0], "peak": rss_before[1]},
                               "after": {"rss": rss_after[0], "peak": rss_after[1]},
                               "peak_growth": round(growth, 4)},
                   "probe_equal": after == alone, "server_exit": code,
                   "server_log": dict(Counter(line[:60] for line in srv.log)),
                   "failures": failures, "passed": not failures})
    return report


def _healthy(port: int) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/health")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="GGUF model (default: the tests' tiny model)")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--requests", type=int, default=320)
    ap.add_argument("--hang-up", type=float, default=0.25, help="Share of requests that hang up mid-stream.")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--retries", type=int, default=100, help="Retries of a request after a 503 (0: take the 503).")
    ap.add_argument("--huge", type=int, default=12, help="Bodies to be refused (800 / 20,000 messages, 900 KB).")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("server_args", nargs="*", help="More `serve` flags, after --.")
    a = ap.parse_args()
    report = run(a.model, a.clients, a.requests, a.hang_up, a.max_tokens, tuple(a.server_args), a.seed, a.retries,
                 a.huge)
    if a.json:
        print(json.dumps(report, indent=2))
    else:
        for key, value in report.items():
            print(f"{key}: {value}")
    raise SystemExit(0 if report["passed"] else 1)


if __name__ == "__main__":
    main()
