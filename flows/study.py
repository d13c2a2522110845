"""The `study` flow: load-features -> run-unit x (cells x seeds) -> report.

A thin Prefect shell: the grid is recommender.study.run_study (plain functions), given its steps
as tasks here. The units run on study.engine (recommender/engines.py: serial, worker processes or
Ray), study.workers at a time; each is a task run of its own ("unit <cell> seed <k>"), retried
study.retries times, so a failed unit shows in the UI, and a rerun of the flow runs only the units
that have no saved result.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.report import publish, study_markdown
from mvrec.config import StoreConfig, StudyConfig, TrainConfig
from recommender.pipeline import FeatureSpec, load_inputs
from recommender.study import Unit, run_study, write_report


def run_on_engine(engine: Any, unit: Unit) -> dict[str, Any]:
    return engine.run(unit)


# NO_CACHE: the inputs are large in-memory matrices; hashing them for a cache key costs more than a run.
load_inputs_task = task(load_inputs, name="load-features", cache_policy=NO_CACHE)
run_unit_task = task(run_on_engine, name="run-unit", cache_policy=NO_CACHE, task_run_name="unit {unit.name}")
report_task = task(write_report, name="report", cache_policy=NO_CACHE)


@flow(name="study", log_prints=True)
def study_flow(interactions: str, spec: FeatureSpec | None = None, train_cfg: TrainConfig | None = None,
               study_cfg: StudyConfig | None = None, store: StoreConfig | None = None,
               out_dir: str | None = None, fresh: bool = False) -> dict[str, Any]:
    train_cfg, study_cfg = train_cfg or TrainConfig(), study_cfg or StudyConfig()
    data, bank = load_inputs_task(interactions, train_cfg, spec, store, study_cfg.layers)
    result = run_study(data, bank, train_cfg, study_cfg, out_dir, call=run_unit_task.with_options(
        retries=study_cfg.retries), report=report_task, fresh=fresh)
    publish("study", study_markdown(result), "study results table and plots")  # shown in the Prefect UI
    return result
