"""What `mvrec recommend` shows, read from a trained run: which run, the top-k items, their titles
and captions. Plain functions; the model and the ranking are recommender/train.py's."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from mvrec.config import StoreConfig
from recommender.features import store_captions
from recommender.train import load_for_recommend, recommend


def latest_run(out: str | Path) -> Path:
    """The run directory under `out` whose checkpoint was written last."""
    runs = sorted(Path(out).glob("*/best.pt"), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise FileNotFoundError(f"no trained run under {out}; run `mvrec train` or pass --run")
    return runs[-1].parent


def run_config(run_dir: Path) -> dict:
    return json.loads((run_dir / "config.json").read_text())


def item_titles(run_dir: Path, items_csv: Path | None = None) -> dict[str, str]:
    """{item: title} from items.csv: the given file, else the one next to the run's interactions."""
    if items_csv is None:
        source = run_config(run_dir).get("data", {}).get("source", "")
        guess = Path(source).parent / "items.csv" if source else None
        if guess is None or not guess.is_file():
            return {}
        items_csv = guess
    if not items_csv.is_file():
        raise FileNotFoundError(f"items file not found: {items_csv}")
    with items_csv.open(encoding="utf-8") as fh:
        return {row["item_id"]: row.get("title", "") for row in csv.DictReader(fh)}


def item_captions(run_dir: Path, items: list[str], store: StoreConfig) -> dict[str, str]:
    """{item: caption} from the store the run's features came from; {} when they did not."""
    snapshot = (run_config(run_dir).get("features") or {}).get("snapshot", {})
    if snapshot.get("kind") != "store":
        return {}
    return store_captions(snapshot.get("path", store.path), items, snapshot.get("caption_extractor")
                          or snapshot.get("extractor_id"), store.storage_options)


def top_items(run: str | Path, user: str, k: int, store: StoreConfig, items_csv: Path | None = None) -> dict:
    """-> {"run_dir", "items": [(item, score, title, caption)], "has_titles"} for a run dir or best.pt."""
    model, ckpt = load_for_recommend(run)
    run_dir = Path(run) if Path(run).is_dir() else Path(run).parent
    recs = recommend(model, ckpt, user, k)
    titles = item_titles(run_dir, items_csv)
    captions = item_captions(run_dir, [item for item, _ in recs], store)
    return {"run_dir": run_dir, "has_titles": bool(titles),
            "items": [(item, score, titles.get(item, ""), captions.get(item, "")) for item, score in recs]}
