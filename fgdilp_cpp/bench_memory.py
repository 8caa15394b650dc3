"""`bench --memory`: per method, the peak RSS and KV bytes of a chat of N turns, beside unsteered,
and of `serve` with every method allowed after one request of each; then decode tokens/s and chat
time to first token of the same methods, side by side in one process (bench.py's interleaving).

Each memory figure comes from a fresh subprocess (`python -m fgdilp_cpp.bench_memory SPEC`), so
methods never share a peak. A model without installed universal directions (a random-weight
bench model) runs universal with random directions of its shape: the same code path.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from typing import Optional

from . import methods
from .bench import chat_turns, run_chat_turns
from .call_settings import settings_for
from .kv_memory import MIB

def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM), MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def universal_source(det) -> str:
    """Where universal's directions come from: the model's installed file, or (a bench
    model has none) random directions of its shape, set on the Detoxifier's runtime."""
    from .profiles import find_universal

    if find_universal(det.model.fingerprint()["weights_sha256"], family=det.model.family_fingerprint,
                      bits_per_weight=det.model.bits_per_weight()) is not None:
        return "installed"
    import numpy as np

    from .generation import identity_of
    from .method.vectors import HeadDirections, random_heads

    i = det.model.info
    rows = np.full((i.n_layer, i.n_head, i.head_dim), 0.05, np.float32)
    v = HeadDirections(directions=random_heads(rows, 0).astype(np.float32), e=None, model=identity_of(det.model),
                       source="random", settings={}).validate()
    det.generator.use_universal(v)          # a benchmark's stand-in for an installed file
    return "random"


# ---- one subprocess: a chat of N turns with one method, or serve with every method ----------------
def _worker(spec: dict) -> dict:
    from .api import Detoxifier
    from .settings import Settings

    # never a fast setup (as every bench): a model without a profile is measured as it stands
    det = Detoxifier(Settings().updated(spec["settings"]), chat=True, sources=spec["sources"], auto_setup=False)
    loaded = peak_rss_mib()
    universal_source(det)
    users, reply = chat_turns(spec["turns"]), spec["reply_tokens"]
    if spec["mode"] == "serve":
        _serve(det, spec["methods"], users[0], reply)
    else:
        msgs: list[dict] = []
        for i, text in enumerate(users):
            msgs.append({"role": "user", "content": text})
            res = det.chat(msgs, method=spec["methods"][0], n_predict=reply, seed=42 + i)
            msgs.append({"role": "assistant", "content": res.text})
    out = {"peak_rss_mib": round(peak_rss_mib(), 1), "loaded_rss_mib": round(loaded, 1),
           "kv_mib": round(det.generator.kv_bytes() / MIB, 2), "kv_budget_mib": round(det.generator.kv_budget / MIB)}
    det.close()
    return out


def _serve(det, names: list[str], text: str, reply: int) -> None:
    """serve's model thread (model_queue): its warm-up, then one chat request per method."""
    from .serve.model_queue import ModelQueue
    from .serve.openai_api import GenRequest

    queue = ModelQueue(det, 16, tuple(names))
    try:
        queue.start().result()
        if queue.warm_error:
            raise RuntimeError(queue.warm_error)
        for m in names:
            req = GenRequest([{"role": "user", "content": text}], None, {"method": m, "n_predict": reply, "seed": 1})
            queue.submit(req)[1].result()
    finally:
        queue.close()


def measure(settings, sources: dict, names: list[str], turns: int, reply_tokens: int, mode: str) -> dict:
    """The worker's figures, from a fresh interpreter."""
    spec = {"settings": settings.as_dict(), "sources": sources, "methods": names, "turns": turns,
            "reply_tokens": reply_tokens, "mode": mode}
    proc = subprocess.run([sys.executable, "-m", __name__, json.dumps(spec)], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        from .errors import FgdilpError

        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise FgdilpError(f"bench --memory: the {mode} run of {', '.join(names)} failed: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ratio(x: float, base: float) -> Optional[float]:
    return round(x / base, 3) if base > 0 else None


def decode_speeds(det, prompt: str, names: list[str], n_predict: int, repeats: int) -> dict[str, float]:
    """Median decode tokens/s per method, repeats interleaved so that machine noise hits all alike."""
    runs: dict[str, list[float]] = {m: [] for m in names}
    for m in names:           # warm-up: contexts, caches, first-use allocations
        det.generate(prompt, method=m, n_predict=4, stop_at_eog=False)
    for _ in range(repeats):
        for m in names:
            runs[m].append(det.generate(prompt, method=m, n_predict=n_predict, stop_at_eog=False).tokens_per_s)
    return {m: statistics.median(xs) for m, xs in runs.items()}


def run_memory_bench(open_det, settings, sources: dict, names: list[str], turns: int, reply_tokens: int,
                     decode_tokens: int, repeats: int, prompt: str) -> dict:
    """open_det(): a chat Detoxifier of `settings`, opened for the speed half once the memory
    half's subprocesses are done (so that their model never shares the machine with its own)."""
    t0 = time.perf_counter()
    base = methods.UNSTEERED
    chat = {m: measure(settings, sources, [m], turns, reply_tokens, "chat") for m in names}
    serve = {"none": measure(settings, sources, [base], turns, reply_tokens, "serve"),
             "all": measure(settings, sources, names, turns, reply_tokens, "serve")}
    with open_det() as det:
        out = {"model": os.path.basename(det.model.info.path), "n_params": det.model.info.n_params,
               "ctx_size": settings.ctx_size, "threads": settings.threads or os.cpu_count(), "turns": turns,
               "reply_tokens": reply_tokens, "decode_tokens": decode_tokens, "repeats": repeats,
               "contrast": {m: settings_for(det, m).contrast for m in names}, "universal": universal_source(det),
               "methods": {}}
        speed = decode_speeds(det, prompt, names, decode_tokens, repeats)
        # replays as many as the decode runs: one turn of ~0.1 s is noise, and the first steered turn
        # of a process loads the directions once
        ttft = run_chat_turns(det, names, turns, reply_tokens=reply_tokens, repeats=repeats)["methods"]
    for m in names:
        c = chat[m]
        out["methods"][m] = {
            "peak_rss_mib": c["peak_rss_mib"],
            "rss_ratio_vs_none": _ratio(c["peak_rss_mib"], chat[base]["peak_rss_mib"]),
            "kv_mib": c["kv_mib"], "kv_ratio_vs_none": _ratio(c["kv_mib"], chat[base]["kv_mib"]),
            "decode_tokens_per_s": round(speed[m], 3), "decode_ratio_vs_none": _ratio(speed[m], speed[base]),
            "ttft_s": ttft[m]["ttft_s"], "ttft_ratio_vs_none": ttft[m]["ratio_vs_none"],
            "ttft_turns_s": ttft[m]["turns"]}
    out["serve"] = {"methods": names, **serve["all"], "none_peak_rss_mib": serve["none"]["peak_rss_mib"],
                    "rss_ratio_vs_none": _ratio(serve["all"]["peak_rss_mib"], serve["none"]["peak_rss_mib"]),
                    "within_budget": serve["all"]["kv_mib"] <= serve["all"]["kv_budget_mib"]}
    out["elapsed_s"] = round(time.perf_counter() - t0, 1)
    return out


if __name__ == "__main__":
    print(json.dumps(_worker(json.loads(sys.argv[1]))))
