"""Another quantisation of the same weights, at least as precise, shares the model's profile and
universal directions (recorded as transferred); a less precise one does not, nor a fine-tune of the
same shape (a changed norm weight), and the model's own profile always wins. Re-quantised copies are
made by llama.cpp's quantizer (scripts/requantize.py), as a user would make them."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest

from fgdilp_cpp.method.sources import TR_PREFIXES
from gguf import GGUFReader

from fgdilp_cpp.api import Detoxifier
from fgdilp_cpp.engine import Model
from fgdilp_cpp.engine.tensors import bits_per_weight, family_fingerprint, weights_fingerprint
from fgdilp_cpp.errors import FgdilpError
from fgdilp_cpp.generation import identity_of
from fgdilp_cpp.params import SamplingParams
from fgdilp_cpp.profiles import Profile, find_profile, find_universal, model_identity, profile_path_for, universal_path_for

from conftest import load_script

PROMPT = "the cat sat on a mat"


def _requantised(src: Path, dst: Path, ftype: str) -> Path:
    load_script("requantize").requantize(str(src), str(dst), ftype, threads=1)
    return dst


def _with_changed_norm(src: Path, dst: Path, name: str = "blk.1.ffn_norm.weight", by: float = 1e-3) -> Path:
    """A copy of src whose one norm weight moved a little: what a fine-tune does to every norm."""
    dst.write_bytes(src.read_bytes())
    reader = GGUFReader(dst, "r+")
    tensor = next(t for t in reader.tensors if t.name == name)
    tensor.data[0] += by
    reader.data.flush()
    return dst


@pytest.fixture(scope="module")
def quantised(tiny_llama, tmp_path_factory):
    """The tiny F32 model, its Q8_0 and Q4_0 copies, and an F32 'fine-tune' of it."""
    folder = tmp_path_factory.mktemp("quants")
    src = Path(tiny_llama[0])
    return {"f32": src, "q8_0": _requantised(src, folder / "q8_0.gguf", "Q8_0"),
            "q4_0": _requantised(src, folder / "q4_0.gguf", "Q4_0"),
            "tuned-f32": _with_changed_norm(src, folder / "tuned-f32.gguf"),
            "tuned-q8_0": _requantised(_with_changed_norm(src, folder / "tuned-src.gguf"), folder / "tuned-q8_0.gguf",
                                       "Q8_0")}


def _identity(path: Path) -> dict:
    with Model(path) as m:
        return model_identity(m)


def test_family_survives_quantisation_and_not_a_norm_change(quantised):
    weights = {k: weights_fingerprint(p) for k, p in quantised.items()}
    family = {k: family_fingerprint(p) for k, p in quantised.items()}
    assert len(set(weights.values())) == 5                     # every file has its own weights fingerprint
    assert family["f32"] is not None and family["f32"] == family["q8_0"] == family["q4_0"]
    assert family["tuned-q8_0"] not in (None, family["f32"]) and family["tuned-f32"] == family["tuned-q8_0"]
    ident = _identity(quantised["q8_0"])
    assert ident["quantisation"] == "Q8_0" and ident["family_sha256"] == family["f32"]
    assert ident["bits_per_weight"] == 8.5                     # Q8_0: 34 bytes per block of 32
    f32, q4 = _identity(quantised["f32"]), _identity(quantised["q4_0"])
    assert f32["quantisation"] == "ALL_F32" and f32["bits_per_weight"] == 32.0
    assert 4.5 <= q4["bits_per_weight"] < 8.5                # Q4_0, some tensors kept at higher precision


def test_norms_that_tell_nothing_give_no_family(tiny_llama, tmp_path):
    """Norm weights all equal (never trained, or a format that stores none) cannot tell fine-tunes apart."""
    path = tmp_path / "flat.gguf"
    path.write_bytes(Path(tiny_llama[0]).read_bytes())
    reader = GGUFReader(path, "r+")
    for t in reader.tensors:
        if len(t.shape) == 1:
            t.data[:] = 1.0
    reader.data.flush()
    assert family_fingerprint(path) is None and family_fingerprint(tiny_llama[0]) is not None


@pytest.fixture
def profiled_q8(quantised, tmp_path, monkeypatch):
    """A profile and universal directions for the Q8_0 file, in the test's profile folder (looked
    up by the CLI too)."""
    monkeypatch.delenv("FGDILP_PROFILE")
    folder = Path(os.environ["FGDILP_PROFILE_PATH"])
    ident = _identity(quantised["q8_0"])
    prof = Profile(model=ident, method="universal",
                   methods={"universal": {"settings": {"steer_scale": 0.7, "steer_layer_range": [1, 2]},
                                                 "figures": {"test": {"emt_delta": -0.1}}}})
    prof.save(profile_path_for(ident, folder))
    with Detoxifier.from_file(str(quantised["q8_0"]), ctx_size=256, threads=1, profile=False) as det:
        directions = det.build_vectors([PROMPT, "another prompt here"], TR_PREFIXES)
    directions.save(universal_path_for(ident["weights_sha256"], folder))
    return folder, ident, directions


def _logits(det, method):
    return np.stack(det.generator.generate(PROMPT, method, 3, SamplingParams(seed=5), record_logits=True).logits)


def _universal(path: Path) -> Path | None:
    return find_universal(weights_fingerprint(path), family=family_fingerprint(path), bits_per_weight=bits_per_weight(path))


def test_a_more_precise_copy_gets_the_profile_and_directions_transferred(quantised, profiled_q8, tmp_path, cli):
    folder, ident, directions = profiled_q8
    f32 = quantised["f32"]
    prof, where = find_profile(_identity(f32))
    assert prof is not None and where == profile_path_for(ident, folder)
    assert prof.transferred_from == {"name": ident["name"], "quantisation": "Q8_0",
                                     "weights_sha256": ident["weights_sha256"]}
    assert _universal(f32) == universal_path_for(ident["weights_sha256"], folder)
    assert find_universal(weights_fingerprint(f32)) is None    # without the family: keyed by weights only
    with Detoxifier.from_file(str(f32), ctx_size=256, threads=1) as det:
        s, src = det.settings, det.sources
        assert (s.method, s.steer_scale, s.steer_layer_range) == ("universal", 0.7, (1, 2))
        assert src["steer_scale"] == "profile"
        info = det.info(probe=False)
        assert info["profile_transferred_from"]["weights_sha256"] == ident["weights_sha256"]
        assert info["universal_transferred_from"]["weights_sha256"] == ident["weights_sha256"]
        assert "measured on that file" in det.profile.transfer_note()
        steered, unsteered = _logits(det, "universal"), _logits(det, "none")
        assert not np.array_equal(steered, unsteered)
        # the transferred file's directions, bit for bit: the same file relabelled for this model, as --vectors
        relabelled = tmp_path / "relabelled.gguf"
        dataclasses.replace(directions, model=identity_of(det.model)).save(relabelled)
    with Detoxifier.from_file(str(f32), vectors=str(relabelled), ctx_size=256, threads=1, steer_scale=0.7,
                              steer_layer_range=(1, 2)) as saved:
        assert np.array_equal(_logits(saved, "vectors"), steered)
    out = cli("info", "-m", str(f32), "-t", "1")
    assert out.returncode == 0, out.stderr
    assert "transferred from" in out.stdout and "Q8_0" in out.stdout and "transferred: built on" in out.stdout


def test_a_less_precise_copy_gets_neither(quantised, profiled_q8):
    q4 = quantised["q4_0"]
    assert find_profile(_identity(q4)) == (None, None) and _universal(q4) is None
    with Detoxifier.from_file(str(q4), ctx_size=256, threads=1) as det:
        assert det.profile is None and det.info(probe=False)["universal"] is None


def test_the_models_own_profile_wins(quantised, profiled_q8):
    folder, ident, _ = profiled_q8
    f32 = quantised["f32"]
    own = _identity(f32)
    Profile(model=own, method="tr", methods={"tr": {"settings": {"steer_scale": 0.3}}}).save(profile_path_for(own, folder))
    prof, where = find_profile(own)
    assert where == profile_path_for(own, folder) and prof.transferred_from is None and prof.method == "tr"
    with Detoxifier.from_file(str(f32), ctx_size=256, threads=1) as det:
        assert det.profile.transferred_from is None and det.settings.steer_scale == 0.3
        assert det.info(probe=False)["profile_transferred_from"] is None


@pytest.mark.parametrize("which", ["tuned-f32", "tuned-q8_0"])
def test_a_changed_norm_gets_neither(quantised, profiled_q8, cli, which):
    tuned = quantised[which]
    assert find_profile(_identity(tuned)) == (None, None) and _universal(tuned) is None
    with Detoxifier.from_file(str(tuned), ctx_size=256, threads=1) as det:
        assert det.profile is None and det.settings.method == "tr"
        with pytest.raises(FgdilpError, match="no universal directions"):
            det.generate(PROMPT, method="universal", n_predict=2)
        with pytest.raises(FgdilpError, match="another model"):
            Detoxifier(det.settings, profile=Profile.load(profile_path_for(profiled_q8[1], profiled_q8[0])))
    out = cli("info", "-m", str(tuned), "-t", "1")
    assert out.returncode == 0 and "transferred" not in out.stdout


def test_a_profile_object_of_the_family_is_lent(quantised, profiled_q8):
    folder, ident, _ = profiled_q8
    given = Profile.load(profile_path_for(ident, folder))
    with Detoxifier.from_file(str(quantised["f32"]), ctx_size=256, threads=1, profile=False) as base:
        settings = base.settings
    with Detoxifier(settings, profile=given) as det:
        assert det.profile.transferred_from["weights_sha256"] == ident["weights_sha256"]
    with Detoxifier.from_file(str(quantised["q4_0"]), ctx_size=256, threads=1, profile=False) as base:
        with pytest.raises(FgdilpError, match="another model"):
            Detoxifier(base.settings, profile=given)


def test_a_universal_file_under_another_name_is_refused(quantised, profiled_q8):
    """A lent file must hold the weights its name says (a copy under the wrong name is refused)."""
    folder, ident, directions = profiled_q8
    wrong = dataclasses.replace(directions, model=dataclasses.replace(directions.model, weights_sha256="ab" * 32))
    wrong.save(universal_path_for(ident["weights_sha256"], folder))
    with Detoxifier.from_file(str(quantised["f32"]), ctx_size=256, threads=1) as det:
        with pytest.raises(FgdilpError, match="not the ones its name says"):
            det.generate(PROMPT, method="universal", n_predict=2)
