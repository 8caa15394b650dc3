"""`fgdilp-cpp chat` and `fgdilp-cpp serve`: thin commands over repl.py and server.py."""

from __future__ import annotations

import sys

import click

from .options import SetupBar, _settings, announce, friendly_errors, setting_options, sources, with_vectors
from ..errors import FgdilpError

VECTORS_OPTION = click.option("--vectors", "vectors_path", default=None, metavar="FILE.gguf",
                              help="Apply saved head directions (frozen) instead of building them per reply.")


def _open_chat(kw: dict, command: str, model_arg=None):
    """Settings (`command`'s defaults < config file < FGDILP_* < flags) and the Detoxifier."""
    from ..api import Detoxifier

    vectors_path = kw.pop("vectors_path", None)
    if model_arg:
        if kw.get("model"):
            raise FgdilpError("give the model once: as MODEL or with -m")
        kw["model"] = model_arg
        src = click.get_current_context()
        src.set_parameter_source("model", click.core.ParameterSource.COMMANDLINE)
    s = with_vectors(_settings(kw, command), vectors_path)
    det = Detoxifier(s, vectors_path, chat=True, sources=sources(), setup_progress=SetupBar())
    announce(det)
    return s, det


@click.command()
@click.argument("model_arg", metavar="[MODEL]", required=False)
@setting_options("model", "sampling", "steer", "reply", "chat", command="chat")
@VECTORS_OPTION
@click.option("--history-dir", default=None, metavar="DIR",
              help="Where every conversation is saved as it goes, one file each (default: "
                   "$XDG_DATA_HOME/fgdilp-cpp/chats; a folder others may write in is refused).")
@setting_options("history", command="chat")
@friendly_errors
def chat(model_arg, history_dir, **kw):
    """Chat with MODEL (default: SmolLM2-135M-Instruct), each reply detoxified.

    The conversation is the prompt that the steering prefixes are built on; with fgdilp the model
    first writes a few candidate replies, scores them itself and steers away from the worst.
    Type /help in the session for its commands."""
    from ..chat.repl import run_chat

    s, det = _open_chat(kw, "chat", model_arg)
    with det:
        code = run_chat(det, history_dir)
    raise SystemExit(code)


@click.command()
@setting_options("model", "sampling", "steer", "reply", "chat", command="serve")
@VECTORS_OPTION
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (loopback by default; anything else is reachable by others).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
@click.option("--max-queue", type=click.IntRange(1), default=16, show_default=True,
              help="Requests waiting for the model beyond the running one; more get 503.")
@click.option("--max-body-bytes", type=click.IntRange(1024), default=1 << 20, show_default=True)
@click.option("--max-tokens", "max_tokens_limit", type=click.IntRange(1), default=2048, show_default=True,
              help="Largest max_tokens a request may ask for.")
@click.option("--api-key", default=None, help="Require 'Authorization: Bearer KEY' (also FGDILP_API_KEY).")
@click.option("--allow-methods", default=None, metavar="LIST",
              help="Methods a request may ask for, comma-separated (default: --method only).")
@click.option("--max-steer-scale", type=click.FloatRange(0, 1e6), default=2.0, show_default=True,
              help="Largest steer_scale a request may ask for (negative ones are always refused).")
@click.option("--max-connections", type=click.IntRange(2), default=64, show_default=True,
              help="Open connections at most; more get 503.")
@click.option("--read-timeout", type=click.FloatRange(0.1, 3600), default=10.0, show_default=True,
              help="Seconds a client may take to send a request's headers, and again its body (slowloris).")
@click.option("--max-messages", type=click.IntRange(1), default=1024, show_default=True,
              help="Messages in one chat request at most.")
@click.option("--max-chars", type=click.IntRange(1), default=256 * 1024, show_default=True,
              help="Characters of message or prompt text in one request at most.")
@friendly_errors
def serve(host, port, max_queue, max_body_bytes, max_tokens_limit, api_key, allow_methods, max_steer_scale,
          max_connections, read_timeout, max_messages, max_chars, **kw):
    """OpenAI-compatible HTTP server: /v1/chat/completions, /v1/completions, /v1/models, /health.

    Requests may add "method", "steer_scale" and "steer_layer_range"; they are queued and run one
    at a time on one model (default: SmolLM2-135M-Instruct). The KV of the last --kv-conversations
    conversations is kept per method, so a client's next turn decodes only its new tokens."""
    import os

    try:
        from ..serve.server import Limits, run_server
    except ImportError as exc:   # starlette or uvicorn absent: the [server] extra was not installed
        raise FgdilpError(f"serve needs {(exc.name or '?').split('.')[0]}: pip install 'fgdilp-cpp[server]' "
                          "(make install installs it)") from None

    if sys.stderr.isatty():     # seconds pass before "serving ... on"; scripts read that as the first line
        click.echo("fgdilp-cpp serve: loading the model ...", err=True)
    s, det = _open_chat(kw, "serve")
    methods = tuple(m.strip() for m in allow_methods.split(",") if m.strip()) if allow_methods is not None else None
    limits = Limits(max_queue=max_queue, max_body_bytes=max_body_bytes, max_tokens=max_tokens_limit,
                    api_key=api_key if api_key is not None else os.environ.get("FGDILP_API_KEY"),
                    allow_methods=methods, max_steer_scale=max_steer_scale, max_connections=max_connections,
                    read_timeout=read_timeout, max_messages=max_messages, max_chars=max_chars)
    with det:
        run_server(det, host, port, limits)
