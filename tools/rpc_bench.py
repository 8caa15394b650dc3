"""Decode speed of the embedded model, local and with its layers on llama.cpp RPC servers.

Run by tools/rpc-check.sh; usable alone with an RPC build of llama-cpp-python on the path:

    python tools/rpc_bench.py --rpc 127.0.0.1:50052,127.0.0.1:50053 --out rpc-bench.json

For each placement (local, then rpc), one table each:
- methods: decode tokens/s of none, the default method (universal) and tr through the
  public API (Detoxifier.generate), interleaved repeats, medians;
- hook: the engine alone, one sequence, greedy decode, without the hook and with the hook reading
  every layer's kqv_out row and writing an edited row back; the difference of their seconds per
  token is the hook's added time per token (on RPC: the graph split at every layer, one
  ggml_backend_tensor_get and one ggml_backend_tensor_set round trip per layer).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))     # tools/: gpu_bench's step timing
from gpu_bench import greedy_step_seconds  # noqa: E402

PROMPT = "The ill-fated tale of Phoneys, the stupid"
METHODS = ("none", "universal", "tr")


def bench_methods(model: str, rpc: str | None, threads: int, n_tokens: int, repeats: int) -> dict:
    from fgdilp_cpp.api import Detoxifier

    runs: dict[str, list[float]] = {m: [] for m in METHODS}
    with Detoxifier.from_file(model, rpc=rpc, method="none", threads=threads, ctx_size=256,
                              n_predict=n_tokens, seed=7) as det:
        for m in METHODS:                      # warm-up: allocations, the universal directions loaded
            det.generate(PROMPT, method=m, n_predict=2)
        for _ in range(repeats):               # interleaved: machine noise hits every method alike
            for m in METHODS:
                runs[m].append(det.generate(PROMPT, method=m).tokens_per_s)
    ref = statistics.median(runs["none"])
    return {m: {"tokens_per_s": round(statistics.median(xs), 3), "best_tokens_per_s": round(max(xs), 3),
                "ratio_vs_none": round(statistics.median(xs) / ref, 4),
                "runs_tokens_per_s": [round(x, 3) for x in xs]} for m, xs in runs.items()}


def bench_hook(model: str, rpc: str | None, threads: int, n_tokens: int, repeats: int) -> dict:
    from fgdilp_cpp.engine import Batch, Context, ContextParams, Model
    from fgdilp_cpp.native import EditSpec, NativeHook

    with contextlib.ExitStack() as stack:
        m = stack.enter_context(Model(model, rpc=rpc))
        info = m.info
        prompt = m.tokenize(PROMPT)
        params = ContextParams(n_ctx=len(prompt) + n_tokens + 16, n_batch=64, n_threads=threads)
        hook = stack.enter_context(NativeHook(info.n_layer, info.n_head, info.head_dim, n_slots=2))
        hook.slots[1] = np.random.default_rng(1).standard_normal(hook.slots[1].shape) * 0.01
        hook.set_plan([(0, 0)], [EditSpec(target=0, dir_slot=1)])       # every layer: read, edit, write back
        contexts = {"no_hook": stack.enter_context(Context(m, params)),
                    "hook_edit": stack.enter_context(Context(m, params, hook=hook))}
        batch = stack.enter_context(Batch(params.n_batch))

        def run(name: str, n: int) -> float:
            return greedy_step_seconds(contexts[name], batch, prompt, n)

        for name in contexts:
            run(name, 2)
        secs: dict[str, list[float]] = {name: [] for name in contexts}
        for _ in range(repeats):
            for name in contexts:
                secs[name].append(run(name, n_tokens))
        edits = hook.edits_applied
    med = {k: statistics.median(v) for k, v in secs.items()}
    # on a shared machine the fastest run is the one least disturbed by other processes
    best = {k: min(v) for k, v in secs.items()}
    return {"no_hook_tokens_per_s": round(1 / med["no_hook"], 3), "hook_edit_tokens_per_s": round(1 / med["hook_edit"], 3),
            "hook_added_ms_per_token": round((med["hook_edit"] - med["no_hook"]) * 1e3, 3),
            "hook_added_ms_per_token_best_runs": round((best["hook_edit"] - best["no_hook"]) * 1e3, 3),
            "runs_ms_per_token": {k: [round(x * 1e3, 3) for x in v] for k, v in secs.items()},
            "layers_steered_per_token": info.n_layer, "edits_applied_last_decode": edits}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="GGUF (default: the embedded gemma-3-270m)")
    ap.add_argument("--rpc", required=True, help="HOST:PORT,... of running rpc-server processes")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=32, help="decode steps per timed run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    if a.tokens < 1 or a.repeats < 1 or a.threads < 1:
        ap.error("--tokens, --repeats and --threads must be positive")
    from fgdilp_cpp.models import default_model_path

    model = a.model or str(default_model_path())
    out: dict = {"model": Path(model).name, "rpc": a.rpc, "threads": a.threads, "tokens": a.tokens,
                 "repeats": a.repeats, "prompt": PROMPT, "load_average_before": os.getloadavg()}
    for where, rpc in (("local", None), ("rpc", a.rpc)):
        t0 = time.perf_counter()
        out[where] = {"methods": bench_methods(model, rpc, a.threads, a.tokens, a.repeats),
                      "hook": bench_hook(model, rpc, a.threads, a.tokens, a.repeats)}
        out[where]["seconds"] = round(time.perf_counter() - t0, 1)
        print(where, json.dumps({k: v["tokens_per_s"] for k, v in out[where]["methods"].items()}),
              json.dumps(out[where]["hook"]), flush=True)
    out["load_average_after"] = os.getloadavg()
    a.out.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
