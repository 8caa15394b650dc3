"""llama.cpp sampler chains: [grammar ->] [penalties ->] top-k -> top-p -> min-p -> temperature ->
seeded draw (or greedy). The grammar and the penalties join the chain only when asked for, so that
the default chain, and the tokens it draws, are what they were without them."""

from __future__ import annotations

import ctypes
import math
from typing import Optional

import llama_cpp.llama_cpp as ll
import numpy as np

from ..errors import FgdilpError, ParamError
from ..params import SamplingParams
from .owned import Owned

GRAMMAR_ROOT = b"root"
_TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])    # = llama_token_data


def grammar_error(vocab, grammar: str) -> Optional[str]:
    """Why llama.cpp's grammar sampler refuses the GBNF text `grammar` for `vocab`, or None when it
    accepts it (llama.cpp prints its parser's own message on stderr, not to its log)."""
    if "\x00" in grammar:
        return "contains a NUL character"
    smpl = ll.llama_sampler_init_grammar(vocab, grammar.encode("utf-8"), GRAMMAR_ROOT)
    if not smpl:
        return ("is not a grammar llama.cpp accepts (GBNF: a syntax error, an undefined rule, no root rule "
                "or left recursion)")
    ll.llama_sampler_free(smpl)
    return None


class Sampler(Owned):
    """One sampler chain (its own RNG state); sample() reads the logits of one batch row.
    vocab: the model's vocabulary (llama_vocab pointer), needed by a grammar (params.grammar)."""

    def __init__(self, params: SamplingParams, vocab=None, n_vocab: int = 0):
        params.validate()
        if params.grammar is not None and vocab is None:
            raise FgdilpError("a grammar needs the model's vocabulary")
        self.params = params
        self._s = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
        self._open = True
        add = lambda smpl: ll.llama_sampler_chain_add(self._s, smpl)  # noqa: E731
        if params.grammar is not None:
            smpl = ll.llama_sampler_init_grammar(vocab, params.grammar.encode("utf-8"), GRAMMAR_ROOT)
            if not smpl:
                raise ParamError("grammar", grammar_error(vocab, params.grammar) or "is not a valid grammar")
            add(smpl)
        if params.penalizes:
            add(ll.llama_sampler_init_penalties(n_vocab, params.repeat_last_n, params.repeat_penalty,
                                                params.frequency_penalty, params.presence_penalty))
        if params.temp == 0:
            add(ll.llama_sampler_init_greedy())
            return
        if params.top_k > 0:
            add(ll.llama_sampler_init_top_k(params.top_k))
        if params.top_p < 1.0:
            add(ll.llama_sampler_init_top_p(params.top_p, 1))
        if params.min_p > 0.0:
            add(ll.llama_sampler_init_min_p(params.min_p, 1))
        add(ll.llama_sampler_init_temp(params.temp))
        add(ll.llama_sampler_init_dist(params.seed))

    def sample(self, ctx, row: int) -> int:
        """Draw a token from the logits of `row` of the last decode (and accept it)."""
        if self.params.grammar is None:
            return ll.llama_sampler_sample(self._s, ctx.ptr, row)
        return self._sample_checked(ctx.logits(row))

    def _sample_checked(self, logits: np.ndarray) -> int:
        """llama_sampler_sample's steps (apply the chain, accept its pick), with a check between
        them: a grammar that allows no token here leaves every logit at -inf, and accepting a
        token the grammar rejects aborts the process inside llama.cpp."""
        data = np.empty(len(logits), dtype=_TOKEN_DATA)
        data["id"] = np.arange(len(logits), dtype=np.int32)
        data["logit"] = logits
        data["p"] = 0.0
        cur = ll.llama_token_data_array(data=data.ctypes.data_as(ll.llama_token_data_p), size=len(logits),
                                        selected=-1, sorted=False)
        ll.llama_sampler_apply(self._s, ctypes.byref(cur))
        if not 0 <= cur.selected < cur.size or not math.isfinite(cur.data[cur.selected].logit):
            raise ParamError("grammar", "allows no token of this model's vocabulary at this point of the reply")
        token = cur.data[cur.selected].id
        ll.llama_sampler_accept(self._s, token)
        return token

    def _free(self) -> None:
        ll.llama_sampler_free(self._s)
        self._s = None
