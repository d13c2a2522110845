"""Item feature matrices for the recommender, aligned to the dataset's item indices.

A FeatureBank holds, for items 1..n (row 0 = padding, zeros), matrices in one dtype
(train.features_dtype: float32 numpy arrays, or torch tensors in bfloat16 / float16, which take
half the memory; the store adapter fills them layer by layer, never holding a float32 copy):
    hidden   [n + 1, L, D]  one pooled vector per LVLM layer (layer ids in `layers`)
    caption  [n + 1, Dc]    caption text vectors
It is loaded once and shared: `select` returns views of it (a run of layers is a slice), so the
cells of a study all read the same memory.
Sources: a plain matrix file (.npy + sidecar ids, .npz, .parquet), the feature store (one small
adapter, `load_store_features`, importing `storage` lazily), or synthetic topic features.
Items without features keep a zero row and are listed in `missing`, never silently dropped.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def as_dtype(x: np.ndarray | torch.Tensor, dtype: str) -> torch.Tensor:
    """`x` as a tensor in `dtype` (a train.features_dtype name); no copy when it already is one."""
    return torch.as_tensor(x).to(DTYPES[dtype])


def _bank_matrix(x: np.ndarray | torch.Tensor, dtype: str) -> np.ndarray | torch.Tensor:
    """float32 stays (or becomes) a numpy array, as every source gives it; half types are tensors."""
    t = as_dtype(x, dtype)
    return t.numpy() if dtype == "float32" else t


@dataclass
class FeatureBank:
    hidden: torch.Tensor | np.ndarray | None = None
    layers: list[int] = field(default_factory=list)
    caption: torch.Tensor | np.ndarray | None = None
    missing: dict[str, list[str]] = field(default_factory=dict)  # "hidden"/"caption" -> raw item ids
    snapshot: dict[str, Any] = field(default_factory=dict)  # where the features came from

    def select(self, source: str) -> torch.Tensor | np.ndarray:
        """`caption` -> [n+1, 1, Dc];  `hidden:all` | `hidden:3` | `hidden:0,4,-1` -> [n+1, k, D].

        A view of the bank when the layers are a run (all, one layer, 2,3,4), else a copy."""
        if source == "caption":
            if self.caption is None:
                raise ValueError("feature source 'caption' requested but no caption features were loaded")
            return self.caption[:, None, :]
        if source.startswith("hidden:"):
            if self.hidden is None:
                raise ValueError(f"feature source {source!r} requested but no hidden-state features were loaded")
            pos = self.layer_positions(source.split(":", 1)[1])
            if pos == list(range(pos[0], pos[0] + len(pos))):
                return self.hidden[:, pos[0]:pos[0] + len(pos)]
            return self.hidden[:, pos]
        raise ValueError(f"unknown feature source {source!r} (caption | hidden:all | hidden:<l1,l2,...>)")

    def layer_positions(self, spec: str) -> list[int]:
        if spec == "all":
            return list(range(len(self.layers)))
        wanted = [-1 if s.strip() == "final" else int(s) for s in spec.split(",") if s.strip()]
        unknown = [w for w in wanted if w not in self.layers]
        if unknown or not wanted:
            raise ValueError(f"layers {unknown or spec!r} not in the features (available: {self.layers})")
        return [self.layers.index(w) for w in wanted]

    def to(self, dtype: str) -> "FeatureBank":
        """The matrices in `dtype` (a train.features_dtype name), in place; float32 stays numpy."""
        self.hidden = None if self.hidden is None else _bank_matrix(self.hidden, dtype)
        self.caption = None if self.caption is None else _bank_matrix(self.caption, dtype)
        return self

    def describe_missing(self) -> str:
        parts = []
        for kind, ids in self.missing.items():
            if ids:
                shown = ", ".join(ids[:10]) + (" ..." if len(ids) > 10 else "")
                parts.append(f"{len(ids)} items have no {kind} features (zero vectors): {shown}")
        return "; ".join(parts)


def _align(ids: list[str], matrix: np.ndarray, items: list[str]) -> tuple[np.ndarray, list[str]]:
    """Rows keyed by raw `ids` -> rows in dataset order (items[0] = padding), plus missing ids."""
    row_of = {str(i): r for r, i in enumerate(ids)}
    out = np.zeros((len(items),) + matrix.shape[1:], dtype=np.float32)
    missing = []
    for idx, item in enumerate(items[1:], start=1):
        r = row_of.get(item)
        if r is None:
            missing.append(item)
        else:
            out[idx] = matrix[r]
    return out, missing


def read_matrix_file(path: str | Path) -> tuple[list[str], np.ndarray, list[int] | None]:
    """(item ids, matrix [n, D] or [n, L, D], layer ids or None) from .npy/.npz/.parquet.

    .npy      rows keyed by a sidecar `<name>.ids.txt` (one item id per line)
    .npz      arrays `item_ids`, `features` and optionally `layers`
    .parquet  column `item_id`, one list column of floats (the vector) and optionally `layer`
              (long format: one row per item and layer)
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"feature file not found: {path}")
    if path.suffix == ".npy":
        ids_file = path.with_suffix(".ids.txt")
        if not ids_file.is_file():
            raise FileNotFoundError(f"{path}: rows need item ids in {ids_file} (one per line)")
        ids = [line.strip() for line in ids_file.read_text().splitlines() if line.strip()]
        matrix = np.load(path)
        if len(ids) != len(matrix):
            raise ValueError(f"{path}: {len(matrix)} rows but {ids_file} has {len(ids)} ids")
        return ids, matrix, None
    if path.suffix == ".npz":
        z = np.load(path)
        for key in ("item_ids", "features"):
            if key not in z:
                raise KeyError(f"{path}: missing array {key!r} (has {', '.join(z.files)})")
        layers = [int(x) for x in z["layers"]] if "layers" in z else None
        return [str(i) for i in z["item_ids"]], z["features"], layers
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        import pyarrow.types as pat

        table = pq.read_table(path)
        if "item_id" not in table.column_names:
            raise KeyError(f"{path}: needs an 'item_id' column (has {', '.join(table.column_names)})")
        vec_cols = [f.name for f in table.schema if pat.is_list(f.type) or pat.is_fixed_size_list(f.type)
                    or pat.is_large_list(f.type)]
        if not vec_cols:
            raise ValueError(f"{path}: no list<float> vector column")
        ids = [str(i) for i in table.column("item_id").to_pylist()]
        vecs = np.array(table.column(vec_cols[0]).to_pylist(), dtype=np.float32)
        if "layer" not in table.column_names:
            return ids, vecs, None
        layer_col = np.array(table.column("layer").to_pylist())
        layers = sorted(set(layer_col.tolist()), key=lambda x: (x < 0, x))  # final (-1) last
        uniq = list(dict.fromkeys(ids))
        pos = {i: r for r, i in enumerate(uniq)}
        out = np.zeros((len(uniq), len(layers), vecs.shape[-1]), dtype=np.float32)
        lpos = {l: k for k, l in enumerate(layers)}
        out[[pos[i] for i in ids], [lpos[l] for l in layer_col]] = vecs
        return uniq, out, layers
    raise ValueError(f"{path}: unsupported feature file type (use .npy + .ids.txt, .npz or .parquet)")


def load_file_features(items: list[str], hidden: str | Path | None = None,
                       caption: str | Path | None = None) -> FeatureBank:
    bank = FeatureBank(snapshot={"kind": "file"})
    if hidden is not None:
        ids, matrix, layers = read_matrix_file(hidden)
        if matrix.ndim == 2:
            matrix = matrix[:, None, :]
        bank.hidden, bank.missing["hidden"] = _align(ids, matrix.astype(np.float32), items)
        bank.layers = layers or list(range(matrix.shape[1]))
        bank.snapshot["hidden"] = str(hidden)
    if caption is not None:
        ids, matrix, _ = read_matrix_file(caption)
        bank.caption, bank.missing["caption"] = _align(ids, matrix.reshape(len(matrix), -1).astype(np.float32), items)
        bank.snapshot["caption"] = str(caption)
    return bank


def load_store_features(store_path: str, extractor_id: str, items: list[str], layers: list[int] | None = None,
                        caption_extractor: str | None = None, as_of: Any = None,
                        storage_options: dict[str, str] | None = None, dtype: str = "float32") -> FeatureBank:
    """The one adapter to the feature store (imported lazily: the recommender works without it).

    Every read is pinned to one set of table versions (`as_of`: a tag or None = now), recorded in
    the bank's snapshot. Captions come from `caption_extractor` (default: the same extractor).
    The hidden states go layer by layer into one [n + 1, L, D] tensor of `dtype`: the load peaks
    at that tensor plus one layer's float32 rows.
    """
    try:
        from storage import FeatureStore
    except ImportError as e:
        raise ValueError("the feature store (storage/) is not available; train from a .npy/.npz/.parquet "
                         "matrix with --features instead") from e
    store = FeatureStore(store_path, storage_options=storage_options or {}, create=False)
    versions = store.snapshot() if as_of is None else store.resolve(as_of)
    if layers is None:
        layers = store.layers(extractor_id, as_of=versions)
    if not layers:
        raise ValueError(f"store {store_path}: no hidden states for extractor {extractor_id!r}")
    ids = items[1:]
    hidden, missing = None, set()
    for k, layer in enumerate(layers):
        fm = store.layer_matrix(extractor_id, layer, ids, as_of=versions, strict=False)
        if hidden is None:
            hidden = torch.empty(len(items), len(layers), fm.values.shape[-1], dtype=DTYPES[dtype])
            hidden[0] = 0
        hidden[1:, k] = torch.from_numpy(fm.values)
        missing.update(fm.missing)
        del fm
    _release_arrow_memory()  # the layers' Arrow buffers: 0.2 GB kept by the allocator at the 3B shape
    bank = FeatureBank(hidden=hidden, layers=list(layers), missing={"hidden": [i for i in ids if i in missing]},
                       snapshot={"kind": "store", "path": str(store_path), "extractor_id": extractor_id,
                                 "as_of": as_of, "versions": versions})
    cap = store.caption_matrix(caption_extractor or extractor_id, ids, as_of=versions, strict=False)
    if cap.present.any() and cap.values.shape[-1]:
        bank.caption = torch.zeros(len(items), cap.values.shape[-1], dtype=DTYPES[dtype])
        bank.caption[1:] = torch.from_numpy(cap.values)
        bank.missing["caption"] = cap.missing
        bank.snapshot["caption_extractor"] = caption_extractor or extractor_id
    return bank.to(dtype)  # no copy: float32 becomes a numpy view of the same memory


def _release_arrow_memory() -> None:
    import pyarrow as pa

    pa.default_memory_pool().release_unused()


def topic_features(corpus_json: str | Path, items: list[str], layer_signal=(0.1, 0.4, 1.0, 0.6, 0.2),
                   caption_signal: float = 0.3, dim: int = 32, seed: int = 0) -> FeatureBank:
    """SYNTHETIC features from the demo corpus' ground-truth topics, for developing the study.

    Each topic gets a random direction; layer l of item i is  signal_l * topic_dir(i) + noise, so
    the layers differ in usefulness by construction (a middle layer is best) and captions are a
    weaker view. These are not LVLM features; runs record `kind: synthetic-topics`.
    """
    corpus = json.loads(Path(corpus_json).read_text())
    topics = _topics_by_item(corpus, corpus_json)
    names = sorted({t for ts in topics.values() for t in ts})
    rng = np.random.default_rng(seed)
    directions = {t: rng.standard_normal(dim).astype(np.float32) for t in names}
    ids = list(topics)
    content = np.stack([sum((directions[t] for t in topics[i]), np.zeros(dim, np.float32)) for i in ids])
    content /= np.linalg.norm(content, axis=1, keepdims=True).clip(1e-6)
    noise = lambda: rng.standard_normal((len(ids), dim)).astype(np.float32) / np.sqrt(dim)  # noqa: E731
    layers = np.stack([s * content + noise() for s in layer_signal], axis=1)
    caption = caption_signal * content + noise()
    bank = FeatureBank(layers=list(range(len(layer_signal))),
                       snapshot={"kind": "synthetic-topics", "corpus": str(corpus_json),
                                 "layer_signal": list(layer_signal), "caption_signal": caption_signal})
    bank.hidden, bank.missing["hidden"] = _align(ids, layers, items)
    bank.caption, bank.missing["caption"] = _align(ids, caption, items)
    return bank


def _topics_by_item(corpus: Any, where: Any) -> dict[str, list[str]]:
    """Accepts the demo corpus ({"item_topic": {item_id: topic}}), [{"item_id", "topics"}...] or {item_id: topics}."""
    if isinstance(corpus, dict) and "item_topic" in corpus:
        return {str(k): [str(v)] for k, v in corpus["item_topic"].items()}
    rows = corpus.get("items", corpus) if isinstance(corpus, dict) else corpus
    if isinstance(rows, dict):
        return {str(k): (v if isinstance(v, list) else [v]) for k, v in rows.items()}
    out = {}
    for row in rows:
        item = row.get("item_id", row.get("id"))
        topics = row.get("topics", row.get("topic"))
        if item is None or topics is None:
            raise ValueError(f"{where}: corpus rows need 'item_id' and 'topics', got keys {sorted(row)}")
        out[str(item)] = [str(t) for t in (topics if isinstance(topics, list) else [topics])]
    return out


def parse_layers(spec: str) -> list[int] | None:
    """'all' -> None; '0,8,final' -> [0, 8, -1]."""
    if spec in ("", "all"):
        return None
    if not re.fullmatch(r"\s*(-?\d+|final)(\s*,\s*(-?\d+|final))*\s*", spec):
        raise ValueError(f"layers must be 'all' or a comma list like '0,8,final', got {spec!r}")
    return [-1 if s.strip() == "final" else int(s) for s in spec.split(",")]


def load_features(items: list[str], hidden: str | None = None, caption: str | None = None,
                  topics: str | None = None, store: str | None = None, extractor: str | None = None,
                  caption_extractor: str | None = None, layers: str = "all", as_of: Any = None,
                  storage_options: dict[str, str] | None = None, dtype: str = "float32") -> FeatureBank:
    """One entry point: files (hidden/caption), the store (store + extractor) or synthetic topics;
    the bank's tensors in `dtype` (train.features_dtype)."""
    if topics:
        return topic_features(topics, items).to(dtype)
    if store and extractor:
        return load_store_features(store, extractor, items, parse_layers(layers), caption_extractor, as_of,
                                   storage_options, dtype)
    if hidden or caption:
        return load_file_features(items, hidden, caption).to(dtype)
    return FeatureBank(snapshot={"kind": "none"})


def store_captions(store_path: str, item_ids: list[str], extractor_id: str | None,
                   storage_options: dict[str, str] | None = None) -> dict[str, str]:
    """Caption texts for `mvrec recommend`, from the store's captions table."""
    try:
        from storage import FeatureStore
    except ImportError:
        return {}
    table = FeatureStore(store_path, storage_options=storage_options or {}, create=False).read(
        "captions", columns=["video_id", "extractor_id", "caption"]).to_pylist()
    wanted = set(item_ids)
    return {r["video_id"]: r["caption"] or "" for r in table
            if r["video_id"] in wanted and (extractor_id is None or r["extractor_id"] == extractor_id)}
