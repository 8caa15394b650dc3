"""The fgdilp-cpp command line: parsing and printing only; the work is in the Python API."""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import replace

import click
from click.core import ParameterSource

from . import methods as registry
from .cli_options import (DEFAULT_BENCH_PROMPT, MethodChoice, _detoxifier, _settings, friendly_errors, method_list,
                          model_options, sampling_options, sources, steer_options, with_vectors)
from .errors import FgdilpError
from .explain import explain_lines


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fgdilp-cpp")
def main() -> None:
    """Detoxify GGUF language models on llama.cpp by steering attention outputs (FGDILP / TR)."""


@main.command()
@model_options
@sampling_options
@steer_options
@click.option("-p", "--prompt", default=None, help="The prompt to continue.")
@click.option("-f", "--file", "prompts_file", default=None, metavar="FILE",
              help="Prompts to continue, one per line ('-' = standard input).")
@click.option("-n", "--n-predict", type=click.IntRange(1), default=64, show_default=True)
@click.option("--method", type=MethodChoice(), default="tr", show_default=True)
@click.option("--vectors", "vectors_path", type=str, default=None, metavar="FILE.gguf",
              help="Apply saved head directions (frozen) instead of building them.")
@click.option("--explain", is_flag=True, help="Show the self-diagnosis, the chosen prefixes and |delta| per layer.")
@click.option("--json", "as_json", is_flag=True,
              help="JSON Lines: one object per prompt, written as each is done, instead of streaming text.")
@friendly_errors
def generate(prompt, prompts_file, vectors_path, explain, as_json, **kw):
    """Continue PROMPT (or every line of FILE), steered with METHOD."""
    prompts = _prompts(prompt, prompts_file)
    s = with_vectors(_settings(kw), vectors_path)
    with _detoxifier(s, vectors_path) as det:
        for text in prompts:
            if as_json:
                res = det.generate(text, explain=explain)
                out = {"model": det.model.info.path, "method": res.method, "prompt": text, "text": res.text,
                       "n_prompt_tokens": res.n_prompt_tokens, "n_tokens": len(res.tokens),
                       "stop_reason": res.stop_reason, "seed": s.seed, "tokens_per_s": round(res.tokens_per_s, 3),
                       "setup_s": round(res.setup_s, 4), "hook_fired_layers": res.fired_layers}
                if explain:
                    out["explain"] = res.explain
                click.echo(json.dumps(out, ensure_ascii=False))
                sys.stdout.flush()
                continue
            stream = det.stream(text, explain=explain)
            for piece in stream:
                click.echo(piece, nl=False)
            click.echo()
            if explain:
                _print_explain(stream.result.explain)


def _prompts(prompt, prompts_file) -> list[str]:
    if (prompt is None) == (prompts_file is None):
        raise FgdilpError("give the prompt with -p TEXT or a file of prompts with -f FILE (one of them)")
    if prompt is not None:
        return [prompt]
    try:
        if prompts_file == "-":
            lines = sys.stdin.read().splitlines()
        else:
            with open(prompts_file, encoding="utf-8") as f:
                lines = f.read().splitlines()
    except OSError as exc:
        raise FgdilpError(f"cannot read {prompts_file}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise FgdilpError(f"{prompts_file} is not UTF-8 text") from None
    lines = [line for line in lines if line.strip()]
    if not lines:
        raise FgdilpError(f"{prompts_file} holds no prompt")
    return lines


def _print_explain(ex: dict) -> None:
    for line in explain_lines(ex):
        click.echo(line)


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
    names = method_list(methods)
    s = _settings(kw, n_predict=40)
    with _detoxifier(s) as det:
        click.echo(f"prompt: {prompt}")
        for m in names:
            res = det.generate(prompt, method=m)
            note = f" (hook fired on {res.fired_layers} layers)" if res.fired_layers else ""
            click.echo(f"\n[{m}]{note}")
            click.echo(f"{prompt}{res.text}")


@main.command()
@model_options
@steer_options
@click.option("--method", type=MethodChoice(), default="tr", show_default=True)
@friendly_errors
def info(**kw):
    """Print the model's shape, whether the kqv_out hook node exists, its profile, and the steering
    settings these flags resolve to (and where each value came from)."""
    from .profiles import PROFILE_FIELDS

    s = _settings(kw)
    with _detoxifier(s) as det:
        i = det.info()
        steering = [(k, v, src) for k, (v, src) in det.setting_sources().items() if k in PROFILE_FIELDS]
    fired, n = i["kqv_out_layers"], i["n_layer"]
    rows = [
        ("file", i["file"]), ("architecture", i["architecture"]), ("description", i["description"]),
        ("parameters", f"{i['n_params']:,}"), ("layers", n), ("heads", i["n_head"]),
        ("kv heads", i["n_head_kv"]), ("head dim", i["head_dim"]), ("n_embd", i["n_embd"]),
        ("kqv_out width", i["kqv_width"]), ("vocabulary", i["n_vocab"]), ("trained context", i["n_ctx_train"]),
        ("kqv_out hook", f"yes, fired on {fired} of {n} layers" if fired == n
         else f"NO (fired on {fired} of {n} layers): this model cannot be steered"),
    ]
    rows.append(("profile", i["profile"] or "none (fgdilp-cpp calibrate makes one)"))
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k:<{w}}  {v}")
    click.echo("settings (value, from):")
    for k, v, src in steering:
        click.echo(f"  {k.replace('_', '-'):<20}{str(v):<14} {src}")


@main.command()
@model_options
@sampling_options
@steer_options
@click.option("-p", "--prompt", default=DEFAULT_BENCH_PROMPT, show_default=True)
@click.option("--methods", default="none,tr", show_default=True, help="Comma-separated methods.")
@click.option("-n", "--n-predict", type=click.IntRange(2), default=64, show_default=True)
@click.option("-r", "--repeats", type=click.IntRange(1), default=3, show_default=True,
              help="Runs per method, the median reported (with --turns: replays of the conversation, "
                   "each turn's median over them).")
@click.option("--setup-samples", type=click.IntRange(1), default=25, show_default=True,
              help="FGDILP setup_ratio: final samples generated to compare the setup time with.")
@click.option("--setup-tokens", type=click.IntRange(1), default=20, show_default=True)
@click.option("--chat", "chat_mode", is_flag=True,
              help="Time to first token of a chat reply instead (default model SmolLM2, chat defaults).")
@click.option("--vectors", "vectors_path", default=None, metavar="FILE.gguf",
              help="With --chat: also time replies steered by these saved directions.")
@click.option("--turns", type=click.IntRange(1), default=None,
              help="With --chat: replay a conversation of this many turns (the shipped one), time each reply.")
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def bench(prompt, methods, repeats, setup_samples, setup_tokens, chat_mode, vectors_path, turns, as_json, **kw):
    """Decode tokens/s of each method on the same prompt, side by side in one run."""
    from .bench import run_bench

    names = method_list(methods)
    if registry.UNSTEERED not in names:             # the baseline of every ratio
        names.insert(0, registry.UNSTEERED)
    if chat_mode:
        return _bench_chat(prompt, names, repeats, vectors_path, as_json, kw, turns)
    if vectors_path or turns:
        raise FgdilpError("bench --vectors and --turns need --chat")
    s = _settings(kw)
    setup = any(registry.get(m).instance for m in names)
    with _detoxifier(s, max_samples=setup_samples if setup else 1, max_new=setup_tokens + 1) as det:
        out = run_bench(det, prompt, names, repeats, setup_samples, setup_tokens)
    if as_json:
        click.echo(json.dumps(out))
        return
    click.echo(f"model {out['model']}  n={out['n_predict']}  repeats={repeats}  threads={out['threads']}")
    click.echo(f"{'method':<15}{'tokens/s':>10}{'ratio':>8}{'prefill s':>11}{'setup_ratio':>13}")
    for m, r in out["methods"].items():
        sr = f"{r['setup_ratio']:.3f}" if "setup_ratio" in r else "-"
        click.echo(f"{m:<15}{r['tokens_per_s']:>10.2f}{r['ratio_vs_none']:>8.3f}{r['prefill_s']:>11.3f}{sr:>13}")


def _bench_chat(prompt, names, repeats, vectors_path, as_json, kw, turns=None) -> None:
    from .api import Detoxifier
    from .bench import CHAT_BENCH_PROMPT, chat_variants, run_chat_ttft, run_chat_turns
    from .chat import CHAT_DEFAULTS

    if click.get_current_context().get_parameter_source("prompt") == ParameterSource.DEFAULT:
        prompt = CHAT_BENCH_PROMPT
    s = _settings(kw, default_source="chat default", **CHAT_DEFAULTS)
    with contextlib.ExitStack() as stack:
        det = stack.enter_context(_detoxifier(s, chat=True))
        with_vec = stack.enter_context(_detoxifier(s, vectors_path, chat=True)) if vectors_path else None
        if turns:
            # rows of their own, in their own contexts: FGDILP's instance per reply or conversation
            # (whichever is not in force), the other contrast (docs/method.md §2.9), and both; the
            # variant's values win over the model's profile, like flags
            dets, variants = {}, []
            for row, over, m in chat_variants(det, names):
                key = tuple(sorted(over.items()))
                if key not in dets:
                    dets[key] = stack.enter_context(Detoxifier(s.updated(over), chat=True,
                                                               sources={**sources(), **dict.fromkeys(over, "flag")}))
                variants.append((row, dets[key], m))
            out = run_chat_turns(det, names, turns, with_vec, variants=variants, repeats=repeats)
        else:
            out = run_chat_ttft(det, prompt, names, repeats, with_vec)
    if as_json:
        click.echo(json.dumps(out))
        return
    if turns:
        click.echo(f"model {out['model']}  {turns} turns x {repeats}  threads={out['threads']}  kv_reuse={out['kv_reuse']}  "
                   f"instance_reuse={out['instance_reuse']}")
        click.echo(f"{'method':<15}{'TTFT s':>9}{'ratio':>8}  per turn")
        for m, r in out["methods"].items():
            click.echo(f"{m:<15}{r['ttft_s']:>9.3f}{r['ratio_vs_none']:>8.2f}  {' '.join(f'{x:.3f}' for x in r['turns'])}")
        return
    click.echo(f"model {out['model']}  chat prompt {out['n_prompt_tokens']} tokens  repeats={repeats}  "
               f"threads={out['threads']}  {json.dumps(out['settings'])}")
    click.echo(f"{'method':<15}{'TTFT s':>9}{'ratio':>8}{'setup s':>9}{'prefill s':>11}")
    for m, r in out["methods"].items():
        click.echo(f"{m:<15}{r['ttft_s']:>9.3f}{r['ratio_vs_none']:>8.2f}{r['setup_s']:>9.3f}{r['prefill_s']:>11.3f}")


@main.command()
@model_options
@click.option("--prompts", "prompts_path", required=True, metavar="FILE.jsonl",
              help="RealToxicityPrompts JSONL (the human continuations are scored).")
@click.option("--limit", type=click.IntRange(1), default=300, show_default=True)
@click.option("--offset", type=click.IntRange(0), default=0, show_default=True)
@click.option("--diagnoser", "which", type=click.Choice(["self", "scorer"]), default="self", show_default=True,
              help="self: the model's own P(yes); scorer: the offline toxicity scorer (tox-block), its labels "
                   "mapped onto the attributes.")
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def diagnose(prompts_path, limit, offset, which, as_json, **kw):
    """Diagnosis agreement: a diagnoser's score per attribute vs Perspective (AUC, Spearman) on the
    human continuations of the prompts."""
    from .evaluation.prompts import load_prompts

    s = _settings(kw)
    records = load_prompts(prompts_path, limit, offset)
    if which == "scorer":                  # no llama model needed: the scorer reads the texts
        from .evaluation.agreement import scorer_agreement
        from .evaluation.scorer import ToxicityScorer

        out = scorer_agreement(ToxicityScorer.load(), records)
        head = f"scorer {out['diagnoser']['judge']} (labels mapped onto the attributes)"
    else:
        from .evaluation.selfdiag import self_diagnosis_agreement

        with _detoxifier(s) as det:
            out = self_diagnosis_agreement(det, records)
            out["model"] = det.model.info.path
        head = f"model {out['model']} (self-diagnosis, answer tokens {out['yes_no_tokens']})"
    out["diagnoser_source"] = which
    if as_json:
        click.echo(json.dumps(out))
        return
    click.echo(f"{head}: {out['n']} continuations, label = Perspective score >= {out['threshold']}")
    mean = "mean P(yes)" if which == "self" else "mean score"
    click.echo(f"{'attribute':<18}{'AUC':>7}{'Spearman':>10}{'positives':>11}{mean:>13}")
    for name, r in out["attributes"].items():
        m = r.get("mean_p_yes", r.get("mean_score"))
        click.echo(f"{name:<18}{r['auc']:>7.3f}{r['spearman']:>10.3f}{r['positives']:>11}{m:>13.3f}")


@main.group()
def vectors() -> None:
    """Build, apply and inspect saved head directions (frozen FGDILP)."""


@vectors.command("build")
@model_options
@sampling_options
@steer_options
@click.option("-p", "--prompt", default=None, help="One prompt (FGDILP's frozen directions for it).")
@click.option("--prompts", "prompt_set", default=None, metavar="SET|FILE",
              help="Universal directions: average the prompt-end deltas over these prompts (built-in set or file).")
@click.option("--limit", type=click.IntRange(1), default=100, show_default=True, help="With --prompts: prompts used.")
@click.option("--offset", type=click.IntRange(0), default=0, show_default=True)
@click.option("--from", "source", type=click.Choice(["tr", "fgdilp"]), default=None,
              help="Whose prefixes give each delta: TR's (default with --prompts) or FGDILP's instance "
                   "prefixes with --diagnoser. Without it, -p saves FGDILP's frozen directions for the prompt.")
@click.option("--probe-top-k", type=click.IntRange(0), default=0, show_default=True,
              help="Steer only the K heads whose toxicity probes are most accurate (0 = every head).")
@click.option("--probe-weights", is_flag=True, help="Weight heads by probe accuracy (accuracy - 0.5, best = 1).")
@click.option("--probe-prompts", default="rtp-toxic", show_default=True, metavar="SET|FILE",
              help="RTP records whose continuations (Perspective toxicity) label the probe texts.")
@click.option("--probe-offset", type=click.IntRange(0), default=1000, show_default=True,
              help="First probe record (default: past the development and held-out slices).")
@click.option("--probe-per-class", type=click.IntRange(4), default=150, show_default=True,
              help="Toxic (>= 0.5) and clean (< 0.1) continuations each.")
@click.option("--chat", "chat_mode", is_flag=True,
              help="Each prompt is a user message in the model's chat template (directions for chat).")
@click.option("-o", "--output", required=True, metavar="OUT.gguf")
@click.option("--no-progress", is_flag=True)
@friendly_errors
def vectors_build(prompt, prompt_set, limit, offset, source, probe_top_k, probe_weights, probe_prompts, probe_offset,
                  probe_per_class, chat_mode, output, no_progress, **kw):
    """Save per-head directions: FGDILP's for one PROMPT, or universal ones averaged over --prompts;
    optionally with head selection by toxicity probes."""
    from .evaluation.prompts import load_prompts
    from .universal import DEFAULT_SOURCE, optional_progress, probe_texts

    if (prompt is None) == (prompt_set is None):
        raise FgdilpError("give one prompt with -p TEXT or a prompt set with --prompts SET (one of them)")
    s = _settings(kw)
    with _detoxifier(s) as det:
        if prompt is not None and source is None:     # FGDILP's frozen directions for one prompt
            hd = det.build_vectors(prompt, chat=chat_mode)
        else:
            texts = [prompt] if prompt is not None else [r.text for r in load_prompts(prompt_set, limit, offset)]
            hd = det.build_universal_vectors(texts, source or DEFAULT_SOURCE,
                                             optional_progress(not no_progress, "prompts"), chat=chat_mode)
            if prompt_set is not None:
                hd = replace(hd, settings={**hd.settings, "universal": {**hd.settings["universal"], "prompts": prompt_set,
                                                                        "limit": limit, "offset": offset}})
        if probe_top_k or probe_weights:
            from .method.probes import head_weights

            texts, labels, how = probe_texts(load_prompts(probe_prompts, None, probe_offset), probe_per_class)
            res = det.probe_heads(texts, labels)
            w = head_weights(res.accuracy, probe_top_k, probe_weights)
            hd = hd.with_head_weights(w, res.accuracy, {**how, "prompts": probe_prompts, "offset": probe_offset,
                                                        "top_k": probe_top_k, "by_accuracy": probe_weights,
                                                        "n_train": res.n_train, "n_test": res.n_test})
        hd.save(output)
        click.echo(f"wrote {output}: {hd.method}, {hd.n_layer} layers x {hd.n_head} heads x {hd.head_dim}, "
                   f"|delta| per layer max {hd.layer_norms().max():.3f}")
        if hd.head_weights is not None:
            click.echo(f"head selection: {int((hd.head_weights > 0).sum())} of {hd.head_weights.size} heads steered; "
                       f"probe accuracy max {hd.probe_accuracy.max():.3f}, mean {hd.probe_accuracy.mean():.3f}")


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
    from .method.vectors import HeadDirections
    from .settings import Settings

    hd = HeadDirections.load(path)
    with _detoxifier(Settings(model=model)) as det:
        vec = det.export_control_vector(hd, cvec_path, exp_norm, steer_scale)
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
    fp = hd.model
    click.echo("fingerprint  " + (f"weights {fp.weights_sha256[:16]}, vocabulary {fp.vocab_sha256[:16]}" if fp.weights_sha256
                                  else "none (an older file: refused for steering; build it again)"))
    click.echo(f"method       {hd.method}")
    click.echo(f"shape        [{hd.n_layer}, {hd.n_head}, {hd.head_dim}]  e: {'yes' if hd.e is not None else 'no'}")
    click.echo(f"convention   {hd.layer_convention}")
    click.echo("layer norms  " + " ".join(f"{x:.3f}" for x in hd.layer_norms()))
    if hd.probe_accuracy is not None:
        click.echo("probe accuracy per layer (held-out; heads in order):")
        for il, row in enumerate(hd.probe_accuracy):
            click.echo(f"  {il:>3}  " + " ".join(f"{x:.2f}" for x in row))
    if hd.head_weights is not None:
        click.echo(f"head weights ({int((hd.head_weights > 0).sum())} of {hd.head_weights.size} heads steered):")
        for il, row in enumerate(hd.head_weights):
            click.echo(f"  {il:>3}  " + " ".join(f"{x:.2f}" for x in row))
    click.echo(f"settings     {json.dumps(hd.settings, sort_keys=True)}")


from .cli_calibrate import calibrate  # noqa: E402 - commands kept in their own modules
from .cli_chat import chat, serve  # noqa: E402
from .cli_eval import eval_cmd  # noqa: E402

main.add_command(chat)
main.add_command(serve)
main.add_command(calibrate)
main.add_command(eval_cmd)

if __name__ == "__main__":
    main()
