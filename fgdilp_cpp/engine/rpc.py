"""A model's layers on llama.cpp RPC servers (rpc-server), as llama.cpp's own tools place them.

llama.cpp's --rpc (common/arg.cpp add_rpc_devices) asks the RPC backend's registry for
ggml_backend_rpc_add_server, calls it per endpoint and registers each server's devices globally.
Here the devices are instead handed to one model through llama_model_params.devices: registered
globally, they would also take the layers of every later model loaded without --rpc.

llama.cpp's RPC client cannot recover from a lost server: ggml-rpc aborts the process
(GGML_ABORT "Remote RPC server crashed or returned malformed response"). An abort callback turns
that into one clear line and exit status 1 instead of a core dump and a backtrace; nothing can
keep the process alive past it (docs/rpc.md).
"""

from __future__ import annotations

import collections
import ctypes
import os
import re
import socket
from typing import Any, Optional

import llama_cpp.llama_cpp as ll

from ..errors import FgdilpError
from ..rpc_endpoints import parse_rpc_servers

NO_RPC_BACKEND = ("this llama-cpp-python build has no RPC backend: run tools/rpc-check.sh, or build "
                  "llama-cpp-python with CMAKE_ARGS=\"-DGGML_RPC=ON\" (docs/rpc.md)")
CONNECT_TIMEOUT_S = 5.0     # a server that does not accept within this is refused before llama.cpp sees it
EXIT_RPC_LOST = 1           # the CLI's exit status for an error

_AbortCallback = ctypes.CFUNCTYPE(None, ctypes.c_char_p)
_abort_callback: Optional[Any] = None     # kept referenced: ggml calls it from any thread
_servers_in_use: list[str] = []
# live models per endpoint: llama.cpp keeps one connection per server while any of them lives, and
# rpc-server serves one connection at a time (listen backlog 1): a probe connection to a server
# this process already holds would queue unanswered and fill that backlog
_live_models: collections.Counter[str] = collections.Counter()


def _libggml():
    """libggml of the loaded llama-cpp-python (dlsym through it also finds libggml-base's symbols)."""
    from llama_cpp._ggml import libggml

    sig = {
        "ggml_backend_reg_by_name": ([ctypes.c_char_p], ctypes.c_void_p),
        "ggml_backend_reg_get_proc_address": ([ctypes.c_void_p, ctypes.c_char_p], ctypes.c_void_p),
        "ggml_backend_reg_dev_count": ([ctypes.c_void_p], ctypes.c_size_t),
        "ggml_backend_reg_dev_get": ([ctypes.c_void_p, ctypes.c_size_t], ctypes.c_void_p),
        "ggml_set_abort_callback": ([_AbortCallback], ctypes.c_void_p),
    }
    for name, (args, res) in sig.items():
        fn = getattr(libggml, name)
        fn.argtypes, fn.restype = args, res
    return libggml


def check_reachable(endpoint: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Refuse a server that does not accept a TCP connection (ggml-rpc would abort the process)."""
    host, _, port = endpoint.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise FgdilpError(f"cannot reach the RPC server {endpoint}: {reason} (is rpc-server running there, "
                          f"listening on that address? docs/rpc.md)") from None


def _on_ggml_abort(message: bytes) -> None:
    # ggml's message starts with its source path: the file name says enough
    text = re.sub(r"^\S*/", "", (message or b"").decode("utf-8", errors="replace").strip())
    if "rpc" in text.lower():
        line = (f"error: llama.cpp lost an RPC server ({', '.join(_servers_in_use)}): {text}; is each "
                f"rpc-server still running and reachable? (llama.cpp's RPC client cannot go on without it)\n")
    else:
        line = f"error: llama.cpp aborted: {text}\n"
    os.write(2, line.encode())
    os._exit(EXIT_RPC_LOST)


def _install_abort_callback(lib, servers: list[str]) -> None:
    global _abort_callback
    for s in servers:
        if s not in _servers_in_use:
            _servers_in_use.append(s)
    if _abort_callback is None:
        _abort_callback = _AbortCallback(_on_ggml_abort)
        lib.ggml_set_abort_callback(_abort_callback)


def rpc_devices(servers_text: str) -> ctypes.Array:
    """The devices of the RPC servers "HOST:PORT,..." in that order, as a NULL-terminated
    ggml_backend_dev_t array for llama_model_params.devices (keep it referenced while the model lives)."""
    servers = parse_rpc_servers(servers_text)
    if not ll.llama_supports_rpc():
        raise FgdilpError(NO_RPC_BACKEND)
    lib = _libggml()
    reg = lib.ggml_backend_reg_by_name(b"RPC")
    add_server_addr = lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_rpc_add_server") if reg else None
    if not add_server_addr:
        raise FgdilpError(NO_RPC_BACKEND + " (its registry has no ggml_backend_rpc_add_server)")
    add_server = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)(add_server_addr)
    for endpoint in servers:
        if not _live_models[endpoint]:
            check_reachable(endpoint)
    _install_abort_callback(lib, servers)
    devices: list[int] = []
    for endpoint in servers:
        server_reg = add_server(endpoint.encode())
        n = lib.ggml_backend_reg_dev_count(server_reg) if server_reg else 0
        if n == 0:
            raise FgdilpError(f"the RPC server {endpoint} offers no device")
        devices += [lib.ggml_backend_reg_dev_get(server_reg, i) for i in range(n)]
    return (ctypes.c_void_p * (len(devices) + 1))(*devices, None)


def hold(servers_text: str) -> None:
    """A model on these servers was loaded (its connections are open until release)."""
    _live_models.update(parse_rpc_servers(servers_text))


def release(servers_text: str) -> None:
    """A model on these servers was freed."""
    _live_models.subtract(parse_rpc_servers(servers_text))
    for endpoint in [e for e, n in _live_models.items() if n <= 0]:
        del _live_models[endpoint]
