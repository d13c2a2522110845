"""The `mvrec` command line: a thin face over flows, tasks and storage.

Each area registers its commands from its own module. Exit codes (docs/cli.md):

    0  the command (or run) completed
    1  the run ran but failed, or some videos failed with transient errors
    2  bad input or config, found before any work started: one line naming the culprit
       (set MVREC_DEBUG=1 to see the traceback instead)
  130  interrupted by Ctrl-C (SIGINT), 143 by SIGTERM: one line, the run recorded failed
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import typer
from typer._click import exceptions as click_exc  # typer vendors click

from mvrec.cli import interrupt
from mvrec.cli.common import _state, app, err_console
from mvrec.errors import OneLineError

# Registration order is the order `mvrec --help` lists them.
from mvrec.cli import data as _data  # noqa: F401,E402  demo-data, build-test-model, config
from mvrec.cli import extract as _extract  # noqa: F401,E402  extract
from mvrec.cli import store as _store  # noqa: F401,E402  query, store
from mvrec.cli import diff as _diff  # noqa: F401,E402  store diff
from mvrec.cli import status as _status  # noqa: F401,E402  status
from mvrec.cli import flows as _flows  # noqa: F401,E402  refresh, serve, rerun-failed, demo
from mvrec.cli import recsys as _recsys  # noqa: F401,E402  train, study, recommend
from mvrec.cli import items as _items  # noqa: F401,E402  movielens-data, import-items

# Exceptions that mean "the input is wrong", not "mvrec is broken".
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, NotADirectoryError,
                                               IsADirectoryError, PermissionError, KeyError)


def main(argv: list[str] | None = None) -> None:
    _state["working"] = False  # main() may run many times in one process (tests)
    main_thread = threading.current_thread() is threading.main_thread()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
    if main_thread:
        interrupt.install()  # Ctrl-C / SIGTERM: Interrupted, one line, exit 130 / 143
    try:
        _main(argv)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def _main(argv: list[str] | None) -> None:
    try:
        # standalone_mode=False so that we format errors ourselves; in this mode click hands a
        # `typer.Exit(code)` raised by a command back as the return value instead of exiting.
        rc = app(args=argv, standalone_mode=False)
    except interrupt.Interrupted as e:
        # Whatever ran has unwound: a run is recorded failed, its commits kept.
        err_console.print(f"{e}: stopped; what was committed is kept, and the next run goes on from there",
                          markup=False, highlight=False, soft_wrap=True)
        interrupt.exit_now(interrupt.exit_code(e.signum))
    except OneLineError as e:
        err_console.print(f"error: {e}".replace("\n", " "), markup=False, highlight=False, soft_wrap=True)
        sys.exit(1 if _state["working"] else 2)
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
