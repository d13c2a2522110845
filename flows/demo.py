"""`mvrec demo`: the whole path on embedded defaults (CPU, ephemeral Prefect, local store).

    demo corpus -> local test LVLM -> nightly_refresh (extract -> store -> caption vectors ->
    train + evaluate the DFF recommender against ID-only) -> report

Each step is skipped when its output already exists, so a second `make demo` is quick.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table


def run_demo(out: str = "./.mvrec/demo", videos: int = 200, users: int = 2000, seed: int = 0,
             console: Console | None = None, store_path: str | None = None, runs_path: str | None = None) -> dict:
    console = console or Console()
    root = Path(out).resolve()
    from mvrec.config import load_config

    # The store is the configured one (default ./.mvrec/store), so `mvrec query` reads it afterwards.
    store_dir = Path(store_path or load_config().store.path).resolve()
    # Training runs go to the configured train.out (default ./.mvrec/runs), where `mvrec recommend` looks.
    runs_dir = Path(runs_path or load_config().train.out).resolve()
    corpus, model_dir = root / "corpus", root / "models" / "test-qwen2_5_vl"
    timings: dict[str, float] = {}

    t = time.perf_counter()
    marker = corpus / "corpus.json"
    if not marker.exists() or json.loads(marker.read_text())["params"].get("videos") != videos \
            or json.loads(marker.read_text())["params"].get("users") != users:
        from mvrec.devtools.demo_data import make_demo_corpus

        console.print(f"[bold]1/4 demo corpus[/]: {videos} videos, {users} users -> {corpus}")
        make_demo_corpus(corpus, videos=videos, users=users, seed=seed)
    else:
        console.print(f"[bold]1/4 demo corpus[/]: exists at {corpus}")
    timings["corpus"] = time.perf_counter() - t

    t = time.perf_counter()
    from mvrec.devtools.test_model import build_test_model

    if not (model_dir / "config.json").exists():
        build_test_model(model_dir)
    console.print(f"[bold]2/4 test LVLM[/]: {model_dir} [yellow](random weights: a TEST MODEL, "
                  "its captions and features carry no meaning)[/]")
    timings["model"] = time.perf_counter() - t

    overrides = {"extract.model": str(model_dir), "store.path": str(store_dir),
                 "train.out": str(runs_dir)}
    console.print("[bold]3/4 nightly refresh[/]: extract -> store -> caption vectors -> train + evaluate")
    t = time.perf_counter()
    from flows.refresh import nightly_refresh

    result = nightly_refresh(str(corpus / "videos"), overrides=overrides, interactions=str(corpus / "pairs.tsv"))
    timings["refresh"] = time.perf_counter() - t

    console.print("[bold]4/4 report[/]")
    from storage import connect, open_store

    store = open_store(load_config(overrides=overrides).store)
    with connect(store) as con:
        per_layer = con.sql("SELECT layer, count(*) AS videos FROM hidden_states "
                            f"WHERE extractor_id = '{result['extractor_id']}' GROUP BY layer ORDER BY layer").fetchall()
        captions = con.sql("SELECT count(*) FROM captions WHERE text_embedding IS NOT NULL").fetchall()[0][0]
        failures = con.sql("SELECT count(*) FROM failures").fetchall()[0][0]
    ext = result["extract"]
    table = Table(title="mvrec demo", show_header=False)
    table.add_row("videos extracted this run", str(ext.get("processed")))
    table.add_row("already in the store", str(ext.get("skipped_done")))
    table.add_row("failures", str(failures))
    table.add_row("layers stored", f"{len(per_layer)} (video count per layer: {per_layer[0][1] if per_layer else 0})")
    table.add_row("captions with vectors", str(captions))
    table.add_row("corpus", str(corpus))
    table.add_row("store", str(store_dir))
    table.add_row("training runs", str(runs_dir))
    table.add_row("seconds", "  ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    console.print(table)

    train = result.get("train") or {}
    metrics = Table(title="test metrics (leave-one-out, full ranking)")
    columns = ["HR@10", "NDCG@10", "HR@20", "NDCG@20", "cold/HR@10"]
    metrics.add_column("item representation")
    for c in columns:
        metrics.add_column(c, justify="right")
    for name, values in (train.get("test") or {}).items():
        metrics.add_row(name, *(f"{values[c]:.4f}" if c in values else "-" for c in columns))
    console.print(metrics)
    console.print("Features came from a random-weight TEST MODEL, so DFF vs ID here says nothing about LVLMs; "
                  "run the paper's grid with `mvrec study` (see docs/recommender.md).")
    console.print("Next: mvrec recommend --user 17    (top 10 for a demo user, from the run just trained)")
    console.print("      mvrec status                 (runs, failures, extractors, store size)")
    console.print('      mvrec query "SELECT layer, count(*) FROM hidden_states GROUP BY layer"')
    return {"timings": timings, "refresh": result}
