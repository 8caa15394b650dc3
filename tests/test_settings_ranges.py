"""One validated range per numeric setting whatever its source (flag, FGDILP_* variable, config
file, profile, API keyword), checked before llama.cpp allocates anything; and the issue #27 low
items on input files: a profile's bad value names the file, a lone surrogate in an eval prompt file
names its line and leaves nothing behind, a byte-order mark is not prompt text, a model with NaN
weights is an error, not an empty reply."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import fields

import pytest

from fgdilp_cpp.errors import FgdilpError, ParamError
from fgdilp_cpp.params import MAX_SEQUENCES, FgdilpParams, max_threads
from fgdilp_cpp.profiles import Profile, profile_path_for
from fgdilp_cpp.settings import RANGES, Settings, SourcedParamError

from conftest import ROOT, run_cli
from test_cli_errors import assert_clean_error
from tiny_model import TinyConfig, build_tiny_llama

NUMERIC = ("int", "float", "Optional[float]")
RUN = ["generate", "-n", "2", "-t", "1", "--method", "none"]
GEN = ["generate", "-p", "the cat", "-n", "2", "-t", "1", "--method", "none"]


@pytest.fixture(scope="module")
def short_trained(tmp_path_factory):
    """A tiny llama trained (as its GGUF says) on 256-token contexts."""
    path = tmp_path_factory.mktemp("short") / "short.gguf"
    build_tiny_llama(path, TinyConfig(n_ctx_train=256))
    return path


def test_every_numeric_setting_has_one_range():
    numeric = {f.name for f in fields(Settings) if f.type in NUMERIC}
    assert numeric == set(RANGES)
    for name in numeric:                                  # the defaults are inside their ranges
        if getattr(Settings(), name) is not None:
            RANGES[name].check(name, getattr(Settings(), name))


@pytest.mark.parametrize("key, value, needle", [
    ("batch-size", 1, "in 8.."), ("threads", -1, "in 0.."), ("ctx-size", 8, "in 16.."),
    ("kv-conversations", 1000, "in 1..16"), ("top-p", 0, "in (0, 1]"), ("mask-k", 101, "in (0, 100]"),
    ("selfgen-samples", 100000, f"in 1..{MAX_SEQUENCES}"), ("n-gpu-layers", 2**32, "in -1.."),
])
def test_config_file_has_the_flags_ranges(tmp_path, tiny_llama, key, value, needle):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"{key} = {value}\n")
    proc = run_cli(*GEN, "-m", tiny_llama[0], "--config", cfg)
    assert_clean_error(proc, f"config file {cfg}: {key} must be", needle)
    flag = {"batch-size": "-b", "threads": "-t", "ctx-size": "-c", "n-gpu-layers": "-ngl"}.get(key, "--" + key)
    by_flag = run_cli(*GEN, "-m", tiny_llama[0], flag, str(value))      # the same range, said of the flag
    assert_clean_error(by_flag, f"{flag} must be", needle)


def test_threads_past_the_cores_are_refused_from_every_source(tmp_path, tiny_llama):
    most = max_threads()
    for proc, who in ((run_cli(*GEN, "-m", tiny_llama[0], "-t", "100000"), "-t"),
                      (run_cli(*GEN, "-m", tiny_llama[0], env={"FGDILP_THREADS": "2000"}), "FGDILP_THREADS")):
        assert_clean_error(proc, f"{who} must be in 0..{most}", "per CPU core")
        assert "bad_alloc" not in proc.stdout + proc.stderr and proc.stdout == ""
    with pytest.raises(ParamError) as err:
        Settings().updated({"threads": most + 1})
    assert err.value.field == "threads"
    assert Settings().updated({"threads": most}).threads == most


def test_api_keywords_and_engine_params_are_checked_before_llama(tiny_llama, model):
    from fgdilp_cpp.api import Detoxifier
    from fgdilp_cpp.engine import Context, ContextParams

    for bad in ({"batch_size": 1}, {"threads": 100000}, {"kv_conversations": 1000}, {"ctx_size": 2**32 + 16},
                {"seed": -1}, {"top_k": 2**31}, {"temp": float("nan")}):
        with pytest.raises(ParamError) as err:
            Detoxifier.from_file(str(tiny_llama[0]), **bad)
        assert err.value.field == next(iter(bad))
    # the engine's own guard, for params built without Settings: refused before llama.cpp sees them
    for params, needle in ((ContextParams(n_ctx=64, n_threads=100000), "threads"),
                           (ContextParams(n_ctx=2**32 + 16), "cells"),
                           (ContextParams(n_ctx=64, n_seq_max=MAX_SEQUENCES + 1), "sequences")):
        with pytest.raises(FgdilpError, match=needle):
            Context(model, params)
    with pytest.raises(ParamError, match=f"1..{MAX_SEQUENCES}"):
        FgdilpParams(samples=MAX_SEQUENCES + 1).check()


def test_selfgen_samples_error_names_the_flag_and_its_limit(tiny_llama):
    proc = run_cli("generate", "-m", tiny_llama[0], "-p", "x", "-t", "1", "--method", "fgdilp",
                   "--selfgen-samples", "100000")
    assert_clean_error(proc, "--selfgen-samples must be in 1..256", "not 100000")


def test_ctx_size_has_no_wrap_and_stops_at_the_trained_context(short_trained):
    # past uint32 it used to wrap to a 256-token context; far past the memory it was OOM-killed
    for c in ("4294967312", "2000000000"):
        assert_clean_error(run_cli(*GEN, "-m", short_trained, "-c", c), "-c must be in 16..", f"not {c}")
    proc = run_cli(*GEN, "-m", short_trained, "-c", "512")
    assert_clean_error(proc, "-c must be at most the model's trained context (256 tokens)", "--ctx-size-override")
    proc = run_cli(*GEN, "-m", short_trained, env={"FGDILP_CTX_SIZE": "512"})
    assert_clean_error(proc, "FGDILP_CTX_SIZE must be at most the model's trained context")
    ok = run_cli(*GEN, "-m", short_trained, "-c", "512", "--ctx-size-override", "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["n_tokens"] == 2


def test_model_dependent_limits_name_the_config_file(tmp_path, tiny_llama):
    cfg = tmp_path / "c.toml"
    cfg.write_text("steer-layer-range = [2, 99]\n")
    proc = run_cli(*GEN[:-1], "tr", "-m", tiny_llama[0], "--config", cfg)
    assert_clean_error(proc, f"steer-layer-range (config file {cfg})", "outside the model's layers")
    assert "--steer-layer-range" not in proc.stderr


def test_default_ctx_size_comes_down_to_the_trained_context(short_trained):
    from fgdilp_cpp.api import Detoxifier, setting_sources

    with Detoxifier(Settings(model=str(short_trained), threads=1)) as det:    # the default (2048): ours
        assert det.settings.ctx_size == 256 and setting_sources(det)["ctx_size"] == (256, "default")
    with Detoxifier.from_file(str(short_trained), chat=True, threads=1, n_predict=4, chat_template="chatml") as det:
        assert det.settings.ctx_size == 256            # the chat default (4096) too
    with pytest.raises(ParamError, match="trained context"):
        Detoxifier.from_file(str(short_trained), ctx_size=300, threads=1)
    with Detoxifier.from_file(str(short_trained), ctx_size=300, ctx_size_override=True, threads=1) as det:
        assert det.settings.ctx_size == 300


def test_kv_cache_larger_than_the_memory_is_refused_before_allocating(model, monkeypatch):
    from fgdilp_cpp.engine import Context, ContextParams
    from fgdilp_cpp.engine import allocation

    i = model.info
    per_cell = i.n_layer * i.n_head_kv * 2 * i.head_dim * 2          # K and V in f16
    assert allocation.kv_cache_bytes(model, 1000, "f16", "f16") == 1000 * per_cell
    assert allocation.kv_cache_bytes(model, 1000, "f32", "q8_0") == int(1000 * i.n_layer * i.n_head_kv
                                                                         * i.head_dim * (4 + 34 / 32))
    monkeypatch.setattr(allocation, "available_memory", lambda: 100 * per_cell)
    with pytest.raises(FgdilpError, match="needs about .* of KV cache .* more than the .* available"):
        Context(model, ContextParams(n_ctx=4096))
    with Context(model, ContextParams(n_ctx=64)) as ctx:             # what fits is made as before
        assert ctx.n_ctx >= 64
    assert allocation.available_memory() is None or allocation.available_memory() > 0


def test_profile_with_a_bad_value_names_its_file(tiny_llama, tmp_path, monkeypatch):
    from fgdilp_cpp.engine import Model
    from fgdilp_cpp.profiles import model_identity

    with Model(tiny_llama[0]) as m:
        ident = model_identity(m)
    folder = tmp_path / "profiles"
    good = Profile(model=dict(ident), method="tr", methods={"tr": {"settings": {"steer_scale": 0.5}}})
    path = good.save(profile_path_for(ident, folder))
    data = json.loads(path.read_text())
    for bad, needle in (("abc", "steer-scale has the wrong type: 'abc'"), (1e400, "steer-scale must be a finite")):
        data["methods"]["tr"]["settings"]["steer_scale"] = bad
        path.write_text(json.dumps(data))
        proc = run_cli(*GEN[:-2], "-m", tiny_llama[0], env={"FGDILP_PROFILE_PATH": str(folder), "FGDILP_PROFILE": "1"})
        assert_clean_error(proc, str(path), "method 'tr'", needle)
        assert "--steer-scale" not in proc.stderr
    data["methods"]["tr"]["settings"] = {"selfgen_samples": 0}
    with pytest.raises(SourcedParamError, match="p.json: method 'tr': selfgen-samples must be in 1..256"):
        Profile.from_json(data, "p.json")


def test_lone_surrogate_in_an_eval_prompt_file_names_the_line_and_leaves_nothing(tiny_llama, tmp_path):
    from fgdilp_cpp.evaluation.prompts import PromptRecord
    from fgdilp_cpp.evaluation.runner import run_eval

    class Scorer:                     # never asked: the prompts are refused first
        LABELS = ("toxic",)

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": {"text": "fine"}}\n{"prompt": {"text": "bad \\ud800 here"}}\n')
    out = tmp_path / "out"
    proc = run_cli("eval", "-m", tiny_llama[0], "--prompts", prompts, "--out", out, "--methods", "none",
                   "--samples", "1", "-n", "2", "-t", "1", "--judges", "none", "--no-progress")
    assert_clean_error(proc, f"{prompts}:2:", "lone surrogate")
    assert not out.exists()
    # the runner's own check (records from the API): refused before the folder holds a run.json
    with pytest.raises(FgdilpError, match="prompt 7 holds a lone surrogate"):
        run_eval(None, [PromptRecord(7, "x\udc80")], ["none"], 1, 2, 0.9, 0, tmp_path / "o", Scorer())
    assert not (tmp_path / "o").exists()


def test_byte_order_mark_is_not_prompt_text(tiny_llama, tmp_path):
    from fgdilp_cpp.evaluation.prompts import load_prompts

    plain = tmp_path / "p.txt"
    plain.write_bytes("\ufeffthe cat\nthe dog\n".encode("utf-8"))
    proc = run_cli(*RUN, "-m", tiny_llama[0], "-f", plain, "--json")
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(l)["prompt"] for l in proc.stdout.splitlines()] == ["the cat", "the dog"]
    piped = subprocess.run([sys.executable, "-m", "fgdilp_cpp.cli", *RUN, "-m", str(tiny_llama[0]), "-f", "-",
                            "--json"], input="\ufeffthe cat\n".encode("utf-8"), capture_output=True, cwd=ROOT)
    assert piped.returncode == 0, piped.stderr
    assert json.loads(piped.stdout)["prompt"] == "the cat"
    rtp = tmp_path / "p.jsonl"
    rtp.write_bytes('\ufeff{"prompt": {"text": "a"}}\nb\n'.encode("utf-8"))
    assert [r.text for r in load_prompts(rtp)] == ["a", "b"]        # the first line still reads as JSON


@pytest.mark.parametrize("tensor", ["output_norm.weight", "blk.0.ffn_down.weight"])
def test_model_with_nan_weights_is_an_error_not_an_empty_reply(tmp_path, tensor):
    from fgdilp_cpp.api import Detoxifier

    path = tmp_path / "nan.gguf"
    build_tiny_llama(path, TinyConfig(nan_tensor=tensor))
    for method in ("none", "fgdilp"):
        proc = run_cli("generate", "-m", path, "-p", "the cat", "-n", "4", "-t", "1", "--method", method,
                       "--selfgen-samples", "2", "--selfgen-tokens", "3", "--selfgen-min-tokens", "1")
        assert_clean_error(proc, "NaN logits")
        assert proc.stdout.strip() == ""
    with Detoxifier.from_file(str(path), method="none", threads=1, ctx_size=128) as det:
        with pytest.raises(FgdilpError, match="NaN logits"):
            det.generate("the cat", n_predict=3)


def test_shipped_profiles_are_within_the_ranges():
    from fgdilp_cpp.profiles import SHIPPED_DIR

    shipped = sorted(SHIPPED_DIR.glob("*.json"))
    assert shipped
    for path in shipped:                 # Profile.load checks every entry's values (RANGES)
        prof = Profile.load(path)
        for method in prof.methods:
            Settings().updated(prof.settings_for(method))
