"""--rpc: the model's layers on llama.cpp RPC servers (docs/rpc.md, tools/rpc-check.sh).

Always: the setting from every source, malformed lists refused; on a build without the RPC
backend (the default install), --rpc refused with its reason. With FGDILP_TEST_RPC=HOST:PORT,...
(running rpc-server processes) on an RPC build, as tools/rpc-check.sh runs them: the embedded
model split across the servers gives the local logits, steered (TR, universal) and not; an
unreachable server is refused; a server killed mid-generation ends the process with a clear error.
"""

from __future__ import annotations

import os
import selectors
import socket
import subprocess
import sys
import time

import llama_cpp.llama_cpp as ll
import numpy as np
import pytest

from fgdilp_cpp.errors import FgdilpError, ParamError
from fgdilp_cpp.settings import Settings

TEST_RPC = os.environ.get("FGDILP_TEST_RPC") or None
RPC_SERVER = os.environ.get("FGDILP_TEST_RPC_SERVER") or None
HAS_RPC = bool(ll.llama_supports_rpc())
needs_servers = pytest.mark.skipif(not (HAS_RPC and TEST_RPC), reason="needs an RPC build and FGDILP_TEST_RPC "
                                                                      "(tools/rpc-check.sh runs these)")
PROMPT = "The ill-fated tale of Phoneys, the stupid"


# ---- the setting (no servers needed) -----------------------------------------------------------
def test_rpc_setting_from_every_source(tmp_path):
    assert Settings().rpc is None
    assert Settings().updated({"rpc": " 127.0.0.1:50052 , host-b:50053"}).rpc == "127.0.0.1:50052,host-b:50053"
    assert Settings().updated({"rpc": ""}).rpc is None                     # empty: local
    assert Settings.from_env({"FGDILP_RPC": "10.0.0.2:50052"}) == {"rpc": "10.0.0.2:50052"}
    toml = tmp_path / "s.toml"
    toml.write_text('rpc = "10.0.0.2:50052,10.0.0.3:50052"\n')
    assert Settings.toml_values(toml) == {"rpc": "10.0.0.2:50052,10.0.0.3:50052"}
    assert Settings(rpc="h:1").rpc == "h:1"                                 # the API keyword (Detoxifier.from_file)


@pytest.mark.parametrize("bad", ["127.0.0.1", "host:0", "host:70000", "host:x", ":50052", "a:1,,b:2",
                                 "a:1,a:1", "a b:1", ",".join(f"h:{p}" for p in range(1, 18))])
def test_malformed_rpc_lists_are_refused(bad):
    with pytest.raises(ParamError) as exc:
        Settings().updated({"rpc": bad})
    assert exc.value.field == "rpc"


def test_malformed_rpc_names_its_source(cli, tiny_llama, tmp_path):
    r = cli("generate", "-m", tiny_llama[0], "-p", "hi", "-n", "1", "--rpc", "127.0.0.1")
    assert r.returncode == 1 and r.stderr.startswith("error: --rpc must be HOST:PORT"), r.stderr
    r = cli("generate", "-m", tiny_llama[0], "-p", "hi", "-n", "1", env={"FGDILP_RPC": "h:99999"})
    assert r.returncode == 1 and "FGDILP_RPC" in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.skipif(HAS_RPC, reason="this llama-cpp-python has the RPC backend")
def test_a_build_without_rpc_refuses_with_its_reason(cli, tiny_llama):
    from fgdilp_cpp.api import Detoxifier

    with pytest.raises(FgdilpError, match="no RPC backend: run tools/rpc-check.sh"):
        Detoxifier.from_file(str(tiny_llama[0]), rpc="127.0.0.1:50052")
    r = cli("generate", "-m", tiny_llama[0], "-p", "hi", "-n", "1", "--rpc", "127.0.0.1:50052")
    assert r.returncode == 1, r.stderr
    assert "no RPC backend" in r.stderr and "GGML_RPC=ON" in r.stderr and "Traceback" not in r.stderr
    assert r.stdout == ""                                                   # nothing generated unsplit


# ---- with servers ------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(port: int, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"rpc-server on port {port} did not start")


@needs_servers
def test_unreachable_server_is_refused(tiny_llama):
    from fgdilp_cpp.engine import Model

    dead = f"127.0.0.1:{_free_port()}"
    with pytest.raises(FgdilpError, match=f"cannot reach the RPC server {dead}"):
        Model(tiny_llama[0], rpc=f"{TEST_RPC},{dead}")


@needs_servers
def test_models_sharing_servers_load_while_one_lives(tiny_llama):
    """rpc-server answers one connection at a time (backlog 1): loads that probed servers this
    process already holds would queue unanswered connections until a connect timed out."""
    from fgdilp_cpp.engine import Model

    with Model(tiny_llama[0], rpc=TEST_RPC) as first:
        for _ in range(4):
            with Model(tiny_llama[0], rpc=TEST_RPC) as again:
                assert again.info == first.info


def _steps(gemma_path, rpc, method, capfd, forced=None):
    from fgdilp_cpp.api import Detoxifier
    from fgdilp_cpp.engine import context
    from fgdilp_cpp.params import SamplingParams

    capfd.readouterr()
    context.set_verbose(True)                # llama.cpp's log to stderr: where it put the layers
    try:
        det = Detoxifier.from_file(str(gemma_path), rpc=rpc, profile=False, threads=1, ctx_size=256)
    finally:
        context.set_verbose(False)
    load_log = capfd.readouterr().err.splitlines()
    with det:
        n_layer = det.generator.model.info.n_layer
        r = det.generator.generate(PROMPT, method, 6, SamplingParams(seed=5), record_logits=True, forced_tokens=forced)
    if method != "none":
        assert r.fired_layers == n_layer          # the hook fired on every layer, wherever the layer ran
    return r.tokens, np.stack(r.logits), load_log


@needs_servers
@pytest.mark.real_model
@pytest.mark.parametrize("method", ["tr", "universal"])
def test_steered_logits_through_rpc_equal_local(gemma_path, method, monkeypatch, capfd):
    from fgdilp_cpp.profiles import SHIPPED_DIR

    monkeypatch.setenv("FGDILP_PROFILE_PATH", str(SHIPPED_DIR))     # the shipped universal directions
    monkeypatch.delenv("FGDILP_PROFILE")
    # the local run on llama.cpp's plain CPU buffers, as an rpc-server holds the weights: by default
    # a local CPU repacks quantised weights (CPU_REPACK), whose kernels round differently (docs/rpc.md)
    default_params = ll.llama_model_default_params

    def plain_buffers():
        p = default_params()
        p.use_extra_bufts = False
        return p

    monkeypatch.setattr(ll, "llama_model_default_params", plain_buffers)
    tokens, _, _ = _steps(gemma_path, None, method, capfd)
    _, local, _ = _steps(gemma_path, None, method, capfd, forced=tokens)        # every run: the same tokens
    _, unsteered, _ = _steps(gemma_path, None, "none", capfd, forced=tokens)
    _, remote, load_log = _steps(gemma_path, TEST_RPC, method, capfd, forced=tokens)
    # the layers really are on both servers: llama.cpp says so while loading
    placed = [line for line in load_log if "model buffer size" in line or "offloaded" in line]
    for server in TEST_RPC.split(","):
        assert any(f"[{server}] model buffer size" in line for line in placed), placed
    on_servers = sum("assigned to device RPC" in line for line in load_log)       # every layer and the output
    assert on_servers > 1 and any(f"offloaded {on_servers}/{on_servers} layers" in line for line in placed), placed
    diff = float(np.abs(remote - local).max())
    steer = float(np.abs(unsteered - local).max())
    # the same kernels on the same machine: float rounding at most (bit-equal where measured),
    # far below what steering moves
    assert diff <= 1e-4 * float(np.abs(local).max()), (diff, steer)
    assert steer > 100 * max(diff, 1e-6), (diff, steer)


PAUSING_SCRIPT = r"""
import sys
from fgdilp_cpp.api import Detoxifier
from fgdilp_cpp.params import SamplingParams
det = Detoxifier.from_file(sys.argv[1], rpc=sys.argv[2], threads=1, ctx_size=256)
first = []
def on_text(piece):
    if not first:
        first.append(piece)
        print("paused", flush=True)
        sys.stdin.readline()            # the test kills the server now
det.generator.generate("the cat sat", "tr", 40, SamplingParams(seed=1), on_text=on_text, stop_at_eog=False)
print("finished", flush=True)
"""


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    if not sel.select(timeout):
        raise AssertionError("the generation did not reach its first token in time")
    return proc.stdout.readline()


@needs_servers
@pytest.mark.skipif(not RPC_SERVER, reason="needs FGDILP_TEST_RPC_SERVER, the rpc-server binary")
def test_server_killed_mid_generation_is_a_clear_error(tiny_chat):
    port = _free_port()
    server = subprocess.Popen([RPC_SERVER, "-H", "127.0.0.1", "-p", str(port), "-t", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc = None
    try:
        _wait_listening(port)
        proc = subprocess.Popen([sys.executable, "-c", PAUSING_SCRIPT, str(tiny_chat), f"127.0.0.1:{port}"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert _read_line(proc, 120).strip() == "paused"
        server.kill()
        server.wait(timeout=10)
        proc.stdin.write("\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=60)           # no hang: it ends on its own
        assert proc.returncode == 1, (proc.returncode, err)
        assert f"error: llama.cpp lost an RPC server (127.0.0.1:{port})" in err, err
        assert "Traceback" not in err and "finished" not in out
    finally:
        for p in (proc, server):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
