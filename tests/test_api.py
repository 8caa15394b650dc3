"""The embeddable Python API: generate, stream, cancel from another thread, one object per thread."""

import threading

import pytest

import fgdilp_cpp
from fgdilp_cpp import Detoxifier, FgdilpError

PROMPT = "the cat sat on a mat"


@pytest.fixture
def detox(tiny_llama):
    with Detoxifier.from_file(tiny_llama[0], method="tr", ctx_size=256, n_predict=12, threads=1) as d:
        yield d


def test_generate_and_stream_agree(detox):
    res = detox.generate(PROMPT, seed=4)
    assert res.method == "tr" and res.fired_layers == 3 and res.tokens
    pieces = list(detox.stream(PROMPT, seed=4))
    assert "".join(pieces) == res.text and len(pieces) > 1
    assert detox.generate(PROMPT, seed=4, method="none").text != res.text


def test_cancel_stream_from_another_thread(detox):
    got = []
    for piece in detox.stream(PROMPT, n_predict=400, seed=1):
        got.append(piece)
        if len(got) == 2:
            threading.Thread(target=detox.cancel).start()
    assert 2 <= len(got) < 400
    assert len(detox.generate(PROMPT, seed=1).tokens) == 12     # usable afterwards


def test_stopping_a_stream_early_stops_the_decode(detox):
    it = detox.stream(PROMPT, n_predict=400, seed=2)
    next(it)
    it.close()                                                  # the consumer gives up
    assert len(detox.generate(PROMPT, seed=2).tokens) == 12


def test_two_objects_in_two_threads(tiny_llama):
    results, errors = {}, []

    def run(i):
        try:
            with Detoxifier.from_file(tiny_llama[0], method="tr", ctx_size=256, n_predict=10, threads=1) as d:
                results[i] = [d.generate(PROMPT, seed=5).text for _ in range(3)]
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results[0] == results[1] and len(set(results[0])) == 1


def test_bad_overrides_and_lazy_package(detox):
    with pytest.raises(FgdilpError, match="per-call settings"):
        detox.generate(PROMPT, selfgen_samples=3)        # it sizes the contexts: not per call
    with pytest.raises(FgdilpError, match="mask_k"):
        detox.generate(PROMPT, mask_k=0.0)
    assert fgdilp_cpp.Settings().method == "tr"
    with pytest.raises(AttributeError):
        fgdilp_cpp.nope  # noqa: B018 (the attribute access is what raises)


def test_saved_vectors_refuse_another_method(tiny_llama, tmp_path):
    from fgdilp_cpp.engine import SamplingParams

    with Detoxifier.from_file(tiny_llama[0], ctx_size=256, threads=1, selfgen_samples=3, selfgen_tokens=4,
                              selfgen_min_tokens=1) as d:
        d.generator.build_vectors(PROMPT, SamplingParams(), {}).save(tmp_path / "v.gguf")
        plain = d.generate(PROMPT, method="none", seed=3, n_predict=12).text
    with Detoxifier.from_file(tiny_llama[0], vectors=str(tmp_path / "v.gguf"), ctx_size=256, n_predict=12,
                              threads=1) as d:
        res = d.generate(PROMPT, seed=3)
        assert res.method == "vectors" and res.fired_layers == 3 and res.text != plain
        assert d.generate(PROMPT, seed=3, method="fgdilp-frozen").text == res.text
        with pytest.raises(FgdilpError, match="saved vectors"):
            d.generate(PROMPT, method="tr")
        # an unsteered baseline still runs as itself (eval --vectors compares with none)
        base = d.generate(PROMPT, seed=3, method="none")
        assert base.method == "none" and base.fired_layers == 0 and base.text == plain


def test_the_detoxifier_keeps_the_users_verbs(detox):
    """Besides its verbs a Detoxifier holds data; the model's analysis, a call's settings and a
    fitted conversation are functions over it (analysis.py, call_settings.py, chat/fitting.py)."""
    public = {name for name in vars(Detoxifier) if not name.startswith("_")}
    assert public == {"from_file", "generate", "stream", "chat", "stream_chat", "info", "build_vectors",
                      "export_control_vector", "cancel", "close"}
    assert detox.vectors is None and detox.vectors_path is None and detox.max_samples == 1
    assert detox.name == detox.info(probe=False)["name"]


def test_analysis_reads_the_model_through_its_generator(detox):
    import numpy as np

    from fgdilp_cpp.analysis import diagnose, self_diagnosis, self_diagnosis_tokens

    texts = ("the cat sat on a mat", "you are an idiot")
    own = self_diagnosis(detox, texts)
    assert own.shape == (2, 6) and ((own > 0) & (own < 1)).all()
    np.testing.assert_allclose(diagnose(detox, texts, "self"), own, rtol=1e-5)
    yes, no = self_diagnosis_tokens(detox)
    assert yes.strip() and no.strip() and yes != no
