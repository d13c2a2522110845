"""How flows run: Prefect settings for the embedded mode, this process's own Prefect API, and the
task runner chosen in config.

`configure_prefect` and `start_api` must run before `prefect` is first imported, because Prefect
reads its settings at import time. The CLI and the benchmarks call them first.

Why `start_api`: with no PREFECT_API_URL, Prefect starts an ephemeral API server (uvicorn) as a
child process and stops it at exit. A SIGKILLed parent never reaches that exit, and the server
runs on for good. `start_api` starts the same server (Prefect's `create_app(ephemeral=True)`) in
a child that dies with its parent: the kernel kills it when the parent dies (Linux
PR_SET_PDEATHSIG), and a watchdog thread in the child exits when its parent changes (elsewhere,
and in case the signal is missed).
"""

from __future__ import annotations

import atexit
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from mvrec.config import PrefectConfig


def configure_prefect(cfg: PrefectConfig) -> None:
    """Embedded defaults: an ephemeral API in a project-local PREFECT_HOME, no telemetry.

    Values already in the environment win, so a real server (PREFECT_API_URL) or a test harness
    is never overridden.
    """
    if not os.environ.get("PREFECT_API_URL"):
        home = Path(cfg.home).expanduser().resolve()
        home.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("PREFECT_HOME", str(home))
    # A cold ephemeral start migrates a fresh SQLite database: ~12 s here, past the 20 s default
    # on a loaded machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "60")
    # On a fresh home the telemetry heartbeat races the migration ("database is locked").
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


def start_api() -> subprocess.Popen | None:
    """Start this process's Prefect API in a child that dies with it, and point PREFECT_API_URL at it.

    Nothing when an API is configured already (PREFECT_API_URL, a test harness), or when `prefect`
    was imported before (its settings are fixed then; Prefect's own ephemeral server is used).
    """
    if os.environ.get("PREFECT_API_URL") or "prefect" in sys.modules:
        return None
    timeout = float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "60"))
    for _ in range(3):  # a port taken between choosing and binding: choose another
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        # Its own session: Ctrl-C in a terminal signals the whole process group, and the API must
        # outlive this process's unwinding to record the runs as crashed; it dies with us anyway.
        proc = subprocess.Popen([sys.executable, "-m", "flows.runtime", "serve-api", str(port), str(os.getpid())],
                                env={**os.environ, "PREFECT_UI_ENABLED": "0"}, start_new_session=True)
        atexit.register(_stop, proc)
        if _wait_healthy(proc, f"http://127.0.0.1:{port}/api/health", timeout):
            os.environ["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
            return proc
        _stop(proc)
    raise RuntimeError(f"the Prefect API server did not start within {timeout:.0f} s "
                       "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)")


def _wait_healthy(proc: subprocess.Popen, url: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:  # not listening yet (URLError is an OSError)
            time.sleep(0.1)
    return False


def _stop(proc: subprocess.Popen) -> None:
    """Ask the API to stop, then kill it: uvicorn's graceful stop waits on idle keep-alive
    connections (7 s on a loaded machine), and every request it answered is committed already."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _serve_api(port: int, parent: int) -> None:
    """The child's side: die with the parent, then serve Prefect's ephemeral API app."""
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)

    def watchdog() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watchdog, daemon=True).start()
    import uvicorn
    from prefect.server.api.server import create_app

    uvicorn.run(create_app(ephemeral=True, final=True), host="127.0.0.1", port=port, log_level="error",
                lifespan="on")


if __name__ == "__main__" and sys.argv[1:2] == ["serve-api"]:
    _serve_api(int(sys.argv[2]), int(sys.argv[3]))
