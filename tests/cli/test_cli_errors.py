"""User mistakes on the command line: exit status 2, one line, no traceback, and (where the
mistake is in the options) before any model is loaded."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
from conftest import cli_error

from knowloc.cli import build_parser, main


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the CLI tries to load a model."""
    import knowloc.models

    def refuse(*a, **k):
        raise AssertionError("the CLI loaded a model before validating its arguments")

    monkeypatch.setattr(knowloc.models, "load_model", refuse)


ONE = ["--prompt", "The capital of France is", "--answer", "Paris"]


@pytest.mark.parametrize("argv, match", [
    (["localize", "--seed", "-5", *ONE], r"--seed must be >= 0 \(got -5\)"),
    (["localize", "--seed", str(2**32), *ONE], r"--seed must be < 2\*\*32"),
    (["localize", "--batch-size", "0", *ONE], r"--batch-size must be >= 1"),
    (["localize", "--memory-gb", "0", *ONE], r"--memory-gb must be > 0"),
    (["localize", "--memory-gb", "nan", *ONE], r"--memory-gb must be a finite number"),
    (["localize", "--selection", "topk", "--threshold", "inf", *ONE], r"finite number"),
    (["localize", "--selection", "topk", "--threshold", "nan", *ONE], r"finite number"),
    (["localize", "--selection", "absolute", "--threshold", "-1", *ONE],
     r"absolute needs --threshold >= 0"),
    (["localize", "--method", "", *ONE], r"--method is empty"),
    (["localize", "--method", ",", "--out", "RUN"], r"--method is empty"),
    (["localize", "--relations", "", "--out", "RUN"], r"--relations is empty"),
    (["localize", "--top", "-1", *ONE], r"--top must be >= 0"),
    (["localize", "--model", "./no/such/model-dir", *ONE], r"no such directory"),
    (["localize", "--model", "/no/such/dir", *ONE], r"no such directory"),
    (["reproduce", "--known-per-relation", "0", "--out", "RUN"], r"--known-per-relation"),
    (["reproduce", "--seed", "-1", "--out", "RUN"], r"--seed must be >= 0"),
    (["heatmap", "--threshold", "nan", *ONE], r"--threshold must be a finite number"),
])
def test_bad_options_fail_before_the_model_loads(argv, match, capsys, tmp_path, no_model_load):
    run = tmp_path / "run"
    line = cli_error(capsys, ["-q", *[str(run) if a == "RUN" else a for a in argv]])
    assert re.search(match, line), line
    assert not run.exists()


@pytest.mark.parametrize("argv, match", [
    (["intervene", "--enhance", "nan"], r"--enhance must be a finite number"),
    (["intervene", "--enhance", "inf"], r"--enhance must be a finite number"),
    (["intervene", "--method", ""], r"--method is empty"),
    (["intervene", "--split-threshold", "nan"], r"--split-threshold must be a finite"),
    (["attention", "--alpha", "nan"], r"--alpha must be a finite number"),
    (["modify", "--set", ""], r"--set is empty"),
    (["modify", "--seed", "-5"], r"--seed must be >= 0"),
    (["consistency", "--static-threshold", "nan"], r"--static-threshold must be a finite"),
])
def test_bad_stage_options_fail_before_anything_is_read(argv, match, capsys, tmp_path,
                                                        no_model_load):
    """Checked before the run directory is even looked at (it does not exist here)."""
    line = cli_error(capsys, ["-q", argv[0], "--run", str(tmp_path / "missing"), *argv[1:]])
    assert re.search(match, line), line


def test_a_file_as_model_is_not_a_directory(capsys, tmp_path, no_model_load):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    line = cli_error(capsys, ["-q", "localize", "--model", str(f), *ONE])
    assert "not a directory" in line


def test_out_under_a_file_fails_before_the_model_loads(capsys, tmp_path, no_model_load):
    f = tmp_path / "file"
    f.write_text("x")
    line = cli_error(capsys, ["-q", "localize", "--out", str(f / "run")])
    assert re.search(r"cannot create .*run: .*file is not a directory", line), line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
@pytest.mark.parametrize("where", ["out", "parent"])
def test_read_only_out_fails_before_the_model_loads(where, capsys, tmp_path, no_model_load):
    parent = tmp_path / "ro"
    parent.mkdir()
    out = parent / "run"
    if where == "out":
        out.mkdir()
    (out if where == "out" else parent).chmod(0o500)
    try:
        line = cli_error(capsys, ["-q", "localize", "--out", str(out)])
    finally:
        (out if where == "out" else parent).chmod(0o700)
    assert "is not writable" in line


def test_unwritable_out_fails_before_the_model_loads(capsys, tmp_path, monkeypatch,
                                                     no_model_load):
    """The probe itself (as root, chmod does not stop writes): a PermissionError from the
    file system becomes one line."""
    import tempfile

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", denied)
    line = cli_error(capsys, ["-q", "localize", "--out", str(tmp_path / "run")])
    assert re.search(r"cannot write .*run: .* is not writable \(Permission denied\)", line)
    assert not (tmp_path / "run").exists()


def test_permission_error_later_is_one_line(capsys, tmp_path, monkeypatch, no_model_load):
    """An OS permission error after the checks (e.g. a file made read-only mid-run)."""
    import knowloc.cli

    def boom(args):
        raise PermissionError(13, "Permission denied", str(tmp_path / "run" / "config.yaml"))

    monkeypatch.setitem(knowloc.cli.COMMANDS, "models", boom)
    line = cli_error(capsys, ["models"])
    assert line == f"knowloc: error: Permission denied: {tmp_path / 'run' / 'config.yaml'}"


def test_query_with_empty_sql(capsys, localized):
    line = cli_error(capsys, ["query", str(localized), "  "])
    assert "SQL statement is empty" in line


def test_query_on_a_run_with_a_corrupt_part(capsys, localized, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(localized, run)
    part = min((run / "parts" / "queries").glob("*.parquet"))
    part.write_bytes(b"not parquet at all")
    line = cli_error(capsys, ["query", str(run), "select count(*) from queries"])
    assert line.startswith(f"knowloc: error: cannot read the tables of {run}")


def test_a_failing_query_is_one_line(capsys, localized):
    line = cli_error(capsys, ["query", str(localized), "select nope from queries"])
    assert "query failed" in line and "tables in" in line


def test_quiet_after_the_subcommand_runs(capsys):
    assert main(["models", "-q"]) == 0
    assert "gemma3-270m" in capsys.readouterr().out


def test_float16_overflow_is_explained(capsys, tmp_path):
    """A model whose float16 activations overflow (embeddings beyond 65504): one line that
    names the cause and the fix, not the adapter self-check's 'not the down projection',
    from the library and the CLI alike; float32 loads the same weights."""
    import torch
    from tiny import tiny_model

    from knowloc.errors import ModelError
    from knowloc.models import load_model

    m = tiny_model("llama")
    with torch.no_grad():
        m.hf.get_input_embeddings().weight.mul_(1e6)
    d = tmp_path / "overflowing"
    m.hf.save_pretrained(d)
    m.tokenizer.save_pretrained(d)
    with pytest.raises(ModelError, match="does not run in float16.*bfloat16"):
        load_model(str(d), dtype="float16")
    load_model(str(d), dtype="float32")
    line = cli_error(capsys, ["-q", "localize", "--model", str(d), "--dtype", "float16",
                              "--prompt", "paris is the capital of", "--answer", "france"])
    assert "does not run in float16" in line and "bfloat16" in line


def test_float16_runs_where_it_fits(capsys, tiny_dir, tmp_path):
    """The tiny model's activations fit float16: localization runs (self-check included)."""
    assert main(["-q", "localize", "--model", str(tiny_dir), "--dtype", "float16",
                 "--prompt", "paris is the capital of", "--answer", "france",
                 "--n-steps", "3"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"P\(answer\) = [0-9.]+", out)


# ------------------------------------------------------------------- help and version
def _option_help(text: str) -> dict[str, str]:
    """Option string -> its help text, from argparse's --help output."""
    blocks: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"^  (-[-\w]+)", line)
        if m:
            current = m.group(1)
            blocks[current] = line
        elif current and line.startswith("    "):
            blocks[current] += " " + line.strip()
        else:
            current = None
    return blocks


COMMANDS = ["localize", "consistency", "reproduce", "modify", "intervene", "attention",
            "heatmap", "query", "models"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_every_default(command, capsys):
    parser = build_parser()
    with pytest.raises(SystemExit) as e:
        parser.parse_args([command, "--help"])
    assert e.value.code == 0
    helps = _option_help(capsys.readouterr().out)
    flags = {"-h", "--overwrite", "--localize", "--no-modify", "--no-attention",
             "--all-queries", "--no-heatmaps", "-v", "-q", "--prompt", "--answer", "--run",
             "--out", "--json"}
    for option, text in helps.items():
        if option in flags and "default" not in text:
            continue
        assert "default" in text, f"{command} {option}: {text}"
    if command == "localize":
        for option in ("--n-steps", "--seed", "--dtype", "--selection", "--memory-gb"):
            assert "(default: " in helps[option], helps[option]
        assert "(default: 20)" in helps["--n-steps"] and "(default: 0)" in helps["--seed"]
        assert "(default: float32)" in helps["--dtype"]
        assert "(default: ig)" in helps["--method"]


def test_help_defaults_of_the_stage_options(capsys):
    parser = build_parser()
    for command, option, text in [("consistency", "--static-threshold", "(default: 0.1)"),
                                  ("modify", "--split-threshold", "(default: 0.1)"),
                                  ("reproduce", "--known-per-relation", "default: the preset"),
                                  ("modify", "--set", "(default: local,global)")]:
        with pytest.raises(SystemExit):
            parser.parse_args([command, "--help"])
        assert text in _option_help(capsys.readouterr().out)[option]


def test_version(capsys):
    from knowloc import __version__

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith(f"knowloc {__version__}")
    if (Path(__file__).resolve().parents[2] / ".git").exists():
        assert re.fullmatch(rf"knowloc {re.escape(__version__)} \(\S+\)", out), out
