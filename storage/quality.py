"""The quality gate every extraction batch passes before it is committed.

    gated = gate_batch(batch, dim=info.hidden_size, run_id=run_id)
    store.write_batch(gated.batch)          # the good videos, plus a failure row per bad one
    norms.merge(gated.norms)                # per-layer norm statistics for the run

An embedding must be finite (no NaN, no Inf), have the extractor's dimension and a non-zero norm.
One bad layer fails the whole video: its video, caption and hidden-state rows are dropped from
the batch and a failure row (stage "quality", the reason as error_type) takes their place, so the
rest of the batch commits and the next run does not mistake the video for done.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from storage import ExtractionBatch, FailureRow

STAGE = "quality"
# error_type of each failure class (a failure row's reason)
NON_FINITE, WRONG_DIM, ZERO_NORM = "NonFiniteEmbedding", "WrongDimension", "ZeroNormEmbedding"


def _get(row: Any, name: str, default: Any = None) -> Any:
    return row.get(name, default) if isinstance(row, Mapping) else getattr(row, name, default)


def check_embedding(vec: Any, dim: int) -> tuple[str, str] | None:
    """(error_type, message) when `vec` fails the gate, else None."""
    if vec is None:
        return WRONG_DIM, "no embedding"
    a = np.asarray(vec, dtype=np.float32).reshape(-1)
    if a.size != dim:
        return WRONG_DIM, f"dimension {a.size}, expected {dim}"
    finite = np.isfinite(a)
    if not finite.all():
        nan, inf = int(np.isnan(a).sum()), int(np.isinf(a).sum())
        return NON_FINITE, f"{nan} NaN and {inf} Inf of {dim} values"
    norm = float(np.linalg.norm(a.astype(np.float64)))
    if norm == 0.0:
        return ZERO_NORM, "all-zero vector (norm 0)"
    return None


@dataclass
class NormStats:
    """Running L2-norm statistics of one layer's accepted embeddings."""

    count: int = 0
    total: float = 0.0
    total_sq: float = 0.0
    min: float = math.inf
    max: float = 0.0

    def add(self, norm: float) -> None:
        self.count += 1
        self.total += norm
        self.total_sq += norm * norm
        self.min, self.max = min(self.min, norm), max(self.max, norm)

    def merge(self, other: "NormStats") -> None:
        self.count += other.count
        self.total += other.total
        self.total_sq += other.total_sq
        self.min, self.max = min(self.min, other.min), max(self.max, other.max)

    def summary(self) -> dict[str, float]:
        if not self.count:
            return {"count": 0}
        mean = self.total / self.count
        std = math.sqrt(max(0.0, self.total_sq / self.count - mean * mean))
        return {"count": self.count, "mean": round(mean, 6), "std": round(std, 6),
                "min": round(self.min, 6), "max": round(self.max, 6)}


@dataclass
class LayerNorms:
    """NormStats per layer (final is -1), mergeable across batches."""

    layers: dict[int, NormStats] = field(default_factory=dict)

    def add(self, layer: int, norm: float) -> None:
        self.layers.setdefault(int(layer), NormStats()).add(norm)

    def merge(self, other: "LayerNorms") -> None:
        for layer, s in other.layers.items():
            self.layers.setdefault(layer, NormStats()).merge(s)

    def summary(self) -> dict[str, dict[str, float]]:
        """{layer (as a string, for JSON): {count, mean, std, min, max}}, layers in order."""
        return {str(k): self.layers[k].summary() for k in sorted(self.layers)}


@dataclass
class GateResult:
    batch: ExtractionBatch  # the rows that passed, plus the new failure rows
    rejected: list[FailureRow]
    norms: LayerNorms


def gate_batch(batch: ExtractionBatch, dim: int, run_id: str = "") -> GateResult:
    """Check every hidden state in `batch` against `dim`; drop the videos that fail and add a
    failure row per video (its first problem, and the layer it was in)."""
    bad: dict[tuple[str, str, str], tuple[str, str]] = {}  # (video, sha, extractor) -> reason
    for row in batch.hidden_states:
        key = (_get(row, "video_id"), _get(row, "content_sha256"), _get(row, "extractor_id"))
        if key in bad:
            continue
        problem = check_embedding(_get(row, "embedding"), dim)
        if problem is not None:
            layer = int(_get(row, "layer"))
            bad[key] = (problem[0], f"layer {'final' if layer == -1 else layer}: {problem[1]}")
    norms = LayerNorms()
    kept_states = []
    for row in batch.hidden_states:
        key = (_get(row, "video_id"), _get(row, "content_sha256"), _get(row, "extractor_id"))
        if key not in bad:
            kept_states.append(row)
            norms.add(_get(row, "layer"), float(np.linalg.norm(np.asarray(_get(row, "embedding"), np.float64))))
    if not bad:
        return GateResult(batch, [], norms)
    vids = {(v, s) for v, s, _ in bad}
    uris = {(_get(r, "video_id"), _get(r, "content_sha256")): _get(r, "uri", "") for r in batch.videos}
    # Permanent: the same video through the same model gives the same vector; a new model, dtype
    # or prompt is a new extractor id and tries again.
    rejected = [FailureRow(video_id=v, stage=STAGE, error_type=err, message=msg, uri=uris.get((v, s)) or "",
                           extractor_id=e, run_id=run_id, content_sha256=s, permanent=True)
                for (v, s, e), (err, msg) in sorted(bad.items())]
    keep = dataclasses.replace(
        batch,
        videos=[r for r in batch.videos if (_get(r, "video_id"), _get(r, "content_sha256")) not in vids],
        captions=[r for r in batch.captions
                  if (_get(r, "video_id"), _get(r, "content_sha256"), _get(r, "extractor_id")) not in bad],
        hidden_states=kept_states,
        failures=list(batch.failures) + rejected)
    return GateResult(keep, rejected, norms)
