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
