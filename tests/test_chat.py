"""Chat: the template from the GGUF, context-level steering, trimming, and the API's chat calls."""

import threading

import pytest

from fgdilp_cpp import Detoxifier, FgdilpError
from fgdilp_cpp.chat import ChatTemplate, normalize
from fgdilp_cpp.chat.fitting import fit_chat

MSGS = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "the cat sat on a mat"}]


@pytest.fixture
def det(tiny_chat):
    with Detoxifier.from_file(tiny_chat, chat=True, ctx_size=512, n_predict=10, threads=1, method="tr",
                              selfgen_samples=3, selfgen_tokens=6, selfgen_min_tokens=2) as d:
        yield d


def test_template_from_gguf_and_stream_equals_chat(det):
    fitted = fit_chat(det, MSGS)
    assert det.chat_format.template.name == "from the GGUF"
    assert fitted.prompt == ("<|im_start|>system\nbe kind<|im_end|>\n<|im_start|>user\nthe cat sat on a mat"
                             "<|im_end|>\n<|im_start|>assistant\n")
    res = det.chat(MSGS, seed=3)
    assert res.method == "tr" and res.fired_layers == 3 and len(res.tokens) == 10
    assert res.n_prompt_tokens == len(det.model.tokenize(fitted.prompt, special=True))
    stream = det.stream_chat(MSGS, seed=3)
    assert "".join(stream) == res.text and stream.result.text == res.text
    assert det.chat(MSGS, seed=3, method="none").text != res.text      # steering changed the reply


def test_fgdilp_samples_are_candidate_replies(det):
    """FGDILP's self-generated samples are what the model would answer unsteered (seeds seed+1..)."""
    res = det.chat(MSGS, seed=7, method="fgdilp", explain=True)
    samples = [s["text"] for s in res.explain["samples"]]
    assert len(samples) == 3 and res.fired_layers == 3
    for i, text in enumerate(samples):
        assert det.chat(MSGS, seed=8 + i, method="none", n_predict=6).text == text
    assert res.explain["dropped_messages"] == 0


def test_per_call_steering_overrides(det):
    base = det.chat(MSGS, seed=5, method="none").text
    assert det.chat(MSGS, seed=5, steer_scale=0.0).text == base          # scale 0: no edit
    assert det.chat(MSGS, seed=5, steer_layer_range=(2, 2)).text != base
    assert det.chat(MSGS, seed=5).text != base                          # defaults back in force
    with pytest.raises(FgdilpError, match="outside"):
        det.chat(MSGS, steer_layer_range=(0, 9))


def test_history_is_trimmed_oldest_first(tiny_chat):
    long_turns = []
    for i in range(12):
        long_turns += [{"role": "user", "content": f"question {i} " + "word " * 20},
                       {"role": "assistant", "content": f"answer {i} " + "word " * 20}]
    msgs = [MSGS[0]] + long_turns + [{"role": "user", "content": "last one"}]
    with Detoxifier.from_file(tiny_chat, chat=True, ctx_size=400, n_predict=40, threads=1, method="tr") as d:
        fitted = fit_chat(d, msgs)
        assert fitted.dropped > 0 and fitted.dropped % 2 == 0
        assert fitted.messages[0] == MSGS[0] and fitted.messages[-1]["content"] == "last one"
        assert fitted.messages[1]["role"] == "user"
        assert fitted.n_tokens + 40 + d.generator.prefix_room("tr") <= 400
        res = d.chat(msgs, seed=1)
        assert res.explain["dropped_messages"] == fitted.dropped and res.stop_reason == "length"
        with pytest.raises(FgdilpError, match="does not fit"):
            d.chat(msgs, trim=False)
        with pytest.raises(FgdilpError, match="tokens"):
            d.chat([{"role": "user", "content": "word " * 500}])


def test_model_without_template_needs_chat_template(tiny_llama):
    with Detoxifier.from_file(tiny_llama[0], chat=True, ctx_size=256, n_predict=4, threads=1) as d:
        with pytest.raises(FgdilpError, match="--chat-template"):
            d.chat(MSGS)
        assert d.generate("plain text still works", method="none").tokens
    with Detoxifier.from_file(tiny_llama[0], chat=True, chat_template="llama3", ctx_size=256, n_predict=4,
                              threads=1, method="none") as d:
        assert fit_chat(d, MSGS).prompt.startswith("<|start_header_id|>system")
        assert len(d.chat(MSGS).tokens) == 4
    with pytest.raises(FgdilpError, match="does not support"):
        ChatTemplate(None, "no-such-format")


def test_messages_are_checked():
    assert normalize([("developer", "x"), ("user", "y")])[0]["role"] == "system"
    for bad in ([], [("user", "a"), ("assistant", "b")], [("robot", "a")], [{"role": "user", "content": 3}]):
        with pytest.raises(FgdilpError):
            normalize(bad)


def test_cancel_stream_chat_from_another_thread(tiny_chat):
    with Detoxifier.from_file(tiny_chat, chat=True, ctx_size=4096, n_predict=3000, threads=1, method="tr") as d:
        stream = d.stream_chat(MSGS, seed=2)
        got = []
        for piece in stream:
            got.append(piece)
            if len(got) == 3:
                threading.Thread(target=d.cancel).start()
        assert stream.result.stop_reason == "cancelled" and 3 <= len(stream.result.tokens) < 3000
        assert len(d.chat(MSGS, seed=2, n_predict=5).tokens) == 5           # usable afterwards


def test_a_byte_order_mark_is_not_part_of_the_message(monkeypatch):
    """A file piped into chat that starts with a UTF-8 BOM: the first message is the text alone."""
    from fgdilp_cpp.chat.repl import read_message

    lines = iter(["\ufeffhello there", '\ufeff"""', "one", '"""'])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert read_message() == "hello there"
    assert read_message() == "one"
