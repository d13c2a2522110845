"""bench/paper_scale.py: the SYNTHETIC inputs of the paper's shape, and the whole bench at a small shape."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench" / "paper_scale.py"


def _bench():
    spec = importlib.util.spec_from_file_location("paper_scale", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_synthetic_interactions_have_the_microlens_shape():
    seqs = _bench().synthetic_interactions(users=3000, items=800, mean_len=7.19, seed=0)
    lengths = np.array([len(s) for s in seqs.values()])
    counts = np.bincount([int(i[1:]) for s in seqs.values() for i in s], minlength=800)
    assert len(seqs) == 3000 and lengths.min() >= 5 and abs(lengths.mean() - 7.19) < 0.15
    assert (counts >= 1).all() and len(counts) == 800  # every item appears
    top = np.sort(counts)[::-1]
    assert top[:8].sum() > 0.15 * counts.sum() and np.median(counts) < counts.mean() / 2  # long-tailed
    assert seqs == _bench().synthetic_interactions(users=3000, items=800, mean_len=7.19, seed=0)


def test_the_store_holds_the_synthetic_features_as_extraction_writes_them(tmp_path):
    from storage import FeatureStore

    write = _bench().write_store(tmp_path / "store", items=30, layers=3, dim=8, commit_size=7, seed=0)
    store = FeatureStore(tmp_path / "store", create=False)
    [ext] = store.extractors()
    assert ext["extractor_id"] == write["extractor_id"] and ext["model"].startswith("SYNTHETIC")
    assert (ext["dim"], ext["num_layers"]) == (8, 3) and write["commits"] == 5
    assert store.layers(write["extractor_id"]) == [0, 1, 2]
    assert len(store.completed(write["extractor_id"])) == 30
    m = store.layer_matrix(write["extractor_id"], 1, [f"v{i:05d}" for i in range(30)])
    assert m.values.shape == (30, 8) and abs(m.values.std() - 1) < 0.2  # seeded N(0, 1)
    runs = store.read("runs").to_pylist()
    assert [r["status"] for r in runs] == ["completed"] and json.loads(runs[0]["params"])["synthetic"]


@pytest.mark.slow
def test_the_bench_runs_end_to_end_at_a_small_shape(tmp_path):
    cmd = [sys.executable, str(BENCH), "--items", "120", "--layers", "3", "--dim", "16", "--users", "400",
           "--steps", "2", "--work", str(tmp_path / "work")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    assert "SYNTHETIC features" in out and "120 items x 3 layers x 16" in out
    for line in ("write:", "one DFF step over every item", "train dff, features float32",
                 "train dff, features bfloat16", "grid before", "grid after", "paper grid: 8 cells",
                 "PROJECTED epoch", "PROJECTION, a LOWER BOUND, no GPU used"):
        assert line in out, line
    before = next(l for l in out.splitlines() if l.startswith("grid before"))
    after = next(l for l in out.splitlines() if l.startswith("grid after"))
    assert "4 load(s)" in before and "1 load(s)" in after
    results = (tmp_path / "work" / "study-after" / "results.csv").read_text()
    assert all(cell in results for cell in ("id", "fuse hidden:1", "fuse hidden:2", "dff hidden:0,1,2"))
