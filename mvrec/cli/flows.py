"""Flow commands: refresh, rerun-failed, serve, demo. Each loads the config, prepares Prefect and
runs a flow from flows/; the work itself lives there."""

from __future__ import annotations

import json
import os
import signal
from typing import Any, Optional

import typer
from rich.table import Table

from mvrec.cli.common import (
    _state,
    app,
    console,
    err_console,
    get_config,
    refuse_overlapping_run,
    test_model_notice,
    work_started,
    writable_store,
)


def _overrides(**flags: Any) -> dict[str, Any]:
    names = {"model": "extract.model", "backend": "extract.backend", "batch_size": "extract.batch_size",
             "frames": "extract.frames", "store": "store.path", "engine": "extract.engine",
             "ray_address": "extract.ray_address"}
    return {names[k]: v for k, v in flags.items() if v is not None}


def _prepare(overrides: dict[str, Any]):
    cfg = get_config(**overrides)  # validates flags and config before Prefect starts
    from flows.runtime import configure_prefect

    configure_prefect(cfg.prefect)
    model = cfg.extract.model
    from tasks.lvlm import check_model_dir

    check_model_dir(model)  # a path with no model in it: one line now, not after Prefect and a load
    if cfg.extract.engine == "ray":
        from tasks.ray_address import check_ray_address

        check_ray_address(cfg.extract.ray_address)  # nothing answers there: one line within seconds
    # The store must take writes (one line, exit 2), and no other run may be extracting into it
    # with this extractor (one line naming it, exit 1): checked before Prefect or a model starts.
    store = writable_store(cfg)
    from flows.plan import extractor_record

    refuse_overlapping_run(store, extractor_record(cfg).extractor_id)
    test_model_notice(model)
    return cfg


def _print_summary(title: str, summary: dict) -> None:
    table = Table(title=title, show_header=False)
    for key in ("run_id", "extractor_id", "discovered", "processed", "failed", "skipped_done", "skipped_broken",
                "partial", "lvlm_batches", "seconds"):
        if key in summary:
            value = summary[key]
            table.add_row(key, f"{value:.1f}" if isinstance(value, float) else str(value))
    console.print(table)
    if (summary.get("plane") or {}).get("note"):  # fewer model replicas than asked
        err_console.print(f"note: {summary['plane']['note']}", markup=False, highlight=False)
    for f in summary.get("failures", [])[:20]:
        console.print(f"  failed {f['video_id']} [{f['stage']}] {f['error_type']}: {f['message']}", markup=False,
                      highlight=False)


_SOURCE = typer.Argument(None, help="Video directory, manifest (.txt/.csv) or URI (default: refresh.source).")
_MODEL = typer.Option(None, "--model", "-m", help="LVLM id or local directory (default: extract.model).")
_BACKEND = typer.Option(None, "--backend", help="transformers | vllm (default: extract.backend).")
_BATCH = typer.Option(None, "--batch-size", min=1, help="Videos per LVLM batch.")
_STORE = typer.Option(None, "--store", help="Feature store path or URI (default: store.path).")
_ENGINE = typer.Option(None, "--engine", help="Where decoding and the model run: threads | ray (default: extract.engine).")
_RAY_ADDRESS = typer.Option(None, "--ray-address", help="Ray cluster to join with --engine ray, e.g. HEAD:6379 "
                            "(default: extract.ray_address).")


def _run_nightly_refresh(prefix: str, source: str, **kwargs) -> dict:
    """Run the nightly-refresh flow against a Prefect API that dies with this process; exit 1 if it failed."""
    from flows.runtime import start_api
    from tasks.placement import check_placement

    check_placement(get_config(**kwargs.get("overrides") or {}))  # replicas that cannot be placed: exit 2, no model
    start_api()  # before Prefect is imported; a server that dies with this process
    from flows.refresh import nightly_refresh

    work_started()
    state = nightly_refresh(source, return_state=True,
                            config_path=str(_state["config_path"]) if _state["config_path"] else None, **kwargs)
    result = state.result(raise_on_failure=False)
    if isinstance(result, BaseException):
        # Committed work stays committed; the run is in Prefect and in the store's `runs` table.
        err_console.print(f"error: {prefix}{result}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    return result


@app.command()
def refresh(
    source: Optional[str] = _SOURCE,
    model: Optional[str] = _MODEL,
    backend: Optional[str] = _BACKEND,
    batch_size: Optional[int] = _BATCH,
    store: Optional[str] = _STORE,
    engine: Optional[str] = _ENGINE,
    ray_address: Optional[str] = _RAY_ADDRESS,
    interactions: Optional[str] = typer.Option(
        None, "--interactions", help="MicroLens pairs file: retrain the recommender after extracting."),
    always: bool = typer.Option(False, "--always", help="Run the flow even when the store says nothing is new."),
    verify: bool = typer.Option(False, "--verify", help="Read every file to hash it, trusting no recorded stat "
                                "signature (the change check otherwise reads only new and changed files)."),
) -> None:
    """Run the nightly refresh once: extract new/changed videos, embed captions, optionally retrain."""
    overrides = _overrides(model=model, backend=backend, batch_size=batch_size, store=store, engine=engine,
                           ray_address=ray_address)
    cfg = _prepare(overrides)
    source = source or cfg.refresh.source
    if "://" not in source and not os.path.exists(source):
        raise FileNotFoundError(f"video source not found: {source}")
    if not always and not (interactions or cfg.refresh.interactions):
        # Starting Prefect costs seconds; when the store already has everything (and there is no
        # retraining to do), skip it.
        from flows.plan import pending_work

        work = pending_work(cfg, source, verify=verify)
        if not (work["to_extract"] or work["captions_to_embed"] or work["unreadable"]):
            console.print(f"nothing new in {source}: {work['done']} videos already extracted by "
                          f"{work['extractor_id']}, {work['known_broken']} with recorded failures "
                          "(see `mvrec rerun-failed`); use --always to run the flow anyway")
            console.print(f"change check: {work['hash_reused']} unchanged by their stat, {work['hash_read']} read "
                          f"({work['read_bytes'] / 1e6:.1f} MB) in {work['seconds']['check']:.1f} s", markup=False)
            return
    result = _run_nightly_refresh("refresh failed: ", source, overrides=overrides, interactions=interactions,
                                  verify=verify)
    _print_summary("refresh", result["extract"])
    console.print(f"captions embedded: {result['captions_embedded']}")
    if result.get("train"):
        console.print(f"retrained: {json.dumps(result['train'], default=str)}", markup=False)


@app.command("rerun-failed")
def rerun_failed(
    source: Optional[str] = _SOURCE,
    model: Optional[str] = _MODEL,
    backend: Optional[str] = _BACKEND,
    store: Optional[str] = _STORE,
) -> None:
    """Reprocess only the videos with open failures for the configured extractor, and embed their captions."""
    overrides = _overrides(model=model, backend=backend, store=store)
    cfg = _prepare(overrides)
    source = source or cfg.refresh.source
    result = _run_nightly_refresh("", source, overrides=overrides, only_failed=True)
    _print_summary("rerun-failed", result["extract"])
    console.print(f"captions embedded: {result['captions_embedded']}")


@app.command()
def serve(
    source: Optional[str] = _SOURCE,
    cron: Optional[str] = typer.Option(None, "--cron", help='Schedule, e.g. "0 2 * * *" (default: refresh.cron).'),
    name: Optional[str] = typer.Option(None, "--name", help="Deployment name (default: refresh.deployment)."),
    interactions: Optional[str] = typer.Option(None, "--interactions", help="Retrain on this pairs file each run."),
) -> None:
    """Serve the nightly refresh as a scheduled Prefect deployment (needs a Prefect server)."""
    cfg = get_config()
    if not os.environ.get("PREFECT_API_URL"):
        raise ValueError("serve: schedules need a Prefect server; start one (`prefect server start`) and set "
                         "PREFECT_API_URL, e.g. http://127.0.0.1:4200/api (see docs/flows.md)")
    from prefect.client.schemas.schedules import CronSchedule

    cron = cron or cfg.refresh.cron
    try:
        CronSchedule(cron=cron)
    except Exception as e:  # pydantic ValidationError
        raise ValueError(f"--cron: {cron!r} is not a valid cron expression") from e
    from flows.runtime import configure_prefect

    configure_prefect(cfg.prefect)
    from flows.refresh import nightly_refresh

    params = {"source": source or cfg.refresh.source, "interactions": interactions}
    console.print(f"serving deployment nightly-refresh/{name or cfg.refresh.deployment} on {cron!r}")
    _serve(nightly_refresh, name or cfg.refresh.deployment, cron, params)


def _serve(flow, name: str, cron: str, params: dict) -> None:
    """What `flow.serve` does, with SIGTERM handled as Ctrl-C is (one line, exit 143): Prefect's
    runner takes SIGTERM for its own graceful stop, which exits 0 after several lines."""
    import asyncio

    from prefect.runner import Runner

    from mvrec.cli import interrupt

    class _Runner(Runner):
        def handle_sigterm(self, *args: Any, **kwargs: Any) -> None:
            interrupt.on_signal(signal.SIGTERM, None)

    runner = _Runner(name=name)
    runner.add_flow(flow, name=name, cron=cron, parameters=params)
    asyncio.run(runner.start())


@app.command()
def demo(
    out: str = typer.Option("./.mvrec/demo", "--out", help="Where the demo corpus, model and results go."),
    videos: int = typer.Option(200, "--videos", min=4, help="Demo videos."),
    users: int = typer.Option(2000, "--users", min=10, help="Demo users."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """The whole pipeline end to end on embedded defaults: corpus, test model, extract, store, train, report."""
    cfg = get_config()
    from flows.runtime import configure_prefect, start_api

    configure_prefect(cfg.prefect)
    start_api()  # before Prefect is imported; a server that dies with this process
    from flows.demo import run_demo

    work_started()
    run_demo(out=out, videos=videos, users=users, seed=seed, console=console, store_path=cfg.store.path,
             runs_path=cfg.train.out)
