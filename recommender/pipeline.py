"""One call for flows: train a representation on store features and ID-only next to it.

Used by flows/refresh.py (`train-recommender`). No Prefect here: a plain function.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from mvrec.config import Config
from recommender.data import load_sequences
from recommender.features import load_features
from recommender.train import resolve_features, train


def train_from_store(cfg: Config, interactions: str, extractor_id: str, representation: str = "dff",
                     as_of: Any = None, baseline: bool = True, progress: bool = False) -> dict[str, Any]:
    """-> {"test": {name: metrics}, "valid": {...}, "runs": {name: dir}, "snapshot": {...}, "missing": [...]}"""
    data = load_sequences(interactions, cfg.train.min_seq_len, cfg.train.max_seq_len)
    bank = load_features(data.items, store=cfg.store.path, extractor=extractor_id, as_of=as_of,
                         storage_options=cfg.store.storage_options)
    out: dict[str, Any] = {"test": {}, "valid": {}, "runs": {}, "snapshot": bank.snapshot,
                           "missing": bank.missing.get("hidden", [])}
    for rep in ([representation, "id"] if baseline and representation != "id" else [representation]):
        train_cfg = dataclasses.replace(cfg.train, representation=rep)
        matrix, meta = resolve_features(bank, train_cfg)
        run_dir = Path(cfg.train.out) / f"{rep}-{extractor_id}-s{train_cfg.seed}"
        result = train(data, train_cfg, matrix, run_dir, meta=meta, progress=progress)
        out["test"][rep] = {k: v for k, v in result.test.items() if k != "cold/n_users"}
        out["valid"][rep] = {k: v for k, v in result.valid.items() if k != "cold/n_users"}
        out["runs"][rep] = str(result.run_dir)
    return out
