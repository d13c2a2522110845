"""`mvrec store diff A B`: what changed in the features between two snapshots."""

from __future__ import annotations

import json
import sys
from typing import Optional

import typer
from rich.table import Table

from mvrec.cli.common import console, get_config
from mvrec.cli.store import store_app


def _pair(text: str) -> tuple[str, str]:
    old, sep, new = text.partition(":")
    if not sep or not old or not new:
        raise ValueError(f"--pair: {text!r} is not OLD_EXTRACTOR:NEW_EXTRACTOR")
    return old, new


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


@store_app.command("diff")
def diff_cmd(
    a: str = typer.Argument(..., help="Old snapshot: a tag, a hidden_states version, or 'latest'."),
    b: str = typer.Argument("latest", help="New snapshot (default: latest)."),
    extractor: Optional[str] = typer.Option(None, "--extractor", help="Only this extractor."),
    pair: Optional[list[str]] = typer.Option(None, "--pair", help="OLD:NEW - compare extractor OLD in A with NEW in B (after a model or prompt change). Repeatable."),
    layers: Optional[str] = typer.Option(None, "--layers", help="Only these layers, e.g. 0,4,-1 (final is -1)."),
    threshold: float = typer.Option(0.99, "--threshold", help="Report the share of videos with cosine below this."),
    as_json: bool = typer.Option(False, "--json", help="Print the diff as JSON."),
) -> None:
    """Videos added, removed and changed per extractor and layer, and how far the embeddings moved."""
    from storage import open_store
    from storage.diff import diff_snapshots

    try:
        wanted = [int(x) for x in layers.split(",")] if layers else None
    except ValueError:
        raise ValueError(f"--layers: {layers!r} is not a comma list of layer numbers") from None
    store = open_store(get_config().store, create=False)
    diffs = diff_snapshots(store, a, b, extractor=extractor, pairs=[_pair(p) for p in pair or []] or None,
                           layers=wanted, threshold=threshold)
    if as_json:
        sys.stdout.write(json.dumps([d.to_dict() for d in diffs], indent=1) + "\n")
        return
    if not diffs:
        console.print(f"no hidden states in {a!r} or {b!r}")
        return
    t = Table("extractor", "layer", "A", "B", "added", "removed", "changed", "compared", "cos min",
              "cos median", f"< {threshold:g}", title=f"store diff {a} → {b}", title_justify="left")
    for d in diffs:
        name = d.extractor_a if d.extractor_a == d.extractor_b else f"{d.extractor_a} → {d.extractor_b}"
        t.add_row(name, "final" if d.layer == -1 else str(d.layer), str(d.videos_a), str(d.videos_b),
                  str(d.added), str(d.removed), str(d.changed), str(d.common), _num(d.cos_min, ".4f"),
                  _num(d.cos_median, ".4f"), _num(None if d.below is None else 100 * d.below, ".1f") + "%")
    console.print(t)
