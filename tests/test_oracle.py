"""Exact checks against a plain-torch forward of the same tiny random weights.

1. Captured kqv_out rows (several positions, several sequences in one batch) equal the torch
   per-head attention outputs before W_O.
2. TR-steered P0 logits over several tokens equal a torch reference of docs/method.md §2 run
   literally: two passes per step (P+ and P- read, then P0 edited), which §3 turns into one decode.
3. P+ and P- logits are bit-identical with steering on and off; P0 logits differ.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fgdilp_cpp.engine import Batch, Context, ContextParams
from fgdilp_cpp.generation import EngineParams, Generator, SteerParams
from fgdilp_cpp.method.prefixes import NEG_PREFIX, POS_PREFIX, prefixed
from fgdilp_cpp.native import NativeHook

F32_CACHE = dict(type_k="f32", type_v="f32")
PROMPT = "the cat sat on a mat"
FORCED = [70, 81, 90, 77, 100]   # byte-fallback and letter tokens of the tiny vocabulary


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-6))


# flash attention on CPU accumulates in F16: a looser bound, still far below any real difference
@pytest.mark.parametrize("flash_attn, tol", [("off", 1e-4), ("on", 2e-2)])
def test_captured_rows_equal_torch(model, torch_model, flash_attn, tol):
    info = model.info
    seqs = [model.tokenize("hello world"), model.tokenize("a b"), model.tokenize("the end: of it")]
    rows = [(s, i) for s, toks in enumerate(seqs) for i in range(len(toks))]
    n_rows = len(rows)
    with NativeHook(info.n_layer, info.n_head, info.head_dim, n_slots=n_rows + len(seqs)) as hook, \
            Context(model, ContextParams(n_ctx=256, n_batch=64, n_seq_max=3, flash_attn=flash_attn,
                                         **F32_CACHE), hook=hook) as ctx, Batch(64) as batch:
        # one decode: all tokens of all three sequences, interleaved row order
        order = sorted(range(n_rows), key=lambda r: (rows[r][1], rows[r][0]))
        for r in order:
            s, i = rows[r]
            batch.add(seqs[s][i], i, s, False)
        hook.set_plan([(row, slot) for slot, row in enumerate(range(n_rows))])
        ctx.decode(batch)
        assert hook.fired_layers == info.n_layer
        got = hook.slots[:n_rows].copy()           # [row, n_layer, width] in batch-row order
        # a second decode continues each sequence by one token (reads the KV cache)
        batch.clear()
        for s in range(3):
            batch.add(FORCED[s], len(seqs[s]), s, False)
        hook.set_plan([(s, n_rows + s) for s in range(3)])
        ctx.decode(batch)
        nxt = hook.slots[n_rows:].copy()

    for s, toks in enumerate(seqs):
        state = torch_model.new_state()
        _, heads = torch_model.forward(state, toks)                     # per layer [n_tok, width]
        _, heads2 = torch_model.forward(state, [FORCED[s]])
        for li in range(info.n_layer):
            for i in range(len(toks)):
                row = order.index(rows.index((s, i)))
                assert rel_err(got[row, li], heads[li][i]) < tol, (s, i, li)
            assert rel_err(nxt[s, li], heads2[li][0]) < tol, (s, li)


# ---- TR, literally, in torch -------------------------------------------------------------------
def torch_tr_edit(v, delta, e, n_head, a, b, scale, renorm=True):
    """docs/method.md §2.2-2.3 for one row, written out in torch independently of the numpy reference."""
    vh, dh, eh = v.view(n_head, -1), delta.view(n_head, -1), e.view(n_head, -1)
    out = []
    for h in range(n_head):
        lam_norm = (1 + torch.linalg.norm(dh[h])) ** a
        cos = torch.nn.functional.cosine_similarity(vh[h], eh[h], dim=0)
        lam_sim = (1 + torch.clamp(cos, min=0)) ** b
        out.append(vh[h] - scale * lam_norm * lam_sim * dh[h])
    new = torch.cat(out)
    if renorm:
        new = new * (torch.linalg.norm(v) / torch.linalg.norm(new))
    return new


def torch_tr_logits(tm, pos_toks, neg_toks, raw_toks, colon, forced, n_head, a, b, scale):
    """Two passes per step: (1) P+ and P- forward, read their last rows; (2) P0 forward with its
    last row edited at every layer. Returns P0's logits before each forced token and after the last."""
    sp, sn, s0 = tm.new_state(), tm.new_state(), tm.new_state()
    e = None
    out = []
    feeds = [(pos_toks, neg_toks, raw_toks)] + [([t], [t], [t]) for t in forced]
    for fp, fn, f0 in feeds:
        _, hp = tm.forward(sp, fp)
        _, hn = tm.forward(sn, fn)
        if e is None:
            e = [torch.as_tensor(hn[li][colon], dtype=torch.float64) for li in range(len(hn))]
        deltas = [torch.as_tensor(hn[li][-1] - hp[li][-1], dtype=torch.float64) for li in range(len(hn))]

        def edit(li, attn, deltas=deltas):
            attn = attn.clone()
            attn[-1] = torch_tr_edit(attn[-1], deltas[li], e[li], n_head, a, b, scale)
            return attn

        logits, _ = tm.forward(s0, f0, edit=edit)
        out.append(np.asarray(logits[-1]))
    return out


@pytest.mark.parametrize("a, b, scale", [(0.4, 0.6, 1.0), (0.1, 0.2, 2.5)])
def test_tr_logits_equal_torch_two_pass_reference(model, torch_model, a, b, scale):
    info = model.info
    steer = SteerParams(exp_norm=a, exp_sim=b, scale=scale)
    with Generator(model, EngineParams(ctx_size=256, flash_attn="off", **F32_CACHE), steer) as gen:
        res = gen.generate(PROMPT, "tr", n_predict=len(FORCED), forced_tokens=FORCED, record_logits=True)
        plain = gen.generate(PROMPT, "none", n_predict=len(FORCED), forced_tokens=FORCED, record_logits=True)
    assert res.fired_layers == info.n_layer
    tok = lambda text: model.tokenize(text)  # noqa: E731
    pos = prefixed(tok, model.token_bytes, POS_PREFIX, PROMPT)
    neg = prefixed(tok, model.token_bytes, NEG_PREFIX, PROMPT)
    ref = torch_tr_logits(torch_model, pos.tokens, neg.tokens, model.tokenize(PROMPT), neg.colon_index,
                          FORCED, info.n_head, a, b, scale)
    assert len(res.logits) == len(ref) == len(FORCED) + 1
    for step, (got, want, unsteered) in enumerate(zip(res.logits, ref, plain.logits)):
        assert rel_err(got[0], want) < 1e-4, step
        # the steering is not negligible: an unsteered run is far from the reference
        assert rel_err(unsteered[0], want) > 1e-2, step


def test_pos_neg_rows_untouched_raw_row_changed(model):
    def run(scale):
        with Generator(model, EngineParams(ctx_size=256), SteerParams(scale=scale)) as gen:
            return gen.generate(PROMPT, "tr", n_predict=len(FORCED), forced_tokens=FORCED,
                                record_logits=True, logits_all=True)

    on, off = run(1.0), run(0.0)
    assert on.fired_layers == off.fired_layers == model.info.n_layer
    for step, (a, b) in enumerate(zip(on.logits, off.logits)):   # rows: P+, P-, P0
        assert np.array_equal(a[0], b[0]), f"P+ changed at step {step}"
        assert np.array_equal(a[1], b[1]), f"P- changed at step {step}"
        assert not np.allclose(a[2], b[2], atol=1e-3), f"P0 not steered at step {step}"


def test_tr_reply_contrast_equals_torch(model, torch_model):
    """--contrast reply: P+ and P- are the prefixes up to their ':' and the prompt's last token, the
    reply's tokens follow them; P0 is the prompt as before. The same two-pass torch reference,
    other sequences."""
    info = model.info
    steer = SteerParams(contrast="reply")
    with Generator(model, EngineParams(ctx_size=256, flash_attn="off", **F32_CACHE), steer) as gen:
        res = gen.generate(PROMPT, "tr", n_predict=len(FORCED), forced_tokens=FORCED, record_logits=True,
                           explain=True)
        plain = gen.generate(PROMPT, "none", n_predict=len(FORCED), forced_tokens=FORCED, record_logits=True)
        gen.set_steer(SteerParams())
        full = gen.generate(PROMPT, "tr", n_predict=len(FORCED), forced_tokens=FORCED, record_logits=True)
    assert res.fired_layers == info.n_layer
    assert res.explain["edit"]["contrast"] == "reply"
    raw = model.tokenize(PROMPT)
    pos, neg = model.tokenize(POS_PREFIX.rstrip()) + raw[-1:], model.tokenize(NEG_PREFIX.rstrip()) + raw[-1:]
    assert model.detokenize(neg[-2:-1]).endswith(":") and PROMPT not in model.detokenize(neg)
    ref = torch_tr_logits(torch_model, pos, neg, raw, len(neg) - 2, FORCED,
                          info.n_head, 0.4, 0.6, 1.0)
    for step, (got, want, paper, unsteered) in enumerate(zip(res.logits, ref, full.logits, plain.logits)):
        assert rel_err(got[0], want) < 1e-4, step
        assert rel_err(paper[0], want) > 1e-3, step     # not the prompt-contrast TR
        assert rel_err(unsteered[0], want) > 1e-2, step  # and the steering is not negligible
