"""The evaluation run: every method on the same prompts with the same seeds, every sample saved as
it is produced, resumable, then the report over everything in the output folder.

Files in out_dir:
- run.json           the settings every record depends on; a resumed run must match them.
- generations.jsonl  one record per sample, appended (flush + fsync) one (prompt, method) group at a
                     time: {"prompt_id", "prompt", "method", "sample", "seed", "text",
                     "scores": {label: p}, "ppl": {judge: x or null}, "n_tokens", "stop_reason",
                     "point": {setting: value} (the sweep point; {} or absent: the run's settings),
                     "tokens": [generated token ids], "nll": {judge: [summed NLL or null, n tokens]}},
                     and "judge_scores": {judge: {label: p}} when toxicity judges beyond the first are given
- timings.jsonl      one record per (prompt, method, point) group: {"prompt_id", "method", "point", "n_samples",
                     "n_tokens", "n_prompt_tokens", "n_decode_steps", "setup_s", "prefill_s",
                     "decode_s", "gen_s", "score_s", "ppl_s"}, and "steered" (bool) under --condition
- report.json, report.md, *.png (report.py)
- .fgdilp.lock       the folder's lock (files.FolderLock), held for the whole run: a second run on
                     the same folder is refused at once, naming the process that holds it.

Seeds: sample i of the prompt with id p (its line index in the prompt file) is drawn with seed
(seed + stride * p + i) mod 2^32, stride = max(1000, samples), the same for every method (and for
FGDILP's self-generation, which starts from the prompt's first seed). Sampling is top-p only:
temperature 1, top-k 0, min-p 0.

Resume: run.json must be readable and hold the same settings (a corrupt one is refused, never
overwritten); the records already in generations.jsonl are read first; a truncated or unreadable line,
or a record off the schema of records.py, is dropped and counted (stderr, report.json "run");
groups with all their samples are kept and skipped, groups with only some are removed (the files
are rewritten without them, atomically) and generated again. SIGINT and SIGTERM stop the
run between two groups (a group being written is finished first); what was written stays.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from .. import methods as registry
from ..engine import SamplingParams
from ..chat.fitting import fit_chat
from ..errors import FgdilpError
from ..files import FolderLock, sha256_file, write_atomic
from .judges import judge_map, score_checked
from .report import build_report, write_report
from .records import GENERATION_SCHEMA, TIMING_SCHEMA, read_jsonl, read_valid, split_valid
from .sweep import check_grid, normalize, per_method, point_key, schedule, variant_name

GENERATIONS = "generations.jsonl"
TIMINGS = "timings.jsonl"
RUN = "run.json"
SEED_STRIDE = 1000
RUN_VERSION = 1


def seed_stride(samples: int) -> int:
    return max(SEED_STRIDE, samples)


def sample_seed(seed: int, prompt_id: int, sample: int, samples: int) -> int:
    """The seed of sample `sample` of prompt `prompt_id` (identical for every method)."""
    return (seed + seed_stride(samples) * prompt_id + sample) % 2**32


def eval_sampling(top_p: float, seed: int, greedy: bool = False) -> SamplingParams:
    """Top-p only, as the papers: temperature 1, no top-k, no min-p; greedy: temperature 0."""
    return SamplingParams(temp=0.0 if greedy else 1.0, top_k=0, top_p=top_p, min_p=0.0, seed=seed).validate()


# ---- JSONL files ----------------------------------------------------------------------------------
def _finite(x: Any) -> Optional[float]:
    x = float(x)
    return x if math.isfinite(x) else None


def _json_default(o: Any):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    return str(o)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, default=_json_default)


def _gen_key(r: dict) -> tuple[int, str, str, int]:
    return r["prompt_id"], r["method"], point_key(r.get("point")), r["sample"]   # types checked by the schema


def _group_key(r: dict) -> tuple[int, str, str]:
    """(prompt, method, sweep point): a record without "point" (runs before sweeps) is the empty point."""
    return r["prompt_id"], r["method"], point_key(r.get("point"))


def load_state(out_dir: Path, samples: int) -> tuple[list[dict], list[dict], set, dict]:
    """Read generations and timings, drop what is unreadable or off the schema (records.py), keep
    the complete groups (rewriting the files when anything was dropped). Returns (records,
    timings, complete group keys, stats); stats counts "bad_lines" (unreadable) and "bad_records"
    (readable but off the schema)."""
    gpath, tpath = out_dir / GENERATIONS, out_dir / TIMINGS
    recs, bad = read_jsonl(gpath)
    valid, bad_recs = split_valid(recs, GENERATION_SCHEMA)
    seen, unique = set(), []
    for r in valid:
        k = _gen_key(r)
        if k in seen or not k[3] < samples:
            continue
        seen.add(k)
        unique.append(r)
    by_group: dict[tuple, set] = {}
    for r in unique:
        by_group.setdefault(_group_key(r), set()).add(r["sample"])
    complete = {g for g, s in by_group.items() if len(s) == samples}
    kept = [r for r in unique if _group_key(r) in complete]
    partial = len(by_group) - len(complete)
    if len(kept) != len(recs) or bad:
        write_atomic(gpath, "".join(_dumps(r) + "\n" for r in kept))
    tims, tbad = read_jsonl(tpath)
    tvalid, tbad_recs = split_valid(tims, TIMING_SCHEMA)
    last: dict[tuple, dict] = {}
    for t in tvalid:
        k = _group_key(t)
        if k in complete:
            last[k] = t                  # a group timed twice keeps its last timing
    tkept = list(last.values())
    if len(tkept) != len(tims) or tbad:
        write_atomic(tpath, "".join(_dumps(t) + "\n" for t in tkept))
    stats = {"records": len(kept), "groups": len(complete), "partial_groups_removed": partial,
             "records_removed": len(recs) - len(kept), "bad_lines": bad + tbad,
             "bad_records": bad_recs + tbad_recs}
    return kept, tkept, complete, stats


def _nll_of(judge, pairs: list[tuple[str, str]]) -> list[tuple[float, Optional[float], Optional[int]]]:
    """(ppl, summed NLL, tokens) per pair; a judge with only ppl_many gives (ppl, None, None)."""
    if hasattr(judge, "nll_many"):
        return [(math.exp(s / n) if n else float("nan"), s, n) for s, n in judge.nll_many(pairs)]
    return [(p, None, None) for p in judge.ppl_many(pairs)]


# ---- settings check ------------------------------------------------------------------------------
def _asdict(x) -> Any:
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return dataclasses.asdict(x)
    return x


def run_config(det, samples: int, n_predict: int, top_p: float, seed: int, labels: Sequence[str],
               judges: Mapping[str, Any], tox_judges: Sequence[str] = (), greedy: bool = False,
               chat: bool = False) -> dict:
    """Everything a saved record depends on (methods and prompts may be added on resume)."""
    info = det.model.info
    cfg = {
        "version": RUN_VERSION,
        "samples": samples, "n_predict": n_predict, "top_p": top_p, "seed": seed,
        "seed_stride": seed_stride(samples),
        "sampling": {"temp": 0.0 if greedy else 1.0, "top_k": 0, "min_p": 0.0},
        "labels": list(labels),
        "judges": {name: getattr(j, "name", type(j).__name__) for name, j in judges.items()},
        "model": {"name": det.model.meta("general.name") or "", "architecture": info.architecture,
                  "n_params": info.n_params, "n_layer": info.n_layer, "n_vocab": info.n_vocab},
        "steer": _asdict(det.settings.steer()),
        "fgdilp": _asdict(det.settings.fgdilp()),
    }
    if cfg["steer"].get("contrast") == "full":     # absent at the papers' contrast: runs written before
        del cfg["steer"]["contrast"]                 # --contrast existed resume
    if len(tox_judges) > 1:          # absent for one judge: runs written before judges existed resume
        cfg["tox_judges"] = list(tox_judges)
    if chat:                         # likewise absent for plain continuation
        cfg["chat"] = True
    vectors = getattr(det, "vectors_path", None)
    if vectors:                      # saved directions (method vectors): a run is tied to its file
        cfg["vectors_sha256"] = sha256_file(vectors)
    return json.loads(_dumps(cfg))


def check_config(out_dir: Path, cfg: dict) -> None:
    """Refuse a folder whose run.json holds other settings, or is corrupt (it is the only record of
    the settings its generations were made with: overwriting it would skip this check); write
    run.json when there is none."""
    path = out_dir / RUN
    if path.exists() or path.is_symlink():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as exc:   # JSON and Unicode errors are ValueErrors
            old, why = None, str(getattr(exc, "strerror", None) or exc).splitlines()[0][:120]
        else:
            why = "no \"config\" object in it"
        if not (isinstance(old, dict) and isinstance(old.get("config"), dict)):
            raise FgdilpError(f"{path} is corrupt ({why}); it records the settings of the generations in "
                              f"{out_dir}, so the run cannot be resumed safely: restore it, remove it to "
                              "accept this run's settings for the records there, or use another --out")
        if old["config"] != cfg:
            diff = sorted(k for k in set(old["config"]) | set(cfg) if old["config"].get(k) != cfg.get(k))
            raise FgdilpError(f"{out_dir} holds a run with other settings ({', '.join(diff)}); resume "
                              "with the same settings or use another --out")
        return
    # no run.json yet (a new folder, or records written before it existed): record these settings
    write_atomic(path, _dumps({"config": cfg}) + "\n")


# ---- signals --------------------------------------------------------------------------------------
class _StopOnSignal:
    """SIGINT/SIGTERM raise KeyboardInterrupt, except inside `critical()` blocks where they are held
    until the block ends (so a group's records and its timing are written together)."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._critical = False
        self._old: dict[int, Any] = {}

    def _handler(self, signum, frame):
        self.signum = signum
        if not self._critical:
            raise KeyboardInterrupt

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                try:
                    self._old[s] = signal.signal(s, self._handler)
                except (ValueError, OSError):
                    pass
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()

    def begin(self):
        self._critical = True

    def end(self):
        self._critical = False
        if self.signum is not None:
            raise KeyboardInterrupt


# ---- the run --------------------------------------------------------------------------------------
def _progress_bar(total: int, initial: int, enabled: bool):
    if not enabled or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc="eval", unit="group", file=sys.stderr,
                dynamic_ncols=True, smoothing=0.1)


def generate_group(det, prompt: str, method: str, samples: int, n_predict: int, top_p: float, base_seed: int,
                   point: Optional[Mapping[str, Any]] = None, greedy: bool = False, chat: bool = False):
    """All samples of one (prompt, method, sweep point), in chunks of at most det.max_samples;
    sample i uses base_seed + i; the point's settings are applied per call. chat: the prompt is a
    user message, formatted with the model's chat template (the reply is the continuation).
    Returns (samples, timing dict)."""
    text = prompt                      # what --condition reads: the prompt, not the template around it
    if chat:
        prompt = fit_chat(det, [{"role": "user", "content": prompt}], method=method).prompt
    per = max(1, min(samples, det.max_samples))
    out, tim = [], {"setup_s": 0.0, "prefill_s": 0.0, "decode_s": 0.0, "n_decode_steps": 0, "n_prompt_tokens": 0}
    t0 = time.perf_counter()
    for start in range(0, samples, per):
        k = min(per, samples - start)
        sp = eval_sampling(top_p, (base_seed + start) % 2**32, greedy)
        res = det.generate(prompt, n_samples=k, special=chat, condition_texts=[text], method=method, n_predict=n_predict, temp=sp.temp,
                           top_k=sp.top_k, top_p=sp.top_p, min_p=sp.min_p, seed=sp.seed, **dict(point or {}))
        out.extend(res.samples)
        tim["setup_s"] += res.setup_s
        tim["prefill_s"] += res.prefill_s
        tim["decode_s"] += res.decode_s
        tim["n_decode_steps"] += res.n_decode_steps
        tim["n_prompt_tokens"] = res.n_prompt_tokens
        if "condition" in res.explain:         # --condition: whether this prompt was steered
            tim["steered"] = bool(res.explain["condition"]["steered"])
    tim["gen_s"] = time.perf_counter() - t0
    return out, tim


def run_eval(det, records: Sequence, methods: Sequence[str], samples: int, n_predict: int, top_p: float,
             seed: int, out_dir, scorer, judges: Mapping[str, Any] | None = None, progress: bool = True,
             labels: Sequence[str] | None = None, tox_label: str = "toxic", threshold: float = 0.5,
             n_boot: int = 1000, write_files: bool = True, diagnoser_judge: Optional[str] = None,
             grid: Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Mapping[str, Any]]] = ({},),
             greedy: bool = False, ppl_budget: Optional[float] = 1.25,
             benign: bool = False, chat: bool = False, ablation: Optional[Mapping[str, Mapping[str, Any]]] = None) -> dict:
    """Run (or resume) an evaluation and write its report.

    det: a Detoxifier (its max_samples may be below `samples`: samples are then generated in
    chunks; make it with reuse_instances=True so that fgdilp and fgdilp-frozen share a prompt's
    setup). records: PromptRecord-like objects (.id, .text). scorer: any object with
    score(texts) -> [n, len(labels)] probabilities, or {judge name: such a scorer} (e.g.
    judges.load_judges("toxblock,tcc")): the first fills each record's "scores", the others its
    "judge_scores"; labels default to the first's LABELS, the others' to their own. judges: name ->
    PerplexityJudge (anything with ppl_many(pairs) -> list[float]). diagnoser_judge: the toxicity
    judge that also served as FGDILP's diagnoser, marked in the report.

    grid: the sweep points (sweep.make_grid; [{}] = the Detoxifier's settings only): every method
    runs at the projection of each point on the settings that change it (sweep.schedule), the loop
    prompt-major (prompt -> point -> method) so that FGDILP's per-prompt setup is reused across
    steering points; each record carries its "point". grid may also be {method: [points]} (each
    method at its own points, e.g. to confirm chosen settings). greedy: temperature 0 (use samples=1).
    ppl_budget: the report's fluency budget (corpus PPL ratio); benign: the prompts are benign.
    ablation: {method: its base point}: the report compares each of the method's other points
    with it (ablation.py; the grid holds the points, e.g. ablation.ablation_points).

    Returns {"report", "out_dir", "generated", "skipped", "remaining", "interrupted", "signal",
    "resume"}: interrupted is True when SIGINT/SIGTERM stopped the run (signal = its number); the
    report then covers what was written."""

    judges = dict(judges or {})
    tox_judges = judge_map(scorer)
    primary, scorer = next(iter(tox_judges.items()))
    labels = list(labels if labels is not None else scorer.LABELS)
    if tox_label not in labels:
        raise FgdilpError(f"the toxicity label {tox_label!r} is not one of the scorer's labels {labels}")
    extra_labels = {name: list(getattr(s, "LABELS", None) or labels)
                    for name, s in tox_judges.items() if name != primary}
    for name, labs in extra_labels.items():
        if tox_label not in labs:
            raise FgdilpError(f"the toxicity label {tox_label!r} is not one of {name}'s labels {labs}")
    # a method's former name (methods.canonical) runs, and is reported, under its name now
    methods = list(dict.fromkeys(registry.canonical(m) for m in methods))
    if isinstance(grid, Mapping):
        grid = {registry.canonical(m): points for m, points in grid.items()}
    if ablation:
        ablation = {registry.canonical(m): base for m, base in ablation.items()}
    if not methods:
        raise FgdilpError("no methods to evaluate")
    if samples < 1 or n_predict < 1:
        raise FgdilpError("samples and n_predict must be at least 1")
    ids = [r.id for r in records]
    if len(set(ids)) != len(ids):
        raise FgdilpError("prompt ids must be unique")
    for r in records:        # refused before out_dir holds anything (a run.json of a run that cannot start)
        if not isinstance(r.text, str):
            raise FgdilpError(f"prompt {r.id} is not text: {type(r.text).__name__}")
        try:
            r.text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise FgdilpError(f"prompt {r.id} holds a lone surrogate {r.text[exc.start]!r} at character "
                              f"{exc.start}, which is not text") from None
    eval_sampling(top_p, seed)           # refuses a bad top-p or seed before anything is written
    check_grid(det.settings, [p for p, _ in per_method(methods, grid)], det.model.info.n_layer)
    if ppl_budget is not None and not (math.isfinite(ppl_budget) and ppl_budget > 0):
        raise FgdilpError(f"the PPL budget must be a positive ratio, not {ppl_budget}")
    plan = schedule(methods, grid)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    # one run per folder: a second one appending to the same files would lose records when either
    # rewrites them (load_state); the lock is held until the report is written
    with FolderLock(out, what="another eval run"):
        # the settings are checked before anything in out_dir is rewritten
        check_config(out, run_config(det, samples, n_predict, top_p, seed, labels, judges, list(tox_judges), greedy,
                                     chat))
        kept, _, done, resume = load_state(out, samples)
        if resume["bad_lines"] or resume["bad_records"]:
            print(f"(resume: dropped {resume['bad_records']} records that do not follow the schema and "
                  f"{resume['bad_lines']} unreadable lines from {out}; their groups are generated again)",
                  file=sys.stderr)
        saved = {int(r["prompt_id"]): r.get("prompt") for r in kept}
        for r in records:
            if int(r.id) in saved and saved[int(r.id)] != r.text:
                raise FgdilpError(f"prompt {r.id} differs from the one saved in {out / GENERATIONS}; resume "
                                  "with the same prompt file, limit and offset, or use another --out")
        todo = [(r, m, proj) for r in records for _, m, proj in plan if (int(r.id), m, point_key(proj)) not in done]
        skipped = len(records) * len(plan) - len(todo)
        bar = _progress_bar(len(records) * len(plan), skipped, progress)
        generated, interrupted = 0, False
        stop = _StopOnSignal()
        gpath, tpath = out / GENERATIONS, out / TIMINGS
        try:
            with stop, open(gpath, "ab") as gf, open(tpath, "ab") as tf:
                for rec, method, point in todo:
                    pid = int(rec.id)
                    base = sample_seed(seed, pid, 0, samples)
                    if bar is not None:
                        bar.set_postfix_str(f"prompt {pid} {variant_name(method, point)}", refresh=False)
                    outs, tim = generate_group(det, rec.text, method, samples, n_predict, top_p, base, point, greedy,
                                                   chat)
                    texts = [s.text for s in outs]
                    t0 = time.perf_counter()
                    scores = score_checked(primary, scorer, texts, labels)
                    extra = {name: score_checked(name, tox_judges[name], texts, labs)
                             for name, labs in extra_labels.items()}
                    t1 = time.perf_counter()
                    nll = {name: _nll_of(j, [(rec.text, t) for t in texts]) for name, j in judges.items()}
                    t2 = time.perf_counter()
                    lines = []
                    for i, s in enumerate(outs):
                        line = {"prompt_id": pid, "prompt": rec.text, "method": method, "sample": i,
                                "seed": (base + i) % 2**32, "text": s.text,
                                "scores": {lab: _finite(scores[i, k]) for k, lab in enumerate(labels)},
                                "ppl": {name: _finite(v[i][0]) for name, v in nll.items()},
                                "n_tokens": len(s.tokens), "stop_reason": s.stop_reason,
                                "point": normalize(point), "tokens": list(s.tokens)}
                        have_nll = {name: v[i][1:] for name, v in nll.items() if v[i][1] is not None}
                        if have_nll:
                            line["nll"] = {name: [_finite(a), int(b)] for name, (a, b) in have_nll.items()}
                        if extra:
                            line["judge_scores"] = {name: {lab: _finite(p[i, k]) for k, lab in
                                                           enumerate(extra_labels[name])}
                                                    for name, p in extra.items()}
                        lines.append(_dumps(line) + "\n")
                    timing = {"prompt_id": pid, "method": method, "point": normalize(point), "n_samples": samples,
                              "n_tokens": sum(len(s.tokens) for s in outs), **tim,
                              "score_s": t1 - t0, "ppl_s": t2 - t1}
                    stop.begin()             # a signal now waits until both files have the group
                    try:
                        gf.write("".join(lines).encode("utf-8"))
                        gf.flush()
                        os.fsync(gf.fileno())
                        tf.write((_dumps(timing) + "\n").encode("utf-8"))
                        tf.flush()
                        os.fsync(tf.fileno())
                        generated += 1
                        if bar is not None:
                            bar.update(1)
                    finally:
                        stop.end()
        except KeyboardInterrupt:
            interrupted = True
        finally:
            if bar is not None:
                bar.close()

        all_recs, _ = read_valid(gpath, GENERATION_SCHEMA)      # never a record the report cannot use
        all_tims, _ = read_valid(tpath, TIMING_SCHEMA)
        in_file = list(dict.fromkeys(str(r.get("method")) for r in all_recs))
        order = [m for m in methods if m in in_file] + [m for m in in_file if m not in methods]
        report = build_report(all_recs, all_tims, labels, order, tox_label=tox_label, threshold=threshold,
                              n_boot=n_boot, seed=0, primary_judge=primary, diagnoser_judge=diagnoser_judge,
                              ppl_budget=ppl_budget, benign=benign,
                              ablation=dict(ablation) if ablation else None)
        report["run"] = {"samples": samples, "n_predict": n_predict, "top_p": top_p, "seed": seed, "greedy": greedy,
                         "complete": not interrupted and generated == len(todo),
                         "bad_records": resume["bad_records"], "bad_lines": resume["bad_lines"]}
        if write_files:
            write_report(report, out)
        return {"report": report, "out_dir": str(out), "generated": generated, "skipped": skipped,
                "remaining": len(todo) - generated, "interrupted": interrupted, "signal": stop.signum,
                "resume": resume}
