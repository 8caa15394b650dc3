"""Tiny random-weight GGUF models for tests.

Everything here is deterministic for a given seed and written in F32 so that
llama.cpp's CPU backend and the plain-torch reference in ``torch_reference.py``
agree to ~1e-5.

The models are written with ``gguf.GGUFWriter`` and load in the llama.cpp that is
vendored in llama-cpp-python 0.3.36.

Layout convention: numpy arrays are given to the writer in row-major
``(out_features, in_features)`` shape (torch ``nn.Linear.weight`` layout); gguf
records ``ne`` reversed, i.e. ``{in, out}``, which is what llama.cpp expects
(``create_tensor(..., {n_embd, n_out})``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import gguf

__all__ = [
    "TinyConfig",
    "build_tiny_llama",
    "build_tiny_mamba",
    "write_truncated_copy",
    "write_non_gguf",
    "tokenizer_vocab",
    "BOS_ID",
    "EOS_ID",
    "UNK_ID",
    "gpu_layers_for_tests",
]

# SmolLM2-135M-Instruct's template (ChatML); llama.cpp recognises it
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

def gpu_layers_for_tests() -> int:
    """Layers the tests offload (n_gpu_layers): FGDILP_TEST_NGL, 0 when unset.

    tools/gpu-check.sh sets it to 99 on a CUDA build to run the oracle tests with every layer on
    the GPU; on a CPU-only build llama.cpp has nowhere to offload to, so it changes nothing."""
    raw = os.environ.get("FGDILP_TEST_NGL", "0").strip() or "0"
    try:
        n = int(raw)
    except ValueError:
        raise ValueError(f"FGDILP_TEST_NGL={raw!r} is not a whole number of layers") from None
    if n < 0:
        raise ValueError(f"FGDILP_TEST_NGL={raw!r} must be 0 or more")
    return n


UNK_ID = 0
BOS_ID = 1
EOS_ID = 2
_BYTE_BASE = 3  # <0x00> is token 3, <0xFF> is token 258


@dataclass
class TinyConfig:
    n_embd: int = 64
    n_layer: int = 3
    n_head: int = 4
    n_head_kv: int = 2          # GQA: 2 query heads per kv head
    head_dim: int = 16          # written as key_length/value_length; n_rot == head_dim (llama requires it)
    n_ff: int = 96
    n_ctx_train: int = 32768    # -c is refused past it (settings.fit_ctx_size): room for the tests' contexts
    rms_eps: float = 1e-5
    rope_base: float = 10000.0
    seed: int = 0
    tie_output: bool = False    # if True, no output.weight is written (llama.cpp reuses token_embd)
    chat_template: str = ""     # written as tokenizer.chat_template when set (a Jinja text)
    mute_eos: bool = False      # zero EOS's output row: its logit is 0, far below top-k, so replies run long
    nan_tensor: str = ""        # a tensor written as NaN (a broken model: its logits are not finite)

    @property
    def n_q(self) -> int:
        """Width of the attention output before W_O (all heads concatenated)."""
        return self.n_head * self.head_dim

    @property
    def n_kv(self) -> int:
        return self.n_head_kv * self.head_dim


# --------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------

_SPACE = "\u2581"  # SentencePiece's '▁'

# A few dozen "normal" pieces.  llama.cpp's SPM tokenizer only builds a multi-char piece
# through a chain of merges whose intermediate strings are all in the vocabulary, so
# every prefix/bigram needed to reach e.g. '▁the' is present.  Anything not covered
# falls back to the <0xXX> byte tokens.
_NORMAL_PIECES: list[str] = (
    [_SPACE]
    + list("abcdefghijklmnopqrstuvwxyz")
    + list("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    + list("0123456789")
    + list(".,:;!?'\"-()")
    + [
        "th", "he", "the", "in", "an", "er", "on", "at", "en", "re", "is", "or",
        _SPACE + "t", _SPACE + "th", _SPACE + "the",
        _SPACE + "a", _SPACE + "an", _SPACE + "and",
        _SPACE + "i", _SPACE + "in", _SPACE + "is",
        _SPACE + "o", _SPACE + "of", _SPACE + "on",
        _SPACE + "w", _SPACE + "wh", _SPACE + "whe", _SPACE + "wher",
        _SPACE + "where",
        _SPACE + "c", _SPACE + "ca", _SPACE + "cap", "it", "al",
        _SPACE + "P", _SPACE + "Pa", _SPACE + "Par", _SPACE + "Pari", _SPACE + "Paris",
        _SPACE + "F", _SPACE + "Fr", "ra", "nc", "ce",
        # single-token answers for self-diagnosis ("yes" -> "▁yes" with the space prefix)
        _SPACE + "y", _SPACE + "ye", _SPACE + "yes", _SPACE + "n", _SPACE + "no",
        _SPACE + _SPACE,
    ]
)


def tokenizer_vocab() -> tuple[list[str], list[float], list[int]]:
    """Return (tokens, scores, token_types) of the tiny SentencePiece-style vocabulary."""
    tokens: list[str] = ["<unk>", "<s>", "</s>"]
    scores: list[float] = [0.0, 0.0, 0.0]
    types: list[int] = [int(gguf.TokenType.UNKNOWN), int(gguf.TokenType.CONTROL), int(gguf.TokenType.CONTROL)]
    for b in range(256):
        tokens.append(f"<0x{b:02X}>")
        scores.append(0.0)
        types.append(int(gguf.TokenType.BYTE))
    seen = set(tokens)
    for i, piece in enumerate(_NORMAL_PIECES):
        assert piece not in seen, piece
        seen.add(piece)
        tokens.append(piece)
        # SPM merges the highest-scoring bigram first; prefer longer pieces.
        scores.append(float(-1000.0 + 10.0 * len(piece) - 0.001 * i))
        types.append(int(gguf.TokenType.NORMAL))
    return tokens, scores, types


def _add_tokenizer(w: gguf.GGUFWriter) -> int:
    tokens, scores, types = tokenizer_vocab()
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(UNK_ID)
    w.add_bos_token_id(BOS_ID)
    w.add_eos_token_id(EOS_ID)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    return len(tokens)


# --------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------

def _normal(rng: np.random.Generator, shape, std: float) -> np.ndarray:
    return (rng.standard_normal(shape) * std).astype(np.float32)


def _norm_weight(rng: np.random.Generator, n: int) -> np.ndarray:
    return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)


def _write(w: gguf.GGUFWriter, tensors: dict[str, np.ndarray]) -> None:
    for name, arr in tensors.items():
        w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def build_tiny_llama(path, cfg: TinyConfig = TinyConfig()) -> dict[str, np.ndarray]:  # noqa: B008 (only read)
    """Write a tiny random ``llama`` GGUF (all F32) to ``path``.

    Returns the weights keyed by GGUF tensor name, linear weights in torch layout
    ``(out_features, in_features)``; 1-D norm weights as ``(n,)``.
    """
    path = os.fspath(path)
    if cfg.n_head % cfg.n_head_kv != 0:
        raise ValueError("n_head must be a multiple of n_head_kv")
    rng = np.random.default_rng(cfg.seed)
    n_vocab = len(tokenizer_vocab()[0])
    E, F = cfg.n_embd, cfg.n_ff

    t: dict[str, np.ndarray] = {}
    t["token_embd.weight"] = _normal(rng, (n_vocab, E), 1.0)
    for il in range(cfg.n_layer):
        p = f"blk.{il}."
        t[p + "attn_norm.weight"] = _norm_weight(rng, E)
        t[p + "attn_q.weight"] = _normal(rng, (cfg.n_q, E), 0.25)
        t[p + "attn_k.weight"] = _normal(rng, (cfg.n_kv, E), 0.25)
        t[p + "attn_v.weight"] = _normal(rng, (cfg.n_kv, E), 0.3)
        t[p + "attn_output.weight"] = _normal(rng, (E, cfg.n_q), 0.2)
        t[p + "ffn_norm.weight"] = _norm_weight(rng, E)
        t[p + "ffn_gate.weight"] = _normal(rng, (F, E), 0.25)
        t[p + "ffn_up.weight"] = _normal(rng, (F, E), 0.25)
        t[p + "ffn_down.weight"] = _normal(rng, (E, F), 0.2)
    t["output_norm.weight"] = _norm_weight(rng, E)
    out_w = _normal(rng, (n_vocab, E), 0.3)
    if cfg.mute_eos:
        out_w[EOS_ID] = 0.0
    if not cfg.tie_output:
        t["output.weight"] = out_w
    if cfg.nan_tensor:
        t[cfg.nan_tensor] = np.full_like(t[cfg.nan_tensor], np.nan)

    w = gguf.GGUFWriter(path, "llama")
    w.add_name("tiny-llama-test")
    w.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    w.add_context_length(cfg.n_ctx_train)
    w.add_embedding_length(E)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(F)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_head_kv)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)  # llama requires n_rot == head_dim
    w.add_layer_norm_rms_eps(cfg.rms_eps)
    w.add_rope_freq_base(cfg.rope_base)
    n_tok = _add_tokenizer(w)
    assert n_tok == n_vocab
    if cfg.chat_template:
        w.add_chat_template(cfg.chat_template)
    _write(w, t)
    return {k: v.copy() for k, v in t.items()}


def build_tiny_mamba(path, seed: int = 0) -> dict[str, np.ndarray]:
    """Write a tiny random ``mamba`` GGUF (no attention at all) to ``path``.

    Returns the tensors as written (numpy row-major shapes).
    """
    path = os.fspath(path)
    rng = np.random.default_rng(seed)
    n_vocab = len(tokenizer_vocab()[0])
    E, n_layer = 32, 2
    d_inner, d_state, d_conv, dt_rank = 2 * E, 8, 4, 4  # llama.cpp requires d_inner == 2*n_embd

    t: dict[str, np.ndarray] = {}
    t["token_embd.weight"] = _normal(rng, (n_vocab, E), 1.0)
    for il in range(n_layer):
        p = f"blk.{il}."
        t[p + "attn_norm.weight"] = _norm_weight(rng, E)
        t[p + "ssm_in.weight"] = _normal(rng, (2 * d_inner, E), 0.2)
        t[p + "ssm_conv1d.weight"] = _normal(rng, (d_inner, d_conv), 0.3)
        t[p + "ssm_conv1d.bias"] = _normal(rng, (d_inner,), 0.1)
        t[p + "ssm_x.weight"] = _normal(rng, (dt_rank + 2 * d_state, d_inner), 0.1)
        t[p + "ssm_dt.weight"] = _normal(rng, (d_inner, dt_rank), 0.2)
        t[p + "ssm_dt.bias"] = _normal(rng, (d_inner,), 0.1)
        # A = -exp(A_log) as the HF converter stores it (negative, for a decaying state)
        a_log = np.log(np.tile(np.arange(1, d_state + 1, dtype=np.float32), (d_inner, 1)))
        t[p + "ssm_a"] = (-np.exp(a_log)).astype(np.float32)
        t[p + "ssm_d"] = np.ones(d_inner, dtype=np.float32)
        t[p + "ssm_out.weight"] = _normal(rng, (E, d_inner), 0.2)
    t["output_norm.weight"] = _norm_weight(rng, E)
    t["output.weight"] = _normal(rng, (n_vocab, E), 0.3)

    w = gguf.GGUFWriter(path, "mamba")
    w.add_name("tiny-mamba-test")
    w.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    w.add_context_length(512)
    w.add_embedding_length(E)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(0)
    w.add_head_count(0)
    w.add_head_count_kv(0)
    w.add_ssm_conv_kernel(d_conv)
    w.add_ssm_inner_size(d_inner)
    w.add_ssm_state_size(d_state)
    w.add_ssm_time_step_rank(dt_rank)
    w.add_layer_norm_rms_eps(1e-5)
    _add_tokenizer(w)
    _write(w, t)
    return {k: v.copy() for k, v in t.items()}


# --------------------------------------------------------------------------------------
# bad inputs
# --------------------------------------------------------------------------------------

def write_truncated_copy(src, dst, keep_fraction: float = 0.5) -> Path:
    """Copy the first ``keep_fraction`` of ``src``'s bytes to ``dst`` (a corrupt GGUF)."""
    if not 0.0 <= keep_fraction < 1.0:
        raise ValueError("keep_fraction must be in [0, 1)")
    data = Path(src).read_bytes()
    Path(dst).write_bytes(data[: int(len(data) * keep_fraction)])
    return Path(dst)


def write_non_gguf(dst) -> Path:
    """Write a file that is clearly not GGUF (wrong magic, some text and bytes)."""
    rng = np.random.default_rng(12345)
    payload = b"NOTAGGUF this is not a model file\n" + rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
    Path(dst).write_bytes(payload)
    return Path(dst)
