"""Model and context lifetime over llama-cpp-python's public low-level API (llama_cpp.llama_cpp).

Everything here is about llama.cpp, nothing about toxicity. Resources are freed by context
managers (and, as a last resort, by close() on garbage collection).
"""

from __future__ import annotations

import atexit
import collections
import ctypes
import hashlib
import os
import weakref
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import llama_cpp.llama_cpp as ll
import numpy as np

from ..errors import Cancelled, ContextFullError, FgdilpError
from .allocation import check_context
from .owned import Owned
from .rpc import hold as rpc_hold, release as rpc_release, rpc_devices

# KV cache types by llama.cpp's -ctk/-ctv spelling
CACHE_TYPES = {
    "f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "iq4_nl": 20, "bf16": 30,
}
UNQUANTISED_CACHE = {"f32", "f16", "bf16"}
FLASH_ATTN = {"auto": -1, "off": 0, "on": 1}

# ---- llama.cpp logging: kept in a ring buffer, printed only when verbose -----------------------
_log_lines: collections.deque[str] = collections.deque(maxlen=50)
_log_verbose = bool(os.environ.get("FGDILP_VERBOSE"))


@ll.llama_log_callback
def _log_callback(level: int, text: bytes, user_data) -> None:
    s = text.decode("utf-8", errors="replace")
    _log_lines.append(s)
    if _log_verbose:
        os.write(2, text)


_backend_ready = False


def _init_backend() -> None:
    global _backend_ready
    if not _backend_ready:
        ll.llama_log_set(_log_callback, ctypes.c_void_p(0))
        ll.llama_backend_init()
        atexit.register(_log_to_nothing)
        _backend_ready = True


def _log_to_nothing() -> None:
    """llama.cpp logs into a C function that drops the text from now on. Run at exit, before the
    interpreter clears its modules: a context freed later in the shutdown (one an interrupted run
    left to the garbage collector) logs as it is freed, and calling _log_callback once its module
    is cleared is a segfault."""
    from ..native import log_discard_address

    ll.llama_log_set(ll.llama_log_callback(log_discard_address()), ctypes.c_void_p(0))


def set_verbose(verbose: bool) -> None:
    global _log_verbose
    _log_verbose = verbose


def last_log_error() -> str:
    """The last llama.cpp log lines that look like errors, joined into one line."""
    lines = [l.strip() for l in _log_lines if l.strip()]
    errs = [l for l in lines if "error" in l.lower() or "failed" in l.lower()]
    return "; ".join((errs or lines)[-2:])


GGUF_MAGIC = b"GGUF"


def check_model_file(path: str | os.PathLike) -> Path:
    """Refuse what is not a readable GGUF file before llama.cpp sees it."""
    p = Path(path)
    if not p.exists():
        raise FgdilpError(f"model file not found: {p}")
    if not p.is_file():
        raise FgdilpError(f"model path is not a file: {p}")
    try:
        with open(p, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise FgdilpError(f"cannot read model file {p}: {exc.strerror}") from None
    if magic != GGUF_MAGIC:
        raise FgdilpError(f"not a GGUF model file: {p}")
    return p


@dataclass(frozen=True)
class ModelInfo:
    path: str
    architecture: str
    description: str
    n_layer: int
    n_head: int
    n_head_kv: int
    n_embd: int
    head_dim: int      # value head dim: the width of one head in kqv_out
    n_vocab: int
    n_ctx_train: int
    n_params: int

    @property
    def kqv_width(self) -> int:
        return self.n_head * self.head_dim


class Model(Owned):
    """A loaded GGUF model (weights only); use as a context manager."""

    def __init__(self, path: str | os.PathLike, n_gpu_layers: int = 0, rpc: Optional[str] = None):
        """rpc: llama.cpp RPC servers "HOST:PORT,..." that hold the offloaded layers (engine/rpc.py);
        with them, n_gpu_layers 0 means every layer."""
        _init_backend()
        p = check_model_file(path)
        mparams = ll.llama_model_default_params()
        self.rpc, self._rpc_devices = rpc, (rpc_devices(rpc) if rpc else None)     # referenced while the model lives
        if self._rpc_devices is not None:
            mparams.devices = ctypes.cast(self._rpc_devices, ctypes.c_void_p)
            n_gpu_layers = n_gpu_layers or -1
        mparams.n_gpu_layers = n_gpu_layers
        _log_lines.clear()
        self._m = ll.llama_model_load_from_file(str(p).encode(), mparams)
        if not self._m:
            detail = last_log_error()
            raise FgdilpError(f"llama.cpp could not load {p}" + (f": {detail}" if detail else ""))
        self._open = True
        self.n_gpu_layers = n_gpu_layers     # where the KV goes (engine/allocation.py)
        if rpc:
            rpc_hold(rpc)
        self.vocab = ll.llama_model_get_vocab(self._m)
        self.info = self._read_info(str(p))
        self._eog: list[int] | None = None
        self._fingerprint: dict[str, str] | None = None
        self._family: tuple[Optional[str]] | None = None
        # the contexts made on these weights: closing the model closes them first, so a context
        # that outlives an explicit close() (one an interrupted constructor or a traceback still
        # holds, freed later by the garbage collector) never frees itself against freed weights
        self._contexts: weakref.WeakSet[Context] = weakref.WeakSet()

    def meta(self, key: str) -> Optional[str]:
        buf = ctypes.create_string_buffer(512)
        n = ll.llama_model_meta_val_str(self._m, key.encode(), buf, len(buf))
        return buf.value.decode(errors="replace") if n >= 0 else None

    def _read_info(self, path: str) -> ModelInfo:
        m = self._m
        arch = self.meta("general.architecture") or "unknown"
        n_head = ll.llama_model_n_head(m)
        n_embd = ll.llama_model_n_embd(m)
        vlen = self.meta(f"{arch}.attention.value_length")
        head_dim = int(vlen) if vlen else (n_embd // n_head if n_head > 0 else 0)
        desc = ctypes.create_string_buffer(256)
        ll.llama_model_desc(m, desc, len(desc))
        return ModelInfo(
            path=path, architecture=arch, description=desc.value.decode(errors="replace"),
            n_layer=ll.llama_model_n_layer(m), n_head=n_head, n_head_kv=ll.llama_model_n_head_kv(m),
            n_embd=n_embd, head_dim=head_dim, n_vocab=ll.llama_vocab_n_tokens(self.vocab),
            n_ctx_train=ll.llama_model_n_ctx_train(m), n_params=ll.llama_model_n_params(m),
        )

    @property
    def ptr(self):
        return self._m

    def fingerprint(self) -> dict[str, str]:
        """{"vocab_sha256", "weights_sha256"}: what tells this model from another of the same
        shape (saved vectors are checked against it). The vocabulary: every token's text and
        attributes as llama.cpp loaded them; the weights: tensors.weights_fingerprint (a bounded
        read). Computed once per Model."""
        if self._fingerprint is None:
            from .tensors import weights_fingerprint

            h = hashlib.sha256()
            for t in range(self.info.n_vocab):
                text = ll.llama_vocab_get_text(self.vocab, t) or b""
                h.update(b"%d\0%d\0%s\0" % (len(text), ll.llama_vocab_get_attr(self.vocab, t), text))
            self._fingerprint = {"vocab_sha256": h.hexdigest(), "weights_sha256": weights_fingerprint(self.info.path)}
        return self._fingerprint

    def family_fingerprint(self) -> Optional[str]:
        """What every quantisation of these weights shares (tensors.family_fingerprint; None when
        the file cannot tell its fine-tunes apart). Computed once per Model."""
        if self._family is None:
            from .tensors import family_fingerprint

            self._family = (family_fingerprint(self.info.path),)
        return self._family[0]

    def bits_per_weight(self) -> float:
        """Stored bits per weight of the file's matrices (tensors.bits_per_weight)."""
        from .tensors import bits_per_weight

        return bits_per_weight(self.info.path)

    def quantisation(self) -> str:
        """The file's quantisation as llama.cpp names it (general.file_type: Q4_K_M, Q8_0, F16...),
        or "" when the file does not say."""
        value = self.meta("general.file_type")
        names = {getattr(ll, n): n.removeprefix("LLAMA_FTYPE_").removeprefix("MOSTLY_")
                 for n in dir(ll) if n.startswith("LLAMA_FTYPE_") and isinstance(getattr(ll, n), int)}
        return names.get(int(value), "") if value and value.isdigit() else ""

    # ---- tokens ------------------------------------------------------------------------------
    def tokenize(self, text: str, add_bos: bool = True, special: bool = False) -> list[int]:
        """special: parse special-token text; or an object with tokenize_text(model, text, add_bos)
        that decides where (chat.tokens.ContentAsText: outside a conversation's messages only)."""
        if not isinstance(special, bool) and hasattr(special, "tokenize_text"):
            return special.tokenize_text(self, text, add_bos)
        data = text.encode("utf-8")
        n_max = len(data) + 8
        buf = (ll.llama_token * n_max)()
        n = ll.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_bos, special)
        if n < 0:
            n_max = -n
            buf = (ll.llama_token * n_max)()
            n = ll.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_bos, special)
        if n < 0:
            raise FgdilpError("tokenization failed")
        return list(buf[:n])

    def token_bytes(self, token: int, special: bool = False) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = ll.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = ll.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(self.token_bytes(t) for t in tokens).decode("utf-8", errors="replace")

    @property
    def bos(self) -> int:
        return ll.llama_vocab_bos(self.vocab)

    def is_eog(self, token: int) -> bool:
        return bool(ll.llama_vocab_is_eog(self.vocab, token))

    @property
    def eog_tokens(self) -> list[int]:
        """Every end-of-generation token id (scanned once)."""
        if self._eog is None:
            self._eog = [t for t in range(self.info.n_vocab) if ll.llama_vocab_is_eog(self.vocab, t)]
        return self._eog

    def tokenize_plain(self, text: str) -> list[int]:
        """Tokens of `text` alone: no BOS, no special-token parsing."""
        return self.tokenize(text, add_bos=False)

    def _free(self) -> None:
        for ctx in list(self._contexts):
            ctx.close()
        ll.llama_model_free(self._m)
        self._m = None
        if self.rpc:
            rpc_release(self.rpc)


MAX_SLOT_SAVES = 64                   # captured rows kept for restoring (a few per conversation and reply)


@dataclass
class ContextParams:
    n_ctx: int = 2048                 # KV cells in total (shared by all sequences)
    n_batch: int = 512                # rows per decode; also n_ubatch (row i = batch token i)
    n_seq_max: int = 1
    n_outputs_max: int = 0            # rows with logits per decode; 0 = n_seq_max
    n_threads: int = 0                # 0 = all cores
    type_k: str = "f16"
    type_v: str = "f16"
    flash_attn: str = "auto"
    kv_reuse: bool = True             # runs that support it keep their common prefix (engine/batch.py)
    kv_conversations: int = 1         # >1: records of other conversations stay until their ids are needed
    prefill_rows: int = 0             # rows per ubatch of a prompt body (the user's -b); 0 = n_batch


class Context(Owned):
    """A llama_context with a unified KV cache for several sequences, optionally with the hook."""

    def __init__(self, model: Model, params: ContextParams, hook=None):
        for name, t in (("K", params.type_k), ("V", params.type_v)):
            if t not in CACHE_TYPES:
                raise FgdilpError(f"unknown {name} cache type {t!r} (one of {', '.join(CACHE_TYPES)})")
        if params.flash_attn not in FLASH_ATTN:
            raise FgdilpError(f"flash attention must be on, off or auto, not {params.flash_attn!r}")
        self.model, self.params, self.hook = model, params, hook
        from ..native import abort_callback_address

        self._abort = ctypes.c_int32(0)     # set from any thread by request_abort(); read in C
        self._abort_cb = abort_callback_address()
        self._n_batch_asked = params.n_batch   # llama.cpp caps n_batch at n_ctx: a grown context takes more
        # asked for cells beyond n_ctx (make_room): the owner's budget decides, else resize()
        self.grow: Optional[Callable[[int], None]] = None
        self._ctx = self._new_llama_context(params)
        self._open = True
        model._contexts.add(self)
        self._adopt(params)
        self.n_vocab = model.info.n_vocab
        # KV reuse across generations (engine/batch.py's Lockstep): per sequence id, the tokens at
        # positions 0.. whose cells hold reusable KV. Cells past a record's end may exist (they are
        # removed before the sequence is reused); a sequence with cells has a record. None: unknown
        # (any decode, copy or removal outside Lockstep's bookkeeping), so the next reuse clears.
        self.kv: Optional[dict[int, list[int]]] = {}
        # per recorded sequence: how many of its tokens were the prompt of the run that recorded it
        # (a later prompt that extends that prompt continues the same conversation), and when it
        # was last used (a counter: the least recently used record is dropped first)
        self.kv_prompt_len: dict[int, int] = {}
        self.kv_stamp: dict[int, int] = {}
        self.kv_clock = 0
        # hook slot values captured during a prefill, keyed by the tokens up to and including the
        # captured one: the row. A reused prefix that covers a capture restores it, and so does a
        # capture of the same tokens (plans' frozen capture). Bounded: the least recently used
        # saves are dropped first.
        self._slot_saves: dict[tuple[int, ...], np.ndarray] = {}

    @property
    def ptr(self):
        return self._ctx

    def _new_llama_context(self, params: ContextParams):
        # refused before llama.cpp allocates (threads, cells, sequences, the KV against the memory)
        check_context(self.model, params.n_ctx, params.n_seq_max, params.n_threads, params.type_k, params.type_v)
        threads = params.n_threads or (os.cpu_count() or 1)
        c = ll.llama_context_default_params()
        c.n_ctx = params.n_ctx
        c.n_batch = c.n_ubatch = params.n_batch
        c.n_seq_max = params.n_seq_max
        c.n_outputs_max = params.n_outputs_max or params.n_seq_max
        c.n_threads = c.n_threads_batch = threads
        c.type_k, c.type_v = CACHE_TYPES[params.type_k], CACHE_TYPES[params.type_v]
        c.flash_attn_type = FLASH_ATTN[params.flash_attn]
        c.kv_unified = True
        c.swa_full = True
        c.no_perf = True
        if self.hook is not None:
            c.cb_eval = ll.ggml_backend_sched_eval_callback(self.hook.callback_address)
            c.cb_eval_user_data = self.hook.handle
        c.abort_callback = ll.ggml_abort_callback(self._abort_cb)
        c.abort_callback_data = ctypes.addressof(self._abort)
        _log_lines.clear()
        ctx = ll.llama_init_from_model(self.model.ptr, c)
        if not ctx:
            detail = last_log_error()
            raise FgdilpError("llama.cpp could not create a context" + (f": {detail}" if detail else ""))
        return ctx

    def _adopt(self, params: ContextParams) -> None:
        self.params = params
        self.n_ctx = ll.llama_n_ctx(self._ctx)
        n_batch = ll.llama_n_batch(self._ctx)
        if n_batch < params.n_batch:     # llama.cpp caps a batch at the context size: chunk to what it takes
            self.params = replace(params, n_batch=n_batch)
        self._mem = ll.llama_get_memory(self._ctx)

    def make_room(self, cells: int) -> None:
        """At least `cells` KV cells: grown (grow(), else resize()) when it has fewer. Not during a run."""
        if cells > self.n_ctx:
            (self.grow or self.resize)(cells)

    def resize(self, n_ctx: int) -> None:
        """Make the llama context anew with n_ctx cells; the recorded sequences' KV moves into it
        (llama_state_seq_*), or, where it cannot, the records are dropped (the next run prefills).
        The hook, the captured rows and the abort flag stay."""
        known = self.kv or {}
        saved = {}
        for seq in known:
            size = ll.llama_state_seq_get_size(self._ctx, seq)
            buf = (ctypes.c_uint8 * max(size, 1))()
            if size and ll.llama_state_seq_get_data(self._ctx, buf, size, seq) == size:
                saved[seq] = (buf, size)
        moved = len(saved) == len(known)
        ll.llama_free(self._ctx)       # first: old and new never hold their KV together
        self._ctx = None
        params = replace(self.params, n_ctx=n_ctx, n_batch=self._n_batch_asked)
        try:
            self._ctx = self._new_llama_context(params)
        except FgdilpError:
            self._open = False
            raise
        self._adopt(params)
        for seq, (buf, size) in saved.items() if moved else ():
            if ll.llama_state_seq_set_data(self._ctx, buf, size, seq) != size:
                moved = False
                break
        if not moved:
            self.clear()

    def take_kv(self) -> Optional[dict[int, list[int]]]:
        """The KV records, now marked unknown until a finished run records them again."""
        known, self.kv = self.kv, None
        return known

    def save_row(self, tokens: Sequence[int], row: np.ndarray) -> None:
        """Keep the row a hook slot captured at the last of `tokens` (restore_slot puts it back)."""
        key = tuple(tokens)
        self._slot_saves.pop(key, None)
        self._slot_saves[key] = row.copy()
        while len(self._slot_saves) > MAX_SLOT_SAVES:
            del self._slot_saves[next(iter(self._slot_saves))]

    def restore_slot(self, slot: int, tokens: Sequence[int]) -> bool:
        """Put into `slot` the row captured at the last of `tokens` (a captured row depends on those
        tokens alone, whichever sequence and slot held them); False when no such capture is saved
        (the caller recomputes from there)."""
        key = tuple(tokens)
        saved = self._slot_saves.pop(key, None)
        if saved is None:
            return False
        self._slot_saves[key] = saved          # the most recently used is dropped last
        if self.hook is None:
            return False
        self.hook.slots[slot] = saved
        return True

    def decode(self, batch) -> None:
        """Decode one batch; with a hook, check that it fired on every layer it had to, once, on
        nodes of the batch's row count, and that every steered row is finite (else HookError)."""
        self.kv = None
        hook = self.hook
        if hook is not None and hook.planned:
            hook.begin(batch.c.n_tokens)
            rc = ll.llama_decode(self._ctx, batch.c)
            if rc == 0:
                hook.end()
        else:
            rc = ll.llama_decode(self._ctx, batch.c)
        if rc == 1:
            raise ContextFullError("the context is full (no KV cell free for this batch); raise -c")
        if rc == 2:
            raise Cancelled("cancelled")  # aborted through the abort callback
        if rc != 0:
            detail = last_log_error()
            raise FgdilpError(f"llama_decode failed ({rc})" + (f": {detail}" if detail else ""))
        self._check_logits(batch)

    def _check_logits(self, batch) -> None:
        """Refuse logits that are not finite (a model with NaN or overflowing weights): sampled,
        they would give a token chosen by no number at all (an empty reply, rc 0). The batch's last
        row with logits stands for the others: broken weights spoil every row; a steered row that
        is not finite is refused by the hook itself."""
        n = batch.c.n_tokens
        if n <= 0:
            return
        wanted = np.flatnonzero(np.ctypeslib.as_array(batch.c.logits, shape=(n,)))
        if wanted.size == 0:
            return
        top = float(np.max(self.logits(int(wanted[-1]))))    # NaN if any is NaN; -inf if none is finite
        if not np.isfinite(top):
            raise FgdilpError(f"the model computed {'NaN' if top != top else 'infinite'} logits: its weights "
                              f"are broken (they hold NaN or overflow)")

    def request_abort(self) -> None:
        """Make the running (or next) decode stop early; safe from another thread."""
        self._abort.value = 1

    def reset_abort(self) -> None:
        self._abort.value = 0

    def logits(self, row: int) -> np.ndarray:
        """Logits of batch row `row` of the last decode, [n_vocab] float32 (a view: copy to keep)."""
        ptr = ll.llama_get_logits_ith(self._ctx, row)
        if not ptr:
            raise FgdilpError(f"no logits for row {row}")
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def set_cvec(self, vectors: Optional[np.ndarray]) -> None:
        """Add vectors[il] ([n_layer, n_embd]) to the residual stream at the output of every block
        il >= 1 (llama.cpp's control vector; block 0 has none); None removes it."""
        if vectors is None:
            rc = ll.llama_set_adapter_cvec(self._ctx, None, 0, self.model.info.n_embd, -1, -1)
        else:
            data = np.ascontiguousarray(vectors[1:], dtype=np.float32)
            n_layer = vectors.shape[0]
            rc = ll.llama_set_adapter_cvec(self._ctx, data.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                                           data.size, vectors.shape[1], 1, n_layer - 1)
        if rc != 0:
            raise FgdilpError(f"llama.cpp refused the control vector: {last_log_error()}")

    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        self.kv = None
        ll.llama_memory_seq_cp(self._mem, src, dst, p0, p1)

    def seq_rm(self, seq: int, p0: int = -1, p1: int = -1) -> None:
        self.kv = None
        ll.llama_memory_seq_rm(self._mem, seq, p0, p1)

    def clear(self) -> None:
        ll.llama_memory_clear(self._mem, True)
        self.kv = {}
        self.kv_prompt_len, self.kv_stamp = {}, {}

    def _free(self) -> None:
        ll.llama_free(self._ctx)
        self._ctx = None
