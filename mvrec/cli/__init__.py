"""The `mvrec` command line: a thin face over flows, tasks and storage.

Each area registers its commands from its own module. Exit codes (docs/cli.md):

    0  the command (or run) completed
    1  the run ran but failed, or some videos failed with transient errors
    2  bad input or config, found before any work started: one line naming the culprit
       (set MVREC_DEBUG=1 to see the traceback instead)
"""

from __future__ import annotations

import os
import sys

import typer
from typer._click import exceptions as click_exc  # typer vendors click

from mvrec.cli.common import _state, app, err_console

# Registration order is the order `mvrec --help` lists them.
from mvrec.cli import data as _data  # noqa: F401,E402  demo-data, build-test-model, config
from mvrec.cli import extract as _extract  # noqa: F401,E402  extract
from mvrec.cli import store as _store  # noqa: F401,E402  query, store
from mvrec.cli import diff as _diff  # noqa: F401,E402  store diff
from mvrec.cli import status as _status  # noqa: F401,E402  status
from mvrec.cli import flows as _flows  # noqa: F401,E402  refresh, serve, rerun-failed, demo
from mvrec.cli import recsys as _recsys  # noqa: F401,E402  train, study, recommend

# Exceptions that mean "the input is wrong", not "mvrec is broken".
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, NotADirectoryError,
                                               IsADirectoryError, PermissionError, KeyError)


def main(argv: list[str] | None = None) -> None:
    _state["working"] = False  # main() may run many times in one process (tests)
    try:
        # standalone_mode=False so that we format errors ourselves; in this mode click hands a
        # `typer.Exit(code)` raised by a command back as the return value instead of exiting.
        rc = app(args=argv, standalone_mode=False)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except click_exc.NoArgsIsHelpError as e:  # `mvrec store` alone: help was printed
        sys.exit(0 if e.exit_code is None else e.exit_code)
    except click_exc.TyperException as e:
        # Usage errors (bad option, missing argument, invalid value): one line, exit 2.
        msg = e.format_message().strip().replace("\n", " ")
        err_console.print(f"error: {msg}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
    except USER_ERRORS as e:
        if os.environ.get("MVREC_DEBUG"):
            raise
        msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        err_console.print(f"error: {msg}".replace("\n", " "), markup=False, highlight=False, soft_wrap=True)
        sys.exit(1 if _state["working"] else 2)  # after work started, the run failed
    if isinstance(rc, int) and not isinstance(rc, bool) and rc != 0:
        sys.exit(rc)


__all__ = ["app", "main"]
