"""The quality gate at commit: every failure class (NaN, Inf, wrong dimension, zero norm) turns
its video into a failure row with the reason, the rest of the batch commits, and per-layer norm
statistics are kept. Real Delta stores; nothing is mocked."""

from __future__ import annotations

import numpy as np
import pytest

from storage import CaptionRow, ExtractionBatch, FeatureStore, HiddenStateRow, VideoRow
from storage.quality import (
    NON_FINITE, WRONG_DIM, ZERO_NORM, LayerNorms, NormStats, check_embedding, gate_batch,
)

D, LAYERS, EID = 8, [0, 1, -1], "e1"


def _batch(bad: dict[str, tuple[int, np.ndarray]]) -> ExtractionBatch:
    """Videos v0..v4; bad = {video: (layer, embedding)} replaces one layer's vector."""
    vids = [f"v{i}" for i in range(5)]
    states = []
    for v in vids:
        for k in LAYERS:
            vec = np.full(D, 2.0 + k, np.float32)  # final: 1, layer 0: 2, layer 1: 3
            if v in bad and bad[v][0] == k:
                vec = bad[v][1]
            states.append(HiddenStateRow(v, f"sha-{v}", EID, k, vec))
    return ExtractionBatch(videos=[VideoRow(v, f"/d/{v}.mp4", f"sha-{v}") for v in vids],
                           captions=[CaptionRow(v, f"sha-{v}", EID, f"caption {v}") for v in vids],
                           hidden_states=states)


def _nan(d=D):
    v = np.ones(d, np.float32)
    v[3] = np.nan
    return v


def _inf(d=D):
    v = np.ones(d, np.float32)
    v[0] = -np.inf
    return v


@pytest.mark.parametrize("vec, reason", [
    (_nan(), NON_FINITE), (_inf(), NON_FINITE), (np.ones(D + 1, np.float32), WRONG_DIM),
    (np.ones(0, np.float32), WRONG_DIM), (None, WRONG_DIM), (np.zeros(D, np.float32), ZERO_NORM),
])
def test_each_failure_class_is_named(vec, reason):
    assert check_embedding(vec, D)[0] == reason
    assert check_embedding(np.ones(D, np.float32), D) is None
    assert check_embedding(np.full(D, 1e-30, np.float32), D) is None  # tiny but not zero


def test_bad_videos_become_failures_and_the_rest_of_the_batch_commits(tmp_path):
    store = FeatureStore(tmp_path / "store")
    bad = {"v1": (0, _nan()), "v2": (-1, _inf()), "v3": (1, np.ones(D - 2, np.float32)),
           "v4": (0, np.zeros(D, np.float32))}
    gated = gate_batch(_batch(bad), dim=D, run_id="r1")
    assert {f.video_id: f.error_type for f in gated.rejected} == {
        "v1": NON_FINITE, "v2": NON_FINITE, "v3": WRONG_DIM, "v4": ZERO_NORM}
    by_id = {f.video_id: f for f in gated.rejected}
    assert by_id["v1"].message == "layer 0: 1 NaN and 0 Inf of 8 values"
    assert by_id["v2"].message.startswith("layer final: 0 NaN and 1 Inf")
    assert by_id["v3"].message == "layer 1: dimension 6, expected 8"
    assert all(f.stage == "quality" and f.run_id == "r1" and f.extractor_id == EID and f.uri.endswith(".mp4")
               and f.content_sha256 == f"sha-{f.video_id}" for f in gated.rejected)

    store.write_batch(gated.batch)
    assert store.completed(EID) == {("v0", "sha-v0")}
    assert {r["video_id"] for r in store.read("videos").to_pylist()} == {"v0"}
    assert {r["video_id"] for r in store.read("captions").to_pylist()} == {"v0"}
    assert {(f["video_id"], f["error_type"]) for f in store.failures()} == {
        ("v1", NON_FINITE), ("v2", NON_FINITE), ("v3", WRONG_DIM), ("v4", ZERO_NORM)}
    # v0 committed, and the good layers of the bad videos did not sneak in
    assert store.layer_matrix(EID, 0, ["v0", "v1"], strict=False).present.tolist() == [True, False]


def test_a_clean_batch_passes_unchanged_with_norm_statistics():
    batch = _batch({})
    gated = gate_batch(batch, dim=D)
    assert gated.batch is batch and gated.rejected == []
    s = gated.norms.summary()
    assert list(s) == ["-1", "0", "1"]  # final first, in layer order
    assert s["0"] == {"count": 5, "mean": pytest.approx(2 * np.sqrt(D)), "std": 0.0,
                      "min": pytest.approx(2 * np.sqrt(D)), "max": pytest.approx(2 * np.sqrt(D))}
    assert s["1"]["mean"] == pytest.approx(3 * np.sqrt(D)) and s["-1"]["mean"] == pytest.approx(np.sqrt(D))


def test_norm_statistics_merge_across_batches():
    a, b = LayerNorms(), LayerNorms()
    for x in (1.0, 3.0):
        a.add(0, x)
    b.add(0, 5.0)
    b.add(-1, 2.0)
    a.merge(b)
    assert a.summary()["0"] == {"count": 3, "mean": 3.0, "std": pytest.approx(np.sqrt(8 / 3), abs=1e-6),
                                "min": 1.0, "max": 5.0}
    assert a.summary()["-1"]["count"] == 1 and NormStats().summary() == {"count": 0}
