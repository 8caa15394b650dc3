"""`fgdilp-cpp serve`: an OpenAI-compatible HTTP server (starlette + uvicorn) over one Detoxifier.

Endpoints (every error is JSON: {"error": {"message", "type", "param", "code"}}):

    GET  /health                  {"status": "ok", "model": ID}            (no API key needed)
    GET  /v1/models               the one served model (ID = the GGUF file's stem)
    GET  /v1/models/{id}          that model, or 404
    POST /v1/chat/completions     messages -> the assistant's reply ("stream": true for SSE)
    POST /v1/completions          prompt -> its continuation ("stream": true for SSE)

Request fields of both POST endpoints:
    model                      any string; the response names the served model
    max_tokens / max_completion_tokens   int 1..--max-tokens (default: the server's -n)
    temperature                0..2, 0 = greedy;  top_p (0, 1];  seed 0..2^32-1
    top_k (int >= 0), min_p [0, 1)       llama.cpp-style extensions
    stop                       a string or a list of up to 4: the text is cut before the first one
    n                          1 only;  stream (bool);  stream_options.include_usage (bool)
    method                     a method of the registry (methods.names(): none, prompt, tr, fgdilp, ...)
    steer_scale                a finite number;  steer_layer_range  [start, end] layer numbers
chat: messages [{role: system|developer|user|assistant, content: text or [{"type": "text", ...}]}],
the last one the user's; a conversation longer than the context is a 400 with code
"context_length_exceeded" (never trimmed silently). completions: prompt, a string or [string].

Responses are OpenAI's, plus a top-level "fgdilp" object (method, stop_reason, timings) on a
reply and on the last chunk of a stream. A stream's headers go out with its first text, so that
anything found wrong before (bad values, a prompt longer than the context) is a plain HTTP error.

Unknown fields are ignored (clients add new ones all the time). Known OpenAI fields this server
cannot honour (penalties, logit_bias, logprobs, tools, response_format other than text, echo,
best_of, suffix) are accepted only at their no-op values (null, 0, false, empty) and are a 400
otherwise, since ignoring them would change results silently. usage.completion_tokens counts
the tokens generated, including any that a stop string cut off.

Requests are queued FIFO and run one at a time on one model thread (a Detoxifier is not
thread-safe); more than --max-queue waiting is a 503 with Retry-After. A client that hangs up
(while queued or mid-stream) has its generation cancelled.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import ipaddress
import json
import logging
import socket
import sys
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, Iterator, Optional

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from .errors import ContextLengthError, FgdilpError, ParamError
from .openai_api import ApiError, GenRequest, StopScanner, param_error, parse_request, read_json

if TYPE_CHECKING:
    from .api import Detoxifier

log = logging.getLogger("fgdilp_cpp.server")

_FINISH = {"eog": "stop", "length": "length", "context": "length", "cancelled": "stop"}


@dataclass(frozen=True)
class Limits:
    max_queue: int = 16                 # requests waiting beyond the running one; more get 503
    max_body_bytes: int = 1 << 20
    max_tokens: int = 2048              # the largest max_tokens a request may ask for
    api_key: Optional[str] = None       # require "Authorization: Bearer KEY" on /v1


class _ClientGone(Exception):
    """The client hung up before its answer was ready."""


class _Cancelled(Exception):
    """The job was cancelled before it produced a result (its client left, or shutdown)."""


# ---- generation on the model thread ------------------------------------------------------------
@dataclass(frozen=True)
class Outcome:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    stats: dict[str, Any]


class _Job:
    """One request's generation. run() executes on the model thread; cancel() from anywhere."""

    def __init__(self, det: Detoxifier, req: GenRequest, emit: Optional[Callable[[str], None]]):
        self._det, self._req, self._emit = det, req, emit
        self._lock = threading.Lock()
        self._cancelled = self._running = False

    def cancel(self) -> None:
        """Stop this job (a no-op once it has finished; never touches another request's decode)."""
        with self._lock:
            self._cancelled = True
            if self._running:
                self._det.cancel()

    def run(self) -> Outcome:
        with self._lock:
            if self._cancelled:
                raise _Cancelled()
            self._running = True
        try:
            return self._generate()
        finally:
            with self._lock:
                self._running = False

    def _generate(self) -> Outcome:
        det, req = self._det, self._req
        stream = (det.stream_chat(req.messages, trim=False, **req.overrides) if req.messages is not None
                  else det.stream(req.prompt, **req.overrides))
        scan = StopScanner(req.stop)
        try:
            for piece in stream:
                self._send(scan.feed(piece))
                if scan.stopped or self._cancelled:   # a cancel() that came before the decode began
                    break
            else:
                self._send(scan.flush())
        finally:
            stream.close()                  # cancels and joins the decode when we stopped early
        res = stream.result
        if res is None:
            raise _Cancelled()
        stats = {"method": res.method, "stop_reason": res.stop_reason, "setup_s": round(res.setup_s, 4),
                 "prefill_s": round(res.prefill_s, 4), "decode_s": round(res.decode_s, 4)}
        return Outcome(scan.text, "stop" if scan.stopped else _FINISH.get(res.stop_reason, "stop"),
                       res.n_prompt_tokens, len(res.tokens), stats)

    def _send(self, text: str) -> None:
        if text and self._emit is not None:
            try:
                self._emit(text)
            except RuntimeError:            # the event loop is gone (shutdown): nobody is listening
                self._cancelled = True


class _Service:
    """The model, its one worker thread and the admission limit."""

    def __init__(self, det: Detoxifier, limits: Limits):
        self.det, self.limits = det, limits
        self.model_id = Path(det.model.info.path).stem
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fgdilp-model")
        self._lock = threading.Lock()
        self._jobs: set[_Job] = set()
        self._closed = False

    @property
    def in_flight(self) -> int:
        """Requests admitted and not finished (the running one included)."""
        return len(self._jobs)

    def submit(self, req: GenRequest, emit: Optional[Callable[[str], None]] = None) -> tuple[_Job, Future]:
        job = _Job(self.det, req, emit)
        with self._lock:
            if self._closed:
                raise ApiError(503, "the server is shutting down", kind="server_error", code="shutting_down")
            if len(self._jobs) > self.limits.max_queue:
                raise ApiError(503, f"the server is busy ({self.limits.max_queue} requests already waiting); "
                               "retry later", kind="server_error", code="queue_full",
                               headers={"Retry-After": "1"})
            self._jobs.add(job)
            fut = self.executor.submit(job.run)
        fut.add_done_callback(lambda _: self._release(job))
        return job, fut

    def _release(self, job: _Job) -> None:
        with self._lock:
            self._jobs.discard(job)

    def authorize(self, request: Request) -> None:
        key = self.limits.api_key
        if key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def close(self) -> None:
        """Cancel every job and wait for the model thread (the Detoxifier may be closed after)."""
        with self._lock:
            self._closed = True
            jobs = list(self._jobs)
        for job in jobs:
            job.cancel()
        self.executor.shutdown(wait=True, cancel_futures=True)


# ---- responses ----------------------------------------------------------------------------------
def _usage(o: Outcome) -> dict:
    return {"prompt_tokens": o.prompt_tokens, "completion_tokens": o.completion_tokens,
            "total_tokens": o.prompt_tokens + o.completion_tokens}


def _choice(chat: bool, text: Optional[str], finish: Optional[str], first: bool = False) -> dict:
    if not chat:
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
    if finish is not None and text is None:
        return {"index": 0, "delta": {}, "finish_reason": finish}
    delta = {"role": "assistant"} if first else {"content": text}
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


def _from_fgdilp(exc: FgdilpError, chat: bool) -> ApiError:
    msg = str(exc)
    if isinstance(exc, ParamError):
        return param_error(exc)
    if isinstance(exc, ContextLengthError):
        return ApiError(400, msg, param="messages" if chat else "prompt", code="context_length_exceeded")
    return ApiError(400, msg)


@contextmanager
def _job_errors(chat: bool) -> Iterator[None]:
    """A job's failures as HTTP errors (bad input is a 400; a bug is left to the 500 handler)."""
    try:
        yield
    except FgdilpError as exc:
        raise _from_fgdilp(exc, chat) from None
    except _Cancelled:
        raise ApiError(503, "the request was cancelled", kind="server_error", code="cancelled") from None


class _EventStream(StreamingResponse):
    """Server-sent events; when the response ends for any reason (the client hung up, shutdown)
    the job is cancelled, which is a no-op if it already finished."""

    def __init__(self, events: AsyncIterator[bytes], job: _Job):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._job = job

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._job.cancel()


async def _unless_gone(request: Request, job: _Job, waiting: Awaitable[Any]) -> Any:
    """The result of `waiting`; if the client hangs up first, the job is cancelled (_ClientGone)."""
    async def hangup() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watch = asyncio.ensure_future(waiting), asyncio.ensure_future(hangup())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        gone = not task.done()
    finally:                                # also when this handler is cancelled (shutdown)
        watch.cancel()
        if not task.done():
            job.cancel()
            task.cancel()                   # a queued job leaves the queue at once
    if gone:
        raise _ClientGone()
    return task.result()


async def _complete(request: Request, svc: _Service, chat: bool) -> Response:
    req = parse_request(await read_json(request, svc.limits.max_body_bytes), chat, svc.det, svc.limits.max_tokens)
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": svc.model_id}

    if not req.stream:
        job, fut = svc.submit(req)
        with _job_errors(chat):
            o = await _unless_gone(request, job, asyncio.wrap_future(fut))
        choice = ({"index": 0, "message": {"role": "assistant", "content": o.text}, "logprobs": None,
                   "finish_reason": o.finish_reason} if chat else _choice(False, o.text, o.finish_reason))
        return JSONResponse({**head, "choices": [choice], "usage": _usage(o), "fgdilp": o.stats})

    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()     # text pieces, then the job's Future
    job, fut = svc.submit(req, lambda text: loop.call_soon_threadsafe(events.put_nowait, text))

    def finished(f: Future) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, f)
        except RuntimeError:                        # the loop is closed: nobody is waiting
            pass

    fut.add_done_callback(finished)
    first = await _unless_gone(request, job, events.get())
    if isinstance(first, Future):
        with _job_errors(chat):                     # errors before any text: a plain HTTP error
            first.result()
    chunk = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}

    async def stream(item: Any) -> AsyncIterator[bytes]:
        if chat:
            yield _sse({**chunk, "choices": [_choice(True, None, None, first=True)]})
        while not isinstance(item, Future):
            yield _sse({**chunk, "choices": [_choice(chat, item, None)]})
            item = await events.get()
        try:
            with _job_errors(chat):
                o = item.result()
        except ApiError as exc:                     # too late for a status code: an error event
            yield _sse({"error": {"message": exc.message, "type": exc.kind, "param": exc.param,
                                  "code": exc.code}})
            return
        yield _sse({**chunk, "choices": [_choice(chat, None if chat else "", o.finish_reason)],
                    "fgdilp": o.stats})
        if req.include_usage:
            yield _sse({**chunk, "choices": [], "usage": _usage(o)})
        yield b"data: [DONE]\n\n"

    return _EventStream(stream(first), job)


# ---- the app ------------------------------------------------------------------------------------
def _endpoint(auth: bool = True) -> Callable:
    """A route handler(request, service): API key check, errors as JSON, 500 for bugs (logged)."""
    def deco(fn: Callable[[Request, _Service], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        @functools.wraps(fn)
        async def handler(request: Request) -> Response:
            svc: _Service = request.app.state.service
            try:
                if auth:
                    svc.authorize(request)
                return await fn(request, svc)
            except ApiError as exc:
                return exc.response()
            except _ClientGone:
                return Response(status_code=499)    # never sent: the client is gone
            except Exception as exc:  # noqa: BLE001 - a bug: logged here, one line to the client
                log.exception("internal error on %s %s", request.method, request.url.path)
                return ApiError(500, f"internal error: {type(exc).__name__}", kind="server_error").response()
        return handler
    return deco


def _model_card(svc: _Service) -> dict:
    return {"id": svc.model_id, "object": "model", "created": 0, "owned_by": "fgdilp-cpp"}


@_endpoint(auth=False)
async def health(request: Request, svc: _Service) -> Response:
    return JSONResponse({"status": "ok", "model": svc.model_id})


@_endpoint()
async def list_models(request: Request, svc: _Service) -> Response:
    return JSONResponse({"object": "list", "data": [_model_card(svc)]})


@_endpoint()
async def get_model(request: Request, svc: _Service) -> Response:
    if request.path_params["model_id"] != svc.model_id:
        raise ApiError(404, f"model {request.path_params['model_id']!r} not found (this server has "
                       f"{svc.model_id!r})", param="model", code="model_not_found")
    return JSONResponse(_model_card(svc))


@_endpoint()
async def chat_completions(request: Request, svc: _Service) -> Response:
    return await _complete(request, svc, chat=True)


@_endpoint()
async def completions(request: Request, svc: _Service) -> Response:
    return await _complete(request, svc, chat=False)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        message = f"no such endpoint: {request.method} {request.url.path}"
    elif exc.status_code == 405:
        message = f"method {request.method} is not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    return ApiError(exc.status_code, message, code="not_found" if exc.status_code == 404 else None,
                    headers=exc.headers).response()


async def _server_error(request: Request, exc: Exception) -> Response:
    log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
    return ApiError(500, f"internal error: {type(exc).__name__}", kind="server_error").response()


def create_app(det: Detoxifier, limits: Limits = Limits()) -> Starlette:
    """The ASGI app serving `det` (an open Detoxifier);
    its model thread stops at app shutdown, after which `det` may be closed."""
    svc = _Service(det, limits)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            svc.close()

    app = Starlette(routes=[
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", get_model, methods=["GET"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
    ], exception_handlers={HTTPException: _http_error, Exception: _server_error}, lifespan=lifespan)
    app.state.service = svc
    return app


def _bind(host: str, port: int) -> socket.socket:
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        return socket.create_server((host, port), family=family)
    except OSError as exc:
        raise FgdilpError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def _is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run_server(det: Detoxifier, host: str, port: int, limits: Limits = Limits()) -> None:
    """Serve until Ctrl-C (or SIGTERM); port 0 picks a free port (printed)."""
    import uvicorn

    app = create_app(det, limits)
    sock = _bind(host, port)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {app.state.service.model_id} on http://{shown}:{bound} (OpenAI API at /v1)", file=sys.stderr)
    if not _is_loopback(host):
        print(f"warning: listening on {host}: anyone who can reach it can use the model"
              + ("" if limits.api_key else " (no --api-key set)"), file=sys.stderr)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=3,
                                           lifespan="on"))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:                   # uvicorn re-raises the Ctrl-C it shut down on
        print("stopped", file=sys.stderr)
    finally:
        app.state.service.close()
        sock.close()
