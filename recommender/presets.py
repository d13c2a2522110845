"""Named training recipes: `train.preset` (or `--preset`) applies one before the explicit flags.

sasrec-games   our recipe for Amazon Games-like catalogues (tens of thousands of items, sequences up
               to 50): the SASRec paper's dimensions, the exact full softmax, a higher learning rate
               decayed by a cosine over 25 epochs, dropout 0.6; measured in docs/recommender.md.
sasrec-bce     the published recipe (SASRec paper / pmixer SASRec.pytorch): BCE with one negative,
               batch 128, dropout 0.5, Adam without weight decay, for comparison.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

from mvrec.config import TrainConfig

# Shared by both: the data and protocol of the SASRec paper's Games experiment.
_GAMES = dict(dim=50, max_seq_len=50, min_seq_len=3, n_blocks=2, n_heads=1, eval_protocol="sampled")

PRESETS: dict[str, dict[str, Any]] = {
    # The whole cosine schedule runs (patience = max_epochs); the best validation epoch is kept.
    "sasrec-games": {**_GAMES, "loss": "full", "lr": 4e-3, "lr_schedule": "cosine", "max_epochs": 25, "patience": 25,
                     "dropout": 0.6, "mask_history": False, "batch_size": 128, "weight_decay": 0.1,
                     "eval_users": 10_000},
    "sasrec-bce": {**_GAMES, "loss": "bce", "dropout": 0.5, "lr": 1e-3, "batch_size": 128, "weight_decay": 0.0,
                   "eval_users": 10_000, "patience": 3},
}


def apply_preset(cfg: TrainConfig, keep: Iterable[str] = ()) -> TrainConfig:
    """cfg with its preset's keys set, except those in `keep` (keys given explicitly, e.g. as flags)."""
    if not cfg.preset:
        return cfg
    if cfg.preset not in PRESETS:
        raise ValueError(f"unknown train.preset {cfg.preset!r} ({', '.join(PRESETS)})")
    keep = set(keep)
    return dataclasses.replace(cfg, **{k: v for k, v in PRESETS[cfg.preset].items() if k not in keep})
