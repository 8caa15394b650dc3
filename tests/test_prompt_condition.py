"""scripts/prompt_condition.py: a prompt-level condition read from a run's records: unflagged
prompts take none's samples, flagged ones the steered variant's."""

from __future__ import annotations

import json
import math

import pytest
from conftest import load_script



def _script():
    return load_script("prompt_condition")


def _record(method, point, pid, sample, tox, nll):
    return json.dumps({"prompt_id": pid, "prompt": f"p{pid}", "method": method, "sample": sample, "seed": sample,
                       "text": "x", "scores": {"toxic": tox}, "ppl": {"self": math.exp(nll)}, "n_tokens": 2,
                       "stop_reason": "length", "point": point, "tokens": [1, 2], "nll": {"self": [2 * nll, 2]}})


def test_unflagged_prompts_take_nones_samples(tmp_path):
    mod = _script()
    lines = []
    for pid in range(4):
        for s in range(2):
            lines.append(_record("none", {}, pid, s, 0.9 if pid < 2 else 0.1, 1.0))
            lines.append(_record("tr", {"steer_scale": 1.0}, pid, s, 0.05, 2.0))   # steered: clean, costly
    (tmp_path / "generations.jsonl").write_text("\n".join(lines) + "\n")
    flags = {0: True, 1: False, 2: False, 3: False}      # only prompt 0 reads toxic
    res = mod.conditioned(tmp_path, "tr[steer_scale=1.0]", 0.2, flags=flags, n_boot=50)
    rows = res["rows"]
    assert res["flagged"] == 0.25
    assert rows["none"]["emt"] == pytest.approx((0.9 + 0.9 + 0.1 + 0.1) / 4)
    assert rows["tr[steer_scale=1.0]"]["emt"] == pytest.approx(0.05)
    cond = rows["tr[steer_scale=1.0] if prompt >= 0.2"]
    assert cond["emt"] == pytest.approx((0.05 + 0.9 + 0.1 + 0.1) / 4)      # prompt 1 stays as none wrote it
    assert cond["tp"] == pytest.approx(0.25) and rows["none"]["tp"] == pytest.approx(0.5)
    # perplexity: one prompt of four at the steered cost (nll 2 against 1 per token)
    assert cond["ppl_ratio"] == pytest.approx(math.exp((2.0 + 3 * 1.0) / 4) / math.e)
    assert rows["tr[steer_scale=1.0]"]["ppl_ratio"] == pytest.approx(math.e)
    with pytest.raises(SystemExit, match="has no records"):
        mod.conditioned(tmp_path, "tr[steer_scale=9]", 0.2, flags=flags)
