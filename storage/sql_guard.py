"""What a read-only query may run and reach: the checks `storage.query` makes before a statement
runs, on top of the connection's own lock-down (no file other than the pinned data files, no
network, no extension loading, configuration locked).

1. `check_read_only(sql)`, from the text alone (no connection, so `mvrec query` refuses before it
   opens the store): exactly one statement, parsed by DuckDB's own parser, of an allowed kind
   (ALLOWED); and no call of a table function outside ALLOWED_TABLE_FUNCTIONS, or of a scalar
   function that reads the connection's configuration (REFUSED_SCALARS, and the built-in macros
   that call one), wherever it is written (any case, quoted, schema-qualified, comments between
   the name and its parenthesis). Refused here, such a call is never even bound.
2. `check_reach(con, sql)`, on the connection, by what the query reaches: the statement is
   planned (EXPLAIN, which binds every view down to the table functions it scans, and never runs
   it) and every table-function scan in the plan must be allowed. A catalog view is only a name:
   `pg_settings` reaches `duckdb_settings()` and is refused for that, `information_schema.views`
   and `sqlite_master` read `duckdb_views().sql` (the store views' definitions, which name the
   store's files) and are refused for that, while `information_schema.columns` reaches only
   `duckdb_columns()` and runs. tests/test_query.py walks every catalog view and table function
   DuckDB offers and checks that each one is refused or shows no setting, path or secret.
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, Iterator, Mapping, Sequence

import duckdb

ALLOWED = "SELECT (incl. WITH ... SELECT, VALUES, DESCRIBE, SHOW, SUMMARIZE) or EXPLAIN SELECT"

# EXPLAIN [ANALYZE] prefix, after optional comments; what follows is parsed again.
_EXPLAIN = re.compile(r"^\s*(?:(?:--[^\n]*(?:\n|$)|/\*.*?\*/)\s*)*explain\b\s*(?:analy[sz]e\b)?",
                      re.IGNORECASE | re.DOTALL)

# Table functions a query may reach. Anything else (duckdb_settings, duckdb_secrets,
# duckdb_extensions, duckdb_temporary_files, duckdb_logs, query, checkpoint, ...) is refused.
ALLOWED_TABLE_FUNCTIONS = frozenset({
    # the store's views (read_parquet over the pinned files, Arrow scans) and data made in SQL
    "read_parquet", "parquet_scan", "python_arrow_scan", "arrow_scan", "arrow_scan_dumb",
    "range", "generate_series", "unnest", "repeat", "repeat_row", "json_each", "json_tree", "summary",
    "test_all_types", "test_vector_types", "pg_timezone_names", "icu_calendar_names",
    # file readers: the connection lets them read only the pinned data files (Permission Error else)
    "read_csv", "read_csv_auto", "read_json", "read_json_auto", "read_ndjson", "read_ndjson_auto",
    "read_json_objects", "read_json_objects_auto", "read_ndjson_objects", "read_text", "read_blob", "glob",
    "parquet_metadata", "parquet_schema", "parquet_file_metadata", "parquet_kv_metadata",
    # the catalog's names and types (the views' SQL is in duckdb_views: see COLUMN_RULES)
    "duckdb_columns", "duckdb_tables", "duckdb_schemas", "duckdb_types", "duckdb_functions", "duckdb_keywords",
    "duckdb_constraints", "duckdb_indexes", "duckdb_sequences", "duckdb_dependencies", "duckdb_optimizers",
    "pragma_table_info", "pragma_show", "pragma_collations", "pragma_version",
    "pragma_platform",
})
# Table functions a query may reach except for some columns: duckdb_views() without `sql`
# (SHOW TABLES, information_schema.tables and pg_class read only its names).
COLUMN_RULES = {"duckdb_views": frozenset({"sql"})}
# Scalar functions that read the connection's configuration (settings hold the temp directory
# and the allowed file paths). The optimizer folds them into constants, so no plan shows them:
# they are refused by name, with every built-in macro that calls one.
REFUSED_SCALARS = frozenset({"current_setting"})


class QueryError(ValueError):
    """A statement that DuckDB could not run (unknown column, type error, ...): one line."""


class ReadOnlyError(QueryError):
    """A statement, function or file access that is not allowed here; it was not executed."""


def first_line(e: BaseException) -> str:
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    return lines[0] if lines else type(e).__name__


@contextmanager
def one_line_errors() -> Iterator[None]:
    """DuckDB's errors as QueryError (ReadOnlyError for refused file or network access)."""
    try:
        yield
    except duckdb.Error as e:
        msg = first_line(e)
        if isinstance(e, duckdb.PermissionException):
            raise ReadOnlyError(f"refused: {msg} (only the store's own files can be read here)") from None
        raise QueryError(msg) from None


@lru_cache(maxsize=1)
def _refused_names() -> frozenset[str]:
    """Functions refused by name: DuckDB's table functions and table macros outside
    ALLOWED_TABLE_FUNCTIONS (a name that is also a scalar or aggregate, such as `histogram` or
    `repeat`, is left to the plan check), REFUSED_SCALARS, and the macros whose definitions call either."""
    con = duckdb.connect(":memory:")
    try:
        rows = con.execute("SELECT function_name, function_type, macro_definition FROM duckdb_functions()").fetchall()
    finally:
        con.close()
    table = {n for n, t, _ in rows if t in ("table", "table_macro", "pragma")}
    other = {n for n, t, _ in rows if t in ("scalar", "aggregate", "window", "macro")}
    refused = {n for n in table - other if n not in ALLOWED_TABLE_FUNCTIONS and n not in COLUMN_RULES}
    refused |= REFUSED_SCALARS
    macros = [(n, d) for n, t, d in rows if t in ("macro", "table_macro") and d]
    while True:  # macros calling refused functions, to a fixed point
        more = {n for n, d in macros if n not in refused and n not in other and set(_called(d)) & refused}
        if not more:
            return frozenset(refused)
        refused |= more


def _called(sql: str) -> list[str]:
    """Lower-case names written as calls in `sql` (a name followed by `(`, comments skipped)."""
    tokens = [(p, k) for p, k in duckdb.tokenize(sql)]
    ends = [p for p, _ in tokens[1:]] + [len(sql)]
    words = [(sql[p:e].strip(), k) for (p, k), e in zip(tokens, ends, strict=True) if k != duckdb.token_type.comment]
    found = []
    for (text, kind), (after, _) in zip(words, words[1:], strict=False):
        name = text.strip('"').replace('""', '"').lower()
        if kind in (duckdb.token_type.identifier, duckdb.token_type.keyword) and after.startswith("(") \
                and name not in found:
            found.append(name)
    return found


def _refuse_function(name: str, how: str = "") -> ReadOnlyError:
    return ReadOnlyError(f"refused: {name}() not allowed here{how} (it shows settings, paths or secrets, runs SQL "
                         "text, or changes the connection)")


def check_read_only(sql: str) -> None:
    """Raise ReadOnlyError unless `sql` is exactly one read-only statement (see ALLOWED) calling
    no refused function (see the module docstring, 1)."""
    if not sql or not sql.strip():
        raise ReadOnlyError("refused: empty query")
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as e:
        raise ReadOnlyError(f"refused: cannot parse the query: {str(e).splitlines()[0]}") from None
    if len(statements) != 1:
        raise ReadOnlyError(f"refused: {len(statements)} statements; run exactly one read-only "
                            f"statement ({ALLOWED})")
    refused = [n for n in _called(sql) if n in _refused_names()]
    if refused:
        raise _refuse_function(refused[0])
    kind = statements[0].type
    if kind == duckdb.StatementType.EXPLAIN:
        inner = explained(sql)
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


def explained(sql: str) -> str:
    """The statement an `EXPLAIN [ANALYZE] ...` explains (the text itself when it is no EXPLAIN)."""
    m = _EXPLAIN.match(sql)
    return sql[m.end():] if m else sql


def reached(plan: Any) -> list[tuple[str, list[str] | None]]:
    """(table function, the columns it reads or None when the plan does not say) of every scan in
    a plan from `EXPLAIN (FORMAT json)`."""
    out: list[tuple[str, list[str] | None]] = []
    stack = [plan]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            info = node.get("extra_info")
            if isinstance(info, dict) and info.get("Function"):
                cols = info.get("Projections")
                cols = [cols] if isinstance(cols, str) and cols else cols if isinstance(cols, list) else None
                out.append((str(info["Function"]).strip().lower(), cols))
            stack.extend(node.get("children") or [])
    return out


def check_reach(con: duckdb.DuckDBPyConnection, sql: str,
                params: Sequence[Any] | Mapping[str, Any] | None = None) -> None:
    """Raise ReadOnlyError when the statement, planned on `con` without running, reaches a table
    function or column that is not allowed (see the module docstring, 2); DuckDB's own errors
    while planning (an unknown column, a refused file) as from running it."""
    with one_line_errors():
        rows = con.execute("EXPLAIN (FORMAT json) " + explained(sql), params).fetchall()
    for _, text in rows:
        for fn, cols in reached(json.loads(text)):
            if fn in ALLOWED_TABLE_FUNCTIONS:
                continue
            if fn in COLUMN_RULES:
                hidden = COLUMN_RULES[fn] if cols is None else COLUMN_RULES[fn] & set(cols)
                if not hidden:
                    continue
                raise ReadOnlyError(f"refused: the query reads {fn}().{sorted(hidden)[0]} (directly or through "
                                    "a catalog view such as information_schema.views or sqlite_master), which "
                                    "names the store's files; not allowed here")
            raise _refuse_function(fn, " (the query reaches it directly or through a catalog view such as "
                                       "pg_settings)")
