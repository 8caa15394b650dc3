"""What one decode step costs with R rows against one row: the ceiling of an exact method's decode
speed on this machine, whatever the hook and Python do.

TR decodes P0, P+ and P- in every step (3 rows), exact FGDILP P0, P+ and its negatives (2 +
negatives rows), the default method P0 alone (and, in a chat, P0's unedited twin: 2 rows). A
step of R rows costs what llama.cpp's kernels make of R rows: on a machine whose decode is bound
by compute (few cores) nearly R times one row's, on one bound by memory bandwidth (many cores,
large models) little more than one row's. This prints, per R, the median time of a decode of R
rows (one token for each of R sequences, the hook installed and planned with no edit, as a
steered step is), and the ratio of one row's time to it: the highest decode-speed ratio to
unsteered any method of R rows can reach here.

    python tools/row_cost.py MODEL.gguf [-t 2] [--rows 1,2,3,8] [--steps 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from fgdilp_cpp.engine import Context, ContextParams, Model
from fgdilp_cpp.engine.batch import Batch
from fgdilp_cpp.native import NativeHook

PROMPT_TOKENS = 32


def step_times(ctx: Context, hook: NativeHook, rows: int, steps: int) -> list[float]:
    """Seconds of each of `steps` decodes of `rows` rows, after a prompt of PROMPT_TOKENS per row."""
    batch = Batch(max(rows * PROMPT_TOKENS, rows))
    try:
        ctx.clear()
        batch.clear()
        for s in range(rows):
            for p in range(PROMPT_TOKENS):
                batch.add(100 + p, p, s, p == PROMPT_TOKENS - 1)
        ctx.decode(batch)
        out = []
        for k in range(steps):
            batch.clear()
            for s in range(rows):
                batch.add(200 + k, PROMPT_TOKENS + k, s, True)
            hook.set_plan((), ())
            t = time.perf_counter()
            ctx.decode(batch)
            out.append(time.perf_counter() - t)
        return out
    finally:
        batch.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--rows", default="1,2,3,8", help="row counts to time (1 is always included)")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved passes over the row counts")
    args = ap.parse_args()
    counts = sorted({1, *(int(r) for r in args.rows.split(","))})
    with Model(args.model) as model:
        i = model.info
        with NativeHook(i.n_layer, i.n_head, i.head_dim, n_slots=1) as hook, \
                Context(model, ContextParams(n_ctx=max(counts) * (PROMPT_TOKENS + args.steps) + 256,
                                             n_batch=max(counts) * PROMPT_TOKENS, n_seq_max=max(counts),
                                             n_threads=args.threads), hook=hook) as ctx:
            times: dict[int, list[float]] = {r: [] for r in counts}
            step_times(ctx, hook, 1, 2)                      # warm-up
            for _ in range(args.repeats):                     # interleaved: noise hits every count alike
                for r in counts:
                    times[r] += step_times(ctx, hook, r, args.steps)
    one = statistics.median(times[1])
    out = {"model": args.model.rsplit("/", 1)[-1], "n_params": i.n_params, "threads": args.threads,
           "rows": {r: {"step_ms": round(1000 * statistics.median(ts), 2),
                        "cost_vs_one_row": round(statistics.median(ts) / one, 3),
                        "speed_ceiling_vs_one_row": round(one / statistics.median(ts), 3)}
                    for r, ts in times.items()}}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
