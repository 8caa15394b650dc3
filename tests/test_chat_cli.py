"""`fgdilp-cpp chat` driven in a pseudo-terminal, like a person at a keyboard."""

import json
import os
import sys
import time

import pexpect
import pytest

PASSED_ON = ("PYTHONPATH", "FGDILP_NATIVE_LIB",     # a checkout that is not the installed one
             "FGDILP_AUTO_SETUP", "FGDILP_PROFILE")  # the suite's view: no fast setup, the built-in defaults (conftest)


def spawn(model, tmp_path, *args, timeout=60):
    argv = ["-m", "fgdilp_cpp.cli", "chat", str(model), "-t", "1", "--history-dir", str(tmp_path / "hist"), *args]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "TERM": "dumb",
           **{k: os.environ[k] for k in PASSED_ON if k in os.environ}}
    child = pexpect.spawn(sys.executable, argv, encoding="utf-8", codec_errors="replace", timeout=timeout,
                          cwd=str(tmp_path), env=env)
    child.expect_exact("/help for commands")
    child.expect_exact("> ")
    return child


def ask(child, text):
    child.sendline(text)
    child.expect_exact(text)            # the terminal's echo


def history(tmp_path):
    files = list((tmp_path / "hist").glob("chat-*.json"))
    assert len(files) == 1
    return json.loads(files[0].read_text())


def test_session_commands_and_exit(tiny_chat, tmp_path):
    c = spawn(tiny_chat, tmp_path, "-n", "12", "--method", "tr", "-c", "512", "-sys", "be kind")
    ask(c, "hello there")
    c.expect_exact("[reply cut at -n 12 tokens]")
    c.expect_exact("> ")
    ask(c, "/explain")
    c.expect_exact("|delta| per layer:")
    c.expect_exact("> ")
    ask(c, "/method fgdilp")
    c.expect_exact("(method: fgdilp)")
    ask(c, '"""')
    c.sendline("first line")
    c.sendline("second line")
    c.sendline('"""')
    c.expect_exact("(writing candidate replies and scoring them ...)\r")   # FGDILP's setup, then erased
    c.expect_exact("[reply cut at -n 12 tokens]")
    ask(c, "/explain")
    c.expect_exact("self-diagnosis P(yes) per sample")
    c.expect_exact("positive: sample")
    ask(c, "/settings")
    c.expect(r"method\s+\* fgdilp")
    c.expect(r"selfgen-samples\s+\* 4")
    ask(c, "/save saved.json")
    c.expect_exact("(saved to saved.json)")
    ask(c, "/nope")
    c.expect_exact("unknown command /nope")
    saved = json.loads((tmp_path / "saved.json").read_text())
    roles = [m["role"] for m in saved["messages"]]
    assert roles == ["system", "user", "assistant", "user", "assistant"]
    assert saved["messages"][3]["content"] == "first line\nsecond line" and saved["method"] == "fgdilp"
    ask(c, "/clear")
    c.expect_exact("(new conversation; the last one stays in ")
    ask(c, "/exit")
    c.expect(pexpect.EOF)
    c.close()
    assert c.exitstatus == 0
    assert [m["role"] for m in history(tmp_path)["messages"]] == roles     # autosaved as it went


def test_ctrl_c_stops_a_reply_and_the_session_goes_on(tiny_chat, tmp_path):
    c = spawn(tiny_chat, tmp_path, "-n", "30000", "-c", "32000", "--method", "tr")
    for turn in range(2):
        ask(c, f"tell me a long story {turn}")
        time.sleep(0.8)                 # the reply is streaming (it would run for many seconds)
        c.sendintr()
        c.expect_exact("[stopped]", timeout=20)
        c.expect_exact("> ")
    saved = history(tmp_path)["messages"]
    assert [m["role"] for m in saved] == ["user", "assistant"] * 2
    assert all(len(m["content"]) > 20 for m in saved[1::2])             # the part so far is kept
    assert [m["stop_reason"] for m in saved[1::2]] == ["cancelled"] * 2
    time.sleep(2.5)                     # past the double tap of the Ctrl-C that stopped the reply
    c.sendintr()                        # one Ctrl-C at an idle prompt does not leave ...
    c.expect_exact("(Ctrl-C again to leave")
    c.expect_exact("> ")
    ask(c, "/help")                     # ... the session goes on
    c.expect_exact("Ctrl-C twice leaves")
    c.expect_exact("> ")
    c.sendintr()
    c.expect_exact("(Ctrl-C again to leave")
    c.sendintr()                        # the second one in a row leaves
    c.expect(pexpect.EOF)
    c.close()
    assert c.exitstatus == 130
    assert len(history(tmp_path)["messages"]) == 4                       # nothing lost


@pytest.mark.parametrize("how", ["ctrl-d", "double-ctrl-c"])
def test_leaving(tiny_chat, tmp_path, how):
    c = spawn(tiny_chat, tmp_path, "-n", "30000", "-c", "32000", "--method", "none")
    if how == "ctrl-d":
        c.sendeof()
        code = 0
    else:
        ask(c, "go on and on")
        time.sleep(0.5)
        c.sendintr()                    # stops the reply ...
        time.sleep(0.3)
        c.sendintr()                    # ... and the second one leaves
        code = 130
    c.expect(pexpect.EOF, timeout=20)
    c.close()
    assert c.exitstatus == code


def test_model_without_template_is_refused(tiny_llama, tmp_path, cli):
    r = cli("chat", tiny_llama[0], "-t", "1", env={"HOME": str(tmp_path)})
    assert r.returncode == 1 and "--chat-template" in r.stderr and "Traceback" not in r.stderr


def test_chat_with_saved_vectors_from_a_pipe(tiny_chat, tmp_path):
    """No terminal: lines from standard input; saved directions steer every reply."""
    import subprocess

    vec = tmp_path / "v.gguf"
    fast = ["--selfgen-samples", "3", "--selfgen-tokens", "4", "--selfgen-min-tokens", "1", "-c", "256", "-t", "1"]
    build = subprocess.run([sys.executable, "-m", "fgdilp_cpp.cli", "vectors", "build", "-m", str(tiny_chat),
                            "-p", "the cat sat", "-o", str(vec), *fast], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    base = [sys.executable, "-m", "fgdilp_cpp.cli", "chat", str(tiny_chat), "-n", "8", "-c", "256", "-t", "1",
            "--history-dir", str(tmp_path / "hist")]
    run = subprocess.run([*base, "--vectors", str(vec)], input="hello\n/settings\n", capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    # the run is named for what it applies: the saved vectors (/settings' method row)
    assert "[reply cut at -n 8 tokens]" in run.stdout
    assert any(line.split()[:2] == ["method", "vectors"] for line in run.stdout.splitlines())
    assert "fgdilp-frozen" not in run.stdout
    bad = subprocess.run([*base, "--vectors", str(vec), "--method", "tr"], input="", capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.startswith("error: --vectors")


def test_a_full_context_drops_the_oldest_turns_and_says_so(tiny_chat, tmp_path):
    c = spawn(tiny_chat, tmp_path, "-n", "12", "-c", "200", "--method", "tr", "-sys", "be kind")
    told = False
    for turn in range(12):
        ask(c, f"message number {turn} with a few more words")
        i = c.expect([r"the (\d+) oldest messages were dropped", r"\[reply cut at -n 12 tokens\]"])
        if i == 0:
            told = True
            c.expect_exact("[reply cut at -n 12 tokens]")
            break
    assert told and turn >= 1
    ask(c, "/exit")
    c.expect(pexpect.EOF)
    c.close()
    doc = history(tmp_path)
    saved = doc["messages"]             # everything said is kept, also what the model no longer sees
    assert saved[0] == {"role": "system", "content": "be kind"}
    assert [m["content"] for m in saved[1::2]] == [f"message number {t} with a few more words" for t in range(turn + 1)]
    assert doc["dropped_from_context"] >= 2 and doc["dropped_from_context"] % 2 == 0


def test_bench_chat_times_first_tokens_side_by_side(tiny_chat, tmp_path, cli):
    vec = tmp_path / "v.gguf"
    fast = ["--selfgen-samples", "3", "--selfgen-tokens", "4", "--selfgen-min-tokens", "1", "-c", "256", "-t", "1"]
    assert cli("vectors", "build", "-m", tiny_chat, "-p", "the cat sat", "-o", vec, *fast).returncode == 0
    proc = cli("bench", "--chat", "-m", tiny_chat, "--methods", "tr,fgdilp", "--vectors", vec, "-r", "2", "--json",
               *fast, "-c", "1024")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert list(out["methods"]) == ["none", "tr", "fgdilp", "vectors"]
    assert out["methods"]["none"]["ratio_vs_none"] == 1.0
    assert all(len(r["runs_ttft_s"]) == 2 and r["ttft_s"] > 0 for r in out["methods"].values())
    fg, tr = out["methods"]["fgdilp"], out["methods"]["tr"]
    assert fg["setup_s"] > 0 and tr["setup_s"] < fg["setup_s"]
    assert cli("bench", "-m", tiny_chat, "--vectors", vec).returncode == 1          # --vectors needs --chat


# ---- the chat history: private files, written atomically, and a way to turn it off ----------------
def _chat_piped(model, tmp_path, stdin, *args, env=None):
    import os
    import subprocess

    argv = [sys.executable, "-m", "fgdilp_cpp.cli", "chat", str(model), "-n", "6", "-c", "256", "-t", "1",
            "--method", "none", *args]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("FGDILP_") or k in PASSED_ON}
    full_env.update({"HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path / "xdg"), **(env or {})})
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=120, cwd=str(tmp_path),
                          env=full_env)


def test_history_is_private_atomic_and_never_follows_a_symlink(tiny_chat, tmp_path):
    import stat

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "link.json").symlink_to(victim)
    run = _chat_piped(tiny_chat, tmp_path, "hello\n/save link.json\n/save plain.txt\n")
    assert run.returncode == 0, run.stderr
    assert "error: link.json is a symbolic link" in run.stdout and "(saved to plain.txt)" in run.stdout
    assert victim.read_text() == "precious" and (tmp_path / "link.json").is_symlink()
    folder = tmp_path / "xdg" / "fgdilp-cpp" / "chats"                   # the default: $XDG_DATA_HOME
    files = list(folder.iterdir())
    assert len(files) == 1 and files[0].name.startswith("chat-") and files[0].suffix == ".json"
    assert f"(conversation saved to {files[0]})" in run.stderr
    assert [m["role"] for m in json.loads(files[0].read_text())["messages"]] == ["user", "assistant"]
    assert stat.S_IMODE(files[0].stat().st_mode) == 0o600 and stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode) == 0o600
    assert not [p for p in tmp_path.rglob("*.tmp")]


@pytest.mark.parametrize("how", ["flag", "env", "toml"])
def test_history_can_be_turned_off(tiny_chat, tmp_path, how):
    args, env = [], {}
    if how == "flag":
        args = ["--no-history"]
    elif how == "env":
        env = {"FGDILP_HISTORY": "0"}
    else:
        (tmp_path / "c.toml").write_text("history = false\n")
        args = ["--config", str(tmp_path / "c.toml")]
    run = _chat_piped(tiny_chat, tmp_path, "hello\n/settings\n", *args, env=env)
    assert run.returncode == 0, run.stderr
    assert "[reply cut at -n 6 tokens]" in run.stdout and "conversation saved" not in run.stderr
    assert not (tmp_path / "xdg").exists()
    source = {"flag": "(flag)", "env": "(env)", "toml": "(config)"}[how]      # /settings says where it came from
    assert [line.split() for line in run.stdout.splitlines() if line.startswith("history ")] == \
        [["history", "False", source]]
    if how == "env":        # the flag wins over the environment
        on = _chat_piped(tiny_chat, tmp_path, "hello\n", "--history", env=env)
        assert on.returncode == 0 and len(list((tmp_path / "xdg" / "fgdilp-cpp" / "chats").iterdir())) == 1


# ---- every conversation kept, each reply with how it was made; nothing written where it should not be ----
def _conversation_files(folder):
    return sorted(folder.glob("chat-*.json"), key=lambda p: int(p.stem.rsplit("-", 1)[1]))


def test_every_conversation_of_a_session_is_kept_with_each_replys_method(tiny_chat, tmp_path):
    stdin = "hello\n/method tr\nsecond\n/clear\nthird\n/clear\n/clear\nfourth\n/method none\nfifth\n"
    run = _chat_piped(tiny_chat, tmp_path, stdin, "--steer-scale", "0.5")
    assert run.returncode == 0, run.stderr
    files = _conversation_files(tmp_path / "xdg" / "fgdilp-cpp" / "chats")
    assert len(files) == 3                       # /clear starts a new file; an empty conversation writes none
    docs = [json.loads(p.read_text()) for p in files]
    said = [[m["content"] for m in d["messages"] if m["role"] == "user"] for d in docs]
    assert said == [["hello", "second"], ["third"], ["fourth", "fifth"]]
    assert [d["conversation"] for d in docs] == [1, 2, 3]
    replies = [m for d in docs for m in d["messages"] if m["role"] == "assistant"]
    assert [m["method"] for m in replies] == ["none", "tr", "tr", "tr", "none"]
    assert all(m["settings"]["steer_scale"] == 0.5 and m["settings"]["n_predict"] == 6 for m in replies)
    assert all(m["stop_reason"] == "length" and isinstance(m["seed"], int) for m in replies)
    for p in files:                              # the goodbye names every file
        assert f"(conversation saved to {p})" in run.stderr
    assert "the last one stays in " + str(files[0]) in run.stdout


def test_save_refuses_a_missing_folder(tiny_chat, tmp_path):
    run = _chat_piped(tiny_chat, tmp_path, "hello\n/save nothere/deeper/x.json\n/save x.json\n")
    assert run.returncode == 0, run.stderr
    assert "the folder nothere/deeper does not exist" in run.stdout and "(saved to x.json)" in run.stdout
    assert not (tmp_path / "nothere").exists() and (tmp_path / "x.json").is_file()


def test_a_symlink_planted_at_the_conversation_file_is_refused_and_the_goodbye_says_not_saved(tiny_chat, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    c = spawn(tiny_chat, tmp_path, "-n", "6", "-c", "256", "--method", "none")
    ask(c, "hello")
    c.expect_exact("(preparing the first reply ...)\r")          # the session's first reply says so, then erases it
    c.expect_exact("[reply cut at -n 6 tokens]")
    c.expect_exact("> ")
    (path,) = (tmp_path / "hist").glob("chat-*.json")
    path.unlink()
    path.symlink_to(victim)                      # planted between two replies
    ask(c, "again")
    c.expect_exact("(could not save the conversation to")
    c.expect_exact("is a symbolic link")
    c.expect_exact("> ")
    ask(c, "/exit")
    c.expect_exact(f"(conversation NOT saved to {path}")
    c.expect(pexpect.EOF)
    c.close()
    assert "conversation saved to" not in c.before
    assert victim.read_text() == "precious" and path.is_symlink()


def test_a_world_writable_history_folder_is_refused(tiny_chat, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    run = _chat_piped(tiny_chat, tmp_path, "hello\n", "--history-dir", str(shared))
    assert run.returncode == 0, run.stderr
    assert "is writable by every user (mode 777)" in run.stderr and "conversation NOT saved" in run.stderr
    assert "conversation saved to" not in run.stderr and list(shared.iterdir()) == []


def test_a_model_that_is_not_tuned_for_chat_gets_a_warning(tiny_chat, tiny_llama, tmp_path):
    import shutil

    base = tmp_path / "tiny-base.gguf"           # the same model under a name without instruct/it/chat
    shutil.copy(tiny_chat, base)
    told = _chat_piped(base, tmp_path, "")
    assert told.returncode == 0 and "looks like a base model" in told.stderr and "says nothing of" in told.stderr
    no_template = _chat_piped(tiny_llama[0], tmp_path, "", "--chat-template", "chatml")
    assert no_template.returncode == 0 and "its GGUF has no chat template" in no_template.stderr
    tuned = _chat_piped(tiny_chat, tmp_path, "")
    assert tuned.returncode == 0 and "base model" not in tuned.stderr


def test_a_file_already_at_the_conversation_path_is_never_replaced(tmp_path):
    """Unit level: the name a conversation would take is already there (another program's file)."""
    from types import SimpleNamespace

    from fgdilp_cpp.chat.repl import Session
    from fgdilp_cpp.settings import Settings

    det = SimpleNamespace(settings=Settings(), model=SimpleNamespace(info=SimpleNamespace(path="m.gguf")),
                          chat_format=SimpleNamespace(template=SimpleNamespace(name="chatml")))
    session = Session(det, str(tmp_path / "hist"))
    (tmp_path / "hist").mkdir(mode=0o700)
    session.path.write_text("someone else's")
    taken = session.path
    session.transcript = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    session.autosave()
    assert taken.read_text() == "someone else's"
    assert session.saved == [taken.with_name(taken.stem + ".2.json")]
    assert json.loads(session.saved[0].read_text())["messages"][1]["content"] == "hello"
