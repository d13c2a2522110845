"""Run reports as Prefect artifacts: the markdown builders as plain functions, and artifacts
published by flow runs read back through the Prefect client from a real Prefect server started
on loopback (stopped, with its process group, when the module's tests end)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from flows.report import extract_markdown, failure_groups, study_markdown

SUMMARY = {
    "run_id": "20261201T020000-ab12", "extractor_id": "e" * 16, "discovered": 10, "processed": 6,
    "skipped_done": 1, "skipped_broken": 1, "failed": 2, "partial": 1, "seconds": 3.0, "lvlm_batches": 2,
    "failures": [{"video_id": "a", "uri": "/v/a.mp4", "stage": "decode", "error_type": "Unreadable"},
                 {"video_id": "b", "uri": "/v/b|x.mp4", "stage": "quality", "error_type": "NonFiniteEmbedding"}],
    "versions": {"videos": 4, "hidden_states": 7},
    "norms": {"0": {"count": 6, "mean": 1.5, "std": 0.1, "min": 1.2, "max": 1.7}, "-1": {"count": 6, "mean": 8.0,
                                                                                      "std": 0.5, "min": 7, "max": 9}},
}


def test_extract_markdown_has_counts_failures_versions_rate_and_norms():
    md = extract_markdown(SUMMARY)
    assert "| 10 | 6 | 1 | 1 | 2 | 1 |" in md  # discovered .. partial, in the header's order
    assert "**2.00 videos/s**" in md
    assert "| decode | Unreadable | 1 | /v/a.mp4 |" in md
    assert "| quality | NonFiniteEmbedding | 1 | /v/b\\|x.mp4 |" in md  # a | in a path cannot break the table
    assert "| hidden_states | 7 |" in md and "| videos | 4 |" in md
    assert md.index("| final | 6 | 8 |") < md.index("| 0 | 6 | 1.5 |")  # layers in order, final (-1) first


def test_extract_markdown_of_an_empty_run():
    md = extract_markdown({"run_id": "r", "seconds": 0.0})
    assert "0.00 videos/s" in md and "None." in md and "No commit." in md


def test_failure_groups_keep_the_first_paths_of_the_largest_group_first():
    fails = [{"stage": "decode", "error_type": "Unreadable", "uri": f"/v/{i}.mp4"} for i in range(5)]
    fails.append({"stage": "model", "error_type": "BackendOOM", "video_id": "x"})
    assert failure_groups(fails) == [("decode", "Unreadable", 5, ["/v/0.mp4", "/v/1.mp4", "/v/2.mp4"]),
                                     ("model", "BackendOOM", 1, ["x"])]


def test_study_markdown_carries_the_results_table_and_plot_paths(tmp_path):
    (tmp_path / "results.md").write_text("# Study results\n\n| cell | seeds |\n|---|---|\n| id | 3 |\n")
    result = {"files": {"results_md": str(tmp_path / "results.md"), "hr10_by_layer": "/s/hr10_by_layer.png"}}
    md = study_markdown(result)
    assert "| id | 3 |" in md and "| hr10_by_layer | /s/hr10_by_layer.png |" in md


# --- a real Prefect server on loopback ---------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """`prefect server start` on 127.0.0.1:<free port> with its own PREFECT_HOME; yields the API URL."""
    home = tmp_path_factory.mktemp("prefect-server-home")
    port = _free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "false", "PREFECT_API_URL": ""}
    log = open(home / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # its own process group: stopped as a whole below
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 120
        while True:  # wait for the health endpoint (an event), not a fixed sleep
            if proc.poll() is not None:
                raise RuntimeError(f"prefect server exited: {(home / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("prefect server did not become healthy in 120 s") from None
                time.sleep(0.25)  # polling interval only; nothing is asserted on time
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()
        try:  # nothing of the group may outlive the fixture
            os.killpg(proc.pid, 0)
            leaked = True
        except ProcessLookupError:
            leaked = False
        assert not leaked, "prefect server left processes behind"


@pytest.fixture()
def against(prefect_server):
    from prefect.settings import PREFECT_API_URL, PREFECT_LOGGING_TO_API_ENABLED, temporary_settings

    # Logs stay local: their background sender would otherwise outlive the server at exit.
    with temporary_settings({PREFECT_API_URL: prefect_server, PREFECT_LOGGING_TO_API_ENABLED: False}):
        yield prefect_server


def read_artifacts(key: str) -> list:
    """Artifacts of `key`, newest first, through the Prefect client."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    async def go():
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                                               sort=ArtifactSort.CREATED_DESC)

    return asyncio.run(go())


def test_a_published_report_is_read_back_from_the_server(against):
    from prefect import flow

    from flows.report import publish

    @flow(name="report-probe")
    def probe() -> str:
        publish("extract-report-probe", extract_markdown(SUMMARY), "probe")
        from prefect.runtime import flow_run

        return flow_run.id

    run_id = probe()
    (art,) = read_artifacts("extract-report-probe")
    assert art.type == "markdown" and str(art.flow_run_id) == str(run_id)
    assert art.data == extract_markdown(SUMMARY)
