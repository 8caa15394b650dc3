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

from .errors import ContextLengthError, FgdilpError
from .settings import CHAT_DEFAULTS  # noqa: F401 - the chat commands read them here

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
    prompt: str           # the formatted conversation
    n_tokens: int
    dropped: int          # oldest messages removed to fit


def fit(messages: list[dict], template: ChatTemplate, count: Callable[[str], int], budget: int) -> Fitted:
    """Drop the oldest non-system messages (a user turn with its reply) until the formatted
    conversation is at most `budget` tokens; the last user message always stays."""
    msgs = list(messages)
    system = [m for m in msgs[:1] if m["role"] == "system"]
    rest = msgs[len(system):]
    dropped = 0
    while True:
        prompt = template.format(system + rest)
        n = count(prompt)
        if n <= budget:
            return Fitted(system + rest, prompt, n, dropped)
        if len(rest) <= 1:
            raise ContextLengthError(f"the message is {n} tokens with the chat template (and system prompt); "
                              f"the context leaves room for {budget} (raise -c or shorten it)")
        cut = 1
        while cut < len(rest) - 1 and rest[cut]["role"] != "user":   # drop up to the next user turn
            cut += 1
        rest = rest[cut:]
        dropped += cut
