"""Method universal: the model's universal directions, installed by `vectors build --install`
beside its profile and found by its weights fingerprint, applied exactly as the same file given
with --vectors; refused clearly where there are none or they are another model's."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from fgdilp_cpp import methods
from fgdilp_cpp.api import Detoxifier
from fgdilp_cpp.cli.options import every_method
from fgdilp_cpp.engine.tensors import weights_fingerprint
from fgdilp_cpp.errors import FgdilpError
from fgdilp_cpp.evaluation.sweep import schedule
from fgdilp_cpp.params import SamplingParams
from fgdilp_cpp.profiles import find_universal, universal_path_for
from fgdilp_cpp.settings import Settings

PROMPT = "the cat sat on a mat"


def _prompts(tmp_path) -> str:
    f = tmp_path / "prompts.jsonl"
    f.write_text("".join(json.dumps({"prompt": {"text": f"prompt number {i} says", "toxicity": 0.7}}) + "\n"
                         for i in range(3)))
    return str(f)


def _steps(det, method, prompt=PROMPT):
    return det.generator.generate(prompt, method, 4, SamplingParams(seed=5), record_logits=True)


def test_installed_directions_are_found_and_applied_as_with_vectors(cli, tiny_llama, tmp_path):
    model = str(tiny_llama[0])
    folder = Path(os.environ["FGDILP_PROFILE_PATH"])
    want = universal_path_for(weights_fingerprint(model), folder)
    assert find_universal(weights_fingerprint(model)) is None
    assert "universal" not in every_method(Settings(model=model))
    proc = cli("vectors", "build", "-m", model, "--prompts", _prompts(tmp_path), "--limit", "3", "-c", "256",
               "-t", "1", "--no-progress", "--install")
    assert proc.returncode == 0, proc.stderr
    assert str(want) in proc.stdout and find_universal(weights_fingerprint(model)) == want
    assert "universal" in every_method(Settings(model=model))
    with Detoxifier.from_file(model, ctx_size=256, threads=1) as det, \
            Detoxifier.from_file(model, vectors=str(want), ctx_size=256, threads=1) as saved:
        assert det.info(probe=False)["universal"] == str(want)
        assert det.info(probe=False)["universal_source"] == "tr-prefixes"
        # a calibration's entry for the method records which file its scale belongs to
        from fgdilp_cpp.evaluation.calibrate import _universal_file
        import hashlib
        assert _universal_file(det) == {"universal_sha256": hashlib.sha256(want.read_bytes()).hexdigest(),
                                        "universal_source": "tr-prefixes"}
        uni, vec, none = _steps(det, "universal"), _steps(saved, "vectors"), _steps(det, "none")
        assert uni.fired_layers > 0 and uni.tokens == vec.tokens
        assert np.array_equal(np.stack(uni.logits), np.stack(vec.logits))        # the same edit, bit for bit
        assert not np.array_equal(np.stack(uni.logits), np.stack(none.logits))
        ex = det.generate(PROMPT, method="universal", n_predict=2, explain=True).explain
        assert ex["universal"] is True and ex["saved_vectors"] == "tr-prefixes"
        # the prompt-level condition applies to it like to any steering method
        assert det.generate(PROMPT, method="universal", n_predict=2, condition=0.0).explain["condition"]["steered"]
    gen = cli("generate", "-m", model, "--method", "universal", "-p", PROMPT, "-n", "2", "-c", "256", "-t", "1")
    assert gen.returncode == 0, gen.stderr
    bad = cli("vectors", "build", "-m", model, "-p", PROMPT, "--install")
    assert bad.returncode == 1 and "--prompts" in bad.stderr and "Traceback" not in bad.stderr
    bad = cli("vectors", "build", "-m", model, "--prompts", _prompts(tmp_path))
    assert bad.returncode == 1 and "-o OUT.gguf, or --install" in bad.stderr


def test_no_universal_directions_is_a_clear_error(cli, tiny_llama):
    with Detoxifier.from_file(str(tiny_llama[0]), ctx_size=256, threads=1) as det:
        assert det.info(probe=False)["universal"] is None
        with pytest.raises(FgdilpError, match="no universal directions for this model"):
            det.generate(PROMPT, method="universal", n_predict=2)
    proc = cli("generate", "-m", str(tiny_llama[0]), "--method", "universal", "-p", PROMPT, "-n", "2")
    assert proc.returncode == 1 and "vectors build" in proc.stderr and "Traceback" not in proc.stderr


def test_another_models_directions_are_refused(tiny_llama, tiny_chat, tmp_path):
    with Detoxifier.from_file(str(tiny_chat), ctx_size=256, threads=1) as other:
        hd = other.build_vectors([PROMPT], "tr-prefixes")
    hd.save(universal_path_for(weights_fingerprint(tiny_llama[0]), Path(os.environ["FGDILP_PROFILE_PATH"])))
    with Detoxifier.from_file(str(tiny_llama[0]), ctx_size=256, threads=1) as det:
        with pytest.raises(FgdilpError, match="vectors were built for"):
            det.generate(PROMPT, method="universal", n_predict=2)


def test_the_registry_entry():
    spec = methods.get("universal")
    assert spec.universal and spec.hook and spec.heads and not spec.instance and spec.prefix_room == 0
    assert "universal" in methods.runnable_names(True) and "universal" not in methods.runnable_names(False)
    # its direction is a saved file: the contrast (what P+ / P- hold) does not change it, the scale does
    runs = {m: p for _, m, p in schedule(["tr", "universal"], [{"contrast": "reply", "steer_scale": 0.5}])}
    assert runs == {"tr": {"contrast": "reply", "steer_scale": 0.5}, "universal": {"steer_scale": 0.5}}


def test_shipped_universal_directions_belong_to_a_shipped_profile():
    """Every universal file shipped in the package sits beside the profile of the same model."""
    from fgdilp_cpp.profiles import SHIPPED_DIR, UNIVERSAL_SUFFIX

    import hashlib

    profiles = {json.loads(p.read_text())["model"]["weights_sha256"][:24]: json.loads(p.read_text())
                for p in SHIPPED_DIR.glob("*.json")}
    for f in SHIPPED_DIR.glob(f"*{UNIVERSAL_SUFFIX}"):
        profile = profiles.get(f.name[:-len(UNIVERSAL_SUFFIX)])
        assert profile is not None, f
        # the profile's calibrated scale belongs to this very file
        entry = profile["methods"].get("universal")
        assert entry is None or entry["universal_sha256"] == hashlib.sha256(f.read_bytes()).hexdigest(), f


@pytest.mark.real_model
def test_the_shipped_universal_directions_fit_their_models():
    """Each embedded model whose shipped profile has a universal entry finds its shipped
    directions, and they pass the model check (same shape, vocabulary and weights)."""
    from fgdilp_cpp.engine import Model
    from fgdilp_cpp.models import default_chat_model_path
    from fgdilp_cpp.generation import identity_of
    from fgdilp_cpp.method.vectors import HeadDirections
    from fgdilp_cpp.models import default_model_path
    from fgdilp_cpp.profiles import SHIPPED_DIR, find_profile, model_identity

    for path in (default_model_path(), default_chat_model_path()):
        with Model(path) as m:
            prof, _ = find_profile(model_identity(m), folders=[SHIPPED_DIR])
            found = find_universal(m.fingerprint()["weights_sha256"], folders=[SHIPPED_DIR])
            if prof is not None and "universal" in prof.methods:
                assert found is not None, path
            if found is not None:
                HeadDirections.load(found).check_model(identity_of(m))
