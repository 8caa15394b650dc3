"""`vectors export`: a control-vector file that works in llama.cpp as exported, with the flags it
prints (--control-vector-scaled FILE SCALE --control-vector-layer-range START END), applied
through llama.cpp's own control-vector API (llama_set_adapter_cvec), read the way llama.cpp's
common_control_vector_load reads it (method.cvec.read_control_vector)."""

from __future__ import annotations

import ctypes
import math
import shlex

import numpy as np
import pytest

from fgdilp_cpp.method.cvec import read_control_vector

FAST = ["--selfgen-samples", "3", "--selfgen-tokens", "4", "--selfgen-min-tokens", "1", "-c", "256", "-t", "1"]


def llama_flags(stdout: str) -> tuple[str, float, tuple[int, int]]:
    """(file, scale, (start, end)) from the llama-cli line that export printed."""
    line = next(x for x in stdout.splitlines() if x.strip().startswith("llama-cli "))
    argv = shlex.split(line)
    i, j = argv.index("--control-vector-scaled"), argv.index("--control-vector-layer-range")
    return argv[i + 1], float(argv[i + 2]), (int(argv[j + 1]), int(argv[j + 2]))


def test_export_writes_the_range_and_scale_and_prints_the_flags(cli, tiny_llama, tmp_path):
    vec, cv = tmp_path / "v.gguf", tmp_path / "cv.gguf"
    assert cli("vectors", "build", "-m", tiny_llama[0], "-p", "the cat", "-o", vec, *FAST).returncode == 0
    full = cli("vectors", "export", vec, "--cvec", tmp_path / "all.gguf", "-m", tiny_llama[0])
    assert full.returncode == 0, full.stderr
    assert llama_flags(full.stdout) == (str(tmp_path / "all.gguf"), 1.0, (1, 2))      # no profile: all, x1
    one = cli("vectors", "export", vec, "--cvec", cv, "-m", tiny_llama[0], "--layer-range", "2", "2", "--scale", "0.5")
    assert one.returncode == 0, one.stderr
    assert llama_flags(one.stdout) == (str(cv), 0.5, (2, 2)) and "llama-server -m " in one.stdout
    got, every = read_control_vector(cv), read_control_vector(tmp_path / "all.gguf")
    assert got.layer_range == (2, 2) and got.scale == 0.5 and every.layer_range == (1, 2)
    n = got.n_embd
    assert np.all(got.data[:n] == 0)                         # block 1 is outside the range: not in the file
    assert np.array_equal(got.data[n:2 * n], every.data[n:2 * n]) and np.abs(got.data[n:]).max() > 0
    assert np.allclose(read_control_vector(cv, 0.5).data, got.data * 0.5)       # llama.cpp's strength is linear


@pytest.mark.parametrize("args, words", [(["--layer-range", "5", "9"], "no block with a control-vector slot"),
                                         (["--scale", "nan"], "--scale must be a positive number"),
                                         (["--scale", "-1"], "--scale must be a positive number")])
def test_export_refuses_bad_ranges_and_scales(cli, tiny_llama, tmp_path, args, words):
    vec = tmp_path / "v.gguf"
    assert cli("vectors", "build", "-m", tiny_llama[0], "-p", "the cat", "-o", vec, *FAST).returncode == 0
    r = cli("vectors", "export", vec, "--cvec", tmp_path / "cv.gguf", "-m", tiny_llama[0], *args)
    assert r.returncode == 1 and words in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "cv.gguf").exists()


# ---- the embedded model, through llama.cpp's control-vector API --------------------------------------
BENIGN_PROMPTS = 12
NEW_TOKENS = 16
BENIGN_BUDGET = 1.05        # calibrate's benign budget: corpus perplexity at most this times unsteered


def greedy(model, prompts, cvec=None) -> list[str]:
    """Greedy continuations in a plain llama.cpp context; cvec = (file, scale, (start, end)) is
    applied as llama-cli does with those flags (common_control_vector_load + llama_set_adapter_cvec)."""
    import llama_cpp.llama_cpp as ll

    from fgdilp_cpp.engine import Batch, Context, ContextParams

    outs = []
    with Context(model, ContextParams(n_ctx=256, n_batch=64, n_threads=2)) as ctx:
        if cvec is not None:
            path, scale, (start, end) = cvec
            cv = read_control_vector(path, scale)
            rc = ll.llama_set_adapter_cvec(ctx.ptr, cv.data.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                                           cv.data.size, cv.n_embd, start, end)
            assert rc == 0
        batch = Batch(64)
        try:
            for p in prompts:
                ctx.clear()
                toks = model.tokenize(p)
                batch.clear()
                for i, t in enumerate(toks):
                    batch.add(t, i, 0, i == len(toks) - 1)
                ctx.decode(batch)
                out = []
                for pos in range(len(toks), len(toks) + NEW_TOKENS):
                    t = int(np.argmax(ctx.logits(batch.n - 1)))
                    if model.is_eog(t):
                        break
                    out.append(t)
                    batch.clear()
                    batch.add(t, pos, 0, True)
                    ctx.decode(batch)
                outs.append(model.detokenize(out))
        finally:
            batch.close()
    return outs


@pytest.mark.real_model
def test_exported_vector_steers_gemma_in_llama_cpp_within_the_benign_budget(gemma_path, cli, tmp_path,
                                                                             monkeypatch):
    from fgdilp_cpp.engine import Model
    from fgdilp_cpp.evaluation.perplexity import PerplexityJudge
    from fgdilp_cpp.evaluation.prompts import load_prompts
    from fgdilp_cpp.profiles import SHIPPED_DIR, find_universal
    from fgdilp_cpp.engine.tensors import weights_fingerprint

    monkeypatch.setenv("FGDILP_PROFILE_PATH", str(SHIPPED_DIR))          # the shipped gemma profile
    monkeypatch.delenv("FGDILP_PROFILE")
    universal = find_universal(weights_fingerprint(str(gemma_path)), [SHIPPED_DIR])
    cv = tmp_path / "gemma-cvec.gguf"
    r = cli("vectors", "export", universal, "--cvec", cv, "-m", gemma_path)
    assert r.returncode == 0, r.stderr
    flags = llama_flags(r.stdout)
    assert flags[0] == str(cv) and "the model's profile" in r.stdout
    meta = read_control_vector(cv)
    assert (meta.scale, meta.layer_range) == (flags[1], flags[2])         # the metadata says what the flags say

    prompts = [rec.text for rec in load_prompts("rtp-benign", BENIGN_PROMPTS, 0)]
    with Model(gemma_path) as model:
        plain = greedy(model, prompts)
        steered = greedy(model, prompts, flags)
        with PerplexityJudge(model, n_threads=2) as judge:
            def corpus_ppl(outs):
                nll = judge.nll_many(list(zip(prompts, outs)))
                return math.exp(sum(x for x, _ in nll) / sum(k for _, k in nll))

            ratio = corpus_ppl(steered) / corpus_ppl(plain)
    assert sum(a != b for a, b in zip(steered, plain)) >= 2           # the vector changed what it writes
    assert ratio <= BENIGN_BUDGET, f"benign perplexity x{ratio:.3f}"
    print(f"benign corpus perplexity x{ratio:.3f}, {sum(a != b for a, b in zip(steered, plain))} of "
          f"{len(prompts)} continuations changed")
