"""Conversations: messages formatted by the model's chat template, and trimmed to fit a context.

Templates are llama.cpp's own (llama_chat_apply_template): the GGUF's tokenizer.chat_template is
matched to one of llama.cpp's built-in formats; `--chat-template NAME` picks one by name (or
passes a Jinja template text for llama.cpp to recognise). Steering is context-level: the whole
formatted conversation is the prompt that TR/FGDILP prefixes go in front of, and FGDILP's
self-generated samples are candidate assistant replies (they end at the template's end-of-turn).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Optional, Sequence, Union

import llama_cpp.llama_cpp as ll

from ..errors import ContextLengthError, FgdilpError
from ..settings import CHAT_DEFAULTS  # noqa: F401 - the chat commands read them here

ROLES = ("system", "user", "assistant")
Message = Mapping[str, str]                 # {"role": ..., "content": ...}
MessagesLike = Sequence[Union[Message, tuple]]


def builtin_templates() -> list[str]:
    """Names of llama.cpp's built-in chat formats (chatml, llama3, gemma, ...)."""
    out = (ctypes.c_char_p * 256)()
    n = ll.llama_chat_builtin_templates(out, 256)
    return [out[i].decode() for i in range(min(n, 256))]


def normalize(messages: MessagesLike) -> list[dict]:
    """[{"role", "content"}] from dicts or (role, content) pairs; checks roles and text."""
    out = []
    for i, m in enumerate(messages):
        if isinstance(m, tuple) and len(m) == 2:
            role, content = m
        elif isinstance(m, Mapping):
            role, content = m.get("role"), m.get("content")
        else:
            raise FgdilpError(f"message {i} must be a {{'role', 'content'}} mapping")
        if role == "developer":          # OpenAI's newer name for the system role
            role = "system"
        if role not in ROLES:
            raise FgdilpError(f"message {i} has role {role!r}; one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise FgdilpError(f"message {i} content must be text")
        if "\x00" in content:
            raise FgdilpError(f"message {i} contains a NUL character")
        out.append({"role": role, "content": content})
    if not out:
        raise FgdilpError("the conversation has no messages")
    if out[-1]["role"] != "user":
        raise FgdilpError("the last message must be the user's (the reply is the assistant's)")
    return out


class ChatTemplate:
    """A model's chat format through llama.cpp; `override` is a built-in name or a template text."""

    def __init__(self, model_template: Optional[str], override: Optional[str] = None, model_name: str = "model"):
        if override:
            self.source, self.name = override.encode(), override
        elif model_template:
            self.source, self.name = model_template.encode(), "from the GGUF"
        else:
            raise FgdilpError(f"{model_name} has no chat template in its GGUF metadata; pass "
                              f"--chat-template NAME (one of: {', '.join(builtin_templates())})")
        try:
            self.format([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}])
        except FgdilpError:
            what = f"--chat-template {override!r}" if override else f"the chat template of {model_name}"
            raise FgdilpError(f"llama.cpp does not support {what}; pass --chat-template NAME "
                              f"(one of: {', '.join(builtin_templates())})") from None

    @classmethod
    def for_model(cls, model, override: Optional[str] = None) -> "ChatTemplate":
        raw = ll.llama_model_chat_template(model.ptr, None)
        text = raw.decode("utf-8", errors="replace") if raw else None
        return cls(text, override, model.meta("general.name") or "this model")

    def format(self, messages: Iterable[Message], add_generation_prompt: bool = True) -> str:
        """The conversation as the model's prompt text (special tokens as text)."""
        msgs = list(messages)
        arr = (ll.llama_chat_message * max(len(msgs), 1))()
        keep = []
        for i, m in enumerate(msgs):
            role, content = m["role"].encode(), m["content"].encode("utf-8")
            keep += [role, content]
            arr[i].role, arr[i].content = role, content
        size = 256 + 2 * sum(len(x) for x in keep)
        for _ in range(2):
            buf = ctypes.create_string_buffer(size)
            n = ll.llama_chat_apply_template(self.source, arr, len(msgs), add_generation_prompt, buf, size)
            if n < 0:
                raise FgdilpError(f"llama.cpp cannot apply the chat template ({self.name})")
            if n <= size:
                return buf.raw[:n].decode("utf-8", errors="replace")
            size = n + 1
        raise FgdilpError("the formatted conversation kept growing")


@dataclass(frozen=True)
class Fitted:
    messages: list[dict]
    prompt: str           # the formatted conversation (a ChatPrompt: .special says how to tokenize it)
    n_tokens: int
    dropped: int          # oldest messages removed to fit


def turn_starts(messages: list[dict]) -> list[int]:
    """Where the conversation (after its system message) may start once its oldest turns are
    dropped: 0, then each next user message (a user turn goes with its replies); the last
    message is the user's and always stays."""
    starts = [0]
    while starts[-1] < len(messages) - 1:
        cut = starts[-1] + 1
        while cut < len(messages) - 1 and messages[cut]["role"] != "user":
            cut += 1
        starts.append(cut)
    return starts


def fit(messages: list[dict], render: Callable[[list[dict]], str], count: Callable[[str], int], budget: int,
        trim: bool = True, floor: Optional[Callable[[list[dict]], int]] = None) -> Fitted:
    """The conversation rendered (render: messages -> prompt) in at most `budget` tokens.
    trim=False: counted once, ContextLengthError if it is over. trim=True: the fewest oldest
    non-system turns dropped (see turn_starts) that make it fit, found by a binary search (a
    conversation's tokens shrink as turns go: O(log turns) countings, never one per dropped turn);
    ContextLengthError if the last user message alone does not fit. floor: a lower bound on the
    tokens, found without tokenizing: a conversation it puts over the budget is never tokenized
    (llama.cpp's special-token parse costs the markers times the length; docs/results/server-cost.md)."""
    msgs = list(messages)
    system = [m for m in msgs[:1] if m["role"] == "system"]
    rest = msgs[len(system):]
    starts = turn_starts(rest)
    tried: dict[int, tuple[Optional[str], int]] = {}

    def at(j: int) -> tuple[Optional[str], int]:
        """(prompt, tokens) of the conversation from turn start j; (None, its floor) where the floor
        alone is over the budget (then the tokens are too)."""
        if j not in tried:
            kept = system + rest[starts[j]:]
            least = floor(kept) if floor is not None else 0
            p = render(kept) if least <= budget else None
            tried[j] = (p, count(p)) if p is not None else (None, least)
        return tried[j]

    prompt, n = at(0)
    if n <= budget:                  # (a conversation left untokenized is over the budget)
        assert prompt is not None
        return Fitted(msgs, prompt, n, 0)
    many = "" if prompt is not None else "at least "
    if not trim:
        raise ContextLengthError(f"the conversation does not fit the context: {many}{n} tokens with the chat "
                                 f"template, and the context leaves room for {budget} with the reply; drop "
                                 f"older messages")
    last = len(starts) - 1
    if at(last)[1] > budget:
        many = "" if at(last)[0] is not None else "at least "
        raise ContextLengthError(f"the message is {many}{at(last)[1]} tokens with the chat template (and system "
                                 f"prompt); the context leaves room for {budget} (raise -c or shorten it)")
    lo, hi = 0, last                 # at(lo) is over the budget, at(hi) within it
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if at(mid)[1] > budget else (lo, mid)
    prompt, n = at(hi)
    assert prompt is not None        # within the budget: it was rendered
    return Fitted(system + rest[starts[hi]:], prompt, n, starts[hi])
