"""The fgdilp-cpp command line: parsing and printing only; the work is in the Python API."""

from __future__ import annotations

import functools
import json
import os
import sys
from typing import Callable

import click
from click.core import ParameterSource

from .errors import FgdilpError

DEFAULT_BENCH_PROMPT = "The ill-fated tale of Phoneys, the stupid"
ALL_METHODS = ("none", "prompt", "tr", "fgdilp", "fgdilp-frozen", "cvec", "random")


def _fail(message: str, code: int = 1) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def friendly_errors(fn: Callable) -> Callable:
    """One clear line on stderr and a non-zero exit for every failure; never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FgdilpError as exc:
            _fail(str(exc))
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except MemoryError:
            _fail("out of memory")
        except Exception as exc:  # noqa: BLE001 - a bug of ours: still one line, no traceback
            if os.environ.get("FGDILP_DEBUG"):
                raise
            _fail(f"internal error: {type(exc).__name__}: {exc} (set FGDILP_DEBUG=1 for a traceback)", 2)

    return wrapper


def _options(*opts) -> Callable:
    def deco(fn: Callable) -> Callable:
        for opt in reversed(opts):
            fn = opt(fn)
        return fn
    return deco


# Defaults come from Settings; a flag left out takes the config file's value, else the default.
model_options = _options(
    click.option("-m", "--model", "model", type=str, default=None, metavar="MODEL.gguf",
                 help="GGUF model file (default: the embedded gemma-3-270m)."),
    click.option("--config", type=str, default=None, metavar="FILE.toml",
                 help="Settings file; its keys are these long flag names. Precedence: flag > "
                      "FGDILP_<FLAG> environment variable > file > default."),
    click.option("-c", "--ctx-size", type=click.IntRange(16), default=2048, show_default=True,
                 help="Context tokens per sequence (prompt + generation)."),
    click.option("-t", "--threads", type=click.IntRange(0), default=0, help="CPU threads (0 = all cores)."),
    click.option("-ngl", "--n-gpu-layers", type=int, default=0, show_default=True,
                 help="Layers to offload to the GPU (GPU builds of llama-cpp-python)."),
    click.option("-b", "--batch-size", type=click.IntRange(8), default=512, show_default=True,
                 help="Rows per decode (prompt chunks)."),
    click.option("-ctk", "--cache-type-k", default="f16", show_default=True, help="K cache type (f32, f16, q8_0, ...)."),
    click.option("-ctv", "--cache-type-v", default="f16", show_default=True,
                 help="V cache type; steering needs f16, bf16 or f32."),
    click.option("-fa", "--flash-attn", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True),
    click.option("-v", "--verbose", is_flag=True, help="Show llama.cpp's log."),
)

sampling_options = _options(
    click.option("-s", "--seed", type=click.IntRange(0, 2**32 - 1), default=42, show_default=True),
    click.option("--temp", type=float, default=0.8, show_default=True),
    click.option("--top-k", type=int, default=40, show_default=True),
    click.option("--top-p", type=float, default=0.95, show_default=True),
    click.option("--min-p", type=float, default=0.05, show_default=True),
)

steer_options = _options(
    click.option("--steer-scale", type=float, default=1.0, show_default=True, help="Global strength of the edit."),
    click.option("--steer-layer-range", nargs=2, type=int, default=None, metavar="START END",
                 help="Steer only layers START..END (inclusive)."),
    click.option("--exp-norm", type=float, default=0.4, show_default=True,
                 help="Exponent a of lambda_norm = (1 + |delta|)^a."),
    click.option("--exp-sim", type=float, default=0.6, show_default=True,
                 help="Exponent b of lambda_sim = (1 + max(0, cos(v, e)))^b."),
    click.option("--renorm/--no-renorm", default=True, show_default=True,
                 help="Restore the row norm after the edit."),
    click.option("--selfgen-samples", type=int, default=25, show_default=True,
                 help="FGDILP: self-generated samples N."),
    click.option("--selfgen-tokens", type=int, default=20, show_default=True,
                 help="FGDILP: new tokens per self-generated sample."),
    click.option("--selfgen-min-tokens", type=int, default=5, show_default=True),
    click.option("--negatives", type=int, default=6, show_default=True, help="FGDILP: negative prefixes."),
    click.option("--mask-k", type=float, default=50.0, show_default=True,
                 help="FGDILP: top-K %% entries kept per sub-toxicity vector (100 = no masking)."),
    click.option("--fusion", type=click.Choice(["max", "mean", "sum"]), default="max", show_default=True),
    click.option("--sign-election/--no-sign-election", default=True, show_default=True),
    click.option("--pad-blank/--no-pad-blank", default=True, show_default=True,
                 help="FGDILP: pad missing negatives with template-only prefixes."),
)


def _settings(kw: dict, **defaults):
    """Settings from defaults, then the config file, then the flags given explicitly."""
    from .engine.context import set_verbose
    from .settings import Settings

    set_verbose(kw.pop("verbose", False))
    ctx = click.get_current_context()
    s = Settings().updated(defaults)
    if kw.get("config"):
        s = Settings.from_toml(kw["config"], s)
    s = s.updated(Settings.from_env(os.environ))
    names = Settings.field_names()
    given = {k: v for k, v in kw.items() if k in names and ctx.get_parameter_source(k) != ParameterSource.DEFAULT}
    if given.get("steer_layer_range") is not None:
        given["steer_layer_range"] = tuple(given["steer_layer_range"])
    return s.updated(given)


def _open(s, vectors_path=None, **engine_over):
    """Model + Generator for settings `s`."""
    from .engine import Model
    from .generation import Generator
    from .method.vectors import HeadDirections
    from .models import resolve_model

    model = Model(resolve_model(s.model), n_gpu_layers=s.n_gpu_layers)
    vectors = HeadDirections.load(vectors_path) if vectors_path else None
    try:
        gen = Generator(model, s.engine(**engine_over), s.steer(), s.fgdilp(), vectors=vectors)
    except Exception:
        model.close()
        raise
    return model, gen


def _method_list(methods: str) -> list[str]:
    names = [m.strip() for m in methods.split(",") if m.strip()]
    for m in names:
        if m not in ALL_METHODS:
            raise FgdilpError(f"unknown method {m!r} (one of {', '.join(ALL_METHODS)})")
    if not names:
        raise FgdilpError("no method given")
    return names


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fgdilp-cpp")
def main() -> None:
    """Detoxify GGUF language models on llama.cpp by steering attention outputs (FGDILP / TR)."""


@main.command()
@model_options
@sampling_options
@steer_options
@click.option("-p", "--prompt", required=True, help="The prompt to continue.")
@click.option("-n", "--n-predict", type=click.IntRange(1), default=64, show_default=True)
@click.option("--method", type=click.Choice(ALL_METHODS), default="tr", show_default=True)
@click.option("--vectors", "vectors_path", type=str, default=None, metavar="FILE.gguf",
              help="Apply saved head directions (frozen) instead of building them.")
@click.option("--explain", is_flag=True, help="Show the self-diagnosis, the chosen prefixes and |delta| per layer.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming text.")
@friendly_errors
def generate(prompt, vectors_path, explain, as_json, **kw):
    """Continue PROMPT, steered with METHOD."""
    s = _settings(kw)
    if vectors_path:
        if click.get_current_context().get_parameter_source("method") != ParameterSource.DEFAULT and \
                s.method != "fgdilp-frozen":
            raise FgdilpError(f"--vectors applies saved directions (frozen); it cannot run --method {s.method}")
        s = s.updated({"method": "vectors"})
    model, gen = _open(s, vectors_path)
    with model, gen:
        stream = None if as_json else (lambda piece: click.echo(piece, nl=False))
        res = gen.generate(prompt, s.method, s.n_predict, s.sampling(), on_text=stream, explain=explain)
        if as_json:
            out = {"model": model.info.path, "method": res.method, "prompt": prompt, "text": res.text,
                   "n_prompt_tokens": res.n_prompt_tokens, "n_tokens": len(res.tokens),
                   "stop_reason": res.stop_reason, "seed": s.seed, "tokens_per_s": round(res.tokens_per_s, 3),
                   "setup_s": round(res.setup_s, 4), "hook_fired_layers": res.fired_layers}
            if explain:
                out["explain"] = res.explain
            click.echo(json.dumps(out, ensure_ascii=False))
            return
        click.echo()
        if explain:
            _print_explain(res.explain)


def _print_explain(ex: dict) -> None:
    if not ex:
        click.echo("(nothing to explain for this method)", err=True)
        return
    if "samples" in ex:
        click.echo("\nself-diagnosis P(yes) per sample: " + ", ".join(
            ["toxicity", "sexually_explicit", "threat", "identity_attack", "profanity", "insult"]))
        for i, smp in enumerate(ex["samples"]):
            sc = " ".join(f"{v:.2f}" for v in smp["scores"].values())
            click.echo(f"  {i:>2} [{sc}] {smp['text']!r}")
        for j, neg in enumerate(ex["negatives"]):
            src = "blank" if neg["sample"] is None else f"sample {neg['sample']} ({', '.join(neg['attributes'])})"
            click.echo(f"negative {j + 1}: {src}: {neg['text']!r}")
        click.echo(f"positive: sample {ex['positive']['sample']}: {ex['positive']['text']!r}")
    if "delta_norms" in ex:
        click.echo("|delta| per layer: " + " ".join(f"{x:.2f}" for x in ex["delta_norms"]))


@main.command()
@model_options
@sampling_options
@steer_options
@click.option("-p", "--prompt", required=True, help="The prompt to continue.")
@click.option("-n", "--n-predict", type=click.IntRange(1), default=40, show_default=True)
@click.option("--methods", default="none,prompt,tr,fgdilp,fgdilp-frozen", show_default=True)
@friendly_errors
def compare(prompt, methods, **kw):
    """Continue PROMPT with each method, same seed, one after the other."""
    names = _method_list(methods)
    s = _settings(kw, n_predict=40)
    model, gen = _open(s)
    with model, gen:
        click.echo(f"prompt: {prompt}")
        for m in names:
            res = gen.generate(prompt, m, s.n_predict, s.sampling())
            note = f" (hook fired on {res.fired_layers} layers)" if res.fired_layers else ""
            click.echo(f"\n[{m}]{note}")
            click.echo(f"{prompt}{res.text}")


@main.command()
@model_options
@friendly_errors
def info(**kw):
    """Print the model's shape and whether the kqv_out hook node exists."""
    from .engine import Model
    from .generation import probe_kqv_out
    from .models import resolve_model

    s = _settings(kw)
    with Model(resolve_model(s.model), n_gpu_layers=s.n_gpu_layers) as model:
        i = model.info
        fired = probe_kqv_out(model, s.threads)
        rows = [
            ("file", i.path), ("architecture", i.architecture), ("description", i.description),
            ("parameters", f"{i.n_params:,}"), ("layers", i.n_layer), ("heads", i.n_head),
            ("kv heads", i.n_head_kv), ("head dim", i.head_dim), ("n_embd", i.n_embd),
            ("kqv_out width", i.kqv_width), ("vocabulary", i.n_vocab), ("trained context", i.n_ctx_train),
            ("kqv_out hook", f"yes, fired on {fired} of {i.n_layer} layers" if fired == i.n_layer
             else f"NO (fired on {fired} of {i.n_layer} layers): this model cannot be steered"),
        ]
        w = max(len(k) for k, _ in rows)
        for k, v in rows:
            click.echo(f"{k:<{w}}  {v}")


@main.command()
@model_options
@sampling_options
@steer_options
@click.option("-p", "--prompt", default=DEFAULT_BENCH_PROMPT, show_default=True)
@click.option("--methods", default="none,tr", show_default=True, help="Comma-separated methods.")
@click.option("-n", "--n-predict", type=click.IntRange(2), default=64, show_default=True)
@click.option("-r", "--repeats", type=click.IntRange(1), default=3, show_default=True)
@click.option("--setup-samples", type=click.IntRange(1), default=25, show_default=True,
              help="FGDILP setup_ratio: final samples generated to compare the setup time with.")
@click.option("--setup-tokens", type=click.IntRange(1), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def bench(prompt, methods, repeats, setup_samples, setup_tokens, as_json, **kw):
    """Decode tokens/s of each method on the same prompt, side by side in one run."""
    from .bench import run_bench

    names = _method_list(methods)
    if "none" not in names:
        names.insert(0, "none")
    s = _settings(kw)
    model, gen = _open(s, max_samples=max(1, setup_samples) if any(m.startswith("fgdilp") for m in names) else 1,
                       max_new=setup_tokens + 1)
    with model, gen:
        out = run_bench(gen, prompt, names, s, repeats, setup_samples, setup_tokens)
    if as_json:
        click.echo(json.dumps(out))
        return
    click.echo(f"model {out['model']}  n={out['n_predict']}  repeats={repeats}  threads={out['threads']}")
    click.echo(f"{'method':<15}{'tokens/s':>10}{'ratio':>8}{'prefill s':>11}{'setup_ratio':>13}")
    for m, r in out["methods"].items():
        sr = f"{r['setup_ratio']:.3f}" if "setup_ratio" in r else "-"
        click.echo(f"{m:<15}{r['tokens_per_s']:>10.2f}{r['ratio_vs_none']:>8.3f}{r['prefill_s']:>11.3f}{sr:>13}")


@main.command()
@model_options
@click.option("--prompts", "prompts_path", required=True, metavar="FILE.jsonl",
              help="RealToxicityPrompts JSONL (the human continuations are scored).")
@click.option("--limit", type=click.IntRange(1), default=300, show_default=True)
@click.option("--offset", type=click.IntRange(0), default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def diagnose(prompts_path, limit, offset, as_json, **kw):
    """Self-diagnosis agreement: the model's P(yes) per attribute vs Perspective (AUC, Spearman)."""
    from .evaluation.prompts import load_prompts
    from .evaluation.selfdiag import self_diagnosis_agreement

    s = _settings(kw)
    records = load_prompts(prompts_path, limit, offset)
    model, gen = _open(s)
    with model, gen:
        out = self_diagnosis_agreement(gen, records)
    out["model"] = model.info.path
    if as_json:
        click.echo(json.dumps(out))
        return
    click.echo(f"model {out['model']}: {out['n']} continuations, label = Perspective score >= "
               f"{out['threshold']}, answer tokens {out['yes_no_tokens']}")
    click.echo(f"{'attribute':<18}{'AUC':>7}{'Spearman':>10}{'positives':>11}{'mean P(yes)':>13}")
    for name, r in out["attributes"].items():
        click.echo(f"{name:<18}{r['auc']:>7.3f}{r['spearman']:>10.3f}{r['positives']:>11}{r['mean_p_yes']:>13.3f}")


EVAL_METHODS = "none,prompt,tr,fgdilp,fgdilp-frozen,cvec,random"


@main.group("eval", invoke_without_command=True)
@model_options
@steer_options
@click.option("--prompts", "prompts_path", metavar="FILE", help="RTP JSONL, or plain text with one prompt per line.")
@click.option("--limit", type=click.IntRange(1), default=None, help="Prompts to use (default: all).")
@click.option("--offset", type=click.IntRange(0), default=0, show_default=True)
@click.option("--methods", default=EVAL_METHODS, show_default=True)
@click.option("--samples", "eval_samples", type=click.IntRange(1), default=25, show_default=True,
              help="Samples per prompt and method.")
@click.option("-n", "--n-predict", type=click.IntRange(1), default=20, show_default=True)
@click.option("--top-p", type=float, default=0.9, show_default=True)
@click.option("-s", "--seed", type=click.IntRange(0, 2**32 - 1), default=42, show_default=True)
@click.option("--judges", default="self,smollm2", show_default=True,
              help="Perplexity judges: self (the unsteered generator), smollm2 (SmolLM2-135M-Instruct), none.")
@click.option("--out", "out_dir", metavar="DIR", help="Output folder (resumable).")
@click.option("--no-progress", is_flag=True)
@click.pass_context
@friendly_errors
def eval_cmd(cctx, prompts_path, limit, offset, methods, eval_samples, judges, out_dir, no_progress, **kw):
    """Evaluate methods side by side: toxicity, fluency, diversity, speed (offline).

    Every method runs on the same prompts with the same seeds; generations.jsonl is appended as
    samples are produced, and the same command resumes a killed run."""
    if cctx.invoked_subcommand is not None:
        return
    if not prompts_path or not out_dir:
        raise FgdilpError("eval needs --prompts FILE and --out DIR")
    from .evaluation.assets import smollm2_path
    from .evaluation.perplexity import PerplexityJudge
    from .evaluation.prompts import load_prompts
    from .evaluation.runner import run_eval
    from .evaluation.scorer import ToxicityScorer

    names = _method_list(methods)
    judge_names = [j.strip() for j in judges.split(",") if j.strip() and j.strip() != "none"]
    for j in judge_names:
        if j not in ("self", "smollm2"):
            raise FgdilpError(f"unknown judge {j!r} (self, smollm2 or none)")
    top_p, seed = kw.pop("top_p"), kw.pop("seed")
    s = _settings(kw)
    records = load_prompts(prompts_path, limit, offset)
    scorer = ToxicityScorer.load()
    model, gen = _open(s, max_samples=min(eval_samples, 25), max_new=s.n_predict + 1)
    gen.reuse_instances = True
    judge_objs = {}
    try:
        with model, gen:
            for j in judge_names:
                judge_objs[j] = PerplexityJudge(model if j == "self" else smollm2_path(), n_threads=s.threads)
            res = run_eval(gen, records, names, eval_samples, s.n_predict, top_p, seed, out_dir, scorer,
                           judge_objs, progress=not no_progress)
    finally:
        for j in judge_objs.values():
            j.close()
    rep = res["report"]
    click.echo(f"{'method':<15}{'EMT':>7}{'TP':>7}" + "".join(f"{'PPL ' + j:>14}" for j in judge_names) +
               f"{'dist-2':>8}{'tok/s':>8}")
    for m, r in rep["methods"].items():
        ppl = "".join(f"{_num((r['ppl'].get(j) or {}).get('mean')):>14.2f}" for j in judge_names)
        click.echo(f"{m:<15}{_num(r['emt']):>7.3f}{_num(r['tp']):>7.3f}{ppl}{_num(r['dist'][1]):>8.3f}"
                   f"{_num(r['tokens_per_s']):>8.1f}")
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

    from .evaluation.runner import GENERATIONS, read_jsonl

    path = Path(out_dir) / GENERATIONS
    if not path.is_file():
        raise FgdilpError(f"no {GENERATIONS} in {out_dir}")
    recs, _ = read_jsonl(path)
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
            click.echo(f"| {r['method']} | {r['scores'].get('toxic', float('nan')):.3f} | {text} |")


def _num(x) -> float:
    return float("nan") if x is None else float(x)


@eval_cmd.command("calibrate")
@click.option("--prompts", "prompts_path", required=True, metavar="FILE.jsonl")
@click.option("--limit", type=click.IntRange(1), default=None)
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def eval_calibrate(prompts_path, limit, as_json):
    """Agreement of the offline toxicity scorer with Perspective on the RTP continuations."""
    from .evaluation.prompts import load_prompts
    from .evaluation.scorer import ToxicityScorer, calibrate

    out = calibrate(ToxicityScorer.load(), load_prompts(prompts_path, limit))
    if as_json:
        click.echo(json.dumps(out))
        return
    click.echo(f"{out['n']} continuations; label = Perspective score >= 0.5")
    click.echo(f"{'label':<15}{'perspective':<18}{'AUC':>7}{'Spearman':>10}{'positives':>11}")
    for name, r in out["labels"].items():
        click.echo(f"{name:<15}{r['perspective']:<18}{r['auc']:>7.3f}{r['spearman']:>10.3f}{r['positives']:>11}")


@main.group()
def vectors() -> None:
    """Build, apply and inspect saved head directions (frozen FGDILP)."""


@vectors.command("build")
@model_options
@sampling_options
@steer_options
@click.option("-p", "--prompt", required=True)
@click.option("-o", "--output", required=True, metavar="OUT.gguf")
@friendly_errors
def vectors_build(prompt, output, **kw):
    """Self-generate, diagnose and fuse for PROMPT; save the per-head directions."""
    s = _settings(kw)
    model, gen = _open(s)
    with model, gen:
        hd = gen.build_vectors(prompt, s.sampling(), s.as_dict())
        hd.save(output)
        click.echo(f"wrote {output}: {hd.n_layer} layers x {hd.n_head} heads x {hd.head_dim}, "
                   f"|delta| per layer max {hd.layer_norms().max():.3f}")


@vectors.command("export")
@click.argument("path")
@click.option("--cvec", "cvec_path", required=True, metavar="OUT.gguf",
              help="llama.cpp control-vector file (for llama-cli --control-vector).")
@click.option("-m", "--model", "model", type=str, default=None, metavar="MODEL.gguf",
              help="The model the vectors were built for (default: the embedded gemma-3-270m).")
@click.option("--steer-scale", type=float, default=1.0, show_default=True)
@click.option("--exp-norm", type=float, default=0.4, show_default=True)
@friendly_errors
def vectors_export(path, cvec_path, model, steer_scale, exp_norm):
    """Write head directions as a residual control vector: direction.<il> = -W_O(lambda_norm * delta)
    of block il, added by llama.cpp at the output of block il (block 0 has no slot and is dropped)."""
    from .engine import Model
    from .engine.tensors import output_projections
    from .generation import identity_of
    from .method.cvec import residual_directions, save_control_vector
    from .method.vectors import HeadDirections
    from .models import resolve_model

    hd = HeadDirections.load(path)
    with Model(resolve_model(model)) as m:
        hd.check_model(identity_of(m))
        vec = residual_directions(hd.rows(), output_projections(m.info.path, hd.n_layer), hd.n_head,
                                  exp_norm, steer_scale)
        save_control_vector(cvec_path, vec, m.info.architecture)
    click.echo(f"wrote {cvec_path}: {hd.n_layer - 1} layer vectors (direction.1..{hd.n_layer - 1}) of "
               f"width {vec.shape[1]}")


@vectors.command("inspect")
@click.argument("path")
@friendly_errors
def vectors_inspect(path):
    """Print shapes, norms and metadata of a vectors file."""
    from .method.vectors import HeadDirections

    hd = HeadDirections.load(path)
    click.echo(f"model        {hd.model.describe()}")
    click.echo(f"method       {hd.method}")
    click.echo(f"shape        [{hd.n_layer}, {hd.n_head}, {hd.head_dim}]  e: {'yes' if hd.e is not None else 'no'}")
    click.echo(f"convention   {hd.layer_convention}")
    click.echo("layer norms  " + " ".join(f"{x:.3f}" for x in hd.layer_norms()))
    click.echo(f"settings     {json.dumps(hd.settings, sort_keys=True)}")


if __name__ == "__main__":
    main()
