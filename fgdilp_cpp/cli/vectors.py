"""`fgdilp-cpp vectors` (build, export, inspect): saved head directions, a thin command over the API."""

from __future__ import annotations

import json
import math
import os
import shlex
import time
from dataclasses import replace
from pathlib import Path

import click

from .. import methods
from .options import _detoxifier, _settings, friendly_errors, model_options, sampling_options, steer_options
from ..errors import FgdilpError
from ..method.sources import FGDILP_INSTANCES, LABELLED_TEXT, SHORT_NAMES, SOURCES, source_named


class SourceChoice(click.Choice):
    """--from: a source's name (method.sources), or the short word it had before (tr, fgdilp, data),
    still read but no longer shown."""

    def __init__(self) -> None:
        super().__init__(SOURCES)

    def convert(self, value, param, ctx):
        return super().convert(source_named(value) if value in SHORT_NAMES else value, param, ctx)


@click.group()
def vectors() -> None:
    """Build, apply and inspect saved head directions (frozen FGDILP, universal, from labelled text)."""


@vectors.command("build")
@model_options
@sampling_options
@steer_options
@click.option("-p", "--prompt", default=None, help="One prompt (FGDILP's frozen directions for it).")
@click.option("--prompts", "prompt_set", default=None, metavar="SET|FILE",
              help="Universal directions: average the prompt-end deltas over these prompts (built-in set or file).")
@click.option("--limit", type=click.IntRange(1), default=100, show_default=True, help="With --prompts: prompts used.")
@click.option("--offset", type=click.IntRange(0), default=0, show_default=True)
@click.option("--from", "source", type=SourceChoice(), default=None,
              help="Where the directions come from: TR's prefixes (default with --prompts) or FGDILP's instance "
                   "prefixes with --diagnoser, each a prompt-end delta; labelled-text: toxic minus clean labelled "
                   "texts (--labelled-texts), at the strength of TR's delta over --prompts (reply contrast). "
                   "Without it, -p saves FGDILP's frozen directions for the prompt.")
@click.option("--probe-top-k", type=click.IntRange(0), default=0, show_default=True,
              help="Steer only the K heads whose toxicity probes are most accurate (0 = every head).")
@click.option("--probe-weights", is_flag=True, help="Weight heads by probe accuracy (accuracy - 0.5, best = 1).")
@click.option("--labelled-texts", "probe_prompts", default="rtp-toxic", show_default=True, metavar="SET|FILE",
              help="RTP records whose continuations, labelled by their Perspective toxicity, are the texts of "
                   "--from labelled-text and of the head probes.")
@click.option("--labelled-offset", "probe_offset", type=click.IntRange(0), default=1000, show_default=True,
              help="First labelled record (default: past the development and held-out slices).")
@click.option("--labelled-per-class", "probe_per_class", type=click.IntRange(4), default=150, show_default=True,
              help="Toxic (>= 0.5) and clean (< 0.1) continuations each.")
# their names before: they choose the texts of --from labelled-text too, not only the probes'
@click.option("--probe-prompts", "old_prompts", default=None, hidden=True)
@click.option("--probe-offset", "old_offset", type=click.IntRange(0), default=None, hidden=True)
@click.option("--probe-per-class", "old_per_class", type=click.IntRange(4), default=None, hidden=True)
@click.option("--chat", "chat_mode", is_flag=True,
              help="Each prompt is a user message in the model's chat template (directions for chat).")
@click.option("--texts-as-replies", "as_replies", is_flag=True,
              help="With --from labelled-text --chat: read each labelled text as the assistant's reply to its RTP "
                   "prompt in the chat template (averaged over the reply), not as plain text.")
@click.option("-o", "--output", default=None, metavar="OUT.gguf")
@click.option("--install", is_flag=True,
              help=f"With --prompts: save them as this model's universal directions (method {methods.UNIVERSAL}), "
                   "in the user's profile folder (the first of FGDILP_PROFILE_PATH where it is set).")
@click.option("--no-progress", is_flag=True)
@friendly_errors
def vectors_build(prompt, prompt_set, limit, offset, source, probe_top_k, probe_weights, probe_prompts, probe_offset,
                  probe_per_class, old_prompts, old_offset, old_per_class, chat_mode, as_replies, output, install,
                  no_progress, **kw):
    """Save per-head directions: FGDILP's for one PROMPT, universal ones averaged over --prompts, or
    the toxic-minus-clean contrast of labelled texts (--from labelled-text); optionally with head
    selection by toxicity probes."""
    from ..evaluation.prompts import load_prompts
    from ..universal import DEFAULT_SOURCE, labelled_records, optional_progress

    probe_prompts = _former("probe_prompts", probe_prompts, old_prompts, "--labelled-texts", "--probe-prompts")
    probe_offset = _former("probe_offset", probe_offset, old_offset, "--labelled-offset", "--probe-offset")
    probe_per_class = _former("probe_per_class", probe_per_class, old_per_class, "--labelled-per-class",
                              "--probe-per-class")

    if (prompt is None) == (prompt_set is None):
        raise FgdilpError("give one prompt with -p TEXT or a prompt set with --prompts SET (one of them)")
    if install and prompt_set is None:
        raise FgdilpError("--install saves universal directions: build them over a prompt set (--prompts SET)")
    if source == LABELLED_TEXT and prompt_set is None:
        raise FgdilpError(f"--from {LABELLED_TEXT} takes its strength from TR's delta over a prompt set: "
                          "give --prompts SET")
    if as_replies and not (source == LABELLED_TEXT and chat_mode):
        raise FgdilpError(f"--texts-as-replies reads labelled texts as chat replies: it needs --from {LABELLED_TEXT} "
                          "--chat")
    if output is None and not install:
        raise FgdilpError("say where to save them: -o OUT.gguf, or --install (with --prompts)")
    s = _settings(kw)
    with _detoxifier(s) as det:
        labelled = []           # the labelled RTP records (--from data and the probes), loaded once

        def labelled_set():
            if not labelled:
                labelled.extend(labelled_records(load_prompts(probe_prompts, None, probe_offset), probe_per_class))
            return labelled

        if prompt is not None and source is None:     # FGDILP's frozen directions for one prompt
            if not no_progress:     # one status line: the setup runs for a minute with nothing to count
                click.echo(f"building FGDILP's directions for the prompt: {s.selfgen_samples} candidate "
                           "continuations, their self-diagnosis and the prefixes (this can take a minute) ...",
                           err=True)
            started = time.monotonic()
            hd = det.build_vectors(prompt, FGDILP_INSTANCES, chat=chat_mode)
            if not no_progress:
                click.echo(f"built in {time.monotonic() - started:.1f} s", err=True)
        elif source == LABELLED_TEXT:
            chosen, labels, how = labelled_set()
            hd = det.build_vectors([r.text for r in load_prompts(prompt_set, limit, offset)], LABELLED_TEXT,
                                   chat=chat_mode, texts=[r.continuation for r in chosen], toxic=list(labels),
                                   labels={**how, "prompts": probe_prompts, "offset": probe_offset},
                                   reply_to=[r.text for r in chosen] if chat_mode and as_replies else None,
                                   progress=optional_progress(not no_progress, "prompts"))
        else:
            texts = [prompt] if prompt is not None else [r.text for r in load_prompts(prompt_set, limit, offset)]
            hd = det.build_vectors(texts, source or DEFAULT_SOURCE, chat=chat_mode,
                                   progress=optional_progress(not no_progress, "prompts"))
        if prompt_set is not None:
            hd = replace(hd, settings={**hd.settings, "universal": {**hd.settings["universal"], "prompts": prompt_set,
                                                                    "limit": limit, "offset": offset}})
        if probe_top_k or probe_weights:
            from ..analysis import probe_heads
            from ..method.probes import head_weights

            chosen, labels, how = labelled_set()
            res = probe_heads(det, [r.continuation for r in chosen], labels)
            w = head_weights(res.accuracy, probe_top_k, probe_weights)
            hd = hd.with_head_weights(w, res.accuracy, {**how, "prompts": probe_prompts, "offset": probe_offset,
                                                        "top_k": probe_top_k, "by_accuracy": probe_weights,
                                                        "n_train": res.n_train, "n_test": res.n_test})
        targets = ([output] if output else []) + ([str(_install_path(det))] if install else [])
        for target in targets:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            hd.save(target)
        click.echo(f"wrote {', '.join(targets)}: {hd.source}, {hd.n_layer} layers x {hd.n_head} heads x {hd.head_dim}, "
                   f"|delta| per layer max {hd.layer_norms().max():.3f}")
        if hd.head_weights is not None:
            click.echo(f"head selection: {int((hd.head_weights > 0).sum())} of {hd.head_weights.size} heads steered; "
                       f"probe accuracy max {hd.probe_accuracy.max():.3f}, mean {hd.probe_accuracy.mean():.3f}")


def _former(param: str, value, former, flag: str, old_flag: str):
    """The value of option `param` (--labelled-texts ...), or the one given with its former name
    (--probe-prompts ...); both given is refused (which one is meant?)."""
    if former is None:
        return value
    if click.get_current_context().get_parameter_source(param) != click.core.ParameterSource.DEFAULT:
        raise FgdilpError(f"{flag} and its former name {old_flag} were both given: give one")
    return former


@vectors.command("export")
@click.argument("path")
@click.option("--cvec", "cvec_path", required=True, metavar="OUT.gguf",
              help="llama.cpp control-vector file (for llama-cli / llama-server --control-vector-scaled).")
@click.option("-m", "--model", "model", type=str, default=None, metavar="MODEL.gguf",
              help="The model the vectors were built for (default: the embedded gemma-3-270m).")
@click.option("--scale", "--steer-scale", "scale", type=float, default=None,
              help="Strength llama.cpp applies them at (default: the model's profile entry for cvec, else 1).")
@click.option("--layer-range", nargs=2, type=int, default=None, metavar="START END",
              help="Blocks steered, inclusive (default: the model's profile entry for cvec, else every block); "
                   "only these are written to the file.")
@click.option("--exp-norm", type=float, default=None, help="Exponent a of lambda_norm (default: the profile's, else 0.4).")
@friendly_errors
def vectors_export(path, cvec_path, model, scale, layer_range, exp_norm):
    """Write head directions as a llama.cpp residual control vector: direction.<il> =
    -W_O(lambda_norm * delta) of block il, added by llama.cpp at the output of block il (block 0
    has no slot). The file holds them at scale 1 on the chosen blocks; the scale and range go into
    its metadata and into the llama-cli / llama-server flags printed at the end."""
    from ..analysis import control_vector
    from ..method.cvec import llama_flags, save_control_vector
    from ..method.vectors import HeadDirections
    from ..settings import Settings

    for name, value in (("--scale", scale), ("--exp-norm", exp_norm)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise FgdilpError(f"{name} must be a positive number, not {value}")
    hd = HeadDirections.load(path)
    # the model's profile as every command finds it (FGDILP_PROFILE=0 turns it off here too); a model
    # without one has the measured-safe entry of the stand-in profile (safe_defaults.py)
    from_env = {k: v for k, v in Settings.from_env(os.environ).items() if k == "profile"}
    with _detoxifier(Settings(model=model).updated(from_env)) as det:
        entry = det.profile.settings_for(CVEC_ENTRY) if det.profile is not None else {}
        chosen = {"scale": (scale, entry.get("steer_scale"), 1.0),
                  "layers": (layer_range, entry.get("steer_layer_range"), None)}
        (scale, layer_range), origin = _pick(chosen)
        exp_norm = exp_norm if exp_norm is not None else entry.get("exp_norm", 0.4)
        vec = control_vector(det, hd, exp_norm, 1.0)           # scale 1 in the file: llama.cpp scales it
        try:
            start, end = save_control_vector(cvec_path, vec, det.model.info.architecture,
                                             tuple(layer_range) if layer_range else None, scale)
        except ValueError as exc:
            raise FgdilpError(f"--layer-range: {exc}") from None
        model_path = det.model.info.path
    click.echo(f"wrote {cvec_path}: {end - start + 1} layer vectors (direction.{start}..{end}) of width "
               f"{vec.shape[1]}; scale {scale:g}, layers {start}..{end} ({origin})")
    flags = llama_flags(cvec_path, scale, (start, end))
    click.echo("apply it in llama.cpp with these flags (the scale and blocks it is meant for; llama.cpp's "
               "defaults, x1 on every block, can wreck the text):")
    click.echo(f"  llama-cli -m {shlex.quote(model_path)} {flags}")
    click.echo(f"  llama-server -m {shlex.quote(model_path)} {flags}")


CVEC_ENTRY = "cvec"      # the profile entry whose steer_scale / steer_layer_range were calibrated for a control vector


def _pick(chosen: dict) -> tuple[list, str]:
    """Each value from its flag, else the profile, else the default; and a note of where they came from."""
    values, notes = [], []
    for name, (flag, profile, default) in chosen.items():
        if flag is not None:
            values.append(flag)
            notes.append(f"{name}: flag")
        elif profile is not None:
            values.append(profile)
            notes.append(f"{name}: the model's profile")
        else:
            values.append(default)
            notes.append(f"{name}: default")
    return values, "; ".join(notes)


@vectors.command("inspect")
@click.argument("path")
@friendly_errors
def vectors_inspect(path):
    """Print shapes, norms and metadata of a vectors file."""
    from ..method.vectors import HeadDirections

    hd = HeadDirections.load(path)
    click.echo(f"model        {hd.model.describe()}")
    fp = hd.model
    click.echo("fingerprint  " + (f"weights {fp.weights_sha256[:16]}, vocabulary {fp.vocab_sha256[:16]}" if fp.weights_sha256
                                  else "none (an older file: refused for steering; build it again)"))
    click.echo(f"source       {hd.source}")
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


def _install_path(det) -> Path:
    """Where --install puts a model's universal directions (found by method universal)."""
    from ..profiles import search_path, universal_path_for

    return universal_path_for(det.model.fingerprint()["weights_sha256"], search_path()[0])
