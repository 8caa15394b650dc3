"""`fgdilp-cpp serve`: an OpenAI-compatible HTTP server (starlette + uvicorn) over one Detoxifier.

Endpoints (every error is JSON: {"error": {"message", "type", "param", "code"}}):

    GET  /health                  {"status": "ok", "model": ID}            (no API key needed)
                                  503 {"status": "loading"} until the allowed methods' contexts that fit
                                  the KV budget (--kv-budget-mib) exist; a request that alone needs more
                                  KV than the budget is a 503 (code kv_budget)
    GET  /v1/models               the one served model (ID = the GGUF file's stem)
    GET  /v1/models/{id}          that model, or 404
    POST /v1/chat/completions     messages -> the assistant's reply ("stream": true for SSE)
    POST /v1/completions          prompt -> its continuation ("stream": true for SSE)

Request fields of both POST endpoints:
    model                      any string; the response names the served model
    max_tokens / max_completion_tokens / n_predict   int 1..--max-tokens (default: the server's -n);
                               n_predict -1 (llama.cpp's "no limit") = --max-tokens
    temperature                0..2, 0 = greedy;  top_p (0, 1];  seed 0..2^32-1
    top_k (int >= 0), min_p [0, 1)       llama.cpp-style extensions
    repeat_penalty (0, 10], presence_penalty and frequency_penalty [-2, 2]: llama.cpp's penalties
                               sampler over the last repeat_last_n (alias penalty_last_n; default 64,
                               -1 = all, 0 = off) tokens of the reply (not of the prompt)
    grammar                    GBNF text (rule "root"; "" = none) the reply follows, through llama.cpp's
                               grammar sampler; or json_schema (a JSON schema), or response_format
                               {"type": "json_object"[, "schema": ...]} / {"type": "json_schema",
                               "json_schema": {"schema": ...}} (converted to GBNF); at most one of them.
                               A grammar llama.cpp cannot parse, a schema it cannot follow, one past
                               64 KiB of GBNF or 10000 repetitions in all ({m,n}, maxLength, maxItems),
                               is a 400 naming the field. A reply cut by max_tokens may stop inside it.
    explain                    true: the response's "fgdilp" object has the method's explain block
    stop                       a string or a list of up to 4 of at most 256 characters: the text is cut
                               before the first one
    n                          1 only;  stream (bool);  stream_options.include_usage (bool)
    method                     one of --allow-methods (default: the server's --method only)
    steer_scale                [0, --max-steer-scale (2)];  steer_layer_range  [start, end] layer numbers
    condition                  [0, 1]: steer only where the scorer reads a message at least this toxic
chat: messages [{role: system|developer|user|assistant, content: text or [{"type": "text", ...}]}],
the last one the user's, at most --max-messages of them; a conversation longer than the context is
a 400 with code "context_length_exceeded" (never trimmed silently), found before it is queued
(request_cost.py). completions: prompt, a string or [string]. At most --max-chars characters of text.

Responses are OpenAI's, plus a top-level "fgdilp" object on a reply and on the last chunk of a
stream: method; steered (whether the reply was steered: the method edits the model and the
condition, if any, let it; a method's steer_scale 0 is an edit of no size); condition (null, or
{threshold, toxicity: what the scorer read of the conversation, steered}); stop_reason; timings;
with "explain": true, explain (the method's explain block, as the CLI's --explain shows it). A
stream's headers go out with its first text, so that anything found wrong before (bad values, a
prompt longer than the context) is a plain HTTP error. /v1/models' "created" is the model
file's modification time.

No field is silently ignored: a field not listed here is a 400 naming it, except these, which do
not change the reply and are accepted unused: user, metadata, store, service_tier,
parallel_tool_calls, prompt_cache_key, safety_identifier (OpenAI), cache_prompt, id_slot,
timings_per_token (llama.cpp), and the settings of a llama.cpp sampler that is off
(mirostat_tau/eta, dynatemp_exponent, xtc_threshold, dry_base/allowed_length/penalty_last_n/
sequence_breakers). Known fields this server cannot honour (logit_bias, logprobs, top_logprobs,
tools, functions, tool_choice, echo, best_of, suffix; llama.cpp's n_probs, typical_p, mirostat,
dynatemp_range, xtc_probability, dry_multiplier, ignore_eos) are accepted only at their no-op values
(null, 0, 1 for typical_p, false, empty) and are a 400 otherwise, since ignoring them would change
results silently. usage.completion_tokens counts the tokens generated, including any that a stop
string cut off.

Requests are queued FIFO and run one at a time on one model thread (model_queue.py); more than
--max-queue waiting is a 503 with Retry-After. A client that hangs up (while queued, during
FGDILP's setup or mid-stream) has its generation cancelled; a reply cut by shutdown ends with an
error event (a 503 if nothing was sent yet), never as a complete one.

Abuse: POST bodies must be Content-Type application/json (415: a web page may send text/plain
cross-origin without asking); headers and then the body must each arrive within --read-timeout
seconds (slowloris: the connection is closed, or a 408 for a slow body); on a
loopback bind the Host header must be a loopback name (421, DNS rebinding); past
--max-connections open connections uvicorn answers 503. Any string field with a lone surrogate,
an integer out of range (however large) and a non-finite number are 400s. A fault of the server
is a 500 whose body says nothing about it (it is logged).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hmac
import ipaddress
import json
import logging
import os
import socket
import sys
import time
import uuid
from concurrent.futures import Future
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, Iterator, Optional

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from ..errors import ContextLengthError, FgdilpError, ParamError
from ..kv_memory import KvBudgetError
from .http_guard import header_deadline_protocol, loopback_host_header
from .model_queue import Job, JobCancelled, ModelQueue, Outcome
from .openai_api import ApiError, Policy, check_methods, param_error, parse_request, read_json
from .request_cost import MAX_CHARS, MAX_MESSAGES, RequestCost

if TYPE_CHECKING:
    from ..api import Detoxifier

log = logging.getLogger("fgdilp_cpp.serve.server")


@dataclass(frozen=True)
class Limits:
    max_queue: int = 16                 # requests waiting beyond the running one; more get 503
    max_body_bytes: int = 1 << 20
    max_tokens: int = 2048              # the largest max_tokens a request may ask for
    api_key: Optional[str] = None       # require "Authorization: Bearer KEY" on /v1
    allow_methods: Optional[tuple[str, ...]] = None   # methods a request may name; None: the configured one
    max_steer_scale: float = 2.0        # steer_scale in [0, this]: negative toxifies, large wrecks fluency
    max_connections: int = 64           # uvicorn's limit_concurrency: connections past it get 503
    read_timeout: float = 10.0          # seconds a request's headers, and then its body, may take to
                                        # arrive (slowloris): the connection is closed, or a 408
    loopback_host: bool = True          # require a loopback Host header (DNS rebinding); run_server
                                        # turns it off when listening on another address
    max_messages: int = MAX_MESSAGES    # messages in one chat request
    max_chars: int = MAX_CHARS          # characters of text in one request
    drain_s: float = 5.0                # at shutdown, seconds the model thread gets to stop after the
                                        # connections closed; run_server exits regardless after it


class _ClientGone(Exception):
    """The client hung up before its answer was ready."""


class _Service(ModelQueue):
    """The model queue plus what the endpoints need: limits, the request policy, the API key."""

    def __init__(self, det: Detoxifier, limits: Limits):
        allowed = limits.allow_methods if limits.allow_methods is not None else (det.settings.method,)
        methods = check_methods(list(allowed), det.vectors is not None)
        if det.settings.method not in methods:
            raise FgdilpError(f"--allow-methods must include --method {det.settings.method} (what a request "
                              "that names no method runs)")
        if not 0 <= limits.max_steer_scale < float("inf"):
            raise FgdilpError(f"--max-steer-scale must be a finite number >= 0, not {limits.max_steer_scale}")
        if limits.api_key is not None and not limits.api_key.strip():
            raise FgdilpError("--api-key (or FGDILP_API_KEY) is empty: that would not require any key; "
                              "give a key, or leave both unset to serve without one")
        super().__init__(det, limits.max_queue, methods)
        self.cost = RequestCost(det, limits.max_messages, limits.max_chars)
        self.limits = limits
        try:                                    # models.list's "created": when the model file was made
            self.created = int(os.stat(det.model.info.path).st_mtime)
        except OSError:
            self.created = int(time.time())
        self.policy = Policy(max_tokens=limits.max_tokens, methods=methods,
                             max_steer_scale=limits.max_steer_scale)

    def authorize(self, request: Request) -> None:
        key = self.limits.api_key
        if key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def check_host(self, request: Request) -> None:
        """On a loopback bind, a Host header that is not a loopback name means a browser was led
        here by DNS rebinding (a page's own name resolving to 127.0.0.1): refused (421)."""
        host = request.headers.get("host", "")
        if self.limits.loopback_host and not loopback_host_header(host):
            raise ApiError(421, "this server answers only requests addressed to localhost, 127.0.0.1 or [::1] "
                           "(Host header)", code="invalid_host")


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


def _internal_error() -> ApiError:
    return ApiError(500, "internal error (the details are in the server log)", kind="server_error")


@contextmanager
def _job_errors(chat: bool) -> Iterator[None]:
    """A job's failures as HTTP errors. Everything a client can get wrong was refused by
    parse_request except a conversation longer than the context (400); a cancel is a 503; anything
    else is the server's fault: logged with its details, a 500 without them (no paths)."""
    try:
        yield
    except (ApiError, _ClientGone):
        raise
    except ContextLengthError as exc:
        raise ApiError(400, str(exc), param="messages" if chat else "prompt",
                       code="context_length_exceeded") from None
    except ParamError as exc:           # a setting out of range that parse_request let through
        raise param_error(exc) from None
    except KvBudgetError as exc:        # this request alone needs more KV than --kv-budget-mib allows
        raise ApiError(503, str(exc), kind="server_error", code="kv_budget") from None
    except JobCancelled as exc:
        message = ("the server is shutting down; the reply was not finished" if exc.reason == "shutting_down"
                   else "the request was cancelled")
        raise ApiError(503, message, kind="server_error", code=exc.reason) from None
    except Exception as exc:  # noqa: BLE001 - FgdilpError included: input errors cannot reach here
        log.error("generation failed", exc_info=exc)
        raise _internal_error() from None


class _EventStream(StreamingResponse):
    """Server-sent events; when the response ends for any reason (the client hung up, shutdown)
    the job is cancelled, which is a no-op if it already finished."""

    def __init__(self, events: AsyncIterator[bytes], job: Job):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._job = job

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._job.cancel()


async def _unless_gone(request: Request, job: Job, waiting: Awaitable[Any]) -> Any:
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
    body = await read_json(request, svc.limits.max_body_bytes, svc.limits.read_timeout)
    if chat:
        svc.cost.check_body(body)
    req = parse_request(body, chat, svc.det, svc.policy)
    svc.cost.check(req)
    fitted = await svc.cost.fit(req)            # a 400 here, before the request is queued
    if await request.is_disconnected():        # hung up while it was fitted: nothing is queued
        raise _ClientGone()
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": svc.model_id}

    if not req.stream:
        job, fut = svc.submit(req, fitted=fitted)
        with _job_errors(chat):
            o = await _unless_gone(request, job, asyncio.wrap_future(fut))
        choice = ({"index": 0, "message": {"role": "assistant", "content": o.text}, "logprobs": None,
                   "finish_reason": o.finish_reason} if chat else _choice(False, o.text, o.finish_reason))
        return JSONResponse({**head, "choices": [choice], "usage": _usage(o), "fgdilp": o.stats})

    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()     # text pieces, then the job's Future
    job, fut = svc.submit(req, lambda text: loop.call_soon_threadsafe(events.put_nowait, text), fitted)

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
            await asyncio.sleep(0)                  # let a hang-up be seen before the next write: queued
            item = await events.get()               # pieces would go to a dead socket, and asyncio logs it
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
    """A route handler(request, service): Host and API key checks, errors as JSON, 500 for bugs
    (logged, with no details in the body)."""
    def deco(fn: Callable[[Request, _Service], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        @functools.wraps(fn)
        async def handler(request: Request) -> Response:
            svc: _Service = request.app.state.service
            try:
                svc.check_host(request)
                if auth:
                    svc.authorize(request)
                return await fn(request, svc)
            except ApiError as exc:
                return exc.response()
            except (_ClientGone, ClientDisconnect):
                return Response(status_code=499)    # never sent: the client is gone
            except Exception:  # noqa: BLE001 - a bug: logged here, one line to the client
                log.exception("internal error on %s %s", request.method, request.url.path)
                return _internal_error().response()
        return handler
    return deco


def _model_card(svc: _Service) -> dict:
    return {"id": svc.model_id, "object": "model", "created": svc.created, "owned_by": "fgdilp-cpp"}


@_endpoint(auth=False)
async def health(request: Request, svc: _Service) -> Response:
    """200 once the allowed methods' contexts exist; 503 while they are made, or if that failed."""
    if svc.ready.is_set():
        return JSONResponse({"status": "ok", "model": svc.model_id})
    status = "error" if svc.warm_error is not None else "loading"
    return JSONResponse({"status": status, "model": svc.model_id}, status_code=503, headers={"Retry-After": "1"})


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
    return _internal_error().response()


def create_app(det: Detoxifier, limits: Limits = Limits()) -> Starlette:
    """The ASGI app serving `det` (an open Detoxifier);
    its model thread stops at app shutdown, after which `det` may be closed."""
    svc = _Service(det, limits)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        svc.start()
        try:
            yield
        finally:
            svc.close(limits.drain_s)
            svc.cost.close()

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


class Server(uvicorn.Server):
    """uvicorn with this server's limits: at most --max-connections connections (503 past it), a
    deadline for request headers (http_guard.py), and a shutdown that first cancels the running
    and queued replies, so that a reply cut by shutdown ends with an error event (or a 503) before
    uvicorn waits for the connections to close."""

    def __init__(self, app: Starlette, limits: Limits, **config):
        svc: _Service = app.state.service
        super().__init__(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=3, lifespan="on",
                                        limit_concurrency=limits.max_connections,
                                        http=header_deadline_protocol(limits.read_timeout), **config))
        svc.on_warm_error = self._stop
        self.service = svc

    def _stop(self) -> None:                   # on the model thread: the warm-up failed
        self.should_exit = True

    async def shutdown(self, sockets: Optional[list[socket.socket]] = None) -> None:
        self.service.begin_shutdown()
        await super().shutdown(sockets)


def run_server(det: Detoxifier, host: str, port: int, limits: Limits = Limits()) -> None:
    """Serve until Ctrl-C (or SIGTERM); port 0 picks a free port (printed)."""
    limits = dataclasses.replace(limits, loopback_host=_is_loopback(host))
    app = create_app(det, limits)
    sock = _bind(host, port)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    svc: _Service = app.state.service
    print(f"serving {svc.model_id} on http://{shown}:{bound} (OpenAI API at /v1)", file=sys.stderr)
    if not limits.loopback_host:
        print(f"warning: listening on {host}: anyone who can reach it can use the model"
              + ("" if limits.api_key else " (no --api-key set)"), file=sys.stderr)
    server = Server(app, limits)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:                   # uvicorn re-raises the Ctrl-C it shut down on
        print("stopped", file=sys.stderr)
    finally:
        stopped = svc.close(limits.drain_s)
        sock.close()
    if not stopped:     # stuck in a call that cannot be cancelled: the Detoxifier must not be closed
        print(f"error: the model thread did not stop within {limits.drain_s:g} s of shutdown; exiting "
              "without waiting for it", file=sys.stderr, flush=True)
        os._exit(1)
    if svc.warm_error is not None:
        raise FgdilpError(f"the model could not start: {svc.warm_error}")
