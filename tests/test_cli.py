"""The `mvrec` command line: help everywhere, and one-line errors with exit code 2.

Commands are discovered from the Typer app, so commands added later are covered as well.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main

from mvrec.cli import app, main

PLANNED = ["demo-data", "build-test-model", "config"]  # this issue's commands; others add theirs


def registered_commands() -> list[tuple[str, ...]]:
    """Every command path, groups and their subcommands, e.g. ("config", "show")."""
    found: list[tuple[str, ...]] = []

    def walk(group, prefix: tuple[str, ...]) -> None:
        for name, command in group.commands.items():
            found.append(prefix + (name,))
            if hasattr(command, "commands"):
                walk(command, prefix + (name,))

    walk(typer.main.get_command(app), ())
    return found


COMMANDS = registered_commands()
LEAF_COMMANDS = [c for c in COMMANDS if not any(o[: len(c)] == c and o != c for o in COMMANDS)]


def run_in_process(argv: list[str], capsys) -> tuple[int, str, str]:
    """main() as the console script runs it; returns (exit code, stdout, stderr)."""
    code = 0
    try:
        main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def run_subprocess(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MVREC_")}
    env["COLUMNS"] = "200"  # rich would otherwise wrap help at 80 columns
    return subprocess.run([sys.executable, "-c", "from mvrec.cli import main; main()", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def assert_one_line_error(code: int, err: str, *must_name: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got: {err!r}"
    assert lines[0].startswith("error: ")
    for name in must_name:
        assert name in lines[0], f"{name!r} not named in {lines[0]!r}"
    assert "Traceback" not in err


def test_discovery_sees_this_issues_commands():
    top = {c[0] for c in COMMANDS}
    assert set(PLANNED) <= top
    assert ("config", "show") in COMMANDS


def test_top_level_help_lists_every_command(tmp_path):
    done = run_subprocess("--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    for command in {c[0] for c in COMMANDS}:
        assert command in done.stdout, f"{command} missing from mvrec --help"


def test_no_arguments_shows_help(capsys):
    code, out, err = run_in_process([], capsys)
    # click's convention: help on stdout, exit 2 because no command was given.
    assert code in (0, 2) and "demo-data" in out and "Traceback" not in err


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_has_help(command, capsys):
    code, out, err = run_in_process([*command, "--help"], capsys)
    assert code == 0, err
    assert "Usage:" in out and command[-1] in out


@pytest.mark.parametrize("command", LEAF_COMMANDS, ids=" ".join)
def test_every_command_rejects_an_unknown_option(command, capsys):
    code, _, err = run_in_process([*command, "--no-such-option"], capsys)
    assert_one_line_error(code, err, "--no-such-option")


def test_unknown_command(capsys):
    code, _, err = run_in_process(["no-such-command"], capsys)
    assert_one_line_error(code, err, "no-such-command")


@pytest.mark.parametrize(
    "argv, named",
    [
        (["demo-data", "--videos", "0"], "--videos"),
        (["demo-data", "--users", "-3"], "--users"),
        (["demo-data", "--videos", "many"], "--videos"),
        (["demo-data", "--seed", "x"], "--seed"),
        (["build-test-model", "--arch", "llama"], "--arch"),
        (["config", "show", "--json=maybe"], "--json"),
    ],
)
def test_invalid_values_name_the_option(argv, named, capsys):
    code, _, err = run_in_process(argv, capsys)
    assert_one_line_error(code, err, named)


def test_out_path_that_is_a_file(tmp_path, capsys):
    file = tmp_path / "not_a_dir"
    file.write_text("x")
    code, _, err = run_in_process(["demo-data", "--videos", "1", "--out", str(file)], capsys)
    assert_one_line_error(code, err, "--out", "not_a_dir")


def test_missing_config_path(tmp_path, capsys):
    code, _, err = run_in_process(["--config", str(tmp_path / "absent.toml"), "config", "show"], capsys)
    assert_one_line_error(code, err, "absent.toml")


# The real process, end to end: exit status and stderr as a shell sees them.


@pytest.mark.parametrize(
    "argv, named",
    [
        (["demo-data", "--bogus"], "--bogus"),  # a bad option
        (["--config", "absent.toml", "config", "show"], "absent.toml"),  # a missing path
        (["demo-data", "--videos", "0"], "--videos"),  # an invalid value
    ],
)
def test_errors_in_a_real_process(tmp_path, argv, named):
    done = run_subprocess(*argv, cwd=tmp_path)
    assert_one_line_error(done.returncode, done.stderr, named)
    assert done.stdout == ""


# Exit codes (docs/cli.md): 0 completed, 1 the run ran but failed, 2 bad input or config before any work.


def test_exit_code_raised_by_a_command_reaches_the_shell(monkeypatch, capsys):
    """main() runs the app in click's non-standalone mode, which hands a `typer.Exit(code)` back as a
    return value instead of exiting: main() must turn it into the process status. (A throwaway app
    stands in for `mvrec refresh`, whose failed flow raises typer.Exit(1); the real end-to-end case is
    test_failed_refresh_exits_1.)"""
    import mvrec.cli

    tiny = typer.Typer()

    @tiny.command()
    def fail(code: int = 1) -> None:
        raise typer.Exit(code)

    @tiny.command()
    def ok() -> None:
        pass

    monkeypatch.setattr(mvrec.cli, "app", tiny)
    assert run_in_process(["fail"], capsys)[0] == 1
    assert run_in_process(["fail", "--code", "3"], capsys)[0] == 3
    assert run_in_process(["fail", "--code", "0"], capsys)[0] == 0
    assert run_in_process(["ok"], capsys)[0] == 0
