"""Bad input through the CLI in a subprocess: one clear line on stderr, non-zero exit, no traceback."""

import pytest

from tiny_model import write_non_gguf, write_truncated_copy


def assert_clean_error(proc, *needles):
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert proc.returncode not in (0, None), proc.stdout
    assert proc.returncode > 0, f"killed by signal {-proc.returncode}: {proc.stderr}"
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_missing_model_file(cli, tmp_path):
    assert_clean_error(cli("generate", "-m", tmp_path / "nope.gguf", "-p", "hi"), "not found")


def test_non_gguf_file(cli, tmp_path):
    p = tmp_path / "fake.gguf"
    write_non_gguf(p)
    assert_clean_error(cli("generate", "-m", p, "-p", "hi"), "not a GGUF")


def test_truncated_gguf(cli, tiny_llama, tmp_path):
    p = tmp_path / "cut.gguf"
    write_truncated_copy(tiny_llama[0], p, 0.5)
    assert_clean_error(cli("generate", "-m", p, "-p", "hi"), "could not load")


def test_directory_as_model(cli, tmp_path):
    assert_clean_error(cli("info", "-m", tmp_path), "not a file")


@pytest.mark.parametrize("prompt", ["", "   \n "])
def test_empty_prompt(cli, tiny_llama, prompt):
    assert_clean_error(cli("generate", "-m", tiny_llama[0], "-p", prompt), "empty")


@pytest.mark.parametrize("method", ["none", "tr"])
def test_prompt_longer_than_context(cli, tiny_llama, method):
    proc = cli("generate", "-m", tiny_llama[0], "-c", "32", "--method", method, "-p", "word " * 40)
    assert_clean_error(proc, "longer than the context")


def test_prefix_pushes_prompt_past_context(cli, tiny_llama):
    # fits alone, not with the steering prefix
    proc = cli("generate", "-m", tiny_llama[0], "-c", "64", "--method", "tr", "-p", "ab " * 12)
    assert_clean_error(proc, "steering prefix")


def test_architecture_without_attention(cli, tiny_mamba):
    assert_clean_error(cli("generate", "-m", tiny_mamba, "-p", "hello", "--method", "tr"), "kqv_out")
    proc = cli("info", "-m", tiny_mamba)
    assert proc.returncode == 0 and "cannot be steered" in proc.stdout


def test_quantised_v_cache(cli, tiny_llama):
    proc = cli("generate", "-m", tiny_llama[0], "-p", "hello", "--method", "tr", "-ctv", "q8_0")
    assert_clean_error(proc, "quantised V cache")


@pytest.mark.parametrize("args, needle", [
    (["--top-p", "0"], "--top-p"),
    (["--temp", "-1"], "--temp"),
    (["--steer-layer-range", "2", "99"], "layer"),
    (["--steer-layer-range", "2", "1"], "layer"),
    (["-ctk", "q9_9"], "cache type"),
    (["--steer-scale", "nan"], "finite"),
])
def test_bad_settings(cli, tiny_llama, args, needle):
    assert_clean_error(cli("generate", "-m", tiny_llama[0], "-p", "hello", "--method", "tr", *args), needle)


def test_usage_errors_are_not_tracebacks(cli):
    proc = cli("generate", "--method", "bogus", "-p", "x")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "bogus" in proc.stderr
    proc = cli("bench", "-m", "/nonexistent.gguf", "--methods", "none,frob")
    assert proc.returncode == 1 and "frob" in proc.stderr


def test_every_command_prints_its_help():
    """--help of every command and subcommand (a parameter type's metavar once broke it)."""
    from click.testing import CliRunner

    import click

    from fgdilp_cpp.cli import main

    def walk(cmd, path):
        yield path
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                yield from walk(sub, path + [name])

    paths = list(walk(main, []))
    assert len(paths) > 10
    for path in paths:
        r = CliRunner().invoke(main, path + ["--help"])
        assert r.exit_code == 0 and "Usage:" in r.output, (path, r.output, r.exception)
