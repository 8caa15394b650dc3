"""Side-by-side decode speed of methods in one run (interleaved repeats, medians, ratio to none),
and FGDILP's per-prompt setup cost against the time to generate the final samples."""

from __future__ import annotations

import json
import os
import statistics
import time
from importlib import resources
from typing import Optional, Sequence

from . import methods
from .call_settings import settings_for
from .chat.fitting import fit_chat
from .generation import INSTANCE_REUSE
from .params import CONTRASTS
from .setting_spec import PREFIXED


def run_bench(det, prompt: str, names: list[str], repeats: int, setup_samples: int, setup_tokens: int) -> dict:
    """det: a Detoxifier (max_samples >= setup_samples when a method builds FGDILP's instance)."""
    s = det.settings

    def run(m: str, n: int, n_samples: int = 1):
        return det.generate(prompt, method=m, n_predict=n, n_samples=n_samples, stop_at_eog=False)

    speeds: dict[str, list[float]] = {m: [] for m in names}
    prefill: dict[str, list[float]] = {m: [] for m in names}
    for m in names:   # warm-up: contexts, caches, first-use allocations
        run(m, 4)
    for _ in range(repeats):   # interleaved so that machine noise hits every method alike
        for m in names:
            r = run(m, s.n_predict)
            speeds[m].append(r.tokens_per_s)
            prefill[m].append(r.prefill_s)
    base = statistics.median(speeds[methods.UNSTEERED])
    out = {"model": det.model.info.path, "n_predict": s.n_predict, "repeats": repeats,
           "threads": s.threads or os.cpu_count(), "methods": {}}
    for m in names:
        tps = statistics.median(speeds[m])
        out["methods"][m] = {"tokens_per_s": round(tps, 3), "ratio_vs_none": round(tps / base, 4),
                             "prefill_s": round(statistics.median(prefill[m]), 4),
                             "runs_tokens_per_s": [round(x, 3) for x in speeds[m]]}
    for m in names:
        if methods.get(m).instance:
            # setup (self-generation + diagnosis [+ capture]) / generating the final samples
            r = run(m, setup_tokens, setup_samples)
            final = r.prefill_s + r.decode_s
            out["methods"][m].update(setup_s=round(r.setup_s, 4), final_samples_s=round(final, 4),
                                     setup_ratio=round(r.setup_s / final, 4),
                                     setup_samples=setup_samples, setup_tokens=setup_tokens)
    return out


CHAT_BENCH_PROMPT = "You are a worthless idiot. Tell me what you really think of people like me."


def run_chat_ttft(det, prompt: str, names: list[str], repeats: int, vectors_det=None) -> dict:
    """Time to first token of a chat reply per method (interleaved repeats, medians, ratio to none);
    the reply is stopped once its first piece is out. vectors_det: a Detoxifier of the same model
    with saved vectors, measured in the same rounds (as the saved-vectors method)."""
    messages = [{"role": "user", "content": prompt}]
    streams = {m: (lambda m=m: det.stream_chat(messages, method=m)) for m in names}
    if vectors_det is not None:
        streams[methods.saved_vectors().name] = lambda: vectors_det.stream_chat(messages)
    names = list(streams)

    def first_piece(method: str):
        t0 = time.perf_counter()
        stream = streams[method]()
        try:
            next(stream, None)
            return time.perf_counter() - t0, stream
        finally:
            stream.close()

    for m in names:   # warm-up: contexts, caches, first-use allocations
        first_piece(m)
    ttft: dict[str, list[float]] = {m: [] for m in names}
    parts: dict[str, list[tuple[float, float]]] = {m: [] for m in names}
    for _ in range(repeats):
        for m in names:
            t, stream = first_piece(m)
            ttft[m].append(t)
            if stream.result is not None:
                parts[m].append((stream.result.setup_s, stream.result.prefill_s))
    base = statistics.median(ttft[methods.UNSTEERED])
    s = det.settings
    out = {"model": det.model.info.path, "prompt": prompt, "repeats": repeats, "threads": s.threads or os.cpu_count(),
           "n_prompt_tokens": fit_chat(det, messages).n_tokens, "methods": {}}
    for m in names:
        med = statistics.median(ttft[m])
        setup = statistics.median(p[0] for p in parts[m]) if parts[m] else 0.0
        prefill = statistics.median(p[1] for p in parts[m]) if parts[m] else 0.0
        out["methods"][m] = {"ttft_s": round(med, 4), "ratio_vs_none": round(med / base, 3),
                             "setup_s": round(setup, 4), "prefill_s": round(prefill, 4),
                             "runs_ttft_s": [round(x, 4) for x in ttft[m]]}
    out["settings"] = {k: getattr(s, k) for k in ("selfgen_samples", "selfgen_tokens", "negatives", "ctx_size",
                                                  "contrast")}
    return out


CHAT_TURNS_FILE = "chat-turns.json"


def chat_turns(n: int) -> list[str]:
    """The first n user messages of the shipped benchmark conversation (data/chat-turns.json)."""
    users = json.loads(resources.files(__package__).joinpath("data", CHAT_TURNS_FILE).read_text("utf-8"))["user"]
    if not 1 <= n <= len(users):
        from .errors import FgdilpError

        raise FgdilpError(f"--turns must be in 1..{len(users)} (the messages of {CHAT_TURNS_FILE})")
    return users[:n]


# the settings a bench variant may change (each has two values: a variant takes the other one),
# and the methods each one changes
VARIANT_CHANGES = {"instance_reuse": (INSTANCE_REUSE, lambda m: m.instance), "contrast": (CONTRASTS, PREFIXED)}


def _other(choices: tuple[str, str], value: str) -> str:
    return choices[1 - choices.index(value)]


def chat_variants(det, names: list[str]) -> list[tuple[str, dict, str]]:
    """(row name, settings, method) of the variant rows of `bench --chat --turns`: per method, the
    setting(s) of VARIANT_CHANGES it depends on turned to their other value, one at a time and
    together ("fgdilp-frozen+turn", "+full", "+turn+full"), from what the method runs at here
    (its profile entry's values included)."""
    out = []
    for m in names:
        spec, eff = methods.get(m), settings_for(det, m)
        keys = [k for k, (_, applies) in VARIANT_CHANGES.items() if applies(spec)]
        combos = [[k] for k in keys] + ([keys] if len(keys) > 1 else [])
        for combo in combos:
            over = {k: _other(VARIANT_CHANGES[k][0], getattr(eff, k)) for k in combo}
            out.append((m + "".join(f"+{v}" for v in over.values()), over, m))
    return out


def run_chat_turns(det, names: list[str], n_turns: int, vectors_det=None, reply_tokens: int = 24,
                   variants: Sequence[tuple[str, object]] = (), repeats: int = 1) -> dict:
    """Replay an n-turn conversation `repeats` times per method and time each reply's first piece.

    Every method keeps its own conversation (its replies, at most reply_tokens tokens each, become
    its assistant turns), so its contexts reuse their KV from turn to turn as in `chat`. Methods
    are interleaved within a turn, so machine noise hits all alike. ttft_s: the median from the
    second turn on (the first turn prefills the whole system prompt and builds contexts);
    ratio_vs_none: the median from the second turn on of each turn's time over unsteered's.
    variants: (row name, Detoxifier with other settings, method) triples (chat_variants): the
    method run by that Detoxifier, in its own contexts (so its own kept KV), under the row name.
    repeats: each replay starts the conversation again with another seed (a new one: FGDILP builds
    a new instance from new candidates);
    a turn's time is its median over the replays (all of them under "replays"), the other
    per-turn fields are the first replay's."""
    users = chat_turns(n_turns)
    calls = {m: (det, {"method": m}) for m in names}
    if vectors_det is not None:
        calls[methods.saved_vectors().name] = (vectors_det, {})
    for row, vdet, m in variants:
        calls[row] = (vdet, {"method": m})
    rows: dict[str, dict[str, list]] = {m: {"turns": [], "setup_s": [], "prefill_s": [], "prompt_tokens": [],
                                            "reused_tokens": [], "instance_kept": []} for m in calls}
    replays: dict[str, list[list[float]]] = {m: [] for m in calls}
    for rep in range(repeats):
        # another seed per replay: new candidates and replies, so no replay finds its prefixes'
        # rows or directions remembered from the one before (plans' capture memos)
        times = _replay(calls, users, reply_tokens, rows if rep == 0 else None, det.settings.seed + 1000 * rep)
        for m, ts in times.items():
            replays[m].append(ts)
    for m, row in rows.items():
        row["turns"] = [round(statistics.median(ts), 4) for ts in zip(*replays[m])]
        row["replays"] = replays[m]

    def median_later(xs: list[float]) -> float:
        return statistics.median(xs[1:] if len(xs) > 1 else xs)

    base = rows[methods.UNSTEERED]["turns"]
    s = det.settings
    out = {"model": det.model.info.path, "turns": n_turns, "reply_tokens": reply_tokens, "repeats": repeats,
           "threads": s.threads or os.cpu_count(), "kv_reuse": s.kv_reuse, "instance_reuse": s.instance_reuse,
           "methods": {}}
    for m, row in rows.items():
        # the ratio is paired per turn (same length, same moment) before the median: turns of
        # 26 to 290 tokens give medians of different turns otherwise
        ratio = median_later([t / b for t, b in zip(row["turns"], base)])
        out["methods"][m] = {"ttft_s": round(median_later(row["turns"]), 4), "ratio_vs_none": round(ratio, 3), **row}
    out["settings"] = {k: getattr(s, k) for k in ("selfgen_samples", "selfgen_tokens", "negatives", "ctx_size",
                                                  "contrast")}
    return out


def _replay(calls: dict, users: list[str], reply_tokens: int, rows: Optional[dict],
            seed: int) -> dict[str, list[float]]:
    """One replay of the conversation from `seed` (turn i draws with seed + i, as the chat REPL
    does), methods interleaved within a turn: per method its first piece's time per turn; rows
    (when given) collect the setup, prefill and reuse figures."""
    history: dict[str, list[dict]] = {m: [] for m in calls}
    times: dict[str, list[float]] = {m: [] for m in calls}
    for i, text in enumerate(users):
        for m, (d, over) in calls.items():
            msgs = history[m]
            msgs.append({"role": "user", "content": text})
            t0 = time.perf_counter()
            first = None
            stream = d.stream_chat(msgs, n_predict=reply_tokens, seed=(seed + i) % 2**32, **over)
            pieces = []
            for piece in stream:
                if first is None:
                    first = time.perf_counter() - t0
                pieces.append(piece)
            r = stream.result
            msgs.append({"role": "assistant", "content": "".join(pieces)})
            times[m].append(round(first if first is not None else time.perf_counter() - t0, 4))
            if rows is not None:
                row = rows[m]
                row["setup_s"].append(round(r.setup_s, 4))
                row["prefill_s"].append(round(r.prefill_s, 4))
                row["prompt_tokens"].append(r.n_prompt_tokens)
                row["reused_tokens"].append(r.n_reused_tokens)
                row["instance_kept"].append((r.explain or {}).get("instance") == "kept from an earlier turn")
    return times
