"""The `study` flow: load-features -> run-cell x N -> report.

A thin Prefect shell: the grid is recommender.study.run_study (plain functions), given its steps
as tasks here. Cells run one after another: each already uses the CPU threads torch is given.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.report import publish, study_markdown
from mvrec.config import StoreConfig, StudyConfig, TrainConfig
from recommender.study import run_cell, run_study, write_report
from recommender.pipeline import FeatureSpec, load_inputs

# NO_CACHE: the inputs are large in-memory matrices; hashing them for a cache key costs more than a run.
load_inputs_task = task(load_inputs, name="load-features", cache_policy=NO_CACHE)
run_cell_task = task(run_cell, name="run-cell", cache_policy=NO_CACHE, task_run_name="cell {cell.name}")
report_task = task(write_report, name="report", cache_policy=NO_CACHE)


@flow(name="study", log_prints=True)
def study_flow(interactions: str, spec: FeatureSpec | None = None, train_cfg: TrainConfig | None = None,
               study_cfg: StudyConfig | None = None, store: StoreConfig | None = None,
               out_dir: str | None = None) -> dict[str, Any]:
    train_cfg, study_cfg = train_cfg or TrainConfig(), study_cfg or StudyConfig()
    data, bank = load_inputs_task(interactions, train_cfg, spec, store, study_cfg.layers)
    result = run_study(data, bank, train_cfg, study_cfg, out_dir, run=run_cell_task, report=report_task)
    publish("study", study_markdown(result), "study results table and plots")  # shown in the Prefect UI
    return result
