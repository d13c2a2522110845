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


def test_an_error_after_work_started_exits_1(monkeypatch, capsys):
    """Bad input found before work starts is exit 2; the same kind of error during the run is a failed
    run, exit 1. (A throwaway app, as above: what is tested is main()'s mapping.)"""
    import mvrec.cli
    from mvrec.cli.common import work_started

    tiny = typer.Typer()

    @tiny.command()
    def run(started: bool = False) -> None:
        if started:
            work_started()
        raise ValueError("bad row 3")

    @tiny.command()
    def other() -> None:
        pass

    monkeypatch.setattr(mvrec.cli, "app", tiny)
    code, _, err = run_in_process(["run", "--started"], capsys)
    assert code == 1 and err.strip() == "error: bad row 3"
    code, _, err = run_in_process(["run"], capsys)
    assert_one_line_error(code, err, "bad row 3")
    assert run_in_process(["other"], capsys)[0] == 0  # the mark does not outlive its run


@pytest.mark.parametrize("value, problem", [("uniform:0", "whole number of frames >= 1"),
                                            ("fps:-1", "frames per second > 0"),
                                            ("banana", "is not 'uniform:N' or 'fps:F'")])
def test_refresh_with_a_bad_frame_policy_fails_before_any_work(tmp_path, value, problem):
    (tmp_path / "videos").mkdir()
    env = {"MVREC_EXTRACT__FRAMES": value, "MVREC_STORE__PATH": str(tmp_path / "store"),
           "MVREC_PREFECT__HOME": str(tmp_path / "prefect")}
    done = run_subprocess_env("refresh", str(tmp_path / "videos"), cwd=tmp_path, env_extra=env)
    assert_one_line_error(done.returncode, done.stderr, "MVREC_EXTRACT__FRAMES", "extract.frames", problem)
    assert not (tmp_path / "store").exists() and not (tmp_path / "prefect").exists()  # nothing started


def test_extract_names_the_flag_that_set_a_bad_value(tmp_path):
    done = run_subprocess_env("extract", str(tmp_path), "--out", str(tmp_path / "x.parquet"), "--frames", "fps:0",
                              cwd=tmp_path)
    assert_one_line_error(done.returncode, done.stderr, "--frames", "extract.frames")


@pytest.fixture
def store_with_one_extractor(tmp_path):
    from storage import ExtractorRecord, FeatureStore

    store = FeatureStore(str(tmp_path / "store"))
    eid = store.upsert_extractor(ExtractorRecord("m", "r", "p", "uniform:8", "video", "v1", dim=4, num_layers=1))
    store.tag("good")
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("".join(f"u{u}\t" + " ".join(str(i) for i in range(1, 7)) + "\n" for u in range(3)))
    return tmp_path, eid, pairs


@pytest.mark.parametrize("command", ["train", "study"])
def test_unknown_ids_fail_before_any_work(store_with_one_extractor, command):
    root, eid, pairs = store_with_one_extractor
    env = {"MVREC_STORE__PATH": str(root / "store"), "MVREC_PREFECT__HOME": str(root / "prefect"),
           "MVREC_TRAIN__OUT": str(root / "runs"), "MVREC_STUDY__OUT": str(root / "study")}
    for args, named in [(["--extractor", "nope"], ["--extractor", "'nope'", eid]),
                        (["--extractor", eid, "--caption-extractor", "nope2"], ["--caption-extractor", "nope2"]),
                        (["--extractor", eid, "--as-of", "no-such-tag"], ["--as-of", "no-such-tag", "good"])]:
        done = run_subprocess_env(command, "-i", str(pairs), *args, cwd=root, env_extra=env)
        assert_one_line_error(done.returncode, done.stderr, *named)
    for later in ("prefect", "runs", "study"):
        assert not (root / later).exists(), f"{later} was written before the ids were checked"


def run_subprocess_env(*args: str, cwd: Path, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MVREC_")}
    env.update({"COLUMNS": "200", "HF_HUB_OFFLINE": "1", **(env_extra or {})})
    return subprocess.run([sys.executable, "-c", "from mvrec.cli import main; main()", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_failed_refresh_exits_1(tmp_path):
    """A run that starts and fails (here: a model whose weights file is truncated) exits 1, not 0."""
    from mvrec.devtools.demo_data import make_demo_corpus
    from mvrec.devtools.test_model import build_test_model

    make_demo_corpus(tmp_path / "corpus", videos=2, users=10, seed=1, max_duration_s=2.5)
    model = build_test_model(tmp_path / "model", layers=2)
    for weights in Path(model).glob("*.safetensors"):
        weights.write_bytes(weights.read_bytes()[:100])
    env = {"MVREC_EXTRACT__MODEL": str(model), "MVREC_STORE__PATH": str(tmp_path / "store"),
           "MVREC_PREFECT__HOME": str(tmp_path / "prefect"), "MVREC_EXTRACT__FRAMES": "uniform:4"}
    done = subprocess.run([str(Path(sys.executable).with_name("mvrec")), "refresh", str(tmp_path / "corpus" / "videos")],
                          cwd=tmp_path, env={**{k: v for k, v in os.environ.items() if not k.startswith("MVREC_")},
                                             "HF_HUB_OFFLINE": "1", **env},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith("error: refresh failed:")
