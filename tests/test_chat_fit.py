"""Fitting a conversation to the context: one tokenization when nothing may be dropped, a binary
search over the turns when old ones may go (the same result as dropping them one at a time)."""

import random
import time

import pytest

from fgdilp_cpp import Detoxifier
from fgdilp_cpp.chat import fit, turn_starts
from fgdilp_cpp.errors import ContextLengthError
from fgdilp_cpp.chat.fitting import chat_floor, fit_chat, fit_conversation

ROLES = ("user", "assistant")


def old_fit(msgs, render, count, budget):
    """The algorithm fit replaced: render and count again after every dropped turn."""
    system = [m for m in msgs[:1] if m["role"] == "system"]
    rest, dropped = msgs[len(system):], 0
    while True:
        prompt = render(system + rest)
        n = count(prompt)
        if n <= budget:
            return system + rest, prompt, n, dropped
        if len(rest) <= 1:
            raise ContextLengthError("too long")
        cut = 1
        while cut < len(rest) - 1 and rest[cut]["role"] != "user":
            cut += 1
        rest, dropped = rest[cut:], dropped + cut


def random_conversation(rng):
    msgs = [{"role": "system", "content": "s" * rng.randint(1, 30)}] if rng.random() < 0.5 else []
    for _ in range(rng.randint(0, 40)):
        msgs.append({"role": rng.choice(ROLES), "content": "w " * rng.randint(0, 40)})
    return msgs + [{"role": "user", "content": "w " * rng.randint(1, 40)}]


def plain_render(msgs):
    return "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in msgs) + "<assistant>"


def test_the_binary_search_drops_what_the_old_loop_dropped():
    rng = random.Random(0)
    count = lambda text: len(text) // 3          # noqa: E731 - shrinks as turns go, as tokens do
    compared = refused = trimmed = 0
    for _ in range(400):
        msgs = random_conversation(rng)
        budget = rng.randint(5, 300)
        try:
            want = old_fit(msgs, plain_render, count, budget)
        except ContextLengthError:
            with pytest.raises(ContextLengthError):
                fit(msgs, plain_render, count, budget)
            refused += 1
            continue
        got = fit(msgs, plain_render, count, budget)
        assert (got.messages, got.prompt, got.n_tokens, got.dropped) == want
        compared, trimmed = compared + 1, trimmed + (got.dropped > 0)
    assert compared > 100 and refused > 20 and trimmed > 100


def test_the_same_on_the_model_s_template_and_tokenizer(tiny_chat):
    rng = random.Random(1)
    with Detoxifier.from_file(tiny_chat, chat=True, ctx_size=512, n_predict=10, threads=1, method="tr") as det:
        render, count = det.chat_format.template.format, lambda p: len(det.model.tokenize(p, special=True))  # noqa: E731
        trimmed = 0
        for _ in range(40):
            msgs = random_conversation(rng)
            budget = rng.randint(20, 600)
            try:
                want = old_fit(msgs, render, count, budget)
            except ContextLengthError:
                continue
            got = fit(msgs, render, count, budget)
            assert (got.messages, got.prompt, got.n_tokens, got.dropped) == want
            trimmed += got.dropped > 0
        assert trimmed > 10


class Counting:
    def __init__(self):
        self.calls = 0

    def __call__(self, text):
        self.calls += 1
        return len(text) // 3


def test_no_trim_counts_once_and_trim_logarithmically():
    msgs = [{"role": r, "content": "hi there"} for r in ROLES] * 2000 + [{"role": "user", "content": "last"}]
    once = Counting()
    with pytest.raises(ContextLengthError, match="does not fit"):
        fit(msgs, plain_render, once, 100, trim=False)
    assert once.calls == 1
    some = Counting()
    got = fit(msgs, plain_render, some, 100)
    assert got.messages[-1]["content"] == "last" and got.n_tokens <= 100 and some.calls <= 2 + 12  # log2(2001) < 11
    assert len(turn_starts(msgs)) == 2001


def test_a_long_conversation_is_refused_or_trimmed_in_well_under_a_second(tiny_chat):
    """800 turns: the old loop tokenized the conversation once per dropped turn (issue #27)."""
    msgs = [{"role": "user", "content": "hi"}] * 800
    with Detoxifier.from_file(tiny_chat, chat=True, ctx_size=256, n_predict=8, threads=1, method="tr") as det:
        t0 = time.perf_counter()
        with pytest.raises(ContextLengthError):
            fit_chat(det, msgs, trim=False)
        fitted = fit_chat(det, msgs)
        assert time.perf_counter() - t0 < 1.0
        assert fitted.dropped > 700 and fitted.messages[-1] == msgs[-1]


def special_conversation(rng):
    """Random turns, some empty, some holding the vocabulary's control-token texts."""
    words = ["w", "hello", "</s>", "<s>", "<unk>", "<|im_end|>", " ", "\n", "é€"]
    msgs = [{"role": "system", "content": "".join(rng.choices(words, k=rng.randint(0, 5)))}] \
        if rng.random() < 0.5 else []
    for _ in range(rng.randint(0, 12)):
        msgs.append({"role": rng.choice(ROLES), "content": "".join(rng.choices(words, k=rng.randint(0, 8)))})
    return msgs + [{"role": "user", "content": "".join(rng.choices(words, k=rng.randint(1, 8)))}]


@pytest.mark.parametrize("template", ["chatml", "llama2", "gemma", "llama3"])
def test_the_token_floor_never_exceeds_the_tokens(tiny_llama, template):
    """chat_floor is what the server refuses on without tokenizing: it must be a lower bound
    (llama2 and gemma write <s> / </s>, control tokens of the tiny vocabulary, as their own markers)."""
    rng = random.Random(2)
    with Detoxifier.from_file(str(tiny_llama[0]), chat=True, chat_template=template, ctx_size=512, threads=1,
                              method="none") as det:
        for _ in range(150):
            msgs = special_conversation(rng)
            floor, _ = chat_floor(det, msgs)
            n = fit_conversation(det, msgs, det.settings.updated({"ctx_size": 100_000}), "none").n_tokens
            assert floor <= n, (msgs, floor, n)
        assert det.chat_format._markers == {"llama2": ("</s>",), "gemma": ()}.get(template, ())


def test_a_floor_spares_tokenizing_without_changing_the_result():
    rng = random.Random(3)
    count = Counting()
    for _ in range(300):
        msgs = random_conversation(rng)
        budget = rng.randint(5, 300)
        try:
            want = old_fit(msgs, plain_render, lambda t: len(t) // 3, budget)
        except ContextLengthError:
            with pytest.raises(ContextLengthError):
                fit(msgs, plain_render, count, budget, floor=lambda m: len(plain_render(m)) // 7)
            continue
        got = fit(msgs, plain_render, count, budget, floor=lambda m: len(plain_render(m)) // 7)
        assert (got.messages, got.prompt, got.n_tokens, got.dropped) == want
    refused = Counting()
    msgs = [{"role": r, "content": "hi there"} for r in ROLES] * 2000 + [{"role": "user", "content": "last"}]
    with pytest.raises(ContextLengthError, match="at least"):
        fit(msgs, plain_render, refused, 100, trim=False, floor=lambda m: len(plain_render(m)) // 7)
    assert refused.calls == 0                       # refused on the floor: never counted


def test_twenty_thousand_messages_through_the_api_in_a_second_or_two(tiny_chat):
    """The chat API trims (the REPL does): the floor rules out the candidates far over the
    budget, so only conversations near the context's size are tokenized."""
    msgs = [{"role": "user", "content": "hi"}] * 20_000
    with Detoxifier.from_file(tiny_chat, chat=True, ctx_size=256, n_predict=8, threads=1, method="tr") as det:
        t0 = time.perf_counter()
        with pytest.raises(ContextLengthError, match="at least"):
            fit_chat(det, msgs, trim=False)
        fitted = fit_chat(det, msgs)
        assert time.perf_counter() - t0 < 3.0
        assert fitted.messages[-1] == msgs[-1] and fitted.n_tokens <= 256
