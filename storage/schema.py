"""The feature store's tables: one place for their Arrow schemas, keys, partitions and version.

Every table is a Delta Lake table under `<store>/<name>/`. Changing a schema means bumping
SCHEMA_VERSION and documenting the change in docs/store.md (section "SQL schema").

Embeddings are `list<float32>` (Delta `array<float>`), not `fixed_size_list`: Delta Lake has no
fixed-size array type, so a fixed_size_list would come back as a plain list anyway, and the
dimension differs per extractor (it is recorded in `extractors.dim`). DuckDB therefore needs a
cast to FLOAT[n] before `array_cosine_similarity(embedding::FLOAT[1536], ...)`.

Measured before keeping list<float32> in v2 (bench/store.py data, 10k x 1536, pyarrow 26,
DuckDB 2.0.1): Parquet has no fixed-size list either, a fixed_size_list column is written with the
same repetition levels, and DuckDB's Parquet reader returns it as FLOAT[] (not FLOAT[1536]), so
the cast would still be needed; decoding was within noise of list<float32>.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

# 1: first release (videos, extractors, captions, hidden_states, failures, runs, snapshots).
# 2: failures.content_sha256 (which content a failure was about; '' when unknown). A v1 store is
#    upgraded in place by a writer (FeatureStore(create=True): one add-column commit, old rows
#    read as NULL); readers of a v1 store see the column as NULL.
# 3: videos.frame_count and videos.partial (a video decoded from fewer frames than its header
#    promised); runs.stats (JSON: per-layer embedding norm statistics); failures.permanent.
#    Upgraded the same way.
# 4: runs.owner (JSON: host, pid and process start time of the process running it), so a later
#    run can mark a run whose process is gone as `abandoned`. Upgraded the same way.
# 5: the file_index table (the change check's stat signatures). Created by a writer in an older
#    store; a reader of a store without it sees an empty index.
SCHEMA_VERSION = 5

TS = pa.timestamp("us", tz="UTC")
EMBEDDING = pa.list_(pa.float32())
COUNTS = pa.map_(pa.string(), pa.int64())


@dataclass(frozen=True)
class TableSpec:
    name: str
    schema: pa.Schema
    key: tuple[str, ...]  # upsert key: writing a row with the same key replaces the old row
    partition_by: tuple[str, ...] = ()
    # Columns an upsert must not overwrite on a matched row (e.g. first_seen).
    keep_on_update: tuple[str, ...] = ()
    doc: str = ""
    # (column, schema version that added it): nullable columns an older table may lack.
    added_columns: tuple[tuple[str, int], ...] = ()


VIDEOS = TableSpec(
    "videos",
    pa.schema([
        ("video_id", pa.string()),
        ("uri", pa.string()),
        ("content_sha256", pa.string()),  # sha256 of the file bytes: a changed file is a new row
        ("bytes", pa.int64()),
        ("duration_s", pa.float64()),
        ("fps", pa.float64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("first_seen", TS),
        ("last_seen", TS),
        # v3. Frames the stream yielded (the header's count unless it decoded fewer), and whether
        # it decoded fewer than the header promised (a damaged or truncated file).
        ("frame_count", pa.int64()),
        ("partial", pa.bool_()),
    ]),
    key=("video_id", "content_sha256"),
    keep_on_update=("first_seen",),
    doc="One row per (video, content version) seen by a run.",
    added_columns=(("frame_count", 3), ("partial", 3)),
)

EXTRACTORS = TableSpec(
    "extractors",
    pa.schema([
        ("extractor_id", pa.string()),  # storage.extractor_id(...) of the fields below
        ("model", pa.string()),
        ("revision", pa.string()),
        ("prompt", pa.string()),
        ("frame_policy", pa.string()),
        ("pooling", pa.string()),
        ("code_version", pa.string()),
        ("params", pa.string()),  # JSON of the other knobs that change features (in the hash)
        ("dim", pa.int32()),  # hidden size D (a fact of the model, not part of the hash)
        ("num_layers", pa.int32()),  # L decoder layers; layers 0..L and -1 (final) exist
        ("created", TS),
    ]),
    key=("extractor_id",),
    keep_on_update=("created",),
    doc="Lineage: everything that changes the features, and its stable hash.",
)

CAPTIONS = TableSpec(
    "captions",
    pa.schema([
        ("video_id", pa.string()),
        ("content_sha256", pa.string()),
        ("extractor_id", pa.string()),
        ("caption", pa.string()),
        ("text_model", pa.string()),
        ("text_embedding", EMBEDDING),  # null when no text model ran
    ]),
    key=("video_id", "content_sha256", "extractor_id"),
    partition_by=("extractor_id",),
    doc="The generated caption and its sentence embedding.",
)

HIDDEN_STATES = TableSpec(
    "hidden_states",
    pa.schema([
        ("video_id", pa.string()),
        ("content_sha256", pa.string()),
        ("extractor_id", pa.string()),
        ("layer", pa.int32()),  # 0..L; -1 is `final` (after the final norm)
        ("embedding", EMBEDDING),
    ]),
    key=("video_id", "content_sha256", "extractor_id", "layer"),
    # One directory per (extractor, layer): reading one layer touches no other layer's files.
    partition_by=("extractor_id", "layer"),
    doc="Pooled hidden state per layer, long format. The source of truth of completeness.",
)

FAILURES = TableSpec(
    "failures",
    pa.schema([
        ("video_id", pa.string()),
        ("uri", pa.string()),
        ("extractor_id", pa.string()),  # '' for failures before any model ran (e.g. decode)
        ("stage", pa.string()),  # e.g. probe | decode | extract | caption_embed | commit
        ("error_type", pa.string()),
        ("message", pa.string()),
        ("attempts", pa.int64()),  # accumulated over record_failures calls
        ("run_id", pa.string()),
        ("at", TS),
        # v2. sha256 of the content that failed ('' when unknown; NULL in rows written by v1): a
        # replaced file has a new sha, so the flow can retry it. Last, because Delta appends an
        # added column: a v1 table upgraded in place has the same column order as a new one.
        ("content_sha256", pa.string()),
        # v3. The same input fails the same way again (e.g. a corrupt file): later runs skip it
        # until its content changes. NULL in older rows: tried once more.
        ("permanent", pa.bool_()),
    ]),
    key=("video_id", "extractor_id", "stage"),
    doc="Open failures; cleared when the video later succeeds.",
    # Added after v1, with the schema version that added them (see DeltaTables.ensure).
    added_columns=(("content_sha256", 2), ("permanent", 3)),
)

RUNS = TableSpec(
    "runs",
    pa.schema([
        ("run_id", pa.string()),
        ("flow", pa.string()),
        ("extractor_id", pa.string()),
        ("started", TS),
        ("finished", TS),  # null while running
        ("status", pa.string()),  # running | completed | failed | abandoned (its process is gone)
        ("counts", COUNTS),  # e.g. {"ok": 10, "failed": 1, "skipped": 3}
        ("params", pa.string()),  # JSON: the effective config of the run
        ("snapshot", pa.string()),  # JSON {table: version} at finish_run
        ("message", pa.string()),
        ("stats", pa.string()),  # v3. JSON, e.g. {"norms": {layer: {count, mean, std, min, max}}}
        ("owner", pa.string()),  # v4. JSON {"host", "pid", "pid_started"}: who runs it (storage.runs)
    ]),
    key=("run_id",),
    keep_on_update=("started",),
    doc="One row per flow run.",
    added_columns=(("stats", 3), ("owner", 4)),
)

SNAPSHOTS = TableSpec(
    "snapshots",
    pa.schema([
        ("name", pa.string()),
        ("created", TS),
        ("versions", COUNTS),  # {table: Delta version}
        ("note", pa.string()),
    ]),
    key=("name",),
    doc="Named snapshots (tags): the version of every table at tag time.",
)

FILE_INDEX = TableSpec(
    "file_index",
    pa.schema([
        ("uri", pa.string()),
        # What the file looked like when it was hashed: local "local:size:mtime_ns:ctime_ns:inode",
        # an object "object:etag-or-version:size:last-modified" (tasks.discover.signature).
        ("signature", pa.string()),
        ("content_sha256", pa.string()),
        ("bytes", pa.int64()),
        ("hashed_at", TS),  # when its bytes were last read (refresh.verify_days re-reads older ones)
    ]),
    key=("uri",),
    doc="The change check's memory, like git's index: a file whose signature is unchanged keeps its "
        "hash without a read. Only signatures that could be trusted when hashed are recorded.",
)

# Data tables, in the order a batch writes them (hidden_states last: it marks completeness).
DATA_TABLES: dict[str, TableSpec] = {
    t.name: t for t in (VIDEOS, EXTRACTORS, CAPTIONS, FAILURES, RUNS, HIDDEN_STATES)
}
ALL_TABLES: dict[str, TableSpec] = {**DATA_TABLES, SNAPSHOTS.name: SNAPSHOTS, FILE_INDEX.name: FILE_INDEX}
# The order a reader pins table versions in: the reverse of the write order. A batch whose
# hidden_states a reader pinned had committed its videos and captions before, and the reader
# pins those later, so it sees them too (pinning in write order could see hidden_states rows of a
# batch whose videos row landed just after videos was pinned).
PIN_ORDER: tuple[str, ...] = tuple(reversed(DATA_TABLES)) + (SNAPSHOTS.name, FILE_INDEX.name)


def table_description(spec: TableSpec) -> str:
    """Written into each Delta table's metadata so an old store can be recognised."""
    return f"mvrec {spec.name} schema v{SCHEMA_VERSION}"


def parse_schema_version(description: str | None) -> int | None:
    if not description or not description.startswith("mvrec ") or " schema v" not in description:
        return None
    try:
        return int(description.rsplit(" schema v", 1)[1])
    except ValueError:
        return None


# `mvrec extract --out FILE.parquet`: features without a store, one row per video (ok or failed).
# Not a Delta table; it lives here so every schema the project writes is in one place.
EXTRACT_FILE = pa.schema([
    ("video_id", pa.string()), ("path", pa.string()), ("status", pa.string()),  # ok | failed
    ("error_stage", pa.string()), ("error_type", pa.string()), ("error", pa.string()),
    ("caption", pa.string()), ("layers", pa.list_(pa.int32())),
    ("hidden", pa.list_(pa.list_(pa.float32()))),  # one pooled vector per entry of `layers`
    ("pooling", pa.string()), ("n_video_tokens", pa.int32()), ("n_prompt_tokens", pa.int32()),
    ("n_new_tokens", pa.int32()), ("num_frames", pa.int32()),  # frames decoded and sampled
    ("frame_count", pa.int32()), ("partial", pa.bool_()),  # frames in the stream; fewer than its header promised
    ("fps", pa.float64()),
    ("duration_s", pa.float64()), ("width", pa.int32()), ("height", pa.int32()), ("rotation", pa.int32()),
    ("decoder", pa.string()), ("timings", pa.string()),  # timings: JSON of the stage times
    ("model", pa.string()), ("revision", pa.string()), ("arch", pa.string()), ("is_test_model", pa.bool_()),
    ("prompt", pa.string()), ("frames", pa.string()),
])
