"""Ctrl-C and SIGTERM: the command stops within seconds, says so in one line, exits 128 + signal.

A terminal sends Ctrl-C's SIGINT to the whole process group, and a service manager sends SIGTERM.
Both raise Interrupted in the main thread, wherever it is. It unwinds like any error: an extraction
run stops its data plane, ends its record `failed` and frees its run lease; what was committed
stays (every commit is atomic). The Prefect API this process started is in its own session
(flows/runtime.py), so it is still there to record the flow runs as crashed.

If unwinding takes more than GRACE_S (a model still loading in a thread), or a second signal
comes, the process ends at once: the store is consistent anyway, and a run left `running` is
shown `abandoned`.

The same policy for a run that fails: Prefect's error reports of its flow and task runs stay in the
Prefect API, off the terminal, where the CLI prints the error in one line (MVREC_DEBUG=1 shows them).
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
import threading

GRACE_S = 8.0
_received: list[int] = []


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived. A BaseException, like KeyboardInterrupt: `except Exception` lets it
    pass, while cleanup in `finally` and `except BaseException` runs."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


def exit_code(signum: int) -> int:
    return 128 + signum  # what a shell shows for a process ended by that signal


def on_signal(signum: int, frame) -> None:
    """The handler: Interrupted in the main thread; a second signal ends the process at once."""
    if _received:  # a second Ctrl-C: stop now
        os._exit(exit_code(_received[0]))
    _received.append(signum)
    _quiet_consoles()
    sys.stdout, sys.stderr = _MainThreadOnly(sys.stdout), _MainThreadOnly(sys.stderr)
    timer = threading.Timer(GRACE_S, _give_up, (signum,))
    timer.daemon = True
    timer.start()
    raise Interrupted(signum)


def _quiet_consoles() -> None:
    """From here on, log records stay off the terminal: Prefect reports each flow and task run it
    sees unwind as "Crash detected!", and the one line that matters is printed by the CLI."""
    loggers = [logging.getLogger(), *(logger for logger in logging.root.manager.loggerDict.values()
                                      if isinstance(logger, logging.Logger))]
    for logger in loggers:
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handler.addFilter(lambda record: False)


class _MainThreadOnly:
    """A stream that drops what other threads write: work still running in a thread while the main
    thread unwinds (a study unit's epoch lines) is not to be printed after the signal."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        if threading.current_thread() is threading.main_thread():
            return self._stream.write(text)
        return len(text)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def _give_up(signum: int) -> None:
    sys.stderr.write(f"interrupted: still stopping after {GRACE_S:.0f} s; exiting now\n")
    sys.stderr.flush()
    os._exit(exit_code(signum))


_RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")


def _off_the_terminal(record: logging.LogRecord) -> bool:
    """Prefect's error reports of flow and task runs (tracebacks, "Crash detected!", "Finished in
    state Failed") stay in the Prefect API and off the terminal: the CLI prints the run's error in
    one line. MVREC_DEBUG=1 shows them."""
    return not (record.name.startswith(_RUN_LOGGERS) and record.levelno >= logging.ERROR)


def _attach_console_filter(record: logging.LogRecord) -> bool:
    """A run logger's filter: by the first record Prefect has made its console handlers, so the
    console filter goes on them now (a filter on the run loggers would also keep the records
    from the Prefect API)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and _off_the_terminal not in handler.filters:
            handler.addFilter(_off_the_terminal)
    return True


def exit_now(code: int) -> None:
    """Run the exit handlers (the Prefect API's stop, Ray's shutdown), flush, and end without the
    interpreter's own teardown: freeing a loaded model and the native libraries' thread pools took
    5 s of the 10 on a loaded machine, and nothing in it matters to a stopped run."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe
            pass
    # The one line is out; what cleanup says from here is not the user's business (Prefect's log
    # thread complains when the API it sends to has just been stopped).
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    atexit._run_exitfuncs()
    os._exit(code)


def install() -> None:
    """SIGINT and SIGTERM raise Interrupted in the main thread (call from it)."""
    _received.clear()
    if not os.environ.get("MVREC_DEBUG"):
        for name in _RUN_LOGGERS:
            logger = logging.getLogger(name)
            if _attach_console_filter not in logger.filters:
                logger.addFilter(_attach_console_filter)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
