"""What changed in the features between two snapshots, per extractor and layer.

    from storage.diff import diff_snapshots
    for d in diff_snapshots(store, "features-2024-06", "latest"):
        print(d.extractor_a, d.layer, d.added, d.removed, d.changed, d.cos_median)

A snapshot is a tag name, an int (a version of hidden_states; `videos` is then read at its latest
version), or "latest". Videos are matched by video_id: added / removed are ids in only one side,
changed are ids whose content (sha256) differs. For the ids on both sides the cosine similarity
of old and new embeddings says how far the features moved: a model, prompt or preprocessing
change gives a new extractor id, so compare the old and the new one with `pairs=[(old, new)]`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
import pyarrow.compute as pc

LATEST = "latest"


@dataclass
class LayerDiff:
    extractor_a: str
    extractor_b: str
    layer: int
    videos_a: int
    videos_b: int
    added: int  # in B only
    removed: int  # in A only
    changed: int  # in both, different content
    common: int  # in both (their embeddings are compared)
    cos_min: float | None
    cos_median: float | None
    below: float | None  # share of common videos with cosine < threshold
    threshold: float
    examples_added: list[str]
    examples_removed: list[str]
    examples_changed: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_side(store, ref: str | int) -> dict[str, int]:
    """A snapshot reference -> {"hidden_states": v, "videos": v} to read that side at."""
    if isinstance(ref, str) and ref.strip().lower() == LATEST:
        return {t: store.table(t).version() for t in ("hidden_states", "videos")}
    if isinstance(ref, int) or (isinstance(ref, str) and ref.strip().isdigit()):
        v = int(ref)
        latest = store.table("hidden_states").version()
        if not 0 <= v <= latest:
            raise ValueError(f"snapshot {ref!r}: hidden_states has versions 0..{latest}")
        return {"hidden_states": v, "videos": store.table("videos").version()}
    versions = store.resolve(ref)  # a tag name; raises naming the known tags
    return {t: versions[t] for t in ("hidden_states", "videos")}


def _keys(store, version: int, extractor_id: str, layer: int) -> dict[str, set[str]]:
    """video_id -> its content shas in one (extractor, layer) partition at `version`."""
    dt = store.table("hidden_states", version)
    ds = dt.to_pyarrow_dataset(file_pruning_predicate=[("extractor_id", "=", extractor_id),
                                                       ("layer", "=", str(layer))])
    t = ds.to_table(columns=["video_id", "content_sha256"],
                    filter=(pc.field("extractor_id") == extractor_id) & (pc.field("layer") == layer))
    out: dict[str, set[str]] = {}
    for v, s in zip(t.column("video_id").to_pylist(), t.column("content_sha256").to_pylist(), strict=True):
        out.setdefault(v, set()).add(s)
    return out


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity; NaN where either row has zero norm."""
    num = np.einsum("ij,ij->i", a.astype(np.float64), b.astype(np.float64))
    den = np.linalg.norm(a, axis=1).astype(np.float64) * np.linalg.norm(b, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def diff_layer(store, side_a: dict[str, int], side_b: dict[str, int], extractor_a: str, extractor_b: str,
               layer: int, threshold: float = 0.99, examples: int = 5) -> LayerDiff:
    ka = _keys(store, side_a["hidden_states"], extractor_a, layer)
    kb = _keys(store, side_b["hidden_states"], extractor_b, layer)
    added = sorted(set(kb) - set(ka))
    removed = sorted(set(ka) - set(kb))
    common = sorted(set(ka) & set(kb))
    changed = [v for v in common if ka[v] != kb[v]]
    cos = np.zeros(0)
    if common:
        a = store.layer_matrix(extractor_a, layer, common, as_of=side_a).values
        b = store.layer_matrix(extractor_b, layer, common, as_of=side_b).values
        if a.shape[1] != b.shape[1]:
            raise ValueError(f"layer {layer}: {extractor_a} has dimension {a.shape[1]} and {extractor_b} "
                             f"{b.shape[1]}; embeddings of different sizes cannot be compared")
        cos = cosine_rows(a, b)
    finite = cos[np.isfinite(cos)]
    return LayerDiff(
        extractor_a=extractor_a, extractor_b=extractor_b, layer=layer, videos_a=len(ka), videos_b=len(kb),
        added=len(added), removed=len(removed), changed=len(changed), common=len(common),
        cos_min=float(finite.min()) if finite.size else None,
        cos_median=float(np.median(finite)) if finite.size else None,
        # a zero-norm row (NaN cosine) counts as below: it is certainly not the same vector
        below=float(np.mean(~(cos >= threshold))) if cos.size else None, threshold=threshold,
        examples_added=added[:examples], examples_removed=removed[:examples],
        examples_changed=changed[:examples])


def _extractor_layers(store, version: int) -> dict[str, set[int]]:
    out: dict[str, set[int]] = {}
    for p in store.table("hidden_states", version).partitions():
        out.setdefault(p["extractor_id"], set()).add(int(p["layer"]))
    return out


def diff_snapshots(store, a: str | int, b: str | int, extractor: str | None = None,
                   pairs: Sequence[tuple[str, str]] | None = None, layers: Sequence[int] | None = None,
                   threshold: float = 0.99) -> list[LayerDiff]:
    """LayerDiffs for every extractor in A or B (or only `extractor`), or for the explicit
    (extractor in A, extractor in B) `pairs`; every layer either side has (or only `layers`)."""
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold: must be in (0, 1], got {threshold}")
    side_a, side_b = resolve_side(store, a), resolve_side(store, b)
    la, lb = _extractor_layers(store, side_a["hidden_states"]), _extractor_layers(store, side_b["hidden_states"])
    if pairs:
        for ea, eb in pairs:
            if ea not in la:
                raise ValueError(f"extractor {ea!r} has no hidden states in snapshot {a!r}")
            if eb not in lb:
                raise ValueError(f"extractor {eb!r} has no hidden states in snapshot {b!r}")
        todo = list(pairs)
    else:
        eids = sorted(set(la) | set(lb))
        if extractor is not None:
            if extractor not in eids:
                raise ValueError(f"extractor {extractor!r} has no hidden states in {a!r} or {b!r} "
                                 f"(known: {', '.join(eids) or 'none'})")
            eids = [extractor]
        todo = [(e, e) for e in eids]
    out = []
    for ea, eb in todo:
        have = la.get(ea, set()) | lb.get(eb, set())
        for layer in sorted(have if layers is None else set(int(x) for x in layers) & have):
            out.append(diff_layer(store, side_a, side_b, ea, eb, layer, threshold))
    return out
