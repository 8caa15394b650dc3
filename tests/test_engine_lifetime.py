"""Lifetimes of llama.cpp objects at the edges: a model closed before its contexts, and contexts
freed while the interpreter shuts down (an eval killed by SIGTERM mid-run exited with SIGSEGV)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from fgdilp_cpp.engine.context import Context, ContextParams, Model

SMALL = ContextParams(n_ctx=64, n_batch=8, n_threads=1)


def test_closing_the_model_closes_its_contexts_first(tiny_llama):
    model = Model(tiny_llama[0])
    kept, other = Context(model, SMALL), Context(model, SMALL)
    other.close()
    model.close()
    assert kept.ptr is None and model.ptr is None       # freed before the weights, not after
    kept.close()                                          # closing again frees nothing twice


def test_a_context_made_after_others_closed_is_still_tracked(tiny_llama):
    with Model(tiny_llama[0]) as model:
        Context(model, SMALL).close()
        late = Context(model, SMALL)
    assert late.ptr is None


def _run(script: str, model_path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-X", "faulthandler", "-c", textwrap.dedent(script), str(model_path)],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def test_a_context_freed_after_the_log_callback_is_gone_does_not_crash(tiny_llama):
    # what the shutdown does: the module's globals (the Python log callback) are cleared, and a
    # context nobody closed is freed after them; llama.cpp logs as it frees a context
    script = """
        import gc, sys
        import fgdilp_cpp.engine.context as ec
        model = ec.Model(sys.argv[1])
        ctx = ec.Context(model, ec.ContextParams(n_ctx=64, n_batch=8, n_threads=1))
        {switch}
        del ec._log_callback
        gc.collect()
        ctx.close()
        model.close()
        print("closed", flush=True)
    """
    done = _run(script.format(switch="ec._log_to_nothing()"), tiny_llama[0])
    assert done.returncode == 0 and done.stdout.split() == ["closed"], done.stderr
    # the same without the switch is the crash this guards against (the test can fail)
    crashed = _run(script.format(switch="pass"), tiny_llama[0])
    assert crashed.returncode != 0 and "Segmentation fault" in crashed.stderr


def test_the_switch_is_registered_to_run_at_exit(tiny_llama):
    # a model and context left in a reference cycle to the end, freed by a collection that runs
    # after fgdilp's own exit handler (registered before it: exit handlers run last-in first-out):
    # exit status 0, and the context's "~llama_context" line never reaches the Python callback
    script = """
        import atexit, gc, sys
        {at_exit}
        import fgdilp_cpp.engine.context as ec
        model = ec.Model(sys.argv[1])
        ctx = ec.Context(model, ec.ContextParams(n_ctx=64, n_batch=8, n_threads=1))
        ec.set_verbose(True)              # the Python callback copies every llama.cpp line to stderr
        gc.disable()
        class Cycle: pass
        c = Cycle(); c.me, c.ctx, c.model = c, ctx, model
        del c, ctx, model
        {now}
    """
    done = _run(script.format(at_exit="atexit.register(gc.collect)", now="pass"), tiny_llama[0])
    assert done.returncode == 0, done.stderr
    assert "~llama_context" not in done.stderr
    shown = _run(script.format(at_exit="pass", now="gc.collect()"), tiny_llama[0])
    assert "~llama_context" in shown.stderr       # freed before exit, the same context logs
