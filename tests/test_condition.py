"""--condition: a prompt the scorer reads below THETA is generated unsteered (bit for bit method
none: tokens and logits), one at or above it steered exactly as without the condition; what the
condition reads (the prompt; a chat's messages; eval's raw prompt, not the template); the settings,
sweep and profile plumbing."""

from __future__ import annotations

import numpy as np
import pytest

from fgdilp_cpp.api import Detoxifier
from fgdilp_cpp.condition import conversation_texts, describe, prompt_condition, text_toxicities
from fgdilp_cpp.errors import FgdilpError, ParamError
from fgdilp_cpp.evaluation.runner import generate_group
from fgdilp_cpp.evaluation.sweep import parse_sweep, schedule
from fgdilp_cpp.explain import explain_lines
from fgdilp_cpp.generation import EngineParams, Generator
from fgdilp_cpp.params import SamplingParams, SteerParams
from fgdilp_cpp.profiles import PROFILE_FIELDS
from fgdilp_cpp.settings import Settings

BENIGN = "the cat sat on a mat"
HOSTILE = "i hate the cat that sat on a mat"


class KeywordScorer:
    """Toxicity 0.9 for a text that says "hate", 0.1 otherwise (the real scorer's interface);
    records the texts it was asked about."""

    LABELS = ("toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate")

    def __init__(self):
        self.asked: list[str] = []

    def score(self, texts):
        self.asked.extend(texts)
        return np.array([[0.9 if "hate" in t else 0.1] * 6 for t in texts])


def _run(model, prompt, method, condition, **kw):
    with Generator(model, EngineParams(ctx_size=256, n_threads=1), SteerParams(scale=1.5, condition=condition)) as gen:
        gen.rt.scorer = KeywordScorer()
        res = gen.generate(prompt, method, 6, SamplingParams(seed=3), record_logits=True, **kw)
        return res, gen.rt.scorer


@pytest.mark.parametrize("method", ["tr", "fgdilp-frozen"])
def test_a_prompt_below_the_condition_is_unsteered_bit_for_bit(model, method):
    for prompt in (BENIGN, HOSTILE):
        none, _ = _run(model, prompt, "none", None)
        plain, _ = _run(model, prompt, method, None)
        cond, scorer = _run(model, prompt, method, 0.5)
        assert scorer.asked == [prompt]
        if "hate" in prompt:      # read 0.9 >= 0.5: steered exactly as without the condition
            assert cond.explain["condition"] == {"threshold": 0.5, "toxicity": 0.9, "steered": True}
            assert cond.fired_layers == plain.fired_layers > 0
            assert cond.tokens == plain.tokens and np.array_equal(np.stack(cond.logits), np.stack(plain.logits))
            assert not np.array_equal(np.stack(cond.logits), np.stack(none.logits))   # and that steers
        else:                     # read 0.1 < 0.5: method none's tokens and logits, the hook never fired
            assert cond.explain["condition"] == {"threshold": 0.5, "toxicity": 0.1, "steered": False}
            assert cond.fired_layers == 0 and cond.method == method
            assert cond.tokens == none.tokens and np.array_equal(np.stack(cond.logits), np.stack(none.logits))
            assert not np.array_equal(np.stack(plain.logits), np.stack(none.logits))


def test_the_condition_reads_the_texts_it_is_given(model):
    # a benign prompt whose conversation held a hostile message is steered; the unsteered method never asks
    res, scorer = _run(model, BENIGN, "tr", 0.5, condition_texts=["hello", "i hate you", "  "])
    assert res.explain["condition"]["steered"] and res.fired_layers > 0
    assert scorer.asked == ["hello", "i hate you"]
    res, scorer = _run(model, HOSTILE, "none", 0.5)
    assert "condition" not in res.explain and scorer.asked == []
    res, _ = _run(model, BENIGN, "tr", 0.0)          # 0 steers every prompt
    assert res.explain["condition"]["steered"]


def test_toxicities_are_remembered_per_text(model):
    with Generator(model, EngineParams(ctx_size=256, n_threads=1)) as gen:
        gen.rt.scorer = scorer = KeywordScorer()
        assert text_toxicities(gen.rt, ["a", "i hate", "a"]) == [0.1, 0.9, 0.1]
        assert prompt_condition(gen.rt, 0.2, ["i hate", "b"]) == {"threshold": 0.2, "toxicity": 0.9, "steered": True}
        assert scorer.asked == ["a", "i hate", "b"]          # each text scored once


def test_chat_reads_the_conversation_not_the_template(tiny_chat):
    with Detoxifier.from_file(tiny_chat, chat=True, ctx_size=512, n_predict=4, threads=1, method="tr",
                              condition=0.5) as det:
        det.generator.rt.scorer = scorer = KeywordScorer()
        first = det.chat([{"role": "system", "content": "you hate nothing"}, {"role": "user", "content": "hi"}],
                         explain=True)
        assert first.explain["condition"]["steered"] is False and first.fired_layers == 0
        assert scorer.asked == ["hi"]                         # not the system prompt, not the template
        msgs = [{"role": "user", "content": "i hate you"}, {"role": "assistant", "content": "ok"},
                {"role": "user", "content": "and now?"}]
        later = det.chat(msgs)
        assert later.explain["condition"]["steered"] and later.fired_layers > 0
        stream = det.stream_chat(msgs)
        assert "".join(stream) == later.text and stream.result.explain["condition"]["steered"]
        assert any("not steered" in line for line in explain_lines(first.explain))
        off = det.chat(msgs, condition=None)                  # per call: off steers every prompt
        assert "condition" not in off.explain and off.tokens == later.tokens


def test_eval_conditions_on_the_raw_prompt_in_chat(monkeypatch):
    from fgdilp_cpp.evaluation import runner

    def fit_chat(det, messages, method):
        class F:
            prompt = "<template>" + messages[0]["content"] + "</template>"
        return F()

    monkeypatch.setattr(runner, "fit_chat", fit_chat)

    class Det:
        max_samples = 4

        def generate(self, prompt, **kw):
            self.kw = dict(kw, prompt=prompt)
            from fgdilp_cpp.results import GenResult, Sample
            return GenResult([Sample("x", [1], "length")] * kw["n_samples"], kw["method"], 3, 0.0, 0.0, 0.0, 1)

    det = Det()
    generate_group(det, "you idiot", "tr", 2, 4, 0.9, 0, point={"condition": 0.3}, chat=True)
    assert det.kw["prompt"] == "<template>you idiot</template>" and det.kw["condition_texts"] == ["you idiot"]
    assert det.kw["condition"] == 0.3


def test_settings_sweep_and_profile():
    assert Settings.from_env({"FGDILP_CONDITION": "off"}) == {"condition": None}
    assert Settings.from_env({"FGDILP_CONDITION": "0.2"}) == {"condition": 0.2}
    assert Settings().updated({"condition": 0.3}).steer().condition == 0.3
    for bad in (1.5, -0.1, float("nan")):
        with pytest.raises(ParamError) as err:
            Settings().updated({"condition": bad}).steer().check(3)
        assert err.value.field == "condition"
    assert parse_sweep("condition=0.2,off") == ("condition", [0.2, None])
    # it changes the steered methods, not the unsteered baseline nor the prompting one
    runs = {m: proj for _, m, proj in schedule(["none", "prompt", "tr", "fgdilp-frozen"], [{"condition": 0.2}])}
    assert runs == {"none": {}, "prompt": {}, "tr": {"condition": 0.2}, "fgdilp-frozen": {"condition": 0.2}}
    assert "condition" in PROFILE_FIELDS
    assert conversation_texts([{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                               {"role": "assistant", "content": "a"}]) == ["u", "a"]
    assert describe({"threshold": 0.2, "toxicity": 0.05, "steered": False}).startswith("not steered")


def test_cli_refuses_a_bad_condition(cli, tiny_llama):
    proc = cli("generate", "-m", str(tiny_llama[0]), "-n", "2", "--method", "tr", "--condition", "2", "-p", BENIGN)
    assert proc.returncode != 0 and "condition" in proc.stderr and "Traceback" not in proc.stderr
    with pytest.raises(FgdilpError, match="condition"):
        with Detoxifier.from_file(str(tiny_llama[0]), ctx_size=256, threads=1) as det:
            det.generate(BENIGN, n_predict=2, method="tr", condition=-1.0)


def test_eval_records_which_prompts_were_steered(tiny_llama, tmp_path):
    from fgdilp_cpp.evaluation.prompts import PromptRecord
    from fgdilp_cpp.evaluation.report import report_markdown
    from fgdilp_cpp.evaluation.runner import run_eval

    prompts = [PromptRecord(0, BENIGN), PromptRecord(1, HOSTILE)]
    with Detoxifier(Settings(model=str(tiny_llama[0]), ctx_size=256, threads=1), max_samples=2,
                    max_new=8) as det:
        det.generator.rt.scorer = KeywordScorer()
        res = run_eval(det, prompts, ["none", "tr"], 2, 4, 0.9, 1, tmp_path / "run", KeywordScorer(), {},
                       progress=False, grid=[{"condition": 0.5}, {"condition": None}])
    ms = res["report"]["methods"]
    assert ms["tr[condition=0.5]"]["steered_share"] == 0.5 and ms["tr[condition=off]"]["steered_share"] is None
    assert ms["none"]["steered_share"] is None
    assert "Prompts steered under `--condition` (the others generated unsteered): tr[condition=0.5] 50 %" \
        in report_markdown(res["report"])


def test_an_unsteered_chat_turn_runs_in_the_methods_own_context(tiny_chat):
    # issue 26: a conditioned method's unsteered turns do not open method none's context beside its
    # own (a second KV cache, and a steered turn that could not reuse the conversation): they run in
    # the method's context, as none's tokens and logits, and the steered turn after them reuses them
    turns = ["hi there", "tell me more", "i hate you", "and now?"]
    runs = {}
    for method, condition in (("none", None), ("tr", 0.5)):
        with Detoxifier.from_file(tiny_chat, chat=True, ctx_size=512, n_predict=4, threads=1, method=method,
                                  condition=condition) as det:
            det.generator.rt.scorer = KeywordScorer()
            msgs, out = [], []
            for t in turns:
                msgs.append({"role": "user", "content": t})
                res = det.chat(msgs)
                out.append(res)
                msgs.append({"role": "assistant", "content": res.text})
            runs[method] = (out, sorted(det.generator._ctx))
    (none, none_ctx), (tr, tr_ctx) = runs["none"], runs["tr"]
    assert none_ctx == ["none"] and tr_ctx == ["tr"]          # one context each
    for a, b in zip(none[:2], tr[:2]):                      # unsteered turns: none's tokens
        assert b.explain["condition"]["steered"] is False and b.fired_layers == 0 and a.tokens == b.tokens
    assert tr[1].n_reused_tokens > 0                        # the second turn kept the first's KV
    assert tr[2].explain["condition"]["steered"] and tr[2].fired_layers > 0
    assert tr[2].n_reused_tokens == none[2].n_reused_tokens > 0    # steered, on the kept conversation
