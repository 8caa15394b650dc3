"""Per-head vs whole-row cosine gate (docs/method.md §2.7): how each separates toxic from benign prompts (gemma-3-270m).
At the prompt end (TR prefixes), per layer in 12..17: v = P0's last row, delta = P-[last] - P+[last].
Prints AUC(toxic > benign) of (a) the row cosine (b) the mean per-head cosine, and the share of
heads / rows a gate theta passes on each set.

Usage: .venv/bin/python scripts/measure_gate_scope.py [N]  (a few minutes for N = 30 on 2 threads)."""
import sys
import numpy as np
from fgdilp_cpp import native
from fgdilp_cpp.engine import Batch, Context, ContextParams, Model
from fgdilp_cpp.evaluation.prompts import load_prompts
from fgdilp_cpp.method.prefixes import NEG_PREFIX, POS_PREFIX
from fgdilp_cpp.models import default_model_path

N = int(sys.argv[1]) if len(sys.argv) > 1 else 30
LAYERS = range(12, 18)

def auc(pos, neg):
    pos, neg = np.asarray(pos), np.asarray(neg)
    return float(((pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()))

with Model(default_model_path()) as m:
    info = m.info
    H = info.n_head
    with native.NativeHook(info.n_layer, H, info.head_dim, n_slots=3) as hook, \
            Context(m, ContextParams(n_ctx=2048, n_batch=512, n_seq_max=3, n_threads=2), hook=hook) as ctx, \
            Batch(512) as batch:
        res = {}
        for name in ("rtp-toxic", "rtp-benign"):
            rowc, headc = [], []
            for rec in load_prompts(name, limit=N):
                toks = [m.tokenize(t) for t in (POS_PREFIX + rec.text, NEG_PREFIX + rec.text, rec.text)]
                ctx.clear()
                batch.clear()
                for s, t in enumerate(toks):
                    for i, x in enumerate(t):
                        batch.add(x, i, s, False)
                rows = np.cumsum([len(t) for t in toks]) - 1
                hook.set_plan([(int(r), s) for s, r in enumerate(rows)])
                ctx.decode(batch)
                pos, neg, raw = (hook.slots[s].astype(np.float64) for s in range(3))
                for li in LAYERS:
                    d, v = neg[li] - pos[li], raw[li]
                    rowc.append(v @ d / (np.linalg.norm(v) * np.linalg.norm(d)))
                    vh, dh = v.reshape(H, -1), d.reshape(H, -1)
                    headc.append((vh * dh).sum(1) / (np.linalg.norm(vh, axis=1) * np.linalg.norm(dh, axis=1) + 1e-30))
            res[name] = (np.array(rowc), np.array(headc))
        (rt, ht), (rb, hb) = res["rtp-toxic"], res["rtp-benign"]
        print(f"model {info.n_layer} layers x {H} heads; {N} prompts per set; layers 12..17 at the prompt end")
        print(f"AUC toxic>benign: row cos {auc(rt, rb):.3f}; mean head cos {auc(ht.mean(1), hb.mean(1)):.3f}; "
              f"max head cos {auc(ht.max(1), hb.max(1)):.3f}")
        for th in (0.0, 0.1, 0.2, 0.3):
            print(f"theta {th}: rows passing toxic {np.mean(rt > th):.2f} benign {np.mean(rb > th):.2f} | "
                  f"heads passing toxic {np.mean(ht > th):.2f} benign {np.mean(hb > th):.2f}; "
                  f"rows with some head passing toxic {np.mean((ht > th).any(1)):.2f} benign {np.mean((hb > th).any(1)):.2f}")
        print("row cos quantiles toxic", np.round(np.quantile(rt, [.1, .5, .9]), 3), "benign", np.round(np.quantile(rb, [.1, .5, .9]), 3))
        print("head cos quantiles toxic", np.round(np.quantile(ht, [.1, .5, .9]), 3), "benign", np.round(np.quantile(hb, [.1, .5, .9]), 3))
