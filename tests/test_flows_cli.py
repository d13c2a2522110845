"""The flow commands as users run them: separate `mvrec` processes, a real Prefect server for `serve`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from mvrec.devtools.demo_data import make_demo_corpus
from file_opens import FileOpens
from mvrec.devtools.test_model import build_test_model
from video_clips import write_corrupt_files

MVREC = str(Path(sys.executable).with_name("mvrec"))
PREFECT = str(Path(sys.executable).with_name("prefect"))


def _run(args, env, timeout=600):
    return subprocess.run([MVREC, *args], env=env, capture_output=True, text=True, timeout=timeout)


def _env(tmp: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MVREC_", "PREFECT_"))}
    env.update({"HF_HUB_OFFLINE": "1", "MVREC_PREFECT__HOME": str(tmp / "prefect"), "COLUMNS": "200", **extra})
    return env


def test_refresh_names_a_missing_model_directory_before_starting(tmp_path):
    result = _run(["refresh", str(tmp_path), "--model", str(tmp_path / "no-such-model")], _env(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: extract.model: no model directory at {tmp_path / 'no-such-model'}"


def test_serve_needs_a_server_and_a_valid_cron(tmp_path):
    result = _run(["serve", str(tmp_path)], _env(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "PREFECT_API_URL" in result.stderr
    result = _run(["serve", str(tmp_path), "--cron", "every night"],
                  _env(tmp_path, PREFECT_API_URL="http://127.0.0.1:9/api"))
    assert result.returncode == 2 and "--cron" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_refresh_then_nothing_new_then_rerun_failed(tmp_path):
    make_demo_corpus(tmp_path / "corpus", videos=4, users=20, seed=5, max_duration_s=2.5)
    build_test_model(tmp_path / "model", layers=2)
    write_corrupt_files(tmp_path / "bad")
    videos = tmp_path / "corpus" / "videos"
    (videos / "broken.mp4").write_bytes((tmp_path / "bad" / "not_a_video.mp4").read_bytes())
    env = _env(tmp_path, MVREC_EXTRACT__MODEL=str(tmp_path / "model"), MVREC_STORE__PATH=str(tmp_path / "store"),
               MVREC_EXTRACT__FRAMES="uniform:4")

    for f in videos.iterdir():  # written over 2 s before hashing: stat signatures it can trust
        os.utime(f, ns=(time.time_ns() - 10**10,) * 2)

    first = _run(["refresh", str(videos)], env)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "TEST MODEL" in first.stderr  # every command that loads a test model says so
    assert "broken" in first.stdout and "captions embedded: 4" in first.stdout

    # Nothing changed: the change check trusts every file's recorded stat and opens none of them.
    watch = FileOpens(videos)
    second = _run(["refresh", str(videos)], env)
    assert watch.opened() == []
    assert second.returncode == 0
    assert "nothing new" in second.stdout and "4 videos already extracted" in second.stdout
    assert "change check: 5 unchanged by their stat, 0 read" in second.stdout

    # The broken file is replaced by a real video: rerun-failed picks up exactly that one.
    (videos / "broken.mp4").write_bytes(next(videos.glob("1.*")).read_bytes())
    rerun = _run(["rerun-failed", str(videos)], env)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "processed" in rerun.stdout and " 1 " in rerun.stdout.split("processed", 1)[1].splitlines()[0] + " "
    query = _run(["query", "SELECT count(DISTINCT video_id) AS n FROM hidden_states", "--format", "json"], env)
    assert json.loads(query.stdout)[0]["n"] == 5
    # The repaired video's caption is embedded too (issue 16, item 8).
    assert "captions embedded: 1" in rerun.stdout
    query = _run(["query", "SELECT count(*) AS n, count(text_embedding) AS embedded FROM captions",
                  "--format", "json"], env)
    assert json.loads(query.stdout) == [{"n": 5, "embedded": 5}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def _post(url: str, body: dict):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())


@pytest.mark.slow
def test_serve_registers_the_nightly_deployment_on_a_real_server(tmp_path):
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    server_env = {**_env(tmp_path), "PREFECT_HOME": str(tmp_path / "server-home"),
                  "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    server = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=server_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)  # its own group: stopping it stops its uvicorn too
    serve = None
    try:
        while True:  # until healthy (an event); pytest-timeout bounds the wait, no deadline here
            assert server.poll() is None, f"prefect server exited ({server.returncode})"
            try:
                _get(f"{api}/health")
                break
            except OSError:
                time.sleep(0.5)  # polling interval only
        serve = subprocess.Popen([MVREC, "serve", str(tmp_path), "--cron", "0 2 * * *"],
                                 env=_env(tmp_path, PREFECT_API_URL=api), stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, start_new_session=True)
        deployments = []
        while not deployments:  # until registered; pytest-timeout bounds the wait
            assert serve.poll() is None, serve.stdout.read()
            deployments = _post(f"{api}/deployments/filter", {})
            time.sleep(0.5)  # polling interval only
        (dep,) = deployments
        assert dep["name"] == "nightly"
        assert [s["schedule"]["cron"] for s in dep["schedules"]] == ["0 2 * * *"]
        assert dep["parameters"]["source"] == str(tmp_path)
    finally:
        for proc in (serve, server):
            if proc is None:
                continue
            for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, None)):  # the group: no child outlives it
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(timeout=wait)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    pass
