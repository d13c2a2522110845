"""Read-only SQL over the feature store with in-process DuckDB.

`connect()` creates a view per Delta table, pinned to the table version it was opened at (latest,
or `as_of`): a query never sees a commit that lands while it runs, and a long-lived connection
does not see new commits. Two kinds of view:

- the embedding tables (hidden_states, captions) of a local store: DuckDB's own Parquet reader
  over exactly the pinned version's data files, taken from the Delta log (`read_parquet([...])`
  with the Delta partition columns as hive partitions, so `extractor_id`/`layer` filters prune
  files). Measured 3x faster than an Arrow scan on 100k x 1536 (bench/store.py);
- everything else (small tables, object stores, tables with deletion vectors or column mapping):
  `DeltaTable.to_pyarrow_dataset()`, which works on S3 through Delta Lake's object store without
  DuckDB's httpfs.

Then the connection is locked down: no extension loading, configuration locked, and no file
system or network access except reading the pinned data files themselves (`allowed_paths`; a
glob, a directory listing, another version's file or any other path is refused).

Layers of refusal:
1. the statement checks of storage/sql_guard.py: one SELECT (including WITH ... SELECT, VALUES,
   DESCRIBE, SHOW, SUMMARIZE) or EXPLAIN of one, parsed by DuckDB's own parser, that calls no
   refused function and, planned on the connection, reaches no table function or column that
   shows settings, paths or secrets (a catalog view is judged by what it reads);
2. even a statement that got through cannot write (no COPY target, no database file: the views
   are read_parquet or Arrow scans of an in-memory connection) or reach anything outside.

`top_k_similar()` runs its SQL over the pinned layer held in memory as FLOAT[D] (read once per
connection, bounded by `topk_cache_bytes`), because decoding 100k x 1536 Parquet lists on every
query costs seconds, and the cosine itself well under one.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import weakref
from collections import OrderedDict
from typing import Any, Iterator, Mapping, Sequence

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from storage.schema import ALL_TABLES, PIN_ORDER
from storage.arrow import conform, vector_rows
from storage.records import AsOf
from storage.runs import owner_fields, process_gone
from storage.sql_guard import QueryError, ReadOnlyError, check_reach, check_read_only, first_line, one_line_errors
from storage.store import FeatureStore

__all__ = ["HISTORY_VIEWS", "QueryError", "ReadOnlyError", "check_read_only", "ReadOnlyConnection", "connect",
           "top_k_similar"]

# Partition values written into a hive path verbatim by Delta (no escaping involved).
_SAFE_PART = re.compile(r"^[A-Za-z0-9_.\-]+$")
_DUCK_TYPES = {pa.string(): "VARCHAR", pa.int32(): "INTEGER", pa.int64(): "BIGINT"}
TOPK_CACHE_BYTES = 2 << 30  # per connection: a 100k x 1536 float32 layer is 0.6 GB

class Result:
    """The rows of one executed statement (only fetching is exposed, not the connection)."""

    def __init__(self, cursor: duckdb.DuckDBPyConnection):
        self._cur = cursor
        self.description = cursor.description

    def fetchone(self) -> tuple | None:
        with one_line_errors():
            return self._cur.fetchone()

    def fetchall(self) -> list[tuple]:
        with one_line_errors():
            return self._cur.fetchall()

    def fetchmany(self, size: int = 1) -> list[tuple]:
        with one_line_errors():
            return self._cur.fetchmany(size)

    def arrow(self) -> pa.Table:
        with one_line_errors():
            return self._cur.to_arrow_table()

    def df(self):
        with one_line_errors():
            return self._cur.df()


class Batches:
    """A result streamed as Arrow record batches of at most `rows` rows: memory stays bounded
    by a batch however large the result (iterate once; `schema` is known before the first)."""

    def __init__(self, reader: pa.RecordBatchReader):
        self._reader = reader
        self.schema = reader.schema

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        try:
            yield from self._reader
        except (pa.ArrowException, OSError) as e:  # a DuckDB error raised while streaming
            raise QueryError(first_line(e)) from None

    def close(self) -> None:
        self._reader.close()


_TEMP_PREFIX = "mvrec-duckdb-"
_TEMP_NAME = re.compile(rf"^{_TEMP_PREFIX}(\d+)-(\d+)-")


def remove_orphaned_temp_dirs(parent: str | None = None) -> list[str]:
    """Remove the spill directories of connections whose process is gone (a SIGKILLed query
    leaves its directory behind). Only directories of this user named by this module are touched;
    those of a live process are kept. Returns the ones removed."""
    parent = parent or tempfile.gettempdir()
    removed = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        m = _TEMP_NAME.match(name)
        path = os.path.join(parent, name)
        try:
            if not m or os.lstat(path).st_uid != os.getuid() or not os.path.isdir(path):
                continue
        except OSError:
            continue
        if process_gone(int(m.group(1)), int(m.group(2)) / 100):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _sql_str(v: str) -> str:
    return "'" + str(v).replace("'", "''") + "'"


# Tables that hold a row per content version of a video. Their plain name shows the current
# content only (the one Python readers are served: FeatureStore.served); every version is under
# <name>_history. Value: the columns within which one content is chosen.
HISTORY_VIEWS = {"videos": "videos_history", "captions": "captions_history", "hidden_states": "hidden_states_history"}
_CURRENT_PER = {"videos": ("video_id",), "captions": ("video_id", "extractor_id"),
                "hidden_states": ("video_id", "extractor_id", "layer")}


def current_view_sql(name: str) -> str:
    """The view of one content per video over `<name>_history`: among the content versions the
    table has rows for (per _CURRENT_PER), the one whose `videos` row was seen last, ties by
    sha (a version without a videos row only when none has one), as FeatureStore.served picks.

    The choice is an aggregate over key columns only, joined back with an inner join (a semi
    join would not take the query's filters), so a filter on extractor_id / layer prunes the
    files of both scans and no embedding passes through the aggregate."""
    cols = ", ".join(f'h."{c}"' for c in ALL_TABLES[name].schema.names)
    if name == "videos":
        return (f"CREATE VIEW videos AS SELECT {cols} FROM videos_history h QUALIFY row_number() OVER "
                "(PARTITION BY video_id ORDER BY last_seen DESC NULLS LAST, content_sha256 DESC) = 1")
    per = ", ".join(_CURRENT_PER[name])
    return f"""CREATE VIEW {name} AS SELECT {cols} FROM {name}_history h JOIN (
        SELECT {", ".join(f"k.{c}" for c in _CURRENT_PER[name])}, arg_max(k.content_sha256, (v.video_id IS NOT NULL,
               coalesce(v.last_seen, '-infinity'::TIMESTAMPTZ), k.content_sha256)) AS content_sha256
        FROM {name}_history k
        LEFT JOIN videos_history v ON v.video_id = k.video_id AND v.content_sha256 = k.content_sha256
        GROUP BY {", ".join(f"k.{c}" for c in _CURRENT_PER[name])}
    ) served USING ({per}, content_sha256)"""


class ReadOnlyConnection:
    """A DuckDB connection with one view per store table; runs read-only statements only.

    topk_cache_bytes: memory that top_k_similar may keep per connection for the layers it
    searched (pinned, so never stale); 0 runs every search over the view instead.
    """

    def __init__(self, store: FeatureStore, as_of: AsOf = None, topk_cache_bytes: int = TOPK_CACHE_BYTES):
        self.store = store
        self.versions: dict[str, int] = {}
        self.native: dict[str, int] = {}  # table -> number of pinned Parquet files read natively
        self.topk_cache_bytes = int(topk_cache_bytes)
        self._topk: OrderedDict[tuple[str, int], tuple[str, int, int]] = OrderedDict()
        self._topk_seq = 0
        # A private, empty spill directory (DuckDB's default is <cwd>/.tmp, and whatever directory
        # it spills to can be read by queries): made here 0700, removed on close. Its name carries
        # this process (pid, start time), so a later connection removes it if this one is killed.
        remove_orphaned_temp_dirs()
        owner = owner_fields()
        self.temp_dir = tempfile.mkdtemp(prefix=f"{_TEMP_PREFIX}{owner['pid']}-{int(owner['pid_started'] * 100)}-")
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.temp_dir, True)
        self._con = duckdb.connect(":memory:", config={"temp_directory": self.temp_dir})
        if isinstance(as_of, int):
            raise ValueError("connect(as_of=int): a bare version is ambiguous across tables; "
                             "use a tag name or a {table: version} mapping")
        pinned = store.resolve(as_of)
        allowed: list[str] = []
        for name in PIN_ORDER:
            version = pinned.get(name) if pinned and name != "snapshots" else None
            dt = store.table(name, version)
            self.versions[name] = dt.version()
            view = HISTORY_VIEWS.get(name, name)  # the three current views are made below
            files = self._native_files(name, dt)
            if files is not None:
                self._con.execute(self._parquet_view(name, files, view))
                self.native[name] = len(files)
                allowed.extend(files)
            else:
                self._register_arrow(name, dt, view)
        for name in HISTORY_VIEWS:
            self._con.execute(current_view_sql(name))
        self.versions = {name: self.versions[name] for name in ALL_TABLES}
        # Lock down. DuckDB may read the pinned data files named above and nothing else.
        self._con.execute("SET parquet_metadata_cache = true")
        if allowed:
            self._con.execute(f"SET allowed_paths = [{', '.join(_sql_str(p) for p in allowed)}]")
        for stmt in ("SET autoinstall_known_extensions = false",
                     "SET autoload_known_extensions = false",
                     "SET enable_external_access = false",
                     "SET lock_configuration = true"):
            self._con.execute(stmt)

    def _native_files(self, name: str, dt) -> list[str] | None:
        """The pinned version's Parquet files, when DuckDB can read the table from them directly:
        a local embedding table whose files all carry the current schema under plain hive paths."""
        spec = ALL_TABLES[name]
        if not any(pa.types.is_list(f.type) for f in spec.schema):
            return None  # small tables: an Arrow scan is as fast, and fills columns older files lack
        if "=" in self.store.root or "'" in self.store.root:
            return None  # a hive-looking directory above the table would add partition columns
        if [f.name for f in dt.schema().fields] != spec.schema.names:
            return None
        files = self.store.plain_files(name, dt)
        if not files:
            return None  # no store access path, or an empty table (nothing for read_parquet)
        root = self.store.uri(name)
        for path, part in files:
            want = "".join(f"{k}={part.get(k)}/" for k in spec.partition_by)
            if not os.path.relpath(path, root).startswith(want) or not all(
                    part.get(k) is not None and _SAFE_PART.match(str(part[k])) for k in spec.partition_by):
                return None
        return [p for p, _ in files]

    def _parquet_view(self, name: str, files: list[str], view: str) -> str:
        spec = ALL_TABLES[name]
        opts = ""
        if spec.partition_by:
            types = ", ".join(f"{_sql_str(k)}: {_DUCK_TYPES[spec.schema.field(k).type]}" for k in spec.partition_by)
            opts = f", hive_partitioning = true, hive_types = {{{types}}}"
        cols = ", ".join(f'"{c}"' for c in spec.schema.names)
        return (f'CREATE VIEW "{view}" AS SELECT {cols} FROM read_parquet('
                f"[{', '.join(_sql_str(f) for f in files)}]{opts})")

    def _register_arrow(self, name: str, dt, view: str) -> None:
        spec = ALL_TABLES[name]
        have = {f.name for f in dt.schema().fields}
        if all(c in have for c in spec.schema.names):
            self._con.register(view, dt.to_pyarrow_dataset())
        else:  # a table of an older schema (read-only access does not upgrade it): NULL columns
            self._con.register(view, conform(name, dt.to_pyarrow_table()))

    def check(self, query: str, params: Sequence[Any] | Mapping[str, Any] | None = None) -> None:
        """Raise ReadOnlyError unless `query` may run here (storage/sql_guard.py); runs nothing."""
        check_read_only(query)
        check_reach(self._con, query, params)

    def sql(self, query: str, params: Sequence[Any] | Mapping[str, Any] | None = None) -> duckdb.DuckDBPyRelation:
        """Run one read-only statement; returns a relation (.fetchall(), .arrow(), .df(), .columns)."""
        self.check(query, params)
        with one_line_errors():
            return self._con.sql(query, params=params)

    def execute(self, query: str, params: Sequence[Any] | Mapping[str, Any] | None = None) -> "Result":
        """Run one read-only statement; returns a cursor-like Result (fetchone/fetchall/arrow/df)."""
        self.check(query, params)
        # Not a cursor(): registered views live in this connection only.
        with one_line_errors():
            return Result(self._con.execute(query, params))

    def arrow(self, query: str, params: Sequence[Any] | Mapping[str, Any] | None = None) -> pa.Table:
        """Run one read-only statement and return its result as an Arrow table."""
        rel = self.sql(query, params)
        with one_line_errors():
            return rel.to_arrow_table() if hasattr(rel, "to_arrow_table") else rel.arrow()

    def batches(self, query: str, params: Sequence[Any] | Mapping[str, Any] | None = None,
                rows: int = 8192) -> Batches:
        """Run one read-only statement and stream its result (see Batches)."""
        self.check(query, params)
        with one_line_errors():
            return Batches(self._con.sql(query, params=params).to_arrow_reader(rows))

    def views(self) -> dict[str, list[tuple[str, str]]]:
        """{view: [(column, DuckDB type), ...]} for every store table, each followed by its
        `_history` view where it has one."""
        out: dict[str, list[tuple[str, str]]] = {}
        for name in [v for t in ALL_TABLES for v in (t, HISTORY_VIEWS.get(t)) if v]:
            rel = self._con.sql(f'SELECT * FROM "{name}" LIMIT 0')
            out[name] = [(c, str(t)) for c, t in zip(rel.columns, rel.types, strict=True)]
        return out

    def embedding_dim(self, extractor_id: str, layer: int) -> int | None:
        row = self._con.execute(  # every content of a layer has its length: no need to pick one
            "SELECT len(embedding) FROM hidden_states_history WHERE extractor_id = ? AND layer = ? LIMIT 1",
            [extractor_id, int(layer)]).fetchone()
        return int(row[0]) if row else None

    def _layer_table(self, extractor_id: str, layer: int) -> tuple[str, int] | None:
        """(name, D) of the pinned layer held in memory as FLOAT[D], loaded on first use; None when
        it would not fit in topk_cache_bytes (the caller then queries the view)."""
        key = (extractor_id, int(layer))
        if key in self._topk:
            self._topk.move_to_end(key)
            name, d, _ = self._topk[key]
            return name, d
        if self.topk_cache_bytes <= 0:
            return None
        # The size from the Delta log, before reading anything.
        dt = self.store.table("hidden_states", self.versions["hidden_states"])
        files = self.store.plain_files("hidden_states", dt, {"extractor_id": extractor_id, "layer": int(layer)})
        if files is not None and sum(os.path.getsize(p) for p, _ in files) > self.topk_cache_bytes:
            return None
        t = self.store.scan("hidden_states", dt, {"extractor_id": extractor_id, "layer": int(layer)},
                             ["video_id", "content_sha256", "embedding"])
        if t.column("embedding").null_count:
            t = t.filter(pc.is_valid(t.column("embedding")))
        if t.num_rows and pc.count_distinct(t.column("video_id")).as_py() != t.num_rows:
            t = self._current_rows(t, extractor_id, layer)
        what = f"hidden_states[{extractor_id}, layer {layer}]"
        blocks = [vector_rows(c, what) for c in t.column("embedding").chunks if len(c)]
        if not blocks:
            return None
        d = blocks[0].shape[1]
        if any(b.shape[1] != d for b in blocks):
            raise ValueError(f"{what}: embeddings of different lengths in one layer")
        nbytes = sum(b.nbytes for b in blocks)
        if nbytes > self.topk_cache_bytes:
            return None
        # A result the caller left unfetched blocks (un)register in DuckDB 2; running any statement
        # ends it (as the search's own statements would).
        self._con.execute("SELECT 1").fetchall()
        while self._topk and sum(v[2] for v in self._topk.values()) + nbytes > self.topk_cache_bytes:
            old, _, _ = self._topk.popitem(last=False)[1]
            self._con.unregister(old)
        # Zero-copy FLOAT[D] over the Parquet read's buffers; DuckDB scans Arrow memory in place.
        emb = pa.chunked_array([pa.FixedSizeListArray.from_arrays(pa.array(b.reshape(-1)), d) for b in blocks])
        self._topk_seq += 1
        name = f"_mvrec_topk_{self._topk_seq}"
        self._con.register(name, pa.table({"video_id": t.column("video_id"), "embedding": emb}))
        self._topk[key] = (name, d, nbytes)
        return name, d

    def _current_rows(self, t: pa.Table, extractor_id: str, layer: int) -> pa.Table:
        """The rows of `t` (one layer, several contents of some videos) that the current
        `hidden_states` view shows: one content per video."""
        keys = self._con.execute("SELECT video_id || chr(0) || content_sha256 FROM hidden_states "
                                 "WHERE extractor_id = ? AND layer = ?", [extractor_id, int(layer)]).fetchall()
        want = pa.array([k for (k,) in keys], pa.string())
        have = pc.binary_join_element_wise(t.column("video_id"), t.column("content_sha256"), "\x00")
        return t.filter(pc.is_in(have, value_set=want))

    def top_k_similar(self, video_id: str, extractor_id: str, layer: int, k: int = 10) -> list[tuple[str, float]]:
        """The k videos most similar to `video_id` by cosine of one layer's embedding, in SQL.

        Returns [(video_id, cosine)], best first, excluding the video itself. Raises ValueError
        when the video has no embedding for that extractor and layer. The first search of a layer
        reads it (pinned version) into memory as FLOAT[D]; later ones only run the SQL.
        """
        params = {"eid": extractor_id, "layer": int(layer), "vid": str(video_id)}
        cached = self._layer_table(extractor_id, layer)
        if cached is not None:
            src, d = cached
            exists = self._con.execute(f'SELECT 1 FROM "{src}" WHERE video_id = $vid LIMIT 1',
                                       {"vid": str(video_id)}).fetchone()
            # src holds exactly this (extractor, layer): FLOAT[D] already, no cast, no filter.
            # MATERIALIZED: with the NaN filter over the projection, DuckDB computed every cosine
            # twice (measured 2.4 s against 0.7 s over 100k x 1536).
            q = f"""
                WITH q AS (SELECT embedding AS e FROM "{src}" WHERE video_id = $vid LIMIT 1),
                s AS MATERIALIZED (
                    SELECT h.video_id, array_cosine_similarity(h.embedding, q.e) AS score
                    FROM "{src}" h, q WHERE h.video_id <> $vid)
                SELECT * FROM s WHERE NOT isnan(score)  -- a zero vector has no direction
                ORDER BY score DESC LIMIT {int(k)}"""
            run_params: dict[str, Any] = {"vid": str(video_id)}
        else:
            d = self.embedding_dim(extractor_id, layer)
            if d is None:
                raise ValueError(f"hidden_states: no rows for extractor {extractor_id} layer {layer}")
            exists = self._con.execute(
                "SELECT 1 FROM hidden_states WHERE extractor_id = $eid AND layer = $layer AND video_id = $vid LIMIT 1",
                params).fetchone()
            # The dimension must be a literal: array_cosine_similarity needs FLOAT[d], and the
            # Delta column is a variable-length list. d comes from the data, not from user text.
            q = f"""
                WITH q AS (
                    SELECT embedding::FLOAT[{d}] AS e FROM hidden_states
                    WHERE extractor_id = $eid AND layer = $layer AND video_id = $vid LIMIT 1),
                s AS MATERIALIZED (
                    SELECT h.video_id, array_cosine_similarity(h.embedding::FLOAT[{d}], q.e) AS score
                    FROM hidden_states h, q
                    WHERE h.extractor_id = $eid AND h.layer = $layer AND h.video_id <> $vid)
                SELECT * FROM s WHERE NOT isnan(score)  -- a zero vector has no direction
                ORDER BY score DESC LIMIT {int(k)}"""
            run_params = params
        if not exists:
            raise ValueError(f"hidden_states: video {video_id!r} has no embedding for extractor "
                             f"{extractor_id} layer {layer}")
        return [(v, float(s)) for v, s in self._con.execute(q, run_params).fetchall()]

    def close(self) -> None:
        self._topk.clear()
        self._con.close()
        self._cleanup()

    def __enter__(self) -> "ReadOnlyConnection":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def connect(path: str | os.PathLike[str] | FeatureStore | None = None, as_of: AsOf = None,
            storage_options: Mapping[str, str] | None = None,
            topk_cache_bytes: int = TOPK_CACHE_BYTES) -> ReadOnlyConnection:
    """A read-only DuckDB connection with a view per table (videos, extractors, captions,
    hidden_states, failures, runs, snapshots).

    path: a store path or FeatureStore; None reads [store] from the mvrec config.
    as_of: None (latest), a tag name, or a {table: version} mapping as from snapshot().
    topk_cache_bytes: see ReadOnlyConnection.
    Raises FileNotFoundError when there is no store at the path (nothing is created there).
    """
    if isinstance(path, FeatureStore):
        store = path
    else:
        if path is None:
            from mvrec.config import load_config  # config only; storage knows no orchestrator

            cfg = load_config().store
            path, storage_options = cfg.path, storage_options or cfg.storage_options
        store = FeatureStore(path, storage_options, create=False)
    return ReadOnlyConnection(store, as_of, topk_cache_bytes)


def top_k_similar(video_id: str, extractor_id: str, layer: int, k: int = 10,
                  path: str | os.PathLike[str] | FeatureStore | None = None,
                  as_of: AsOf = None) -> list[tuple[str, float]]:
    """Convenience: connect(path, as_of).top_k_similar(video_id, extractor_id, layer, k)."""
    with connect(path, as_of) as con:
        return con.top_k_similar(video_id, extractor_id, layer, k)
