"""Decode speed of the steering methods and of the hook alone, on a random-weight llama GGUF.

Run by tools/gpu-check.sh (CUDA with every layer offloaded, or --cpu here); usable alone:

    python tools/gpu_bench.py --shape 1b --ngl 99 --threads 8 --out bench.json

Two tables, each from one run with interleaved repeats and medians (as fgdilp_cpp/bench.py):
- methods: decode tokens/s of none, tr, fgdilp and fgdilp-frozen through the public API
  (Detoxifier.generate), with each one's ratio to none;
- hook: the engine alone, one sequence, greedy decode, in four contexts of one model: no eval
  callback; the hook installed but idle (asks for no node); the hook asking for every layer's
  kqv_out and copying one row to host (no edit); the same plus one edited row written back.
  Their ratios to no hook are what the hook itself costs, apart from any steering arithmetic.

Timing needs no trained weights, so the model is random: F16 matrices cut from one pool of
normal values (one buffer, views per tensor, written as they are made), F32 norms.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

PROMPT = "The ill-fated tale of Phoneys, the stupid"
METHODS = ("none", "tr", "fgdilp", "fgdilp-frozen")
HOOK_VARIANTS = ("no_hook", "hook_idle", "hook_ask", "hook_edit")


# The tiny SentencePiece-style vocabulary of the test models (tests/tiny_model.py), copied so that a
# tool imports nothing from tests/ (tests/test_packaging.py holds the two copies equal): llama.cpp's
# SPM tokenizer reaches a multi-character piece only through merges whose intermediate pieces all
# exist, hence the prefix chains; anything else falls back to the <0xXX> byte tokens.
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
_SPACE = "\u2581"
_NORMAL_PIECES: list[str] = (
    [_SPACE] + list("abcdefghijklmnopqrstuvwxyz") + list("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    + list("0123456789") + list(".,:;!?'\"-()")
    + ["th", "he", "the", "in", "an", "er", "on", "at", "en", "re", "is", "or",
       _SPACE + "t", _SPACE + "th", _SPACE + "the", _SPACE + "a", _SPACE + "an", _SPACE + "and",
       _SPACE + "i", _SPACE + "in", _SPACE + "is", _SPACE + "o", _SPACE + "of", _SPACE + "on",
       _SPACE + "w", _SPACE + "wh", _SPACE + "whe", _SPACE + "wher", _SPACE + "where",
       _SPACE + "c", _SPACE + "ca", _SPACE + "cap", "it", "al",
       _SPACE + "P", _SPACE + "Pa", _SPACE + "Par", _SPACE + "Pari", _SPACE + "Paris",
       _SPACE + "F", _SPACE + "Fr", "ra", "nc", "ce",
       _SPACE + "y", _SPACE + "ye", _SPACE + "yes", _SPACE + "n", _SPACE + "no", _SPACE + _SPACE]
)


def tokenizer_vocab() -> tuple[list[str], list[float], list[int]]:
    """(tokens, scores, token_types): <unk> <s> </s>, the 256 byte tokens, then the normal pieces."""
    import gguf

    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + _NORMAL_PIECES
    scores = [0.0] * 259 + [float(-1000.0 + 10.0 * len(p) - 0.001 * i) for i, p in enumerate(_NORMAL_PIECES)]
    types = ([int(gguf.TokenType.UNKNOWN)] + [int(gguf.TokenType.CONTROL)] * 2 + [int(gguf.TokenType.BYTE)] * 256
             + [int(gguf.TokenType.NORMAL)] * len(_NORMAL_PIECES))
    return tokens, scores, types


@dataclass(frozen=True)
class Shape:
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_vocab: int

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def n_params(self) -> int:
        hd = self.head_dim
        attn = self.n_embd * hd * (2 * self.n_head + 2 * self.n_head_kv)
        per_layer = attn + 3 * self.n_embd * self.n_ff + 2 * self.n_embd
        return self.n_layer * per_layer + 2 * self.n_vocab * self.n_embd + self.n_embd


SHAPES = {
    # a ~1.1B-parameter llama (TinyLlama-1.1B's shape): 2.2 GB in F16
    "1b": Shape(n_layer=16, n_embd=2048, n_head=32, n_head_kv=8, n_ff=8192, n_vocab=32000),
    # a ~3.0B-parameter llama (Llama-3.2-3B's layers and widths, this vocabulary): 3.2 GB in Q8_0
    "3b": Shape(n_layer=28, n_embd=3072, n_head=24, n_head_kv=8, n_ff=8192, n_vocab=32000),
    # ~33M parameters: tools/gpu-check.sh --cpu
    "small": Shape(n_layer=8, n_embd=512, n_head=8, n_head_kv=4, n_ff=1536, n_vocab=8000),
    # seconds on two CPU threads (tools/gpu-check.sh --cpu --quick)
    "quick": Shape(n_layer=4, n_embd=256, n_head=8, n_head_kv=4, n_ff=512, n_vocab=512),
}


def greedy_step_seconds(ctx, batch, prompt: list[int], n: int) -> float:
    """Prefill `prompt` in `ctx`, then n timed greedy steps of one row: seconds per step (a planned
    hook that misses a layer raises in decode). Shared with tools/rpc_bench.py."""
    ctx.clear()
    batch.clear()
    for i, tok in enumerate(prompt):
        batch.add(tok, i, 0, i == len(prompt) - 1)
    ctx.decode(batch)
    tok, pos = int(np.argmax(ctx.logits(batch.n - 1))), len(prompt)
    t0 = time.perf_counter()
    for _ in range(n):
        batch.clear()
        batch.add(tok, pos, 0, True)
        ctx.decode(batch)
        tok, pos = int(np.argmax(ctx.logits(0))), pos + 1
    return (time.perf_counter() - t0) / n


def build_random_llama(path: Path, shape: Shape, seed: int = 0, q8_0: bool = False) -> dict:
    """Write a random-weight llama GGUF (matrices F16, or Q8_0: half the bytes, as laptops run
    models); returns what was built and how long it took."""
    import gguf

    t0 = time.perf_counter()
    tokens, scores, types = tokenizer_vocab()
    if shape.n_vocab < len(tokens):
        raise ValueError(f"n_vocab {shape.n_vocab} is below the {len(tokens)} tokens of the base vocabulary")
    # filler pieces (plain text, never merged into: lowest score) make the output layer as wide
    # as a real model's; generated text holding them tokenizes back into letters and digits
    for i in range(shape.n_vocab - len(tokens)):
        tokens.append(f"\u2581w{i}")
        scores.append(-1e4)
        types.append(int(gguf.TokenType.NORMAL))

    E, hd = shape.n_embd, shape.head_dim
    matrices: list[tuple[str, tuple[int, int]]] = [("token_embd.weight", (shape.n_vocab, E))]
    norms: list[str] = []
    for il in range(shape.n_layer):
        p = f"blk.{il}."
        matrices += [(p + "attn_q.weight", (shape.n_head * hd, E)), (p + "attn_k.weight", (shape.n_head_kv * hd, E)),
                     (p + "attn_v.weight", (shape.n_head_kv * hd, E)), (p + "attn_output.weight", (E, shape.n_head * hd)),
                     (p + "ffn_gate.weight", (shape.n_ff, E)), (p + "ffn_up.weight", (shape.n_ff, E)),
                     (p + "ffn_down.weight", (E, shape.n_ff))]
        norms += [p + "attn_norm.weight", p + "ffn_norm.weight"]
    norms.append("output_norm.weight")
    matrices.append(("output.weight", (shape.n_vocab, E)))

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("random-llama-bench")
    w.add_file_type(int(gguf.LlamaFileType.MOSTLY_Q8_0 if q8_0 else gguf.LlamaFileType.MOSTLY_F16))
    w.add_context_length(4096)
    w.add_embedding_length(E)
    w.add_block_count(shape.n_layer)
    w.add_feed_forward_length(shape.n_ff)
    w.add_head_count(shape.n_head)
    w.add_head_count_kv(shape.n_head_kv)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_rope_dimension_count(hd)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(UNK_ID)
    w.add_bos_token_id(BOS_ID)
    w.add_eos_token_id(EOS_ID)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)

    largest = max(a * b for _, (a, b) in matrices)
    rng = np.random.default_rng(seed)
    # one pool, a little longer than the largest matrix: every matrix is a view at a random offset
    pool = _q8_0_pool(rng, largest // 32 + 2048) if q8_0 else \
        (rng.standard_normal(largest + 65536, dtype=np.float32) * 0.02).astype(np.float16)
    norm = np.ones(E, np.float32)
    for name, (a, b) in matrices:
        if q8_0:
            w.add_tensor_info(name, (a, b // 32 * 34), np.dtype(np.uint8), a * b // 32 * 34,
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor_info(name, (a, b), np.dtype(np.float16), a * b * 2)
    for name in norms:
        w.add_tensor_info(name, (E,), np.dtype(np.float32), E * 4)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, (a, b) in matrices:
        if q8_0:                 # whole blocks of 34 bytes: an f16 scale, then 32 int8 values
            n = a * b // 32
            off = int(rng.integers(0, pool.shape[0] - n + 1))
            m = pool[off:off + n].reshape(a, b // 32 * 34)
        else:
            off = int(rng.integers(0, pool.size - a * b + 1))
            m = pool[off:off + a * b].reshape(a, b)
        if name == "output.weight":
            m = m.copy()
            m[EOS_ID] = 0.0     # end-of-text's logit 0 sits mid-vocabulary, never in the top-k: full length
        w.write_tensor_data(m)
    for _ in norms:
        w.write_tensor_data(norm)
    w.close()
    return {"path": str(path), "shape": asdict(shape), "n_params": shape.n_params(),
            "file_mib": round(path.stat().st_size / 2**20, 1), "build_s": round(time.perf_counter() - t0, 2)}


def _q8_0_pool(rng, n_blocks: int) -> np.ndarray:
    """[n_blocks, 34] bytes of Q8_0 blocks whose values are about N(0, 0.02) (uniform int8 times a scale)."""
    blocks = np.empty((n_blocks, 34), np.uint8)
    blocks[:, :2] = np.frombuffer(np.float16(0.02 * np.sqrt(3) / 127).tobytes() * n_blocks, np.uint8).reshape(-1, 2)
    blocks[:, 2:] = rng.integers(-127, 128, size=(n_blocks, 32), dtype=np.int8).view(np.uint8)
    return blocks


def _median_table(runs: dict[str, list[float]], base: str, key: str) -> dict:
    ref = statistics.median(runs[base])
    out = {}
    for name, xs in runs.items():
        med = statistics.median(xs)
        out[name] = {"tokens_per_s": round(med, 3), key: round(med / ref, 4) if ref > 0 else float("nan"),
                     "runs_tokens_per_s": [round(x, 3) for x in xs]}
    return out


def bench_hook(path: Path, ngl: int, threads: int, n_tokens: int, repeats: int) -> dict:
    """Greedy single-sequence decode in four contexts of one model (see the module docstring)."""
    from fgdilp_cpp.engine import Batch, Context, ContextParams, Model
    from fgdilp_cpp.native import EditSpec, NativeHook

    with contextlib.ExitStack() as stack:
        model = stack.enter_context(Model(path, n_gpu_layers=ngl))
        info = model.info
        prompt = model.tokenize(PROMPT)
        params = ContextParams(n_ctx=len(prompt) + n_tokens + 16, n_batch=max(64, len(prompt)), n_threads=threads)
        hooks = {name: stack.enter_context(NativeHook(info.n_layer, info.n_head, info.head_dim, n_slots=2))
                 for name in HOOK_VARIANTS if name != "no_hook"}
        hooks["hook_ask"].set_plan([(0, 0)])                                # row 0 -> slot 0, every layer
        rng = np.random.default_rng(1)
        hooks["hook_edit"].slots[1] = rng.standard_normal(hooks["hook_edit"].slots[1].shape) * 0.01
        hooks["hook_edit"].set_plan([(0, 0)], [EditSpec(target=0, dir_slot=1)])   # a fixed direction
        # contexts close before their hooks (the stack unwinds in reverse)
        contexts = {name: stack.enter_context(Context(model, params, hook=hooks.get(name))) for name in HOOK_VARIANTS}
        batch = stack.enter_context(Batch(params.n_batch))

        def run(name: str, n: int) -> float:
            return 1.0 / greedy_step_seconds(contexts[name], batch, prompt, n)

        for name in HOOK_VARIANTS:      # warm-up: allocations, and CUDA graphs need two runs
            for _ in range(2 if ngl > 0 else 1):
                run(name, 4)
        runs: dict[str, list[float]] = {name: [] for name in HOOK_VARIANTS}
        for _ in range(repeats):        # interleaved: machine noise hits every variant alike
            for name in HOOK_VARIANTS:
                runs[name].append(run(name, n_tokens))
        edits = hooks["hook_edit"].edits_applied
    table = _median_table(runs, "no_hook", "ratio_vs_no_hook")
    table["hook_edit"]["edits_applied_last_decode"] = edits
    return table


def bench_methods(path: Path, ngl: int, threads: int, n_tokens: int, repeats: int,
                  selfgen_samples: int, selfgen_tokens: int) -> dict:
    """Decode tokens/s of each steering method through the public API."""
    from fgdilp_cpp.api import Detoxifier

    settings = dict(method="none", n_gpu_layers=ngl, threads=threads, ctx_size=512, n_predict=n_tokens,
                    selfgen_samples=selfgen_samples, selfgen_tokens=selfgen_tokens, seed=7)
    runs: dict[str, list[float]] = {m: [] for m in METHODS}
    setup: dict[str, list[float]] = {m: [] for m in METHODS}
    with Detoxifier.from_file(str(path), **settings) as det:
        for m in METHODS:
            det.generate(PROMPT, method=m, n_predict=4)
        for _ in range(repeats):
            for m in METHODS:
                r = det.generate(PROMPT, method=m)
                runs[m].append(r.tokens_per_s)
                setup[m].append(r.setup_s)
    table = _median_table(runs, "none", "ratio_vs_none")
    for m in METHODS:
        table[m]["setup_s"] = round(statistics.median(setup[m]), 4)
    return table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--model", type=Path, help="where the random GGUF is written (reused if it exists)")
    ap.add_argument("--ngl", type=int, default=0, help="layers offloaded (99: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128, help="decode steps per timed run")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--selfgen-samples", type=int, default=8, help="FGDILP setup: self-generated samples")
    ap.add_argument("--selfgen-tokens", type=int, default=12, help="FGDILP setup: tokens per sample")
    ap.add_argument("--parts", default="hook,methods", help="which tables: hook, methods or both")
    ap.add_argument("--out", type=Path, required=True, help="JSON file to write")
    a = ap.parse_args(argv)
    if a.tokens < 1 or a.repeats < 1 or a.threads < 1 or a.ngl < 0:
        ap.error("--tokens, --repeats and --threads must be positive, --ngl 0 or more")
    parts = set(a.parts.split(","))
    if not parts or parts - {"hook", "methods"}:
        ap.error(f"--parts takes hook, methods or hook,methods, not {a.parts!r}")

    shape = SHAPES[a.shape]
    model_path = a.model or Path(f"bench-{a.shape}.gguf")
    if model_path.is_file():
        built = {"path": str(model_path), "shape": asdict(shape), "n_params": shape.n_params(),
                 "file_mib": round(model_path.stat().st_size / 2**20, 1), "build_s": 0.0, "reused": True}
    else:
        model_path.parent.mkdir(parents=True, exist_ok=True)
        built = build_random_llama(model_path, shape)
    print(f"model: {built['n_params'] / 1e9:.2f}B parameters, {built['file_mib']} MiB, built in {built['build_s']} s",
          flush=True)
    out = {"model": built, "n_gpu_layers": a.ngl, "threads": a.threads, "tokens": a.tokens, "repeats": a.repeats,
           "prompt": PROMPT}
    if "hook" in parts:
        t0 = time.perf_counter()
        out["hook"] = bench_hook(model_path, a.ngl, a.threads, a.tokens, a.repeats)
        out["hook_s"] = round(time.perf_counter() - t0, 1)
        # per-token cost of asking for the nodes (splits, synchronisation, one row copied per layer)
        ask = out["hook"]["hook_ask"]["ratio_vs_no_hook"]
        out["hook_overhead_pct"] = round((1 / ask - 1) * 100, 2) if ask > 0 else float("nan")
        print(json.dumps({k: v["tokens_per_s"] for k, v in out["hook"].items()}), flush=True)
    if "methods" in parts:
        t0 = time.perf_counter()
        out["methods"] = bench_methods(model_path, a.ngl, a.threads, a.tokens, a.repeats, a.selfgen_samples,
                                       a.selfgen_tokens)
        out["methods_s"] = round(time.perf_counter() - t0, 1)
        out["fgdilp_setup"] = {"selfgen_samples": a.selfgen_samples, "selfgen_tokens": a.selfgen_tokens}
        print(json.dumps({k: v["tokens_per_s"] for k, v in out["methods"].items()}), flush=True)
    bad = [k for t in ("hook", "methods") if t in out for k, v in out[t].items()
           if not math.isfinite(v["tokens_per_s"]) or v["tokens_per_s"] <= 0]
    a.out.write_text(json.dumps(out, indent=1) + "\n")
    if bad:
        print(f"error: no finite positive speed for {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
