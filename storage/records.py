"""The records the store reads and writes: plain dataclasses (dicts with the same keys work too).

Row types map one to one onto the tables in storage/schema.py; ExtractorRecord is an
extractor's lineage, and its `extractor_id` the stable hash that keys every feature row.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Mapping, Sequence, Union

import numpy as np

# A read position: None (latest), a tag name, {table: version} as returned by snapshot(), or,
# for functions that read a single table, that table's Delta version as an int.
AsOf = Union[None, str, int, Mapping[str, int]]

FINAL_LAYER = -1  # the layer index of `final` (after the final norm); see tasks/lvlm.py


def extractor_id(model: str, revision: str, prompt: str, frame_policy: str, pooling: str,
                 code_version: str, **params: Any) -> str:
    """A stable 16-hex-digit id of everything that changes the features.

    params: any other knob that changes the output (dtype, max_pixels, max_new_tokens, backend...).
    The hash is over canonical JSON (sorted keys), so argument order and dict order do not matter.
    """
    doc = {
        "model": model, "revision": revision, "prompt": prompt, "frame_policy": frame_policy,
        "pooling": pooling, "code_version": code_version,
        "params": {k: params[k] for k in sorted(params)},
    }
    blob = json.dumps(doc, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ExtractorRecord:
    """One extractor's lineage. `dim` and `num_layers` describe the model; they are not hashed."""

    model: str
    revision: str
    prompt: str
    frame_policy: str
    pooling: str
    code_version: str
    params: Mapping[str, Any] = field(default_factory=dict)
    dim: int | None = None
    num_layers: int | None = None

    @property
    def extractor_id(self) -> str:
        return extractor_id(self.model, self.revision, self.prompt, self.frame_policy,
                            self.pooling, self.code_version, **dict(self.params))


@dataclass
class VideoRow:
    video_id: str
    uri: str
    content_sha256: str
    bytes: int | None = None
    duration_s: float | None = None
    fps: float | None = None
    width: int | None = None
    height: int | None = None
    first_seen: datetime | None = None  # default: now (kept on later upserts)
    last_seen: datetime | None = None  # default: now
    frame_count: int | None = None  # frames the stream yielded (schema v3)
    partial: bool | None = None  # fewer frames decoded than the header promised (schema v3)


@dataclass
class CaptionRow:
    video_id: str
    content_sha256: str
    extractor_id: str
    caption: str
    text_model: str = ""
    text_embedding: np.ndarray | Sequence[float] | None = None


@dataclass
class HiddenStateRow:
    video_id: str
    content_sha256: str
    extractor_id: str
    layer: int  # 0..L, or FINAL_LAYER (-1)
    embedding: np.ndarray | Sequence[float]


@dataclass
class FailureRow:
    video_id: str
    stage: str
    error_type: str
    message: str
    uri: str = ""
    extractor_id: str = ""  # '' when no model was involved (probe, decode)
    attempts: int = 1
    run_id: str = ""
    at: datetime | None = None  # default: now
    content_sha256: str = ""  # the content that failed (schema v2); '' when unknown
    permanent: bool = False  # the same input fails the same way again: skipped until it changes (v3)


@dataclass
class ExtractionBatch:
    """What one extraction commit writes. See FeatureStore.write_batch for the order."""

    videos: list[Any] = field(default_factory=list)
    captions: list[Any] = field(default_factory=list)
    hidden_states: list[Any] = field(default_factory=list)
    failures: list[Any] = field(default_factory=list)


@dataclass
class FeatureMatrix:
    """Rows in the order of `item_ids`; rows of missing items are zeros and `present` is False."""

    item_ids: list[str]
    values: np.ndarray  # float32 (len(item_ids), D)
    present: np.ndarray  # bool (len(item_ids),)
    version: int  # Delta version of the table that was read

    @property
    def missing(self) -> list[str]:
        return [i for i, ok in zip(self.item_ids, self.present, strict=True) if not ok]

    def __iter__(self):
        """Unpacks as `values, missing = store.layer_matrix(..., strict=False)`."""
        return iter((self.values, self.missing))


class MissingItemsError(ValueError):
    """Some requested items have no feature row; `.missing` lists them."""

    def __init__(self, what: str, missing: list[str]):
        self.missing = missing
        head = ", ".join(missing[:10]) + (f", ... ({len(missing) - 10} more)" if len(missing) > 10 else "")
        super().__init__(f"{what}: {len(missing)} item(s) have no row: {head}")
