"""CLI commands for recsys (registered on import): train, study, recommend."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from mvrec.cli.common import app, check_store_ids, console, err_console, get_config, work_started
from mvrec.config import PRESETS

FEATURE_HELP = "Hidden-state matrix: .npy (+ <name>.ids.txt), .npz (item_ids, features, layers) or .parquet."

# Options that `train` and `study` share: where the interactions and the features come from.
_INTERACTIONS = typer.Option(..., "--interactions", "-i", help="pairs.tsv (user<TAB>item item ...) or 'user item' rows.")
_FEATURES = typer.Option(None, "--features", help=FEATURE_HELP)
_CAPTION_FEATURES = typer.Option(None, "--caption-features", help="Caption vectors, same formats.")
_EXTRACTOR = typer.Option(None, "--extractor", help="Read hidden states of this extractor from the store.")
_CAPTION_EXTRACTOR = typer.Option(None, "--caption-extractor", help="Read caption vectors from the store.")
_AS_OF = typer.Option(None, "--as-of", help="Store snapshot to read (default: the latest).")
_SYNTHETIC_TOPICS = typer.Option(None, "--synthetic-topics", help="SYNTHETIC features from a demo corpus.json.")


def _load(interactions: Path, cfg, spec, layers: str = "all"):
    from recommender.pipeline import load_inputs

    data, bank = load_inputs(interactions, cfg.train, spec, cfg.store, layers)
    if bank.snapshot.get("kind") == "synthetic-topics":
        err_console.print("[yellow]note:[/] SYNTHETIC features made from the corpus' ground-truth topics, "
                          "not LVLM features (development only).")
    console.print(f"{data.n_users} users, {data.n_items} items ({data.n_dropped_users} users with "
                  f"< {cfg.train.min_seq_len} interactions dropped) from {interactions}")
    return data, bank


def _spec(features, caption_features, topics, extractor, caption_extractor, as_of):
    from recommender.pipeline import FeatureSpec

    paths = [p and str(p) for p in (features, caption_features, topics)]
    return FeatureSpec(*paths, extractor=extractor, caption_extractor=caption_extractor, as_of=as_of)


def _metrics_table(title: str, results: dict[str, dict[str, float]]) -> Table:
    table = Table(title=title)
    table.add_column("split")
    keys = ["HR@10", "NDCG@10", "HR@20", "NDCG@20", "cold/HR@10", "cold/NDCG@10"]
    for k in keys:
        table.add_column(k, justify="right")
    for split, m in results.items():
        table.add_row(split, *[f"{m[k]:.4f}" for k in keys])
    return table


@app.command()
def train(
    interactions: Path = _INTERACTIONS,
    representation: Optional[str] = typer.Option(None, "--representation", "-r", help="id | replace | fuse | dff"),
    source: Optional[str] = typer.Option(None, "--source", help="caption | hidden:all | hidden:<l1,l2,...>"),
    features: Optional[Path] = _FEATURES,
    caption_features: Optional[Path] = _CAPTION_FEATURES,
    extractor: Optional[str] = _EXTRACTOR,
    caption_extractor: Optional[str] = _CAPTION_EXTRACTOR,
    as_of: Optional[str] = _AS_OF,
    synthetic_topics: Optional[Path] = _SYNTHETIC_TOPICS,
    preset: Optional[str] = typer.Option(None, "--preset", help=f"A named recipe: {' | '.join(PRESETS)}."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Maximum epochs (early stopping may end sooner)."),
    seed: Optional[int] = typer.Option(None, "--seed"),
    lr: Optional[float] = typer.Option(None, "--lr"),
    dim: Optional[int] = typer.Option(None, "--dim"),
    loss: Optional[str] = typer.Option(None, "--loss", help="auto | full | sampled | bce"),
    device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory (default: train.out/<name>)."),
) -> None:
    """Train one SASRec model (id / replace / fuse / dff) and report validation and test metrics."""
    cfg = get_config(**{"train.representation": representation, "train.source": source, "train.max_epochs": epochs,
                        "train.seed": seed, "train.lr": lr, "train.dim": dim, "train.loss": loss,
                        "train.device": device, "train.preset": preset})
    check_store_ids(cfg, {"--extractor": extractor, "--caption-extractor": caption_extractor}, as_of)
    from recommender.train import resolve_features, train as train_model

    data, bank = _load(interactions, cfg, _spec(features, caption_features, synthetic_topics, extractor,
                                                caption_extractor, as_of))
    log = lambda m: err_console.print(m, markup=False, highlight=False)  # noqa: E731
    matrix, meta = resolve_features(bank, cfg.train, log=log)
    work_started()
    result = train_model(data, cfg.train, matrix, out, meta=meta, progress=True, log=log)
    console.print(_metrics_table(f"{cfg.train.representation} {'' if cfg.train.representation == 'id' else cfg.train.source}"
                                 f" — best epoch {result.best_epoch} of {result.epochs}",
                                 {"valid": result.valid, "test": result.test}))
    if result.layer_weights:
        console.print("DFF layer weights: " + ", ".join(f"{w:.3f}" for w in result.layer_weights))
    console.print(f"run: {result.run_dir}")


@app.command()
def study(
    interactions: Path = _INTERACTIONS,
    features: Optional[Path] = _FEATURES,
    caption_features: Optional[Path] = _CAPTION_FEATURES,
    extractor: Optional[str] = _EXTRACTOR,
    caption_extractor: Optional[str] = _CAPTION_EXTRACTOR,
    as_of: Optional[str] = _AS_OF,
    synthetic_topics: Optional[Path] = _SYNTHETIC_TOPICS,
    seeds: Optional[int] = typer.Option(None, "--seeds", help="Seeds per cell (>= 3 for the report)."),
    layers: Optional[str] = typer.Option(None, "--layers", help="Hidden layers to study: all | 0,4,final"),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Maximum epochs per run."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Study directory (default: study.out)."),
    engine: Optional[str] = typer.Option(None, "--engine", help="Where the cell x seed units run: serial | processes | ray."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Units at a time (0: as many as fit)."),
    gpus_per_unit: Optional[float] = typer.Option(None, "--gpus-per-unit", help="GPU share of a unit (0: CPU)."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Ray cluster (with --engine ray)."),
    fresh: bool = typer.Option(False, "--fresh", help="Forget the units an earlier run finished; start over."),
    plain: bool = typer.Option(False, "--plain", help="Run the grid as plain functions, without Prefect."),
) -> None:
    """Run the paper's grid (id, replace, fuse per layer, dff) and write results.csv, results.md and plots.

    A rerun of the same study skips the units (cell x seed) that already finished."""
    cfg = get_config(**{"study.seeds": seeds, "study.layers": layers, "study.max_epochs": epochs,
                        "study.out": str(out) if out else None, "study.engine": engine, "study.workers": workers,
                        "study.gpus_per_unit": gpus_per_unit, "study.ray_address": ray_address})
    spec = _spec(features, caption_features, synthetic_topics, extractor, caption_extractor, as_of)
    check_store_ids(cfg, {"--extractor": extractor, "--caption-extractor": caption_extractor}, as_of)
    work_started()
    if plain:
        from recommender.study import run_study

        summary = run_study(*_load(interactions, cfg, spec, cfg.study.layers), cfg.train, cfg.study, cfg.study.out,
                            fresh=fresh)
    else:
        if synthetic_topics:
            err_console.print("[yellow]note:[/] SYNTHETIC features made from the corpus' ground-truth topics, "
                              "not LVLM features (development only).")
        from flows.runtime import configure_prefect, start_api

        configure_prefect(cfg.prefect)
        start_api()  # before Prefect is imported: its own session, so Ctrl-C to the group leaves it up
        from flows.study import study_flow

        summary = study_flow(str(interactions), spec, cfg.train, cfg.study, cfg.store, cfg.study.out, fresh)
    console.print(Path(summary["files"]["results_md"]).read_text(), markup=False, highlight=False)
    for name, path in summary["files"].items():
        console.print(f"{name}: {path}")
    units = summary["units"]
    console.print(f"units: {units['units']}, skipped (finished earlier) {units['skipped']}, ran {units['ran']}, "
                  f"failed {units['failed']}")
    if units["failed"]:
        err_console.print(f"{units['failed']} unit(s) failed (listed in results.md); run the same command again "
                          "to run only those")
        raise typer.Exit(1)


@app.command()
def recommend(
    user: str = typer.Option(..., "--user", "-u", help="A user id from the training interactions."),
    k: int = typer.Option(10, "--k", min=1, help="How many videos."),
    run: Optional[Path] = typer.Option(None, "--run", help="Run directory or best.pt (default: the latest under train.out)."),
    items_csv: Optional[Path] = typer.Option(None, "--items", help="items.csv with titles (default: next to the interactions)."),
) -> None:
    """Top-k unseen videos for a user from a trained checkpoint, with titles and captions."""
    cfg = get_config()
    from recommender.recommend import latest_run, top_items

    run = run or latest_run(cfg.train.out)
    try:
        result = top_items(run, user, k, cfg.store, items_csv)
    except (pickle.UnpicklingError, EOFError, RuntimeError, UnicodeDecodeError) as e:
        # torch.load of random bytes, a JSON file or a truncated checkpoint: name the file, one line
        path = Path(run) / "best.pt" if Path(run).is_dir() else Path(run)
        raise ValueError(f"--run: {path} is not an mvrec checkpoint (a best.pt written by `mvrec train`; "
                         f"loading it raised {type(e).__name__})") from None
    table = Table(title=f"top {len(result['items'])} for user {user} ({result['run_dir']})")
    for col in ("#", "item", "score", "title", "caption"):
        table.add_column(col)
    for rank, (item, score, title, caption) in enumerate(result["items"], start=1):
        table.add_row(str(rank), item, f"{score:.3f}", title, caption)
    console.print(table)
    if not result["has_titles"]:
        err_console.print("note: no items.csv found; pass --items for titles")
