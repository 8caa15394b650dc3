"""What a user meets on the command line: FGDILP_VERBOSE, info/compare --json, help text,
status lines for the slow starts."""

from __future__ import annotations

import json
import os
import sys

import pexpect
import pytest

FAST = ["--selfgen-samples", "3", "--selfgen-tokens", "4", "--selfgen-min-tokens", "1", "-c", "256", "-t", "1"]


@pytest.mark.parametrize("value, shown", [("1", True), ("0", False), (None, False)])
def test_fgdilp_verbose_shows_llama_cpp_log(cli, tiny_llama, value, shown):
    env = {k: v for k, v in os.environ.items() if k != "FGDILP_VERBOSE"}
    if value is not None:
        env["FGDILP_VERBOSE"] = value
    r = cli("generate", "-m", tiny_llama[0], "-p", "the cat", "-n", "2", "-c", "256", "-t", "1", env=env)
    assert r.returncode == 0, r.stderr
    assert ("llama_context" in r.stderr) == shown


def test_info_json(cli, tiny_llama):
    r = cli("info", "-m", tiny_llama[0], "-t", "1", "--steer-scale", "0.5", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    cfg = tiny_llama[2]
    assert (out["n_layer"], out["n_head"], out["head_dim"]) == (cfg.n_layer, cfg.n_head, cfg.head_dim)
    assert out["kqv_out_layers"] == cfg.n_layer and out["steerable"] is True and out["profile"] is None
    assert out["settings"]["steer_scale"] == {"value": 0.5, "from": "flag"}
    assert out["settings"]["method"] == {"value": "tr", "from": "default"}


def test_compare_json(cli, tiny_llama):
    r = cli("compare", "-m", tiny_llama[0], "-p", "the cat sat", "-n", "5", "--methods", "none,tr", "--json", *FAST)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["prompt"] == "the cat sat" and [m["method"] for m in out["methods"]] == ["none", "tr"]
    none, tr = out["methods"]
    assert none["hook_fired_layers"] == 0 and tr["hook_fired_layers"] == tiny_llama[2].n_layer
    assert all(m["n_tokens"] == 5 and m["stop_reason"] == "length" for m in out["methods"])


def test_mask_k_help_prints_one_percent_sign(cli):
    r = cli("generate", "--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    assert "top-K % entries kept" in text and "%%" not in text


def test_vectors_build_for_one_prompt_says_what_it_is_doing(cli, tiny_llama, tmp_path):
    r = cli("vectors", "build", "-m", tiny_llama[0], "-p", "the cat", "-o", tmp_path / "v.gguf", *FAST)
    assert r.returncode == 0, r.stderr
    assert "building FGDILP's directions for the prompt: 3 candidate continuations" in r.stderr
    assert "built in " in r.stderr
    quiet = cli("vectors", "build", "-m", tiny_llama[0], "-p", "the cat", "-o", tmp_path / "w.gguf", "--no-progress",
                *FAST)
    assert quiet.returncode == 0 and quiet.stderr == ""


def test_serve_says_it_is_loading_on_a_terminal(tiny_llama, tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "TERM": "dumb",
           **{k: os.environ[k] for k in ("PYTHONPATH", "FGDILP_NATIVE_LIB") if k in os.environ}}
    child = pexpect.spawn(sys.executable, ["-m", "fgdilp_cpp.cli", "serve", "-m", str(tiny_llama[0]), "--chat-template",
                                           "chatml", "-c", "256", "-t", "1", "--port", "0"],
                          encoding="utf-8", timeout=60, env=env)
    try:
        child.expect_exact("fgdilp-cpp serve: loading the model ...")
        child.expect_exact("serving tiny-llama")
    finally:
        child.sendintr()
        child.expect(pexpect.EOF)
        child.close()


def test_calibrate_prints_the_auc_rounded():
    from fgdilp_cpp.evaluation.calibrate import _auc

    assert _auc(0.7312345678901234) == "0.731" and _auc(None) == "-"
