"""The `study` flow: load features -> run the grid's cells -> report.

A thin Prefect shell over recommender.study (plain functions); `run_plain` is the same DAG without
Prefect. Cells run one after another: each already uses the CPU threads torch is given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from mvrec.config import StudyConfig, TrainConfig
from recommender import study as S
from recommender.data import load_sequences
from recommender.features import load_features


def _load(interactions, features, caption_features, topics, store, extractor, caption_extractor, as_of,
          train_cfg: TrainConfig, study_cfg: StudyConfig):
    data = load_sequences(interactions, train_cfg.min_seq_len, train_cfg.max_seq_len)
    bank = load_features(data.items, hidden=features, caption=caption_features, topics=topics, store=store,
                         extractor=extractor, caption_extractor=caption_extractor, layers=study_cfg.layers,
                         as_of=as_of)
    return data, bank


# NO_CACHE: the inputs are large in-memory matrices; hashing them for a cache key costs more than a run.
load_features_task = task(_load, name="load-features", cache_policy=NO_CACHE)
run_cell_task = task(S.run_cell, name="run-cell", cache_policy=NO_CACHE, task_run_name="cell {cell.name}")
report_task = task(S.write_report, name="report", cache_policy=NO_CACHE)


@flow(name="study", log_prints=True)
def study_flow(interactions: str, features: str | None = None, caption_features: str | None = None,
               topics: str | None = None, store: str | None = None, extractor: str | None = None,
               caption_extractor: str | None = None, as_of: Any = None, train_cfg: TrainConfig | None = None,
               study_cfg: StudyConfig | None = None, out_dir: str | None = None) -> dict[str, Any]:
    train_cfg, study_cfg = train_cfg or TrainConfig(), study_cfg or StudyConfig()
    out = Path(out_dir or study_cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    data, bank = load_features_task(interactions, features, caption_features, topics, store, extractor,
                                    caption_extractor, as_of, train_cfg, study_cfg)
    cfg = S.study_train_config(train_cfg, study_cfg)
    rows = []
    for cell in S.build_grid(bank, study_cfg.layers, study_cfg.representations):
        rows += run_cell_task(data, bank, cell, cfg, study_cfg.seeds, out)
    if "replace" in study_cfg.representations and (layer := S.best_layer(rows)) is not None:
        rows += run_cell_task(data, bank, S.Cell("replace", f"hidden:{layer}"), cfg, study_cfg.seeds, out)
    return report_task(rows, out, bank)


def run_plain(interactions: str, features: str | None = None, caption_features: str | None = None,
              topics: str | None = None, store: str | None = None, extractor: str | None = None,
              caption_extractor: str | None = None, as_of: Any = None, train_cfg: TrainConfig | None = None,
              study_cfg: StudyConfig | None = None, out_dir: str | None = None) -> dict[str, Any]:
    """The same study without Prefect."""
    train_cfg, study_cfg = train_cfg or TrainConfig(), study_cfg or StudyConfig()
    data, bank = _load(interactions, features, caption_features, topics, store, extractor, caption_extractor,
                       as_of, train_cfg, study_cfg)
    return S.run_study(data, bank, train_cfg, study_cfg, out_dir)
