"""Delta table mechanics: one Delta table per spec under a root, created or upgraded in place,
written by exact upserts (one commit each, retried on conflicts), read as plain Parquet files of
one pinned version, optimized and vacuumed. Nothing here knows what a video or an extractor is.

Test-only pause points (for crash and concurrency tests, see tests/test_store.py): with
MVREC_TEST_PAUSE_AT=<point>[,<point>...] and MVREC_TEST_PAUSE_FILE=<path> set, a writer that
reaches <point> writes "<pid> <point>" to <path> and waits until <path> is deleted; the test
then kills it or deletes the file. Points, per table: `<table>:before-write` (rows merged,
nothing written), `<table>:mid-write` (part of the commit's Parquet data written, no log entry
yet), `<table>:after-commit` (the log entry is in, the call has not returned). Unset: nothing.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from deltalake import ColumnProperties, DeltaTable, Field, WriterProperties, write_deltalake
from deltalake.exceptions import CommitFailedError, DeltaError, TableNotFoundError
from deltalake.fs import DeltaStorageHandler

from storage.arrow import key_strings, to_arrow
from storage.schema import ALL_TABLES, SCHEMA_VERSION, TS, TableSpec, parse_schema_version, table_description

COMMIT_RETRIES = 8  # optimistic-concurrency retries when another writer committed first
# Distinct values of a table's leading key column (video_id) per commit. The replace-where
# predicate lists every key value; deltalake 1.6.6 segfaults parsing one of ~60k literals
# (30,000 caption keys) and takes seconds at 20k. A larger write is split into commits of this
# many videos, each with all of its videos' rows (tests/test_store.py writes 100,000 keys).
MAX_KEYS_PER_COMMIT = 8192


class StoreNotWritableError(PermissionError):
    """The store (or one of its tables) cannot be written: read-only, wrong owner, read-only mount."""


def pause_point(point: str) -> None:
    """The test-only hook described in the module docstring."""
    points = os.environ.get("MVREC_TEST_PAUSE_AT")
    if not points or point not in points.split(","):
        return
    marker = os.environ["MVREC_TEST_PAUSE_FILE"]
    with open(marker + ".tmp", "w") as f:
        f.write(f"{os.getpid()} {point}\n")
    os.replace(marker + ".tmp", marker)  # the test never sees half a marker
    while os.path.exists(marker):
        time.sleep(0.01)


def _paused_midway(table: pa.Table, point: str) -> Any:
    """The rows as a stream that pauses at `point` after its first batch (Delta Lake has started
    writing the commit's data files); the plain table when the point is not armed."""
    if point not in os.environ.get("MVREC_TEST_PAUSE_AT", "").split(","):
        return table

    def batches() -> Iterator[pa.RecordBatch]:
        for i, b in enumerate(table.to_batches(max_chunksize=max(1, table.num_rows // 2))):
            if i == 1:
                pause_point(point)
            yield b
    return pa.RecordBatchReader.from_batches(table.schema, batches())


_NOT_WRITABLE = ("Permission denied", "Read-only file system", "os error 13", "os error 30")


@contextmanager
def _writing(name: str) -> Iterator[None]:
    """A write error that says the storage refused (permissions, a read-only mount) becomes
    StoreNotWritableError with one line."""
    try:
        yield
    except (OSError, DeltaError) as e:
        if isinstance(e, StoreNotWritableError) or not any(s in str(e) for s in _NOT_WRITABLE):
            raise
        raise StoreNotWritableError(f"store not writable: {name}: {str(e).splitlines()[0]}") from None


def _sql_in(column: str, values: list[Any]) -> str:
    """`column IN (...)` for a Delta predicate; strings quoted with '' escaping."""
    def lit(v: Any) -> str:
        if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
            return str(int(v))
        return "'" + str(v).replace("'", "''") + "'"
    return f"{column} IN ({', '.join(lit(v) for v in values)})"


def keep_columns(spec: TableSpec) -> Callable[[pa.Table, pa.Table], pa.Table]:
    """combine(): matched rows keep their existing spec.keep_on_update values (e.g. first_seen)."""
    def combine(new: pa.Table, existing: pa.Table) -> pa.Table:
        if not existing.num_rows:
            return new
        ekeys = key_strings(existing, spec.key).to_pylist()
        pos = pc.index_in(key_strings(new, spec.key), value_set=pa.array(ekeys, pa.string()))
        for col in spec.keep_on_update:
            old = existing.column(col).combine_chunks().take(pos)  # null where no match
            i = new.schema.get_field_index(col)
            new = new.set_column(i, col, pc.coalesce(old, new.column(col)))
        return new
    return combine


def _writer_properties(spec: TableSpec) -> WriterProperties | None:
    """Embedding tables: float vectors neither compress nor dictionary-encode, and decoding
    compressed pages is the slowest part of loading a layer (measured: bench/store.py)."""
    if not any(pa.types.is_list(f.type) for f in spec.schema):
        return None
    return WriterProperties(compression="UNCOMPRESSED",
                            default_column_properties=ColumnProperties(dictionary_enabled=False))


_DELTA_TYPES = {pa.string(): "string", pa.int32(): "integer", pa.int64(): "long", pa.float32(): "float",
                pa.float64(): "double", pa.bool_(): "boolean", TS: "timestamp"}


def _delta_type(t: pa.DataType) -> str:
    """The Delta primitive type name of an Arrow type, for an added column."""
    if t not in _DELTA_TYPES:
        raise ValueError(f"no Delta type for an added column of type {t}")
    return _DELTA_TYPES[t]


def _is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("file://")



class DeltaTables:
    """The Delta tables of storage/schema.py under `path` (local directory or s3://bucket/prefix)."""

    def __init__(self, path: str | os.PathLike[str], storage_options: Mapping[str, str] | None = None):
        path = os.fspath(path)
        if path.startswith("file://"):
            path = path[len("file://"):]
        self.is_local = not _is_uri(path)
        self.root = os.path.abspath(path) if self.is_local else path.rstrip("/")
        self.storage_options = {str(k): str(v) for k, v in (storage_options or {}).items()} or None
        self._current: set[str] = set()  # tables checked to have every column of their spec
        self._writable: set[str] = set()  # tables whose log directory took a file

    def uri(self, table: str) -> str:
        if table not in ALL_TABLES:
            raise ValueError(f"unknown table {table!r} (known: {', '.join(ALL_TABLES)})")
        return f"{self.root}/{table}" if not self.is_local else os.path.join(self.root, table)

    def exists(self) -> bool:
        return DeltaTable.is_deltatable(self.uri("hidden_states"), self.storage_options)

    def table(self, name: str, version: int | None = None) -> DeltaTable:
        """The Delta table `name`, at `version` (None: latest)."""
        uri = self.uri(name)
        try:
            return DeltaTable(uri, version=version, storage_options=self.storage_options)
        except TableNotFoundError as e:
            raise FileNotFoundError(f"{uri}: no Delta table (is {self.root} a feature store?)") from e
        except DeltaError as e:
            if version is not None:
                raise ValueError(f"{name}: cannot read version {version}: {e}") from e
            raise

    # -- create and upgrade -------------------------------------------------------------------

    def ensure(self, spec: TableSpec) -> None:
        """Create the table, or check its schema version and add the columns an older table lacks."""
        uri = self.uri(spec.name)
        if DeltaTable.is_deltatable(uri, self.storage_options):
            self._upgrade(spec, DeltaTable(uri, storage_options=self.storage_options))
            return
        try:
            with _writing(spec.name):
                DeltaTable.create(uri, spec.schema, mode="ignore", partition_by=list(spec.partition_by) or None,
                                  name=spec.name, description=table_description(spec),
                                  storage_options=self.storage_options)
        except (CommitFailedError, DeltaError):
            # Another process created it at the same moment: fine if it is there now.
            if not DeltaTable.is_deltatable(uri, self.storage_options):
                raise
        self._current.add(spec.name)

    def _upgrade(self, spec: TableSpec, dt: DeltaTable) -> None:
        """Refuse a table from a newer schema; add spec.added_columns that an older one lacks
        (one metadata commit; existing rows read them as NULL). Safe against a concurrent upgrade."""
        for attempt in range(COMMIT_RETRIES):
            found = parse_schema_version(dt.metadata().description)
            if found is not None and found > SCHEMA_VERSION:
                raise ValueError(f"{dt.table_uri}: written with store schema v{found}, this mvrec reads up "
                                 f"to v{SCHEMA_VERSION}; upgrade mvrec")
            have = {f.name for f in dt.schema().fields}
            missing = [f for f in spec.schema if f.name not in have]
            if not missing:
                self._current.add(spec.name)
                return
            addable = {c for c, _ in spec.added_columns}
            unknown = [f.name for f in missing if f.name not in addable]
            if unknown:
                raise ValueError(f"{dt.table_uri}: not an mvrec {spec.name} table of schema v{found or '?'}: "
                                 f"missing column(s) {', '.join(unknown)}")
            try:
                with _writing(spec.name):
                    dt.alter.add_columns([Field(f.name, _delta_type(f.type), nullable=True) for f in missing])
                    dt.alter.set_table_description(table_description(spec))
            except (CommitFailedError, DeltaError):
                if attempt == COMMIT_RETRIES - 1:
                    raise
                time.sleep(0.05 * (1 + random.random()))
            dt = DeltaTable(dt.table_uri, storage_options=self.storage_options)

    # -- writes ---------------------------------------------------------------------------------

    def check_writable(self, name: str) -> None:
        """Raise StoreNotWritableError unless a file can be made in the table's log directory.

        Checked before Delta Lake writes anything: on a read-only directory its writer panics in
        a worker thread (printed to stderr) before it returns the error. Object stores are not
        probed; their errors are translated when the write fails."""
        if not self.is_local or name in self._writable:
            return
        log = os.path.join(self.uri(name), "_delta_log")
        try:
            fd, probe = tempfile.mkstemp(prefix=".mvrec-write-check-", dir=log)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise StoreNotWritableError(f"store not writable: {log}: {e.strerror}") from None
        self._writable.add(name)

    def check_all_writable(self) -> None:
        """check_writable for every table: what a command that writes calls before any work."""
        for name in ALL_TABLES:
            self.check_writable(name)

    def retry(self, op: Callable[[], Any], table: str) -> Any:
        """Run a read-then-commit `op`; on a conflict with a concurrent writer, run it again
        from a fresh read (op reloads the table itself)."""
        for attempt in range(COMMIT_RETRIES):
            try:
                return op()
            except CommitFailedError as e:
                if attempt == COMMIT_RETRIES - 1:
                    raise RuntimeError(f"{table}: commit kept conflicting with concurrent writers "
                                       f"after {COMMIT_RETRIES} tries: {e}") from e
                time.sleep(min(2.0, 0.05 * 2**attempt) * (0.5 + random.random()))
        raise AssertionError("unreachable")

    def replace_keys(self, spec: TableSpec, data: pa.Table,
                     combine: Callable[[pa.Table, pa.Table], pa.Table] | None = None,
                     delete_only: bool = False) -> int:
        """Upsert (or delete) `data`'s keys and return the new version: one commit per
        MAX_KEYS_PER_COMMIT values of the leading key column (usually exactly one commit; see
        `replace_keys_once`). Every row of one leading key (all layers and contents of a video)
        is in the same commit, so a video is complete or absent; a crash part way through a
        split write leaves the earlier commits, and writing again is idempotent."""
        lead = next((k for k in spec.key if k not in spec.partition_by), spec.key[0])
        values = pc.unique(data.column(lead)) if data.num_rows else pa.array([])
        if len(values) <= MAX_KEYS_PER_COMMIT:
            return self.replace_keys_once(spec, data, combine, delete_only)
        version = -1
        for start in range(0, len(values), MAX_KEYS_PER_COMMIT):
            part = data.filter(pc.is_in(data.column(lead), value_set=values[start:start + MAX_KEYS_PER_COMMIT]))
            version = self.replace_keys_once(spec, part, combine, delete_only)
        return version

    def replace_keys_once(self, spec: TableSpec, data: pa.Table,
                          combine: Callable[[pa.Table, pa.Table], pa.Table] | None = None,
                          delete_only: bool = False) -> int:
        """Upsert (or delete) `data`'s keys in ONE Delta commit and return the new version.

        The commit is a replace-where: `write_deltalake(mode="overwrite", predicate=P)` removes
        the rows matching P and adds `data`, atomically. P is `col IN (...)` per key column
        (partition columns first, so untouched partitions are pruned). P can match more than
        the exact keys (the cross product of the IN lists); such rows are read first and
        written back unchanged, so the upsert is exact. A concurrent commit that adds rows
        matching P makes ours fail with CommitFailedError, and `retry` redoes it from a fresh read.

        combine(new, existing) may fill columns from the existing rows of the same keys
        (first_seen, attempts). delete_only: remove data's keys (data holds key columns only).
        """
        key = list(spec.key)
        key_set = key_strings(data, key)

        def op() -> int:
            dt = self.table(spec.name)
            ds = dt.to_pyarrow_dataset()
            expr = None
            for k in key:
                values = pc.unique(data.column(k))
                term = pc.field(k).isin(values)
                expr = term if expr is None else expr & term
            # Key columns first: a night's keys are mostly new, and reading whole rows (vectors) of
            # every file the filter cannot rule out made each commit cost the table's size.
            existing = ds.to_table(columns=key, filter=expr)
            if existing.num_rows:
                existing = ds.to_table(filter=expr)
            out = data.select([c for c in data.column_names])
            if existing.num_rows:
                same = pc.is_in(key_strings(existing, key), value_set=key_set)
                carry = existing.filter(pc.invert(same))  # matched by P but not ours: keep
                if combine is not None and not delete_only:
                    out = combine(out, existing.filter(same))
                if carry.num_rows:
                    carry = carry.select(spec.schema.names).cast(spec.schema)
                    out = carry if delete_only else pa.concat_tables([out, carry])
                elif delete_only:
                    out = spec.schema.empty_table()
            elif delete_only:
                return dt.version()  # nothing to delete: no commit
            predicate = " AND ".join(_sql_in(k, pc.unique(data.column(k)).to_pylist())
                                     for k in sorted(key, key=lambda c: c not in spec.partition_by))
            pause_point(f"{spec.name}:before-write")
            with _writing(spec.name):
                write_deltalake(dt, _paused_midway(out, f"{spec.name}:mid-write"), mode="overwrite",
                                predicate=predicate, storage_options=self.storage_options,
                                writer_properties=_writer_properties(spec))
            pause_point(f"{spec.name}:after-commit")
            return dt.version()

        if data.num_rows == 0:
            return self.table(spec.name).version()
        self.check_writable(spec.name)
        return self.retry(op, spec.name)

    def upsert(self, spec: TableSpec, rows: Any, defaults: Mapping[str, Any] | None = None,
               combine: Callable[[pa.Table, pa.Table], pa.Table] | None = None) -> int:
        """Upsert rows by spec.key in one commit. Returns the table version after it."""
        data = to_arrow(spec, rows, defaults)
        if spec.added_columns and spec.name not in self._current:
            self.ensure(spec)  # a store opened with create=False: upgrade before writing
        if spec.keep_on_update and combine is None:
            combine = keep_columns(spec)
        return self.replace_keys(spec, data, combine)

    # -- reads ----------------------------------------------------------------------------------

    def plain_files(self, name: str, dt: DeltaTable,
                    partition: Mapping[str, Any] | None = None) -> list[tuple[str, dict[str, Any]]] | None:
        """The Parquet files of the version `dt` is loaded at (optionally only those of one
        partition, e.g. {"extractor_id": e, "layer": 3}), each with its partition values.

        Exactly that committed version's add actions, so a reader of these files sees one commit
        (files of a commit in flight, or of a killed writer, are not listed). Returns None when the
        files cannot be read as plain Parquet by another reader: an object store (the pyarrow
        dataset reads those), deletion vectors or column mapping (reader protocol > 1), or add
        paths that do not resolve to the table's own file list.
        """
        if not self.is_local:
            return None
        proto = dt.protocol()
        if proto.min_reader_version > 1 or proto.reader_features:
            return None
        actions = pa.table(dt.get_add_actions(flatten=True))
        pcols = [c for c in actions.column_names if c.startswith("partition.")]
        root = self.uri(name)
        paths = [os.path.join(root, p) for p in actions.column("path").to_pylist()]
        if set(paths) != set(dt.file_uris()):
            return None
        parts = [dict(zip((c[len("partition."):] for c in pcols), vals, strict=True))
                 for vals in zip(*(actions.column(c).to_pylist() for c in pcols), strict=True)] if pcols else [{}] * len(paths)
        want = dict(partition or {})
        return [(p, v) for p, v in zip(paths, parts, strict=True) if all(v.get(k) == x for k, x in want.items())]

    def scan(self, name: str, dt: DeltaTable, partition: Mapping[str, Any], columns: list[str]) -> pa.Table:
        """`columns` of one partition at dt's version: the Parquet files read directly when local
        (no dataset discovery), else through the pyarrow dataset (object stores)."""
        files = self.plain_files(name, dt, partition)
        if files is not None:
            parts = []
            for path, _ in files:
                with pq.ParquetFile(path) as f:
                    if not set(columns) <= set(f.schema_arrow.names):
                        parts = None  # an older file without a column: let the dataset fill it
                        break
                    parts.append(f.read(columns=columns))
            if parts is not None:
                if not parts:
                    return ALL_TABLES[name].schema.empty_table().select(columns)
                return pa.concat_tables(parts, promote_options="permissive")
        preds = [(k, "=", v if isinstance(v, str) else str(v)) for k, v in partition.items()]
        return dt.to_pyarrow_dataset(file_pruning_predicate=preds or None).to_table(columns=columns)

    # -- maintenance ----------------------------------------------------------------------------

    def optimize_and_vacuum(self, name: str, retention_hours: float, dry_run: bool,
                            keep_versions: list[int], full: bool = False) -> dict[str, Any]:
        """Bin-pack one table's small files, then vacuum files unreferenced for `retention_hours`
        except those of `keep_versions`. Returns file counts and versions before/after.

        full: vacuum every unreferenced file under the table (a listing of its directory), not
        only those whose removal the log since the last checkpoint still records."""
        dt = self.table(name)
        stats: dict[str, Any] = {"version_before": dt.version()}
        if not dry_run:
            self.check_writable(name)
            with _writing(name):  # rewritten files are written like the table's own
                m = dt.optimize.compact(writer_properties=_writer_properties(ALL_TABLES[name]))
            stats["files_added"] = m.get("numFilesAdded", 0)
            stats["files_removed"] = m.get("numFilesRemoved", 0)
            dt = self.table(name)
        with _writing(name):
            removed = dt.vacuum(retention_hours=int(retention_hours), dry_run=dry_run,
                                enforce_retention_duration=False, keep_versions=keep_versions or None, full=full)
        stats["files_vacuumed"] = len(removed)
        stats["version_after"] = dt.version()
        return stats

    def last_checkpoint(self, dt: DeltaTable) -> int | None:
        """The version of the table's newest checkpoint (`_delta_log/_last_checkpoint`), None
        when it has none. Reads one small file, local or on an object store."""
        try:
            with DeltaStorageHandler(dt.table_uri, self.storage_options).open_input_file(
                    "_delta_log/_last_checkpoint") as f:
                return int(json.loads(f.read())["version"])
        except FileNotFoundError:
            return None

    def checkpoint(self, name: str, clean_logs: bool) -> int:
        """Write a checkpoint at the table's current version (a reader then replays no commit);
        clean_logs: also delete log entries older than delta.logRetentionDuration (30 days)
        before it. Those versions can no longer be read: only for a table no tag pins below the
        checkpoint. Returns the checkpoint's version."""
        dt = self.table(name)
        with _writing(name):
            dt.create_checkpoint()
            if clean_logs:
                dt.cleanup_metadata()
        return dt.version()
