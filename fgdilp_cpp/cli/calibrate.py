"""`fgdilp-cpp calibrate [MODEL]`: a thin command over evaluation.calibrate."""

from __future__ import annotations

import json
import sys

import click

from .. import methods as registry
from .options import _settings, every_method, friendly_errors, method_list, model_options, sources
from ..errors import FgdilpError


@click.command()
@click.argument("model_arg", required=False, metavar="[MODEL]")
@model_options
@click.option("--prompts", "prompts_path", default="rtp-toxic", show_default=True, metavar="NAME|FILE",
              help="Toxic prompts: even ids calibrate, odd ids confirm.")
@click.option("--benign", "benign_path", default="rtp-benign", show_default=True, metavar="NAME|FILE",
              help="Benign prompts for the benign fluency budget (greedy).")
@click.option("--methods", default=None, help="Comma-separated methods (default: every method).")
@click.option("--sweep", "sweeps", multiple=True, metavar="KEY=V1,V2,...",
              help="Replace or add a grid axis (default: steer-scale 0.25,0.5,1 x two late layer ranges: the last third and sixth).")
@click.option("--quick", is_flag=True, help="A small grid on few prompts (about 5 minutes for gemma-3-270m).")
@click.option("--fast", is_flag=True,
              help="The fast setup instead: universal directions from labelled text and a layer range and strength "
                   "chosen by teacher-forced scores, no sampling (what a model without a profile gets on first "
                   "use; docs/method.md §7.7). Takes -o, --chat, -t; the grid options do not apply.")
@click.option("--cal-prompts", type=click.IntRange(2), default=None, help="Calibration prompts (default 24; quick 8).")
@click.option("--test-prompts", type=click.IntRange(2), default=None, help="Confirmation prompts (default 32; quick 12).")
@click.option("--benign-prompts", type=click.IntRange(2), default=None, help="Benign prompts (default 12; quick 8).")
@click.option("--samples", "cal_samples", type=click.IntRange(1), default=None, help="Samples per prompt (default 2).")
@click.option("--test-samples", type=click.IntRange(1), default=None,
              help="Samples per confirmation prompt (default: --samples).")
@click.option("-n", "--n-predict", type=click.IntRange(1), default=None, help="Tokens per sample (default 16).")
@click.option("--ppl-budget", type=click.FloatRange(1.0, min_open=False), default=1.25, show_default=True,
              help="Fluency budget: corpus perplexity (generator judge) at most this times unsteered.")
@click.option("--benign-budget", type=click.FloatRange(1.0), default=1.05, show_default=True,
              help="Benign budget: corpus perplexity on benign prompts at most this times unsteered.")
@click.option("--out", "out_dir", default=None, metavar="DIR",
              help="Working folder (resumable; default: calibration/<model fingerprint> in the user cache).")
@click.option("-o", "--profile-out", default=None, metavar="FILE.json",
              help="Write the profile here instead of the user's profile folder.")
@click.option("--tox-judges", default="toxblock,tcc", show_default=True,
              help="Toxicity judges (the first also diagnoses FGDILP's samples when the scorer is the diagnoser).")
@click.option("--chat", "as_chat", is_flag=True,
              help="Prompts as user messages in the model's chat template (chat models).")
@click.option("--ablate", "ablations", multiple=True, metavar="KEY=V1,...",
              help="After the confirmation, run each chosen point again on the test part with KEY changed "
                   "(one setting at a time; e.g. --ablate edit=rotate --ablate diagnoser=self).")
@click.option("--ablate-methods", default=None, help="Methods whose chosen points are ablated (default: every detoxifier).")
@click.option("--merge", "merge", is_flag=True,
              help="Merge into the profile already at the output path (e.g. a calibration of other levers): "
                   "per method the better confirmed entry, the recommendation made again.")
@click.option("--no-progress", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def calibrate(model_arg, prompts_path, benign_path, methods, sweeps, quick, fast, cal_prompts, test_prompts,
              benign_prompts, cal_samples, test_samples, n_predict, ppl_budget, benign_budget, out_dir, profile_out,
              tox_judges, as_chat, ablations, ablate_methods, merge, no_progress, as_json, **kw):
    """Measure per method the steering setting with the least toxicity within the fluency budgets,
    confirm it on held-apart prompts, and write MODEL's profile (applied from then on)."""
    import dataclasses
    import os
    from pathlib import Path

    from ..api import Detoxifier
    from ..evaluation.ablation import parse_ablations
    from ..evaluation.calibrate import CalibrationSizes, calibrate as run_calibration, default_profile_path
    from ..evaluation.judges import load_judges
    from ..evaluation.perplexity import PerplexityJudge
    from ..evaluation.sweep import parse_sweep

    if model_arg:
        if kw.get("model"):
            raise FgdilpError("give the model once: as MODEL or with -m")
        kw["model"] = model_arg
        click.get_current_context().set_parameter_source("model", click.core.ParameterSource.COMMANDLINE)
    if fast:
        return _fast(kw, profile_out, as_chat, no_progress, as_json)
    axes = dict(parse_sweep(spec) for spec in sweeps)
    ablate = parse_ablations(ablations)
    ablated = method_list(ablate_methods) if ablate_methods else None
    if ablated and not ablate:
        raise FgdilpError("--ablate-methods needs --ablate KEY=V")
    sizes = CalibrationSizes.quick() if quick else CalibrationSizes()
    over = {k: v for k, v in (("cal_prompts", cal_prompts), ("test_prompts", test_prompts),
                              ("benign_prompts", benign_prompts), ("samples", cal_samples),
                              ("test_samples", test_samples), ("n_predict", n_predict)) if v is not None}
    sizes = dataclasses.replace(sizes, **over)
    s = _settings(kw)
    names = method_list(methods or ",".join(m for m in every_method(s) if m != registry.UNSTEERED))
    with Detoxifier(s, sources=sources(), profile=False, max_new=sizes.n_predict + 1,
                    max_samples=max(sizes.samples, sizes.test_samples or 0),
                    reuse_instances=True) as det:
        if out_dir is None:
            cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
            out_dir = str(Path(cache) / "fgdilp-cpp" / "calibration" / default_profile_path(det).stem)
        click.echo(f"calibrating {det.name} in {out_dir} (resumable: run the same command again)", err=True)
        click.echo(f"calibrate: loading the toxicity judges ({tox_judges}) and the perplexity judge ...", err=True)
        with PerplexityJudge(det.model, n_threads=s.threads) as judge:
            tox = load_judges(tox_judges)
            result = run_calibration(det, out_dir, tox, {"self": judge}, names, prompts_path,
                                     benign_path, sizes, axes or None, ppl_budget, benign_budget,
                                     progress=not no_progress, chat=as_chat, ablate=ablate,
                                     ablate_methods=ablated)
        if result.interrupted:
            click.echo("interrupted: run the same command again to resume", err=True)
            sys.exit(130)
        target = Path(profile_out or default_profile_path(det))
        profile = result.profile
        if merge and target.exists():
            from ..evaluation.calibrate import merge_profiles
            from ..profiles import Profile

            profile = result.profile = merge_profiles(Profile.load(target), profile)
        path = profile.save(target)
    if as_json:
        click.echo(json.dumps({"profile": str(path), **result.profile.to_json()}))
        return
    _print_table(result, str(path))


def _print_table(result, path: str) -> None:
    prof = result.profile
    settings = {m: " ".join(f"{k}={_v(v)}" for k, v in (b.get("point") or {}).items()) for m, b in result.best.items()}
    wm = max([len("method")] + [len(m) for m in result.best]) + 2           # columns fit their longest cell
    ws = max([len("setting"), 25] + [len(x) for x in settings.values()]) + 2
    click.echo(f"{'method':<{wm}}{'setting':<{ws}}{'cal EMT Δ':>10}{'PPL x':>7}{'benign x':>9}{'test EMT Δ':>11}"
               f"{'TP Δ':>7}{'PPL x':>7}")
    for m, b in result.best.items():
        if b.get("point") is None:
            click.echo(f"{m:<{wm}}{'(none within the budgets)':<{ws}}  {b.get('reason') or ''}")
            continue
        t = result.confirmed.get(m, {})
        setting = settings[m]
        click.echo(f"{m:<{wm}}{setting:<{ws}}{_d(b.get('emt_delta')):>10}{_r(b.get('ppl_ratio')):>7}"
                   f"{_r(b.get('benign_ppl_ratio')):>9}{_d(t.get('emt_delta')):>11}{_d(t.get('tp_delta')):>7}"
                   f"{_r(t.get('ppl_ratio')):>7}")
    d = prof.diagnosis
    if d:
        click.echo(f"toxicity AUC vs Perspective: self-diagnosis {_r(d.get('self_auc'))}, scorer {_r(d.get('scorer_auc'))}")
    click.echo(f"recommended method: {prof.method or '(none)'}; profile written to {path}")


def _v(v) -> str:
    return "-".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)


def _d(x) -> str:
    """A difference to unsteered."""
    return "-" if x is None else f"{x:+.3f}"


def _r(x) -> str:
    """A ratio or an AUC."""
    return "-" if x is None else f"{x:.3f}"


def _fast(kw: dict, profile_out, as_chat: bool, no_progress: bool, as_json: bool) -> None:
    """calibrate --fast: the fast setup, installed as the model's profile (or written to -o)."""
    from pathlib import Path

    from ..api import Detoxifier
    from ..autosetup.setup import fast_setup
    from .options import SetupBar

    s = _settings(kw)
    with Detoxifier(s, sources=sources(), profile=False, auto_setup=False) as det:
        click.echo(f"fast setup of {det.name} ...", err=True)
        result = fast_setup(det, None if no_progress else SetupBar(), chat=True if as_chat else None,
                            made_by="fgdilp-cpp calibrate --fast" + (" --chat" if as_chat else ""))
    ppath, vpath = result.install(Path(profile_out) if profile_out else None)
    if as_json:
        click.echo(json.dumps({"profile": str(ppath), "universal": str(vpath), **result.profile.setup}))
        return
    click.echo(result.summary(), err=True)
    click.echo(f"profile written to {ppath} (directions: {vpath.name})")
