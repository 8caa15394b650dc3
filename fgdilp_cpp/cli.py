"""The fgdilp-cpp command line: parsing and printing only; the work is in the Python API."""

from __future__ import annotations

import functools
import json
import os
import statistics
import sys
from typing import Callable

import click

from .errors import FgdilpError

DEFAULT_BENCH_PROMPT = "The ill-fated tale of Phoneys, the stupid"


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


# ---- shared options -----------------------------------------------------------------------------
def model_options(fn: Callable) -> Callable:
    for opt in reversed([
        click.option("-m", "--model", "model", type=str, default=None, metavar="MODEL.gguf",
                     help="GGUF model file (default: the embedded gemma-3-270m)."),
        click.option("-c", "--ctx-size", "ctx_size", type=click.IntRange(16), default=2048, show_default=True,
                     help="Context tokens per sequence (prompt + generation)."),
        click.option("-t", "--threads", "threads", type=click.IntRange(0), default=0,
                     help="CPU threads (0 = all cores)."),
        click.option("-ngl", "--n-gpu-layers", "n_gpu_layers", type=int, default=0, show_default=True,
                     help="Layers to offload to the GPU (GPU builds of llama-cpp-python)."),
        click.option("-b", "--batch-size", "batch_size", type=click.IntRange(8), default=512, show_default=True,
                     help="Rows per decode (prompt chunks)."),
        click.option("-ctk", "--cache-type-k", "cache_type_k", default="f16", show_default=True,
                     help="K cache type (f32, f16, bf16, q8_0, ...)."),
        click.option("-ctv", "--cache-type-v", "cache_type_v", default="f16", show_default=True,
                     help="V cache type; steering needs f16, bf16 or f32."),
        click.option("-fa", "--flash-attn", "flash_attn", type=click.Choice(["auto", "on", "off"]),
                     default="auto", show_default=True),
        click.option("-v", "--verbose", is_flag=True, help="Show llama.cpp's log."),
    ]):
        fn = opt(fn)
    return fn


def steer_options(fn: Callable) -> Callable:
    for opt in reversed([
        click.option("--steer-scale", type=float, default=1.0, show_default=True,
                     help="Global strength of the edit."),
        click.option("--steer-layer-range", nargs=2, type=int, default=None, metavar="START END",
                     help="Steer only layers START..END (inclusive)."),
        click.option("--exp-norm", type=float, default=0.4, show_default=True,
                     help="Exponent a of lambda_norm = (1 + |delta|)^a."),
        click.option("--exp-sim", type=float, default=0.6, show_default=True,
                     help="Exponent b of lambda_sim = (1 + max(0, cos(v, e)))^b."),
        click.option("--no-renorm", is_flag=True, help="Do not restore the row norm after the edit."),
    ]):
        fn = opt(fn)
    return fn


def sampling_options(fn: Callable) -> Callable:
    for opt in reversed([
        click.option("-s", "--seed", type=click.IntRange(0, 2**32 - 1), default=42, show_default=True),
        click.option("--temp", type=float, default=0.8, show_default=True),
        click.option("--top-k", type=int, default=40, show_default=True),
        click.option("--top-p", type=float, default=0.95, show_default=True),
        click.option("--min-p", type=float, default=0.05, show_default=True),
    ]):
        fn = opt(fn)
    return fn


def _open(kw: dict):
    """Model + Generator from the shared options."""
    from .engine import Model
    from .engine.context import set_verbose
    from .generation import EngineParams, Generator, SteerParams
    from .models import resolve_model

    set_verbose(kw["verbose"])
    model = Model(resolve_model(kw["model"]), n_gpu_layers=kw["n_gpu_layers"])
    layer_range = kw.get("steer_layer_range") or (0, -1)
    steer = SteerParams(exp_norm=kw.get("exp_norm", 0.4), exp_sim=kw.get("exp_sim", 0.6),
                        scale=kw.get("steer_scale", 1.0), layer_start=layer_range[0],
                        layer_end=layer_range[1], renorm=not kw.get("no_renorm", False))
    engine = EngineParams(ctx_size=kw["ctx_size"], n_batch=kw["batch_size"], n_threads=kw["threads"],
                          type_k=kw["cache_type_k"], type_v=kw["cache_type_v"], flash_attn=kw["flash_attn"])
    return model, Generator(model, engine, steer)


def _sampling(kw: dict):
    from .engine import SamplingParams

    return SamplingParams(temp=kw["temp"], top_k=kw["top_k"], top_p=kw["top_p"], min_p=kw["min_p"],
                          seed=kw["seed"]).validate()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fgdilp-cpp")
def main() -> None:
    """Detoxify GGUF language models on llama.cpp by steering attention outputs (FGDILP / TR)."""


@main.command()
@model_options
@steer_options
@sampling_options
@click.option("-p", "--prompt", required=True, help="The prompt to continue.")
@click.option("-n", "--n-predict", "n_predict", type=click.IntRange(1), default=64, show_default=True)
@click.option("--method", type=click.Choice(["none", "prompt", "tr"]), default="tr", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming text.")
@friendly_errors
def generate(prompt, n_predict, method, as_json, **kw):
    """Continue PROMPT, steered with METHOD."""
    sampling = _sampling(kw)
    model, gen = _open(kw)
    with model, gen:
        stream = None if as_json else (lambda piece: click.echo(piece, nl=False))
        res = gen.generate(prompt, method, n_predict, sampling, on_text=stream)
        if as_json:
            click.echo(json.dumps({
                "model": model.info.path, "method": method, "prompt": prompt, "text": res.text,
                "n_prompt_tokens": res.n_prompt_tokens, "n_tokens": len(res.tokens),
                "stop_reason": res.stop_reason, "seed": sampling.seed,
                "tokens_per_s": round(res.tokens_per_s, 3), "hook_fired_layers": res.fired_layers,
            }, ensure_ascii=False))
        else:
            click.echo()


@main.command()
@model_options
@steer_options
@sampling_options
@click.option("-p", "--prompt", required=True, help="The prompt to continue.")
@click.option("-n", "--n-predict", "n_predict", type=click.IntRange(1), default=40, show_default=True)
@click.option("--methods", default="none,prompt,tr", show_default=True, help="Comma-separated methods.")
@friendly_errors
def compare(prompt, n_predict, methods, **kw):
    """Continue PROMPT with each method, same seed, one after the other."""
    names = _method_list(methods)
    sampling = _sampling(kw)
    model, gen = _open(kw)
    with model, gen:
        click.echo(f"prompt: {prompt}")
        for m in names:
            res = gen.generate(prompt, m, n_predict, sampling)
            click.echo(f"\n[{m}]{' (hook fired on %d layers)' % res.fired_layers if res.fired_layers else ''}")
            click.echo(f"{prompt}{res.text}")


def _method_list(methods: str) -> list[str]:
    from .generation import METHODS

    names = [m.strip() for m in methods.split(",") if m.strip()]
    for m in names:
        if m not in METHODS:
            raise FgdilpError(f"unknown method {m!r} (one of {', '.join(METHODS)})")
    if not names:
        raise FgdilpError("no method given")
    return names


@main.command()
@model_options
@friendly_errors
def info(**kw):
    """Print the model's shape and whether the kqv_out hook node exists."""
    from .generation import probe_kqv_out

    model, gen = _open(kw)
    with model, gen:
        i = model.info
        fired = probe_kqv_out(model, kw["threads"])
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
@steer_options
@sampling_options
@click.option("-p", "--prompt", default=DEFAULT_BENCH_PROMPT, show_default=True)
@click.option("--methods", default="none,tr", show_default=True, help="Comma-separated methods.")
@click.option("-n", "--n-predict", "n_predict", type=click.IntRange(2), default=64, show_default=True)
@click.option("-r", "--repeats", type=click.IntRange(1), default=3, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def bench(prompt, methods, n_predict, repeats, as_json, **kw):
    """Decode tokens/s of each method on the same prompt, side by side in one run."""
    names = _method_list(methods)
    if "none" not in names:
        names.insert(0, "none")
    sampling = _sampling(kw)
    model, gen = _open(kw)
    speeds: dict[str, list[float]] = {m: [] for m in names}
    prefill: dict[str, list[float]] = {m: [] for m in names}
    with model, gen:
        for m in names:  # warm-up: contexts, caches, first-use allocations
            gen.generate(prompt, m, 4, sampling, stop_at_eog=False)
        for _ in range(repeats):  # interleaved so that machine noise hits every method alike
            for m in names:
                r = gen.generate(prompt, m, n_predict, sampling, stop_at_eog=False)
                speeds[m].append(r.tokens_per_s)
                prefill[m].append(r.prefill_s)
        base = statistics.median(speeds["none"])
        out = {"model": model.info.path, "n_predict": n_predict, "repeats": repeats,
               "threads": kw["threads"] or os.cpu_count(), "methods": {}}
        for m in names:
            tps = statistics.median(speeds[m])
            out["methods"][m] = {"tokens_per_s": round(tps, 3), "ratio_vs_none": round(tps / base, 4),
                                 "prefill_s": round(statistics.median(prefill[m]), 4),
                                 "runs_tokens_per_s": [round(x, 3) for x in speeds[m]]}
    if as_json:
        click.echo(json.dumps(out))
        return
    click.echo(f"model {out['model']}  n={n_predict}  repeats={repeats}  threads={out['threads']}")
    click.echo(f"{'method':<10}{'tokens/s':>10}{'ratio':>8}{'prefill s':>11}")
    for m, r in out["methods"].items():
        click.echo(f"{m:<10}{r['tokens_per_s']:>10.2f}{r['ratio_vs_none']:>8.3f}{r['prefill_s']:>11.3f}")


if __name__ == "__main__":
    main()
