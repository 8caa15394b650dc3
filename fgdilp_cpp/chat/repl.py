"""The interactive chat session behind `fgdilp-cpp chat`.

Keys: Enter sends; a line `\"\"\"` starts and ends a multi-line message; Ctrl-C stops a reply (a
second Ctrl-C right after it leaves with exit code 130); Ctrl-C at the prompt asks for a second
one before leaving (130), so a stray key loses nothing; Ctrl-D leaves (0).

Every conversation of a session is kept, one file each (chat-<time>-<pid>-<n>.json; /clear
starts the next one, never reusing a file), rewritten as each reply ends, so a crash or Ctrl-C
loses nothing. It holds every message, also those dropped from the model's context when it is
full, and each reply says the method and settings that produced it. Files are written through
files.write_atomic (a unique temp file, mode 0600, fsync, atomic rename; a symlink in its place is
refused) in a folder created 0700; a folder others may write in is refused. `--no-history`,
FGDILP_HISTORY=0 or `history = false` in the config file turn the autosave off (/save still writes).
"""

from __future__ import annotations

import dataclasses
import importlib
import datetime as dt
import json
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Optional

from .. import methods
from ..call_settings import call_settings
from ..errors import FgdilpError
from ..explain import explain_lines
from ..files import make_private_dir, refuse_shared_dir, write_atomic

HELP = """commands:
  /help            this list
  /clear           start a new conversation (the system prompt stays; the last one stays saved)
  /method NAME     steer the next replies with NAME: {methods}
  /explain         how the last reply was steered (diagnosis, prefixes, |delta| per layer)
  /settings        the settings in force (* = interactive default of chat)
  /save FILE       write the conversation (.json, or text for any other suffix) into an existing folder
  /exit            leave (also Ctrl-D)
a line with three double quotes \"\"\" starts and ends a multi-line message;
Ctrl-C stops a reply; Ctrl-C twice leaves."""

SETUP_STATUS = "(writing candidate replies and scoring them ...)"
FIRST_STATUS = "(preparing the first reply ...)"
LEAVE_HINT = "(Ctrl-C again to leave, Ctrl-D to leave too; nothing is lost)"
DOUBLE_TAP_S = 2.0         # a Ctrl-C this soon after the one that stopped a reply leaves, like a second one
STOP_NOTES = {"length": "[reply cut at -n {n} tokens]", "context": "[context full]", "cancelled": "[stopped]"}
FORMAT = "fgdilp-chat"
# what each reply records of the settings that produced it: the steering values and the sampling
REPLY_SETTINGS = ("steer_scale", "steer_layer_range", "exp_norm", "exp_sim", "renorm", "edit", "gate", "contrast",
                  "condition", "selfgen_samples", "selfgen_tokens", "selfgen_min_tokens", "negatives", "mask_k",
                  "fusion", "sign_election", "pad_blank", "fused_norm", "diagnoser", "instance_reuse", "temp",
                  "top_k", "top_p", "min_p", "n_predict")
# words of a model's name that say it was tuned to follow a conversation
CHAT_TUNED = {"instruct", "inst", "it", "chat", "sft", "dpo", "rlhf", "assistant"}


def default_history_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "fgdilp-cpp" / "chats"


class Session:
    """The conversation, the method in force and the session's conversation files."""

    def __init__(self, det, history_dir: Optional[str]):
        self.det, self.settings = det, det.settings
        self.method = det.settings.method
        self.folder = Path(history_dir) if history_dir else default_history_dir()
        self.stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        self.number = 0
        self.saved: list[Path] = []          # conversation files written, in order
        self.not_saved: dict[Path, str] = {}   # conversation file -> why it could not be written
        self.replies = 0                     # in the whole session (the first one sets up the method)
        self._new_conversation()

    def _new_conversation(self) -> None:
        self.number += 1
        sp = self.settings.system_prompt
        self.messages: list[dict] = [{"role": "system", "content": sp}] if sp else []   # what the model sees
        self.transcript: list[dict] = [dict(m) for m in self.messages]   # everything said, replies annotated
        self.dropped = 0                     # oldest messages no longer in the model's context
        self.started = dt.datetime.now().astimezone().isoformat(timespec="seconds")
        self.last_explain: dict = {}
        # None: history is off, nothing is written unless asked for with /save
        self.path: Optional[Path] = (self.folder / f"chat-{self.stamp}-{os.getpid()}-{self.number}.json"
                                     if self.settings.history else None)

    def clear(self) -> None:
        if any(m["role"] == "assistant" for m in self.transcript):
            self.autosave()
        else:                                # nothing said yet: the next conversation keeps its number
            self.number -= 1
        self._new_conversation()

    def record(self, fitted_messages: list[dict], dropped: int, user: str, answer: str, stream) -> None:
        """The reply joins the conversation: the model's view (as sent, after any trimming) and the
        transcript, where it carries the method and the settings that produced it."""
        self.messages = [dict(m) for m in fitted_messages] + [{"role": "assistant", "content": answer}]
        self.dropped += dropped
        res = stream.result
        s = stream.settings
        entry = {"role": "assistant", "content": answer, "method": stream.method, "seed": s.seed,
                 "settings": {k: getattr(s, k) for k in REPLY_SETTINGS if getattr(s, k, None) is not None},
                 "stop_reason": res.stop_reason if res is not None else "cancelled"}
        if res is not None and "condition" in res.explain:       # --condition: whether it steered, and why
            entry["condition"] = res.explain["condition"]
        self.transcript += [{"role": "user", "content": user}, entry]

    def document(self) -> dict:
        return {"format": FORMAT, "version": 2, "model": self.det.model.info.path, "template": self.det.chat_format.template.name,
                "conversation": self.number, "started": self.started, "method": self.method,
                "settings": {k: v for k, v in dataclasses.asdict(self.settings).items() if v is not None},
                "dropped_from_context": self.dropped, "messages": self.transcript}

    def autosave(self) -> None:
        """Write this conversation's file (atomically, private); a failure is reported once per
        file, never fatal, and remembered for the goodbye line."""
        if self.path is None or not any(m["role"] == "assistant" for m in self.transcript):
            return
        try:
            make_private_dir(self.path.parent)
            refuse_shared_dir(self.path.parent)
            if self.path not in self.saved and os.path.lexists(self.path):     # not ours: never replaced
                self.path = self._free_path()
            write_atomic(self.path, json.dumps(self.document(), indent=1, ensure_ascii=False), private=True)
        except (OSError, FgdilpError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else str(exc)
            if self.path not in self.not_saved:
                print(f"(could not save the conversation to {self.path}: {why})", file=sys.stderr)
            self.not_saved[self.path] = why
            return
        self.not_saved.pop(self.path, None)
        if self.path not in self.saved:
            self.saved.append(self.path)

    def _free_path(self) -> Path:
        stem, k = self.path.stem, 2
        while os.path.lexists(self.path.with_name(f"{stem}.{k}.json")):
            k += 1
        return self.path.with_name(f"{stem}.{k}.json")

    def save(self, target: str) -> str:
        p = Path(target).expanduser()
        if p.suffix == ".json":
            text = json.dumps(self.document(), indent=1, ensure_ascii=False)
        else:
            text = "".join(f"{m['role']}: {m['content']}\n\n" for m in self.transcript)
        folder = p.parent if str(p.parent) else Path(".")
        if not folder.is_dir():              # a typo must not create a tree of folders
            raise FgdilpError(f"cannot write {target}: the folder {folder} does not exist (create it first)")
        write_atomic(p, text, private=True)      # a conversation is private wherever it is saved
        return str(p)

    def goodbye(self) -> None:
        """Say on leaving which files hold the session, and which could not be written."""
        self.autosave()
        for p in self.saved:
            if p not in self.not_saved:
                print(f"(conversation saved to {p})", file=sys.stderr)
        for p, why in self.not_saved.items():
            print(f"(conversation NOT saved to {p}: {why}; /save FILE writes it elsewhere)", file=sys.stderr)


def chat_tuning_warning(det) -> Optional[str]:
    """A warning when the model does not look tuned for conversation: no chat template of its own,
    or neither its name nor its file name has a word such as instruct, it or chat."""
    names = f"{det.model.meta('general.name') or ''} {Path(det.model.info.path).stem}".lower()
    words = set(re.split(r"[^a-z0-9]+", names))
    if not det.model.meta("tokenizer.chat_template"):
        why = "its GGUF has no chat template"
    elif not words & CHAT_TUNED:
        why = "its name says nothing of instruct, it or chat"
    else:
        return None
    return (f"(note: {det.name} looks like a base model, not tuned for chat ({why}): its replies may not answer "
            f"you; a model named -instruct, -it or -chat suits chat)")


def read_message(prompt: str = "> ") -> Optional[str]:
    """One message from the user (None on Ctrl-D); multi-line between lines of three quotes. A
    leading UTF-8 byte-order mark (a file piped in that starts with one) is not the user's text."""
    line = input(prompt).lstrip("\ufeff")
    if line.strip() != '"""':
        return line
    lines = []
    while True:
        line = input("... ")
        if line.strip() == '"""':
            return "\n".join(lines)
        lines.append(line)


def reply(session: Session, text: str, out=sys.stdout) -> bool:
    """Stream the assistant's reply to `text`; Ctrl-C stops it (the part so far is kept). True
    when a Ctrl-C stopped it; a second Ctrl-C during the reply raises KeyboardInterrupt."""
    det = session.det
    candidate = session.messages + [{"role": "user", "content": text}]
    turn = sum(m["role"] == "assistant" for m in session.messages)
    stream = det.stream_chat(candidate, explain=True, method=session.method, seed=det.settings.seed + turn)
    if stream.fitted.dropped:
        print(f"(the context is full: the {stream.fitted.dropped} oldest messages were dropped from what the "
              "model sees; the saved conversation keeps them)", file=sys.stderr)
    pieces: list[str] = []
    interrupts = [0]
    # FGDILP's per-reply setup, and the first reply's (loading the method's parts), take seconds:
    # say what is going on (on a terminal only)
    status = ""
    if out.isatty():
        if methods.get(session.method).instance and det.vectors is None:
            status = SETUP_STATUS
        elif session.replies == 0:
            status = FIRST_STATUS
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
        if answer:
            session.record(stream.fitted.messages, stream.fitted.dropped, text, answer, stream)
            session.replies += 1
            session.autosave()
    if interrupts[0] > 1:
        raise KeyboardInterrupt
    res = stream.result
    session.last_explain = res.explain if res is not None else {}
    reason = res.stop_reason if res is not None else "cancelled"
    note = STOP_NOTES.get(reason, "")
    out.write(("\n" + note.format(n=det.settings.n_predict) if note else "") + "\n")
    out.flush()
    return interrupts[0] > 0


def show_settings(session: Session) -> None:
    """Each setting as the next reply runs it (after /method X: X's, its profile entry included), *
    where it is an interactive default of chat, and where its value came from (flag, env, config,
    profile, default, ...)."""
    det = session.det
    switched = session.method != det.settings.method
    settings, sources = call_settings(det, {"method": session.method} if switched else {})
    if switched:
        sources["method"] = "/method"
    defaults = det.chat_defaults
    print(f"model          {det.model.info.path}")
    print(f"chat template  {det.chat_format.template.name}")
    kind = None if det.profile is None else det.profile.setup.get("kind") or "calibrated"
    print(f"profile file   {det.profile_path or ('none' if det.profile is None else 'given')}"
          + (f" ({kind})" if kind else ""))
    if det.profile_note:
        print(f"               {det.profile_note}")
    if det.profile is not None and det.profile.transferred_from:
        print(f"               {det.profile.transfer_note()}")
    for k, v in dataclasses.asdict(settings).items():
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
        before = session.path if session.path in session.saved else None
        session.clear()
        print("(new conversation" + (f"; the last one stays in {before})" if before else ")"))
    elif name == "method":
        has_vectors = session.det.vectors is not None
        if not methods.is_method(arg, saved_vectors=has_vectors):
            print(f"usage: /method NAME, one of {', '.join(methods.names())} (now: {session.method})")
        else:       # a former name runs as its name now; with --vectors, the file's form (as the reply says)
            session.method = methods.run_name(arg, has_vectors)
            print(f"(method: {session.method})")
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
    """The session loop; returns the exit code (0, or 130 after Ctrl-C twice)."""
    try:
        importlib.import_module("readline")    # line editing and history for input()
    except ImportError:
        pass
    det.chat_format.template  # noqa: B018 (the property raises:) refuse a model without a chat template before the first message
    session = Session(det, history_dir)
    print(f"fgdilp-cpp chat: {det.name}, method {session.method}, template {det.chat_format.template.name}. "
          f"/help for commands, Ctrl-D to leave.", file=sys.stderr)
    warning = chat_tuning_warning(det)
    if warning:
        print(warning, file=sys.stderr)
    code = 0
    armed = False            # a Ctrl-C was pressed: the next one at the prompt leaves
    stopped_at = -1e9        # when a Ctrl-C last stopped a reply (a quick second one leaves)
    try:
        while True:
            try:
                text = read_message()
            except EOFError:
                print()
                break
            except KeyboardInterrupt:
                if armed or time.monotonic() - stopped_at < DOUBLE_TAP_S:
                    raise
                armed = True
                print("\n" + LEAVE_HINT, file=sys.stderr)
                continue
            armed = False
            if not text.strip():
                continue
            if text.startswith("/") and "\n" not in text:
                if not command(session, text.strip()):
                    break
                continue
            try:
                if reply(session, text):
                    stopped_at = time.monotonic()
            except FgdilpError as exc:
                print(f"error: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print()
        code = 130
    finally:
        session.goodbye()
    return code
