"""Universal directions from labelled texts (--from data, docs/method.md §7.6): the pure contrast
functions, the token-averaged rows against the torch reference, the build and the command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fgdilp_cpp.api import Detoxifier
from fgdilp_cpp.errors import FgdilpError
from fgdilp_cpp.method.contrast import mean_difference, with_head_norms
from fgdilp_cpp.method.sources import LABELLED_TEXT, TR_PREFIXES
from fgdilp_cpp.method.vectors import HeadDirections

FAST = dict(ctx_size=256, threads=1, n_predict=4)
PROMPTS = ["the cat sat on a mat", "a dog ran in the park"]
TEXTS = ["you are a stupid idiot", "shut up you fool", "the weather is nice today", "we had tea and cake"]
TOXIC = [True, True, False, False]


@pytest.fixture(scope="module")
def det(tiny_llama):
    with Detoxifier.from_file(tiny_llama[0], **FAST) as d:
        yield d


def test_mean_difference_is_toxic_minus_clean():
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(5, 2, 3, 4)).astype(np.float32)
    toxic = np.array([1, 0, 1, 0, 0], bool)
    got = mean_difference(rows, toxic)
    want = rows[[0, 2]].astype(np.float64).mean(0) - rows[[1, 3, 4]].astype(np.float64).mean(0)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got.dtype == np.float32 and got.shape == (2, 3, 4)
    np.testing.assert_allclose(mean_difference(rows, ~toxic), -got, rtol=1e-6)     # the sign follows the labels
    for bad, match in [((rows, np.ones(5, bool)), "both toxic and clean"), ((rows[:, 0], toxic), "n_texts"),
                       ((np.where(rows > 2, np.nan, rows), toxic), "non-finite")]:
        with pytest.raises(FgdilpError, match=match):
            mean_difference(*bad)


def test_with_head_norms_keeps_each_direction_and_sets_its_length():
    rng = np.random.default_rng(1)
    d = rng.normal(size=(2, 3, 4)).astype(np.float32)
    d[1, 2] = 0.0
    norms = rng.uniform(0.5, 3.0, size=(2, 3))
    got = with_head_norms(d, norms)
    lengths = np.linalg.norm(got.astype(np.float64), axis=2)
    np.testing.assert_allclose(lengths[d.any(axis=2)], norms[d.any(axis=2)], rtol=1e-5)
    assert not got[1, 2].any()                                           # no direction: stays zero
    cos = np.einsum("lhd,lhd->lh", got, d)[0] / (lengths[0] * np.linalg.norm(d[0], axis=1))
    np.testing.assert_allclose(cos, 1.0, rtol=1e-5)
    with pytest.raises(FgdilpError, match="one per head"):
        with_head_norms(d, norms[:, :2])
    with pytest.raises(FgdilpError, match="non-negative"):
        with_head_norms(d, -norms)


def test_mean_token_rows_equal_the_torch_reference(det, torch_model):
    """A text's row is the mean of its kqv_out rows over every token but the first (float64 torch
    forward of the same weights; f16 KV in llama.cpp), and does not depend on its batch."""
    from fgdilp_cpp.universal import mean_token_rows

    rt, info = det.generator.rt, det.model.info
    got = mean_token_rows(rt, TEXTS, 1, per_decode=3)
    assert got.shape == (len(TEXTS), info.n_layer, info.n_head, info.head_dim)
    for i, text in enumerate(TEXTS):
        toks = det.model.tokenize(text)
        _, attn = torch_model.forward(torch_model.new_state(), toks)
        want = np.stack([a[1:].mean(axis=0) for a in attn]).reshape(got.shape[1:])
        np.testing.assert_allclose(got[i], want, rtol=1e-2, atol=1e-2)
        last = attn[-1][-1]
        assert not np.allclose(want[-1].reshape(-1), last, atol=1e-3)   # not the last token's row
    alone = np.stack([mean_token_rows(rt, [t], 1)[0] for t in TEXTS])
    np.testing.assert_allclose(got, alone, rtol=1e-2, atol=1e-2)
    cut = mean_token_rows(rt, [TEXTS[0]], 1, max_tokens=2)[0]          # the first two tokens: one row
    _, attn = torch_model.forward(torch_model.new_state(), det.model.tokenize(TEXTS[0])[:2])
    np.testing.assert_allclose(cut, np.stack([a[1] for a in attn]).reshape(cut.shape), rtol=1e-2, atol=1e-2)
    with pytest.raises(FgdilpError, match="text 1 is empty"):
        mean_token_rows(rt, ["a cat", "  "], 1)


def test_data_vectors_are_the_contrast_at_trs_strength(det):
    from fgdilp_cpp.universal import mean_token_rows

    hd = det.build_vectors(PROMPTS, LABELLED_TEXT, texts=TEXTS, toxic=TOXIC, labels={"how": "by hand"})
    with Detoxifier.from_file(det.settings.model, contrast="reply", **FAST) as reply:
        tr = reply.build_vectors(PROMPTS, TR_PREFIXES)            # the strength: TR's at the reply contrast
        np.testing.assert_array_equal(reply.build_vectors(PROMPTS, LABELLED_TEXT, texts=TEXTS, toxic=TOXIC).directions, hd.directions)
    assert not np.allclose(det.build_vectors(PROMPTS, TR_PREFIXES).head_norms(), tr.head_norms())
    contrast = mean_difference(mean_token_rows(det.generator.rt, TEXTS, 1), np.array(TOXIC))
    np.testing.assert_allclose(hd.head_norms(), tr.head_norms(), rtol=1e-4)        # TR's per-head strength
    cos = np.einsum("lhd,lhd->lh", hd.directions, contrast) / (hd.head_norms() * np.linalg.norm(contrast, axis=2))
    np.testing.assert_allclose(cos, 1.0, rtol=1e-4)                                 # the contrast's direction
    np.testing.assert_array_equal(hd.e, hd.directions)
    assert hd.source == LABELLED_TEXT
    assert hd.settings["model"] == Path(det.settings.model).name   # the file name, not this machine's path
    assert hd.settings["universal"] == {"n_prompts": 2, "chat": False, "n_texts": 4, "n_toxic": 2,
                                        "texts": {"how": "by hand"}}
    with pytest.raises(FgdilpError, match="labelled texts of source 'labelled-text'"):
        det.build_vectors(PROMPTS, TR_PREFIXES, texts=TEXTS, toxic=TOXIC)
    flipped = det.build_vectors(PROMPTS, LABELLED_TEXT, texts=TEXTS, toxic=[not t for t in TOXIC])
    np.testing.assert_allclose(flipped.directions, -hd.directions, rtol=1e-4, atol=1e-6)
    with pytest.raises(FgdilpError, match="labels"):
        det.build_vectors(PROMPTS, LABELLED_TEXT, texts=TEXTS, toxic=TOXIC[:3])
    with pytest.raises(FgdilpError, match="both toxic and clean"):
        det.build_vectors(PROMPTS, LABELLED_TEXT, texts=TEXTS, toxic=[True] * 4)


def test_data_vectors_steer_by_their_sign(det, tiny_llama, tmp_path):
    """Applied as saved vectors the data direction changes the logits of a forced continuation, and
    the flipped labels' direction changes them differently (what is steered is the contrast)."""
    logits = {}
    for name, toxic in (("data", TOXIC), ("flipped", [not t for t in TOXIC])):
        det.build_vectors(PROMPTS, LABELLED_TEXT, texts=TEXTS, toxic=toxic).save(tmp_path / f"{name}.gguf")
        with Detoxifier.from_file(tiny_llama[0], vectors=str(tmp_path / f"{name}.gguf"), steer_scale=2.0, **FAST) as d:
            logits[name] = d.generator.generate(PROMPTS[0], "fgdilp-frozen", 4, forced_tokens=[5, 6, 7, 8],
                                           record_logits=True, kv_reuse=False).logits
    unsteered = det.generator.generate(PROMPTS[0], "none", 4, forced_tokens=[5, 6, 7, 8], record_logits=True,
                                  kv_reuse=False).logits
    for a, b, u in zip(logits["data"], logits["flipped"], unsteered):
        assert np.all(np.isfinite(a))
        assert not np.allclose(a, u, atol=1e-4) and not np.allclose(a, b, atol=1e-4)


def _rtp_file(tmp_path):
    rows = []
    for i, (text, tox) in enumerate(zip(TEXTS * 2, [0.9, 0.8, 0.01, 0.02] * 2)):
        rows.append({"id": i, "prompt": {"text": PROMPTS[i % 2], "toxicity": 0.7},
                     "continuation": {"text": text, "toxicity": tox}})
    f = tmp_path / "rtp.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows))
    return str(f)


def test_vectors_build_from_data_cli(cli, tiny_llama, tmp_path):
    f, vec = _rtp_file(tmp_path), tmp_path / "d.gguf"
    proc = cli("vectors", "build", "-m", tiny_llama[0], "--prompts", f, "--limit", "2", "--from", "labelled-text",
               "--labelled-texts", f, "--labelled-offset", "0", "--labelled-per-class", "4", "-c", "256", "-t", "1",
               "--no-progress", "-o", vec)
    assert proc.returncode == 0, proc.stderr
    assert "labelled-text" in proc.stdout
    hd = HeadDirections.load(vec)
    u = hd.settings["universal"]
    assert hd.source == "labelled-text" and "source" not in u
    assert (u["n_prompts"], u["n_texts"], u["n_toxic"], u["prompts"]) == (2, 8, 4, f)
    assert u["texts"]["per_class"] == 4 and u["texts"]["prompts"] == f
    gen = cli("generate", "-m", tiny_llama[0], "--vectors", vec, "-p", "the cat", "-n", "3", "-c", "256", "-t", "1",
              "--explain")
    assert gen.returncode == 0, gen.stderr
    assert "labelled-text" in gen.stdout
    bad = cli("vectors", "build", "-m", tiny_llama[0], "-p", "the cat", "--from", "labelled-text", "-o", vec)
    assert bad.returncode != 0 and "give --prompts SET" in bad.stderr and "Traceback" not in bad.stderr
    bad = cli("vectors", "build", "-m", tiny_llama[0], "--prompts", f, "--from", "labelled-text", "--texts-as-replies",
              "-o", vec)
    assert bad.returncode != 0 and "needs --from labelled-text --chat" in bad.stderr and "Traceback" not in bad.stderr
    both = cli("vectors", "build", "-m", tiny_llama[0], "--prompts", f, "--from", "labelled-text", "--labelled-texts", f,
               "--probe-prompts", f, "-o", vec)
    assert both.returncode == 1 and "--labelled-texts and its former name --probe-prompts" in both.stderr
    assert "--probe-prompts" not in cli("vectors", "build", "--help").stdout       # the former names are hidden


def test_vectors_build_from_chat_replies_cli(cli, tiny_chat, tmp_path):
    f, vec = _rtp_file(tmp_path), tmp_path / "r.gguf"
    # the former spellings (--from data, --probe-*) still build the same file
    proc = cli("vectors", "build", "-m", tiny_chat, "--prompts", f, "--limit", "2", "--from", "data", "--chat",
               "--texts-as-replies", "--probe-prompts", f, "--probe-offset", "0", "--probe-per-class", "4", "-c", "256",
               "-t", "1", "--no-progress", "-o", vec)
    assert proc.returncode == 0, proc.stderr
    hd = HeadDirections.load(vec)
    u = hd.settings["universal"]
    assert (hd.source, u["chat"], u["texts_as"], u["n_texts"], u["texts"]["per_class"]) == \
        ("labelled-text", True, "replies", 8, 4)


def test_mean_token_rows_from_a_start_equal_the_torch_reference(det, torch_model):
    """starts: the rows averaged from that token on (a chat reply after its header), the same
    positions of the same forward pass."""
    from fgdilp_cpp.universal import mean_token_rows

    rt = det.generator.rt
    toks = det.model.tokenize(TEXTS[1])
    got = mean_token_rows(rt, [TEXTS[1], TEXTS[2]], 1, starts=[5, 0])
    _, attn = torch_model.forward(torch_model.new_state(), toks)
    want = np.stack([a[5:].mean(axis=0) for a in attn]).reshape(got.shape[1:])
    np.testing.assert_allclose(got[0], want, rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(got[1], mean_token_rows(rt, [TEXTS[2]], 1)[0], rtol=1e-2, atol=1e-2)
    with pytest.raises(FgdilpError, match="no tokens after its start"):
        mean_token_rows(rt, [TEXTS[1]], 1, starts=[len(toks)])
    with pytest.raises(FgdilpError, match="2 texts but 1 starts"):
        mean_token_rows(rt, TEXTS[:2], 1, starts=[0])


def test_data_vectors_from_chat_replies(tiny_chat):
    """reply_to: each text is read as the assistant's reply to its user message in the chat
    template; the rows are the reply's, so the direction differs from the plain texts' and the
    settings say so. Refused without chat or with a message count that does not fit."""
    with Detoxifier.from_file(tiny_chat, **FAST) as d:
        plain = d.build_vectors(PROMPTS, LABELLED_TEXT, texts=TEXTS, toxic=TOXIC, chat=True)
        replies = d.build_vectors(PROMPTS, LABELLED_TEXT, texts=TEXTS, toxic=TOXIC, chat=True, reply_to=["hello there"] * 4)
        np.testing.assert_allclose(replies.head_norms(), plain.head_norms(), rtol=1e-5)   # the same strength
        assert not np.allclose(replies.directions, plain.directions, atol=1e-4)
        assert replies.settings["universal"]["texts_as"] == "replies" and "texts_as" not in plain.settings["universal"]
        with pytest.raises(FgdilpError, match="reply_to needs chat=True"):
            d.build_vectors(PROMPTS, LABELLED_TEXT, texts=TEXTS, toxic=TOXIC, reply_to=["hello"] * 4)
        with pytest.raises(FgdilpError, match="one user message per text"):
            d.build_vectors(PROMPTS, LABELLED_TEXT, texts=TEXTS, toxic=TOXIC, chat=True, reply_to=["hello"])
