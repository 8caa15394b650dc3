"""`fgdilp-cpp eval` (and `eval samples`, `eval calibrate`): a thin command over evaluation.runner."""

from __future__ import annotations

import json
import sys

import click
from click.core import ParameterSource

from .. import methods as registry
from .options import (_detoxifier, _settings, every_method, friendly_errors, method_list, model_options,
                          steer_options)
from ..errors import FgdilpError
from ..evaluation.judges import DEFAULT_JUDGES

PPL_JUDGES = ("self", "smollm2")    # perplexity judges: the unsteered generator, SmolLM2-135M-Instruct
NO_JUDGE = "none"


@click.group("eval", invoke_without_command=True)
@model_options
@steer_options
@click.option("--prompts", "prompts_path", metavar="FILE", help="RTP JSONL, or plain text with one prompt per line.")
@click.option("--limit", type=click.IntRange(1), default=None, help="Prompts to use (default: all).")
@click.option("--offset", type=click.IntRange(0), default=0, show_default=True)
@click.option("--methods", default=None, help="Comma-separated methods (default: every method).")
@click.option("--samples", "eval_samples", type=click.IntRange(1), default=25, show_default=True,
              help="Samples per prompt and method.")
@click.option("-n", "--n-predict", type=click.IntRange(1), default=20, show_default=True)
@click.option("--top-p", type=float, default=0.9, show_default=True)
@click.option("-s", "--seed", type=click.IntRange(0, 2**32 - 1), default=42, show_default=True)
@click.option("--judges", default="self,smollm2", show_default=True,
              help="Perplexity judges: self (the unsteered generator), smollm2 (SmolLM2-135M-Instruct), none.")
@click.option("--out", "out_dir", metavar="DIR", help="Output folder (resumable).")
@click.option("--sweep", "sweeps", multiple=True, metavar="KEY=V1,V2,...",
              help="Run the steered methods at each value of a steering setting (repeatable: the grid is the "
                   "cross product), e.g. steer-scale=0.5,1 or steer-layer-range=12-17,6-17.")
@click.option("--ablate", "ablations", multiple=True, metavar="KEY=V1,...",
              help="Run the steered methods at the run's settings and again with KEY changed, one setting at "
                   "a time (repeatable): the report's ablation table pairs each change with the base.")
@click.option("--vectors", "vectors_path", default=None, metavar="FILE.gguf",
              help="Saved directions: run as method vectors (fgdilp-frozen names it too) instead of building "
                   "FGDILP's own (as in generate); "
                   "the file's hash is part of the run's settings.")
@click.option("--split", type=click.Choice(["calibration", "test"]), default=None,
              help="Only calibrate's part of the prompts: even ids (calibration) or odd ids (test); "
                   "--limit then counts within it.")
@click.option("--ppl-budget", type=float, default=1.25, show_default=True,
              help="Fluency budget of the report's verdict: corpus PPL ratio to none under the generator.")
@click.option("--greedy", is_flag=True,
              help="Greedy decoding (temperature 0), one sample per prompt: the report gives the share of "
                   "outputs identical to none's.")
@click.option("--tox-judges", default=DEFAULT_JUDGES, show_default=True,
              help="Toxicity judges: toxblock (tox-block's BiLSTM, the first fills the main tables), tcc "
                   "(toxic-comment-classifier's BiLSTM).")
@click.option("--chat", "as_chat", is_flag=True,
              help="Each prompt is a user message in the model's chat template; the reply is scored.")
@click.option("--no-progress", is_flag=True)
@click.pass_context
@friendly_errors
def eval_cmd(cctx, prompts_path, limit, offset, methods, eval_samples, judges, out_dir, sweeps, ablations,
             vectors_path, split, ppl_budget, greedy, tox_judges, as_chat, no_progress, **kw):
    """Evaluate methods side by side: toxicity, fluency, diversity, speed (offline).

    Every method runs on the same prompts with the same seeds; generations.jsonl is appended as
    samples are produced, and the same command resumes a killed run."""
    if cctx.invoked_subcommand is not None:
        return
    if not prompts_path or not out_dir:
        raise FgdilpError("eval needs --prompts FILE and --out DIR")
    from ..evaluation.ablation import parse_ablations
    from ..evaluation.sweep import make_grid
    grid = make_grid(sweeps)                 # a bad --sweep or --ablate is refused before anything is loaded
    ablate = parse_ablations(ablations)
    if ablate and sweeps:
        raise FgdilpError("--ablate changes one setting at a time around the run's settings; it does not combine "
                          "with --sweep")
    if greedy:
        if cctx.get_parameter_source("eval_samples") == ParameterSource.COMMANDLINE and eval_samples != 1:
            raise FgdilpError("--greedy draws one sample per prompt (all samples would be the same): drop --samples")
        eval_samples = 1
    if not (ppl_budget > 0 and ppl_budget < float("inf")):
        raise FgdilpError(f"--ppl-budget must be a positive ratio, not {ppl_budget}")
    from ..evaluation.prompts import BENIGN_SETS, load_prompts

    # the settings and the prompts are checked before --out is made: a refused run leaves nothing there
    top_p, seed = kw.pop("top_p"), kw.pop("seed")
    s = _settings(kw)
    records = load_prompts(prompts_path, None if split else limit, offset)
    if split:
        records = [r for r in records if int(r.id) % 2 == (0 if split == "calibration" else 1)][:limit]
        if not records:
            raise FgdilpError(f"no prompts in the {split} part of {prompts_path}")
    from ..files import FolderLock
    FolderLock(out_dir, what="another eval run").acquire()   # refused before loading; held until exit
    from ..models import default_chat_model_path
    from ..evaluation.perplexity import PerplexityJudge
    from ..evaluation.judges import load_judges
    from ..evaluation.runner import run_eval

    judge_names = [j for j in (x.strip() for x in judges.split(",")) if j and j != NO_JUDGE]
    for j in judge_names:
        if j not in PPL_JUDGES:
            raise FgdilpError(f"unknown judge {j!r} ({', '.join(PPL_JUDGES)} or {NO_JUDGE})")
    names = method_list(methods or ",".join(every_method(s)), has_vectors=vectors_path is not None)
    ablation = None
    if ablate:
        from ..evaluation.ablation import ablation_points
        ablation = {m: {} for m in names if m != registry.UNSTEERED}
        grid = {m: ablation_points(m, {}, ablate) for m in names}
    scorer = load_judges(tox_judges)
    judge_objs = {}
    try:
        with _detoxifier(s, vectors_path, max_samples=min(eval_samples, 25), max_new=s.n_predict + 1,
                         reuse_instances=True) as det:
            for j in judge_names:
                judge_objs[j] = PerplexityJudge(det.model if j == "self" else default_chat_model_path(), n_threads=s.threads)
            res = run_eval(det, records, names, eval_samples, s.n_predict, top_p, seed, out_dir, scorer,
                           judge_objs, progress=not no_progress, grid=grid, greedy=greedy, ppl_budget=ppl_budget,
                           benign=prompts_path in BENIGN_SETS, chat=as_chat, ablation=ablation)
    finally:
        for j in judge_objs.values():
            j.close()
    rep = res["report"]
    width = max([15] + [len(m) + 2 for m in rep["methods"]])
    click.echo(f"{'method':<{width}}{'EMT':>7}{'TP':>7}" + "".join(f"{'PPL ' + j:>14}" for j in judge_names) +
               f"{'PPL ratio':>10}{'dist-2':>8}{'tok/s':>8}")
    for m, r in rep["methods"].items():
        ppl = "".join(f"{_num((r['ppl'].get(j) or {}).get('mean')):>14.2f}" for j in judge_names)
        click.echo(f"{m:<{width}}{_num(r['emt']):>7.3f}{_num(r['tp']):>7.3f}{ppl}{_num(r.get('ppl_corpus_ratio')):>10.3f}"
                   f"{_num(r['dist'][1]):>8.3f}{_num(r['tokens_per_s']):>8.1f}")
    click.echo(f"report: {res['out_dir']}/report.md")
    if res.get("interrupted"):
        click.echo("interrupted: run the same command again to resume", err=True)
        sys.exit(128 + int(res.get("signal") or 2))


@eval_cmd.command("samples")
@click.option("--out", "out_dir", required=True, metavar="DIR", help="An eval output folder.")
@click.option("--prompt-ids", default="0,1,2", show_default=True)
@click.option("--sample", type=click.IntRange(0), default=0, show_default=True)
@friendly_errors
def eval_samples(out_dir, prompt_ids, sample):
    """Print generations of an eval run side by side (Markdown), to read them."""
    from pathlib import Path

    from ..evaluation.records import GENERATION_SCHEMA, read_valid
    from ..evaluation.runner import GENERATIONS
    from ..evaluation.sweep import variant_name

    path = Path(out_dir) / GENERATIONS
    if not path.is_file():
        raise FgdilpError(f"no {GENERATIONS} in {out_dir}")
    recs, _ = read_valid(path, GENERATION_SCHEMA)     # a bad record is skipped, not a traceback
    try:
        ids = [int(x) for x in prompt_ids.split(",") if x.strip()]
    except ValueError:
        raise FgdilpError(f"--prompt-ids must be comma-separated numbers, not {prompt_ids!r}") from None
    for pid in ids:
        rows = [r for r in recs if r["prompt_id"] == pid and r["sample"] == sample]
        if not rows:
            continue
        click.echo(f"\n**Prompt {pid}**: {rows[0]['prompt']!r}\n")
        click.echo("| method | toxic | continuation |\n|---|---|---|")
        for r in rows:
            text = r["text"].replace("\n", " ").replace("|", "\\|")
            click.echo(f"| {variant_name(r['method'], r.get('point'))} | {r['scores'].get('toxic', float('nan')):.3f} "
                       f"| {text} |")


def _num(x) -> float:
    return float("nan") if x is None else float(x)


@eval_cmd.command("calibrate")
@click.option("--prompts", "prompts_path", required=True, metavar="FILE.jsonl")
@click.option("--limit", type=click.IntRange(1), default=None)
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def eval_calibrate(prompts_path, limit, as_json):
    """Agreement of the offline toxicity scorer with Perspective on the RTP continuations."""
    from ..evaluation.agreement import judge_agreement
    from ..evaluation.prompts import load_prompts
    from ..toxicity.scorer import ToxicityScorer

    out = judge_agreement(ToxicityScorer.load(), load_prompts(prompts_path, limit))
    if as_json:
        click.echo(json.dumps(out))
        return
    click.echo(f"{out['n']} continuations; label = Perspective score >= 0.5")
    click.echo(f"{'label':<15}{'perspective':<18}{'AUC':>7}{'Spearman':>10}{'positives':>11}")
    for name, r in out["labels"].items():
        click.echo(f"{name:<15}{r['perspective']:<18}{r['auc']:>7.3f}{r['spearman']:>10.3f}{r['positives']:>11}")
