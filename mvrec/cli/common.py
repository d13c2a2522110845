"""Shared pieces of the CLI: the Typer app, consoles, and config loading with flag overrides."""

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

_state: dict[str, Any] = {"config_path": None}


@app.callback()
def _root(
    config: Optional[Path] = typer.Option(
        None, "--config", "-c", help="TOML config file (default: $MVREC_CONFIG or ./mvrec.toml)."
    ),
) -> None:
    _state["config_path"] = config


def get_config(**overrides: Any) -> Config:
    """The effective config: defaults < file < env < these flag overrides ({"section.key": value})."""
    return load_config(_state["config_path"], overrides=overrides)


def test_model_notice(model_dir: str | Path) -> None:
    """Say loudly when a command loads a random-weight test model."""
    from tasks.lvlm import is_test_model

    if is_test_model(model_dir):
        err_console.print(
            f"[yellow]note:[/] {model_dir} is a random-weight TEST MODEL built by `mvrec build-test-model`; "
            "its captions and features carry no meaning."
        )
