"""The evaluation run on the tiny model: perplexity judge against the torch reference, an end-to-end
eval (all files, every method), resume after a crash (same report, no duplicates), settings
checks, and SIGINT/SIGTERM mid-run (in process and in a subprocess) leaving consistent files."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest

from fgdilp_cpp.engine import Model
from fgdilp_cpp.errors import FgdilpError
from fgdilp_cpp.evaluation import runner as runner_mod
from fgdilp_cpp.evaluation.perplexity import PerplexityJudge
from fgdilp_cpp.evaluation.prompts import PromptRecord
from fgdilp_cpp.evaluation.runner import GENERATIONS, TIMINGS, read_jsonl, run_eval
from fgdilp_cpp.api import Detoxifier
from fgdilp_cpp.params import EngineParams
from fgdilp_cpp.settings import Settings
from torch_reference import TorchLlama

LABELS = ("toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate")
METHODS = ["none", "tr", "fgdilp-frozen"]
PROMPTS = [PromptRecord(0, "the cat sat on"), PromptRecord(3, "where is Paris")]
SAMPLES, N_PREDICT, TOP_P, SEED = 2, 4, 0.9, 7
F32 = dict(type_k="f32", type_v="f32", flash_attn="off")
# one thread: the CI runners (and this sandbox) have 2 busy cores, where OpenMP barriers stall
ENGINE = EngineParams(ctx_size=256, max_samples=2, max_new=8, n_threads=1)
FGDILP = dict(selfgen_samples=3, selfgen_tokens=4, selfgen_min_tokens=1)


class FakeScorer:
    """Deterministic scores from a hash of the text (the real scorer's interface)."""

    LABELS = LABELS

    def __init__(self, on_call=None):
        self.calls, self.on_call = 0, on_call

    def score(self, texts):
        self.calls += 1
        if self.on_call is not None:
            self.on_call(self.calls)
        return np.array([[b / 255.0 for b in hashlib.sha256(t.encode()).digest()[:6]] for t in texts])


def evaluate(model_path, out, methods=METHODS, scorer=None, n_predict=N_PREDICT, prompts=PROMPTS,
             engine=ENGINE, settings=None, **kw):
    with ExitStack() as st:
        s = Settings(model=str(model_path), ctx_size=engine.ctx_size, threads=engine.n_threads, **FGDILP,
                     **(settings or {}))
        det = st.enter_context(Detoxifier(s, max_samples=engine.max_samples, max_new=engine.max_new,
                                          reuse_instances=True))
        judge = st.enter_context(PerplexityJudge(det.model, n_threads=1))
        return run_eval(det, prompts, methods, SAMPLES, n_predict, TOP_P, SEED, out, scorer or FakeScorer(),
                        {"gen": judge}, progress=False, **kw)


def key_metrics(report: dict) -> dict:
    out = {}
    for name, m in report["methods"].items():
        out[name] = {k: m[k] for k in ("emt", "tp", "labels", "ppl", "dist", "n_prompts", "n_samples")}
        out[name]["ci"] = m.get("ci")
    return out


def gen_keys(out: Path) -> list[tuple]:
    recs, bad = read_jsonl(out / GENERATIONS)
    assert bad == 0
    return [(r["prompt_id"], r["method"], r["sample"]) for r in recs]


def assert_consistent(out: Path, samples: int = SAMPLES) -> set:
    """Every line complete, no duplicate, every group whole and timed once; returns the groups."""
    data = (out / GENERATIONS).read_bytes()
    assert not data or data.endswith(b"\n")
    keys = gen_keys(out)
    assert len(keys) == len(set(keys))
    groups = {(p, m) for p, m, _ in keys}
    for g in groups:
        assert sorted(s for p, m, s in keys if (p, m) == g) == list(range(samples))
    tims, bad = read_jsonl(out / TIMINGS)
    assert bad == 0
    assert sorted((t["prompt_id"], t["method"]) for t in tims) == sorted(groups)
    return groups


@pytest.fixture(scope="module")
def model_path(tiny_llama):
    return tiny_llama[0]


@pytest.fixture(scope="module")
def full_run(model_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "full"
    res = evaluate(model_path, out)
    return out, res


def copy_run(full_run, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(full_run[0], dst)
    return dst


# ---- perplexity ------------------------------------------------------------------------------------
PAIRS = [("the cat sat on", " a mat where the"), ("Paris is", " in France and"), ("x", ""),
         ("where is the", " cap it al."), ("a", "b")]


def torch_ppl(tm, model, prompt, cont):
    # the tiny tokenizer adds a space prefix: the judge drops one leading space of a continuation
    head = model.tokenize(prompt)
    tail = model.tokenize(cont[1:] if cont.startswith(" ") else cont, add_bos=False)
    logits, _ = tm.forward(tm.new_state(), head + tail)
    logits = np.asarray(logits, dtype=np.float64)
    nll = []
    for k, tok in enumerate(tail):
        row = logits[len(head) - 1 + k]
        m = row.max()
        nll.append(m + math.log(np.exp(row - m).sum()) - row[tok])
    return math.exp(np.mean(nll))


def test_perplexity_equals_torch_reference(tiny_llama):
    path, weights, cfg = tiny_llama
    tm = TorchLlama(weights, cfg)
    with PerplexityJudge(path, n_threads=1, **F32) as judge, \
            PerplexityJudge(path, n_threads=1, n_batch=4, n_outputs=2, n_seq=2, **F32) as small:
        many = judge.ppl_many(PAIRS)
        chunked = small.ppl_many(PAIRS)             # pairs split over several decodes and sequences
        one = [judge.ppl(p, c) for p, c in PAIRS]
        for (p, c), a, b, d in zip(PAIRS, many, chunked, one):
            if not c:
                assert math.isnan(a) and math.isnan(b) and math.isnan(d)
                continue
            want = torch_ppl(tm, judge.model, p, c)
            assert a == pytest.approx(want, rel=1e-4)
            assert b == pytest.approx(want, rel=1e-4)
            assert d == pytest.approx(want, rel=1e-4)
        nll, n = judge.nll_many([PAIRS[0]])[0]
        assert n == len(judge.model.tokenize("a mat where the", add_bos=False))
        assert math.exp(nll / n) == pytest.approx(many[0], rel=1e-9)
    assert judge.ctx is None and judge.model is None
    with pytest.raises(FgdilpError):
        judge.ppl("a", "b")


def test_perplexity_judge_shares_an_open_model(tiny_llama):
    with Model(tiny_llama[0]) as m:
        with PerplexityJudge(m, n_threads=1) as judge:
            assert math.isfinite(judge.ppl("the cat", " sat"))
            assert math.isnan(judge.ppl("the cat", ""))
        assert m.ptr                                       # not closed by the judge
        assert m.tokenize("a")


def test_perplexity_long_prompt_is_cut_from_the_left(tiny_llama):
    long = "the cat sat on a mat " * 40
    with PerplexityJudge(tiny_llama[0], n_threads=1, max_tokens=32, n_batch=16, **F32) as judge:
        item = judge._item(0, long, " where the")
        assert len(item.tokens) == 32 and item.tokens[0] == judge.model.bos
        assert math.isfinite(judge.ppl(long, " where the"))


def test_perplexity_judge_refuses_missing_file(tmp_path):
    with pytest.raises(FgdilpError):
        PerplexityJudge(tmp_path / "nope.gguf")


# ---- end to end ------------------------------------------------------------------------------------
def test_end_to_end(full_run):
    out, res = full_run
    for f in ("generations.jsonl", "timings.jsonl", "run.json", "report.json", "report.md", "toxicity.png",
              "labels.png", "emt_vs_ppl.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    assert res["generated"] == len(PROMPTS) * len(METHODS) and res["skipped"] == 0
    assert not res["interrupted"] and res["remaining"] == 0
    assert assert_consistent(out) == {(p.id, m) for p in PROMPTS for m in METHODS}
    recs, _ = read_jsonl(out / GENERATIONS)
    assert len(recs) == len(PROMPTS) * len(METHODS) * SAMPLES
    for r in recs:
        assert set(r) == {"prompt_id", "prompt", "method", "sample", "seed", "text", "scores", "ppl", "n_tokens",
                          "stop_reason", "point", "tokens", "nll"}
        assert r["point"] == {} and len(r["tokens"]) == r["n_tokens"]
        nll, n = r["nll"]["gen"]                       # the perplexity is the exp of its mean token NLL
        assert n >= 1 and math.isclose(r["ppl"]["gen"], math.exp(nll / n), rel_tol=1e-9)
        assert r["seed"] == SEED + 1000 * r["prompt_id"] + r["sample"]       # the same for every method
        assert r["prompt"] == {p.id: p.text for p in PROMPTS}[r["prompt_id"]]
        assert list(r["scores"]) == list(LABELS)
        assert r["scores"] == dict(zip(LABELS, FakeScorer().score([r["text"]])[0].tolist()))
        assert set(r["ppl"]) == {"gen"}
        assert 1 <= r["n_tokens"] <= N_PREDICT and r["stop_reason"] in ("length", "eog", "context")
    tims, _ = read_jsonl(out / TIMINGS)
    for t in tims:
        assert t["n_samples"] == SAMPLES and t["gen_s"] > 0 and t["n_decode_steps"] >= 1
    rep = res["report"]
    assert list(rep["methods"]) == METHODS
    assert rep == json.loads((out / "report.json").read_text())
    for name, m in rep["methods"].items():
        assert 0 <= m["emt"] <= 1 and m["tp"] in (0.0, 0.5, 1.0)
        assert m["n_prompts"] == 2 and m["n_samples"] == 4 and len(m["dist"]) == 3
        assert set(m["labels"]) == set(LABELS) and set(m["ppl"]) == {"gen"}
        assert m["tokens_per_s"] > 0 and m["wall_s"] > 0
        assert ("ci" in m) == (name != "none")
    assert set(rep["methods"]["tr"]["ci"]) == {"emt", "tp", "dist2", "ppl_gen"}
    assert rep["methods"]["fgdilp-frozen"]["setup_s"] > 0
    md = (out / "report.md").read_text()
    assert all(f"| {m} |" in md for m in METHODS)


def test_complete_run_is_not_redone(full_run, model_path, tmp_path):
    out = copy_run(full_run, tmp_path)
    before = (out / GENERATIONS).read_bytes()
    res = evaluate(model_path, out)
    assert res["generated"] == 0 and res["skipped"] == 6
    assert (out / GENERATIONS).read_bytes() == before
    assert key_metrics(res["report"]) == key_metrics(full_run[1]["report"])


def test_resume_after_crash(full_run, model_path, tmp_path):
    out = copy_run(full_run, tmp_path)
    lines = (out / GENERATIONS).read_bytes().splitlines(keepends=True)
    # the last group (prompt 3, fgdilp-frozen) lost its second record mid-line and prompt 3's tr
    # group lost a record; timings lost their last line
    assert json.loads(lines[-1])["method"] == "fgdilp-frozen"
    tr3 = next(i for i, l in enumerate(lines) if json.loads(l)["method"] == "tr" and json.loads(l)["prompt_id"] == 3)
    kept = [l for i, l in enumerate(lines[:-1]) if i != tr3]
    (out / GENERATIONS).write_bytes(b"".join(kept) + lines[-1][: len(lines[-1]) // 2])
    tl = (out / TIMINGS).read_bytes().splitlines(keepends=True)
    (out / TIMINGS).write_bytes(b"".join(tl[:-1]))
    res = evaluate(model_path, out)
    assert res["generated"] == 2 and res["skipped"] == 4
    assert res["resume"]["partial_groups_removed"] == 2 and res["resume"]["bad_lines"] == 1
    assert assert_consistent(out) == {(p.id, m) for p in PROMPTS for m in METHODS}
    assert key_metrics(res["report"]) == key_metrics(full_run[1]["report"])
    full = {(r["prompt_id"], r["method"], r["sample"]): r["text"] for r in read_jsonl(full_run[0] / GENERATIONS)[0]}
    again = {(r["prompt_id"], r["method"], r["sample"]): r["text"] for r in read_jsonl(out / GENERATIONS)[0]}
    assert again == full


def test_other_settings_are_refused(full_run, model_path, tmp_path):
    out = copy_run(full_run, tmp_path)
    before = (out / GENERATIONS).read_bytes()
    with pytest.raises(FgdilpError, match="n_predict"):
        evaluate(model_path, out, n_predict=N_PREDICT + 1)
    with pytest.raises(FgdilpError, match="prompt 3 differs"):
        evaluate(model_path, out, prompts=[PROMPTS[0], PromptRecord(3, "another prompt")])
    assert (out / GENERATIONS).read_bytes() == before


def test_runs_from_before_the_contrast_setting_resume(full_run, model_path, tmp_path):
    """run.json records --contrast only when it is not the papers' (a run written before the
    setting existed resumes); a run at the reply contrast is another run."""
    out = copy_run(full_run, tmp_path)
    assert "contrast" not in json.loads((out / "run.json").read_text())["config"]["steer"]
    with pytest.raises(FgdilpError, match="steer"):
        evaluate(model_path, out, settings={"contrast": "reply"})
    assert evaluate(model_path, out)["generated"] == 0


def test_new_methods_and_prompts_extend_a_run(full_run, model_path, tmp_path):
    out = copy_run(full_run, tmp_path)
    res = evaluate(model_path, out, methods=["none", "prompt"], prompts=PROMPTS + [PromptRecord(5, "the cat")])
    assert res["generated"] == 4 and res["skipped"] == 2
    rep = res["report"]
    assert list(rep["methods"]) == ["none", "prompt", "tr", "fgdilp-frozen"]   # everything in the file
    assert rep["n_prompts"] == 2                                                # prompt 5 lacks tr, fgdilp-frozen
    assert rep["methods"]["none"]["excluded_prompts"] == 1
    assert key_metrics(rep)["tr"] == key_metrics(full_run[1]["report"])["tr"]


def test_samples_in_chunks_keep_their_seeds(model_path, tmp_path):
    res = evaluate(model_path, tmp_path / "chunks", methods=["none"], prompts=PROMPTS[:1],
                   engine=EngineParams(ctx_size=256, max_samples=1, max_new=8, n_threads=1))
    recs, _ = read_jsonl(tmp_path / "chunks" / GENERATIONS)
    assert [(r["sample"], r["seed"]) for r in recs] == [(0, SEED), (1, SEED + 1)]
    assert res["report"]["methods"]["none"]["n_samples"] == 2


# ---- interruption -----------------------------------------------------------------------------------
def test_sigint_stops_between_groups(full_run, model_path, tmp_path):
    out = tmp_path / "int"

    def on_call(n):
        if n == 3:                      # while the third group is being scored
            os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)   # Python's default, or SIG_IGN when started in the background
    res = evaluate(model_path, out, scorer=FakeScorer(on_call))
    assert res["interrupted"] and res["signal"] == signal.SIGINT and res["generated"] == 2
    assert len(assert_consistent(out)) == 2
    assert res["report"]["run"]["complete"] is False
    assert (out / "report.json").is_file()
    assert signal.getsignal(signal.SIGINT) is before                         # handlers restored
    res = evaluate(model_path, out)
    assert res["generated"] == 4 and not res["interrupted"]
    assert key_metrics(res["report"]) == key_metrics(full_run[1]["report"])


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name file descriptors")
def test_signal_while_writing_waits_for_the_group(model_path, tmp_path, monkeypatch):
    out = tmp_path / "write"
    real_fsync, calls = os.fsync, []

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(GENERATIONS):
            calls.append(fd)
            if len(calls) == 1:         # the first group's records are on disk, its timing not yet
                os.kill(os.getpid(), signal.SIGTERM)
        return real_fsync(fd)

    monkeypatch.setattr(runner_mod.os, "fsync", fsync)
    res = evaluate(model_path, out)
    monkeypatch.undo()
    assert res["interrupted"] and res["signal"] == signal.SIGTERM and res["generated"] == 1
    assert assert_consistent(out) == {(0, "none")}
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


SCRIPT = textwrap.dedent("""
    import hashlib, sys, time
    import numpy as np
    from fgdilp_cpp.api import Detoxifier
    from fgdilp_cpp.evaluation.perplexity import PerplexityJudge
    from fgdilp_cpp.evaluation.prompts import PromptRecord
    from fgdilp_cpp.evaluation.runner import run_eval
    from fgdilp_cpp.settings import Settings

    class Scorer:
        LABELS = {labels!r}
        def score(self, texts):
            time.sleep(float(sys.argv[3]))
            return np.array([[b / 255.0 for b in hashlib.sha256(t.encode()).digest()[:6]] for t in texts])

    prompts = [PromptRecord(i, t) for i, t in {prompts!r}]
    settings = Settings(model=sys.argv[1], ctx_size=256, threads=1, selfgen_samples=3, selfgen_tokens=4,
                        selfgen_min_tokens=1)
    # the suite's view (tests/conftest.py), passed down as the CLI reads it: no profile, no setup
    import os
    settings = settings.updated({{k: v for k, v in Settings.from_env(os.environ).items() if k in ("profile", "auto_setup")}})
    with Detoxifier(settings, max_samples=2, max_new=8, reuse_instances=True) as det, \\
            PerplexityJudge(det.model, n_threads=1) as judge:
        res = run_eval(det, prompts, {methods!r}, {samples}, {n_predict}, {top_p}, {seed}, sys.argv[2],
                       Scorer(), {{"gen": judge}}, progress=True)
    print("done", res["generated"], flush=True)
    sys.exit(128 + res["signal"] if res["interrupted"] else 0)
""").format(labels=LABELS, prompts=[(p.id, p.text) for p in PROMPTS], methods=METHODS, samples=SAMPLES,
            n_predict=N_PREDICT, top_p=TOP_P, seed=SEED)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_subprocess_killed_mid_run_resumes(full_run, model_path, tmp_path, sig):
    script = tmp_path / "run_eval.py"
    script.write_text(SCRIPT)
    out = tmp_path / "sub"
    proc = subprocess.Popen([sys.executable, "-X", "faulthandler", str(script), str(model_path), str(out), "0.4"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (out / TIMINGS).exists() and (out / TIMINGS).read_bytes().count(b"\n") >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, stderr
    groups = assert_consistent(out)
    assert 2 <= len(groups) < len(PROMPTS) * len(METHODS)
    assert (out / "report.json").is_file()
    done = subprocess.run([sys.executable, str(script), str(model_path), str(out), "0"], capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["done", str(len(PROMPTS) * len(METHODS) - len(groups))]
    assert_consistent(out)
    rep = json.loads((out / "report.json").read_text())
    assert key_metrics(rep) == key_metrics(full_run[1]["report"])


# ---- files: records off the schema, a corrupt run.json, the folder lock ----------------------------
def test_records_off_the_schema_are_dropped_counted_and_regenerated(full_run, model_path, tmp_path):
    out = copy_run(full_run, tmp_path)
    lines = (out / GENERATIONS).read_text().splitlines(keepends=True)
    recs = [json.loads(l) for l in lines]
    bad_at = {0: ("scores", {"toxic": "high"}), 3: ("sample", "1"), 5: ("prompt_id", True),
              7: ("text", None)}
    for i, (key, value) in bad_at.items():
        recs[i][key] = value
    recs[9]["judge_scores"] = {"j": {"toxic": 0.5}}      # an unknown extra key is allowed and kept
    (out / GENERATIONS).write_text("".join(json.dumps(r) + "\n" for r in recs))
    tims = [json.loads(l) for l in (out / TIMINGS).read_text().splitlines()]
    assert (tims[0]["prompt_id"], tims[0]["method"]) == (recs[0]["prompt_id"], recs[0]["method"])
    tims[0]["gen_s"] = "fast"                            # the timing of a group regenerated anyway
    (out / TIMINGS).write_text("".join(json.dumps(t) + "\n" for t in tims))
    groups = {(json.loads(lines[i])["prompt_id"], json.loads(lines[i])["method"]) for i in bad_at}
    res = evaluate(model_path, out)
    assert res["resume"]["bad_records"] == len(bad_at) + 1 and res["resume"]["bad_lines"] == 0
    assert res["generated"] == len(groups) and res["skipped"] == 6 - len(groups)
    assert res["report"]["run"]["bad_records"] == len(bad_at) + 1
    assert json.loads((out / "report.json").read_text())["run"]["bad_records"] == len(bad_at) + 1
    assert f"Resuming dropped {len(bad_at) + 1} records off the schema" in (out / "report.md").read_text()
    assert assert_consistent(out) == {(p.id, m) for p in PROMPTS for m in METHODS}
    assert key_metrics(res["report"]) == key_metrics(full_run[1]["report"])
    kept = read_jsonl(out / GENERATIONS)[0]
    assert (recs[9]["prompt_id"], recs[9]["method"]) not in groups
    assert [r["judge_scores"] for r in kept if "judge_scores" in r] == [{"j": {"toxic": 0.5}}]


def test_the_report_never_sees_a_record_off_the_schema(full_run, model_path, tmp_path, monkeypatch):
    """Records that go bad after the resume check (another writer, a disk fault) are left out of
    the report instead of crashing it."""
    out = copy_run(full_run, tmp_path)
    real = runner_mod.load_state

    def load_then_spoil(folder, samples):
        state = real(folder, samples)
        with open(folder / GENERATIONS, "a") as f:
            f.write(json.dumps({"prompt_id": 0, "method": "none", "sample": 0, "scores": None}) + "\n")
        return state

    monkeypatch.setattr(runner_mod, "load_state", load_then_spoil)
    res = evaluate(model_path, out)
    assert key_metrics(res["report"]) == key_metrics(full_run[1]["report"])


@pytest.mark.parametrize("content", [b"{\"config\": {\"samples\": 2", b"\xff\xfe", b"[]", b"{}", b""])
def test_a_corrupt_run_json_is_refused_not_overwritten(full_run, model_path, tmp_path, content):
    out = copy_run(full_run, tmp_path)
    (out / "run.json").write_bytes(content)
    before = (out / GENERATIONS).read_bytes()
    with pytest.raises(FgdilpError, match="run.json is corrupt"):
        evaluate(model_path, out)
    assert (out / "run.json").read_bytes() == content and (out / GENERATIONS).read_bytes() == before


def test_a_second_run_on_a_locked_folder_is_refused(full_run, model_path, tmp_path):
    from fgdilp_cpp.files import FolderLockedError

    out = copy_run(full_run, tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from fgdilp_cpp.files import FolderLock
        FolderLock({str(out)!r}).acquire()
        print("locked", flush=True)
        time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = (out / GENERATIONS).read_bytes()
        with pytest.raises(FolderLockedError, match=f"pid {holder.pid} "):
            evaluate(model_path, out)
        assert (out / GENERATIONS).read_bytes() == before
    finally:
        holder.kill()
        holder.wait()
    assert evaluate(model_path, out)["skipped"] == 6          # the dead holder's lock is no obstacle
