"""Side-by-side decode speed of methods in one run (interleaved repeats, medians, ratio to none),
and FGDILP's per-prompt setup cost against the time to generate the final samples."""

from __future__ import annotations

import os
import statistics


def run_bench(gen, prompt: str, names: list[str], s, repeats: int, setup_samples: int, setup_tokens: int) -> dict:
    sampling = s.sampling()
    speeds: dict[str, list[float]] = {m: [] for m in names}
    prefill: dict[str, list[float]] = {m: [] for m in names}
    for m in names:   # warm-up: contexts, caches, first-use allocations
        gen.generate(prompt, m, 4, sampling, stop_at_eog=False)
    for _ in range(repeats):   # interleaved so that machine noise hits every method alike
        for m in names:
            r = gen.generate(prompt, m, s.n_predict, sampling, stop_at_eog=False)
            speeds[m].append(r.tokens_per_s)
            prefill[m].append(r.prefill_s)
    base = statistics.median(speeds["none"])
    out = {"model": gen.model.info.path, "n_predict": s.n_predict, "repeats": repeats,
           "threads": s.threads or os.cpu_count(), "methods": {}}
    for m in names:
        tps = statistics.median(speeds[m])
        out["methods"][m] = {"tokens_per_s": round(tps, 3), "ratio_vs_none": round(tps / base, 4),
                             "prefill_s": round(statistics.median(prefill[m]), 4),
                             "runs_tokens_per_s": [round(x, 3) for x in speeds[m]]}
    for m in names:
        if m.startswith("fgdilp"):
            # setup (self-generation + diagnosis [+ capture]) / generating the final samples
            r = gen.generate(prompt, m, setup_tokens, sampling, n_samples=setup_samples, stop_at_eog=False)
            final = r.prefill_s + r.decode_s
            out["methods"][m].update(setup_s=round(r.setup_s, 4), final_samples_s=round(final, 4),
                                     setup_ratio=round(r.setup_s / final, 4),
                                     setup_samples=setup_samples, setup_tokens=setup_tokens)
    return out
