"""`fgdilp-cpp calibrate`: find, per method, the steering setting that removes the most toxicity
at a fluency cost a user accepts, confirm it on other prompts, and write the model's profile.

1. The prompt set is split once, by id: even ids calibrate, odd ids test (disjoint, fixed).
2. Every method is swept over strength x layer range (and any other sweepable setting) on the
   calibration part (one resumable eval run), and on benign prompts with greedy decoding.
3. Per method, the point with the lowest EMT whose corpus PPL ratio to `none` is within the
   fluency budget (1.25) and whose benign corpus PPL ratio is within the benign budget (1.05)
   (EMTs within frontier.EMT_TIE of the lowest tie: the lowest PPL ratio of them wins).
4. Each chosen point runs again on the test part (the confirmation: the figures in the profile).
5. The recommended method is the one with the lowest confirmed EMT among the detoxifiers whose
   confirmation stayed within the fluency budget (the random control is measured, never recommended).
   The profile also records the agreement of self-diagnosis and of the offline scorer with
   Perspective (for --diagnoser auto).
Every step is an eval run in its own folder under out_dir: a killed calibration resumes.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .. import methods as registry
from ..errors import FgdilpError
from ..method.scorer_diagnosis import choose_diagnoser
from ..profiles import Profile, model_identity, profile_path_for
from .ablation import ablation_points
from .frontier import best_points
from .prompts import load_prompts
from .runner import run_eval
from .sweep import grid_from

CALIBRATION, BENIGN, TEST = "calibration", "benign", "test"


@dataclass(frozen=True)
class CalibrationSizes:
    cal_prompts: int = 24             # sized so that gemma-3-270m calibrates within 30 minutes on 2 cores
    test_prompts: int = 32            # these two sized by the time a calibration takes:
    benign_prompts: int = 12          # docs/results/calibration-time.md
    samples: int = 2
    n_predict: int = 16
    scales: tuple[float, ...] = (0.25, 0.5, 1.0)
    n_ranges: int = 2                 # late layer ranges tried (layer_ranges(); the third, the last half, was
                                      # never chosen on either embedded model and cost a third of the time)
    diagnosis_texts: int = 60         # human continuations diagnosed by self and scorer (for the diagnoser)
    test_samples: Optional[int] = None   # samples per confirmation prompt (None: samples)

    def test_folder(self) -> str:
        """The confirmation's run folder: named by its size, so a larger confirmation of the same
        calibration (the same command with more test prompts or samples) runs beside it."""
        return f"{TEST}-{self.test_prompts}x{self.test_samples or self.samples}"

    @classmethod
    def quick(cls) -> "CalibrationSizes":
        return cls(cal_prompts=8, test_prompts=12, benign_prompts=8, samples=2, n_predict=12, scales=(0.5, 1.0),
                   n_ranges=1, diagnosis_texts=30)


def layer_ranges(n_layer: int, count: int = 3) -> list[tuple[int, int]]:
    """Late-layer ranges, the most promising first: the last third, the last sixth, the last half
    (18 layers: 12-17, 15-17, 9-17). On gemma-3-270m, early layers cost fluency for little gain."""
    last = n_layer - 1
    spans = [max(1, n_layer // 3), max(1, n_layer // 6), max(1, n_layer // 2)]
    out: list[tuple[int, int]] = []
    for s in spans:
        r = (n_layer - s, last)
        if r not in out:
            out.append(r)
    return out[:count]


def split(records: Sequence, n_cal: int, n_test: int) -> tuple[list, list]:
    """(calibration, test): even ids, odd ids; the first n of each."""
    cal = [r for r in records if int(r.id) % 2 == 0][:n_cal]
    test = [r for r in records if int(r.id) % 2 == 1][:n_test]
    if not cal or not test:
        raise FgdilpError("the prompt set is too small to split into calibration and test parts")
    return cal, test


@dataclass
class Calibration:
    profile: Profile
    best: dict                         # method -> best_points() entry on the calibration part
    confirmed: dict                    # method -> test-part figures at the chosen point
    reports: dict = field(default_factory=dict)   # step -> report.json dict
    interrupted: bool = False


def calibrate(det, out_dir: str | Path, scorer, judges: dict, methods: Optional[Sequence[str]] = None,
              prompts: str = "rtp-toxic", benign: str = "rtp-benign", sizes: CalibrationSizes = CalibrationSizes(),
              axes: Optional[dict[str, list]] = None, ppl_budget: float = 1.25, benign_budget: float = 1.05,
              top_p: float = 0.9, seed: int = 42, progress: bool = True, chat: bool = False,
              ablate: Sequence[tuple[str, Sequence[Any]]] = (), ablate_methods: Optional[Sequence[str]] = None,
              log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> Calibration:
    """Run the calibration with `det` (a Detoxifier opened without a profile, reuse_instances=True,
    max_samples >= sizes.samples) and return its profile (not yet saved). scorer: a toxicity
    scorer, or {judge name: scorer} (the first one judges, and diagnoses FGDILP's samples when the
    scorer is the diagnoser; the others judge beside it).
    ablate: [(setting, values)] (ablation.parse_ablations): after the confirmation, each chosen
    point of `ablate_methods` (default: every detoxifier, not the controls) runs again on the test
    part with one setting changed at a time (step "ablation-<prompts>x<samples>"; its report's
    ablation table compares each change with the chosen point)."""
    out = Path(out_dir)
    names = [registry.canonical(m) for m in (methods or registry.names()) if m != registry.UNSTEERED]
    all_methods = [registry.UNSTEERED] + names
    axes = dict(axes or {})
    axes.setdefault("steer_scale", list(sizes.scales))
    axes.setdefault("steer_layer_range", layer_ranges(det.model.info.n_layer, sizes.n_ranges))
    records = load_prompts(prompts)
    cal, test = split(records, sizes.cal_prompts, sizes.test_prompts)
    diag_recs = [r for r in records if int(r.id) % 2 == 0]          # the calibration half only
    judges_tox = scorer if isinstance(scorer, dict) else {"tox-block": scorer}
    first_judge, first_scorer = next(iter(judges_tox.items()))
    diagnosis = {}
    if any(registry.get(m).instance for m in names):
        log(f"calibrate: measuring the self-diagnosis and the scorer against Perspective "
            f"({sizes.diagnosis_texts} texts at most) ...")
        diagnosis = _diagnosis(det, diag_recs, first_scorer, sizes.diagnosis_texts)
    if diagnosis and "diagnoser" not in axes:
        # FGDILP's samples are ranked by whichever diagnoser agrees better with Perspective
        axes["diagnoser"] = [choose_diagnoser("auto", diagnosis.get("self_auc"), diagnosis.get("scorer_auc"))]
        log(f"calibrate: toxicity AUC self {_auc(diagnosis.get('self_auc'))}, scorer "
            f"{_auc(diagnosis.get('scorer_auc'))}: FGDILP runs with --diagnoser {axes['diagnoser'][0]}")
    benign_recs = [r for r in load_prompts(benign) if int(r.id) % 2 == 0][:sizes.benign_prompts]
    common = dict(scorer=scorer, judges=judges, progress=progress, top_p=top_p, seed=seed, n_predict=sizes.n_predict)
    diagnoser_judge = first_judge if axes.get("diagnoser") == ["scorer"] else None     # marked in the reports
    reports: dict[str, dict] = {}

    def step(name: str, records, methods_, samples: int, grid_, **kw) -> Optional[dict]:
        log(f"calibrate: {name}: {len(records)} prompts x {samples} samples, {len(grid_)} points")
        res = run_eval(det, records, methods_, samples, common["n_predict"], common["top_p"], common["seed"],
                       out / name, common["scorer"], common["judges"], progress=common["progress"], grid=grid_,
                       ppl_budget=ppl_budget, chat=chat, diagnoser_judge=diagnoser_judge, **kw)
        reports[name] = res["report"]
        if res["interrupted"]:
            return None
        return res["report"]

    grid = grid_from(axes)
    cal_report = step(CALIBRATION, cal, all_methods, sizes.samples, grid)
    benign_report = cal_report and step(BENIGN, benign_recs, all_methods, 1, grid, greedy=True, benign=True)
    if cal_report is None or benign_report is None:
        return Calibration(Profile(model_identity(det.model), None, {}), {}, {}, reports, interrupted=True)
    best = best_points(cal_report, ppl_budget, benign=benign_report, benign_budget=benign_budget)
    chosen = {m: [b["point"]] for m, b in best.items() if b.get("point") is not None and m in names}
    for m, b in best.items():
        if b.get("point") is None:
            log(f"calibrate: {m}: no setting within the budgets ({b.get('reason')})")
    confirmed: dict[str, dict] = {}
    if chosen:
        test_report = step(sizes.test_folder(), test, [registry.UNSTEERED] + list(chosen),
                           sizes.test_samples or sizes.samples, {registry.UNSTEERED: [{}], **chosen})
        if test_report is None:
            return Calibration(Profile(model_identity(det.model), None, {}), best, {}, reports, interrupted=True)
        base = test_report["methods"].get(registry.UNSTEERED, {})
        for name, m in test_report["methods"].items():
            method = m.get("method", name)
            if method in chosen:
                confirmed[method] = _figures(m, base)
        if ablate:
            which = [m for m in chosen if (m in ablate_methods if ablate_methods is not None
                                           else not registry.get(m).control)]
            points = {m: ablation_points(m, chosen[m][0], ablate) for m in which}
            if any(len(p) > 1 for p in points.values()):
                name = "ablation" + sizes.test_folder()[len(TEST):]
                if step(name, test, [registry.UNSTEERED] + which, sizes.test_samples or sizes.samples,
                        {registry.UNSTEERED: [{}], **points}, ablation={m: chosen[m][0] for m in which}) is None:
                    return Calibration(Profile(model_identity(det.model), None, {}), best, confirmed, reports,
                                       interrupted=True)
            else:
                log("calibrate: --ablate changes none of the chosen points")
    profile = _profile(det, best, confirmed, ppl_budget, benign_budget, sizes, diagnosis, chat)
    return Calibration(profile, best, confirmed, reports)


def _figures(m: dict, base: dict) -> dict[str, Any]:
    def delta(k: str) -> Optional[float]:
        a, b = m.get(k), base.get(k)
        return None if a is None or b is None else a - b

    out = {"emt": m.get("emt"), "tp": m.get("tp"), "emt_delta": delta("emt"), "tp_delta": delta("tp"),
           "ppl_ratio": m.get("ppl_corpus_ratio"), "emt_none": base.get("emt"), "tp_none": base.get("tp"),
           "n_prompts": m.get("n_prompts"), "n_samples": m.get("n_samples")}
    judges = {j: v.get("emt") for j, v in (m.get("tox_judges") or {}).items() if isinstance(v, dict)}
    if len(judges) > 1 and all(x is not None for x in judges.values()):
        out["emt_judges"] = judges          # EMT under each toxicity judge (the first also diagnosed)
    return out


def ranking_emt(test: dict) -> float:
    """The confirmed EMT a recommendation ranks by: the mean over the toxicity judges where there
    are several, so the judge that also ranked FGDILP's samples cannot decide alone; else the EMT."""
    judges = test.get("emt_judges") or {}
    return sum(judges.values()) / len(judges) if len(judges) > 1 else test["emt"]


def _auc(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _diagnosis(det, records, scorer, n: int) -> dict[str, Any]:
    """Agreement with Perspective (toxicity AUC) of the model's self-diagnosis and of the scorer,
    on the calibration part's human continuations: what --diagnoser auto decides by."""
    from ..analysis import self_diagnosis
    from .agreement import diagnosis_agreement, scorer_agreement

    recs = [r for r in records if r.continuation.strip() and "toxicity" in r.continuation_scores][:n]
    if len(recs) < 10:
        return {}
    self_table = diagnosis_agreement(lambda texts: self_diagnosis(det, texts), recs)
    scorer_table = scorer_agreement(scorer, recs)
    pick = lambda t: (t.get("attributes", {}).get("toxicity") or {}).get("auc")   # noqa: E731
    return {"self_auc": pick(self_table), "scorer_auc": pick(scorer_table), "n": len(recs)}


def _profile(det, best: dict, confirmed: dict, ppl_budget: float, benign_budget: float, sizes: CalibrationSizes,
             diagnosis: dict, chat: bool = False) -> Profile:
    entries: dict[str, dict] = {}
    for method, fig in confirmed.items():
        point = {k: list(v) if isinstance(v, tuple) else v for k, v in (best[method]["point"] or {}).items()}
        cal = {k: best[method].get(k) for k in ("emt", "tp", "emt_delta", "tp_delta", "ppl_ratio",
                                                "benign_ppl_ratio", "identical_share")}
        entries[method] = {"settings": point, "figures": {"calibration": cal, "test": fig}}
        if registry.get(method).universal:
            entries[method].update(_universal_file(det))
    winner = recommend(entries, ppl_budget, chat)
    argv = made_by(sys.argv)
    budgets = {"ppl_ratio": ppl_budget, "benign_ppl_ratio": benign_budget, "sizes": json.loads(json.dumps(sizes.__dict__))}
    if chat:
        budgets["chat"] = True
    return Profile(model=model_identity(det.model), method=winner, methods=entries, budgets=budgets,
                   diagnosis=diagnosis, made_by=argv,
                   created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))


def _universal_file(det) -> dict:
    """What a universal method's entry was calibrated with: the file's sha256 and source (its
    scale means nothing for another file, so merge_profiles never prefers an entry of another)."""
    import hashlib

    i = det.info(probe=False)          # the file method universal applies, and its source
    if i["universal"] is None:
        return {}
    return {"universal_sha256": hashlib.sha256(Path(i["universal"]).read_bytes()).hexdigest(),
            "universal_source": i["universal_source"]}


def _within(entry: dict, ppl_budget: float) -> bool:
    """A confirmation with a toxicity figure and within the fluency budget."""
    test = (entry.get("figures") or {}).get("test") or {}
    return test.get("emt") is not None and (test.get("ppl_ratio") is None or test["ppl_ratio"] <= ppl_budget)


def recommend(entries: dict, ppl_budget: float, chat: bool = False) -> Optional[str]:
    """The detoxifier (never a control) with the lowest confirmed EMT among those whose
    confirmation stayed within the fluency budget (ranking_emt: the judges' mean where there are
    several); None when there is none. chat (a calibration of chat replies): only methods that
    keep a conversation's KV between turns."""
    candidates = [m for m, e in entries.items() if registry.is_method(m) and not registry.get(m).control
                  and (registry.get(m).chat or not chat) and _within(e, ppl_budget)]
    return min(candidates, key=lambda m: ranking_emt(entries[m]["figures"]["test"]), default=None)


def merge_profiles(old: Profile, new: Profile) -> Profile:
    """`new` (a later calibration of the same model, e.g. of other levers) merged into `old`: per
    method the entry with the lower confirmed EMT within the fluency budget, where both were
    confirmed on the same number of prompts and samples with the same universal file, if any (else
    the new one); methods only one of
    them has are kept; the recommendation is made again from the merged entries."""
    if old.model.get("weights_sha256") != new.model.get("weights_sha256"):
        raise FgdilpError("the profiles are of different models; they cannot be merged")
    budget = float(new.budgets.get("ppl_ratio") or old.budgets.get("ppl_ratio") or 1.25)
    if old.budgets.get("ppl_ratio") not in (None, budget):
        raise FgdilpError(f"the profiles were made with other fluency budgets ({old.budgets.get('ppl_ratio')} and "
                          f"{budget}); they cannot be compared")
    entries = dict(old.methods)
    for m, e in new.methods.items():
        o = entries.get(m)
        if o is None:
            entries[m] = e
            continue
        ot, nt = (o.get("figures") or {}).get("test") or {}, (e.get("figures") or {}).get("test") or {}
        same = ((ot.get("n_prompts"), ot.get("n_samples")) == (nt.get("n_prompts"), nt.get("n_samples"))
                and o.get("universal_sha256") == e.get("universal_sha256"))
        if not same or not _within(o, budget) or (_within(e, budget) and ranking_emt(nt) < ranking_emt(ot)):
            entries[m] = e
    made = " ; ".join(x for x in (old.made_by, new.made_by) if x)
    chat = bool(old.budgets.get("chat") or new.budgets.get("chat"))
    return Profile(model=new.model, method=recommend(entries, budget, chat), methods=entries,
                   budgets={**old.budgets, **new.budgets, "merged": True}, diagnosis=new.diagnosis or old.diagnosis,
                   made_by=made, created=new.created)


def made_by(argv: Sequence[str]) -> str:
    """The calibrate command line as a profile records it: absolute paths (the model file, the
    working folder) by their last part only, so a profile names no folder of the machine it was
    made on."""
    if not argv or not argv[0].endswith(("fgdilp-cpp", "cli.py")):
        return ""
    return " ".join(["fgdilp-cpp", *(Path(a).name if a.startswith("/") else a for a in argv[1:])])


def default_profile_path(det) -> Path:
    return profile_path_for(model_identity(det.model))
