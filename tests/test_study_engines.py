"""The study's units (cell x seed) on every engine: the same numbers as serial, saved as each
finishes, skipped by a rerun, retried then reported, a lost Ray node and a killed driver survived.

The grid is the demo grid (id, replace, fuse per layer and caption, dff) on the demo corpus'
interactions with SYNTHETIC topic features (`--synthetic-topics`), small enough for seconds a unit.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mvrec.config import StudyConfig, TrainConfig
from mvrec.devtools.demo_data import CorpusParams, assign_topics, make_interactions, write_pairs
from recommender.engines import SerialEngine, bank_arrays, bank_from_arrays, open_bank, share_bank
from recommender.pipeline import FeatureSpec, load_inputs
from recommender.study import METRICS, run_study

ROOT = Path(__file__).resolve().parent.parent
TRAIN = TrainConfig(dim=16, num_threads=1, patience=2, max_seq_len=10)
STUDY = StudyConfig(seeds=1, max_epochs=2, batch_size=64)
# Every metric a unit reports: bit-identical across engines.
COLUMNS = ["best_epoch", "epochs", *(f"{s}_{m}" for s in ("valid", "test", "test_cold") for m in METRICS),
           "layer_weights"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo corpus' interactions (no videos) and its corpus.json topics, as `mvrec demo-data` writes them."""
    folder = tmp_path_factory.mktemp("demo")
    params = CorpusParams(videos=60, users=300)
    topics = assign_topics(params.videos, params.n_topics, params.seed)
    write_pairs(make_interactions(params, topics).sequences, folder / "pairs.tsv")
    (folder / "corpus.json").write_text(json.dumps({"item_topic": {str(i + 1): int(t) for i, t in enumerate(topics)}}))
    return folder


def _inputs(demo):
    return load_inputs(demo / "pairs.tsv", TRAIN, FeatureSpec(topics=str(demo / "corpus.json")))


def _metrics(out: Path) -> dict[tuple[str, str], list[str]]:
    with open(out / "results.csv") as fh:
        return {(r["cell"], r["seed"]): [r[c] for c in COLUMNS] for r in csv.DictReader(fh)}


@pytest.fixture(scope="module")
def serial(demo, tmp_path_factory):
    """The reference: the demo grid run serially, 2 seeds."""
    out = tmp_path_factory.mktemp("serial")
    data, bank = _inputs(demo)
    summary = run_study(data, bank, TRAIN, dataclasses.replace(STUDY, seeds=2), out, log=lambda m: None)
    return out, summary


def test_a_shared_bank_reads_back_the_same_values(tmp_path):
    import torch

    from recommender.features import FeatureBank

    for hidden in (np.arange(24, dtype=np.float32).reshape(2, 3, 4), torch.randn(2, 3, 4).to(torch.bfloat16)):
        bank = FeatureBank(hidden=hidden, layers=[0, 1, -1], caption=np.ones((2, 4), np.float32), snapshot={"k": 1})
        for back in (open_bank(share_bank(bank, tmp_path / "shared")), bank_from_arrays(bank_arrays(bank))):
            got, want = torch.as_tensor(back.hidden), torch.as_tensor(hidden)
            assert got.dtype == want.dtype and torch.equal(got, want)
            assert back.layers == [0, 1, -1] and back.snapshot == {"k": 1}
    mapped = open_bank(share_bank(FeatureBank(hidden=np.ones((2, 1, 3), np.float32)), tmp_path / "f32")).hidden
    assert isinstance(mapped, np.memmap)  # every worker maps the one file, none holds a copy


def test_a_rerun_skips_the_finished_units_and_fresh_starts_over(demo, serial, tmp_path):
    ref_out = tmp_path / "study"
    shutil.copytree(serial[0], ref_out)  # the serial run's directory, moved
    (ref_out / "results.csv").unlink()
    data, bank = _inputs(demo)
    study = dataclasses.replace(STUDY, seeds=2)
    first = run_study(data, bank, TRAIN, study, ref_out, log=lambda m: None)
    total = serial[1]["units"]["units"]
    assert total == 20 and first["units"] == {"units": total, "skipped": total, "ran": 0, "failed": 0}
    assert _metrics(ref_out) == _metrics(serial[0])  # the report is rebuilt from the saved units
    assert all(r["run_dir"].startswith(str(ref_out)) for r in csv.DictReader(open(ref_out / "results.csv")))
    # one unit's result gone (a kill before it was saved): only that unit runs again
    done = sorted(ref_out.glob("runs/*/seed*/unit.json"))
    done[3].unlink()
    lines = []
    again = run_study(data, bank, TRAIN, study, ref_out, log=lines.append)
    assert again["units"] == {"units": total, "skipped": total - 1, "ran": 1, "failed": 0}
    assert "study: 20 units, 19 finished earlier (skipped), 1 ran, 0 failed" in lines
    # another config is another study: nothing is skipped; --fresh forgets what was done
    ident = dataclasses.replace(study, seeds=1, representations="id")
    assert run_study(data, bank, TRAIN, ident, tmp_path / "id", log=lambda m: None)["units"]["ran"] == 1
    other = run_study(data, bank, dataclasses.replace(TRAIN, dropout=0.2), ident, tmp_path / "id", log=lambda m: None)
    assert other["units"] == {"units": 1, "skipped": 0, "ran": 1, "failed": 0}
    same = run_study(data, bank, dataclasses.replace(TRAIN, dropout=0.2), ident, tmp_path / "id", log=lambda m: None)
    assert same["units"]["skipped"] == 1
    fresh = run_study(data, bank, dataclasses.replace(TRAIN, dropout=0.2), ident, tmp_path / "id", fresh=True,
                      log=lambda m: None)
    assert fresh["units"] == {"units": 1, "skipped": 0, "ran": 1, "failed": 0}


class Flaky(SerialEngine):
    """A serial engine whose `fuse caption seed 0` always fails and `id seed 0` fails once."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tries: dict[str, int] = {}

    def run(self, unit):
        self.tries[unit.name] = self.tries.get(unit.name, 0) + 1
        if unit.name == "fuse caption seed 0" or (unit.name == "id seed 0" and self.tries[unit.name] == 1):
            raise RuntimeError(f"boom in {unit.name}")
        return super().run(unit)


def test_a_failing_unit_is_retried_then_reported_while_the_rest_finish(demo, serial, tmp_path):
    data, bank = _inputs(demo)
    from recommender.study import study_train_config

    engine = Flaky(data, bank, study_train_config(TRAIN, STUDY), log=lambda m: None)
    summary = run_study(data, bank, TRAIN, STUDY, tmp_path, engine=engine, log=lambda m: None)
    assert engine.tries["id seed 0"] == 2 and engine.tries["fuse caption seed 0"] == 2  # study.retries = 1
    assert summary["units"] == {"units": 10, "skipped": 0, "ran": 9, "failed": 1}
    assert summary["missing"] == [{"unit": "fuse caption seed 0", "cell": "fuse caption", "seed": 0,
                                   "error": "RuntimeError: boom in fuse caption seed 0"}]
    md = (tmp_path / "results.md").read_text()
    assert "## Missing units" in md and "cells missing seeds: fuse caption" in md
    assert json.loads((tmp_path / "summary.json").read_text())["missing"][0]["cell"] == "fuse caption"
    got = _metrics(tmp_path)
    assert ("fuse caption", "0") not in got and len(got) == 9
    # the finished units equal the serial run's (but its replace cell: the best layer over 2 seeds may be another)
    ref = _metrics(serial[0])
    common = [k for k in got if k in ref]
    assert len(common) >= 8 and all(got[k] == ref[k] for k in common)
    rerun = run_study(data, bank, TRAIN, STUDY, tmp_path, log=lambda m: None)
    assert rerun["units"] == {"units": 10, "skipped": 9, "ran": 1, "failed": 0}


@pytest.mark.slow
def test_every_unit_on_worker_processes_equals_serial(demo, serial, tmp_path):
    data, bank = _inputs(demo)
    study = dataclasses.replace(STUDY, seeds=2, engine="processes", workers=2)
    summary = run_study(data, bank, TRAIN, study, tmp_path, log=lambda m: None)
    assert summary["units"]["ran"] == 20
    assert _metrics(tmp_path) == _metrics(serial[0])
    from recommender.engines import shared_folder

    assert not shared_folder(tmp_path, bank).exists()  # the mapped bank is removed at the end


ray = pytest.importorskip("ray")


@pytest.mark.slow
def test_a_worker_node_lost_mid_grid_reruns_its_units_elsewhere(demo, serial, tmp_path):
    """A local cluster: the driver on a head with no CPU, two 1-CPU worker nodes; one node is
    removed when the first unit comes back (the other node's unit, or the next, is then running on it)."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=1), cluster.add_node(num_cpus=1)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    removed = []

    def log(line: str) -> None:
        if "[1/" in line and not removed:
            cluster.remove_node(nodes[1])
            removed.append(line)

    try:
        data, bank = _inputs(demo)
        summary = run_study(data, bank, TRAIN, dataclasses.replace(STUDY, seeds=2, engine="ray"), tmp_path, log=log)
        assert ray.is_initialized()  # the engine leaves a connection it did not open
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert removed and summary["units"] == {"units": 20, "skipped": 0, "ran": 20, "failed": 0}
    assert _metrics(tmp_path) == _metrics(serial[0])


def _study_cmd(demo: Path, out: Path, *extra: str) -> list[str]:
    return [str(Path(sys.executable).with_name("mvrec")), "study", "-i", str(demo / "pairs.tsv"), "--synthetic-topics",
            str(demo / "corpus.json"), "--seeds", "2", "--epochs", "2", "-o", str(out), "--plain", *extra]


def _env(token: str) -> dict[str, str]:
    from processes import tagged_env

    return tagged_env(token, {**os.environ, "OMP_NUM_THREADS": "1", "MVREC_TRAIN__DIM": "16",
                              "MVREC_TRAIN__NUM_THREADS": "1", "MVREC_TRAIN__PATIENCE": "2",
                              "MVREC_TRAIN__MAX_SEQ_LEN": "10", "MVREC_STUDY__BATCH_SIZE": "64"})


@pytest.mark.slow
def test_a_killed_driver_resumes_with_only_the_unfinished_units(demo, serial, tmp_path, no_orphans):
    out = tmp_path / "study"
    env = _env(no_orphans)
    driver = subprocess.Popen(_study_cmd(demo, out, "--engine", "processes", "--workers", "2"), env=env, cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while len(list(out.glob("runs/*/seed*/unit.json"))) < 3:  # a few units saved, the rest not
            assert driver.poll() is None, "the study ended before it could be killed"
            time.sleep(0.2)
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=60)
    finally:
        driver.kill()
    saved = len(list(out.glob("runs/*/seed*/unit.json")))
    assert 3 <= saved < 20
    rerun = subprocess.run(_study_cmd(demo, out, "--engine", "processes", "--workers", "2"), env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"units: 20, skipped (finished earlier) {saved}, ran {20 - saved}, failed 0" in rerun.stdout
    assert _metrics(out) == _metrics(serial[0])
