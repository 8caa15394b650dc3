"""Perplexity of a continuation given its prompt, under a judge model read by llama.cpp.

The judge is its own Model and Context (logits for every row that predicts a continuation token),
independent of the generator's contexts and never steered. ppl = exp(mean NLL of the continuation
tokens), the log-softmax taken in float64 in numpy. Several (prompt, continuation) pairs are packed
into one decode as different sequences; a pair longer than a batch is decoded in chunks.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from ..engine import Batch, Context, ContextParams, Model
from ..errors import FgdilpError


@dataclass
class _Item:
    index: int            # position in the caller's list
    tokens: list[int]     # prompt tokens + continuation tokens
    first: int            # index in `tokens` of the first continuation token
    nll: float = 0.0
    done: int = 0         # tokens decoded so far (the last token is never decoded: it is only a target)
    seq: int = -1

    @property
    def todo(self) -> int:
        return len(self.tokens) - 1 - self.done


def log_softmax_nll(logits: np.ndarray, target: int) -> float:
    """-log softmax(logits)[target], in float64."""
    x = np.asarray(logits, dtype=np.float64)
    m = x.max()
    return float(m + math.log(np.exp(x - m).sum()) - x[target])


class PerplexityJudge:
    """Perplexity of continuations under one GGUF model; use as a context manager.

    model: a GGUF path (loaded and owned here) or an open Model (shared, not closed here).
    n_batch: rows per decode; n_outputs: rows with logits per decode (each costs n_vocab floats of
    llama.cpp's output buffer: 64 rows of gemma-3's 262k vocabulary are 64 MiB); n_seq: pairs per
    decode; max_tokens: the longest prompt + continuation kept (longer prompts lose their oldest
    tokens, BOS kept)."""

    def __init__(self, model: "str | os.PathLike | Model", n_batch: int = 512, n_outputs: int = 64,
                 n_seq: int = 16, max_tokens: int = 2048, n_threads: int = 0, type_k: str = "f16",
                 type_v: str = "f16", flash_attn: str = "auto", hook=None):
        """hook: a NativeHook for the context (a subclass steers the rows it scores: _before_decode)."""
        if n_batch < 2 or n_outputs < 1 or n_seq < 1 or max_tokens < 2:
            raise FgdilpError("perplexity judge: n_batch >= 2, n_outputs >= 1, n_seq >= 1, max_tokens >= 2")
        self._own = not isinstance(model, Model)
        self.model = Model(model) if self._own else model
        self.ctx = None
        try:
            self.n_batch, self.n_outputs, self.n_seq, self.max_tokens = n_batch, n_outputs, n_seq, max_tokens
            # KV in use at once: the rows of one decode plus the earlier chunks of one long pair
            params = ContextParams(n_ctx=n_batch + max_tokens, n_batch=n_batch, n_seq_max=n_seq,
                                   n_outputs_max=n_outputs, n_threads=n_threads, type_k=type_k, type_v=type_v,
                                   flash_attn=flash_attn)
            self.ctx = Context(self.model, params, hook=hook)
            self._batch = Batch(n_batch)
            self._space_prefix = self._adds_space_prefix()
        except BaseException:
            self.close()
            raise
        self.name = self.model.meta("general.name") or os.path.basename(self.model.info.path)
        # prompts hold a chat template's control tokens (a user message formatted for the model)
        self.special_prompts = False

    def _adds_space_prefix(self) -> bool:
        """True when the tokenizer puts a space before the first word of any text (SentencePiece's
        add_space_prefix): a continuation that starts with a space then loses that space before it
        is tokenized on its own, so that it is not counted twice."""
        toks = self.model.tokenize("a", add_bos=False)
        return bool(toks) and self.model.detokenize(toks).startswith(" ")

    # ---- tokens ---------------------------------------------------------------------------------
    def _item(self, index: int, prompt: str, continuation: str) -> _Item | None:
        if not continuation:
            return None
        if self._space_prefix and continuation.startswith(" "):
            continuation = continuation[1:]
        cont = self.model.tokenize(continuation, add_bos=False) if continuation else []
        if not cont:
            return None
        head = self.model.tokenize(prompt, add_bos=True, special=self.special_prompts) if prompt else []
        if not head:                       # nothing conditions the first token: start from BOS if any
            bos = self.model.bos
            if bos >= 0:
                head = [bos]
            else:
                head, cont = cont[:1], cont[1:]
                if not cont:
                    return None
        budget = self.max_tokens - len(cont)
        if budget < 1:                     # the continuation alone is too long: keep its start
            cont = cont[:self.max_tokens - 1]
            budget = 1
        if len(head) > budget:             # keep BOS (when there is one) and the prompt's last tokens
            keep_bos = head[0] == self.model.bos and budget > 1
            head = head[:1] + head[len(head) - budget + 1:] if keep_bos else head[len(head) - budget:]
        return _Item(index, head + cont, len(head))

    # ---- scoring --------------------------------------------------------------------------------
    def ppl(self, prompt: str, continuation: str) -> float:
        """exp(mean NLL of the continuation's tokens given the prompt); nan for an empty continuation."""
        return self.ppl_many([(prompt, continuation)])[0]

    def nll_many(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[float, int]]:
        """(summed NLL, number of continuation tokens) per pair; (nan, 0) for an empty continuation."""
        if self.ctx is None:
            raise FgdilpError("the perplexity judge is closed")
        out: list[tuple[float, int]] = [(float("nan"), 0)] * len(pairs)
        items = [it for it in (self._item(i, p, c) for i, (p, c) in enumerate(pairs)) if it is not None]
        for it in self._run(items):
            out[it.index] = (it.nll, len(it.tokens) - it.first)
        return out

    def ppl_many(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        return [math.exp(nll / n) if n else float("nan") for nll, n in self.nll_many(pairs)]

    def _run(self, items: list[_Item]) -> Iterable[_Item]:
        ctx, b = self.ctx, self._batch
        ctx.clear()
        free = list(range(self.n_seq))
        live: list[_Item] = []           # items with a sequence id, in the order their rows are added
        queue = list(items)
        finished: list[_Item] = []
        while queue or any(it.todo for it in live):
            b.clear()
            rows: list[tuple[int, _Item, int]] = []   # (row, item, target token index)
            n_out = 0
            # the unfinished item from the last decode goes first, then new ones while they fit
            for it in [it for it in live if it.todo]:
                n_out = self._add_rows(b, it, rows, n_out)
            while queue and b.n < self.n_batch and n_out < self.n_outputs and free:
                it = queue.pop(0)
                it.seq = free.pop(0)
                live.append(it)
                n_out = self._add_rows(b, it, rows, n_out)
            self._before_decode([row for row, _, _ in rows])
            ctx.decode(b)
            for (_, it, _), nll in zip(rows, self._row_nlls([(row, it.tokens[t]) for row, it, t in rows])):
                it.nll += nll
            for it in [it for it in live if not it.todo]:
                ctx.seq_rm(it.seq)
                free.append(it.seq)
                live.remove(it)
                finished.append(it)
        return finished

    def _row_nlls(self, rows: list[tuple[int, int]]) -> list[float]:
        """-log softmax at each (batch row, target token) of the last decode, in float64."""
        return [log_softmax_nll(self.ctx.logits(row), target) for row, target in rows]

    def _before_decode(self, scored_rows: list[int]) -> None:
        """Called before each decode with the batch rows whose logits are scored (each predicts a
        continuation token): nothing here; a steered judge edits exactly these rows."""

    def _add_rows(self, b: Batch, it: _Item, rows: list, n_out: int) -> int:
        """Add as many of the item's next tokens as the batch and its logits rows allow."""
        while it.todo and b.n < self.n_batch:
            i = it.done
            want = i >= it.first - 1          # this position predicts a continuation token
            if want and n_out >= self.n_outputs:
                break
            row = b.add(it.tokens[i], i, it.seq, want)
            if want:
                rows.append((row, it, i + 1))
                n_out += 1
            it.done += 1
        return n_out

    # ---- lifetime -------------------------------------------------------------------------------
    def close(self) -> None:
        if getattr(self, "_batch", None) is not None:
            self._batch.close()
            self._batch = None
        if getattr(self, "ctx", None) is not None:
            self.ctx.close()
            self.ctx = None
        if getattr(self, "_own", False) and getattr(self, "model", None) is not None:
            self.model.close()
            self.model = None

    def __enter__(self) -> "PerplexityJudge":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        self.close()
