"""KV sized to need (kv_memory): contexts hold the cells their sequences can use, grow for a longer
call with their kept KV, never truncate, and stay within the KV budget (least recently used
dropped, recreated with the same output; a request that alone cannot fit is refused clearly)."""

from __future__ import annotations

import numpy as np
import pytest

from fgdilp_cpp import methods
from fgdilp_cpp.engine import Model
from fgdilp_cpp.generation import Generator
from fgdilp_cpp.kv_memory import MIB, KvBudgetError, evictions, padded
from fgdilp_cpp.method_contexts import SETUP
from fgdilp_cpp.params import EngineParams, FgdilpParams, SamplingParams, SteerParams
from test_kv_reuse import FIRST, SECOND, THIRD, assert_close

FG = FgdilpParams(samples=3, selfgen_tokens=4, selfgen_min_tokens=1, negatives=2)
LISTED = [m for m in methods.names()]
PREFIXED = ("tr", "fgdilp", "fgdilp-frozen")      # methods with P+ / P-_j sequences of their own


@pytest.fixture(scope="module")
def chat_model(tiny_chat):
    with Model(tiny_chat) as m:
        yield m


@pytest.fixture(scope="module")
def universal(chat_model):
    """Directions for universal (the tiny model has no installed file): FGDILP's, frozen."""
    with Generator(chat_model, EngineParams(ctx_size=512, n_threads=1), fgdilp=FG) as g:
        return g.build_vectors(FIRST, SamplingParams(), {})


class TodaySized(Generator):
    """The sizes before issue 26 (generation.Generator.context at 66e8d14): every role the whole
    context, the other samples and the twin max_new cells, a capture beside P0 another context."""

    def _cells(self, name, need):
        e, f = self.engine, self.fgdilp
        if name == SETUP:
            return e.ctx_size + f.samples * (f.selfgen_tokens + 2) + 2048
        spec = methods.get(name)
        roles = spec.n_roles(f)
        n_seq = roles * e.max_samples if spec.exact else max(roles, e.max_samples)
        n_ctx = roles * e.ctx_size + n_seq * min(e.max_new, e.ctx_size) * (e.max_samples > 1)
        if e.kv_reuse and spec.hook:
            n_ctx += min(e.max_new, e.ctx_size) + 1
        if e.kv_reuse and not spec.exact and roles > 1:
            n_ctx += e.ctx_size
        if e.kv_reuse and spec.instance:
            n_ctx += f.samples * (f.selfgen_tokens + 1)
        return n_ctx * self._conversations_kept(self._n_seq(name))


class Undersized(Generator):
    """Method contexts made with one batch of cells, whatever the call: only the plan's own check
    and the captures' make_room can give them what they need (FGDILP's setup keeps its size)."""

    def _cells(self, name, need):
        return super()._cells(name, need) if name == SETUP else padded(self.engine.n_batch)


def generator(cls, model, contrast, universal, ctx_size=512, **kw):
    g = cls(model, EngineParams(ctx_size=ctx_size, n_threads=1, kv_reuse=True), SteerParams(contrast=contrast),
            fgdilp=FG, **kw)
    g._universal = universal
    return g


def run_all(g, method):
    """Two chat turns (kept KV, the twin, captures beside P0), then a fresh generation."""
    out = []
    for i, prompt in enumerate((FIRST, SECOND)):
        out.append(g.generate(prompt, method, n_predict=6, special=True, sampling=SamplingParams(seed=3 + i)))
    out.append(g.generate(THIRD, method, n_predict=6, special=True, kv_reuse=False))
    return out


@pytest.mark.parametrize("contrast", ["full", "reply"])
@pytest.mark.parametrize("method", LISTED)
def test_sized_to_need_generates_the_tokens_of_todays_sizes(chat_model, universal, method, contrast):
    with generator(Generator, chat_model, contrast, universal) as new, \
            generator(TodaySized, chat_model, contrast, universal) as old:
        got, want = run_all(new, method), run_all(old, method)
        assert [r.tokens for r in got] == [r.tokens for r in want]
        assert all(len(r.tokens) == 6 for r in got)
        if methods.get(method).hook:
            assert all(r.fired_layers == chat_model.info.n_layer for r in got)
        cells, old_cells = new.cells(method), old.cells(method)
        assert cells <= old_cells
        if method in PREFIXED:   # P+ / P-_j hold their prefix and the reply (full contrast: and the prompt)
            assert cells <= old_cells - 512


def test_a_longer_reply_grows_the_context_with_its_conversation(chat_model, universal):
    """Under the reply contrast a longer reply needs more cells for P+ / P-_j: the context grows,
    the conversation's KV moves along (the turn decodes only its new tokens), and its logits are
    those of a full re-prefill."""
    forced = [(7 * i) % 300 + 5 for i in range(150)]
    with generator(Generator, chat_model, "reply", universal) as g, \
            Generator(chat_model, EngineParams(ctx_size=512, n_threads=1, kv_reuse=False),
                      SteerParams(contrast="reply"), fgdilp=FG) as fresh:
        g.generate(FIRST, "tr", n_predict=4, special=True)
        small = g.cells("tr")
        r = g.generate(SECOND, "tr", n_predict=150, special=True, forced_tokens=forced, record_logits=True)
        b = fresh.generate(SECOND, "tr", n_predict=150, special=True, forced_tokens=forced, record_logits=True)
        assert g.cells("tr") > small
        assert r.n_reused_tokens >= len(chat_model.tokenize(FIRST, special=True)) - 1 and b.n_reused_tokens == 0
        assert len(r.tokens) == len(forced) and r.tokens == b.tokens
        assert_close(np.stack(r.logits), np.stack(b.logits))


@pytest.mark.parametrize("contrast", ["full", "reply"])
@pytest.mark.parametrize("method", ["tr", "fgdilp", "fgdilp-frozen", "random"])
def test_a_context_too_small_for_its_call_grows_never_truncates(chat_model, universal, method, contrast):
    """Contexts of one batch (512 cells) asked for a plan of ~1000: the plan's check (and the
    captures' make_room) grow them, and the reply is the one a context of today's size gives."""
    prompt = FIRST + " ".join(["the cat sat on a mat and looked at the door"] * 12)
    with generator(Undersized, chat_model, contrast, universal, ctx_size=1024) as small, \
            generator(TodaySized, chat_model, contrast, universal, ctx_size=1024) as old:
        a = small.generate(prompt, method, n_predict=300, special=True, kv_reuse=False)
        b = old.generate(prompt, method, n_predict=300, special=True, kv_reuse=False)
        assert a.tokens == b.tokens and a.stop_reason == b.stop_reason
        assert small.cells(method) > 512 or small.cells("tr") > 512


# ---- the KV budget ----------------------------------------------------------------------------
def test_evictions_drop_the_least_recently_used_unpinned():
    sizes = {"a": 4, "b": 4, "c": 4}
    used = {"a": 3, "b": 1, "c": 2}
    assert evictions(sizes, used, "d", 4, 12, set()) == ["b"]
    assert evictions(sizes, used, "d", 8, 12, {"b"}) == ["c", "a"]
    assert evictions(sizes, used, "a", 6, 14, set()) == []          # a context's own bytes are replaced
    with pytest.raises(KvBudgetError, match="more than the KV budget"):
        evictions(sizes, used, "d", 13, 12, set())
    with pytest.raises(KvBudgetError, match="other contexts"):
        evictions(sizes, used, "d", 6, 12, {"a", "b", "c"})


def test_the_budget_drops_the_least_recently_used_and_remakes_it_alike(chat_model, universal):
    with generator(Generator, chat_model, "full", universal) as g:
        sizes = {}
        for m in ("none", "tr"):
            g.generate(FIRST, m, n_predict=2, special=True, kv_reuse=False)
            sizes[m] = g.kv_bytes(m)
        g.close()
        g.kv_budget = max(sizes.values()) + sizes["none"] // 2      # one of them at a time
        first = {m: g.generate(FIRST, m, n_predict=8, special=True, kv_reuse=False).tokens for m in ("none", "tr")}
        assert g.cells("none") == 0 and g.cells("tr") > 0 and g.kv_bytes() <= g.kv_budget
        for m in ("none", "tr", "none"):
            r = g.generate(FIRST, m, n_predict=8, special=True, kv_reuse=False)
            assert r.tokens == first[m] and g.kv_bytes() <= g.kv_budget
            assert [n for n in ("none", "tr") if g.cells(n)] == [m]
        assert first["tr"] != first["none"]          # TR steered in its remade context
        # a chat turn after its context was dropped: the conversation is decoded again, not lost
        g.generate(FIRST, "tr", n_predict=4, special=True)
        g.generate(FIRST, "none", n_predict=4, special=True)
        r = g.generate(SECOND, "tr", n_predict=4, special=True)
        assert r.n_reused_tokens == 0 and len(r.tokens) == 4


def test_contexts_idle_past_the_limit_are_freed_and_made_again_alike(chat_model, universal):
    import time

    with generator(Generator, chat_model, "full", universal) as g:
        first = {m: g.generate(FIRST, m, n_predict=8, special=True, kv_reuse=False).tokens for m in ("none", "tr")}
        assert g.drop_idle(60) == [] and g.cells("none") and g.cells("tr")     # used just now
        g.generate(FIRST, "tr", n_predict=2, special=True, kv_reuse=False)
        later = time.monotonic() + 61
        g._last_use_s["tr"] = later - 30                                         # tr used 30 s before `later`
        assert g.drop_idle(60, now=later) == ["none"] and g.cells("none") == 0 and g.cells("tr")
        assert g.drop_idle(20, now=later) == ["tr"] and g.kv_bytes() == 0
        for m in ("none", "tr"):                                                 # made again on their next call
            assert g.generate(FIRST, m, n_predict=8, special=True, kv_reuse=False).tokens == first[m]
        assert first["tr"] != first["none"]


def test_serve_frees_the_kv_of_idle_contexts(tiny_llama):
    """--kv-idle-s: the model thread frees a context its method has not used for that long; the
    next request of the method makes it again and answers as before."""
    import time

    from fgdilp_cpp.api import Detoxifier
    from fgdilp_cpp.serve.server import Limits, create_app
    from server_helpers import DET_KW, MSGS, Served

    body = {"model": "m", "messages": MSGS, "seed": 1, "max_tokens": 4, "method": "none"}
    with Detoxifier.from_file(str(tiny_llama[0]), **{**DET_KW, "kv_idle_s": 1}) as det, \
            Served(create_app(det, Limits(allow_methods=("none", "tr")))) as srv:
        s, _, first = srv.request("POST", "/v1/chat/completions", body)
        assert s == 200 and det.generator.cells("none") > 0
        deadline = time.monotonic() + 10
        while det.generator.kv_bytes() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert det.generator.kv_bytes() == 0                       # none's and tr's (warm-up) contexts freed
        s, _, again = srv.request("POST", "/v1/chat/completions", body)
        assert s == 200 and again["choices"][0]["message"] == first["choices"][0]["message"]
    with Detoxifier.from_file(str(tiny_llama[0]), **DET_KW) as det:
        assert det.settings.kv_idle_s == 0                         # off outside serve unless asked for


def test_a_request_larger_than_the_budget_is_refused_clearly(chat_model, universal):
    with generator(Generator, chat_model, "full", universal) as g:
        g.kv_budget = 100 * 1024
        with pytest.raises(KvBudgetError, match=r"more than the KV budget of 0 MiB \(--kv-budget-mib\)"):
            g.generate(FIRST, "tr", n_predict=4, special=True)
        assert g.kv_bytes() == 0
        g.kv_budget = 4 * MIB                                   # the same request fits a larger budget
        assert len(g.generate(FIRST, "tr", n_predict=4, special=True).tokens) == 4


def test_the_cli_refuses_a_request_over_the_budget(cli, tiny_llama):
    from test_cli_errors import assert_clean_error

    # a 4000-token reply needs 4096 cells of 384 bytes (3 layers, 2 KV heads of 16 f16 K and V
    # values): 1.5 MiB
    proc = cli("generate", "-m", tiny_llama[0], "-p", "hi", "-c", "4096", "-n", "4000", "--method", "none",
               "-t", "1", "--kv-budget-mib", "1")
    assert_clean_error(proc, "KV budget of 1 MiB", "--kv-budget-mib")
    ok = cli("generate", "-m", tiny_llama[0], "-p", "hi", "-c", "4096", "--method", "none", "-t", "1", "-n", "2",
             env={"FGDILP_KV_BUDGET_MIB": "2"})
    assert ok.returncode == 0, ok.stderr


def test_serve_warms_what_fits_and_answers_503_for_what_cannot(tiny_llama):
    """none fits the budget (4096 cells of 384 bytes: 1.5 MiB), TR asked for a 2000-token reply
    does not (P0's 4096 cells and two prefixed sequences of ~2000: 3.1 MiB): the server warms
    none, says 503 kv_budget to TR, and goes on serving none."""
    from fgdilp_cpp.api import Detoxifier
    from fgdilp_cpp.serve.server import Limits, create_app
    from server_helpers import DET_KW, MSGS, Served

    kw = {**DET_KW, "ctx_size": 4096, "method": "none", "kv_budget_mib": 3}
    with Detoxifier.from_file(str(tiny_llama[0]), **kw) as det, \
            Served(create_app(det, Limits(allow_methods=("none", "tr")))) as srv:
        assert det.generator.kv_bytes("none") > 0
        body = {"model": "m", "messages": MSGS, "seed": 1, "max_tokens": 4}
        s, _, err = srv.request("POST", "/v1/chat/completions", {**body, "method": "tr", "max_tokens": 2000})
        assert s == 503 and err["error"]["code"] == "kv_budget" and "--kv-budget-mib" in err["error"]["message"]
        assert srv.request("POST", "/v1/chat/completions", body)[0] == 200
        assert det.generator.kv_bytes() <= 3 * MIB


def test_bench_memory_json(cli, tiny_chat, monkeypatch):
    """bench --memory --json: per method a chat's peak RSS (its own process) and KV beside unsteered,
    decode and TTFT ratios; serve with both methods after a request of each, within the budget."""
    import json

    import os
    from pathlib import Path

    from conftest import as_a_user_meets_it

    as_a_user_meets_it(monkeypatch)          # the fast setup on: a user's model without a profile
    profiles = Path(os.environ["FGDILP_PROFILE_PATH"].split(os.pathsep)[0])
    before = sorted(profiles.glob("*")) if profiles.is_dir() else []
    proc = cli("bench", "--memory", "--json", "-m", tiny_chat, "-c", "512", "-t", "1", "--turns", "2", "-r", "1",
               "-n", "4", "--methods", "none,universal", "--kv-budget-mib", "64")
    assert proc.returncode == 0, proc.stderr
    # the model has no profile, and a bench measures it as it stands: no fast setup ran in its workers
    assert (sorted(profiles.glob("*")) if profiles.is_dir() else []) == before
    out = json.loads(proc.stdout)
    none, uni = out["methods"]["none"], out["methods"]["universal"]
    assert out["universal"] == "random" and out["ctx_size"] == 512 and out["turns"] == 2
    assert none["rss_ratio_vs_none"] == 1.0 and uni["peak_rss_mib"] > 10
    # the universal method's context: P0 and its unedited twin's reply (kv_memory.method_cells)
    assert 0 < none["kv_mib"] <= uni["kv_mib"] <= 2 * none["kv_mib"]
    assert uni["decode_tokens_per_s"] > 0 and len(uni["ttft_turns_s"]) == 2
    serve = out["serve"]
    assert serve["methods"] == ["none", "universal"] and serve["kv_budget_mib"] == 64
    assert serve["within_budget"] and serve["kv_mib"] >= uni["kv_mib"] + none["kv_mib"] - 0.01


@pytest.mark.real_model
def test_gemma_grows_a_kept_conversation_with_its_sliding_window_layers(gemma_path):
    """gemma-3's sliding-window layers keep a cache of their own (full-sized: swa_full): a growth
    moves both. The moved cells sit in another order, which changes float rounding only: the
    grown conversation is as close to a full re-prefill as one that never grew (on this model
    reuse itself moves TR's logits by tenths; stale or misplaced KV moves them by whole units)."""
    first = "<start_of_turn>user\nTell me about cats.<end_of_turn>\n<start_of_turn>model\n"
    second = first + "Cats are small.<end_of_turn>\n<start_of_turn>user\nAnd dogs?<end_of_turn>\n<start_of_turn>model\n"
    forced = [(11 * i) % 5000 + 300 for i in range(200)]     # outgrows the first turn's 512 cells
    steer = SteerParams(contrast="reply", layer_start=15, layer_end=17)

    def turn_two(cls, reuse: bool):
        with cls(m, EngineParams(ctx_size=1024, n_threads=2, kv_reuse=reuse), steer) as g:
            if reuse:
                g.generate(first, "tr", n_predict=4, special=True)
            small = g.cells("tr")
            r = g.generate(second, "tr", n_predict=len(forced), special=True, forced_tokens=forced, record_logits=True)
            return r, small, g.cells("tr")

    with Model(gemma_path) as m:
        fresh, _, _ = turn_two(Generator, False)
        grown, small, cells = turn_two(Generator, True)
        kept, _, _ = turn_two(TodaySized, True)
        assert cells > small and grown.n_reused_tokens == kept.n_reused_tokens > 10
        base = np.stack(fresh.logits)
        d_grown, d_kept = (np.abs(np.stack(r.logits) - base).mean() for r in (grown, kept))
        assert d_grown < 1.5 * d_kept + 0.01, (d_grown, d_kept)


def test_serve_frees_idle_contexts_after_ten_minutes_by_default(tiny_chat, monkeypatch):
    from click.testing import CliRunner

    import fgdilp_cpp.serve.server as server
    from fgdilp_cpp.cli import main

    seen = []
    monkeypatch.setattr(server, "run_server", lambda det, *a, **k: seen.append(det.settings.kv_idle_s))
    for args, want in (([], 600), (["--kv-idle-s", "30"], 30), (["--kv-idle-s", "0"], 0)):
        r = CliRunner().invoke(main, ["serve", "-m", str(tiny_chat), "-c", "256", "--port", "0", *args])
        assert r.exit_code == 0, r.output
        assert seen[-1] == want
    r = CliRunner().invoke(main, ["serve", "-m", str(tiny_chat), "--kv-idle-s", "-1"])
    assert r.exit_code != 0 and "kv-idle-s" in r.output
