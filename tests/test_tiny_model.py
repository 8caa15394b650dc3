"""Sanity tests for the tiny GGUF test models and the torch reference forward.

Uses llama-cpp-python's low-level ctypes API only (no ``llama_cpp.Llama``).
"""

from __future__ import annotations

import ctypes
import filecmp

import numpy as np
import pytest
import torch

import llama_cpp as L

try:  # tests/ as a package
    from .tiny_model import (BOS_ID, EOS_ID, TinyConfig, build_tiny_llama, build_tiny_mamba,
                             tokenizer_vocab, write_non_gguf, write_truncated_copy,
                             gpu_layers_for_tests)
    from .torch_reference import TorchLlama
except ImportError:  # tests/ on sys.path (pytest rootdir-less "prepend" import mode)
    from tiny_model import (BOS_ID, EOS_ID, TinyConfig, build_tiny_llama, build_tiny_mamba,
                            tokenizer_vocab, write_non_gguf, write_truncated_copy,
                            gpu_layers_for_tests)
    from torch_reference import TorchLlama


# ----------------------------------------------------------------------------- llama.cpp helpers

L.llama_backend_init()


class _TensorHead(ctypes.Structure):
    """Leading fields of ``struct ggml_tensor`` (ggml.h): enough to read the shape."""
    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p),
                ("ne", ctypes.c_int64 * 4), ("nb", ctypes.c_size_t * 4)]


def _ggml_base():
    import os
    lib = ctypes.CDLL(os.path.join(os.path.dirname(L.__file__), "lib", "libggml-base.so"))
    lib.ggml_get_name.restype = ctypes.c_char_p
    lib.ggml_get_name.argtypes = [ctypes.c_void_p]
    lib.ggml_nbytes.restype = ctypes.c_size_t
    lib.ggml_nbytes.argtypes = [ctypes.c_void_p]
    lib.ggml_is_contiguous.restype = ctypes.c_bool
    lib.ggml_is_contiguous.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_tensor_get.restype = None
    lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    return lib


class KqvCapture:
    """cb_eval callback that copies every ``kqv_out-<il>`` node (F32 [n_head*head_dim, n_tokens])."""

    def __init__(self):
        self.lib = _ggml_base()
        self.captured: dict[int, list[np.ndarray]] = {}
        self.cb = L.ggml_backend_sched_eval_callback(self._cb)

    def _cb(self, t, ask, user_data):
        name = self.lib.ggml_get_name(t).decode()
        if not name.startswith("kqv_out-"):
            return False if ask else True
        if ask:
            return True
        head = _TensorHead.from_address(t)
        assert head.type == L.GGML_TYPE_F32 and self.lib.ggml_is_contiguous(t)
        ne0, ne1 = head.ne[0], head.ne[1]
        arr = np.empty((ne1, ne0), dtype=np.float32)
        self.lib.ggml_backend_tensor_get(t, arr.ctypes.data, 0, arr.nbytes)
        self.captured.setdefault(int(name.split("-")[1]), []).append(arr)
        return True


class Runner:
    """Minimal model+context wrapper over the ctypes API."""

    def __init__(self, path, n_ctx=128, n_batch=64, flash_attn=L.LLAMA_FLASH_ATTN_TYPE_DISABLED,
                 kv_type=L.GGML_TYPE_F32, cb_eval=None):
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = gpu_layers_for_tests()
        self.model = L.llama_model_load_from_file(str(path).encode(), mp)
        if not self.model:
            raise RuntimeError(f"failed to load {path}")
        cp = L.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = n_batch
        cp.n_ubatch = n_batch
        cp.n_seq_max = 1
        cp.n_threads = 2
        cp.n_threads_batch = 2
        cp.flash_attn_type = flash_attn
        cp.type_k = kv_type
        cp.type_v = kv_type
        if cb_eval is not None:
            cp.cb_eval = cb_eval
            cp.cb_eval_user_data = None
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            L.llama_model_free(self.model)
            raise RuntimeError("failed to create context")
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        self.n_past = 0
        self.batch = L.llama_batch_init(n_batch, 0, 1)

    def close(self):
        if self.ctx:
            L.llama_batch_free(self.batch)
            L.llama_free(self.ctx)
            L.llama_model_free(self.model)
            self.ctx = self.model = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (L.llama_token * cap)()
        n = L.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        assert n >= 0, n
        return list(buf[:n])

    def detokenize(self, tokens: list[int], remove_special: bool = False, unparse_special: bool = False) -> str:
        arr = (L.llama_token * max(1, len(tokens)))(*tokens)
        cap = 16 * len(tokens) + 16
        out = ctypes.create_string_buffer(cap)
        n = L.llama_detokenize(self.vocab, arr, len(tokens), out, cap, remove_special, unparse_special)
        assert n >= 0, n
        return out.raw[:n].decode("utf-8")

    def decode(self, tokens: list[int], all_logits: bool = True) -> np.ndarray:
        """Decode ``tokens`` in one batch at the next positions of sequence 0; return logits rows."""
        b = self.batch
        n = len(tokens)
        for i, t in enumerate(tokens):
            b.token[i] = t
            b.pos[i] = self.n_past + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = 1 if (all_logits or i == n - 1) else 0
        b.n_tokens = n
        rc = L.llama_decode(self.ctx, b)
        assert rc == 0, f"llama_decode returned {rc}"
        rows = range(n) if all_logits else [n - 1]
        out = np.stack([
            np.ctypeslib.as_array(L.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,)).astype(np.float64)
            for i in rows
        ])
        self.n_past += n
        return out


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def tiny(tiny_llama):
    """(path, cfg, weights) of conftest's tiny llama, in this module's order."""
    path, weights, cfg = tiny_llama
    return path, cfg, weights


TEXTS = [
    "Where is the capital of France? Paris.",
    "the a and of in is on",
    "Hello, world!",
    "  two leading spaces and trailing  ",
    "line one\nline two\ttab",
    "héllo wörld — ünïcödé",
    "日本語のテキスト 🙂🚀",
    "x",
]


# ----------------------------------------------------------------------------- tiny_model tests

def test_build_is_deterministic(tmp_path):
    a, b, c = tmp_path / "a.gguf", tmp_path / "b.gguf", tmp_path / "c.gguf"
    wa = build_tiny_llama(a, TinyConfig(seed=3))
    wb = build_tiny_llama(b, TinyConfig(seed=3))
    build_tiny_llama(c, TinyConfig(seed=4))
    assert filecmp.cmp(a, b, shallow=False)
    assert not filecmp.cmp(a, c, shallow=False)
    assert wa.keys() == wb.keys()
    assert all(np.array_equal(wa[k], wb[k]) for k in wa)
    m1, m2 = tmp_path / "m1.gguf", tmp_path / "m2.gguf"
    build_tiny_mamba(m1, seed=1)
    build_tiny_mamba(m2, seed=1)
    assert filecmp.cmp(m1, m2, shallow=False)


def test_weight_shapes(tiny):
    _, cfg, w = tiny
    n_vocab = len(tokenizer_vocab()[0])
    assert 300 <= n_vocab <= 1000
    assert w["token_embd.weight"].shape == (n_vocab, cfg.n_embd)
    assert w["output.weight"].shape == (n_vocab, cfg.n_embd)
    assert w["blk.0.attn_q.weight"].shape == (cfg.n_head * cfg.head_dim, cfg.n_embd)
    assert w["blk.0.attn_k.weight"].shape == (cfg.n_head_kv * cfg.head_dim, cfg.n_embd)
    assert w["blk.0.attn_v.weight"].shape == (cfg.n_head_kv * cfg.head_dim, cfg.n_embd)
    assert w["blk.0.attn_output.weight"].shape == (cfg.n_embd, cfg.n_head * cfg.head_dim)
    assert w["blk.0.ffn_gate.weight"].shape == (cfg.n_ff, cfg.n_embd)
    assert w["blk.0.ffn_down.weight"].shape == (cfg.n_embd, cfg.n_ff)
    assert w["output_norm.weight"].shape == (cfg.n_embd,)
    assert all(v.dtype == np.float32 for v in w.values())


def test_llama_loads_with_metadata(tiny):
    path, cfg, _ = tiny
    with Runner(path) as r:
        m = r.model
        assert L.llama_model_n_embd(m) == cfg.n_embd
        assert L.llama_model_n_layer(m) == cfg.n_layer
        assert L.llama_model_n_head(m) == cfg.n_head
        assert L.llama_model_n_head_kv(m) == cfg.n_head_kv
        assert L.llama_model_n_ctx_train(m) == cfg.n_ctx_train
        assert L.llama_model_rope_type(m) == L.LLAMA_ROPE_TYPE_NORM
        assert not L.llama_model_is_recurrent(m)
        assert r.n_vocab == len(tokenizer_vocab()[0])
        assert L.llama_vocab_type(r.vocab) == L.LLAMA_VOCAB_TYPE_SPM
        assert L.llama_vocab_bos(r.vocab) == BOS_ID
        assert L.llama_vocab_eos(r.vocab) == EOS_ID
        assert L.llama_vocab_get_add_bos(r.vocab)
        buf = ctypes.create_string_buffer(64)
        n = L.llama_model_meta_val_str(m, b"general.architecture", buf, 64)
        assert buf.value[:n] == b"llama"


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_round_trip(tiny, text):
    path, _, _ = tiny
    with Runner(path) as r:
        toks = r.tokenize(text, add_special=False)
        assert toks and BOS_ID not in toks
        assert all(0 <= t < r.n_vocab for t in toks)
        # SPM prepends a '▁' to the text; detokenize strips it again from the first token
        assert r.detokenize(toks) == text
        with_bos = r.tokenize(text, add_special=True)
        assert with_bos[0] == BOS_ID and with_bos[1:] == toks
        # with a leading BOS the prefix space is kept (llama.cpp quirk), whether or not BOS is removed
        assert r.detokenize(with_bos, remove_special=True) == " " + text
        assert r.detokenize(with_bos, remove_special=False) == " " + text
        assert r.detokenize(with_bos, unparse_special=True) == "<s> " + text


def test_tokenizer_uses_pieces_and_byte_fallback(tiny):
    path, _, _ = tiny
    tokens = tokenizer_vocab()[0]
    with Runner(path) as r:
        toks = r.tokenize("the capital of Paris", add_special=False)
        pieces = [tokens[t] for t in toks]
        assert pieces[0] == "\u2581the"
        assert "\u2581of" in pieces and "\u2581Paris" in pieces
        toks = r.tokenize("日", add_special=False)  # U+65E5 = e6 97 a5, not in the vocab
        assert [tokens[t] for t in toks] == ["\u2581", "<0xE6>", "<0x97>", "<0xA5>"]


# ----------------------------------------------------------------------------- logits vs torch

PROMPT = "the capital of France is Paris."  # BOS + 11 pieces


def _compare(path, cfg, weights, flash_attn, tol=1e-3):
    ref = TorchLlama(weights, cfg)
    st = ref.new_state()
    with Runner(path, flash_attn=flash_attn) as r:
        toks = r.tokenize(PROMPT, add_special=True)
        assert len(toks) == 12
        got = r.decode(toks, all_logits=True)
        want, attn = ref.forward(st, toks)
        assert got.shape == want.shape == (12, r.n_vocab)
        assert len(attn) == cfg.n_layer and attn[0].shape == (12, cfg.n_head * cfg.head_dim)
        scale = np.abs(want).max()
        assert 1.0 < scale < 50.0, scale  # logits are not flat
        assert np.abs(got - want).max() < tol
        # a few more tokens, one at a time, through the KV cache
        for t in [int(np.argmax(want[-1])), 300, 2, 5]:
            got1 = r.decode([t])
            want1, _ = ref.forward(st, [t])
            assert np.abs(got1 - want1).max() < tol
        assert r.n_past == st.n_past == 16


# Without flash attention and with an F32 KV cache the CPU graph is all-F32: agreement ~1e-5.
# With flash attention llama.cpp casts K and V to F16 (llama-graph.cpp build_attn_mha, even for
# an F32 cache) and the CPU kernel converts Q to F16 too, so agreement is only ~1e-2.
@pytest.mark.parametrize("flash_attn,tol", [(L.LLAMA_FLASH_ATTN_TYPE_DISABLED, 1e-3),
                                            (L.LLAMA_FLASH_ATTN_TYPE_ENABLED, 1e-1)],
                         ids=["no_fa", "fa"])
def test_logits_match_torch_reference(tiny, flash_attn, tol):
    path, cfg, weights = tiny
    _compare(path, cfg, weights, flash_attn, tol)


def test_logits_match_torch_reference_other_shape(tmp_path):
    # head_dim independent of n_embd/n_head (key_length/value_length), MQA, tied output
    cfg = TinyConfig(n_embd=48, n_layer=2, n_head=4, n_head_kv=1, head_dim=8, n_ff=80,
                     rope_base=500.0, rms_eps=1e-6, seed=7, tie_output=True)
    path = tmp_path / "tiny-other.gguf"
    weights = build_tiny_llama(path, cfg)
    assert "output.weight" not in weights
    _compare(path, cfg, weights, L.LLAMA_FLASH_ATTN_TYPE_DISABLED)


def test_attention_outputs_match_llama_kqv_out(tiny):
    """TorchLlama's per-layer pre-W_O records equal llama.cpp's ``kqv_out-<il>`` nodes."""
    path, cfg, weights = tiny
    ref = TorchLlama(weights, cfg)
    st = ref.new_state()
    cap = KqvCapture()
    with Runner(path, cb_eval=cap.cb) as r:
        toks = r.tokenize(PROMPT, add_special=True)
        r.decode(toks)
        _, attn = ref.forward(st, toks)
        _, attn2 = ref.forward(st, [7])
        r.decode([7])
    assert sorted(cap.captured) == list(range(cfg.n_layer))
    for il in range(cfg.n_layer):
        first, second = cap.captured[il][-2:]
        assert first.shape == (len(toks), cfg.n_head * cfg.head_dim) and second.shape == (1, cfg.n_head * cfg.head_dim)
        assert np.abs(first - attn[il]).max() < 1e-4
        assert np.abs(second - attn2[il]).max() < 1e-4


def test_torch_reference_incremental_and_edit(tiny):
    _, cfg, weights = tiny
    ref = TorchLlama(weights, cfg)
    toks = [1, 300, 301, 302, 303, 304, 305, 306]
    full, attn_full = ref.forward(ref.new_state(), toks)
    st = ref.new_state()
    a, attn_a = ref.forward(st, toks[:5])
    b, attn_b = ref.forward(st, toks[5:])
    np.testing.assert_allclose(np.concatenate([a, b]), full, atol=1e-10)
    for il in range(cfg.n_layer):
        np.testing.assert_allclose(np.concatenate([attn_a[il], attn_b[il]]), attn_full[il], atol=1e-10)

    # an edit returning None changes nothing
    same, _ = ref.forward(ref.new_state(), toks, edit=lambda il, o: None)
    np.testing.assert_array_equal(same, full)

    # zeroing head 1 of layer 1: layer-0/1 records unchanged, later layers and logits change
    hd = cfg.head_dim

    def zero_head(il, o):
        if il == 1:
            o[:, hd:2 * hd] = 0
            return o
        return None

    edited, attn_e = ref.forward(ref.new_state(), toks, edit=zero_head)
    np.testing.assert_array_equal(attn_e[0], attn_full[0])
    np.testing.assert_array_equal(attn_e[1], attn_full[1])  # recorded before the edit
    assert np.abs(attn_e[2] - attn_full[2]).max() > 1e-3
    assert np.abs(edited - full).max() > 1e-3

    # equivalent to zeroing the matching W_O columns
    w2 = dict(weights)
    wo = w2["blk.1.attn_output.weight"].copy()
    wo[:, hd:2 * hd] = 0
    w2["blk.1.attn_output.weight"] = wo
    alt, _ = TorchLlama(w2, cfg).forward(TorchLlama(w2, cfg).new_state(), toks)
    np.testing.assert_allclose(alt, edited, atol=1e-10)

    # the edit receives a torch tensor of the right shape
    seen = []
    ref.forward(ref.new_state(), toks[:3], edit=lambda il, o: seen.append((il, type(o), tuple(o.shape))))
    assert seen == [(il, torch.Tensor, (3, cfg.n_head * hd)) for il in range(cfg.n_layer)]


# ----------------------------------------------------------------------------- mamba / bad input

def test_mamba_loads_and_decodes(tmp_path):
    path = tmp_path / "tiny-mamba.gguf"
    build_tiny_mamba(path)
    with Runner(path) as r:
        assert L.llama_model_is_recurrent(r.model)
        assert L.llama_model_n_head(r.model) == 0
        buf = ctypes.create_string_buffer(64)
        n = L.llama_model_meta_val_str(r.model, b"general.architecture", buf, 64)
        assert buf.value[:n] == b"mamba"
        toks = r.tokenize("the capital of France", add_special=True)
        lg = r.decode(toks, all_logits=False)
        assert lg.shape == (1, r.n_vocab) and np.isfinite(lg).all() and lg.std() > 0.1
        for t in [int(np.argmax(lg[-1])), 5, 6]:
            lg = r.decode([t])
            assert np.isfinite(lg).all()
        assert r.detokenize(toks[1:]) == "the capital of France"


def test_bad_files_do_not_load(tiny, tmp_path):
    path, _, _ = tiny
    trunc = write_truncated_copy(path, tmp_path / "trunc.gguf", keep_fraction=0.5)
    assert 0 < trunc.stat().st_size < path.stat().st_size
    junk = write_non_gguf(tmp_path / "junk.gguf")
    header_only = write_truncated_copy(path, tmp_path / "tiny-header.gguf", keep_fraction=0.01)
    for p in (trunc, junk, header_only):
        mp = L.llama_model_default_params()
        m = L.llama_model_load_from_file(str(p).encode(), mp)
        assert not m, p
