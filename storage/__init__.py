"""The mvrec feature store: Delta Lake tables, idempotent upserts, named snapshots, and
read-only DuckDB views. Knows no model and no orchestrator: storage/ imports
nothing from tasks/, flows/ or recommender/.

    from storage import FeatureStore, ExtractorRecord, connect
    store = FeatureStore("./.mvrec/store")
    eid = store.upsert_extractor(ExtractorRecord(model=..., revision=..., prompt=..., ...))
    store.write_batch(ExtractionBatch(videos=[...], captions=[...], hidden_states=[...]))
    X = store.layer_matrix(eid, layer=8, item_ids=ids).values     # float32 (N, D), item order
    with connect(store) as con:
        con.sql("SELECT count(*) FROM hidden_states").fetchall()

Layout: schema.py (every table's schema, keys, version), records.py (row and record types),
arrow.py (rows <-> Arrow), delta.py (Delta table mechanics), store.py (the FeatureStore API),
query.py (read-only SQL), export.py (results to CSV, JSON, Parquet).
"""

from storage.schema import ALL_TABLES, DATA_TABLES, EXTRACT_FILE, SCHEMA_VERSION, TableSpec
from storage.records import (
    FINAL_LAYER,
    AsOf,
    CaptionRow,
    ExtractionBatch,
    ExtractorRecord,
    FailureRow,
    FeatureMatrix,
    HiddenStateRow,
    MissingItemsError,
    VideoRow,
    extractor_id,
)
from storage.delta import StoreNotWritableError
from storage.lease import RunLeaseHeld
from storage.store import FeatureStore, open_store
from storage.query import QueryError, ReadOnlyConnection, ReadOnlyError, check_read_only, connect, top_k_similar

__all__ = [
    "ALL_TABLES", "DATA_TABLES", "EXTRACT_FILE", "SCHEMA_VERSION", "TableSpec", "FINAL_LAYER", "AsOf",
    "CaptionRow", "ExtractionBatch", "ExtractorRecord", "FailureRow", "FeatureMatrix",
    "FeatureStore", "HiddenStateRow", "MissingItemsError", "RunLeaseHeld", "StoreNotWritableError", "VideoRow",
    "extractor_id", "open_store", "QueryError", "ReadOnlyConnection", "ReadOnlyError", "check_read_only", "connect",
    "top_k_similar",
]
