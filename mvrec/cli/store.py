"""CLI commands for the feature store: `mvrec query` and `mvrec store compact|snapshots|tag|info`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from mvrec.cli.common import app, console, err_console, get_config

store_app = typer.Typer(help="Feature store maintenance: compaction, snapshots (tags), versions.",
                        no_args_is_help=True)
app.add_typer(store_app, name="store")

FORMATS = ("table", "csv", "json", "parquet")  # table: terminal only


def _open(create: bool = False):
    from storage import open_store

    return open_store(get_config().store, create=create)


def _cell(v: Any) -> str:
    """Short text for a Rich cell: long vectors are elided."""
    if v is None:
        return "∅"
    if isinstance(v, list):
        if len(v) > 6 and all(isinstance(x, (int, float)) or x is None for x in v):
            head = ", ".join(f"{x:.4g}" if isinstance(x, float) else str(x) for x in v[:4])
            return f"[{head}, … ({len(v)})]"
        return json.dumps(v, default=str)
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


@app.command("query")
def query_cmd(
    sql: Optional[str] = typer.Argument(None, help="One read-only SQL statement (SELECT / WITH / EXPLAIN / DESCRIBE)."),
    schema: bool = typer.Option(False, "--schema", help="List the views and their columns instead."),
    fmt: str = typer.Option("table", "--format", "-f", help="table | csv | json | parquet"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write every row to this file, streamed (needed for parquet)."),
    as_of: Optional[str] = typer.Option(None, "--as-of", help="Read a named snapshot (tag) instead of the latest."),
    max_rows: int = typer.Option(1000, "--max-rows", min=0, help="Rows printed to the terminal (0: all); -o files get every row."),
) -> None:
    """Run read-only SQL over the feature store (DuckDB). Writes and outside access are refused."""
    from storage import check_read_only, connect
    from storage.export import head, write_file, write_text

    if fmt not in FORMATS:
        raise ValueError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
    if not schema and not sql:
        raise ValueError("query: give one SQL statement, or --schema to list the views")
    if fmt == "parquet" and out is None:
        raise ValueError("--format parquet needs --out FILE")
    if fmt == "table" and out is not None:
        raise ValueError("--out needs --format csv, json or parquet")
    if not schema:
        check_read_only(sql)  # refused before the store is even opened
    cfg = get_config().store
    if out is not None:
        _check_out(out, cfg.path)
    with connect(cfg.path, as_of=as_of, storage_options=cfg.storage_options) as con:
        if schema:
            _print_schema(con)
            return
        rows = con.batches(sql)
        if out is not None:
            try:
                n = write_file(rows, rows.schema, fmt, out)
            except FileNotFoundError:
                raise
            except OSError as e:  # a full disk, a read-only or vanished directory: one line, exit 2
                raise ValueError(f"--out {out}: cannot write it: {e.strerror or e} (the partial file is "
                                 "removed; a file that was there is left as it was)") from None
            console.print(f"wrote {n} rows to {out}")
            return
        if fmt == "table":
            result, cut = head(rows, rows.schema, max_rows)
            _print_table(result)
        else:
            _, cut = write_text(rows, rows.schema, fmt, sys.stdout, max_rows)
            sys.stdout.flush()
    if cut:
        err_console.print(f"note: output cut at {max_rows} rows (--max-rows); -o FILE writes every row",
                          markup=False, highlight=False)


def _check_out(out: Path, store_path: str) -> None:
    """Refuse an output file inside a local store: a file in a table's folder or `_delta_log`
    breaks every reader of that table."""
    import os

    if "://" in str(store_path) and not str(store_path).startswith("file://"):
        return
    root = os.path.realpath(str(store_path).removeprefix("file://"))
    target = os.path.realpath(out)
    if target == root or target.startswith(root.rstrip(os.sep) + os.sep):
        raise ValueError(f"--out {out}: inside the feature store {root}; write query results elsewhere "
                         "(a file there breaks the store's tables)")


def _print_schema(con) -> None:
    from storage.query import HISTORY_VIEWS
    from storage.schema import ALL_TABLES, SCHEMA_VERSION

    for name, cols in con.views().items():
        table = name.removesuffix("_history")
        what = "every content" if name != table else "current content" if name in HISTORY_VIEWS else ""
        t = Table(title=f"{name}  (v{SCHEMA_VERSION}, table version {con.versions[table]}{', ' + what if what else ''})",
                  title_justify="left", show_header=True)
        t.add_column("column")
        t.add_column("type")
        t.add_column("key")
        spec = ALL_TABLES[table]
        for c, ty in cols:
            mark = "key" if c in spec.key else ""
            if c in spec.partition_by:
                mark = (mark + " partition").strip()
            t.add_row(c, ty, mark)
        console.print(t)


def _print_table(result) -> None:
    from rich.markup import escape

    from storage.export import records

    t = Table(show_header=True, header_style="bold")
    for name, ty in zip(result.column_names, result.schema.types, strict=True):
        t.add_column(f"{escape(name)}\n[dim]{escape(str(ty))}[/]", overflow="fold")
    for r in records(result):
        t.add_row(*(escape(_cell(v)) for v in r.values()))
    console.print(t)
    console.print(f"[dim]{result.num_rows} row(s)[/]")


@store_app.command("compact")
def compact_cmd(
    retention_hours: float = typer.Option(168.0, "--retention-hours", help="Vacuum files unreferenced for this long (tagged versions are always kept)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only list what vacuum would delete."),
) -> None:
    """Optimize (merge small files) and vacuum old files of every table."""
    if retention_hours < 0:
        raise ValueError(f"--retention-hours: must be >= 0, got {retention_hours}")
    stats = _open().compact(retention_hours=retention_hours, dry_run=dry_run)
    t = Table("table", "files added", "files removed", "files vacuumed" + (" (dry run)" if dry_run else ""),
              "version", show_header=True)
    for name, s in stats.items():
        t.add_row(name, str(s.get("files_added", "-")), str(s.get("files_removed", "-")),
                  str(s["files_vacuumed"]), f"{s['version_before']} → {s['version_after']}")
    console.print(t)


@store_app.command("snapshots")
def snapshots_cmd() -> None:
    """List named snapshots (tags) and the table versions they pin."""
    snaps = _open().snapshots()
    if not snaps:
        console.print("no snapshots yet; create one with `mvrec store tag NAME`")
        return
    t = Table("name", "created", "versions", "note", show_header=True)
    for s in snaps:
        t.add_row(s["name"], f"{s['created']:%Y-%m-%d %H:%M:%S}",
                  " ".join(f"{k}={v}" for k, v in sorted(s["versions"].items())), s["note"] or "")
    console.print(t)


@store_app.command("tag")
def tag_cmd(
    name: str = typer.Argument(..., help="Snapshot name, e.g. features-2024-06 (immutable)."),
    note: str = typer.Option("", "--note", help="Free text stored with the tag."),
) -> None:
    """Name the current version of every table, for `--as-of NAME` and training lineage."""
    versions = _open().tag(name, note=note)
    console.print(f"tagged {name}: " + " ".join(f"{k}={v}" for k, v in sorted(versions.items())))


@store_app.command("info")
def info_cmd() -> None:
    """Where the store is, each table's version, row count and files."""
    from storage.status import store_size

    store = _open()
    t = Table("table", "version", "rows", "files", show_header=True, title=store.root, title_justify="left")
    for name, size in store_size(store)["tables"].items():
        t.add_row(name, str(size["version"]), str(size["rows"]), str(size["files"]))
    console.print(t)
