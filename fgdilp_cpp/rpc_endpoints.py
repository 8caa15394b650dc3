"""The --rpc setting's value: llama.cpp RPC servers as "HOST:PORT[,HOST:PORT...]" (docs/rpc.md).

Pure text checks, no llama.cpp: settings.py refuses a malformed list whatever its source (flag,
FGDILP_RPC, the config file's `rpc` key, an API keyword), before any model is loaded.
"""

from __future__ import annotations

from .errors import ParamError

# ggml-rpc.h's GGML_RPC_MAX_SERVERS: llama.cpp's RPC client holds at most this many
MAX_RPC_SERVERS = 16


def parse_rpc_servers(text: str) -> list[str]:
    """The endpoints of "HOST:PORT[,HOST:PORT...]", each as HOST:PORT; ParamError("rpc", ...) on
    anything llama.cpp's parser would abort on (ggml-rpc's parse_endpoint aborts the process)."""
    items = [s.strip() for s in text.split(",")]
    if not text.strip() or any(not s for s in items):
        raise ParamError("rpc", f"must be HOST:PORT[,HOST:PORT...], not {text!r}")
    if len(items) > MAX_RPC_SERVERS:
        raise ParamError("rpc", f"names {len(items)} servers; llama.cpp's RPC backend takes at most {MAX_RPC_SERVERS}")
    if len(set(items)) != len(items):
        raise ParamError("rpc", f"names a server twice: {text!r}")
    for item in items:
        host, sep, port = item.rpartition(":")
        if not sep or not host or any(c.isspace() for c in host):
            raise ParamError("rpc", f"must be HOST:PORT[,HOST:PORT...]: {item!r} has no HOST:PORT form")
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ParamError("rpc", f"must be HOST:PORT[,HOST:PORT...]: {item!r} has no port in 1..65535")
    return items
