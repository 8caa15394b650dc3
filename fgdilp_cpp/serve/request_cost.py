"""`serve`: a request's cost bounded before it reaches the model thread.

A body is refused (400) by cheap checks first: at most --max-messages messages and --max-chars
characters of text, then a lower bound on its tokens that needs no tokenizer (chat_tokens.
VocabStats.min_tokens of the formatted conversation) against the room the context leaves. Only a
conversation that passes is tokenized, once, on a fitting thread of its own (never the model
thread), so that a conversation too long for the context is a plain 400 before it is queued and a
request queued beside it waits for nothing but the model's own work. What passes is bounded by
the context, and so is its tokenizing (docs/results/server-cost.md).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Optional

from ..chat import Fitted
from ..chat.fitting import chat_floor, fit_chat
from ..chat.tokens import vocab_stats
from ..errors import ContextLengthError, FgdilpError
from .openai_api import ApiError, GenRequest

if TYPE_CHECKING:
    from ..api import Detoxifier

MAX_MESSAGES = 1024             # messages in one chat request
MAX_CHARS = 256 * 1024          # characters of message (or prompt) text in one request


def _too_long(chat: bool, message: str) -> ApiError:
    return ApiError(400, message, param="messages" if chat else "prompt", code="context_length_exceeded")


class RequestCost:
    """The checks, and the fitting thread (one: a flood of bodies cannot take every core)."""

    def __init__(self, det: Detoxifier, max_messages: int = MAX_MESSAGES, max_chars: int = MAX_CHARS):
        if max_messages < 1 or max_chars < 1:
            raise FgdilpError("--max-messages and --max-chars must be at least 1")
        self.det, self.max_messages, self.max_chars = det, max_messages, max_chars
        vocab_stats(det.model)          # the vocabulary scan now, not on a request
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fgdilp-fit")

    def check_body(self, body: dict[str, Any]) -> None:
        """Before the body is parsed: the message count (parsing 20,000 messages is work too)."""
        msgs = body.get("messages")
        if isinstance(msgs, list) and len(msgs) > self.max_messages:
            raise ApiError(400, f"messages holds {len(msgs)} messages; this server takes at most "
                           f"{self.max_messages}", param="messages", code="too_many_messages")

    def check(self, req: GenRequest) -> None:
        """After parsing, without tokenizing: the text's size, and its tokens' lower bound."""
        messages = req.messages
        chat = messages is not None
        texts = [m["content"] for m in messages] if messages is not None else [req.prompt or ""]
        chars = sum(len(t) for t in texts)
        if chars > self.max_chars:
            raise ApiError(400, f"the {'messages hold' if chat else 'prompt holds'} {chars} characters; this "
                           f"server takes at most {self.max_chars}", param="messages" if chat else "prompt",
                           code="request_too_large")
        try:
            if messages is not None:
                floor, room = chat_floor(self.det, messages, **req.overrides)
            else:
                floor, room = vocab_stats(self.det.model).min_tokens(req.prompt or ""), self.det.settings.ctx_size - 1
        except FgdilpError as exc:
            raise ApiError(400, str(exc)) from None
        if floor > room:
            what = "conversation" if chat else "prompt"
            raise _too_long(chat, f"the {what} is at least {floor} tokens, and the context leaves room for "
                            f"{room}" + (" with the reply; drop older messages" if chat else ""))

    async def fit(self, req: GenRequest) -> Optional[Fitted]:
        """A chat request's conversation formatted and tokenized once, on the fitting thread (None
        for a completion): a 400 if it does not fit the context with room for the reply."""
        messages = req.messages
        if messages is None:
            return None
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(
                self._pool, lambda: fit_chat(self.det, messages, trim=False, **req.overrides))
        except ContextLengthError as exc:
            raise _too_long(True, str(exc)) from None
        except FgdilpError as exc:       # e.g. special-token text a template would change
            raise ApiError(400, str(exc), param="messages") from None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
