"""How flows run: Prefect settings for the embedded mode, and the task runner chosen in config.

`configure_prefect` must run before `prefect` is first imported, because Prefect reads its
settings at import time. The CLI and the benchmarks call it first.
"""

from __future__ import annotations

import os
from pathlib import Path

from mvrec.config import PrefectConfig

TASK_RUNNERS = ("threads", "dask", "ray")


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


def make_task_runner(cfg: PrefectConfig):
    """threads (default) | dask (local cluster or dask_address) | ray (local or ray_address)."""
    if cfg.task_runner == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=cfg.max_workers)
    if cfg.task_runner == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError as e:
            raise ValueError("prefect.task_runner = dask needs `pip install prefect-dask`") from e
        if cfg.dask_address:
            return DaskTaskRunner(address=cfg.dask_address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": cfg.max_workers, "threads_per_worker": 1,
                                              "processes": True, "dashboard_address": None})
    if cfg.task_runner == "ray":
        try:
            from prefect_ray import RayTaskRunner
        except ImportError as e:
            raise ValueError("prefect.task_runner = ray needs `pip install 'mvrec[ray]'`") from e
        if cfg.ray_address:
            return RayTaskRunner(address=cfg.ray_address)
        return RayTaskRunner(init_kwargs={"num_cpus": cfg.max_workers, "include_dashboard": False})
    raise ValueError(f"prefect.task_runner: unknown runner {cfg.task_runner!r} (choose {', '.join(TASK_RUNNERS)})")
