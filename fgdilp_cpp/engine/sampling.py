"""llama.cpp sampler chains: top-k -> top-p -> min-p -> temperature -> seeded draw (or greedy)."""

from __future__ import annotations

import llama_cpp.llama_cpp as ll

from ..params import SamplingParams
from .owned import Owned


class Sampler(Owned):
    """One sampler chain (its own RNG state); sample() reads the logits of one batch row."""

    def __init__(self, params: SamplingParams):
        params.validate()
        self.params = params
        self._s = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
        self._open = True
        add = lambda smpl: ll.llama_sampler_chain_add(self._s, smpl)  # noqa: E731
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
        return ll.llama_sampler_sample(self._s, ctx.ptr, row)

    def _free(self) -> None:
        ll.llama_sampler_free(self._s)
        self._s = None
