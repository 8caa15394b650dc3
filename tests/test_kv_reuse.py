"""KV reuse across generations (docs/method.md §9): a conversation whose earlier tokens stay in the
KV cells gives the logits of a full re-prefill, for every method that keeps sequences."""

from __future__ import annotations

import statistics

import numpy as np
import pytest

from fgdilp_cpp.engine import Capture, Model
from fgdilp_cpp.errors import FgdilpError
from fgdilp_cpp.generation import Generator
from fgdilp_cpp.params import EngineParams, FgdilpParams, SamplingParams, SteerParams
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


def generators(model, mask_k: float = 50.0, **kw):
    engine = dict(ctx_size=512, n_threads=1)
    fg = FgdilpParams(samples=3, selfgen_tokens=4, selfgen_min_tokens=1, negatives=2, mask_k=mask_k)
    return (Generator(model, EngineParams(kv_reuse=True, **engine), fgdilp=fg, **kw),
            Generator(model, EngineParams(kv_reuse=False, **engine), fgdilp=fg, **kw))


def assert_close(a, b):
    """Equal within the engine's own float noise: the same prompt decoded in other batch sizes
    (-b 512 vs 16, no reuse) already differs by up to ~0.05 on this model's logits (|x| ~ 10), and
    cells that sit in another order in the cache (a context grown, or sized to the call) by up to
    ~0.07; stale or misplaced KV differs by whole units."""
    diff = np.abs(a - b)
    assert diff.max() < 0.1 and diff.mean() < 1e-2, (diff.max(), diff.mean())


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


def test_reply_contrast_reuse_equals_full_prefill_and_decodes_a_new_message_once(chat_model):
    """--contrast reply: P+ / P- hold their prefix and the reply only. A reused conversation equals
    a full prefill, and a new turn decodes its new tokens in P0 alone: P+ and P- keep their prefix
    and decode one token each (their last, which carries the edit), where the papers' contrast
    decodes every new token in them too."""
    reuse, full = generators(chat_model, steer=SteerParams(contrast="reply"))
    with reuse, full:
        assert_same_conversation(reuse, full, "tr")
    rows = {}
    for contrast in ("full", "reply"):
        reuse, _ = generators(chat_model, steer=SteerParams(contrast=contrast))
        with reuse:
            logits_of(reuse, FIRST, "tr")
            ctx = reuse.context("tr")
            decode, count = ctx.decode, []
            ctx.decode = lambda batch: count.append(batch.n) or decode(batch)
            a, _ = logits_of(reuse, SECOND, "tr")
            rows[contrast] = sum(count)
    new = len(chat_model.tokenize(SECOND, special=True)) - a.n_reused_tokens
    assert new > 1 and rows["full"] - rows["reply"] == 2 * (new - 1), (rows, new)


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


@pytest.mark.parametrize("method", ["fgdilp", "fgdilp-frozen"])
def test_fgdilp_with_the_same_prefixes_equals_without_reuse(chat_model, method):
    """fgdilp-frozen captures its direction in its own context: beside P0's kept conversation
    (engine/batch.py prefill_aside), so a new turn still decodes only its new tokens."""
    # no top-K mask: a kept reply's KV (decoded a token at a time, f16 cells) differs from a
    # re-prefill's by float rounding (~0.01 in these logits, as for `none`); the mask is a step
    # function of the rows' magnitudes and can turn such noise into a different fused delta
    from fgdilp_cpp.plans import build_instance

    reuse, full = generators(chat_model, mask_k=100.0)
    with reuse, full:
        n_before = 0
        for prompt in (FIRST, SECOND, THIRD):
            r = reuse.generate(prompt, method, n_predict=2, special=True)  # builds an instance (setup)
            assert r.n_reused_tokens >= n_before
            sel, _ = build_instance(reuse.rt, reuse.call_values(kv_reuse=True), prompt,
                                    reuse.model.tokenize(prompt, special=True), SamplingParams())
            a = reuse.generate(prompt, method, n_predict=6, special=True, prefixes=sel, record_logits=True)
            b = full.generate(prompt, method, n_predict=6, special=True, prefixes=sel, record_logits=True)
            n = len(reuse.model.tokenize(prompt, special=True))
            assert a.n_reused_tokens == n - 1 and b.n_reused_tokens == 0
            # exact FGDILP's fused delta is a step function of the rows (sign election): when the
            # kept KV sits in other cells (a context sized to the call, grown by the next turn)
            # its rounding can flip a sampled token, and the runs part there; held equal up to it
            k = next((i for i, (x, y) in enumerate(zip(a.tokens, b.tokens)) if x != y), len(a.tokens))
            assert k == len(a.tokens) or (method == "fgdilp" and k >= 2), (a.tokens, b.tokens)
            assert_close(np.stack(a.logits)[:k + 1], np.stack(b.logits)[:k + 1])
            n_before = a.n_reused_tokens - 4      # the next prompt re-renders the end of this one
        assert reuse.context(method).hook.edits_applied > 0


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
        kept = reuse.conversation("fgdilp").last._selection
        # another seed (the chat draws each turn with the next one) keeps the instance too
        second = reuse.generate(SECOND, "fgdilp", n_predict=6, special=True, instance_reuse="conversation",
                                record_logits=True, sampling=SamplingParams(seed=43))
        assert first.explain["instance"] == "built for this turn" and first.setup_s > 0
        assert second.explain["instance"] == "kept from an earlier turn" and second.explain["instance_turns"] == 2
        assert second.setup_s < first.setup_s / 4 and second.n_reused_tokens > 0
        same = full.generate(SECOND, "fgdilp", n_predict=6, special=True, prefixes=kept, record_logits=True,
                             sampling=SamplingParams(seed=43))
        assert same.tokens == second.tokens
        assert_close(np.stack(same.logits), np.stack(second.logits))
        other = reuse.generate(CLEARED, "fgdilp", n_predict=3, special=True, instance_reuse="conversation")
        assert other.explain["instance"] == "built for this turn"
        with pytest.raises(Exception, match="instance_reuse"):
            reuse.generate(FIRST, "fgdilp", n_predict=3, instance_reuse="sometimes")


class KeywordScorer:
    """Toxicity 0.9 for a text that says "hate", 0.1 otherwise (the real scorer's interface)."""

    LABELS = ("toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate")

    def score(self, texts):
        return np.array([[0.9 if "hate" in t else 0.1] * 6 for t in texts])


def test_a_turn_that_escalates_rebuilds_the_conversation_instance(chat_model):
    """The instance is kept through benign turns, rebuilt on the first turn that reads toxic and
    more toxic than what built it, then kept again through turns no more toxic."""
    fg = FgdilpParams(samples=3, selfgen_tokens=4, selfgen_min_tokens=1, negatives=2)
    with Generator(chat_model, EngineParams(kv_reuse=True, ctx_size=2048, n_threads=1), fgdilp=fg) as reuse:
        reuse.rt.scorer = KeywordScorer()
        hostile = THIRD + "fine" + "<|im_end|>\n" + turn("i hate you")
        again = hostile + "ok" + "<|im_end|>\n" + turn("i hate all of you")
        calm = again + "sorry" + "<|im_end|>\n" + turn("what about birds")
        seen = []
        for prompt in (FIRST, SECOND, THIRD, hostile, again, calm):
            r = reuse.generate(prompt, "fgdilp", n_predict=2, special=True, instance_reuse="conversation")
            seen.append((r.explain["instance"].split(":")[0], r.explain["instance_turns"], r.setup_s))
        assert [x[:2] for x in seen] == [("built for this turn", 1), ("kept from an earlier turn", 2),
                                         ("kept from an earlier turn", 3), ("rebuilt", 1),
                                         ("kept from an earlier turn", 2), ("kept from an earlier turn", 3)]
        assert seen[3][2] > 4 * max(seen[1][2], seen[4][2])     # only a rebuild pays the setup


def test_bench_chat_turns_json(tiny_chat, cli):
    import json

    fast = ["--selfgen-samples", "3", "--selfgen-tokens", "4", "--selfgen-min-tokens", "1", "-t", "1", "-c", "1024"]
    proc = cli("bench", "--chat", "--turns", "3", "-r", "2", "--json", "-m", tiny_chat, "--methods", "tr,fgdilp", *fast)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["turns"] == 3 and out["repeats"] == 2 and out["kv_reuse"] is True and list(out["methods"]) == [
        "none", "tr", "fgdilp", "tr+reply", "fgdilp+turn", "fgdilp+reply", "fgdilp+turn+reply"]
    assert out["settings"]["contrast"] == "full" and out["instance_reuse"] == "conversation"   # chat defaults
    for name, r in out["methods"].items():
        assert len(r["turns"]) == 3 and all(t > 0 for t in r["turns"])
        assert r["ttft_s"] == pytest.approx(statistics.median(r["turns"][1:]), abs=1e-4)
        # two replays of the conversation: each turn's time is their median
        assert len(r["replays"]) == 2 and r["turns"] == [round(statistics.median(t), 4) for t in zip(*r["replays"])]
        # later turns reuse; a first turn reuses only what FGDILP's candidates decoded (plans.selfgen_context)
        first_reused = r["prompt_tokens"][0] - 1 if name.startswith("fgdilp") else 0
        assert r["reused_tokens"][0] == first_reused and all(n > 0 for n in r["reused_tokens"][1:])
        assert r["prompt_tokens"][0] < r["prompt_tokens"][1] < r["prompt_tokens"][2]
    assert out["methods"]["none"]["ratio_vs_none"] == 1.0
    base = out["methods"]["none"]["turns"]
    for r in out["methods"].values():        # paired per turn, then the median from the second turn
        assert r["ratio_vs_none"] == pytest.approx(statistics.median(
            [t / b for t, b in zip(r["turns"][1:], base[1:])]), abs=2e-3)
    fg, conv = out["methods"]["fgdilp+turn"], out["methods"]["fgdilp"]
    assert fg["setup_s"][1] > 0 and conv["setup_s"][0] > 0
    # the shipped conversation's second message is hostile (the scorer reads it toxic): the kept
    # instance is rebuilt there, and kept through the benign third
    assert fg["instance_kept"] == [False] * 3 and conv["instance_kept"] == [False, False, True]
    bad = cli("bench", "--chat", "--turns", "99", "-m", tiny_chat, *fast)
    assert bad.returncode == 1 and "--turns must be in 1..8" in bad.stderr and "Traceback" not in bad.stderr


def test_bench_variants_turn_what_each_method_runs_at_to_the_other_value(monkeypatch):
    """A method whose profile entry runs it at the reply contrast gets a "+full" row, one at the
    full contrast a "+reply" row; only FGDILP's methods get "+turn" / "+conversation" rows."""
    from fgdilp_cpp import bench
    from fgdilp_cpp.settings import Settings

    def settings_for(det, m):
        return Settings(contrast="reply" if m == "fgdilp-frozen" else "full", instance_reuse="conversation")

    monkeypatch.setattr(bench, "settings_for", settings_for)
    rows = bench.chat_variants(object(), ["none", "tr", "fgdilp-frozen", "vectors"])
    assert rows == [("tr+reply", {"contrast": "reply"}, "tr"),
                    ("fgdilp-frozen+turn", {"instance_reuse": "turn"}, "fgdilp-frozen"),
                    ("fgdilp-frozen+full", {"contrast": "full"}, "fgdilp-frozen"),
                    ("fgdilp-frozen+turn+full", {"instance_reuse": "turn", "contrast": "full"}, "fgdilp-frozen")]


def test_self_generation_reuses_the_conversation(chat_model):
    """FGDILP's candidate replies prefill the conversation through the same reuse: the next
    self-generation of a longer conversation draws the candidates a full prefill draws."""
    from fgdilp_cpp.self_generation import self_generate

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


@pytest.mark.parametrize("method", ["tr", "random"])
def test_a_steered_reply_is_kept_through_its_unedited_twin(chat_model, method):
    """P0's reply is decoded beside an unedited twin (engine/batch.py): the next turn keeps the
    reply's KV instead of prefilling it again, and still gives a full re-prefill's logits."""
    reuse, full = generators(chat_model)
    with reuse, full:
        first = reuse.generate(FIRST, method, n_predict=6, special=True, forced_tokens=FORCED)
        assert first.n_reused_tokens == 0
        reply = first.text
        nxt = FIRST + reply + "<|im_end|>\n" + turn("and then")
        n_first = len(reuse.model.tokenize(FIRST, special=True))
        toks = reuse.model.tokenize(nxt, special=True)
        # how much of the generated reply the re-rendered prompt repeats token for token
        same = 0
        decoded = FORCED                      # forced tokens are all decoded (a sampled last one is not)
        while same < len(decoded) and n_first + same < len(toks) and toks[n_first + same] == decoded[same]:
            same += 1
        a, la = logits_of(reuse, nxt, method)
        b, lb = logits_of(full, nxt, method)
        assert_close(la, lb)
        assert a.n_reused_tokens == n_first + same and same > 0, (a.n_reused_tokens, n_first, same)
        ctx = reuse.context(method)
        assert ctx.hook.edits_applied > 0                 # the second turn was steered


OTHER_FIRST = SYSTEM + turn("birds fly over the sea")
OTHER_SECOND = SYSTEM + turn("birds fly over the sea", "they sing at dawn") + turn("which birds")
OTHER_THIRD = OTHER_SECOND + "small ones" + "<|im_end|>\n" + turn("tell me more")
THIRD_FIRST = SYSTEM + turn("fish swim in the river")


def test_each_method_keeps_its_own_conversation_instance(chat_model):
    """Two methods, each in its own conversation (bench --chat replays one per method): with room
    for one conversation each, neither rebuilds the other's instance."""
    fg = FgdilpParams(samples=3, selfgen_tokens=4, selfgen_min_tokens=1, negatives=2)
    with Generator(chat_model, EngineParams(ctx_size=512, n_threads=1, kv_reuse=True), fgdilp=fg) as g:
        said = [g.generate(p, m, n_predict=2, special=True, instance_reuse="conversation").explain["instance"]
                for p, m in ((FIRST, "fgdilp"), (OTHER_FIRST, "fgdilp-frozen"), (SECOND, "fgdilp"),
                             (OTHER_SECOND, "fgdilp-frozen"))]
    assert said == ["built for this turn"] * 2 + ["kept from an earlier turn"] * 2


@pytest.mark.parametrize("kept", [1, 2])
def test_each_kept_conversation_keeps_its_own_instance(chat_model, kept):
    """serve: two clients' conversations interleave; with room for both (kv_conversations 2) each
    goes on with its own instance, with room for one each turn of the other one rebuilds it."""
    fg = FgdilpParams(samples=3, selfgen_tokens=4, selfgen_min_tokens=1, negatives=2)
    with Generator(chat_model, EngineParams(ctx_size=512, n_threads=1, kv_reuse=True, kv_conversations=kept),
                   fgdilp=fg) as g:
        said = [g.generate(p, "fgdilp-frozen", n_predict=2, special=True, instance_reuse="conversation")
                .explain["instance"] for p in (FIRST, OTHER_FIRST, SECOND, OTHER_SECOND, THIRD)]
    built = "built for this turn"
    if kept == 2:
        assert said == [built] * 2 + ["kept from an earlier turn"] * 3
    else:
        assert said == [built] * 5


@pytest.mark.parametrize("method", ["none", "tr"])
def test_several_conversations_are_kept_least_recently_used_out(chat_model, method):
    """kv_conversations=2 (serve): two conversations that alternate each keep their own KV (the
    second turn of each reuses its first turn, not only the shared system prompt) and equal a
    full re-prefill; a third conversation takes the ids of the least recently used one, not of
    the most recent; with 1, the other conversation's turn keeps only the system prompt."""
    engine = dict(ctx_size=512, n_threads=1)
    n_system = len(chat_model.tokenize(SYSTEM, special=True))
    with Generator(chat_model, EngineParams(kv_reuse=True, kv_conversations=2, **engine)) as two, \
            Generator(chat_model, EngineParams(kv_reuse=True, kv_conversations=1, **engine)) as one, \
            Generator(chat_model, EngineParams(kv_reuse=False, **engine)) as full:
        got = {}
        for name, gen in (("two", two), ("one", one)):
            reused = []
            for prompt in (FIRST, OTHER_FIRST, SECOND, OTHER_SECOND, THIRD_FIRST, OTHER_THIRD):
                a, la = logits_of(gen, prompt, method)
                b, lb = logits_of(full, prompt, method)
                assert_close(la, lb)
                reused.append(a.n_reused_tokens)
            got[name] = reused
        n_first = len(chat_model.tokenize(FIRST, special=True))
        n_other = len(chat_model.tokenize(OTHER_FIRST, special=True))
        two_r, one_r = got["two"], got["one"]
        # second turns reuse their own first turn with two kept, only the system prompt with one
        assert two_r[2] >= n_first - 1 and two_r[3] >= n_other - 1, two_r
        assert one_r[2] < n_first - 1 and one_r[3] < n_other - 1 and one_r[2] >= n_system - 1, one_r
        # a third conversation came between: the most recent other one (birds) is still whole
        n_other2 = len(chat_model.tokenize(OTHER_SECOND, special=True))
        assert two_r[5] >= n_other2 - 1 and one_r[5] < n_other2 - 1, (two_r, one_r)
        ctx = two.context(method)
        assert len(ctx.kv) <= ctx.params.n_seq_max


def test_serve_keeps_several_conversations_by_default(tiny_chat, monkeypatch):
    from click.testing import CliRunner

    import fgdilp_cpp.serve.server as server
    from fgdilp_cpp.cli import main

    seen = []
    monkeypatch.setattr(server, "run_server", lambda det, *a, **k: seen.append(det.settings.kv_conversations))
    for args, want in (([], 4), (["--kv-conversations", "2"], 2), (["--no-kv-reuse"], 4)):
        r = CliRunner().invoke(main, ["serve", "-m", str(tiny_chat), "-c", "256", "--port", "0", *args])
        assert r.exit_code == 0, r.output
        assert seen[-1] == want
    r = CliRunner().invoke(main, ["chat", "--help"])
    assert "--kv-conversations" in r.output


def test_a_full_context_drops_kept_conversations_before_failing(chat_model):
    """Cells too few for the kept conversations and a new one: the least recently used kept
    records are dropped and the decode tried again, instead of a 'context is full' error."""
    from fgdilp_cpp.engine.batch import Lockstep
    from fgdilp_cpp.engine.context import Context, ContextParams

    with Context(chat_model, ContextParams(n_ctx=256, n_batch=512, n_seq_max=3, kv_conversations=3,
                                           n_threads=1)) as ctx:
        cells = ctx.n_ctx                              # llama.cpp may round the size up
        words = ("cat", "dog", "bird")
        toks = []
        for w in words:                                # three conversations, each over a third of the cells
            t = chat_model.tokenize(SYSTEM + turn(" ".join([w] * cells)), special=True)
            toks.append(t[: cells // 2])
        for t in toks:
            lock = Lockstep(ctx, [t], want_logits=[0], reuse=True)
            try:
                lock.prefill()
                lock.deactivate(0)
                lock.record()
            finally:
                lock.close()
        kept = list(ctx.kv.values())
        assert toks[2] in kept and toks[0] not in kept      # the oldest conversation was dropped
    with Context(chat_model, ContextParams(n_ctx=256, n_batch=512, n_seq_max=1, n_threads=1)) as ctx:
        too_long = chat_model.tokenize(" ".join(["fish"] * (2 * ctx.n_ctx)), special=True)[: ctx.n_ctx + 8]
        lock = Lockstep(ctx, [too_long], want_logits=[0], reuse=True)
        with pytest.raises(FgdilpError, match="context is full"):
            lock.prefill()
        lock.close()


def test_a_capture_aside_keeps_the_records_or_clears_when_no_ids_are_free(chat_model, monkeypatch):
    """prefill_aside (the frozen capture): the kept sequences' records and cells survive it; when
    every sequence id has a record it clears the context instead of writing into kept cells."""
    import llama_cpp.llama_cpp as ll

    from fgdilp_cpp.engine import prefill_aside
    from fgdilp_cpp.plans import SLOT_POS_LAST

    reuse, full = generators(chat_model)
    with reuse, full:
        method = "fgdilp-frozen"              # a hooked context sized for a capture beside P0
        logits_of(reuse, FIRST, method)
        ctx = reuse.context(method)
        kept = dict(ctx.kv)
        assert kept
        toks = chat_model.tokenize("the dog", special=True)
        cap = [Capture(seq=0, index=len(toks) - 1, slot=SLOT_POS_LAST)]
        ctx.hook.slots[SLOT_POS_LAST] = 7.0
        prefill_aside(ctx, [toks, toks + toks[1:]], cap)
        assert not np.any(ctx.hook.slots[SLOT_POS_LAST] == 7.0)      # the capture fired
        assert ctx.kv == kept
        mem = ll.llama_get_memory(ctx.ptr)
        for seq, t in kept.items():            # the kept cells are still there
            assert ll.llama_memory_seq_pos_max(mem, seq) >= len(t) - 1
        ctx.kv = {i: [1] for i in range(ctx.params.n_seq_max)}      # no id without a record
        prefill_aside(ctx, [toks], cap)
        assert ctx.kv == {}
        # no cell free beside the kept records: they are given up and the capture runs again
        logits_of(reuse, FIRST, method)
        assert ctx.kv
        from fgdilp_cpp.engine import batch
        from fgdilp_cpp.errors import ContextFullError

        real, starts = batch.Lockstep.prefill, []

        def full_once(lock, *a, **k):
            starts.append(lock.first_seq)
            if len(starts) == 1:
                raise ContextFullError("full")
            return real(lock, *a, **k)

        monkeypatch.setattr(batch.Lockstep, "prefill", full_once)
        ctx.hook.slots[SLOT_POS_LAST] = 7.0
        prefill_aside(ctx, [toks], cap)
        assert starts[0] > 0 and starts[1] == 0 and ctx.kv == {}
        assert not np.any(ctx.hook.slots[SLOT_POS_LAST] == 7.0)
        for seq in range(ctx.params.n_seq_max):
            assert ll.llama_memory_seq_pos_max(mem, seq) == -1


def test_a_kept_instance_at_the_reply_contrast_captures_its_direction_once(chat_model):
    """fgdilp-frozen, instance kept for the conversation, reply contrast: P+ / P-_j do not hold the
    conversation, so the kept instance's direction is the one already captured (plans'
    capture memo): a later turn decodes no capture, and its output equals a fresh generator's."""
    from fgdilp_cpp.plans import build_instance

    steer = SteerParams(contrast="reply")
    reuse, full = generators(chat_model, mask_k=100.0, steer=steer)
    with reuse, full:
        sel, _ = build_instance(reuse.rt, reuse.call_values(), FIRST, reuse.model.tokenize(FIRST, special=True), SamplingParams())
        reuse.generate(FIRST, "fgdilp-frozen", n_predict=4, special=True, prefixes=sel)
        ctx = reuse.context("fgdilp-frozen")
        decode, rows = ctx.decode, []
        ctx.decode = lambda batch: rows.append(batch.n) or decode(batch)
        a = reuse.generate(SECOND, "fgdilp-frozen", n_predict=6, special=True, prefixes=sel, record_logits=True)
        b = full.generate(SECOND, "fgdilp-frozen", n_predict=6, special=True, prefixes=sel, record_logits=True)
        new = len(chat_model.tokenize(SECOND, special=True)) - a.n_reused_tokens
        # P0's new tokens, then P0 and its unedited twin (engine/batch.py) decode the last prompt
        # token and 5 steps side by side: no capture rows
        assert rows[0] == new - 1 and rows[1:] == [2] * 6, (rows, new)
        assert a.tokens == b.tokens
        assert_close(np.stack(a.logits), np.stack(b.logits))


def test_a_new_instance_decodes_only_its_new_prefixes(chat_model, monkeypatch):
    """Captured prefix rows are remembered one by one (plans._capture_rows): under the reply
    contrast the blank negative (template and the prompt's last token) is the same every turn,
    so a later turn's new instance decodes its new P+ and negative only, and its direction and
    output equal a fresh generator's."""
    from fgdilp_cpp import plans
    from fgdilp_cpp.method.prefixes import Selection

    seen: list[list[list[int]]] = []
    aside = plans.prefill_aside
    monkeypatch.setattr(plans, "prefill_aside", lambda ctx, seqs, caps: seen.append(seqs) or aside(ctx, seqs, caps))
    first = Selection(["a dog ran", ""], [0, None], [["toxicity"], []], "the cat sat", 1)
    second = Selection(["birds are loud", ""], [0, None], [["toxicity"], []], "a quiet mat", 1)
    steer = SteerParams(contrast="reply")
    reuse, full = generators(chat_model, mask_k=100.0, steer=steer)
    with reuse, full:
        reuse.generate(FIRST, "fgdilp-frozen", n_predict=2, special=True, prefixes=first)
        assert len(seen) == 1 and len(seen[0]) == 3          # P+, the negative, the blank
        blank = seen[0][2]
        a = reuse.generate(SECOND, "fgdilp-frozen", n_predict=6, special=True, prefixes=second, record_logits=True)
        assert len(seen) == 2 and len(seen[1]) == 2 and blank not in seen[1], seen[1]
        a_dir = reuse.context("fgdilp-frozen").hook.slots[plans.SLOT_DIR].copy()
        b = full.generate(SECOND, "fgdilp-frozen", n_predict=6, special=True, prefixes=second, record_logits=True)
        assert len(seen[2]) == 3 and seen[2][2] == blank      # the fresh generator decodes all three
        b_dir = full.context("fgdilp-frozen").hook.slots[plans.SLOT_DIR]
        assert np.abs(a_dir).max() > 0
        diff = np.abs(a_dir - b_dir)          # batch composition's float noise only (|x| ~ 1)
        assert diff.max() < 0.02 and diff.mean() < 1e-3, (diff.max(), diff.mean())
        assert a.tokens == b.tokens
        assert_close(np.stack(a.logits), np.stack(b.logits))
