"""FGDILP through the CLI on the tiny model: explain output, settings files, vectors files, bad input."""

import json

import numpy as np
import pytest

from fgdilp_cpp.evaluation.metrics import auc, spearman
from fgdilp_cpp.evaluation.prompts import load_prompts
from fgdilp_cpp.method.vectors import HeadDirections
from fgdilp_cpp.settings import Settings
from test_cli_errors import assert_clean_error
from tiny_model import TinyConfig, build_tiny_llama

FAST = ["--selfgen-samples", "3", "--selfgen-tokens", "4", "--selfgen-min-tokens", "1", "-n", "6", "-c", "256"]


def run_json(cli, *args):
    proc = cli(*args, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.parametrize("method", ["fgdilp", "fgdilp-frozen"])
def test_generate_explain_json(cli, tiny_llama, method):
    out = run_json(cli, "generate", "-m", tiny_llama[0], "-p", "the cat", "--method", method, "--explain", *FAST)
    ex = out["explain"]
    assert out["method"] == method and out["hook_fired_layers"] == 3
    assert len(ex["samples"]) == 3 and len(ex["negatives"]) == 6
    assert len(ex["delta_norms"]) == 3 and all(x >= 0 for x in ex["delta_norms"])
    assert ex["positive"]["sample"] in range(3)
    # blank pads are explicit
    assert all((n["sample"] is None) == (n["text"] == "") for n in ex["negatives"])


def test_config_file_keys_are_flag_names(cli, tiny_llama, tmp_path):
    cfg = tmp_path / "s.toml"
    cfg.write_text('method = "fgdilp-frozen"\nselfgen-samples = 3\nselfgen-tokens = 4\nselfgen-min-tokens = 1\n'
                   'n-predict = 5\nctx-size = 256\nseed = 9\nsteer-layer-range = [1, 2]\nrenorm = false\n')
    a = run_json(cli, "generate", "-m", tiny_llama[0], "-p", "the cat", "--config", cfg)
    assert a["method"] == "fgdilp-frozen" and a["n_tokens"] <= 5 and a["seed"] == 9
    b = run_json(cli, "generate", "-m", tiny_llama[0], "-p", "the cat", "--config", cfg, "-s", "10")
    assert b["seed"] == 10                              # a flag beats the file


def test_settings_from_toml(tmp_path):
    p = tmp_path / "s.toml"
    p.write_text('mask-k = 30\nfusion = "mean"\nsign-election = false\nsteer-layer-range = [3, 5]\n')
    s = Settings.from_toml(p)
    assert (s.mask_k, s.fusion, s.sign_election, s.steer_layer_range) == (30.0, "mean", False, (3, 5))
    f = s.fgdilp()
    assert f.mask_k == 30.0 and f.negatives == 6 and f.samples == 25 and s.selfgen_samples == 25
    p.write_text("mask-kk = 3\n")
    with pytest.raises(Exception, match="unknown setting 'mask-kk'"):
        Settings.from_toml(p)
    p.write_text('selfgen-samples = "many"\n')
    with pytest.raises(Exception, match="samples"):
        Settings.from_toml(p)


def test_vectors_build_apply_inspect(cli, tiny_llama, tmp_path):
    vec = tmp_path / "v.gguf"
    proc = cli("vectors", "build", "-m", tiny_llama[0], "-p", "the cat", "-o", vec, *FAST[:-4])
    assert proc.returncode == 0, proc.stderr
    hd = HeadDirections.load(vec)
    assert hd.directions.shape == (3, 4, 16) and hd.source == "fgdilp-instances"
    assert hd.settings["prompt"] == "the cat" and hd.settings["selfgen_samples"] == 3
    out = run_json(cli, "generate", "-m", tiny_llama[0], "-p", "a dog", "--vectors", vec, "-n", "6")
    plain = run_json(cli, "generate", "-m", tiny_llama[0], "-p", "a dog", "--method", "none", "-n", "6")
    assert out["method"] == "vectors" and out["hook_fired_layers"] == 3
    assert out["text"] != plain["text"]
    assert_clean_error(cli("generate", "-m", tiny_llama[0], "-p", "a dog", "--vectors", vec, "--method", "tr"),
                       "cannot run --method tr")
    proc = cli("vectors", "inspect", vec)
    assert proc.returncode == 0 and "[3, 4, 16]" in proc.stdout and "fgdilp-instances" in proc.stdout


def test_vectors_for_another_model_refused(cli, tiny_llama, tmp_path):
    other = tmp_path / "other.gguf"
    build_tiny_llama(other, TinyConfig(n_layer=2))
    vec = tmp_path / "v.gguf"
    assert cli("vectors", "build", "-m", other, "-p", "the cat", "-o", vec, *FAST[:-4]).returncode == 0
    proc = cli("generate", "-m", tiny_llama[0], "-p", "a dog", "--vectors", vec)
    assert_clean_error(proc, "built for")


def test_nan_in_vectors_file_refused(cli, tiny_llama, tmp_path):
    vec = tmp_path / "v.gguf"
    assert cli("vectors", "build", "-m", tiny_llama[0], "-p", "the cat", "-o", vec, *FAST[:-4]).returncode == 0
    hd = HeadDirections.load(vec)
    bad = hd.directions.copy()
    bad[1, 2, 3] = np.nan
    # write a file with NaN, bypassing validate(), the way a broken tool would
    import gguf
    w = gguf.GGUFWriter(str(tmp_path / "nan.gguf"), "fgdilp-directions")
    r = gguf.GGUFReader(str(vec))
    for f in r.fields.values():
        if f.name.startswith("fgdilp.") and f.types:
            t = f.types[0]
            if t == gguf.GGUFValueType.STRING:
                w.add_string(f.name, bytes(f.parts[-1]).decode())
            elif t == gguf.GGUFValueType.BOOL:
                w.add_bool(f.name, bool(f.parts[-1][0]))
            else:
                w.add_uint32(f.name, int(f.parts[-1][0]))
    w.add_tensor("directions", bad)
    w.add_tensor("e", hd.e)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    proc = cli("generate", "-m", tiny_llama[0], "-p", "a dog", "--vectors", tmp_path / "nan.gguf")
    assert_clean_error(proc, "NaN")


@pytest.mark.parametrize("args, needle", [
    (["--selfgen-samples", "0"], "--selfgen-samples"),
    (["--mask-k", "0"], "--mask-k"),
    (["--mask-k", "101"], "--mask-k"),
    (["--negatives", "9"], "--negatives"),
])
def test_bad_fgdilp_flags(cli, tiny_llama, args, needle):
    assert_clean_error(cli("generate", "-m", tiny_llama[0], "-p", "x", "--method", "fgdilp", *args), needle)


def test_diagnose_command_plumbing(cli, tiny_llama, tmp_path):
    rows = []
    for i in range(8):
        tox = 0.9 if i % 2 else 0.1
        rows.append({"prompt": {"text": f"p{i}", "toxicity": 0.7},
                     "continuation": {"text": f" some text number {i}", **{a: tox for a in (
                         "toxicity", "sexually_explicit", "threat", "identity_attack", "profanity", "insult")}}})
    f = tmp_path / "rtp.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = run_json(cli, "diagnose", "-m", tiny_llama[0], "--prompts", f, "--limit", "8", "-c", "256")
    assert out["n"] == 8
    for r in out["attributes"].values():
        assert 0.0 <= r["auc"] <= 1.0 and r["positives"] == 4 and 0.0 < r["mean_p_yes"] < 1.0


def test_metrics_known_values():
    assert auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert auc([1, 1, 1], [0, 1, 1]) == 0.5
    assert np.isnan(auc([1, 2], [1, 1]))
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)


def test_prompt_files(tmp_path):
    p = tmp_path / "plain.txt"
    p.write_text("first prompt\n\nsecond one\n")
    recs = load_prompts(p)
    assert [r.text for r in recs] == ["first prompt", "second one"] and recs[1].id == 2
    rtp = load_prompts("rtp-toxic", limit=3, offset=1)
    assert len(rtp) == 3 and rtp[0].id == 1 and rtp[0].prompt_scores["toxicity"] >= 0.5
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": 3}\n')
    with pytest.raises(Exception, match="bad.jsonl:1"):
        load_prompts(bad)


def test_environment_settings(cli, tiny_llama, tmp_path):
    cfg = tmp_path / "s.toml"
    cfg.write_text("seed = 9\nn-predict = 5\n")
    env = {"FGDILP_SEED": "11", "FGDILP_METHOD": "none"}
    proc = cli("generate", "-m", tiny_llama[0], "-p", "the cat", "--config", cfg, "-c", "256", "--json", env=env)
    out = json.loads(proc.stdout)
    assert out["seed"] == 11 and out["method"] == "none" and out["n_tokens"] <= 5   # env > file
    proc = cli("generate", "-m", tiny_llama[0], "-p", "the cat", "-s", "12", "-c", "256", "--json", env=env)
    assert json.loads(proc.stdout)["seed"] == 12                                    # flag > env
    assert_clean_error(cli("generate", "-m", tiny_llama[0], "-p", "x", env={"FGDILP_RENORM": "maybe"}),
                       "FGDILP_RENORM")


def test_vectors_export_control_vector_changes_output(cli, tiny_llama, model, tmp_path):
    import gguf

    from fgdilp_cpp.engine import Context, ContextParams, Lockstep

    vec, cv = tmp_path / "v.gguf", tmp_path / "cv.gguf"
    assert cli("vectors", "build", "-m", tiny_llama[0], "-p", "the cat", "-o", vec, *FAST[:-4]).returncode == 0
    proc = cli("vectors", "export", vec, "--cvec", cv, "-m", tiny_llama[0], "--steer-scale", "3")
    assert proc.returncode == 0, proc.stderr
    r = gguf.GGUFReader(str(cv))
    arch = bytes(r.fields["general.architecture"].parts[-1]).decode()
    assert arch == "controlvector" and sorted(t.name for t in r.tensors) == ["direction.1", "direction.2"]
    data = np.zeros((3, 64), np.float32)
    for t in r.tensors:
        data[int(t.name.split(".")[1])] = t.data
    assert np.abs(data[1:]).max() > 0

    def logits(cvec):
        with Context(model, ContextParams(n_ctx=64, n_batch=16)) as ctx:
            if cvec is not None:
                ctx.set_cvec(cvec)
            lock = Lockstep(ctx, [model.tokenize("a dog")], want_logits=[0])
            lock.prefill()
            out = lock.logits(0, 0).copy()
            lock.close()
            return out

    assert not np.allclose(logits(data), logits(None), atol=1e-4)
    assert_clean_error(cli("vectors", "export", vec, "--cvec", cv, "-m", build_other(tmp_path)), "built for")


def build_other(tmp_path):
    other = tmp_path / "other.gguf"
    build_tiny_llama(other, TinyConfig(n_layer=2))
    return other


def test_generate_json_lines_for_a_file_of_prompts(cli, tiny_llama, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("the cat\n\nthe dog sat\n")
    proc = cli("generate", "-m", tiny_llama[0], "-f", prompts, "--json", "-n", "5", "-c", "256", "-t", "1")
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(x) for x in proc.stdout.splitlines()]
    assert [x["prompt"] for x in lines] == ["the cat", "the dog sat"]
    assert all(x["n_tokens"] == 5 and x["hook_fired_layers"] == 3 for x in lines)
    one = run_json(cli, "generate", "-m", tiny_llama[0], "-p", "the dog sat", "-n", "5", "-c", "256", "-t", "1")
    assert one["text"] == lines[1]["text"]
    for args in (["-p", "x", "-f", prompts], [], ["-f", tmp_path / "missing.txt"]):
        assert_clean_error(cli("generate", "-m", tiny_llama[0], *args))
