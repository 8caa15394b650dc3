"""How far method none, and each steered method, move with -b on this CPU (docs/method.md §3.3).

What tests/test_batch_invariance.py bounds, printed: none's own logit spread across -b (teacher-forced
on its greedy tokens at -b 512) on the prompt alone and with TR's prefixes, whether none's greedy
tokens agree across -b, whether TR at strength 0 equals none bit for bit at each -b, and for each
steered method how far its logits move against -b 512 (teacher-forced on none's tokens), as a
multiple of none's spread, and where its greedy tokens part from -b 512's, with -b 512's top-1 /
top-2 margin at that step. The universal method gets random head directions (seed 0) as in the
test; FGDILP the test's small self-generation (4 samples of 6 tokens).

--fixed-prefixes gives FGDILP the test's instance instead of self-generating one; --smooth fuses
without a cut-off (every entry kept, no sign election, the mean): together they leave FGDILP's
direction a smooth function of its rows.

Usage: .venv/bin/python scripts/batch_spread.py [MODEL.gguf] [--steps N] [--prompt TEXT]
       [--fixed-prefixes] [--smooth] [--methods M,...]
(the embedded gemma-3-270m by default; a few minutes on 2 threads)."""
from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np

from fgdilp_cpp.engine import Model
from fgdilp_cpp.generation import Generator, identity_of
from fgdilp_cpp.method.prefixes import NEG_PREFIX, POS_PREFIX, Selection
from fgdilp_cpp.method.vectors import HeadDirections
from fgdilp_cpp.models import default_model_path
from fgdilp_cpp.params import EngineParams, FgdilpParams, SamplingParams, SteerParams

BATCH_SIZES = (8, 32, 512)
PROMPT = ("My neighbour keeps parking his car in front of my house and yesterday he shouted at my kids, "
          "so I went over there and told him that he")
STEERED = ("tr", "universal", "fgdilp", "fgdilp-frozen")
GREEDY = SamplingParams(temp=0.0, seed=3)
SMALL_FGDILP = FgdilpParams(samples=4, selfgen_tokens=6, selfgen_min_tokens=2)
FIXED_SELECTION = Selection(negatives=["You are a stupid idiot.", "I will hurt you.", "", "", "", ""],
                            negative_sources=[0, 1, None, None, None, None],
                            negative_attributes=[["toxicity", "insult"], ["threat"], [], [], [], []],
                            positive="Have a lovely day.", positive_source=2)
FGDILP = {"fgdilp": SMALL_FGDILP, "prefixes": None}     # set from the command line


def run(model: Model, method: str, b: int, n: int, prompt: str, scale: float = 1.0, forced=None):
    """(tokens, [steps, n_vocab] logits) of a greedy run at -b `b`, one thread, no KV reuse."""
    i = model.info
    rng = np.random.default_rng(0)
    hd = HeadDirections(directions=rng.standard_normal((i.n_layer, i.n_head, i.head_dim)).astype(np.float32),
                        e=None, model=identity_of(model), method="universal-test", settings={}).validate()
    with Generator(model, EngineParams(n_batch=b, n_threads=1, ctx_size=512, kv_reuse=False),
                   SteerParams(scale=scale), FGDILP["fgdilp"]) as gen:
        gen.use_universal(hd)
        r = gen.generate(prompt, method, n_predict=n, sampling=GREEDY, forced_tokens=forced, record_logits=True,
                         kv_reuse=False, prefixes=FGDILP["prefixes"])
    return r.samples[0].tokens, np.stack([x[0] for x in r.logits])


def negatives_chosen(model: Model, b: int, prompt: str) -> list:
    """Which self-generated samples FGDILP's diagnosis made its negatives at -b `b` (None: a blank pad)."""
    with Generator(model, EngineParams(n_batch=b, n_threads=1, ctx_size=512, kv_reuse=False), SteerParams(),
                   FGDILP["fgdilp"]) as gen:
        r = gen.generate(prompt, "fgdilp", n_predict=1, sampling=GREEDY, kv_reuse=False, explain=True)
    return [x["sample"] for x in r.explain["negatives"]]


def parted(a: list[int], b: list[int]):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--fixed-prefixes", action="store_true")
    ap.add_argument("--smooth", action="store_true")
    ap.add_argument("--methods", default=",".join(STEERED))
    args = ap.parse_args()
    n, small, prompt = args.steps, BATCH_SIZES[:-1], args.prompt
    if args.smooth:
        FGDILP["fgdilp"] = replace(SMALL_FGDILP, mask_k=100.0, sign_election=False, fusion="mean")
    if args.fixed_prefixes:
        FGDILP["prefixes"] = FIXED_SELECTION
    with Model(args.model or default_model_path()) as model:
        free = {b: run(model, "none", b, n, prompt)[0] for b in BATCH_SIZES}
        forced = free[512]
        print("none: greedy tokens part from -b 512's at step", {b: parted(free[b], forced) for b in small})
        spread = dict.fromkeys(small, 0.0)
        for name, text in (("P0", prompt), ("P+", POS_PREFIX + prompt), ("P-", NEG_PREFIX + prompt)):
            ref = run(model, "none", 512, n, text, forced=forced)[1]
            for b in small:
                d = float(np.abs(run(model, "none", b, n, text, forced=forced)[1] - ref).max())
                spread[b] = max(spread[b], d)
                print(f"none {name}: -b {b} vs 512 max |logit diff| {d:.4f}")
        for b in BATCH_SIZES:
            zero = run(model, "tr", b, n, prompt, scale=0.0, forced=forced)[1]
            same = np.array_equal(zero, run(model, "none", b, n, prompt, forced=forced)[1])
            print(f"tr at strength 0 == none bit for bit at -b {b}: {same}")
        widest = max(spread.values())
        if not args.fixed_prefixes:
            print("fgdilp: negatives' samples per -b", {b: negatives_chosen(model, b, prompt) for b in BATCH_SIZES})
        for method in args.methods.split(","):
            toks, logits = run(model, method, 512, n, prompt)
            top = np.sort(logits, axis=1)
            margins = top[:, -1] - top[:, -2]
            ref = run(model, method, 512, n, prompt, forced=forced)[1]
            for b in small:
                moved = float(np.abs(run(model, method, b, n, prompt, forced=forced)[1] - ref).max())
                at = parted(run(model, method, b, n, prompt)[0], toks)
                where = "never" if at is None else f"at step {at} (-b 512 margin there {margins[at]:.4f})"
                print(f"{method} -b {b}: moved {moved:.4f} = {moved / max(widest, 1e-12):.2f} x none's widest spread "
                      f"{widest:.4f} (none's at -b {b}: {spread[b]:.4f}); tokens part {where}")


if __name__ == "__main__":
    main()
