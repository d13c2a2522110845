"""bench/study_scale.py: the schedule and projection arithmetic, and the whole bench at a tiny shape."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench" / "study_scale.py"


def _bench():
    spec = importlib.util.spec_from_file_location("study_scale", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_longest_first_schedule_and_the_projection():
    bench = _bench()
    assert bench.lpt([5, 4, 3, 3, 3], 2) == 10  # longest first, each to the emptier slot: 5+3 | 4+3+3
    assert bench.lpt([10, 1, 1], 4) == 10  # bounded by the longest unit
    assert bench.lpt([2] * 8, 4) == 4
    lines = bench.project(1.0, nodes=4, node_cores=16, gpus=8)
    assert len(lines) == 2 and all(line.startswith("PROJECTION") for line in lines)
    assert "126 units" in lines[0] and "102 units" in lines[1]


@pytest.mark.slow
def test_the_bench_runs_at_a_tiny_shape(tmp_path):
    cmd = [sys.executable, str(BENCH), "--users", "600", "--items", "200", "--layers", "3", "--cells", "2", "--dim",
           "16", "--seeds", "1", "--rounds", "1", "--ray-slots", "", "--kill-after", "1", "--work", str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    for line in ("serial         rounds 1", "processes x 2  rounds 1", "units identical to serial 2/2",
                 "CPUs this session gets", "PROJECTION 3B", "PROJECTION 7B"):
        assert line in out, line
    kill = next(line for line in out.splitlines() if line.startswith("driver SIGKILLed"))
    assert "the rerun skipped 1 and ran 1" in kill or "the rerun skipped 2 and ran 0" in kill, kill
