"""A real multi-process Ray cluster, started the way users start one: `ray start --head` and
`ray start --address HEAD` as separate processes, then `mvrec refresh --engine ray --ray-address
HEAD` as a third, with the local test model. Both nodes are torn down by their process ids (never
`ray stop`, which stops every Ray on the machine) and no process is left behind.

The worker node declares one GPU it does not have (FAKE: this machine has none) and no CPU; the
head has the only CPU. So the replica can only be placed on the worker and decoding only on the
head: frames cross from one node's object store to the other's, and the run proves both joined.
The replica runs the test model on the worker's CPU (torch sees no CUDA there).
"""

from __future__ import annotations

import json
import os
import shutil
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from mvrec.devtools.demo_data import make_demo_corpus
from mvrec.devtools.test_model import build_test_model
from processes import survivors, tagged, tagged_env

pytest.importorskip("ray")

BIN = Path(sys.executable).parent
VIDEOS = 6


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _node_ports() -> list[str]:
    """Every port a node listens on, chosen free, so that no other Ray on this machine collides."""
    names = ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
             "--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port")
    ports = [f"{name}={port}" for name, port in zip(names, _free_ports(len(names)), strict=True)]
    return ["--node-ip-address=127.0.0.1", *ports]  # the address the driver and the worker dial


def _ray(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), "start", *args], env=env, capture_output=True, text=True, timeout=300)


def _stop(token: str) -> int:
    """Stop this test's Ray processes (found by the token in their environment) by pid: SIGTERM,
    then SIGKILL for those still there after 30 s. Returns how many needed SIGKILL."""
    for p in tagged(token):
        try:
            os.kill(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    left = survivors(token, grace_s=30)
    for p in left:
        try:
            os.kill(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(left)


@pytest.mark.slow
def test_mvrec_refresh_through_a_ray_cluster_of_separate_processes(tmp_path, no_orphans):
    make_demo_corpus(tmp_path / "corpus", videos=VIDEOS, users=20, seed=7, max_duration_s=2.0)
    build_test_model(tmp_path / "model", layers=2)
    temp = tempfile.mkdtemp(prefix="mvr", dir="/tmp")  # Ray's socket paths must stay short
    gcs, client = _free_ports(2)
    address = f"127.0.0.1:{gcs}"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MVREC_", "PREFECT_", "RAY_"))}
    # Ray's head turns token authentication on by itself; every node and the driver carry the token.
    env = tagged_env(no_orphans, {**base, "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
                                  "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)})
    started = time.perf_counter()
    try:
        head = _ray(["--head", f"--port={gcs}", f"--ray-client-server-port={client}", f"--temp-dir={temp}",
                     "--num-cpus=1", "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats",
                     *_node_ports()], env)
        assert head.returncode == 0, head.stdout[-2000:] + head.stderr[-2000:]
        worker = _ray([f"--address={address}", "--num-cpus=0", "--num-gpus=1", "--disable-usage-stats",
                       *_node_ports()], env)  # the FAKE GPU: where the replica must go
        assert worker.returncode == 0, worker.stdout[-2000:] + worker.stderr[-2000:]

        run_env = {**env, "MVREC_PREFECT__HOME": str(tmp_path / "prefect"), "MVREC_EXTRACT__FRAMES": "uniform:4",
                   "MVREC_EXTRACT__BATCH_SIZE": "2", "MVREC_EXTRACT__DECODE_WORKERS": "1", "COLUMNS": "200"}
        refresh = subprocess.run(
            [str(BIN / "mvrec"), "refresh", str(tmp_path / "corpus" / "videos"), "--engine", "ray",
             "--ray-address", address, "--model", str(tmp_path / "model"), "--store", str(tmp_path / "store")],
            env=run_env, capture_output=True, text=True, timeout=600)
        ran_s = time.perf_counter() - started
        assert refresh.returncode == 0, refresh.stdout[-3000:] + refresh.stderr[-3000:]
        query = subprocess.run(
            [str(BIN / "mvrec"), "query", "SELECT count(DISTINCT video_id) AS n FROM hidden_states", "--format",
             "json"], env={**run_env, "MVREC_STORE__PATH": str(tmp_path / "store")}, capture_output=True, text=True,
            timeout=300)
        assert json.loads(query.stdout) == [{"n": VIDEOS}], query.stdout + query.stderr
        assert f"captions embedded: {VIDEOS}" in refresh.stdout
    finally:
        killed = _stop(no_orphans)  # the no_orphans fixture then checks that none is left
        shutil.rmtree(temp, ignore_errors=True)
    print(f"\ncluster start + mvrec refresh of {VIDEOS} videos: {ran_s:.1f} s; torn down in "
          f"{time.perf_counter() - started - ran_s:.1f} s more ({killed} process(es) needed SIGKILL)")
