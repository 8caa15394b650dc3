"""`eval rescore`, `eval paired`, `eval specificity`: finished eval runs read again and compared
(evaluation/compare_runs.py); nothing is generated."""

from __future__ import annotations

import json

import click

from .eval import eval_cmd
from .options import friendly_errors
from ..errors import FgdilpError


def _ci(d) -> str:
    return "-" if not d else f"{d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}]"


@eval_cmd.command("rescore")
@click.argument("runs", nargs=-1, required=True, metavar="RUN[@TAG]...")
@click.option("--judge", default="tcc", show_default=True, help="The judge that scores: tcc or toxblock.")
@click.option("--base", default="none", show_default=True, help="The variant the differences are paired with.")
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def eval_rescore(runs, judge, base, as_json):
    """Score finished runs' generations with a judge (e.g. one that did not diagnose): EMT and TP per
    variant, and the paired-bootstrap difference to --base (95 %, over prompts).

    Several runs on the same prompts and seeds are read as one (a variant met twice keeps its first
    run's records); RUN@TAG names that run's variants TAG:variant."""
    from ..evaluation.compare_runs import rescore
    from ..evaluation.judges import load_judge

    res = rescore(list(runs), load_judge(judge), base=base)
    if as_json:
        click.echo(json.dumps(res))
        return
    click.echo(f"judge {res['judge']} ({res['label']} > {res['threshold']}); differences to {res['base']}")
    click.echo(f"{'variant':<70}{'EMT':>7}{'Δ EMT [95 % CI]':>26}{'TP':>7}{'Δ TP [95 % CI]':>26}")
    for name, r in res["variants"].items():
        click.echo(f"{name:<70}{r['emt']:>7.3f}{_ci(r.get('emt_delta')):>26}{r['tp']:>7.3f}"
                   f"{_ci(r.get('tp_delta')):>26}")


@eval_cmd.command("paired")
@click.argument("run_a", metavar="RUN_A")
@click.argument("run_b", metavar="RUN_B")
@click.option("--method", default="universal", show_default=True, help="The method both runs steered with.")
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def eval_paired(run_a, run_b, method, as_json):
    """One method in two runs on the same prompts and seeds (e.g. directions lent by another
    quantisation vs rebuilt): per judge, EMT of RUN_A's none, A and B, and B - A with its 95 %
    paired-bootstrap interval over prompts."""
    from ..evaluation.compare_runs import paired

    res = paired(run_a, run_b, method)
    if as_json:
        click.echo(json.dumps(res))
        return
    for judge, r in res["judges"].items():
        click.echo(f"{judge}: {r['n_prompts']} prompts; EMT none {r['emt_none']:.3f}  A {r['emt_a']:.3f}  "
                   f"B {r['emt_b']:.3f}  B - A {_ci(r['b_minus_a'])}")


def _deltas(text):
    if text is None:
        return (None, None)
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 2:
        raise FgdilpError(f"--calibrated-delta must be two numbers TB,TCC (e.g. -0.18,-0.19), not {text!r}")
    return values


@eval_cmd.command("specificity")
@click.option("--steered", required=True, metavar="RUN[:METHOD]",
              help="The steered run (its none is the baseline); METHOD when it has several.")
@click.option("--random", "random_run", required=True, metavar="RUN[:METHOD]",
              help="The random control: a direction of the same norms at the same point.")
@click.option("--calibrated-delta", default=None, metavar="TB,TCC",
              help="A reference EMT change per judge (e.g. the calibrated profile's), to give the share reached.")
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def eval_specificity(steered, random_run, calibrated_delta, as_json):
    """A steered run against its random control: per judge, on all prompts and on the most toxic
    (unsteered EMT >= 0.5), each one's EMT cut with its 95 % interval and the specificity (the
    share of the cut the random push does not also make); corpus perplexity ratios (self judge)."""
    from ..evaluation.compare_runs import specificity

    res = specificity(steered, random_run, _deltas(calibrated_delta))
    if as_json:
        click.echo(json.dumps(res, indent=1))
        return
    ppl = res["ppl_ratio_steered"]
    rnd = res["ppl_ratio_random"]
    click.echo(f"steered {res['steered']} ({res['method']}); random {res['random']}"
               + ("" if ppl is None else f"; corpus PPL x{ppl:.3f} (random x{rnd:.3f})"))
    for judge, parts in res["judges"].items():
        for part, row in parts.items():
            if row is None:
                continue
            share = row.get("share_of_calibrated_cut")
            spec = "-" if row["specificity"] is None else f"{row['specificity']:.2f}"
            click.echo(f"{judge:<26}{part:<11} n={row['n_prompts']:<4} none {row['emt_none']:.3f}  "
                       f"steered {row['emt_steered']:.3f} {_ci(row['delta_steered'])}  random {row['emt_random']:.3f} "
                       f"{_ci(row['delta_random'])}  specificity {spec}"
                       + (f"  {share:.0%} of the reference cut" if share is not None else ""))
