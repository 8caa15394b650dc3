"""`bench --memory --json` on every shape of issue 26: the embedded models (gemma-3-270m, SmolLM2-135M)
and random-weight llama GGUFs of ~1.1B and ~3.0B parameters built here (Q8_0, tools/gpu_bench.py),
one JSON object per shape:

    python tools/memory_bench.py --work-dir DIR --out mem.json [--shapes gemma,smollm2,1b,3b]

Random models have no chat template in their GGUF: they chat in ChatML (its markers as plain
text); the embedded gemma-3-270m base model in llama.cpp's built-in gemma format. Extra flags
after `--` go to every `bench` run (e.g. -- --contrast reply).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))


def model_path(shape: str, work: Path) -> tuple[str, dict]:
    """The model file of a shape (built if missing) and what to record about it."""
    if shape == "gemma":
        from fgdilp_cpp.models import default_model_path

        return str(default_model_path()), {}
    if shape == "smollm2":
        from fgdilp_cpp.models import default_chat_model_path

        return str(default_chat_model_path()), {}
    from gpu_bench import SHAPES, build_random_llama

    path = work / f"random-llama-{shape}-q8_0.gguf"
    if not path.exists():
        built = build_random_llama(path.with_suffix(".part"), SHAPES[shape], q8_0=True)
        path.with_suffix(".part").rename(path)
        return str(path), {"built": {**built, "path": path.name}}
    return str(path), {}


# ---- "before": the memory half of bench --memory against another checkout (its code as it was) ----
CACHE_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32}


def _import_from_pythonpath() -> None:
    """The worker measures the checkout on PYTHONPATH: an editable install's import hook (this
    checkout's .venv: scikit-build-core's redirecting finder) would give this checkout's code
    instead, so it is taken off; the import is then checked."""
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__]
    import fgdilp_cpp

    tree = os.environ.get("PYTHONPATH", "").split(os.pathsep)[0]
    if not tree or not Path(fgdilp_cpp.__file__).resolve().is_relative_to(Path(tree).resolve()):
        raise SystemExit(f"the worker imported {fgdilp_cpp.__file__}, not the checkout at {tree!r}")


def before_worker(spec: dict) -> dict:
    """bench_memory._worker's chat and serve runs with only the API both checkouts have; KV bytes
    from the contexts' cells (Generator._ctx) and the model's shape."""
    import numpy as np

    from fgdilp_cpp.api import Detoxifier
    from fgdilp_cpp.bench import chat_turns
    from fgdilp_cpp.errors import FgdilpError
    from fgdilp_cpp.generation import identity_of
    from fgdilp_cpp.method.vectors import HeadDirections, random_heads
    try:
        from fgdilp_cpp.serve.model_queue import ModelQueue
        from fgdilp_cpp.serve.openai_api import GenRequest
    except ModuleNotFoundError:            # a checkout from before the serve/ package
        from fgdilp_cpp.model_queue import ModelQueue  # type: ignore[no-redef]
        from fgdilp_cpp.openai_api import GenRequest  # type: ignore[no-redef]
    from fgdilp_cpp.profiles import find_universal
    from fgdilp_cpp.settings import Settings

    known = Settings.field_names()          # the other checkout's settings may be fewer
    import inspect

    # never a fast setup (a checkout that has one): the model is measured as it stands
    no_setup = {"auto_setup": False} if "auto_setup" in inspect.signature(Detoxifier).parameters else {}
    settings = Settings()
    for k, v in spec["settings"].items():     # values renamed since (edit subtract, was tr) keep its default
        if k in known:
            try:
                settings = settings.updated({k: v})
            except FgdilpError:
                pass
    det = Detoxifier(settings, chat=True, sources=spec["sources"], **no_setup)
    gen = getattr(det, "generator", None) or det._gen      # public since issue 24
    i = det.model.info
    if find_universal(det.model.fingerprint()["weights_sha256"]) is None:
        rows = np.full((i.n_layer, i.n_head, i.head_dim), 0.05, np.float32)
        import inspect

        named = "source" if "source" in inspect.signature(HeadDirections).parameters else "method"   # renamed since
        v = HeadDirections(directions=random_heads(rows, 0).astype(np.float32), e=None, model=identity_of(det.model),
                           settings={}, **{named: "random"}).validate()
        if hasattr(gen, "use_universal"):
            gen.use_universal(v)
        else:                               # a checkout from before Generator.use_universal
            gen.rt.universal = lambda: v
    users, reply = chat_turns(spec["turns"]), spec["reply_tokens"]
    if spec["mode"] == "serve":
        queue = ModelQueue(det, 16, tuple(spec["methods"]))
        queue.start().result()
        for m in spec["methods"]:
            req = GenRequest([{"role": "user", "content": users[0]}], None, {"method": m, "n_predict": reply, "seed": 1})
            queue.submit(req)[1].result()
        queue.close()
    else:
        msgs: list[dict] = []
        for k, text in enumerate(users):
            msgs.append({"role": "user", "content": text})
            msgs.append({"role": "assistant", "content": det.chat(msgs, method=spec["methods"][0], n_predict=reply,
                                                                  seed=42 + k).text})
    k_len = det.model.meta(f"{i.architecture}.attention.key_length")
    s = det.settings
    cell = i.n_layer * i.n_head_kv * (int(k_len or i.n_embd // i.n_head) * CACHE_BYTES[s.cache_type_k]
                                      + i.head_dim * CACHE_BYTES[s.cache_type_v])
    cells = sum(c.n_ctx for c in gen._ctx.values())
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
    return {"peak_rss_mib": round(peak, 1), "kv_mib": round(cells * cell / 2**20, 2), "kv_cells": cells}


def run_before(tree: Path, path: str, env: dict, args) -> dict:
    """Per method a chat's, and serve's with every method, peak RSS and KV with the code of `tree`."""
    from fgdilp_cpp.settings import Settings

    from fgdilp_cpp.chat import CHAT_DEFAULTS

    over = {"model": path, "ctx_size": args.ctx_size, "threads": args.threads}
    if env.get("FGDILP_CHAT_TEMPLATE"):
        over["chat_template"] = env["FGDILP_CHAT_TEMPLATE"]
    for flag, value in zip(args.extra[::2], args.extra[1::2]):      # "--selfgen-samples 2" -> selfgen_samples
        for kind in (int, float, str):
            try:
                over[flag.lstrip("-").replace("-", "_")] = kind(value)
                break
            except ValueError:
                continue
    settings = Settings().updated(CHAT_DEFAULTS).updated(over).as_dict()
    sources = {k: "flag" for k in over}
    names = args.methods.split(",")
    out: dict = {"tree": tree.name, "methods": {}}

    def one(methods: list[str], mode: str) -> dict:
        spec = {"settings": settings, "sources": sources, "methods": methods, "turns": args.turns,
                "reply_tokens": 24, "mode": mode}
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                              env={**env, "PYTHONPATH": str(tree)}, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
        return json.loads(proc.stdout.strip().splitlines()[-1])

    for m in names:
        out["methods"][m] = one([m], "chat")
    out["serve"] = {"none": one(["none"], "serve"), "all": one(names, "serve")}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work-dir", required=True, type=Path, help="where the random models are built (kept)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--shapes", default="gemma,smollm2,1b,3b")
    ap.add_argument("-c", "--ctx-size", type=int, default=4096)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("-n", "--decode-tokens", type=int, default=32)
    ap.add_argument("-r", "--repeats", type=int, default=2)
    ap.add_argument("--methods", default="none,universal,tr,fgdilp")
    ap.add_argument("--before-tree", type=Path, default=None,
                    help="also the memory half (peak RSS, KV) with the code of this checkout (e.g. main before)")
    ap.add_argument("--skip-after", action="store_true", help="only the --before-tree figures")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("extra", nargs="*", help="flags passed to every bench run (after --)")
    if "--worker" in sys.argv:
        _import_from_pythonpath()
        spec = json.loads(sys.argv[sys.argv.index("--worker") + 1])
        print(json.dumps(before_worker(spec)))
        return
    args = ap.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    for shape in args.shapes.split(","):
        path, info = model_path(shape, args.work_dir)
        env = dict(os.environ)
        if shape not in ("gemma", "smollm2"):
            env["FGDILP_CHAT_TEMPLATE"] = "chatml"
        elif shape == "gemma":        # the embedded base model's GGUF has no template: its family's own
            env["FGDILP_CHAT_TEMPLATE"] = "gemma"
        cmd = [sys.executable, "-m", "fgdilp_cpp.cli", "bench", "--memory", "--json", "-m", path,
               "-c", str(args.ctx_size), "-t", str(args.threads), "--turns", str(args.turns),
               "-n", str(args.decode_tokens), "-r", str(args.repeats), "--methods", args.methods, *args.extra]
        t0 = time.perf_counter()
        if args.before_tree is not None:
            results.setdefault(shape, {})["before"] = run_before(args.before_tree, path, env, args)
            args.out.write_text(json.dumps(results, indent=1))
        if args.skip_after:
            continue
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            print(f"{shape}: failed: {proc.stderr.strip()[-2000:]}", file=sys.stderr)
            continue
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        results[shape] = {**results.get(shape, {}), **info, "wall_s": round(time.perf_counter() - t0, 1),
                          "command": " ".join(["fgdilp-cpp", *cmd[3:]]).replace(path, Path(path).name), **out}
        args.out.write_text(json.dumps(results, indent=1))
        print(f"{shape}: done in {results[shape]['wall_s']} s", file=sys.stderr)


if __name__ == "__main__":
    main()
