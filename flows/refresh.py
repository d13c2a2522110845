"""nightly_refresh: new and changed videos -> caption vectors -> (optional) retraining.

    extract-features (subflow) -> embed-captions -> maintain-store -> train-recommender (if interactions are set)

`mvrec refresh` runs it once; `mvrec serve --cron "0 2 * * *"` serves it as a deployment.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.extract import extract_features
from flows.plan import captions_to_embed, forget_plans, pending_work
from flows.report import publish, refresh_markdown
from mvrec.config import load_config
from storage import FeatureStore, open_store


@task(name="embed-captions", cache_policy=NO_CACHE)
def embed_captions(store: FeatureStore, extractor_id: str, text_model: str, batch_size: int = 256,
                   commit_size: int = 4096) -> int:
    """Add sentence vectors to captions that lack them: embedded `batch_size` at a time, written
    `commit_size` at a time (a night's captions in a handful of commits). Returns how many."""
    from tasks.text_embed import embed_texts

    todo = captions_to_embed(store, extractor_id, text_model)
    for start in range(0, todo.num_rows, commit_size):
        part = todo.slice(start, commit_size)
        texts = part.column("caption").to_pylist()
        vectors = np.concatenate([np.asarray(embed_texts(texts[i:i + batch_size], text_model), dtype=np.float32)
                                  for i in range(0, len(texts), batch_size)])
        dim = vectors.shape[1]
        embedding = pa.ListArray.from_arrays(pa.array(np.arange(0, (len(texts) + 1) * dim, dim), pa.int32()),
                                             pa.array(vectors.reshape(-1), pa.float32()))
        store.upsert_captions(part.append_column("text_model", pa.array([text_model] * part.num_rows, pa.string()))
                              .append_column("text_embedding", embedding))
    return todo.num_rows


@task(name="maintain-store", cache_policy=NO_CACHE)
def maintain_store(store: FeatureStore, max_files: int, max_versions: int, retention_hours: float) -> dict:
    """Compact, vacuum and checkpoint the tables past their thresholds (storage/maintenance.py)."""
    from storage.maintenance import maintain

    return maintain(store, max_files=max_files, max_versions=max_versions, retention_hours=retention_hours)


@task(name="train-recommender", cache_policy=NO_CACHE)
def train_recommender(config_path: str | None, overrides: dict[str, Any] | None, interactions: str,
                      extractor_id: str) -> dict:
    """Retrain the DFF recommender on the refreshed features (recorded with their snapshot)."""
    from recommender.pipeline import train_from_store

    cfg = load_config(config_path, overrides=overrides)
    return train_from_store(cfg, interactions=interactions, extractor_id=extractor_id, representation="dff")


@flow(name="nightly-refresh", log_prints=True)
def nightly_refresh(source: str | None = None, overrides: dict[str, Any] | None = None,
                    interactions: str | None = None, config_path: str | None = None, only_failed: bool = False,
                    verify: bool = False) -> dict:
    """Extract what is new or changed under `source`, embed new captions, and retrain if
    `interactions` (a MicroLens pairs file) is given. Defaults come from [refresh] in the config.
    only_failed: extract only the videos with open failures and embed their captions, no retraining
    (`mvrec rerun-failed`). verify: hash every file, trusting no recorded stat signature."""
    log = get_run_logger()
    cfg = load_config(config_path, overrides=overrides)
    source = source or cfg.refresh.source
    interactions = None if only_failed else interactions if interactions is not None else cfg.refresh.interactions
    work = pending_work(cfg, source, only_failed=only_failed, verify=verify)  # the CLI's pre-check, if it made one
    if not (work["to_extract"] or work["unreadable"]):
        forget_plans()  # no extraction takes it
    eid = work["extractor_id"]
    extraction_failed = False
    if work["to_extract"] or work["unreadable"]:
        state = extract_features(source, overrides=overrides, only_failed=only_failed, config_path=config_path,
                                 verify=verify, return_state=True)
        extraction_failed = state.is_failed()
        summary = state.result(raise_on_failure=False)
        if isinstance(summary, BaseException):
            # Transient failures: what succeeded is committed; carry on with it and fail at the end.
            summary = {"error": str(summary)}
    else:  # nothing new: no subflow, no model, no run record to write
        log.info("nothing new: %d videos already extracted by %s", work["done"], eid)
        summary = {"extractor_id": eid, "discovered": work["videos"], "processed": 0, "failed": 0,
                   "skipped_done": work["done"], "skipped_broken": work["known_broken"], "lvlm_batches": 0}
    store = open_store(cfg.store)
    embedded = embed_captions(store, eid, cfg.extract.text_model, commit_size=cfg.extract.max_commit_size) if (
        work["captions_to_embed"] or summary.get("processed")) else 0
    log.info("embedded %d captions with %s", embedded, cfg.extract.text_model)
    maintained = maintain_store(store, cfg.store.maintain_max_files, cfg.store.maintain_max_versions,
                                cfg.store.vacuum_retention_hours)
    trained = None
    if interactions:
        trained = train_recommender(config_path, overrides, interactions, eid)
    result = {"extract": summary, "captions_embedded": embedded, "maintenance": maintained, "train": trained,
              "extractor_id": eid}
    publish("nightly-refresh", refresh_markdown(result), f"nightly-refresh of {source}")
    if extraction_failed:
        raise RuntimeError(f"extraction failed: {summary.get('error', '')}")
    return result
