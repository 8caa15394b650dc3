"""scripts/second_judge.py: several runs read as one (a variant met twice keeps its first run's
records), differences paired with any --base variant."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_script



def _script():
    return load_script("second_judge")


def _run(folder: Path, rows: list[tuple[str, dict, int, int, str]]) -> Path:
    folder.mkdir()
    lines = []
    for method, point, pid, sample, text in rows:
        lines.append(json.dumps({"prompt_id": pid, "prompt": f"p{pid}", "method": method, "sample": sample,
                                 "seed": 1, "text": text, "scores": {"toxic": 0.0}, "ppl": {},
                                 "n_tokens": 3, "stop_reason": "length", "point": point, "tokens": [1, 2, 3]}))
    (folder / "generations.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.mark.real_model            # toxic-comment-classifier's files
def test_two_runs_paired_with_a_base_variant(tmp_path):
    mod = _script()
    clean, rude = "what a lovely day in the park", "you are a stupid idiot and i hate you"
    a = _run(tmp_path / "a", [("none", {}, p, 0, clean if p % 2 else rude) for p in range(6)] +
             [("tr", {"steer_scale": 1.0}, p, 0, clean) for p in range(6)])
    b = _run(tmp_path / "b", [("none", {}, p, 0, rude) for p in range(6)] +          # a second none: ignored
             [("fgdilp-frozen", {}, p, 0, rude) for p in range(6)])
    res = mod.judge_run([a, b], "tcc", base_name="tr[steer_scale=1.0]", n_boot=200)
    v = res["variants"]
    assert set(v) == {"none", "tr[steer_scale=1.0]", "fgdilp-frozen"} and res["base"] == "tr[steer_scale=1.0]"
    assert "emt_delta" not in v["tr[steer_scale=1.0]"]
    # the first run's none (half rude) is kept, not the second's (all rude)
    assert v["none"]["emt"] < v["fgdilp-frozen"]["emt"]
    d, lo, hi = v["fgdilp-frozen"]["emt_delta"]
    assert d > 0.3 and lo > 0                       # all rude against all clean, paired per prompt


@pytest.mark.real_model            # toxic-comment-classifier's files
def test_tagged_runs_keep_variants_of_the_same_name_apart(tmp_path):
    mod = _script()
    clean, rude = "what a lovely day in the park", "you are a stupid idiot and i hate you"
    a = _run(tmp_path / "a", [("none", {}, p, 0, rude) for p in range(4)] +
             [("fgdilp-frozen", {"steer_scale": 0.6}, p, 0, clean) for p in range(4)])
    b = _run(tmp_path / "b", [("none", {}, p, 0, rude) for p in range(4)] +
             [("fgdilp-frozen", {"steer_scale": 0.6}, p, 0, rude) for p in range(4)])
    res = mod.judge_run([f"{a}@uv", f"{b}@random"], "tcc", n_boot=100)
    v = res["variants"]
    assert set(v) == {"none", "uv:fgdilp-frozen[steer_scale=0.6]", "random:fgdilp-frozen[steer_scale=0.6]"}
    assert v["uv:fgdilp-frozen[steer_scale=0.6]"]["emt"] < v["random:fgdilp-frozen[steer_scale=0.6]"]["emt"]
