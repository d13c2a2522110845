"""Arrow conversion: rows (dataclasses, dicts or Arrow tables) to a table of a spec's exact
schema, and list<float> columns back to (rows, D) float32 arrays without copying."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from storage.schema import ALL_TABLES, TableSpec


def as_dict(row: Any) -> dict[str, Any]:
    if isinstance(row, Mapping):
        return dict(row)
    if dataclasses.is_dataclass(row):
        return {f.name: getattr(row, f.name) for f in dataclasses.fields(row)}
    raise TypeError(f"expected a dict or a dataclass row, got {type(row).__name__}")


def _embedding_array(values: list[Any], table: str, column: str) -> pa.Array:
    """list<float32> from numpy arrays / sequences / None, built from one flat buffer (fast)."""
    lengths = np.zeros(len(values), dtype=np.int64)
    valid = np.ones(len(values), dtype=bool)
    parts = []
    for i, v in enumerate(values):
        if v is None:
            valid[i] = False
            continue
        a = np.asarray(v, dtype=np.float32).reshape(-1)
        lengths[i] = a.size
        parts.append(a)
    flat = np.concatenate(parts) if parts else np.zeros(0, np.float32)
    offsets = np.zeros(len(values) + 1, dtype=np.int32)
    if flat.size >= 2**31:
        raise ValueError(f"{table}.{column}: batch too large for one commit ({flat.size} floats)")
    np.cumsum(lengths, out=offsets[1:])
    mask = None if valid.all() else pa.array(~valid)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, pa.float32()), mask=mask)


def to_arrow(spec: TableSpec, rows: Any, defaults: Mapping[str, Any] | None = None) -> pa.Table:
    """Rows (a pyarrow Table, or dicts / dataclasses) -> a Table with exactly spec.schema,
    defaults filled in for nulls, keys checked non-null, one row per key (the last)."""
    if isinstance(rows, pa.Table):
        missing = [f.name for f in spec.schema if f.name not in rows.column_names]
        for name in missing:
            rows = rows.append_column(name, pa.nulls(rows.num_rows, spec.schema.field(name).type))
        try:
            table = rows.select(spec.schema.names).cast(spec.schema)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise ValueError(f"{spec.name}: rows do not fit the table schema: {e}") from e
    else:
        dicts = [as_dict(r) for r in rows]
        unknown = set().union(*(d.keys() for d in dicts)) - set(spec.schema.names) if dicts else set()
        if unknown:
            raise ValueError(f"{spec.name}: unknown column(s) {sorted(unknown)} "
                             f"(known: {', '.join(spec.schema.names)})")
        arrays = []
        for f in spec.schema:
            col = [d.get(f.name) for d in dicts]
            if defaults and f.name in defaults:
                col = [defaults[f.name] if v is None else v for v in col]
            try:
                if pa.types.is_list(f.type) and pa.types.is_float32(f.type.value_type):
                    arrays.append(_embedding_array(col, spec.name, f.name))
                elif pa.types.is_map(f.type):
                    arrays.append(pa.array([None if v is None else list(dict(v).items()) for v in col], f.type))
                else:
                    arrays.append(pa.array(col, f.type))
            except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as e:
                raise ValueError(f"{spec.name}.{f.name}: bad value: {e}") from e
        table = pa.Table.from_arrays(arrays, schema=spec.schema)
    if defaults:
        for name, value in defaults.items():
            col = table.column(name)
            if col.null_count:
                idx = table.schema.get_field_index(name)
                table = table.set_column(idx, name, pc.fill_null(col, pa.scalar(value, col.type)))
    for k in spec.key:
        if table.column(k).null_count:
            raise ValueError(f"{spec.name}.{k}: key column has null values")
    return _dedupe(spec, table)


def _dedupe(spec: TableSpec, table: pa.Table) -> pa.Table:
    """Keep the last row per key, so one batch never writes a key twice."""
    if table.num_rows < 2:
        return table
    idx = pa.array(np.arange(table.num_rows))
    keyed = table.select(list(spec.key)).append_column("__i", idx)
    last = keyed.group_by(list(spec.key), use_threads=False).aggregate([("__i", "max")])
    if last.num_rows == table.num_rows:
        return table
    keep = pc.sort_indices(last.column("__i_max"))
    return table.take(pc.take(last.column("__i_max"), keep))


def conform(name: str, table: pa.Table) -> pa.Table:
    """Rows read from a table of an older schema: the added columns it lacks, as NULL."""
    spec = ALL_TABLES[name]
    for col, _ in spec.added_columns:
        if col not in table.column_names:
            table = table.append_column(spec.schema.field(col), pa.nulls(table.num_rows, spec.schema.field(col).type))
    return table


def key_strings(table: pa.Table, key: Sequence[str]) -> pa.Array:
    """One string per row joining its key columns (for set membership of composite keys)."""
    cols = [pc.cast(table.column(k), pa.string()) for k in key]
    if len(cols) == 1:
        return cols[0].combine_chunks() if isinstance(cols[0], pa.ChunkedArray) else cols[0]
    out = pc.binary_join_element_wise(*cols, "\x1f")
    return out.combine_chunks() if isinstance(out, pa.ChunkedArray) else out


def vector_rows(chunk: pa.Array, what: str) -> np.ndarray:
    """A non-null list / large_list / fixed_size_list<float> array as a (rows, D) float32 array.

    Zero-copy when the values are float32: a view of the child buffer between the first and the
    last offset (the list's own offsets account for a slice, its `.values` do not)."""
    n = len(chunk)
    if pa.types.is_fixed_size_list(chunk.type):
        d = chunk.type.list_size
        vals = chunk.values.slice(chunk.offset * d, n * d)
    else:
        offs = chunk.offsets.to_numpy()
        lengths = np.diff(offs)
        d = int(lengths[0]) if n else 0
        if n and (lengths != d).any():
            raise ValueError(f"{what}: embeddings of different lengths in one layer")
        vals = chunk.values.slice(int(offs[0]), int(offs[-1] - offs[0]))
    flat = vals.to_numpy(zero_copy_only=False)
    if flat.dtype != np.float32:
        flat = flat.astype(np.float32)
    return flat.reshape(n, d)


def video_extractor_pairs(rows: Any) -> set[tuple[str, str]]:
    """{(video_id, extractor_id)} of rows (a table, or dicts / dataclasses); '' for no extractor."""
    if isinstance(rows, pa.Table):
        eids = rows.column("extractor_id").to_pylist() if "extractor_id" in rows.column_names else [""] * rows.num_rows
        return set(zip(rows.column("video_id").to_pylist(), (e or "" for e in eids), strict=True))
    return {(d["video_id"], d.get("extractor_id") or "") for d in map(as_dict, rows)}
