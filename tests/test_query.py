"""Read-only DuckDB access: refused statement classes (and proof they did not run), the
lock-down of the connection itself, schema listing, top-k in SQL, and `mvrec query`."""

from __future__ import annotations

import csv
import json
import os
from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow.parquet as pq
import pytest

from storage import (CaptionRow, ExtractionBatch, FeatureStore, HiddenStateRow, ReadOnlyError, VideoRow,
                     check_read_only, connect)
from storage.query import HISTORY_VIEWS
from storage.schema import ALL_TABLES

VIEWS = sorted([*ALL_TABLES, *HISTORY_VIEWS.values()])

D = 32


@pytest.fixture()
def store(tmp_path) -> FeatureStore:
    st = FeatureStore(tmp_path / "store")
    rng = np.random.default_rng(0)
    st.upsert_hidden_states([HiddenStateRow(f"v{i}", "s", "e", k, rng.standard_normal(D).astype(np.float32))
                             for i in range(30) for k in (0, 3)])
    return st


REFUSED = {
    "DELETE": "DELETE FROM hidden_states",
    "UPDATE": "UPDATE videos SET uri = 'x'",
    "INSERT": "INSERT INTO runs (run_id) VALUES ('x')",
    "COPY": "COPY (SELECT 1) TO '{tmp}/copied.csv'",
    "COPY FROM": "COPY videos FROM '{tmp}/in.csv'",
    "ATTACH": "ATTACH '{tmp}/attached.duckdb' AS other",
    "DETACH": "DETACH other",
    "INSTALL": "INSTALL httpfs",
    "LOAD": "LOAD json",
    "CREATE": "CREATE TABLE made AS SELECT 1 AS x",
    "CREATE VIEW": "CREATE VIEW made AS SELECT 1 AS x",
    "CREATE SECRET": "CREATE SECRET s (TYPE s3, KEY_ID 'a', SECRET 'b')",
    "DROP": "DROP VIEW hidden_states",
    "ALTER": "ALTER VIEW hidden_states RENAME TO hs",
    "PRAGMA": "PRAGMA enable_profiling",
    "SET": "SET enable_external_access = true",
    "RESET": "RESET threads",
    "EXPORT": "EXPORT DATABASE '{tmp}/exported'",
    "CALL": "CALL pragma_version()",
    "CHECKPOINT": "CHECKPOINT",
    "VACUUM": "VACUUM",
    "USE": "USE memory",
    "MULTIPLE": "SELECT 1; DROP VIEW hidden_states",
    "TRAILING WRITE": "SELECT 1; CREATE TABLE made AS SELECT 1",
    "EXPLAIN DELETE": "EXPLAIN DELETE FROM hidden_states",
    "EXPLAIN ANALYZE CREATE": "EXPLAIN ANALYZE CREATE TABLE made AS SELECT 1",
    "COMMENTED": "/* SELECT */ -- hi\nDROP VIEW hidden_states",
    "EMPTY": "   ",
    "GARBAGE": "SELEKT 1",
}


@pytest.mark.parametrize("kind", sorted(REFUSED))
def test_refused_and_not_executed(store, tmp_path, kind):
    sql = REFUSED[kind].format(tmp=tmp_path)
    with connect(store) as con:
        with pytest.raises(ReadOnlyError, match="refused"):
            con.sql(sql)
        with pytest.raises(ReadOnlyError, match="refused"):
            con.execute(sql)
        # Nothing happened: the views are intact, nothing was created, no file was written.
        assert con.execute("SELECT count(*) FROM hidden_states").fetchone() == (60,)
        assert con.execute("SELECT count(*) FROM duckdb_tables()").fetchone() == (0,)
        assert sorted(con.views()) == VIEWS
    assert not any(p.name in ("copied.csv", "attached.duckdb", "exported") for p in tmp_path.iterdir())
    assert store.table("hidden_states").to_pyarrow_dataset().count_rows() == 60


@pytest.mark.parametrize("sql", [
    "SELECT count(*) FROM hidden_states",
    "WITH x AS (SELECT * FROM videos) SELECT count(*) FROM x",
    "FROM runs",
    "EXPLAIN SELECT * FROM hidden_states WHERE layer = 3",
    "EXPLAIN ANALYZE SELECT 1",
    "DESCRIBE hidden_states",
    "SHOW TABLES",
    "SUMMARIZE failures",
    "VALUES (1, 2)",
    "(SELECT 1) UNION ALL (SELECT 2);",
])
def test_read_only_statements_run(store, sql):
    check_read_only(sql)
    with connect(store) as con:
        con.sql(sql).fetchall()


def test_connection_itself_cannot_reach_outside(store, tmp_path):
    # A SELECT passes the statement check, but the connection has no file or network access.
    (tmp_path / "secret.csv").write_text("a\n1\n")
    with connect(store) as con:
        for sql in (f"SELECT * FROM read_csv('{tmp_path}/secret.csv')",
                    f"SELECT * FROM read_parquet('{store.root}/hidden_states/**/*.parquet')",
                    "SELECT * FROM read_text('/etc/hostname')"):
            with pytest.raises(Exception, match="(?i)permission|disabled"):
                con.sql(sql).fetchall()
        # and its configuration is locked
        with pytest.raises(Exception, match="(?i)lock|cannot change"):
            con._con.execute("SET enable_external_access = true")


def test_schema_lists_every_view_with_types(store):
    with connect(store) as con:
        views = con.views()
    assert sorted(views) == VIEWS
    assert views["hidden_states"] == [("video_id", "VARCHAR"), ("content_sha256", "VARCHAR"),
                                      ("extractor_id", "VARCHAR"), ("layer", "INTEGER"), ("embedding", "FLOAT[]")]
    for name, spec in ALL_TABLES.items():
        assert [c for c, _ in views[name]] == spec.schema.names
    for name, history in HISTORY_VIEWS.items():
        assert views[history] == views[name]
    assert dict(views["runs"])["counts"] == "MAP(VARCHAR, BIGINT)"


def test_top_k_similar_matches_numpy(store):
    fm = store.layer_matrix("e", 3, [f"v{i}" for i in range(30)])
    x = fm.values / np.linalg.norm(fm.values, axis=1, keepdims=True)
    sims = x @ x[7]
    sims[7] = -np.inf
    want = [f"v{i}" for i in np.argsort(-sims)[:5]]
    with connect(store) as con:
        got = con.top_k_similar("v7", "e", 3, k=5)
    assert [v for v, _ in got] == want
    np.testing.assert_allclose([s for _, s in got], np.sort(sims)[::-1][:5], rtol=1e-5)
    with connect(store) as con, pytest.raises(ValueError, match="no embedding"):
        con.top_k_similar("nope", "e", 3)


def test_connect_as_of_a_tag(store):
    store.tag("t0")
    store.upsert_hidden_states([HiddenStateRow("new", "s", "e", 0, np.ones(D))])
    with connect(store, as_of="t0") as con:
        assert con.execute("SELECT count(*) FROM hidden_states").fetchone() == (60,)
    with connect(store) as con:
        assert con.execute("SELECT count(*) FROM hidden_states").fetchone() == (61,)
    with pytest.raises(ValueError, match="ambiguous"):
        connect(store, as_of=3)
    with pytest.raises(FileNotFoundError):
        connect(store.root + "-nothing")



# --- current content by default, every content under <table>_history ----------------------------

def _content(video: str, sha: str, value: float, seen: datetime) -> ExtractionBatch:
    """One video's content as a run writes it: its videos row, caption and two layers."""
    return ExtractionBatch(videos=[VideoRow(video, f"/data/{video}.mp4", sha, 10, first_seen=seen, last_seen=seen)],
                           captions=[CaptionRow(video, sha, "e", f"caption {sha}", "m", np.full(4, value, np.float32))],
                           hidden_states=[HiddenStateRow(video, sha, "e", k, np.full(D, value, np.float32))
                                          for k in (0, 3)])


@pytest.fixture()
def reverted(tmp_path) -> FeatureStore:
    """v1: A, then B, then A again (extracted again); v2: one content plus rows of a content with
    no videos row; v3: only rows without a videos row. Tags at A and at B."""
    st = FeatureStore(tmp_path / "reverted")
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    st.write_batch(_content("v1", "shaA", 1.0, t0))
    st.write_batch(_content("v2", "shaX", 7.0, t0))
    st.upsert_hidden_states([HiddenStateRow("v2", "shaZ", "e", k, np.full(D, 9.0)) for k in (0, 3)])
    st.upsert_hidden_states([HiddenStateRow("v3", "shaO", "e", 0, np.full(D, 3.0))])
    st.tag("at-A")
    st.write_batch(_content("v1", "shaB", 5.0, t0 + timedelta(days=1)))
    st.tag("at-B")
    st.write_batch(_content("v1", "shaA", 1.0, t0 + timedelta(days=2)))
    return st


def _served_by_python(st: FeatureStore, as_of) -> dict:
    """What the Python readers give for v1 and v2: {(table, layer): [first value per video]}."""
    out = {(f"layer {k}", k): st.layer_matrix("e", k, ["v1", "v2"], as_of=as_of).values[:, 0].tolist() for k in (0, 3)}
    out[("captions", None)] = st.caption_matrix("e", ["v1", "v2"], as_of=as_of).values[:, 0].tolist()
    return out


@pytest.mark.parametrize("as_of, v1", [(None, ("shaA", 1.0)), ("at-B", ("shaB", 5.0)), ("at-A", ("shaA", 1.0))])
def test_sql_shows_the_content_python_readers_are_served_after_a_revert(reverted, as_of, v1):
    sha, value = v1
    with connect(reverted, as_of=as_of) as con:
        hs = con.execute("SELECT video_id, content_sha256, layer, embedding[1] FROM hidden_states ORDER BY ALL").fetchall()
        assert hs == [("v1", sha, 0, value), ("v1", sha, 3, value), ("v2", "shaX", 0, 7.0), ("v2", "shaX", 3, 7.0),
                      ("v3", "shaO", 0, 3.0)]
        caps = con.execute("SELECT video_id, content_sha256, caption, text_embedding[1] FROM captions ORDER BY 1").fetchall()
        assert caps == [("v1", sha, f"caption {sha}", value), ("v2", "shaX", "caption shaX", 7.0)]
        assert con.execute("SELECT video_id, content_sha256 FROM videos ORDER BY 1").fetchall() == [
            ("v1", sha), ("v2", "shaX")]
        python = _served_by_python(reverted, as_of)
        assert python == {("layer 0", 0): [value, 7.0], ("layer 3", 3): [value, 7.0], ("captions", None): [value, 7.0]}
        # The history views keep every content the pinned versions hold.
        versions = 1 if as_of == "at-A" else 2  # v1's contents
        assert con.execute("SELECT count(*) FROM hidden_states_history").fetchone() == (2 * versions + 4 + 1,)
        assert con.execute("SELECT count(*) FROM captions_history").fetchone() == (versions + 1,)
        assert con.execute("SELECT count(DISTINCT content_sha256) FROM videos_history").fetchone() == (versions + 1,)
        # top-k (the in-memory layer and the view) sees one content per video too.
        for k in (con.top_k_similar("v2", "e", 0, k=5), con.top_k_similar("v2", "e", 3, k=5)):
            assert sorted(v for v, _ in k) == (["v1", "v3"] if len(k) == 2 else ["v1"])


def test_current_caption_without_its_vector_yet(reverted):
    """B's caption is written before its vector: SQL shows B's caption with a NULL vector, while
    caption_matrix, which skips captions without a vector, still gives A's (docs/store.md)."""
    seen = datetime(2026, 1, 9, tzinfo=timezone.utc)
    reverted.write_batch(ExtractionBatch(
        videos=[VideoRow("v2", "/data/v2.mp4", "shaY", 10, first_seen=seen, last_seen=seen)],
        captions=[CaptionRow("v2", "shaY", "e", "caption shaY")],
        hidden_states=[HiddenStateRow("v2", "shaY", "e", k, np.full(D, 2.0, np.float32)) for k in (0, 3)]))
    with connect(reverted) as con:
        assert con.execute("SELECT content_sha256, caption, text_embedding FROM captions WHERE video_id = 'v2'"
                           ).fetchall() == [("shaY", "caption shaY", None)]
    assert reverted.caption_matrix("e", ["v2"]).values[0, 0] == 7.0


def test_current_view_filters_reach_every_scan(reverted):
    """The bench's fixed query: the layer / extractor filter prunes the files of every scan of
    hidden_states (no scan of other layers, no aggregate over them)."""
    def scans(node):
        if isinstance(node, dict):
            info = node.get("extra_info") or {}
            if isinstance(info, dict) and str(info.get("Function", "")).upper() == "READ_PARQUET":
                yield info
            for child in node.get("children") or []:
                yield from scans(child)
        elif isinstance(node, list):
            for child in node:
                yield from scans(child)

    sql = "SELECT count(*), avg(list_extract(embedding, 1)) FROM hidden_states WHERE layer = 3 AND extractor_id = ?"
    with connect(reverted) as con:
        assert con.execute(sql, ["e"]).fetchone() == (2, 4.0)
        plan = json.loads(con._con.execute("EXPLAIN (FORMAT json) " + sql, ["e"]).fetchall()[0][1])
    found = list(scans(plan))
    assert len(found) == 2 and all("layer = 3" in str(s.get("File Filters")) for s in found)

# --- the CLI ------------------------------------------------------------------------------------

def _mvrec(args, store, capsys):
    from mvrec.cli import main

    os.environ["MVREC_STORE__PATH"] = store.root
    try:
        with pytest.raises(SystemExit) as e:
            main(args)
            raise SystemExit(0)
    finally:
        del os.environ["MVREC_STORE__PATH"]
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_cli_query_formats(store, tmp_path, capsys):
    code, out, _ = _mvrec(["query", "SELECT layer, count(*) AS n FROM hidden_states GROUP BY 1 ORDER BY 1"],
                          store, capsys)
    assert code == 0 and "layer" in out and "30" in out

    code, out, _ = _mvrec(["query", "SELECT video_id, layer FROM hidden_states ORDER BY 1, 2 LIMIT 2",
                           "--format", "csv"], store, capsys)
    assert code == 0 and list(csv.reader(out.splitlines())) == [["video_id", "layer"], ["v0", "0"], ["v0", "3"]]

    f = tmp_path / "o.json"
    code, _, _ = _mvrec(["query", "SELECT video_id, embedding FROM hidden_states WHERE layer = 0",
                         "-f", "json", "--out", str(f)], store, capsys)
    rows = json.loads(f.read_text())
    assert code == 0 and len(rows) == 30 and len(rows[0]["embedding"]) == D

    f = tmp_path / "o.parquet"
    code, _, _ = _mvrec(["query", "SELECT * FROM hidden_states", "-f", "parquet", "-o", str(f)], store, capsys)
    assert code == 0 and pq.read_table(f).num_rows == 60


def test_cli_query_refuses_with_one_line_and_exit_2(store, capsys):
    code, out, err = _mvrec(["query", "DROP VIEW hidden_states"], store, capsys)
    assert code == 2 and err.startswith("error: refused: DROP") and err.count("\n") == 1


def test_cli_query_schema(store, capsys):
    code, out, _ = _mvrec(["query", "--schema"], store, capsys)
    assert code == 0
    for name in VIEWS:
        assert name in out
    assert "embedding" in out and "FLOAT[]" in out and "partition" in out
    assert "hidden_states_history  (v" in out and "every content)" in out
    code, out, _ = _mvrec(["query", "SELECT count(*) AS n FROM hidden_states_history", "-f", "csv"], store, capsys)
    assert code == 0 and out.splitlines() == ["n", "60"]


def test_cli_store_tag_snapshots_compact(store, capsys):
    code, out, _ = _mvrec(["store", "tag", "first", "--note", "baseline"], store, capsys)
    assert code == 0 and "hidden_states=" in out
    code, _, err = _mvrec(["store", "tag", "first"], store, capsys)
    assert code == 2 and "already exists" in err
    code, out, _ = _mvrec(["store", "snapshots"], store, capsys)
    assert code == 0 and "first" in out and "baseline" in out
    code, out, _ = _mvrec(["store", "compact", "--retention-hours", "0"], store, capsys)
    assert code == 0 and "hidden_states" in out
    code, out, _ = _mvrec(["query", "SELECT count(*) AS n FROM hidden_states", "--as-of", "first", "-f", "csv"],
                          store, capsys)
    assert code == 0 and out.splitlines() == ["n", "60"]


# --- native Parquet views over the pinned files, the top-k cache, pure readers ------------------

def test_views_read_exactly_the_pinned_versions_files(store, tmp_path):
    import shutil

    store.tag("t0")
    pinned = {p for p, _ in store.plain_files("hidden_states", store.table("hidden_states"))}
    store.upsert_hidden_states([HiddenStateRow(f"v{i}", "s", "e", 0, np.ones(D)) for i in range(5)])  # replaces 5 rows
    newer = {p for p, _ in store.plain_files("hidden_states", store.table("hidden_states"))} - pinned
    assert newer
    # A Parquet file in the partition directory that no commit references (a killed writer's).
    part_dir = os.path.join(store.root, "hidden_states", "extractor_id=e", "layer=0")
    stray = os.path.join(part_dir, "part-99999-stray.parquet")
    shutil.copy(sorted(pinned)[0], stray)
    with connect(store, as_of="t0") as con:
        assert con.native["hidden_states"] == len(pinned)  # DuckDB's reader, not an Arrow scan
        assert con.execute("SELECT count(*), count(DISTINCT video_id) FROM hidden_states").fetchone() == (60, 30)
        assert con.execute("SELECT count(*) FROM hidden_states WHERE layer = 0 AND embedding = "
                           f"[{', '.join(['1.0'] * D)}]::FLOAT[]").fetchone() == (0,)  # not the newer rows
        # (Partition pruning shows as "Scanning Files: k/n" in EXPLAIN, but DuckDB may instead answer a
        # count from Parquet metadata, so the plan text is not asserted; correctness above is.)
        assert con.execute("SELECT count(*) FROM hidden_states WHERE extractor_id = 'e' AND layer = 3"
                           ).fetchone() == (30,)
        # The pinned files are all DuckDB may open: newer files, strays, globs are refused.
        for path in (sorted(newer)[0], stray, f"{part_dir}/*.parquet"):
            with pytest.raises(Exception, match="(?i)permission|disabled"):
                con.sql(f"SELECT count(*) FROM read_parquet('{path}')").fetchall()
    with connect(store) as con:
        assert con.execute("SELECT count(*) FROM hidden_states WHERE layer = 0 AND embedding = "
                           f"[{', '.join(['1.0'] * D)}]::FLOAT[]").fetchone() == (5,)
        assert con.execute("SELECT count(*) FROM hidden_states").fetchone() == (60,)


def test_top_k_cache_is_pinned_and_equals_the_view_query(store):
    store.tag("t0")
    with connect(store, as_of="t0") as cached, connect(store, as_of="t0", topk_cache_bytes=0) as plain:
        # An unfetched result on the connection must not get in the way of loading the cache.
        cached.execute("SELECT * FROM hidden_states")
        first = cached.top_k_similar("v7", "e", 3, k=5)
        assert cached._topk and not plain._topk
        again = cached.top_k_similar("v7", "e", 3, k=5)
        via_view = plain.top_k_similar("v7", "e", 3, k=5)
        assert [v for v, _ in first] == [v for v, _ in again] == [v for v, _ in via_view]
        np.testing.assert_allclose([s for _, s in first], [s for _, s in via_view], rtol=1e-6)
        # A commit after connecting changes nothing for the open connection (cache included).
        store.upsert_hidden_states([HiddenStateRow("twin", "s", "e", 3,
                                                   store.layer_matrix("e", 3, ["v7"]).values[0])])
        assert "twin" not in [v for v, _ in cached.top_k_similar("v7", "e", 3, k=5)]
        with pytest.raises(ValueError, match="no embedding"):
            cached.top_k_similar("twin", "e", 3)
    with connect(store) as con:
        assert con.top_k_similar("v7", "e", 3, k=1)[0][0] == "twin"
    # A budget smaller than the layer: the search runs over the view, same answer.
    with connect(store, as_of="t0", topk_cache_bytes=100) as small:
        assert [v for v, _ in small.top_k_similar("v7", "e", 3, k=5)] == [v for v, _ in first]
        assert not small._topk


def test_pure_readers_do_not_create_a_store(tmp_path, capsys):
    missing = tmp_path / "typo" / "store"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        connect(missing)
    with pytest.raises(FileNotFoundError, match=str(missing)):
        FeatureStore(missing, create=False)
    from recommender.features import load_store_features

    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_store_features(str(missing), "e", ["v1"])
    from mvrec.cli import main

    os.environ["MVREC_STORE__PATH"] = str(missing)
    try:
        with pytest.raises(SystemExit) as e:
            main(["query", "SELECT 1"])
    finally:
        del os.environ["MVREC_STORE__PATH"]
    assert e.value.code != 0 and "no feature store" in capsys.readouterr().err
    assert not (tmp_path / "typo").exists()


def test_failures_view_has_content_sha256(store):
    from storage import FailureRow

    store.record_failures([FailureRow("v1", "decode", "ValueError", "bad", content_sha256="abc")])
    with connect(store) as con:
        assert con.execute("SELECT video_id, content_sha256 FROM failures").fetchall() == [("v1", "abc")]
        assert dict(con.views()["failures"])["content_sha256"] == "VARCHAR"


# --- issue 16: private temp directory, refused metadata functions, one-line errors, row cap -----

def test_spill_directory_is_private_and_not_the_working_directory(store, tmp_path, monkeypatch):
    # DuckDB's default temp directory is <cwd>/.tmp, and DuckDB lets queries read its temp directory.
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".tmp").mkdir()
    (tmp_path / ".tmp" / "secret.csv").write_text("a\n1\n")
    with connect(store) as con:
        for sql in (f"SELECT * FROM read_csv('{tmp_path}/.tmp/secret.csv')",
                    f"SELECT * FROM read_text('{tmp_path}/.tmp/secret.csv')",
                    f"SELECT * FROM glob('{tmp_path}/.tmp/*')",
                    "SELECT * FROM read_csv('.tmp/secret.csv')"):
            with pytest.raises(ReadOnlyError, match="refused: Permission"):
                con.sql(sql).fetchall()
        temp = con.temp_dir
        assert not os.path.realpath(temp).startswith(os.path.realpath(tmp_path))
        assert os.stat(temp).st_mode & 0o777 == 0o700 and os.listdir(temp) == []
    assert not os.path.exists(temp)  # removed with the connection


@pytest.mark.parametrize("sql", [
    "SELECT * FROM duckdb_settings()",
    "SELECT name, value FROM \"DuckDB_Settings\"() WHERE value LIKE '%/%'",
    "SELECT current_setting('temp_directory')",
    "SELECT 'x'.current_setting()",
    "SELECT * FROM main.duckdb_secrets /* a comment */ ()",
    "SELECT * FROM which_secret('s3://b/k', 's3')",
    "SELECT * FROM duckdb_extensions()",
    "SELECT * FROM duckdb_databases()",
    "SELECT * FROM duckdb_temporary_files()",
    "SELECT * FROM query('SELECT * FROM duckdb_settings()')",
    "EXPLAIN SELECT * FROM duckdb_settings()",
    "SUMMARIZE SELECT * FROM duckdb_settings()",
])
def test_metadata_functions_that_show_paths_or_secrets_are_refused(store, sql):
    with pytest.raises(ReadOnlyError, match=r"refused: .*\(\) not allowed"):
        check_read_only(sql)
    with connect(store) as con, pytest.raises(ReadOnlyError, match="refused"):
        con.sql(sql).fetchall()


def test_a_column_named_like_a_refused_function_is_fine(store):
    with connect(store) as con:
        # histogram is an aggregate and a table macro; as an aggregate it reaches nothing refused
        assert con.execute("SELECT histogram(layer) FROM hidden_states").fetchone() == ({0: 30, 3: 30},)
        assert con.execute('SELECT 1 AS "query", 2 AS checkpoint').fetchall() == [(1, 2)]
        assert con.execute("SELECT count(*) FROM duckdb_tables()").fetchone() == (0,)


@pytest.mark.parametrize("sql", [
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM glob('/etc/*')",
    "SELECT * FROM read_csv('https://example.com/x.csv')",
    "SELECT * FROM read_text('/etc/hostname')",
    "SELECT * FROM read_parquet('s3://bucket/x.parquet')",
])
def test_cli_refused_file_access_is_one_line_exit_2(store, capsys, sql):
    code, out, err = _mvrec(["query", sql], store, capsys)
    assert code == 2 and err.startswith("error: refused: Permission Error") and err.count("\n") == 1, err


@pytest.mark.parametrize("sql, msg", [
    ("SELECT nope FROM videos", "Binder Error"),
    ("SELECT error('boom') FROM range(3)", "boom"),
    ("SELECT * FROM no_such_table", "Catalog Error"),
])
def test_cli_query_errors_are_one_line_exit_2(store, capsys, sql, msg):
    code, _, err = _mvrec(["query", sql, "-f", "csv"], store, capsys)
    assert code == 2 and err.startswith("error: ") and msg in err and err.count("\n") == 1, err


def test_cli_terminal_output_is_capped_and_files_get_every_row(store, tmp_path, capsys):
    sql = "SELECT range AS i FROM range(2500)"
    code, out, err = _mvrec(["query", sql, "-f", "csv"], store, capsys)
    assert code == 0 and out.splitlines() == ["i"] + [str(i) for i in range(1000)]
    assert "cut at 1000 rows" in err
    code, out, err = _mvrec(["query", sql, "-f", "json", "--max-rows", "7"], store, capsys)
    assert code == 0 and json.loads(out) == [{"i": i} for i in range(7)] and "cut at 7 rows" in err
    code, out, err = _mvrec(["query", sql, "--max-rows", "3"], store, capsys)
    assert code == 0 and "3 row(s)" in out and "cut at 3 rows" in err
    code, out, err = _mvrec(["query", sql, "-f", "csv", "--max-rows", "0"], store, capsys)
    assert code == 0 and len(out.splitlines()) == 2501 and "cut" not in err
    code, out, err = _mvrec(["query", "SELECT range AS i FROM range(1000)", "-f", "csv"], store, capsys)
    assert code == 0 and len(out.splitlines()) == 1001 and "cut" not in err  # exactly the cap: nothing cut
    for fmt in ("csv", "json", "parquet"):
        f = tmp_path / f"all.{fmt}"
        code, out, _ = _mvrec(["query", sql, "-f", fmt, "-o", str(f)], store, capsys)
        assert code == 0 and "wrote 2500 rows" in out
        if fmt == "csv":
            got = [int(r[0]) for r in list(csv.reader(f.read_text().splitlines()))[1:]]
        elif fmt == "json":
            got = [r["i"] for r in json.loads(f.read_text())]
        else:
            got = pq.read_table(f).column("i").to_pylist()
        assert got == list(range(2500))


def test_cli_export_that_fails_part_way_leaves_the_old_file(store, tmp_path, capsys):
    f = tmp_path / "out.csv"
    f.write_text("old\n")
    # Fails at run time, after DuckDB has produced many batches.
    sql = "SELECT CASE WHEN range < 200000 THEN range ELSE error('late failure') END AS i FROM range(400000)"
    code, _, err = _mvrec(["query", sql, "-f", "csv", "-o", str(f)], store, capsys)
    assert code == 2 and "late failure" in err and err.count("\n") == 1
    assert f.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["out.csv", "store"]


def test_cli_table_output_escapes_markup(store, capsys):
    code, out, _ = _mvrec(["query", "SELECT '[/tmp/x]' AS p, '[bold]b' AS q"], store, capsys)
    assert code == 0 and "[/tmp/x]" in out and "[bold]b" in out


# --- issue 23: refused by what a query reaches, every catalog view and table function walked ------

def _secrets(con) -> set[str]:
    """Every path the connection's settings hold (temp directory, allowed paths and directories,
    extension and secret directories), the store root and the temp directory: what no allowed
    query may show. Read past the guard, on the raw connection under test."""
    found = {con.store.root, con.temp_dir}
    for (value,) in con._con.execute("SELECT value FROM duckdb_settings()").fetchall():
        for part in str(value or "").strip("[]").split(","):
            part = part.strip().strip("'\"")
            if part.startswith(("/", "~")) and len(part) > 3:  # a path, not a time zone like Etc/UTC
                found.add(part.rstrip("/"))
    return found


def test_every_catalog_view_and_table_function_is_refused_or_shows_nothing_secret(store):
    """Walk every view of pg_catalog, information_schema and DuckDB's own (duckdb_*, sqlite_*) and
    every table function and table macro DuckDB offers, each as `SELECT * FROM it`: refused, or
    failing for want of arguments or file access, or running and showing no setting, path or
    secret. Prints the walk (pytest -s)."""
    from storage import QueryError

    with connect(store) as con:
        secrets = _secrets(con)
        assert con.temp_dir in secrets and any("hidden_states" in s for s in secrets)  # allowed_paths
        views = [f"{s}.{v}" for s, v in con._con.execute(
            "SELECT schema_name, view_name FROM duckdb_views() WHERE internal ORDER BY 1, 2").fetchall()]
        functions = [f for (f,) in con._con.execute(
            "SELECT DISTINCT function_name FROM duckdb_functions() WHERE function_type IN ('table', 'table_macro') "
            "ORDER BY 1").fetchall()]
        walked: dict[str, tuple[str, str]] = {}
        for name, sql in [(v, f"SELECT * FROM {v}") for v in views] + [(f"{f}()", f"SELECT * FROM {f}()")
                                                                       for f in functions]:
            try:
                rows = con.execute(sql).fetchall()
            except ReadOnlyError as e:
                walked[name] = ("refused" if "not allowed" in str(e) else "no access", str(e)[:90])
                continue
            except QueryError as e:  # needs arguments, or a type it cannot return: nothing shown
                walked[name] = ("error", str(e)[:90])
                continue
            text = repr(rows)
            leaked = [s for s in secrets if s in text]
            assert not leaked, f"{name} shows {leaked}"
            walked[name] = ("ran", f"{len(rows)} rows")
    print(f"\n{len(views)} catalog views and {len(functions)} table functions walked:")
    for name, (outcome, detail) in walked.items():
        print(f"  {outcome:9} {name:45} {detail}")
    assert len(views) >= 40 and len(functions) >= 100 and len(walked) == len(views) + len(functions)
    # What leaked before (issue 23) is refused by what it reaches, and the useful catalog still runs.
    for name in ("pg_catalog.pg_settings", "pg_catalog.pg_views", "information_schema.views", "main.sqlite_master",
                 "main.duckdb_views", "duckdb_settings()", "duckdb_views()", "duckdb_secrets()",
                 "duckdb_temporary_files()", "duckdb_extensions()", "duckdb_profiling_settings()"):
        assert walked[name][0] == "refused", (name, walked[name])
    for name in ("information_schema.columns", "information_schema.tables", "pg_catalog.pg_class",
                 "pg_catalog.pg_attribute", "duckdb_columns()", "duckdb_functions()"):
        assert walked[name][0] == "ran", (name, walked[name])


@pytest.mark.parametrize("sql", [
    "SELECT name, setting FROM pg_settings",
    "SELECT * FROM pg_catalog.pg_settings WHERE name = 'temp_directory'",
    "SELECT view_definition FROM information_schema.views",
    "SELECT sql FROM sqlite_master",
    "SELECT definition FROM pg_views",
    "WITH s AS (SELECT * FROM pg_settings) SELECT count(*) FROM s",
    "SELECT * FROM duckdb_profiling_settings()",
])
def test_catalog_views_are_refused_by_what_they_reach(store, capsys, sql):
    with connect(store) as con, pytest.raises(ReadOnlyError, match="refused: "):
        con.execute(sql)
    code, out, err = _mvrec(["query", sql], store, capsys)
    assert code == 2 and err.startswith("error: refused: ") and err.count("\n") == 1 and out == "", err
    assert "/" not in err  # no path in the message either


def test_a_table_macro_reaching_settings_through_sql_text_is_refused_by_its_plan(store):
    # histogram(table, column) builds its query from text (query_table): the plan shows what it reads.
    with connect(store) as con, pytest.raises(ReadOnlyError, match=r"refused: duckdb_settings\(\) not allowed"):
        con.execute("SELECT * FROM histogram('pg_settings', name)")
