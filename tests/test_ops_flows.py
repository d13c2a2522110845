"""Operating the nightly refresh end to end, in separate `mvrec` processes with the test model:
the demo's trained run serves `mvrec recommend`, and `mvrec status` reads the demo store."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

MVREC = str(Path(sys.executable).with_name("mvrec"))


def _env(tmp: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MVREC_", "PREFECT_"))}
    env.update({"HF_HUB_OFFLINE": "1", "COLUMNS": "200", "MVREC_TRAIN__MAX_EPOCHS": "3", **extra})
    return env


def _run(args, cwd: Path, env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([MVREC, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_demo_then_recommend_for_user_17_then_status(tmp_path):
    env = _env(tmp_path)  # embedded defaults: ./.mvrec/store, ./.mvrec/runs, ./.mvrec/prefect under cwd
    demo = _run(["demo", "--videos", "12", "--users", "40"], tmp_path, env)
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert "mvrec recommend --user 17" in demo.stdout  # the closing hint names it
    assert list((tmp_path / ".mvrec" / "runs").glob("*/best.pt")), "the demo trains where recommend looks"

    rec = _run(["recommend", "--user", "17"], tmp_path, env)
    assert rec.returncode == 0, rec.stderr
    assert re.search(r"top (\d+) for user 17 \(\.mvrec/runs/", rec.stdout)  # 12 videos: fewer than 10 unseen

    status = _run(["status", "--json"], tmp_path, env)
    assert status.returncode == 0, status.stderr
    s = json.loads(status.stdout)
    (e,) = s["extractors"]
    assert e["videos_done"] == 12 and s["runs"][0]["status"] == "completed"
    assert s["changed_files"]["count"] == 0
