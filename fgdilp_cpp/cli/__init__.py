"""The fgdilp-cpp command line: parsing and printing only; the work is in the Python API."""

from __future__ import annotations

import contextlib
import json
import sys

import click
from click.core import ParameterSource

from .. import methods as registry
from .options import (DEFAULT_BENCH_PROMPT, _detoxifier, _settings, friendly_errors, method_list, model_options,
                          sampling_options, setting_options, sources, steer_options, with_vectors)
from ..errors import FgdilpError
from ..explain import explain_lines


def brief_notices() -> None:
    """Our notices (a method or a value asked for by a former name: registry.RenamedWarning) as one line
    on stderr, "warning: ...", instead of Python's file:line form; other warnings as Python shows them."""
    import warnings

    shown = warnings.showwarning
    if getattr(shown, "fgdilp_brief", False):
        return

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, registry.RenamedWarning):
            click.echo(f"warning: {message}", err=True)
        else:
            shown(message, category, filename, lineno, file, line)

    show.fgdilp_brief = True          # type: ignore[attr-defined]
    warnings.showwarning = show


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fgdilp-cpp")
def main() -> None:
    """Detoxify GGUF language models on llama.cpp by steering attention outputs (FGDILP / TR)."""
    brief_notices()


@main.command()
@model_options
@sampling_options
@steer_options
@click.option("-p", "--prompt", default=None, help="The prompt to continue.")
@click.option("-f", "--file", "prompts_file", default=None, metavar="FILE",
              help="Prompts to continue, one per line ('-' = standard input).")
@setting_options("n_predict", "method")
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
    with _detoxifier(s, vectors_path, setup=True) as det:
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
        # a byte-order mark (Windows editors and PowerShell pipes write one) is not the first prompt's text
        if prompts_file == "-":
            lines = sys.stdin.read().removeprefix("\ufeff").splitlines()
        else:
            with open(prompts_file, encoding="utf-8-sig") as f:
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
@setting_options("n_predict", command="compare")
@click.option("--methods", default="none,prompt,tr,fgdilp,fgdilp-frozen", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object: the prompt and each method's continuation.")
@friendly_errors
def compare(prompt, methods, as_json, **kw):
    """Continue PROMPT with each method, same seed, one after the other."""
    names = method_list(methods)
    s = _settings(kw, "compare")
    with _detoxifier(s, setup=True) as det:
        if as_json:
            out = {"model": det.model.info.path, "prompt": prompt, "seed": s.seed, "methods": []}
            for m in names:
                res = det.generate(prompt, method=m)
                out["methods"].append({"method": m, "text": res.text, "n_tokens": len(res.tokens),
                                       "stop_reason": res.stop_reason, "hook_fired_layers": res.fired_layers})
            click.echo(json.dumps(out, ensure_ascii=False))
            return
        click.echo(f"prompt: {prompt}")
        for m in names:
            res = det.generate(prompt, method=m)
            note = f" (hook fired on {res.fired_layers} layers)" if res.fired_layers else ""
            click.echo(f"\n[{m}]{note}")
            click.echo(f"{prompt}{res.text}")


@main.command()
@model_options
@steer_options
@setting_options("method")
@click.option("--json", "as_json", is_flag=True, help="One JSON object (each setting as {value, from}).")
@friendly_errors
def info(as_json, **kw):
    """Print the model's shape, whether the kqv_out hook node exists, its profile, and the steering
    settings these flags resolve to (and where each value came from)."""
    from ..api import setting_sources
    from ..settings import PROFILE_FIELDS

    s = _settings(kw)
    with _detoxifier(s) as det:
        i = det.info()
        transfer_note = det.profile.transfer_note() if det.profile is not None else ""
        steering = [(k, v, src) for k, (v, src) in setting_sources(det).items() if k in PROFILE_FIELDS]
    if as_json:
        i = {k: str(v) if k in ("file", "profile") and v is not None else v for k, v in i.items()}
        i["steerable"] = i["kqv_out_layers"] == i["n_layer"]
        i["settings"] = {k: {"value": list(v) if isinstance(v, tuple) else v, "from": src} for k, v, src in steering}
        click.echo(json.dumps(i, ensure_ascii=False))
        return
    fired, n = i["kqv_out_layers"], i["n_layer"]
    rows = [
        ("file", i["file"]), ("architecture", i["architecture"]), ("description", i["description"]),
        ("parameters", f"{i['n_params']:,}"), ("layers", n), ("heads", i["n_head"]),
        ("kv heads", i["n_head_kv"]), ("head dim", i["head_dim"]), ("n_embd", i["n_embd"]),
        ("kqv_out width", i["kqv_width"]), ("vocabulary", i["n_vocab"]), ("trained context", i["n_ctx_train"]),
        ("kqv_out hook", f"yes, fired on {fired} of {n} layers" if fired == n
         else f"NO (fired on {fired} of {n} layers): this model cannot be steered"),
    ]
    kind = i["profile_kind"]
    rows.append(("profile", f"{i['profile']} ({kind})" if i["profile"] else
                 f"none: {i['profile_note'] or 'fgdilp-cpp calibrate --fast MODEL makes one'}"))
    if transfer_note:
        rows.append(("", transfer_note))
    rows.append(("universal", f"{i['universal']} ({i['universal_source']})" if i["universal"]
                 else "none (fgdilp-cpp vectors build --prompts SET --install)"))
    if i["universal_transferred_from"]:
        t = i["universal_transferred_from"]
        rows.append(("", f"transferred: built on {t['name'] or 'another file'} (weights {t['weights_sha256'][:12]}), "
                         "another quantisation of these weights"))
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
@setting_options("n_predict", flag_min={"n_predict": 2})
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
@click.option("--memory", is_flag=True,
              help="Peak RSS and KV bytes per method of a chat of --turns turns (default 3; each method in a "
                   "fresh process) and of serve with every method after one request each, beside unsteered; "
                   "then decode tokens/s (-n tokens) and chat time to first token, with their ratios.")
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def bench(prompt, methods, repeats, setup_samples, setup_tokens, chat_mode, vectors_path, turns, memory, as_json,
          **kw):
    """Decode tokens/s of each method on the same prompt, side by side in one run."""
    from ..bench import run_bench

    if memory and click.get_current_context().get_parameter_source("methods") == ParameterSource.DEFAULT:
        methods = MEMORY_BENCH_METHODS
    names = method_list(methods)
    if registry.UNSTEERED not in names:             # the baseline of every ratio
        names.insert(0, registry.UNSTEERED)
    if memory:
        return _bench_memory(prompt, names, repeats, turns or 3, as_json, kw)
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


MEMORY_BENCH_METHODS = f"none,{registry.UNIVERSAL},tr,fgdilp"    # the default method (universal) among them


def _bench_memory(prompt, names, repeats, turns, as_json, kw) -> None:
    from ..bench_memory import run_memory_bench

    decode_tokens = kw["n_predict"]
    s = _settings(kw, "chat")
    out = run_memory_bench(lambda: _detoxifier(s, chat=True), s, sources(), names, turns, 24, decode_tokens,
                           repeats, prompt)
    if as_json:
        click.echo(json.dumps(out))
        return
    click.echo(f"model {out['model']}  -c {out['ctx_size']}  {turns} turns  threads={out['threads']}  "
               f"universal directions: {out['universal']}")
    click.echo(f"{'method':<18}{'peak RSS MiB':>13}{'ratio':>7}{'KV MiB':>9}{'decode t/s':>11}{'ratio':>7}"
               f"{'TTFT s':>8}{'ratio':>7}")
    for m, r in out["methods"].items():
        click.echo(f"{m:<18}{r['peak_rss_mib']:>13.1f}{r['rss_ratio_vs_none']:>7.2f}{r['kv_mib']:>9.1f}"
                   f"{r['decode_tokens_per_s']:>11.2f}{r['decode_ratio_vs_none']:>7.2f}{r['ttft_s']:>8.3f}"
                   f"{r['ttft_ratio_vs_none']:>7.2f}")
    v = out["serve"]
    click.echo(f"serve, {len(v['methods'])} methods: peak RSS {v['peak_rss_mib']:.1f} MiB "
               f"(x{v['rss_ratio_vs_none']:.2f} none's), KV {v['kv_mib']:.1f} of {v['kv_budget_mib']} MiB budget")


def _bench_chat(prompt, names, repeats, vectors_path, as_json, kw, turns=None) -> None:
    from ..api import Detoxifier
    from ..bench import CHAT_BENCH_PROMPT, chat_variants, run_chat_ttft, run_chat_turns

    if click.get_current_context().get_parameter_source("prompt") == ParameterSource.DEFAULT:
        prompt = CHAT_BENCH_PROMPT
    s = _settings(kw, "chat")
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
                    dets[key] = stack.enter_context(Detoxifier(s.updated(over), chat=True, auto_setup=False,
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
    from ..evaluation.prompts import load_prompts

    s = _settings(kw)
    records = load_prompts(prompts_path, limit, offset)
    if which == "scorer":                  # no llama model needed: the scorer reads the texts
        from ..evaluation.agreement import scorer_agreement
        from ..toxicity.scorer import ToxicityScorer

        out = scorer_agreement(ToxicityScorer.load(), records)
        head = f"scorer {out['diagnoser']['judge']} (labels mapped onto the attributes)"
    else:
        from ..evaluation.selfdiag import self_diagnosis_agreement

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


from .calibrate import calibrate  # noqa: E402 - commands kept in their own modules
from .chat import chat, serve  # noqa: E402
from .eval import eval_cmd  # noqa: E402
from .eval_runs import eval_rescore  # noqa: E402,F401 - registers eval rescore, paired, specificity
from .vectors import vectors  # noqa: E402

main.add_command(chat)
main.add_command(serve)
main.add_command(calibrate)
main.add_command(eval_cmd)
main.add_command(vectors)

if __name__ == "__main__":
    main()
