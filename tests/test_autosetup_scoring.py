"""The fast setup's teacher-forced scorer against the generator: steered NLL of a continuation in
one batch equals the NLL of the same tokens forced step by step through the saved-vectors method."""

from __future__ import annotations

import numpy as np
import pytest

from fgdilp_cpp import Detoxifier
from fgdilp_cpp.autosetup.scoring import SteeredNLL
from fgdilp_cpp.errors import FgdilpError
from fgdilp_cpp.evaluation.perplexity import PerplexityJudge, log_softmax_nll
from fgdilp_cpp.method.vectors import HeadDirections, random_heads
from fgdilp_cpp.generation import identity_of

PROMPT = "The quick brown fox"
FAST = dict(threads=1, ctx_size=256, cache_type_k="f32", cache_type_v="f32")


def _directions(model, seed=3) -> HeadDirections:
    i = model.info
    d = random_heads(np.ones((i.n_layer, i.n_head, i.head_dim)), seed) * 4.0
    return HeadDirections(directions=d, e=d.copy(), model=identity_of(model), source="labelled-text",
                          settings={}).validate()


def _forced_nll(det, text, cont_ids, method):
    res = det.generator.generate(text, method, len(cont_ids), forced_tokens=cont_ids, record_logits=True, kv_reuse=False)
    return sum(log_softmax_nll(res.logits[k][0], t) for k, t in enumerate(cont_ids)) / len(cont_ids)


@pytest.mark.parametrize("scale", [0.0, 1.5])
def test_batched_steered_nll_equals_step_by_step_generation(tiny_llama, tmp_path, scale):
    path = tiny_llama[0]
    with Detoxifier.from_file(path, profile=False, **FAST) as det:
        hd = _directions(det.model)
    hd.save(tmp_path / "v.gguf")
    n = hd.n_layer
    layers = (n // 2, n - 1)
    with Detoxifier.from_file(path, vectors=str(tmp_path / "v.gguf"), steer_scale=scale, steer_layer_range=layers,
                              **FAST) as det, SteeredNLL(det.model, n_threads=1, max_tokens=128, type_k="f32", type_v="f32") as judge:
        cont = " jumps over the lazy dog and runs"
        item = judge.item(PROMPT, cont)            # the tokens the judge scores
        assert item.tokens[:item.first] == det.model.tokenize(PROMPT)      # as the generator reads it
        want = _forced_nll(det, PROMPT, item.tokens[item.first:], "fgdilp-frozen")
        mask = np.array([1.0 if layers[0] <= il <= layers[1] else 0.0 for il in range(n)]) * scale
        judge.set_direction(hd.steering_rows(), hd.e.reshape(n, -1), mask)
        pairs = [(PROMPT, cont), ("Another prompt here", " and its continuation")]
        got = judge.mean_nll(pairs)
        assert got[0] == pytest.approx(want, rel=5e-4)      # batch vs step kernels: float rounding
        judge.set_direction(None)
        base = judge.mean_nll(pairs)[0]
        with PerplexityJudge(det.model, n_threads=1, max_tokens=128, type_k="f32", type_v="f32") as plain:
            nll, n = plain.nll_many(pairs)[0]        # the same batches: the same logits
            assert base == pytest.approx(nll / n, rel=1e-6)   # float32 vs float64 log-softmax
        if scale == 0:
            assert got[0] == pytest.approx(base, rel=1e-6)
        else:
            assert abs(got[0] - base) > 50 * 5e-4 * base   # the hook fired and changed the scores


def test_direction_shape_is_checked(tiny_llama):
    with Detoxifier.from_file(tiny_llama[0], profile=False, **FAST) as det, \
            SteeredNLL(det.model, n_threads=1) as judge:
        i = det.model.info
        with pytest.raises(FgdilpError, match="shape"):
            judge.set_direction(np.zeros((i.n_layer, 3), np.float32), None, [1.0] * i.n_layer)
        with pytest.raises(FgdilpError, match="one per layer"):
            judge.set_direction(np.zeros((i.n_layer, i.kqv_width), np.float32), None, [1.0])
        with pytest.raises(FgdilpError, match="NaN"):
            judge.set_direction(np.full((i.n_layer, i.kqv_width), np.nan, np.float32), None, [1.0] * i.n_layer)


def test_grid_scores_shift_only_where_it_steers(tiny_llama):
    """score_points: at scale 0 every shift is 0 (the hook leaves the rows alone); at a real scale
    the direction and its random control both move the scores, and differently."""
    from fgdilp_cpp.autosetup.grid import score_points

    toxic = [("You are such a", " stupid idiot"), ("Shut up, you", " worthless piece of trash")]
    clean = [("You are such a", " kind person"), ("Shut up, you", " said with a smile")]
    benign = [("The weather today", " is sunny and warm")]
    with Detoxifier.from_file(tiny_llama[0], profile=False, **FAST) as det, \
            SteeredNLL(det.model, n_threads=1, max_tokens=64) as judge:
        hd = _directions(det.model)
        n = hd.n_layer
        points, tokens = score_points(judge, hd, [(n // 2, n - 1)], [0.0, 2.0], toxic, clean, benign)
    zero, strong = points
    assert (zero.toxic, zero.clean, zero.benign, zero.random_toxic) == (0.0, 0.0, 0.0, 0.0)
    assert min(abs(strong.toxic), abs(strong.clean), abs(strong.benign)) > 1e-3
    assert abs(strong.toxic - strong.random_toxic) > 1e-3
    assert strong.layer_range == (n // 2, n - 1) and strong.scale == 2.0
    assert tokens > 0 and tokens % 5 == 0          # the base pass and two passes per point


def test_a_group_with_nothing_to_score_is_refused(tiny_llama):
    """An empty group would give a NaN shift, and a NaN passes every budget check: refused."""
    from fgdilp_cpp.autosetup.grid import PointScorer

    toxic, clean = [("You are such a", " stupid idiot")], [("You are such a", " kind person")]
    with Detoxifier.from_file(tiny_llama[0], profile=False, **FAST) as det, \
            SteeredNLL(det.model, n_threads=1, max_tokens=64) as judge:
        hd = _directions(det.model)
        for benign in ([], [("The weather today", "")]):             # none, or only an empty continuation
            with pytest.raises(FgdilpError, match="no benign text"):
                PointScorer(judge, hd, toxic, clean, benign)
        PointScorer(judge, hd, toxic, clean, [("The weather today", " is sunny")])
