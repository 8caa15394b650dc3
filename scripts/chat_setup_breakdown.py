"""Where a chat turn's time to first token goes for an FGDILP method: the candidates' drawing
(self_generate, with the new message's prefill that P0 then reuses) and the capture of the new
prefixes (prefill_aside), replaying the shipped benchmark conversation (bench.chat_turns).

    .venv/bin/python scripts/chat_setup_breakdown.py [MODEL.gguf] [--method fgdilp-frozen]
        [--instance-reuse turn] [-t 2] [--turns 6]

MODEL defaults to the embedded SmolLM2; its profile and the chat defaults apply as in `chat`.
"""

from __future__ import annotations

import argparse
import time

from fgdilp_cpp import instance, plans
from fgdilp_cpp.api import Detoxifier
from fgdilp_cpp.bench import chat_turns


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?")
    ap.add_argument("--method", default="fgdilp-frozen")
    ap.add_argument("--instance-reuse", default="turn", choices=("turn", "conversation"))
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--turns", type=int, default=6)
    a = ap.parse_args()
    spent: dict[str, float] = {}

    def timed(mod, name: str, key: str) -> None:
        f = getattr(mod, name)

        def g(*args, **kw):
            t = time.perf_counter()
            try:
                return f(*args, **kw)
            finally:
                spent[key] = spent.get(key, 0.0) + time.perf_counter() - t
        setattr(mod, name, g)

    timed(instance, "self_generate", "candidates")
    timed(plans, "prefill_aside", "capture")
    with Detoxifier.from_file(a.model, chat=True, threads=a.threads, instance_reuse=a.instance_reuse) as d:
        msgs: list[dict] = []
        for i, text in enumerate(chat_turns(a.turns)):
            msgs.append({"role": "user", "content": text})
            spent.clear()
            t0, first, pieces = time.perf_counter(), None, []
            stream = d.stream_chat(msgs, n_predict=24, method=a.method)
            for piece in stream:
                first = time.perf_counter() - t0 if first is None else first
                pieces.append(piece)
            r = stream.result
            msgs.append({"role": "assistant", "content": "".join(pieces)})
            parts = " ".join(f"{k} {v:.3f}" for k, v in spent.items())
            print(f"turn {i + 1}: first token {first or 0:.3f} s, setup {r.setup_s:.3f}, P0 prefill "
                  f"{r.prefill_s:.3f} ({r.n_reused_tokens}/{r.n_prompt_tokens} tokens kept) {parts}", flush=True)


if __name__ == "__main__":
    main()
