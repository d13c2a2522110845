"""Read-only SQL over the feature store with in-process DuckDB.

`connect()` registers every Delta table as a view (through `DeltaTable.to_pyarrow_dataset()`, so
it works on S3 through Delta Lake's object store, without DuckDB's httpfs), then locks the
connection down: no file system or network access, no extension loading, configuration locked.
Each view is pinned to the table version it was opened at (latest, or `as_of`): a query never
sees a commit that lands while it runs, and a long-lived connection does not see new commits.

Two layers of refusal:
1. every statement is parsed by DuckDB's own parser (`duckdb.extract_statements`); only one
   SELECT (including WITH ... SELECT, VALUES, DESCRIBE, SHOW, SUMMARIZE) or EXPLAIN of one is run;
2. even a statement that got through cannot reach the store's files (views are Arrow scans;
   DuckDB never holds a path to write to) or anything outside (enable_external_access=false).
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping, Sequence

import duckdb
import pyarrow as pa

from storage.schema import ALL_TABLES
from storage.store import AsOf, FeatureStore

ALLOWED = "SELECT (incl. WITH ... SELECT, VALUES, DESCRIBE, SHOW, SUMMARIZE) or EXPLAIN SELECT"

# EXPLAIN [ANALYZE] prefix, after optional comments; what follows is parsed again.
_EXPLAIN = re.compile(r"^\s*(?:(?:--[^\n]*(?:\n|$)|/\*.*?\*/)\s*)*explain\b\s*(?:analy[sz]e\b)?",
                      re.IGNORECASE | re.DOTALL)


class ReadOnlyError(ValueError):
    """A statement that is not read-only; it was not executed."""


def check_read_only(sql: str) -> None:
    """Raise ReadOnlyError unless `sql` is exactly one read-only statement (see ALLOWED)."""
    if not sql or not sql.strip():
        raise ReadOnlyError("refused: empty query")
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as e:
        raise ReadOnlyError(f"refused: cannot parse the query: {str(e).splitlines()[0]}") from None
    if len(statements) != 1:
        raise ReadOnlyError(f"refused: {len(statements)} statements; run exactly one read-only "
                            f"statement ({ALLOWED})")
    st = statements[0]
    kind = st.type
    if kind == duckdb.StatementType.EXPLAIN:
        m = _EXPLAIN.match(sql)
        inner = sql[m.end():] if m else ""
        try:
            inner_st = duckdb.extract_statements(inner) if inner.strip() else []
        except duckdb.Error:
            inner_st = []
        if len(inner_st) != 1 or inner_st[0].type != duckdb.StatementType.SELECT:
            raise ReadOnlyError(f"refused: EXPLAIN of a statement that is not a SELECT; the store is "
                                f"read-only here (allowed: {ALLOWED})")
        return
    if kind != duckdb.StatementType.SELECT:
        name = str(kind).rsplit(".", 1)[-1].replace("_STATEMENT", "")
        raise ReadOnlyError(f"refused: {name} statements are not allowed; the store is read-only "
                            f"here (allowed: {ALLOWED})")


class Result:
    """The rows of one executed statement (only fetching is exposed, not the connection)."""

    def __init__(self, cursor: duckdb.DuckDBPyConnection):
        self._cur = cursor
        self.description = cursor.description

    def fetchone(self) -> tuple | None:
        return self._cur.fetchone()

    def fetchall(self) -> list[tuple]:
        return self._cur.fetchall()

    def fetchmany(self, size: int = 1) -> list[tuple]:
        return self._cur.fetchmany(size)

    def arrow(self) -> pa.Table:
        return self._cur.to_arrow_table()

    def df(self):
        return self._cur.df()


class ReadOnlyConnection:
    """A DuckDB connection with one view per store table; runs read-only statements only."""

    def __init__(self, store: FeatureStore, as_of: AsOf = None):
        self.store = store
        self.versions: dict[str, int] = {}
        self._con = duckdb.connect(":memory:")
        if isinstance(as_of, int):
            raise ValueError("connect(as_of=int): a bare version is ambiguous across tables; "
                             "use a tag name or a {table: version} mapping")
        pinned = store.resolve(as_of)
        for name in ALL_TABLES:
            version = pinned.get(name) if pinned and name != "snapshots" else None
            dt = store.table(name, version)
            self.versions[name] = dt.version()
            self._con.register(name, dt.to_pyarrow_dataset())
        # Lock down only after registering: Arrow scans need no DuckDB file access.
        for stmt in ("SET autoinstall_known_extensions = false",
                     "SET autoload_known_extensions = false",
                     "SET enable_external_access = false",
                     "SET lock_configuration = true"):
            self._con.execute(stmt)

    def sql(self, query: str, params: Sequence[Any] | Mapping[str, Any] | None = None) -> duckdb.DuckDBPyRelation:
        """Run one read-only statement; returns a relation (.fetchall(), .arrow(), .df(), .columns)."""
        check_read_only(query)
        return self._con.sql(query, params=params)

    def execute(self, query: str, params: Sequence[Any] | Mapping[str, Any] | None = None) -> "Result":
        """Run one read-only statement; returns a cursor-like Result (fetchone/fetchall/arrow/df)."""
        check_read_only(query)
        # Not a cursor(): registered views live in this connection only.
        return Result(self._con.execute(query, params))

    def arrow(self, query: str, params: Sequence[Any] | Mapping[str, Any] | None = None) -> pa.Table:
        """Run one read-only statement and return its result as an Arrow table."""
        rel = self.sql(query, params)
        return rel.to_arrow_table() if hasattr(rel, "to_arrow_table") else rel.arrow()

    def views(self) -> dict[str, list[tuple[str, str]]]:
        """{view: [(column, DuckDB type), ...]} for every store table."""
        out: dict[str, list[tuple[str, str]]] = {}
        for name in ALL_TABLES:
            rel = self._con.sql(f'SELECT * FROM "{name}" LIMIT 0')
            out[name] = [(c, str(t)) for c, t in zip(rel.columns, rel.types)]
        return out

    def embedding_dim(self, extractor_id: str, layer: int) -> int | None:
        row = self._con.execute(
            "SELECT len(embedding) FROM hidden_states WHERE extractor_id = ? AND layer = ? LIMIT 1",
            [extractor_id, int(layer)]).fetchone()
        return int(row[0]) if row else None

    def top_k_similar(self, video_id: str, extractor_id: str, layer: int, k: int = 10) -> list[tuple[str, float]]:
        """The k videos most similar to `video_id` by cosine of one layer's embedding, in SQL.

        Returns [(video_id, cosine)], best first, excluding the video itself. Raises ValueError
        when the video has no embedding for that extractor and layer.
        """
        d = self.embedding_dim(extractor_id, layer)
        if d is None:
            raise ValueError(f"hidden_states: no rows for extractor {extractor_id} layer {layer}")
        # The dimension must be a literal: array_cosine_similarity needs FLOAT[d], and the
        # Delta column is a variable-length list. d comes from the data, not from user text.
        q = f"""
            WITH q AS (
                SELECT embedding::FLOAT[{d}] AS e FROM hidden_states
                WHERE extractor_id = $eid AND layer = $layer AND video_id = $vid LIMIT 1)
            SELECT * FROM (
                SELECT h.video_id, array_cosine_similarity(h.embedding::FLOAT[{d}], q.e) AS score
                FROM hidden_states h, q
                WHERE h.extractor_id = $eid AND h.layer = $layer AND h.video_id <> $vid)
            WHERE NOT isnan(score)  -- a zero vector has no direction
            ORDER BY score DESC LIMIT {int(k)}"""
        params = {"eid": extractor_id, "layer": int(layer), "vid": str(video_id)}
        exists = self._con.execute(
            "SELECT 1 FROM hidden_states WHERE extractor_id = $eid AND layer = $layer AND video_id = $vid LIMIT 1",
            params).fetchone()
        if not exists:
            raise ValueError(f"hidden_states: video {video_id!r} has no embedding for extractor "
                             f"{extractor_id} layer {layer}")
        return [(v, float(s)) for v, s in self._con.execute(q, params).fetchall()]

    def close(self) -> None:
        self._con.close()

    def __enter__(self) -> "ReadOnlyConnection":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def connect(path: str | os.PathLike[str] | FeatureStore | None = None, as_of: AsOf = None,
            storage_options: Mapping[str, str] | None = None) -> ReadOnlyConnection:
    """A read-only DuckDB connection with a view per table (videos, extractors, captions,
    hidden_states, failures, runs, snapshots).

    path: a store path or FeatureStore; None reads [store] from the mvrec config.
    as_of: None (latest), a tag name, or a {table: version} mapping as from snapshot().
    Raises FileNotFoundError when there is no store at the path.
    """
    if isinstance(path, FeatureStore):
        store = path
    else:
        if path is None:
            from mvrec.config import load_config  # config only; storage knows no orchestrator

            cfg = load_config().store
            path, storage_options = cfg.path, storage_options or cfg.storage_options
        store = FeatureStore(path, storage_options, create=False)
    return ReadOnlyConnection(store, as_of)


def top_k_similar(video_id: str, extractor_id: str, layer: int, k: int = 10,
                  path: str | os.PathLike[str] | FeatureStore | None = None,
                  as_of: AsOf = None) -> list[tuple[str, float]]:
    """Convenience: connect(path, as_of).top_k_similar(video_id, extractor_id, layer, k)."""
    with connect(path, as_of) as con:
        return con.top_k_similar(video_id, extractor_id, layer, k)
