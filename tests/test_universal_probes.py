"""Universal directions (averaged over prompts) and head selection by probes, on the tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fgdilp_cpp.api import Detoxifier
from fgdilp_cpp.errors import FgdilpError
from fgdilp_cpp.method.probes import fit_probes, head_weights, split
from fgdilp_cpp.method.steering import tr_edit
from fgdilp_cpp.method.vectors import HeadDirections

PROMPTS = ["the cat sat on a mat", "a dog ran in the park"]
FAST = dict(ctx_size=256, threads=1, selfgen_samples=3, selfgen_tokens=4, selfgen_min_tokens=2, n_predict=4)
FORCED_N = 4


@pytest.fixture(scope="module")
def det(tiny_llama):
    with Detoxifier.from_file(tiny_llama[0], **FAST) as d:
        yield d


@pytest.mark.parametrize("source", ["tr-prefixes", "fgdilp-instances"])
def test_universal_vectors_average_the_prompts(det, source):
    if source == "fgdilp-instances":          # against the single-prompt build (frozen FGDILP)
        one = [det.build_vectors(p) for p in PROMPTS]
        assert {o.source for o in one} == {source} and "universal" not in one[0].settings
    else:
        one = [det.build_vectors([p], source) for p in PROMPTS]
    both = det.build_vectors(PROMPTS, source)
    want = (one[0].directions.astype(np.float64) + one[1].directions) / 2
    np.testing.assert_allclose(both.directions, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(both.e, (one[0].e.astype(np.float64) + one[1].e) / 2, rtol=1e-5, atol=1e-6)
    assert not np.allclose(one[0].directions, one[1].directions)     # the average is not trivial
    assert both.source == source
    assert both.settings["universal"] == {"n_prompts": 2, "chat": False}


def test_universal_vectors_for_chat_are_the_directions_chat_steers_with(tiny_chat):
    """--chat: each prompt is a user message in the model's template (special tokens parsed), as a
    chat turn is; one prompt's direction is the one fgdilp-frozen captures answering that message."""
    from fgdilp_cpp.plans import SLOT_DIR

    with Detoxifier.from_file(tiny_chat, **FAST) as d:
        plain = d.build_vectors(PROMPTS, "fgdilp-instances")
        both = d.build_vectors(PROMPTS, "fgdilp-instances", chat=True)
        one = [d.build_vectors(p, chat=True) for p in PROMPTS]
        d.chat([{"role": "user", "content": PROMPTS[0]}], method="fgdilp-frozen")
        for bad in (lambda: d.build_vectors(["ok", "  "], "tr-prefixes", chat=True), lambda: d.build_vectors("", chat=True)):
            with pytest.raises(FgdilpError, match="empty"):       # not a template around nothing
                bad()
        steered = d.generator.context("fgdilp-frozen").hook.slots[SLOT_DIR].copy()   # [n_layer, width]
    assert one[0].settings["prompt"].startswith("<|im_start|>user") and one[0].settings["chat"] is True
    np.testing.assert_allclose(one[0].rows(), steered, rtol=1e-3, atol=1e-4)
    want = (one[0].directions.astype(np.float64) + one[1].directions) / 2
    np.testing.assert_allclose(both.directions, want, rtol=1e-5, atol=1e-6)
    assert both.settings["universal"]["chat"] is True
    assert not np.allclose(both.directions, plain.directions)          # not the plain prompts' directions


def test_universal_vectors_refuse_bad_prompts(det):
    with pytest.raises(FgdilpError, match="no prompts"):
        det.build_vectors([], "tr-prefixes")
    with pytest.raises(FgdilpError, match="empty"):
        det.build_vectors(["ok", "  "], "tr-prefixes")
    with pytest.raises(FgdilpError, match="too long"):
        det.build_vectors(["word " * 400], "tr-prefixes")
    with pytest.raises(FgdilpError, match="unknown source 'cvec'"):
        det.build_vectors(PROMPTS, "cvec")


def test_probes_separate_a_separable_set():
    rng = np.random.default_rng(0)
    n, L, H, D = 80, 3, 2, 8
    y = np.arange(n) % 2 == 0
    X = rng.standard_normal((n, L, H, D))
    X[y, 1, 0, 3] += 8.0          # only head (1, 0) carries the label (4 sd apart: separable)
    res = fit_probes(X, y)
    assert res.accuracy[1, 0] >= 0.95 and res.train_accuracy[1, 0] >= 0.95
    others = np.delete(res.accuracy.reshape(-1), 1 * H + 0)
    assert others.max() < 0.85
    assert res.n_test == 24 and res.n_train == 56
    w = head_weights(res.accuracy, top_k=1)
    assert w[1, 0] == 1 and w.sum() == 1
    wa = head_weights(res.accuracy, by_accuracy=True)
    assert wa[1, 0] == 1 and np.all((wa >= 0) & (wa <= 1))
    assert np.all(head_weights(res.accuracy) == 1)


def test_probe_refusals():
    with pytest.raises(FgdilpError, match="toxic"):
        split(np.array([True, False, False]))
    with pytest.raises(FgdilpError, match="non-finite"):
        fit_probes(np.full((4, 1, 1, 2), np.nan), np.array([1, 1, 0, 0], bool))
    with pytest.raises(FgdilpError, match="probe-top-k"):
        head_weights(np.full((2, 2), 0.7), top_k=5)
    with pytest.raises(FgdilpError, match="beats chance"):
        head_weights(np.full((2, 2), 0.4), by_accuracy=True)


def test_probe_rows_are_the_unsteered_last_rows(det):
    """A text's row does not depend on the texts decoded beside it."""
    from fgdilp_cpp.universal import last_token_rows

    texts = ["the cat", "a dog ran in the park today", "x y"]
    rt = det.generator.rt
    together = last_token_rows(rt, texts, 1, 128, per_decode=3)
    alone = np.stack([last_token_rows(rt, [t], 1, 128)[0] for t in texts])
    np.testing.assert_allclose(together, alone, rtol=1e-2, atol=1e-2)     # f16 KV: batch-dependent rounding
    assert together.shape == (3, det.model.info.n_layer, det.model.info.n_head, det.model.info.head_dim)
    assert not np.allclose(together[0], together[1])


def _weighted(det, keep: np.ndarray) -> tuple[HeadDirections, HeadDirections]:
    hd = det.build_vectors(PROMPTS, "tr-prefixes")
    acc = np.where(keep, 0.9, 0.6).astype(np.float32)
    return hd, hd.with_head_weights(keep.astype(np.float32), acc, {"top_k": int(keep.sum())})


def test_head_weights_saved_loaded_inspected(det, tmp_path, cli):
    info = det.model.info
    keep = np.zeros((info.n_layer, info.n_head), bool)
    keep[:, 0] = True
    _, hw = _weighted(det, keep)
    path = tmp_path / "w.gguf"
    hw.save(path)
    back = HeadDirections.load(path)
    assert back == hw and back.head_weights is not None
    np.testing.assert_array_equal(back.probe_accuracy, hw.probe_accuracy)
    rows = back.steering_rows().reshape(info.n_layer, info.n_head, -1)
    assert np.all(rows[:, 1:] == 0) and np.array_equal(rows[:, 0], back.directions[:, 0])
    out = cli("vectors", "inspect", path).stdout
    assert "probe accuracy per layer" in out and f"({info.n_layer} of {keep.size} heads steered)" in out
    assert "0.90 0.60" in out


def test_unselected_heads_are_not_edited(det, tmp_path, tiny_llama):
    """The TR edit of a row leaves heads of weight 0 untouched (without renorm; with it they are scaled
    by the row's common factor), and the engine steers with the weighted rows."""
    info = det.model.info
    keep = np.zeros((info.n_layer, info.n_head), bool)
    keep[:, 1] = True
    plain, hw = _weighted(det, keep)
    rng = np.random.default_rng(1)
    v = rng.standard_normal(info.n_head * info.head_dim).astype(np.float32)
    row, e = hw.steering_rows()[2], hw.e.reshape(info.n_layer, -1)[2]
    edited = tr_edit(v, row, e, info.n_head, renorm=False).reshape(info.n_head, -1)
    vh = v.reshape(info.n_head, -1)
    assert np.array_equal(edited[keep[2] == 0], vh[keep[2] == 0])
    assert not np.allclose(edited[1], vh[1])
    # the engine: weighted vectors = a file whose unselected heads are zero; all-zero weights = unsteered
    zeroed = HeadDirections(plain.directions * keep[:, :, None].astype(np.float32), plain.e, plain.model,
                            plain.source, plain.settings)
    none = hw.with_head_weights(np.zeros_like(hw.head_weights), None, {"top_k": 0})
    logits = {}
    for name, v_ in (("weighted", hw), ("zeroed", zeroed), ("plain", plain), ("none", none)):
        v_.save(tmp_path / f"{name}.gguf")
        with Detoxifier.from_file(tiny_llama[0], vectors=str(tmp_path / f"{name}.gguf"), **FAST) as d:
            # kv_reuse off, as generate and eval run (chat's reuse adds P0's unedited twin to each batch,
            # and a two-row batch rounds differently from a one-row one)
            logits[name] = d.generator.generate(PROMPTS[0], "fgdilp-frozen", FORCED_N, forced_tokens=[5, 6, 7, 8],
                                           record_logits=True, kv_reuse=False).logits
    unsteered = det.generator.generate(PROMPTS[0], "none", FORCED_N, forced_tokens=[5, 6, 7, 8], record_logits=True,
                                  kv_reuse=False).logits
    for a, b, c, _u in zip(logits["weighted"], logits["zeroed"], logits["plain"], unsteered):
        np.testing.assert_array_equal(a, b)
        assert not np.allclose(a, c)
    for a, u in zip(logits["none"], unsteered):
        np.testing.assert_allclose(a, u, rtol=1e-5, atol=1e-5)


def _rtp_file(tmp_path) -> str:
    rows = []
    for i in range(16):
        tox = 0.9 if i % 2 else 0.02
        rows.append({"prompt": {"text": f"prompt number {i} says", "toxicity": 0.7},
                     "continuation": {"text": (" you idiot fool " if i % 2 else " a quiet garden ") + str(i),
                                      "toxicity": tox}})
    f = tmp_path / "rtp.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(f)


def test_vectors_build_universal_with_probes_cli(cli, tiny_llama, tmp_path):
    f, vec = _rtp_file(tmp_path), tmp_path / "u.gguf"
    proc = cli("vectors", "build", "-m", tiny_llama[0], "--prompts", f, "--limit", "3", "-c", "256", "-t", "1",
               "--probe-top-k", "3", "--probe-prompts", f, "--probe-offset", "0", "--probe-per-class", "6",
               "--no-progress", "-o", vec)
    assert proc.returncode == 0, proc.stderr
    assert "tr-prefixes" in proc.stdout and "3 of" in proc.stdout
    hd = HeadDirections.load(vec)
    assert hd.source == "tr-prefixes" and hd.settings["universal"] == {"n_prompts": 3, "chat": False, "prompts": f, "limit": 3,
                                        "offset": 0}
    assert hd.settings["head_selection"]["per_class"] == 6 and (hd.head_weights > 0).sum() == 3
    gen = cli("generate", "-m", tiny_llama[0], "--vectors", vec, "-p", "the cat", "-n", "3", "-c", "256", "-t", "1",
              "--explain")
    assert gen.returncode == 0, gen.stderr
    assert "tr-prefixes" in gen.stdout and "3 of" in gen.stdout
    bad = cli("vectors", "build", "-m", tiny_llama[0], "-o", vec)
    assert bad.returncode != 0 and "one of them" in bad.stderr


def test_vectors_build_chat_cli(cli, tiny_chat, tmp_path):
    vec = str(tmp_path / "chat.gguf")
    proc = cli("vectors", "build", "-m", tiny_chat, "-p", "the cat sat", "--from", "tr", "--chat", "-c", "256",
               "-t", "1", "-o", vec)
    assert proc.returncode == 0, proc.stderr
    hd = HeadDirections.load(vec)
    assert hd.source == "tr-prefixes" and hd.settings["universal"] == {"n_prompts": 1, "chat": True}
