"""Read model weights straight from a GGUF file: offsets from llama.cpp's own gguf reader (fast:
it skips the big tokenizer arrays), bytes through a memory map, dequantised by gguf-py."""

from __future__ import annotations

import ctypes
import hashlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import llama_cpp  # noqa: F401  (loads libggml-base)
import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from ..errors import FgdilpError


class _InitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]


def _ggml_base() -> ctypes.CDLL:
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    lib = ctypes.CDLL(str(next(iter(sorted(lib_dir.glob("libggml-base.so*"))))))
    lib.gguf_init_from_file.restype = ctypes.c_void_p
    lib.gguf_init_from_file.argtypes = [ctypes.c_char_p, _InitParams]
    lib.gguf_free.argtypes = [ctypes.c_void_p]
    lib.gguf_get_data_offset.restype = ctypes.c_size_t
    lib.gguf_get_data_offset.argtypes = [ctypes.c_void_p]
    lib.gguf_find_tensor.restype = ctypes.c_int64
    lib.gguf_find_tensor.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.gguf_get_tensor_offset.restype = ctypes.c_size_t
    lib.gguf_get_tensor_offset.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.gguf_get_tensor_ne.restype = ctypes.POINTER(ctypes.c_int64)
    lib.gguf_get_tensor_ne.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.gguf_get_tensor_type.restype = ctypes.c_int
    lib.gguf_get_tensor_type.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.gguf_get_tensor_size.restype = ctypes.c_size_t
    lib.gguf_get_tensor_size.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.gguf_get_n_tensors.restype = ctypes.c_int64
    lib.gguf_get_n_tensors.argtypes = [ctypes.c_void_p]
    lib.gguf_get_tensor_name.restype = ctypes.c_char_p
    lib.gguf_get_tensor_name.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    return lib


@contextmanager
def _gguf(path: str | Path) -> Iterator[tuple[ctypes.CDLL, int, int]]:
    """(lib, gguf context, data offset) of a GGUF file's header (no tensor data loaded); freed after."""
    lib = _ggml_base()
    ctx = lib.gguf_init_from_file(str(path).encode(), _InitParams(True, None))
    if not ctx:
        raise FgdilpError(f"cannot read the GGUF tensors of {path}")
    try:
        yield lib, ctx, lib.gguf_get_data_offset(ctx)
    finally:
        lib.gguf_free(ctx)


FINGERPRINT_SAMPLE = 4096      # bytes hashed at the start, middle and end of every tensor


def weights_fingerprint(path: str | Path) -> str:
    """SHA-256 over every tensor's name, type and size and three samples of its data (start,
    middle, end; FINGERPRINT_SAMPLE bytes each), tensors in name order. Bounded: about 12 KiB
    read per tensor (~3.5 MB for a 7B model), whatever the file size. Metadata (name, chat
    template) does not enter it; a fine-tune or another quantisation changes every weight matrix
    and so the fingerprint. A change confined to bytes outside the samples would go unseen."""
    with _gguf(path) as (lib, ctx, base):
        entries = []
        for tid in range(lib.gguf_get_n_tensors(ctx)):
            entries.append((lib.gguf_get_tensor_name(ctx, tid), lib.gguf_get_tensor_type(ctx, tid),
                            base + lib.gguf_get_tensor_offset(ctx, tid), lib.gguf_get_tensor_size(ctx, tid)))
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for name, qtype, start, size in sorted(entries):
                h.update(b"%s\0%d\0%d\0" % (name, qtype, size))
                k = min(FINGERPRINT_SAMPLE, size)
                for at in sorted({start, start + (size - k) // 2, start + size - k}):
                    f.seek(at)
                    chunk = f.read(k)
                    if len(chunk) != k:
                        raise FgdilpError(f"{path} is truncated (tensor {name.decode(errors='replace')})")
                    h.update(chunk)
        return h.hexdigest()


def bits_per_weight(path: str | Path) -> float:
    """Stored bits per weight of the file's matrices (every tensor of two or more dimensions): how
    precise a quantisation is (Q8_0 8.5, Q4_K_M about 5-7 by model, Q3_K_M less). A header read."""
    with _gguf(path) as (lib, ctx, _):
        bits = count = 0
        for tid in range(lib.gguf_get_n_tensors(ctx)):
            ne = lib.gguf_get_tensor_ne(ctx, tid)
            if int(ne[1]) * int(ne[2]) * int(ne[3]) <= 1:
                continue
            bits += 8 * lib.gguf_get_tensor_size(ctx, tid)
            count += int(ne[0]) * int(ne[1]) * int(ne[2]) * int(ne[3])
        return bits / count if count else 0.0


def output_projections(path: str | Path, n_layer: int) -> list[np.ndarray]:
    """W_O of every layer, [n_embd, n_head*head_dim] float32 each."""
    names = [f"blk.{il}.attn_output.weight" for il in range(n_layer)]
    w = read_tensors(path, names)
    return [w[name] for name in names]


def read_tensors(path: str | Path, names: list[str]) -> dict[str, np.ndarray]:
    """Named 2-D tensors as float32 numpy arrays of shape (ne1, ne0) (torch Linear layout)."""
    with _gguf(path) as (lib, ctx, base):
        mm = np.memmap(path, dtype=np.uint8, mode="r")
        out = {}
        for name in names:
            tid = lib.gguf_find_tensor(ctx, name.encode())
            if tid < 0:
                raise FgdilpError(f"{path} has no tensor {name}")
            ne = lib.gguf_get_tensor_ne(ctx, tid)
            ne0, ne1 = int(ne[0]), int(ne[1])
            qtype = GGMLQuantizationType(lib.gguf_get_tensor_type(ctx, tid))
            start = base + lib.gguf_get_tensor_offset(ctx, tid)
            size = lib.gguf_get_tensor_size(ctx, tid)
            raw = np.array(mm[start:start + size]).reshape(ne1, -1)
            w = raw.view(np.float32) if qtype == GGMLQuantizationType.F32 else dequantize(raw, qtype)
            out[name] = np.ascontiguousarray(w.reshape(ne1, ne0), dtype=np.float32)
        return out


def _kv_lib(lib: ctypes.CDLL) -> ctypes.CDLL:
    """The gguf key/value functions the family fingerprint reads (strings and string arrays)."""
    lib.gguf_find_key.restype = ctypes.c_int64
    lib.gguf_find_key.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.gguf_get_val_str.restype = ctypes.c_char_p
    lib.gguf_get_val_str.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.gguf_get_arr_n.restype = ctypes.c_size_t
    lib.gguf_get_arr_n.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.gguf_get_arr_str.restype = ctypes.c_char_p
    lib.gguf_get_arr_str.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_size_t]
    lib.gguf_get_kv_type.restype = ctypes.c_int
    lib.gguf_get_kv_type.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.gguf_get_arr_type.restype = ctypes.c_int
    lib.gguf_get_arr_type.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    return lib


GGUF_TYPE_STRING, GGUF_TYPE_ARRAY = 8, 9


def family_fingerprint(path: str | Path) -> str | None:
    """SHA-256 of what every quantisation of one set of weights shares and a fine-tune does not:
    the architecture, every tensor's name and shape (not its type), the tokenizer's token texts,
    and the 1-D tensors (the norm weights and biases), which llama.cpp's quantizer never quantises
    (it skips tensors of fewer than two dimensions), sampled like weights_fingerprint. Training
    changes the norm weights; quantising leaves them bit-identical (docs/results/quant-transfer.md).
    None when the file has no 1-D tensor with more than one distinct value: then nothing in it
    tells one fine-tune from another, and no profile may be shared."""
    with _gguf(path) as (lib, ctx, base):
        lib = _kv_lib(lib)
        h = hashlib.sha256()
        arch_id = lib.gguf_find_key(ctx, b"general.architecture")
        arch = lib.gguf_get_val_str(ctx, arch_id) if arch_id >= 0 and \
            lib.gguf_get_kv_type(ctx, arch_id) == GGUF_TYPE_STRING else b""
        h.update(b"arch\0%s\0" % arch)
        tok_id = lib.gguf_find_key(ctx, b"tokenizer.ggml.tokens")
        if tok_id >= 0 and lib.gguf_get_kv_type(ctx, tok_id) == GGUF_TYPE_ARRAY \
                and lib.gguf_get_arr_type(ctx, tok_id) == GGUF_TYPE_STRING:
            n_tok = lib.gguf_get_arr_n(ctx, tok_id)
            h.update(b"tokens\0%d\0" % n_tok)
            for t in range(n_tok):
                text = lib.gguf_get_arr_str(ctx, tok_id, t) or b""
                h.update(b"%d\0%s" % (len(text), text))
        flat = []
        tensors = sorted((lib.gguf_get_tensor_name(ctx, tid), tid) for tid in range(lib.gguf_get_n_tensors(ctx)))
        for name, tid in tensors:       # in name order: the quantizer may write them in another
            ne = lib.gguf_get_tensor_ne(ctx, tid)
            shape = tuple(int(ne[d]) for d in range(4))
            h.update(b"%s\0%s\0" % (name, str(shape).encode()))
            if all(d == 1 for d in shape[1:]):
                flat.append((name, lib.gguf_get_tensor_type(ctx, tid),
                             base + lib.gguf_get_tensor_offset(ctx, tid), lib.gguf_get_tensor_size(ctx, tid)))
        informative = False
        with open(path, "rb") as f:
            for name, qtype, start, size in sorted(flat):
                h.update(b"%s\0%d\0" % (name, qtype))
                k = min(FINGERPRINT_SAMPLE, size)
                for at in sorted({start, start + (size - k) // 2, start + size - k}):
                    f.seek(at)
                    chunk = f.read(k)
                    if len(chunk) != k:
                        raise FgdilpError(f"{path} is truncated (tensor {name.decode(errors='replace')})")
                    informative = informative or len(set(chunk[i:i + 4] for i in range(0, k - k % 4, 4))) > 1
                    h.update(chunk)
        return h.hexdigest() if informative else None
