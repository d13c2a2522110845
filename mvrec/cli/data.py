"""Foundation commands: config, demo corpus, local test LVLM."""

from __future__ import annotations

import json

import typer

from mvrec.cli.common import app, console, get_config

config_app = typer.Typer(help="Show the effective configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")


@config_app.command("show")
def config_show(
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of TOML."),
) -> None:
    """Print the effective config (defaults < mvrec.toml < MVREC_* env)."""
    cfg = get_config().to_dict()
    if as_json:
        console.print_json(json.dumps(cfg))
        return
    for section, values in cfg.items():
        console.print(f"[{section}]", style="bold", markup=False, highlight=False)
        for key, value in values.items():
            console.print(f"{key} = {json.dumps(value)}", markup=False, highlight=False)
        console.print()
