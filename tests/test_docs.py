"""The docs cannot rot: every code block of README.md and docs/*.md runs, or says why not.

A `sh` or `python` block runs as written (real_model: it loads the embedded models), with
`.venv/bin/` mapped to this interpreter, two threads and 8 tokens unless the block says otherwise
(FGDILP_THREADS, FGDILP_N_PREDICT: a flag in the block wins), in a scratch folder where
`fgdilp_cpp/` is the package. A block that cannot run in a test (a server that runs until
stopped, llama-cli, `make test` itself) follows a line `<!-- no-test: why -->`; then its syntax is
checked (Python compiles, `bash -n`), every fgdilp-cpp call is parsed by the CLI itself (unknown
flags, bad values and missing required options fail), `make` targets must exist and llama-cli
flags must be llama.cpp's. The server examples run against a server started here on a free port.
Every relative link resolves (file and heading), and docs/cli.md is what
scripts/cli_reference.py writes.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import click
import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINKED = PAGES + sorted((ROOT / "docs" / "results").glob("*.md"))
FENCE = re.compile(r"^(?:<!--\s*no-test:(?P<why>[^\n]*?)-->\n)?```(?P<lang>[\w-]*)\n(?P<body>.*?)^```[ \t]*$",
                   re.MULTILINE | re.DOTALL)
SHELL = {"sh", "bash", "shell"}
SERVER_PORT = "8080"                 # the port the docs' server examples use
# llama.cpp's flags the docs use, with the number of values each takes (common/arg.cpp)
LLAMA_FLAGS = {"-m": 1, "--model": 1, "-p": 1, "--prompt": 1, "-n": 1, "-c": 1, "-t": 1, "-ngl": 1,
               "--control-vector": 1, "--control-vector-scaled": 2, "--control-vector-layer-range": 2}


@dataclass(frozen=True)
class Block:
    page: str
    line: int
    lang: str
    body: str
    why: Optional[str]               # the no-test reason, or None: the block runs

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def blocks() -> list[Block]:
    out = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for m in FENCE.finditer(text):
            line = text.count("\n", 0, m.start("lang")) + 1
            why = m.group("why").strip() if m.group("why") is not None else None
            out.append(Block(str(page.relative_to(ROOT)), line, m.group("lang"), m.group("body"), why))
    return out


def code_blocks() -> list[Block]:
    return [b for b in blocks() if b.lang in SHELL | {"python"}]


def commands(body: str) -> list[list[str]]:
    """The shell commands of a block as argument lists: continuations joined, comments dropped,
    each pipeline cut at its first operator (what follows a pipe is not ours to parse)."""
    out = []
    for line in body.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split, lexer.commenters = True, "#"
        words = list(lexer)
        cut = next((i for i, w in enumerate(words) if set(w) <= set("|&;<>()")), len(words))
        if words[:cut]:
            out.append(words[:cut])
    return out


def program(words: list[str]) -> str:
    return words[0].removeprefix(".venv/bin/")


def parse_cli(args: list[str]) -> None:
    """Parse a fgdilp-cpp call the way the CLI would, down to its (sub)command, without running it."""
    from fgdilp_cpp.cli import main

    cmd, name = main, "fgdilp-cpp"
    while True:
        ctx = cmd.make_context(name, list(args))
        if not isinstance(cmd, click.Group):
            return
        rest = [*getattr(ctx, "_protected_args", []), *ctx.args]
        if not rest:
            return
        name, cmd, args = cmd.resolve_command(ctx, rest)
        args = rest[1:]


# ---- checks of every block (no model loaded) -------------------------------------------------

def test_the_docs_have_code_blocks_and_say_why_where_one_cannot_run():
    found = code_blocks()
    pages = {b.page for b in found}
    assert {"README.md", "docs/server.md", "docs/results.md"} <= pages, pages
    runnable = [b for b in found if b.why is None]
    assert sum(b.page == "README.md" for b in runnable) >= 3, runnable
    assert all(b.why for b in found if b.why is not None), "a no-test marker without its reason"


def test_readme_is_short_and_names_the_two_commands():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 150
    assert "make demo" in text and "make test" in text
    assert (ROOT / ".ci" / "run").read_text().strip().endswith("make test")   # CI runs what the README says


@pytest.mark.parametrize("block", [b for b in code_blocks() if b.lang == "python"], ids=lambda b: b.id)
def test_python_blocks_compile(block):
    compile(block.body, block.id, "exec")


@pytest.mark.parametrize("block", [b for b in code_blocks() if b.lang in SHELL], ids=lambda b: b.id)
def test_shell_blocks_parse_and_their_calls_are_known(block, monkeypatch):
    subprocess.run(["bash", "-n", "-c", block.body], check=True)
    monkeypatch.chdir(ROOT)
    makefile = (ROOT / "Makefile").read_text()
    for words in commands(block.body):
        prog = program(words)
        if prog == "fgdilp-cpp":
            try:
                parse_cli(words[1:])
            except click.exceptions.Exit:         # --help / --version parse and exit
                pass
            except click.ClickException as exc:
                pytest.fail(f"{block.id}: {' '.join(words)}: {exc.format_message()}")
        elif prog == "make":
            for target in words[1:]:
                assert re.search(rf"^{re.escape(target)}:", makefile, re.MULTILINE), f"{block.id}: make {target}"
        elif prog in ("llama-cli", "llama-server"):
            i = 1
            while i < len(words):
                assert words[i] in LLAMA_FLAGS, f"{block.id}: {words[i]} is not a llama.cpp flag the docs know"
                values = words[i + 1:i + 1 + LLAMA_FLAGS[words[i]]]
                assert len(values) == LLAMA_FLAGS[words[i]] and not any(v.startswith("-") for v in values), words
                i += 1 + LLAMA_FLAGS[words[i]]
        else:
            assert prog in ("python", "curl", "time") or re.fullmatch(r"[A-Z_]+=.*", prog), \
                f"{block.id}: {prog}: a command the docs test does not know"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.MULTILINE | re.DOTALL)
    return {_slug(m) for m in re.findall(r"^#{1,6} (.+)$", text, re.MULTILINE)}


@pytest.mark.parametrize("page", LINKED, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.MULTILINE | re.DOTALL)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue                              # http(s), mailto: not checked offline
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)}: links that lead nowhere: {broken}"


def test_cli_reference_is_current():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "cli_reference.py"), "--check"],
                         env=_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_cli_reference_lists_every_command_and_option():
    """Beside the exact check: each command has its section and each of its long flags appears
    (a hidden one, a former name still read, is left out as --help leaves it out)."""
    from fgdilp_cpp.cli import main

    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")

    def walk(group, path):
        ctx = click.Context(group)
        for name in group.list_commands(ctx):
            cmd = group.get_command(ctx, name)
            assert f"\n## {' '.join(path + [name])}\n" in text, path + [name]
            for p in cmd.params:
                if getattr(p, "hidden", False):
                    assert not any(f"`{flag}" in text for flag in p.opts), (name, p.opts)
                    continue
                for flag in [*p.opts, *p.secondary_opts]:
                    if flag.startswith("--"):
                        assert f"`{flag}" in text or f" {flag}" in text, (name, flag)
            if isinstance(cmd, click.Group):
                walk(cmd, path + [name])

    walk(main, [])


# ---- running the blocks (the embedded models) ------------------------------------------------

def _env(tmp: Optional[Path] = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.pop("FGDILP_PROFILE_PATH", None)  # the docs show the shipped profiles at work, as a user meets them
    env.pop("FGDILP_PROFILE", None)
    env.setdefault("FGDILP_THREADS", "2")
    env.setdefault("FGDILP_N_PREDICT", "8")
    if tmp is not None:                   # chats saved, vectors installed: in the scratch folder
        env["XDG_DATA_HOME"], env["XDG_CONFIG_HOME"] = str(tmp / "data"), str(tmp / "config")
        env["PATH"] = os.pathsep.join([str(tmp / "bin"), env.get("PATH", "")])
    return env


def _workspace(tmp: Path) -> Path:
    """A scratch folder that looks like the checkout to a block: fgdilp_cpp/, and .venv/bin's
    programs on PATH (the block's `.venv/bin/` prefix is dropped)."""
    (tmp / "bin").mkdir(parents=True)
    for name, args in (("fgdilp-cpp", "-m fgdilp_cpp.cli"), ("python", "")):
        shim = tmp / "bin" / name
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" {args} "$@"\n')
        shim.chmod(0o755)
    (tmp / "fgdilp_cpp").symlink_to(ROOT / "fgdilp_cpp")
    return tmp


def _run(block: Block, tmp: Path, body: Optional[str] = None, timeout: int = 600) -> subprocess.CompletedProcess:
    body = block.body if body is None else body
    if block.lang == "python":
        argv = [sys.executable, "-c", body]
    else:
        argv = ["bash", "-euo", "pipefail", "-c", body.replace(".venv/bin/", "")]
    out = subprocess.run(argv, cwd=_workspace(tmp), env=_env(tmp), input="Hello there!\n/exit\n",
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{block.id} exited {out.returncode}:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    assert "Traceback" not in out.stderr, f"{block.id}:\n{out.stderr[-3000:]}"
    return out


@pytest.mark.real_model
@pytest.mark.parametrize("block", [b for b in code_blocks() if b.why is None], ids=lambda b: b.id)
def test_block_runs(block, tmp_path):
    out = _run(block, tmp_path)
    assert out.stdout.strip(), f"{block.id} printed nothing"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_block() -> Block:
    found = [b for b in code_blocks() if b.page == "README.md" and "fgdilp-cpp serve" in b.body]
    assert len(found) == 1, found
    return found[0]


@pytest.mark.real_model
def test_server_examples_run_against_the_readme_server(tmp_path):
    """The README's serve command on a free port; then every block of the docs that talks to
    127.0.0.1:8080 (the `openai` client, curl) with that port, each answered."""
    port = str(_free_port())
    words = commands(_serve_block().body)[0]
    assert words[words.index("--port") + 1] == SERVER_PORT
    words[words.index("--port") + 1] = port
    ws = _workspace(tmp_path)
    server = subprocess.Popen([sys.executable, "-m", "fgdilp_cpp.cli", *words[1:]], cwd=ws, env=_env(tmp_path),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, server.stdout.read()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if json.load(r).get("status") == "ok":
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.5)
        clients = [b for b in code_blocks() if f"127.0.0.1:{SERVER_PORT}" in b.body and b is not _serve_block()
                   and "fgdilp-cpp serve" not in b.body]
        assert {b.lang for b in clients} >= {"python", "sh"}, clients
        for block in clients:
            body = block.body.replace(f"127.0.0.1:{SERVER_PORT}", f"127.0.0.1:{port}")
            if block.lang in SHELL:
                body = body.replace("curl -s ", "curl -sf ")       # an HTTP error fails the block
            out = _run(block, tmp_path / block.id.replace("/", "_").replace(":", "_"), body, timeout=300)
            assert out.stdout.strip(), f"{block.id} printed nothing"
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
