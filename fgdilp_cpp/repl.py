"""The interactive chat session behind `fgdilp-cpp chat`.

Keys: Enter sends; a line `\"\"\"` starts and ends a multi-line message; Ctrl-C stops a reply
(a second Ctrl-C, or one at the prompt, leaves with exit code 130); Ctrl-D leaves (0).
Every turn is saved to the session file as it ends, so a crash or Ctrl-C loses nothing: written
through files.write_atomic (a unique temp file, mode 0600, fsync, atomic rename; a symlink in its
place is refused) in a folder created 0700. `--no-history`, FGDILP_HISTORY=0 or `history = false`
in the config file turn the autosave off (an explicit /save still writes).
"""

from __future__ import annotations

import dataclasses
import importlib
import datetime as dt
import json
import os
import signal
import sys
from pathlib import Path
from typing import Optional

from . import methods
from .errors import FgdilpError
from .explain import explain_lines
from .files import make_private_dir, write_atomic

HELP = """commands:
  /help            this list
  /clear           start a new conversation (the system prompt stays)
  /method NAME     steer the next replies with NAME: {methods}
  /explain         how the last reply was steered (diagnosis, prefixes, |delta| per layer)
  /settings        the settings in force (* = interactive default of chat)
  /save FILE       write the conversation (.json, or text for any other suffix)
  /exit            leave (also Ctrl-D)
a line with three double quotes \"\"\" starts and ends a multi-line message;
Ctrl-C stops a reply, a second Ctrl-C leaves."""

SETUP_STATUS = "(writing candidate replies and scoring them ...)"
STOP_NOTES = {"length": "[reply cut at -n {n} tokens]", "context": "[context full]", "cancelled": "[stopped]"}


def default_history_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "fgdilp-cpp" / "chats"


class Session:
    """The conversation, the method in force and the session file."""

    def __init__(self, det, history_dir: Optional[str]):
        self.det, self.settings = det, det.settings
        self.method = det.settings.method
        self.messages: list[dict] = self._start()
        self.last_explain: dict = {}
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        folder = Path(history_dir) if history_dir else default_history_dir()
        # None: history is off, nothing is written unless asked for with /save
        self.path: Optional[Path] = folder / f"chat-{stamp}-{os.getpid()}.json" if det.settings.history else None

    def _start(self) -> list[dict]:
        sp = self.settings.system_prompt
        return [{"role": "system", "content": sp}] if sp else []

    def clear(self) -> None:
        self.messages = self._start()
        self.last_explain = {}

    def document(self) -> dict:
        return {"model": self.det.model.info.path, "method": self.method, "template": self.det.template.name,
                "settings": {k: v for k, v in dataclasses.asdict(self.settings).items() if v is not None},
                "messages": self.messages}

    def autosave(self) -> None:
        """Write the session file (atomically, private); failures are reported once, never fatal."""
        if self.path is None or not any(m["role"] == "assistant" for m in self.messages):
            return
        try:
            make_private_dir(self.path.parent)
            write_atomic(self.path, json.dumps(self.document(), indent=1, ensure_ascii=False), private=True)
        except (OSError, FgdilpError) as exc:
            if not getattr(self, "_warned", False):
                why = exc.strerror if isinstance(exc, OSError) else str(exc)
                print(f"(could not save the session to {self.path}: {why})", file=sys.stderr)
                self._warned = True

    def save(self, target: str) -> str:
        p = Path(target).expanduser()
        if p.suffix == ".json":
            text = json.dumps(self.document(), indent=1, ensure_ascii=False)
        else:
            text = "".join(f"{m['role']}: {m['content']}\n\n" for m in self.messages)
        p.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(p, text, private=True)      # a conversation is private wherever it is saved
        return str(p)


def read_message(prompt: str = "> ") -> Optional[str]:
    """One message from the user (None on Ctrl-D); multi-line between lines of three quotes."""
    line = input(prompt)
    if line.strip() != '"""':
        return line
    lines = []
    while True:
        line = input("... ")
        if line.strip() == '"""':
            return "\n".join(lines)
        lines.append(line)


def reply(session: Session, text: str, out=sys.stdout) -> None:
    """Stream the assistant's reply to `text`; Ctrl-C stops it (the part so far is kept)."""
    det = session.det
    candidate = session.messages + [{"role": "user", "content": text}]
    turn = sum(m["role"] == "assistant" for m in session.messages)
    stream = det.stream_chat(candidate, explain=True, method=session.method, seed=det.settings.seed + turn)
    if stream.fitted.dropped:
        print(f"(the context is full: the {stream.fitted.dropped} oldest messages were dropped)", file=sys.stderr)
    pieces: list[str] = []
    interrupts = [0]
    # FGDILP's per-reply setup takes seconds: say what is going on (on a terminal only)
    status = SETUP_STATUS if (methods.get(session.method).instance and det.vectors is None
                              and out.isatty()) else ""
    if status:
        out.write(status)
        out.flush()

    def on_sigint(signum, frame):        # never raises: the decode stops first, then we leave
        interrupts[0] += 1
        det.cancel()

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        for piece in stream:
            if not any(pieces):
                piece = piece.lstrip()
                if piece and status:
                    out.write("\r" + " " * len(status) + "\r")
                    status = ""
            pieces.append(piece)
            out.write(piece)
            out.flush()
    finally:
        stream.close()                      # the worker is joined before anything else happens
        if status:
            out.write("\r" + " " * len(status) + "\r")
        signal.signal(signal.SIGINT, previous)
        answer = "".join(pieces).replace("\x00", "").strip()   # a C string cannot hold NUL
        if answer:      # the conversation as sent (after any trimming) plus the reply
            session.messages = [dict(m) for m in stream.fitted.messages] + [{"role": "assistant", "content": answer}]
            session.autosave()
    if interrupts[0] > 1:
        raise KeyboardInterrupt
    res = stream.result
    session.last_explain = res.explain if res is not None else {}
    reason = res.stop_reason if res is not None else "cancelled"
    note = STOP_NOTES.get(reason, "")
    out.write(("\n" + note.format(n=det.settings.n_predict) if note else "") + "\n")
    out.flush()


def show_settings(session: Session) -> None:
    """Each setting, * where it is an interactive default of chat, and where its value came from
    (flag, env, config, profile, default, ...)."""
    det = session.det
    s = dataclasses.asdict(det.settings)
    s["method"] = session.method
    sources = dict(det.sources)
    if session.method != det.settings.method:
        sources["method"] = "/method"
    defaults = det.chat_defaults
    print(f"model          {det.model.info.path}")
    print(f"chat template  {det.template.name}")
    print(f"profile file   {det.profile_path or ('none' if det.profile is None else 'given')}")
    for k, v in s.items():
        if k in ("model", "chat_template"):
            continue
        mark = "*" if k in defaults and v == defaults[k] else " "
        print(f"{k.replace('_', '-'):<20}{mark} {str(v):<14} ({sources.get(k, 'default')})")


def command(session: Session, line: str) -> bool:
    """Run a /command; False when the session should end."""
    name, _, arg = line[1:].partition(" ")
    arg = arg.strip()
    if name in ("exit", "quit", "q"):
        return False
    if name == "help":
        print(HELP.format(methods=", ".join(methods.names())))
    elif name == "clear":
        session.clear()
        print("(new conversation)")
    elif name == "method":
        if not methods.is_method(arg):
            print(f"usage: /method NAME, one of {', '.join(methods.names())} (now: {session.method})")
        else:
            session.method = arg
            print(f"(method: {arg})")
    elif name == "explain":
        print("\n".join(explain_lines(session.last_explain)) if session.last_explain else "(no reply to explain yet)")
    elif name == "settings":
        show_settings(session)
    elif name == "save":
        if not arg:
            print("usage: /save FILE")
        else:
            try:
                print(f"(saved to {session.save(arg)})")
            except OSError as exc:
                print(f"error: cannot write {arg}: {exc.strerror}")
            except FgdilpError as exc:
                print(f"error: {exc}")
    else:
        print(f"unknown command /{name}; /help lists them")
    return True


def run_chat(det, history_dir: Optional[str] = None) -> int:
    """The session loop; returns the exit code (0, or 130 after Ctrl-C)."""
    try:
        importlib.import_module("readline")    # line editing and history for input()
    except ImportError:
        pass
    det.template  # refuse a model without a chat template before the first message
    session = Session(det, history_dir)
    print(f"fgdilp-cpp chat: {det.name}, method {session.method}, template {det.template.name}. "
          f"/help for commands, Ctrl-D to leave.", file=sys.stderr)
    code = 0
    try:
        while True:
            try:
                text = read_message()
            except EOFError:
                print()
                break
            if not text.strip():
                continue
            if text.startswith("/") and "\n" not in text:
                if not command(session, text.strip()):
                    break
                continue
            try:
                reply(session, text)
            except FgdilpError as exc:
                print(f"error: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print()
        code = 130
    finally:
        session.autosave()
        if session.path is not None and session.path.exists():
            print(f"(conversation saved to {session.path})", file=sys.stderr)
    return code
