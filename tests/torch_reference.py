"""Plain-torch (float64) forward pass matching llama.cpp's ``llama`` graph.

Mirrors ``src/models/llama.cpp`` of the llama.cpp vendored in llama-cpp-python 0.3.36:

* RMSNorm: ``x / sqrt(mean(x**2) + eps) * w`` (attn_norm, ffn_norm, output_norm)
* RoPE, ``LLAMA_ROPE_TYPE_NORM`` (llama.cpp ``rope_type`` for ``LLM_ARCH_LLAMA``):
  rotates *consecutive* pairs ``(x[2i], x[2i+1])`` of each head by
  ``theta_i = pos * base**(-2i/n_rot)`` (no YaRN / scaling: ext_factor 0, freq_scale 1)
* GQA: query head ``h`` uses kv head ``h // (n_head // n_head_kv)`` (ggml mul_mat broadcast)
* causal softmax attention with scale ``1/sqrt(head_dim)``
* attention output (heads concatenated, ``[n_tokens, n_head*head_dim]``) -> ``attn_output`` (W_O)
* residual, SwiGLU FFN ``down(silu(gate(x)) * up(x))``, residual
* output norm, ``output.weight`` (or ``token_embd.weight`` when tied)

The attention output before W_O corresponds to llama.cpp's ``kqv_out-<il>`` graph node.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

try:  # works both as ``tests.torch_reference`` and with tests/ on sys.path
    from .tiny_model import TinyConfig
except ImportError:  # pragma: no cover
    from tiny_model import TinyConfig

__all__ = ["TorchLlama", "SeqState", "EditFn"]

EditFn = Callable[[int, torch.Tensor], Optional[torch.Tensor]]

_DT = torch.float64


@dataclass
class SeqState:
    """Per-sequence KV cache: per layer, K (post-RoPE) and V as [n_head_kv, n_past, head_dim]."""

    k: list[torch.Tensor] = field(default_factory=list)
    v: list[torch.Tensor] = field(default_factory=list)
    n_past: int = 0
    tokens: list[int] = field(default_factory=list)

    def copy(self) -> "SeqState":
        return SeqState(k=[t.clone() for t in self.k], v=[t.clone() for t in self.v],
                        n_past=self.n_past, tokens=list(self.tokens))


def _t(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a), dtype=_DT)


class TorchLlama:
    def __init__(self, weights: dict, cfg: TinyConfig):
        self.cfg = cfg
        w = {k: _t(v) for k, v in weights.items()}
        self.tok_embd = w["token_embd.weight"]                      # [n_vocab, n_embd]
        self.output = w.get("output.weight", self.tok_embd)        # [n_vocab, n_embd]
        self.output_norm = w["output_norm.weight"]
        self.layers = []
        for il in range(cfg.n_layer):
            p = f"blk.{il}."
            self.layers.append({
                name: w[p + name + ".weight"]
                for name in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                             "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")
            })
        self.n_vocab = self.tok_embd.shape[0]
        hd = cfg.head_dim
        # theta_i = base**(-2i/n_rot), i = 0 .. n_rot/2-1
        self.inv_freq = cfg.rope_base ** (-torch.arange(0, hd, 2, dtype=_DT) / hd)

    # ------------------------------------------------------------------ helpers
    def new_state(self) -> SeqState:
        cfg = self.cfg
        empty = lambda: torch.zeros(cfg.n_head_kv, 0, cfg.head_dim, dtype=_DT)  # noqa: E731
        return SeqState(k=[empty() for _ in range(cfg.n_layer)],
                        v=[empty() for _ in range(cfg.n_layer)])

    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + self.cfg.rms_eps) * w

    def _rope(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """x: [n_heads, n_tokens, head_dim]; NORM mode: rotate (x[2i], x[2i+1])."""
        ang = pos.to(_DT)[:, None] * self.inv_freq[None, :]      # [n_tokens, hd/2]
        cos, sin = torch.cos(ang), torch.sin(ang)
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out = torch.empty_like(x)
        out[..., 0::2] = x0 * cos - x1 * sin
        out[..., 1::2] = x0 * sin + x1 * cos
        return out

    # ------------------------------------------------------------------ forward
    @torch.no_grad()
    def forward(self, state: SeqState, tokens: list[int], edit: Optional[EditFn] = None
                ) -> tuple[np.ndarray, list[np.ndarray]]:
        """Append ``tokens`` to ``state`` and run them.

        Returns (logits [n_tokens, n_vocab] float64, per-layer attention outputs before W_O,
        each [n_tokens, n_head*head_dim], recorded before ``edit``).
        """
        cfg = self.cfg
        tokens = [int(t) for t in tokens]
        n = len(tokens)
        if n == 0:
            return np.zeros((0, self.n_vocab)), [np.zeros((0, cfg.n_q)) for _ in range(cfg.n_layer)]
        H, Hkv, hd = cfg.n_head, cfg.n_head_kv, cfg.head_dim
        group = H // Hkv
        p0 = state.n_past
        pos = torch.arange(p0, p0 + n)
        # causal mask over [n_past + n] keys
        kpos = torch.arange(0, p0 + n)
        mask = torch.where(kpos[None, :] <= pos[:, None], 0.0, float("-inf")).to(_DT)  # [n, p0+n]
        scale = 1.0 / np.sqrt(hd)

        x = self.tok_embd[torch.tensor(tokens)]                    # [n, n_embd]
        attn_records: list[np.ndarray] = []
        for il, L in enumerate(self.layers):
            h = self._rms(x, L["attn_norm"])
            q = (h @ L["attn_q"].T).view(n, H, hd).transpose(0, 1)      # [H, n, hd]
            k = (h @ L["attn_k"].T).view(n, Hkv, hd).transpose(0, 1)    # [Hkv, n, hd]
            v = (h @ L["attn_v"].T).view(n, Hkv, hd).transpose(0, 1)
            q = self._rope(q, pos)
            k = self._rope(k, pos)
            state.k[il] = torch.cat([state.k[il], k], dim=1)
            state.v[il] = torch.cat([state.v[il], v], dim=1)
            K = state.k[il].repeat_interleave(group, dim=0)             # [H, p0+n, hd]
            V = state.v[il].repeat_interleave(group, dim=0)
            att = torch.softmax(q @ K.transpose(1, 2) * scale + mask, dim=-1)  # [H, n, p0+n]
            o = (att @ V).transpose(0, 1).reshape(n, H * hd)            # [n, H*hd], head h at h*hd
            attn_records.append(o.numpy().copy())
            if edit is not None:
                new = edit(il, o.clone())
                if new is not None:
                    new = torch.as_tensor(new, dtype=_DT)
                    if tuple(new.shape) != (n, H * hd):
                        raise ValueError(f"edit returned shape {tuple(new.shape)}, expected {(n, H * hd)}")
                    o = new
            x = x + o @ L["attn_output"].T
            h = self._rms(x, L["ffn_norm"])
            f = torch.nn.functional.silu(h @ L["ffn_gate"].T) * (h @ L["ffn_up"].T)
            x = x + f @ L["ffn_down"].T
        x = self._rms(x, self.output_norm)
        logits = x @ self.output.T
        state.n_past += n
        state.tokens.extend(tokens)
        return logits.numpy().copy(), attn_records
