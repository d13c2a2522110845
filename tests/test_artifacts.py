"""Run reports as Prefect artifacts: the markdown builders as plain functions, and artifacts
published by flow runs read back through the Prefect client from a real Prefect server started
on loopback (the session's test harness)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from flows.report import extract_markdown, failure_groups, study_markdown
from video_clips import damage_after, encode_clip

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


@pytest.fixture()
def against(prefect_harness):
    """The session's Prefect API: a real server (uvicorn in a subprocess on 127.0.0.1) started by
    Prefect's test harness. One server for the whole session, because Prefect's background services
    (events, concurrency leases) are process-wide and would keep calling a second server after it stopped."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    assert url and url.startswith("http://127.0.0.1:"), url
    return url


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


# --- the extract and refresh flows against that server, with the test model ------------------


class DamagingBackend:
    """The real transformers backend (test model) whose pooled vectors are damaged after the
    forward pass for chosen videos: a healthy model gives no NaN, Inf, zero or wrong-size vector,
    so the damage is applied at the backend's output, the boundary the gate checks."""

    name = "transformers"

    def __init__(self, inner, damage):
        self.inner, self.damage, self.info = inner, damage, inner.info

    def extract_prepared(self, batch):  # the data plane's replicas call this (decode workers ran the processor)
        out = self.inner.extract_prepared(batch)
        for f in out:
            if f.video_id in self.damage:
                f.hidden = self.damage[f.video_id](f.hidden.copy())
        return out

    def close(self):
        self.inner.close()


def _nan(h):
    h[0, 3] = np.nan  # one value of layer 0
    return h


def _inf(h):
    h[-1, 0] = np.inf  # final layer
    return h


DAMAGE = {"1": _nan, "2": _inf, "3": lambda h: np.zeros_like(h), "4": lambda h: h[:, :-1]}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from mvrec.devtools.demo_data import make_demo_corpus
    from mvrec.devtools.test_model import build_test_model

    root = tmp_path_factory.mktemp("artifact-flows")
    make_demo_corpus(root / "corpus", videos=8, users=20, seed=4, max_duration_s=3.0)
    build_test_model(root / "model", layers=2)
    good = encode_clip(root / "clip50.mp4", frames=50, fps=10)
    damage_after(good, root / "corpus" / "videos" / "corrupted.mp4", 28)  # decord's corrupted.mp4 case
    return root


def _damaging(monkeypatch):
    import tasks.dataplane as plane
    from tasks.lvlm import load_backend

    monkeypatch.setattr(plane, "load_backend", lambda name, spec: DamagingBackend(load_backend(name, spec), DAMAGE))


def _overrides(corpus: Path, store: Path, **extra) -> dict:
    return {"extract.model": str(corpus / "model"), "store.path": str(store), "extract.batch_size": 4,
            "extract.commit_size": 8, "extract.frames": "uniform:4", **extra}


@pytest.mark.slow
def test_extract_run_gates_embeddings_flags_partial_and_publishes_its_report(against, corpus, tmp_path, monkeypatch):
    from flows.extract import extract_features
    from storage import FeatureStore

    _damaging(monkeypatch)
    summary = extract_features(str(corpus / "corpus" / "videos"), overrides=_overrides(corpus, tmp_path / "store"))
    # 9 files: 4 damaged by the backend fail the gate, the other 5 commit (corrupted.mp4 among them, partial)
    assert (summary["discovered"], summary["processed"], summary["failed"], summary["partial"]) == (9, 5, 4, 1)
    store = FeatureStore(tmp_path / "store", create=False)
    fails = {f["video_id"]: (f["stage"], f["error_type"], f["permanent"]) for f in store.failures()}
    assert fails == {"1": ("quality", "NonFiniteEmbedding", True), "2": ("quality", "NonFiniteEmbedding", True),
                     "3": ("quality", "ZeroNormEmbedding", True), "4": ("quality", "WrongDimension", True)}
    assert {v for v, _ in store.completed(summary["extractor_id"])} == {"5", "6", "7", "8", "corrupted"}
    videos = {r["video_id"]: r for r in store.read("videos").to_pylist()}
    bad = videos["corrupted"]
    assert bad["partial"] is True and bad["frame_count"] < 50 and bad["duration_s"] == pytest.approx(
        bad["frame_count"] / 10)
    assert all(r["partial"] is False for v, r in videos.items() if v != "corrupted")
    (run,) = store.read("runs").to_pylist()
    assert dict(run["counts"])["partial"] == 1
    norms = json.loads(run["stats"])["norms"]
    assert set(norms) == {"-1", "0", "1", "2"} and all(s["count"] == 5 for s in norms.values())

    (art,) = read_artifacts("extract-features")
    md = art.data
    assert f"Extraction run `{summary['run_id']}`" in md
    assert "| 9 | 5 | 0 | 0 | 4 | 1 |" in md  # discovered, extracted, skipped x2, failed, partial
    assert "| quality | NonFiniteEmbedding | 2 |" in md and "| quality | ZeroNormEmbedding | 1 |" in md
    assert "| hidden_states |" in md and "videos/s" in md and "| final | 5 |" in md

    from flows.extract import extract_features as again  # a second run: nothing new, broken ones skipped
    second = again(str(corpus / "corpus" / "videos"), overrides=_overrides(corpus, tmp_path / "store"))
    assert (second["processed"], second["skipped_done"], second["skipped_broken"]) == (0, 5, 4)
    newest = read_artifacts("extract-features")[0]
    assert newest.id != art.id and "| 9 | 0 | 5 | 4 | 0 | 0 |" in newest.data


@pytest.mark.slow
def test_partial_videos_become_failures_under_the_switch(against, corpus, tmp_path):
    from flows.extract import extract_features
    from storage import FeatureStore

    only = tmp_path / "one"
    only.mkdir()
    shutil.copy(corpus / "corpus" / "videos" / "corrupted.mp4", only / "corrupted.mp4")
    summary = extract_features(str(only), overrides=_overrides(corpus, tmp_path / "store", **{"extract.partial": "fail"}))
    assert (summary["processed"], summary["failed"], summary["partial"]) == (0, 1, 0)
    (f,) = FeatureStore(tmp_path / "store", create=False).failures()
    assert (f["stage"], f["error_type"], f["permanent"]) == ("decode", "PartialVideo", True)
    assert "of the 50 frames the header promises" in f["message"]


@pytest.mark.slow
def test_refresh_publishes_its_report(against, corpus, tmp_path):
    from flows.refresh import nightly_refresh

    only = tmp_path / "two"
    only.mkdir()
    for v in ("5", "6"):
        src = next((corpus / "corpus" / "videos").glob(f"{v}.*"))
        shutil.copy(src, only / src.name)
    ov = _overrides(corpus, tmp_path / "store")
    result = nightly_refresh(str(only), overrides=ov)
    (art,) = read_artifacts("nightly-refresh")[:1]
    assert f"Extraction run `{result['extract']['run_id']}`" in art.data and "| 2 | 2 | 0 | 0 | 0 | 0 |" in art.data
    assert f"Caption vectors added: {result['captions_embedded']}" in art.data
    assert "## Store maintenance" in art.data and "No table past its thresholds" in art.data
    # nothing new: no extraction run, still a report; the store maintained past a low threshold
    again = nightly_refresh(str(only), overrides={**ov, "store.maintain_max_versions": 1})
    newest = read_artifacts("nightly-refresh")[0]
    assert "Nothing new to extract" in newest.data and "| 2 | 0 | 2 | 0 | 0 | 0 |" in newest.data
    assert again["maintenance"]["hidden_states"]["action"] == "maintained"
    assert "| hidden_states | maintained |" in newest.data


@pytest.mark.slow
def test_study_publishes_its_results_table_and_plots(against, tmp_path):
    from flows.study import study_flow
    from mvrec.config import StudyConfig, TrainConfig
    from recommender.pipeline import FeatureSpec
    from recommender.synthetic import planted

    seqs, feats = planted(60, 30, n_topics=4, layer_signal=(0.0, 1.0), dim=8, seed=0)
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("".join(f"{u}\t{' '.join(s)}\n" for u, s in seqs.items()))
    ids = list(feats)
    np.savez(tmp_path / "hidden.npz", item_ids=np.array(ids), features=np.stack([feats[i] for i in ids]),
             layers=np.array([0, -1]))
    result = study_flow(str(pairs), FeatureSpec(features=str(tmp_path / "hidden.npz")),
                        train_cfg=TrainConfig(dim=8, num_threads=1, patience=1),
                        study_cfg=StudyConfig(seeds=1, max_epochs=1, batch_size=64, representations="id,fuse"),
                        out_dir=str(tmp_path / "study"))
    (art,) = read_artifacts("study")
    assert art.data.startswith("# Study results") and "| fuse hidden:0 |" in art.data
    assert f"| hr10_by_layer | {result['files']['hr10_by_layer']} |" in art.data
    assert (tmp_path / "study" / "results.md").read_text() in art.data
