"""Shared pieces of the CLI: the Typer app, consoles, config loading with flag overrides, and the
checks of ids named on the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console

from mvrec.config import Config, load_config

app = typer.Typer(
    name="mvrec",
    help="Micro-video features from frozen LVLMs: extract, store, query, train and study.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
console = Console()
err_console = Console(stderr=True)

# working: set by work_started(); from then on an error means "the run failed" (exit 1), not
# "the input is wrong" (exit 2).
_state: dict[str, Any] = {"config_path": None, "working": False}


@app.callback()
def _root(
    config: Optional[Path] = typer.Option(
        None, "--config", "-c", help="TOML config file (default: $MVREC_CONFIG or ./mvrec.toml)."
    ),
) -> None:
    _state["config_path"] = config


def get_config(**overrides: Any) -> Config:
    """The effective config: defaults < preset < file < env < these flag overrides ({"section.key": value}),
    checked as a whole; an error names the flag when a flag set the value."""
    return load_config(_state["config_path"], overrides=overrides, override_sources=_flag_names(overrides))


def _flag_names(overrides: dict[str, Any]) -> dict[str, str]:
    """{"extract.frames": "--frames"} for the overrides whose key matches an option of this command."""
    try:
        from typer._click.globals import get_current_context  # typer vendors click
    except ImportError:  # pragma: no cover - a typer that uses click itself
        from click import get_current_context
    ctx = get_current_context(silent=True)
    if ctx is None:
        return {}
    flags = {p.name: next((o for o in p.opts if o.startswith("--")), p.opts[0])
             for p in ctx.command.params if getattr(p, "opts", None)}
    return {key: flags[key.rpartition(".")[2]] for key in overrides if key.rpartition(".")[2] in flags}


def work_started() -> None:
    """Call when the command starts work: later errors exit 1 (the run failed), not 2 (bad input)."""
    _state["working"] = True


def check_store_ids(cfg: Config, extractors: dict[str, Optional[str]], as_of: Optional[str] = None) -> None:
    """Look up ids named on the command line in the store before any work starts.

    extractors: {option name: extractor id or None}, e.g. {"--extractor": "3f2a..."}; as_of: a
    snapshot tag. A wrong id raises ValueError naming the option and the ids the store knows.
    """
    named = {opt: eid for opt, eid in extractors.items() if eid}
    if not named and not as_of:
        return
    from storage import open_store

    store = open_store(cfg.store, create=False)  # FileNotFoundError: no feature store at PATH
    if named:
        known = sorted({r["extractor_id"] for r in store.extractors()})
        for opt, eid in named.items():
            if eid not in known:
                raise ValueError(f"{opt}: no extractor {eid!r} in the store at {cfg.store.path} "
                                 f"(known: {', '.join(known) or 'none'})")
    if as_of:
        try:
            store.resolve(as_of)
        except ValueError as e:
            raise ValueError(f"--as-of: {e}") from None


def test_model_notice(model_dir: str | Path) -> None:
    """Say loudly when a command loads a random-weight test model."""
    from tasks.lvlm import is_test_model

    if is_test_model(model_dir):
        err_console.print(
            f"[yellow]note:[/] {model_dir} is a random-weight TEST MODEL built by `mvrec build-test-model`; "
            "its captions and features carry no meaning."
        )


def writable_store(cfg: Config):
    """The configured store after checking that every table takes a write, or None when there is
    no store yet and its directory can be made. A read-only store, a store path that is a file, or
    a directory that cannot be made raise one line (exit 2) before any work; nothing is written."""
    import os
    import tempfile

    from storage import StoreNotWritableError, open_store

    try:
        store = open_store(cfg.store, create=False)  # NotADirectoryError for a file
    except FileNotFoundError:
        path = str(cfg.store.path)
        if "://" in path and not path.startswith("file://"):
            return None
        parent = os.path.abspath(path.removeprefix("file://"))
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            raise NotADirectoryError(f"store.path: {path}: {parent} is a file, not a directory") from None
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".mvrec-write-check-", dir=parent))
        except OSError as e:
            raise StoreNotWritableError(f"store not writable: cannot create {path} in {parent}: {e.strerror}") from None
        return None
    store.check_all_writable()  # StoreNotWritableError (a PermissionError)
    return store


def refuse_overlapping_run(store, extractor_id: str) -> None:
    """Exit 1 with one line naming the run that holds the store's run lease for this extractor
    (docs/store.md, "Overlapping runs"): that run is doing this work; try again when it is done."""
    owner = store.lease_holder(extractor_id) if store is not None else None
    if owner is not None:
        from storage import RunLeaseHeld

        held = RunLeaseHeld(f"extractor {extractor_id} into {store.root}", owner, store.lease_path(extractor_id))
        err_console.print(f"error: {held}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(1)
