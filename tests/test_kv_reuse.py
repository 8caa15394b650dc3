"""KV reuse across generations (docs/method.md §9): a conversation whose earlier tokens stay in the
KV cells gives the logits of a full re-prefill, for every method that keeps sequences."""

from __future__ import annotations

import numpy as np
import pytest

from fgdilp_cpp.engine import Model
from fgdilp_cpp.generation import Generator
from fgdilp_cpp.params import EngineParams, FgdilpParams, SamplingParams
from fgdilp_cpp.plans import SLOT_COLON

SYSTEM = "<|im_start|>system\nbe kind<|im_end|>\n"


def turn(user: str, reply: str = "") -> str:
    return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n{reply}" + ("<|im_end|>\n" if reply else "")


# a conversation as the chat renders it: each prompt extends the one before, then history is
# trimmed (the first turn dropped), then cleared (a new conversation)
FIRST = SYSTEM + turn("the cat sat on a mat")
SECOND = SYSTEM + turn("the cat sat on a mat", "a dog ran by the door") + turn("and then what happened")
THIRD = SECOND + "it was late" + "<|im_end|>\n" + turn("tell me more about the dog")
TRIMMED = SYSTEM + turn("tell me more about the dog")
CLEARED = turn("a new talk about birds")
FORCED = [5, 9, 14, 3]


@pytest.fixture(scope="module")
def chat_model(tiny_chat):
    with Model(tiny_chat) as m:
        yield m


def generators(model, **kw):
    engine = dict(ctx_size=512, n_threads=1)
    fg = FgdilpParams(samples=3, selfgen_tokens=4, selfgen_min_tokens=1, negatives=2)
    return (Generator(model, EngineParams(kv_reuse=True, **engine), fgdilp=fg, **kw),
            Generator(model, EngineParams(kv_reuse=False, **engine), fgdilp=fg, **kw))


def assert_close(a, b):
    """Equal within the engine's own float noise: the same prompt decoded in other batch sizes
    (-b 512 vs 16, no reuse) already differs by up to ~0.05 on this model's logits (|x| ~ 10);
    stale or misplaced KV differs by whole units."""
    diff = np.abs(a - b)
    assert diff.max() < 0.06 and diff.mean() < 5e-3, (diff.max(), diff.mean())


def logits_of(gen, prompt, method, **kw):
    r = gen.generate(prompt, method, n_predict=len(FORCED), forced_tokens=FORCED, record_logits=True,
                     logits_all=True, special=True, **kw)
    return r, np.stack(r.logits)


def assert_same_conversation(reuse, full, method, **kw):
    reused = []
    for prompt in (FIRST, SECOND, THIRD, TRIMMED, CLEARED, SECOND):
        a, la = logits_of(reuse, prompt, method, **kw)
        b, lb = logits_of(full, prompt, method, **kw)
        assert b.n_reused_tokens == 0
        assert_close(la, lb)
        assert a.explain.keys() == b.explain.keys()
        if "delta_norms" in a.explain:
            np.testing.assert_allclose(a.explain["delta_norms"], b.explain["delta_norms"], rtol=1e-2, atol=1e-3)
        reused.append(a.n_reused_tokens)
    # SECOND keeps FIRST up to its reply, THIRD keeps more of SECOND, TRIMMED keeps the system
    # turn only, CLEARED less still, and SECOND after it starts again near the beginning
    assert reused[0] == 0 and 0 < reused[1] < reused[2] and reused[3] < reused[1] and reused[4] < reused[3]
    assert reused[5] < reused[1]
    return reused


@pytest.mark.parametrize("method", ["none", "tr", "prompt", "random"])
def test_reused_conversation_equals_full_prefill(chat_model, method):
    reuse, full = generators(chat_model)
    with reuse, full:
        assert_same_conversation(reuse, full, method)


def test_tr_explain_captures_survive_reuse(chat_model):
    """--explain captures P+/P- last rows and the negatives' ':' rows: a kept prefix restores the
    ':' rows it captured earlier even when something else wrote the hook slot since."""
    reuse, full = generators(chat_model)
    with reuse, full:
        logits_of(reuse, FIRST, "tr", explain=True)
        ctx = reuse.context("tr")
        ctx.hook.slots[SLOT_COLON] = 7.0          # another plan wrote the slot
        restored = []
        keep = ctx.restore_slot
        ctx.restore_slot = lambda slot, toks: restored.append(slot) or keep(slot, toks)
        a, la = logits_of(reuse, SECOND, "tr", explain=True)
        assert restored == [SLOT_COLON]           # P-'s prefix was kept, its ':' row put back
        b, lb = logits_of(full, SECOND, "tr", explain=True)
        assert a.n_reused_tokens > 0
        assert_close(la, lb)
        np.testing.assert_allclose(a.explain["delta_norms"], b.explain["delta_norms"], rtol=1e-2, atol=1e-3)


def test_saved_vectors_reuse(chat_model):
    with Generator(chat_model, EngineParams(ctx_size=512, n_threads=1),
                   fgdilp=FgdilpParams(samples=3, selfgen_tokens=4, selfgen_min_tokens=1, negatives=2)) as g:
        vectors = g.build_vectors(FIRST, SamplingParams(), {})
    reuse, full = generators(chat_model, vectors=vectors)
    with reuse, full:
        assert_same_conversation(reuse, full, "vectors")


def test_fgdilp_with_the_same_prefixes_equals_without_reuse(chat_model):
    reuse, full = generators(chat_model)
    with reuse, full:
        sel = None
        for prompt in (FIRST, SECOND, THIRD):
            r = reuse.generate(prompt, "fgdilp", n_predict=2, special=True)  # builds an instance (setup)
            from fgdilp_cpp.plans import build_instance
            sel, _ = build_instance(reuse.rt, prompt, reuse.model.tokenize(prompt, special=True), SamplingParams())
            a = reuse.generate(prompt, "fgdilp", n_predict=6, special=True, prefixes=sel, record_logits=True)
            b = full.generate(prompt, "fgdilp", n_predict=6, special=True, prefixes=sel, record_logits=True)
            assert a.tokens == b.tokens and a.n_reused_tokens > 0
            assert_close(np.stack(a.logits), np.stack(b.logits))


def test_several_samples_after_reuse(chat_model):
    """Samples share group 0's prompt KV by copy; later single-sample turns still reuse it."""
    engine = dict(ctx_size=512, n_threads=1, max_samples=3)
    with Generator(chat_model, EngineParams(kv_reuse=True, **engine)) as reuse, \
            Generator(chat_model, EngineParams(kv_reuse=False, **engine)) as full:
        for prompt, n in ((FIRST, 3), (SECOND, 1), (THIRD, 3), (SECOND, 2)):
            for method in ("none", "tr"):
                a = reuse.generate(prompt, method, n_predict=5, n_samples=n, special=True)
                b = full.generate(prompt, method, n_predict=5, n_samples=n, special=True)
                assert [s.tokens for s in a.samples] == [s.tokens for s in b.samples]


def test_conversation_instance_is_kept_while_the_conversation_extends(chat_model):
    """instance_reuse="conversation": later turns keep the first turn's prefixes (no setup), so
    P+/P-_j reuse their KV; a conversation that does not extend it builds a new instance."""
    reuse, full = generators(chat_model)
    with reuse, full:
        first = reuse.generate(FIRST, "fgdilp", n_predict=3, special=True, instance_reuse="conversation")
        kept = reuse.conversation._selection
        second = reuse.generate(SECOND, "fgdilp", n_predict=6, special=True, instance_reuse="conversation",
                                record_logits=True)
        assert first.explain["instance"] == "built for this turn" and first.setup_s > 0
        assert second.explain["instance"] == "kept from an earlier turn" and second.explain["instance_turns"] == 2
        assert second.setup_s < first.setup_s / 4 and second.n_reused_tokens > 0
        same = full.generate(SECOND, "fgdilp", n_predict=6, special=True, prefixes=kept, record_logits=True)
        assert same.tokens == second.tokens
        assert_close(np.stack(same.logits), np.stack(second.logits))
        other = reuse.generate(CLEARED, "fgdilp", n_predict=3, special=True, instance_reuse="conversation")
        assert other.explain["instance"] == "built for this turn"
        with pytest.raises(Exception, match="instance_reuse"):
            reuse.generate(FIRST, "fgdilp", n_predict=3, instance_reuse="sometimes")


def test_bench_chat_turns_json(tiny_chat, cli):
    import json

    fast = ["--selfgen-samples", "3", "--selfgen-tokens", "4", "--selfgen-min-tokens", "1", "-t", "1", "-c", "1024"]
    proc = cli("bench", "--chat", "--turns", "2", "--json", "-m", tiny_chat, "--methods", "tr,fgdilp", *fast)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["turns"] == 2 and out["kv_reuse"] is True and list(out["methods"]) == ["none", "tr", "fgdilp", "fgdilp+conversation"]
    for name, r in out["methods"].items():
        assert len(r["turns"]) == 2 and all(t > 0 for t in r["turns"]) and r["ttft_s"] == r["turns"][1]
        assert r["reused_tokens"][0] == 0 and r["reused_tokens"][1] > 0   # the second turn reused the first
        assert r["prompt_tokens"][1] > r["prompt_tokens"][0]
    assert out["methods"]["none"]["ratio_vs_none"] == 1.0
    fg, conv = out["methods"]["fgdilp"], out["methods"]["fgdilp+conversation"]
    assert fg["setup_s"][1] > 0 and conv["setup_s"][0] > 0 and conv["setup_s"][1] < conv["setup_s"][0] / 4
    bad = cli("bench", "--chat", "--turns", "99", "-m", tiny_chat, *fast)
    assert bad.returncode == 1 and "--turns must be in 1..8" in bad.stderr and "Traceback" not in bad.stderr


def test_self_generation_reuses_the_conversation(chat_model):
    """FGDILP's candidate replies prefill the conversation through the same reuse: the next
    self-generation of a longer conversation draws the candidates a full prefill draws."""
    from fgdilp_cpp.instance import self_generate

    reuse, full = generators(chat_model)
    with reuse, full:
        for prompt in (FIRST, SECOND, THIRD):
            toks = chat_model.tokenize(prompt, special=True)
            a = self_generate(reuse.context("setup"), chat_model, toks, 3, SamplingParams(seed=4), 5, 1)
            kept = reuse.context("setup").kv
            b = self_generate(full.context("setup"), chat_model, toks, 3, SamplingParams(seed=4), 5, 1)
            assert a == b and kept is not None and full.context("setup").kv is None


@pytest.mark.parametrize("kv_reuse", [True, False])
def test_detoxifier_chat_turns_reuse_unless_turned_off(tiny_chat, kv_reuse):
    from fgdilp_cpp.api import Detoxifier

    with Detoxifier.from_file(tiny_chat, chat=True, ctx_size=512, n_predict=6, threads=1, method="tr",
                              kv_reuse=kv_reuse) as d:
        msgs = [{"role": "user", "content": "the cat sat on a mat"}]
        first = d.chat(msgs, seed=1)
        msgs += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "and then?"}]
        second = d.chat(msgs, seed=1)
        assert first.n_reused_tokens == 0
        assert (second.n_reused_tokens > 0) == kv_reuse
