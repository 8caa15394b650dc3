"""Shared fixtures: tiny random-weight GGUF models (built with gguf), the real default model, and a
CLI runner that goes through a subprocess like a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_model import (CHATML, TinyConfig, build_tiny_llama, build_tiny_mamba,  # noqa: E402
                        gpu_layers_for_tests)

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    """scripts/NAME.py as a module (the scripts are not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# FGDILP_TEST_NGL=99 (tools/gpu-check.sh): the tiny models' layers on the GPU, in-process and in the CLI
TEST_NGL = gpu_layers_for_tests()
# FGDILP_TEST_RPC=HOST:PORT,... (tools/rpc-check.sh): the tiny model's layers on those llama.cpp RPC servers
TEST_RPC = os.environ.get("FGDILP_TEST_RPC") or None


# What a user meets with a model that has no profile (the fast setup on first use, the measured-safe
# stand-in profile) is what tests/test_fast_setup.py checks, marked `unprofiled`. Every other test,
# and every fixture whatever its scope, sees the built-in defaults as with --no-profile: the two
# seams of Detoxifier are replaced for the whole session and FGDILP_AUTO_SETUP=0, FGDILP_PROFILE=0
# go to the CLI's subprocesses (a test that applies a profile through the CLI drops FGDILP_PROFILE).
USER_SEAMS: dict = {}
SESSION_CACHE: list[str] = []


def pytest_configure(config):
    from fgdilp_cpp.api import Detoxifier

    USER_SEAMS.update({name: Detoxifier.__dict__[name] for name in ("_wants_setup", "_stand_in")})
    Detoxifier._wants_setup = lambda self, settings, profile: False       # type: ignore[method-assign]
    Detoxifier._stand_in = staticmethod(lambda model: None)               # type: ignore[method-assign]
    os.environ["FGDILP_AUTO_SETUP"] = "0"
    os.environ["FGDILP_PROFILE"] = "0"
    # fixtures of a module's or the session's scope run before no_model_profiles: they too must not
    # see the user's profiles (nor write there)
    import tempfile

    os.environ["FGDILP_PROFILE_PATH"] = tempfile.mkdtemp(prefix="fgdilp-test-profiles-")
    # the scorers' prepared copies (toxicity/prepared.py) go to a session folder, never the user's
    # cache; subprocesses inherit it, and it is removed at the end (it holds ~32 MB per judge)
    SESSION_CACHE.append(tempfile.mkdtemp(prefix="fgdilp-test-cache-"))
    os.environ["FGDILP_CACHE_PATH"] = SESSION_CACHE[-1]


def pytest_unconfigure(config):
    import shutil

    for folder in SESSION_CACHE:
        shutil.rmtree(folder, ignore_errors=True)


def as_a_user_meets_it(mp: pytest.MonkeyPatch) -> None:
    """Undo the session's view for one test or fixture: the fast setup and the stand-in as shipped."""
    from fgdilp_cpp.api import Detoxifier

    for name, attr in USER_SEAMS.items():
        mp.setattr(Detoxifier, name, attr)
    mp.delenv("FGDILP_AUTO_SETUP", raising=False)
    mp.delenv("FGDILP_PROFILE", raising=False)


@pytest.fixture(autouse=True)
def no_model_profiles(tmp_path_factory, monkeypatch, request):
    """Tests see no model profile (neither the user's nor the shipped ones) unless they make one:
    what a test checks must not depend on this machine's calibrations. Subprocesses inherit it."""
    monkeypatch.setenv("FGDILP_PROFILE_PATH", str(tmp_path_factory.mktemp("no-profiles")))
    if request.node.get_closest_marker("unprofiled") is not None:
        as_a_user_meets_it(monkeypatch)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """(path, weights, cfg) of a tiny llama-architecture model with GQA."""
    cfg = TinyConfig()
    path = tmp_path_factory.mktemp("tiny") / "tiny-llama.gguf"
    weights = build_tiny_llama(path, cfg)
    return path, weights, cfg


@pytest.fixture(scope="session")
def tiny_chat(tmp_path_factory):
    """A tiny llama with a ChatML template in its GGUF whose EOS never wins (long replies)."""
    path = tmp_path_factory.mktemp("chat") / "tiny-chat.gguf"
    build_tiny_llama(path, TinyConfig(chat_template=CHATML, mute_eos=True))
    return path


@pytest.fixture(scope="session")
def model(tiny_llama):
    """The tiny llama model loaded through the engine."""
    from fgdilp_cpp.engine import Model

    with Model(tiny_llama[0], n_gpu_layers=TEST_NGL, rpc=TEST_RPC) as m:
        yield m


@pytest.fixture(scope="session")
def torch_model(tiny_llama):
    """A float64 torch forward of the same weights."""
    from torch_reference import TorchLlama

    _, weights, cfg = tiny_llama
    return TorchLlama(weights, cfg)


@pytest.fixture(scope="session")
def tiny_mamba(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny-mamba.gguf"
    build_tiny_mamba(path)
    return path


@pytest.fixture(scope="session")
def gemma_path():
    """The embedded gemma-3-270m: tests that use it carry @pytest.mark.real_model (checked below)."""
    from fgdilp_cpp.models import default_model_path

    return default_model_path()


REAL_MODEL_FIXTURES = ("gemma_path",)


def pytest_collection_modifyitems(config, items):
    """`pytest -m "not real_model"` is the fast loop only if every real-model test says so."""
    unmarked = [item.nodeid for item in items if item.get_closest_marker("real_model") is None
                and any(f in getattr(item, "fixturenames", ()) for f in REAL_MODEL_FIXTURES)]
    if unmarked:
        raise pytest.UsageError("tests that use a real model lack @pytest.mark.real_model: " + ", ".join(unmarked))


def run_cli(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    full_env.pop("FGDILP_DEBUG", None)
    if TEST_NGL:
        full_env.setdefault("FGDILP_N_GPU_LAYERS", str(TEST_NGL))
    return subprocess.run([sys.executable, "-m", "fgdilp_cpp.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=full_env, stdin=subprocess.DEVNULL)


@pytest.fixture
def cli():
    return run_cli
