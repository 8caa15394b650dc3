"""How long the fast setup (fgdilp_cpp/autosetup) takes per model shape: the embedded models and
random-weight llamas of about 1B and 3B parameters built on the spot (tools/gpu_bench.py's shapes,
Q8_0; speed only: a random model has no notion of toxicity, so its choice means nothing). Prints one
JSON object per shape: seconds for the directions and for the scored points, and the tokens of each.

    python tools/setup_scaling.py --shapes gemma,smollm2,1b,3b --work DIR [-t 2] [--fraction 0.25]

--fraction scales the directions' texts down (their cost is forward passes over a fixed number of
tokens, so it is linear in them) and reports the full-size time as the directions' seconds /
fraction plus the scored points' seconds, beside what it measured; the points are always scored on
the full criterion texts (fewer leave the benign group empty, which the setup refuses); 1 measures
the full setup.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))


def direction_tokens(det, sizes) -> int:
    """Tokens the directions phase decodes: each labelled text (at most MEAN_TOKENS) once, and each
    norm prompt under TR's three roles."""
    from fgdilp_cpp.autosetup.grid import CRITERION_OFFSET, DIRECTION_OFFSET
    from fgdilp_cpp.evaluation.prompts import load_prompts
    from fgdilp_cpp.universal import MEAN_TOKENS, labelled_records

    pool = load_prompts("rtp-toxic", CRITERION_OFFSET - DIRECTION_OFFSET, DIRECTION_OFFSET)
    records, _, _ = labelled_records(pool, sizes.direction_per_class)
    texts = sum(min(len(det.model.tokenize(r.continuation)), MEAN_TOKENS) for r in records)
    prompts = sum(len(det.model.tokenize(r.text)) for r in pool[:sizes.norm_prompts])
    return texts + 3 * prompts


def run(shape: str, work: Path, threads: int, fraction: float) -> dict:
    from memory_bench import model_path

    from fgdilp_cpp import Detoxifier
    from fgdilp_cpp.autosetup.setup import Sizes, fast_setup

    path, built = model_path(shape, work)
    full = Sizes()
    sizes = dataclasses.replace(full, direction_per_class=max(8, round(full.direction_per_class * fraction)),
                                norm_prompts=max(2, round(full.norm_prompts * fraction)))
    marks: dict[str, float] = {}

    def progress(stage: str, done: int, total: int) -> None:
        marks.setdefault(stage, time.perf_counter())
        if done == total:
            marks[stage + "_end"] = time.perf_counter()

    with Detoxifier.from_file(path, threads=threads, profile=False, auto_setup=False) as det:
        t0 = time.perf_counter()
        res = fast_setup(det, progress, sizes=sizes)
        total = time.perf_counter() - t0
        # the directions' end, not the points' start: the unsteered pass over the criterion texts
        # comes between them and does not scale with --fraction
        dirs_s = marks.get("directions_end", marks.get("points", t0)) - t0
        out = {"shape": shape, "model": Path(path).name, "n_params": det.model.info.n_params, "threads": threads,
               "fraction": fraction, "sizes": dataclasses.asdict(sizes),
               "directions_tokens": direction_tokens(det, sizes), "directions_s": round(dirs_s, 1),
               "points_tokens": res.tokens, "points_s": round(total - dirs_s, 1), "total_s": round(total, 1),
               "full_size_estimate_s": round(dirs_s / fraction + (total - dirs_s), 1), **({"built": built} if built else {})}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="gemma,smollm2,1b,3b")
    ap.add_argument("--work", default=None, help="where the random-weight models are built (kept for reruns)")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--fraction", type=float, default=1.0)
    a = ap.parse_args(argv)
    work = Path(a.work or tempfile.mkdtemp(prefix="fgdilp-setup-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("FGDILP_PROFILE_PATH", str(work / "profiles"))    # never the user's profiles
    for shape in a.shapes.split(","):
        print(json.dumps(run(shape, work, a.threads, a.fraction)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
