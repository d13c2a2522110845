"""Loading a run's inputs (one path for the CLI and the flows), and `train_from_store` for the refresh flow.

No Prefect here: plain functions.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mvrec.config import Config, StoreConfig, TrainConfig
from recommender.data import SeqData, load_sequences
from recommender.features import FeatureBank, load_features
from recommender.train import resolve_features, train


@dataclass
class FeatureSpec:
    """Where item features come from: matrix files, the store (an extractor id), or synthetic topics."""
    features: str | None = None
    caption_features: str | None = None
    topics: str | None = None  # a demo corpus.json: SYNTHETIC features, development only
    extractor: str | None = None
    caption_extractor: str | None = None
    as_of: Any = None


def load_inputs(interactions: str | Path, train_cfg: TrainConfig, spec: FeatureSpec | None = None,
                store: StoreConfig | None = None, layers: str = "all") -> tuple[SeqData, FeatureBank]:
    """The split interactions and the feature bank aligned to their items (store options included)."""
    spec, store = spec or FeatureSpec(), store or StoreConfig()
    data = load_sequences(interactions, train_cfg.min_seq_len, train_cfg.max_seq_len)
    bank = load_features(data.items, hidden=spec.features, caption=spec.caption_features, topics=spec.topics,
                         store=store.path if spec.extractor else None, extractor=spec.extractor,
                         caption_extractor=spec.caption_extractor, layers=layers, as_of=spec.as_of,
                         storage_options=store.storage_options, dtype=train_cfg.features_dtype)
    return data, bank


def train_from_store(cfg: Config, interactions: str, extractor_id: str, representation: str = "dff",
                     as_of: Any = None, baseline: bool = True, progress: bool = False) -> dict[str, Any]:
    """Train a representation on store features and ID-only next to it (flows/refresh.py).

    -> {"test": {name: metrics}, "valid": {...}, "runs": {name: dir}, "snapshot": {...}, "missing": [...]}"""
    base = cfg.train
    data, bank = load_inputs(interactions, base, FeatureSpec(extractor=extractor_id, as_of=as_of), cfg.store)
    out: dict[str, Any] = {"test": {}, "valid": {}, "runs": {}, "snapshot": bank.snapshot,
                           "missing": bank.missing.get("hidden", [])}
    for rep in ([representation, "id"] if baseline and representation != "id" else [representation]):
        train_cfg = dataclasses.replace(base, representation=rep)
        matrix, meta = resolve_features(bank, train_cfg)
        run_dir = Path(base.out) / f"{rep}-{extractor_id}-s{train_cfg.seed}"
        result = train(data, train_cfg, matrix, run_dir, meta=meta, progress=progress, log=print)
        out["test"][rep] = {k: v for k, v in result.test.items() if k != "cold/n_users"}
        out["valid"][rep] = {k: v for k, v in result.valid.items() if k != "cold/n_users"}
        out["runs"][rep] = str(result.run_dir)
    return out
