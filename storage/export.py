"""Query results as CSV, JSON or Parquet, written batch by batch: memory stays bounded by one
batch (one Parquet row group) however many rows a result has.

CSV is written by Arrow's CSV writer (strings quoted, NULL as an empty cell, booleans
as true/false); list, map and struct cells as JSON text (maps as objects). JSON is one array with
one row object per line; values JSON cannot hold (timestamps, decimals) as their text.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

FORMATS = ("csv", "json", "parquet")
ROW_GROUP_ROWS = 128 * 1024  # Parquet row groups: big enough to scan well, small enough to buffer
ROW_GROUP_BYTES = 64 << 20


def jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)


def records(batch: pa.RecordBatch | pa.Table) -> list[dict[str, Any]]:
    """Rows as dicts; MAP columns (Arrow gives (key, value) pairs) become dicts."""
    maps = [f.name for f in batch.schema if pa.types.is_map(f.type)]
    rows = batch.to_pylist()
    for r in rows:
        for m in maps:
            if r[m] is not None:
                r[m] = dict(r[m])
    return rows


def _csv_ready(batch: pa.RecordBatch) -> pa.RecordBatch:
    """Nested columns (and other types Arrow's CSV writer cannot write) as text."""
    cols = []
    for col, f in zip(batch.columns, batch.schema, strict=True):
        t = f.type
        if pa.types.is_nested(t):
            col = pa.array([None if v is None else json.dumps(jsonable(dict(v) if pa.types.is_map(t) else v))
                            for v in col.to_pylist()], pa.string())
        elif not (pa.types.is_primitive(t) or pa.types.is_string(t) or pa.types.is_large_string(t)
                  or pa.types.is_decimal(t)) or pa.types.is_interval(t) or pa.types.is_duration(t):
            col = pa.array([None if v is None else str(v) for v in col.to_pylist()], pa.string())
        cols.append(col)
    return pa.RecordBatch.from_arrays(cols, names=batch.schema.names)


class Capped:
    """The batches up to `max_rows` rows in all (None or 0: all); reading stops there, and
    `cut` says afterwards whether rows were left out."""

    def __init__(self, batches: Iterable[pa.RecordBatch], max_rows: int | None):
        self.batches, self.max_rows, self.cut = batches, max_rows, False

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        done = 0
        for b in self.batches:
            if self.max_rows and done + b.num_rows > self.max_rows:
                if self.max_rows > done:
                    yield b.slice(0, self.max_rows - done)
                self.cut = True
                return
            done += b.num_rows
            yield b


def write_text(batches: Iterable[pa.RecordBatch], schema: pa.Schema, fmt: str, out: IO[str],
               max_rows: int | None = None) -> tuple[int, bool]:
    """Rows as csv or json to a text stream, at most max_rows of them (None or 0: all).
    Returns (rows written, whether rows were cut)."""
    n, rows = 0, Capped(batches, max_rows)
    if fmt == "csv":
        csv.writer(out, lineterminator="\n").writerow(schema.names)
        options = pacsv.WriteOptions(include_header=False, quoting_style="needed")
    elif fmt == "json":
        out.write("[")
    else:
        raise ValueError(f"--format: {fmt!r} is not a text format (csv, json)")
    for b in rows:
        if fmt == "csv":
            buf = io.BytesIO()
            pacsv.write_csv(_csv_ready(b), buf, options)
            out.write(buf.getvalue().decode())
            n += b.num_rows
            continue
        for r in records(b):
            out.write(("\n" if n == 0 else ",\n") + json.dumps(jsonable(r)))
            n += 1
    if fmt == "json":
        out.write("\n]\n")
    return n, rows.cut


def head(batches: Iterable[pa.RecordBatch], schema: pa.Schema, max_rows: int | None) -> tuple[pa.Table, bool]:
    """The first max_rows rows as a table (None or 0: all), and whether rows were cut."""
    rows = Capped(batches, max_rows)
    return pa.Table.from_batches(list(rows), schema), rows.cut


def write_file(batches: Iterable[pa.RecordBatch], schema: pa.Schema, fmt: str, path: str | os.PathLike[str]) -> int:
    """Every row to `path` in `fmt`; returns the row count. Written to a temporary file that
    replaces `path` at the end, so an error part way leaves an existing file as it was."""
    path = Path(path)
    if fmt not in FORMATS:
        raise ValueError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path}: directory {path.parent} does not exist")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if fmt == "parquet":
            n = _write_parquet(batches, schema, tmp)
        else:
            with open(tmp, "w", newline="", encoding="utf-8") as f:
                n, _ = write_text(batches, schema, fmt, f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return n


def _write_parquet(batches: Iterable[pa.RecordBatch], schema: pa.Schema, path: Path) -> int:
    n = 0
    pending: list[pa.RecordBatch] = []
    with pq.ParquetWriter(path, schema) as w:
        for b in batches:
            pending.append(b)
            n += b.num_rows
            if sum(x.num_rows for x in pending) >= ROW_GROUP_ROWS or sum(x.nbytes for x in pending) >= ROW_GROUP_BYTES:
                w.write_table(pa.Table.from_batches(pending, schema))
                pending = []
        if pending or n == 0:
            w.write_table(pa.Table.from_batches(pending, schema))
    return n
