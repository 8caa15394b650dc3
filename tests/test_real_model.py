"""The embedded models for real: gemma-3-270m (TR steers, hook on all 18 layers) and SmolLM2 (chat)."""

import json

import pytest

pytestmark = pytest.mark.real_model       # every test here runs the embedded models

TOXIC = "The ill-fated tale of Phoneys, the stupid"


def gen(cli, method, seed=7, *extra):
    proc = cli("generate", "-p", TOXIC, "-n", "24", "--method", method, "-s", seed, "-t", "2", "--json", *extra)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_tr_changes_the_text_and_fires_on_every_layer(cli, gemma_path):
    none, tr = gen(cli, "none"), gen(cli, "tr")
    assert none["hook_fired_layers"] == 0
    assert tr["hook_fired_layers"] == 18
    assert none["text"] and tr["text"]
    assert none["text"] != tr["text"]


def test_same_seed_same_text(cli, gemma_path):
    a, b = gen(cli, "tr", 3), gen(cli, "tr", 3)
    assert a["text"] == b["text"]
    c = gen(cli, "tr", 4)
    assert c["text"] != a["text"]


def test_info_reports_gemma_shape(cli, gemma_path):
    proc = cli("info", "-t", "2")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for needle in ("gemma3", "layers           18", "head dim         256", "kqv_out width    1024",
                   "fired on 18 of 18"):
        assert needle in out, out


@pytest.mark.parametrize("layer_range", [("12", "17")])
def test_layer_range_steers_fewer_layers(cli, gemma_path, layer_range):
    full = gen(cli, "tr", 7)
    part = gen(cli, "tr", 7, "--steer-layer-range", *layer_range)
    assert part["hook_fired_layers"] == 18      # every layer is read, only some are edited
    assert part["text"] != full["text"]


@pytest.mark.parametrize("method", ["fgdilp", "fgdilp-frozen"])
def test_fgdilp_on_gemma(cli, gemma_path, method):
    none = gen(cli, "none", 5)
    out = gen(cli, method, 5, "--selfgen-samples", "6", "--explain")
    assert out["hook_fired_layers"] == 18
    assert out["text"] != none["text"]
    ex = out["explain"]
    assert ex["yes_no_tokens"] == [" yes", " no"]      # single tokens in gemma's vocabulary
    assert len(ex["samples"]) == 6 and len(ex["delta_norms"]) == 18
    p_tox = [s["scores"]["toxicity"] for s in ex["samples"]]
    assert len(set(p_tox)) > 1 and all(0 < p < 1 for p in p_tox)


def test_self_diagnosis_plumbing_on_gemma(cli, gemma_path):
    proc = cli("diagnose", "--prompts", "rtp-toxic", "--limit", "24", "-t", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["n"] == 24 and out["yes_no_tokens"] == [" yes", " no"]
    tox = out["attributes"]["toxicity"]
    assert 0.0 <= tox["auc"] <= 1.0 and 0 < tox["positives"] < 24


def test_chat_on_the_default_chat_model():
    """SmolLM2-135M-Instruct with the chat defaults: its GGUF template, FGDILP on all 30 layers,
    candidate replies that end at the end of turn, and a reply unlike the unsteered one."""
    from fgdilp_cpp import Detoxifier
    from fgdilp_cpp.chat.fitting import fit_chat

    msgs = [{"role": "user", "content": "You are a worthless idiot. What do you think of people like me?"}]
    with Detoxifier.from_file(chat=True, threads=2, n_predict=24) as d:
        assert "SmolLM2" in d.model.info.path and d.chat_format.template.name == "from the GGUF"
        assert fit_chat(d, msgs).prompt.endswith("<|im_start|>assistant\n")
        res = d.chat(msgs, explain=True)
        plain = d.chat(msgs, method="none")
    assert res.method == "fgdilp" and res.fired_layers == 30 and res.text.strip()
    from fgdilp_cpp.settings import CHAT_DEFAULTS

    assert len(res.explain["samples"]) == CHAT_DEFAULTS["selfgen_samples"]
    assert all("<|im_" not in s["text"] for s in res.explain["samples"])
    assert res.text != plain.text
