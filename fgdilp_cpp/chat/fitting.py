"""A conversation fitted to a Detoxifier's context: formatted with the model's chat template, its
oldest turns dropped until it fits with room for the steering prefixes and the reply.

fit_chat(det, messages) is what Detoxifier.chat and stream_chat run before they generate (serve
fits a request on its own thread first); chat_floor(det, messages) is the bound the server
checks before any tokenizer runs. `det` is an api.Detoxifier (not imported: api imports this
module); ChatFormat is its `chat_format`.
"""

from __future__ import annotations

from typing import Any, Optional

from .. import methods
from ..call_settings import run_settings
from ..errors import FgdilpError
from ..settings import Settings
from . import ChatTemplate, Fitted, MessagesLike, fit, normalize
from .tokens import chat_prompt, conversation_floor, template_markers, vocab_stats


class ChatFormat:
    """The model's chat template, read on first use (a model without one still continues text:
    the read raises only when a conversation needs it), and the template's own control-token
    texts that the token floor counts."""

    def __init__(self, model: Any, override: Optional[str]):
        self.model, self.override = model, override
        self._template: Optional[ChatTemplate] = None
        self._markers: Optional[tuple[str, ...]] = None

    @property
    def template(self) -> ChatTemplate:
        if self._template is None:
            self._template = ChatTemplate.for_model(self.model, self.override)
        return self._template

    def floor(self, msgs: list[dict]) -> int:
        """A lower bound on the formatted conversation's tokens, found without tokenizing."""
        stats = vocab_stats(self.model)
        if self._markers is None:
            self._markers = template_markers(self.model, self.template.format, stats)
        return conversation_floor(msgs, self.template.format, stats, self._markers)


def fit_chat(det: Any, messages: MessagesLike, trim: bool = True, **overrides: Any) -> Fitted:
    """The conversation formatted for the model, its oldest turns dropped until it fits the
    context with room for the steering prefixes and the reply (the last message stays);
    trim=False: ContextLengthError instead of dropping any. overrides: the call's settings."""
    s, method = run_settings(det, overrides)
    return fit_conversation(det, messages, s, method, trim)


def chat_floor(det: Any, messages: MessagesLike, **overrides: Any) -> tuple[int, int]:
    """(a lower bound on the conversation's tokens, the tokens fit_chat allows it), found
    without tokenizing: the server refuses a body that cannot fit before any tokenizer runs."""
    s, method = run_settings(det, overrides)
    return det.chat_format.floor(_with_system(normalize(messages), s)), _chat_budget(det, s, method)


def fit_conversation(det: Any, messages: MessagesLike, s: Settings, method: str, trim: bool = True) -> Fitted:
    """fit_chat at settings already resolved (`method`: the name the call runs as)."""
    fmt: ChatFormat = det.chat_format
    msgs = _with_system(normalize(messages), s)
    stats = vocab_stats(det.model)
    render = lambda m: chat_prompt(m, fmt.template.format, stats)   # noqa: E731
    count = lambda p: len(det.model.tokenize(p, special=p.special))   # noqa: E731
    return fit(msgs, render, count, _chat_budget(det, s, method), trim, fmt.floor)


def as_user_message(det: Any, text: str) -> str:
    """`text` as one user message in the model's chat template, ready for the reply (directions
    and the fast setup read chat prompts so)."""
    if not text.strip():
        raise FgdilpError("the prompt is empty")
    return fit_chat(det, [{"role": "user", "content": text}], method=methods.UNSTEERED).prompt


def _chat_budget(det: Any, s: Settings, method: str) -> int:
    reply = min(s.n_predict, s.ctx_size // 2)
    return s.ctx_size - reply - det.generator.prefix_room(method)


def _with_system(msgs: list[dict], s: Settings) -> list[dict]:
    if s.system_prompt and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": s.system_prompt})
    return msgs
