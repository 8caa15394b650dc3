"""`serve`'s model thread: requests queued FIFO and run one at a time on one Detoxifier (it is not
thread-safe), the contexts that fit the KV budget created at start-up, and cancellation from any thread (a client that
hangs up, shutdown) that is honoured at every stage: queued, during FGDILP's setup, mid-reply.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np

from .. import methods
from ..call_settings import run_settings
from ..kv_memory import KvBudgetError
from .openai_api import ApiError, GenRequest, StopScanner

if TYPE_CHECKING:
    from ..api import Detoxifier, Stream
    from ..chat import Fitted
    from ..results import GenResult

log = logging.getLogger("fgdilp_cpp.serve.server")

_FINISH = {"eog": "stop", "length": "length", "context": "length"}
WARM_PROMPT = "Hello"


class JobCancelled(Exception):
    """The job was cancelled before it produced a whole result; reason: "cancelled" (its client
    left) or "shutting_down"."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Outcome:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    stats: dict[str, Any]


def steering_of(res: GenResult) -> dict[str, Any]:
    """How a reply was steered: its method; "steered", whether that method edits the model and
    --condition (if set) let it (the condition's "toxicity" is what the scorer read of the
    conversation, "threshold" the value it was held to); "condition" null without one."""
    cond = res.explain.get("condition")
    edits = methods.get(res.method).heads
    return {"method": res.method, "steered": bool(edits and (cond is None or cond["steered"])),
            "condition": None if cond is None else json_safe(cond)}


def _fits_beside(det: Detoxifier, method: str) -> bool:
    """Whether the warm-up call of `method` fits the KV budget without dropping another context."""
    s, name = run_settings(det, {"method": method})
    return det.generator.fits_beside(name, WARM_PROMPT, 1, s.contrast)


def json_safe(v: Any) -> Any:
    """An explain block as JSON: numpy values as numbers and lists, a non-finite number as null
    (JSON has none), tuples as lists, anything else as its text."""
    if isinstance(v, dict):
        return {str(k): json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    if isinstance(v, np.ndarray):
        return json_safe(v.tolist())
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if v is None or isinstance(v, (bool, int, str)):
        return v
    return str(v)


class Job:
    """One request's generation. run() executes on the model thread; cancel() from anywhere."""

    def __init__(self, det: Detoxifier, req: GenRequest, emit: Optional[Callable[[str], None]],
                 fitted: Optional[Fitted] = None):
        self._det, self._req, self._emit, self._fitted = det, req, emit, fitted
        self._lock = threading.Lock()
        self._stream: Optional[Stream] = None
        self.reason: Optional[str] = None      # set once cancelled

    def cancel(self, reason: str = "cancelled") -> None:
        """Stop this job: a no-op once it has finished, and never touches another request's
        decode (the stream is cancelled under the lock that run() releases it under)."""
        with self._lock:
            self.reason = self.reason or reason
            if self._stream is not None:
                self._stream.cancel()          # kept even before the stream's first piece

    def run(self) -> Outcome:
        det, req = self._det, self._req
        if self.reason:
            raise JobCancelled(self.reason)
        stream = (det.stream_chat(req.messages, explain=req.explain, trim=False, fitted=self._fitted,
                                  **req.overrides)
                  if req.messages is not None else det.stream(req.prompt, explain=req.explain, **req.overrides))
        with self._lock:
            if self.reason:                    # cancelled while the stream was being made
                raise JobCancelled(self.reason)
            self._stream = stream
        try:
            return self._generate(stream)
        finally:
            with self._lock:
                self._stream = None

    def _generate(self, stream: Stream) -> Outcome:
        req = self._req
        scan = StopScanner(req.stop)
        cut = False
        try:
            for piece in stream:
                self._send(scan.feed(piece))
                if scan.stopped:
                    break
                if self.reason:                # the decode may have finished: the text we send has not
                    cut = True
                    break
            else:
                self._send(scan.flush())
        finally:
            stream.close()                     # cancels and joins the decode when we stopped early
        res = stream.result
        if cut or (not scan.stopped and (res is None or res.stop_reason == "cancelled")):
            raise JobCancelled(self.reason or "cancelled")     # never reported as a whole reply
        stats = {**steering_of(res), "stop_reason": "stop" if scan.stopped else res.stop_reason,
                 "setup_s": round(res.setup_s, 4), "prefill_s": round(res.prefill_s, 4),
                 "decode_s": round(res.decode_s, 4)}
        if req.explain:
            stats["explain"] = json_safe(res.explain)
        return Outcome(scan.text, "stop" if scan.stopped else _FINISH.get(res.stop_reason, "stop"),
                       res.n_prompt_tokens, len(res.tokens), stats)

    def _send(self, text: str) -> None:
        if text and self._emit is not None:
            try:
                self._emit(text)
            except RuntimeError:               # the event loop is gone (shutdown): nobody is listening
                self.reason = self.reason or "shutting_down"


class ModelQueue:
    """The model, its one worker thread, the warm-up and the admission limit."""

    def __init__(self, det: Detoxifier, max_queue: int, methods: tuple[str, ...]):
        self.det, self.max_queue, self.methods = det, max_queue, methods
        self.model_id = Path(det.model.info.path).stem
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fgdilp-model")
        self.ready = threading.Event()
        self.warm_error: Optional[str] = None
        self.on_warm_error: Optional[Callable[[], None]] = None
        self._lock = threading.Lock()
        self._jobs: set[Job] = set()
        self._closed = False
        self._idle: Optional[threading.Event] = None     # set once the model thread has drained
        self._drain_by: Optional[float] = None           # the first close's deadline (time.monotonic)
        self._stop_sweep = threading.Event()              # ends the idle-context sweeper (--kv-idle-s)
        self._sweep_queued = False

    # ---- start-up -------------------------------------------------------------------------
    def start(self) -> Future:
        """Create the contexts of the allowed methods on the model thread (a 1-token reply each,
        FGDILP's setup context included) as far as the KV budget holds them beside each other;
        requests that come meanwhile wait behind it. With --kv-idle-s, a sweeper frees the KV of
        contexts left unused that long (on the model thread, between requests)."""
        warm = self.executor.submit(self._warm)
        limit = float(self.det.settings.kv_idle_s)
        if limit > 0:
            threading.Thread(target=self._sweep, args=(limit,), name="fgdilp-kv-idle", daemon=True).start()
        return warm

    def _sweep(self, limit: float) -> None:
        period = max(0.05, min(limit / 2, 30.0))    # a context goes at most 1.5 x the limit unused
        while not self._stop_sweep.wait(period):
            with self._lock:
                if self._closed:
                    return
                if self._sweep_queued:             # one sweep waits behind a long request at most
                    continue
                self._sweep_queued = True
                self.executor.submit(self._drop_idle, limit)

    def _drop_idle(self, limit: float) -> None:
        self._sweep_queued = False
        if self._closed:
            return
        dropped = self.det.generator.drop_idle(limit)
        if dropped:
            log.info("freed the KV cache of %s: unused for more than %g s (--kv-idle-s)", ", ".join(dropped), limit)

    def _warm(self) -> None:
        # the default method first; then the others whose contexts fit the KV budget beside those
        # made (a context that would drop another is made by its first request instead)
        first = self.det.settings.method
        order = [first] * (first in self.methods) + [m for m in self.methods if m != first]
        try:
            for i, method in enumerate(order):
                if self._closed:               # shut down while warming up: not ready, not failed
                    return
                if i and not _fits_beside(self.det, method):
                    log.info("warm-up: %s's contexts are made on its first request (KV budget)", method)
                    continue
                try:
                    self.det.generate(WARM_PROMPT, method=method, n_predict=1, seed=0)
                except KvBudgetError as exc:   # its requests get a 503 saying so; the others run
                    log.warning("warm-up: %s", exc)
        except Exception as exc:  # noqa: BLE001 - reported by /health and run_server, logged here
            log.error("warm-up failed", exc_info=exc)
            self.warm_error = str(exc) or type(exc).__name__
            if self.on_warm_error is not None:
                self.on_warm_error()
        else:
            if not self._closed:
                self.ready.set()

    # ---- requests -------------------------------------------------------------------------
    @property
    def in_flight(self) -> int:
        """Requests admitted and not finished (the running one included)."""
        return len(self._jobs)

    @property
    def shutting_down(self) -> bool:
        return self._closed

    def submit(self, req: GenRequest, emit: Optional[Callable[[str], None]] = None,
               fitted: Optional[Fitted] = None) -> tuple[Job, Future]:
        """fitted: the conversation as RequestCost.fit made it (the model thread does not fit it again)."""
        job = Job(self.det, req, emit, fitted)
        with self._lock:
            if self._closed:
                raise ApiError(503, "the server is shutting down", kind="server_error", code="shutting_down")
            if self.warm_error is not None:
                raise ApiError(503, "the model could not start (see the server log)", kind="server_error",
                               code="not_ready")
            if len(self._jobs) > self.max_queue:
                raise ApiError(503, f"the server is busy ({self.max_queue} requests already waiting); "
                               "retry later", kind="server_error", code="queue_full",
                               headers={"Retry-After": "1"})
            self._jobs.add(job)
            fut = self.executor.submit(job.run)
        fut.add_done_callback(lambda _: self._release(job))
        return job, fut

    def _release(self, job: Job) -> None:
        with self._lock:
            self._jobs.discard(job)

    # ---- shutdown -------------------------------------------------------------------------
    def begin_shutdown(self) -> None:
        """Refuse new requests and cancel the admitted ones (without waiting): a reply cut here
        ends with an error, not as if it were complete."""
        self._stop_sweep.set()
        with self._lock:
            self._closed = True
            jobs = list(self._jobs)
        if not self.ready.is_set():
            self.det.cancel()                  # the warm-up (FGDILP's setup may take seconds)
        for job in jobs:
            job.cancel("shutting_down")

    def close(self, timeout: Optional[float] = None) -> bool:
        """Cancel every job and wait for the model thread, at most `timeout` seconds (None: as long
        as it takes). True once it is idle (the Detoxifier may be closed after); False if it is
        still busy at the deadline (then the Detoxifier must not be closed: run_server exits)."""
        self.begin_shutdown()
        with self._lock:
            if self._idle is None:             # the first close: a marker behind the cancelled jobs
                self._idle = threading.Event()
                self.executor.submit(self._idle.set)
                self._drain_by = None if timeout is None else time.monotonic() + timeout
        if timeout is not None and self._drain_by is not None:   # a second close keeps the first deadline
            timeout = min(timeout, max(0.0, self._drain_by - time.monotonic()))
        stopped = self._idle.wait(timeout)
        self.executor.shutdown(wait=stopped)
        return stopped
