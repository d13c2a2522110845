"""The transformers backend and extract_videos on a locally built test model and real encoded files."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pytest

from mvrec.devtools.test_model import build_test_model
from tasks.decode import decode
from tasks.extract import extract_videos
from tasks.lvlm import FINAL_LAYER, BackendOOM, ExtractSpec, LVLMBackend, layer_rows, load_backend
from tasks.lvlm_transformers import TransformersBackend, pool, pooling_weights
from video_clips import bad_files, encode_clip

DECODE = {"policy": "fps:4", "max_frames": 8}


def reference_pooled(model, inputs: dict, pooling: str, layers: Sequence[int]) -> np.ndarray:
    """(B, len(layers), D) pooled straight from `output_hidden_states` of plain forward passes.

    An independent route to the numbers the backend's hooks produce. transformers puts the
    post-norm state in its last entry; with `tie_last_hidden_states=False` the last entry is
    the last decoder layer's own output (pre-norm), so two forwards give all L + 2 states.
    """
    import torch

    text_config = model.config.get_text_config()
    num_layers = text_config.num_hidden_layers
    with torch.inference_mode():
        tied = model(**inputs, output_hidden_states=True).hidden_states  # [-1] = after the norm
        old = getattr(text_config, "tie_last_hidden_states", None)
        text_config.tie_last_hidden_states = False
        try:
            untied = model(**inputs, output_hidden_states=True).hidden_states  # [-1] = layer L
        finally:
            text_config.tie_last_hidden_states = old
    assert len(untied) == num_layers + 1, f"expected {num_layers + 1} hidden states, got {len(untied)}"
    stack = list(untied) + [tied[-1]]  # rows 0..L, L+1 = final
    w = pooling_weights(inputs["input_ids"], inputs["attention_mask"], pooling, model.config.video_token_id)
    rows = layer_rows(layers, num_layers)
    return torch.stack([pool(stack[r], w) for r in rows], dim=1).cpu().numpy()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Four videos of different lengths and sizes (different token counts), one AV1, one rotated."""
    d = tmp_path_factory.mktemp("videos")
    return [
        encode_clip(d / "a.mp4", "libx264", 224, 160, frames=6, fps=6, seed=1),  # 1 s -> 4 frames
        encode_clip(d / "b.mkv", "mpeg4", 160, 288, frames=24, fps=12, seed=2),  # 2 s -> 8 frames
        encode_clip(d / "c.mp4", "libsvtav1", 192, 192, frames=18, fps=12, seed=3),  # 1.5 s -> 6 frames
        encode_clip(d / "d.mp4", "libx264", 224, 112, frames=12, fps=12, rotation=90, seed=4),  # 1 s -> 4 frames
    ]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    return {arch: build_test_model(d / arch, arch=arch) for arch in ("qwen2_5_vl", "qwen3_vl")}


@pytest.fixture(scope="module")
def backend(model_dirs):
    b = TransformersBackend(ExtractSpec(model=str(model_dirs["qwen2_5_vl"]), max_new_tokens=6))
    yield b
    b.close()


@pytest.fixture(scope="module")
def videos(corpus):
    return [decode(p, **DECODE) for p in corpus]


def test_backend_satisfies_the_interface(backend):
    assert isinstance(backend, LVLMBackend)
    info = backend.info
    assert (info.arch, info.num_layers, info.hidden_size, info.is_test_model) == ("qwen2_5_vl", 4, 128, True)
    assert info.dtype == "float32" and info.device == "cpu" and info.revision.startswith("local-")


def test_alone_equals_inside_a_left_padded_batch(backend, videos):
    batch = backend.extract(videos)
    counts = [f.n_prompt_tokens for f in batch]
    assert len(set(counts)) > 1, "the batch must need padding"
    assert [f.video_id for f in batch] == ["a", "b", "c", "d"]
    for video, in_batch in zip(videos, batch, strict=True):
        alone = backend.extract([video])[0]
        assert in_batch.hidden.shape == (4 + 2, 128) and in_batch.hidden.dtype == np.float32
        assert in_batch.layers == [0, 1, 2, 3, 4, FINAL_LAYER]
        np.testing.assert_allclose(alone.hidden, in_batch.hidden, atol=1e-5, rtol=0)
        assert alone.caption == in_batch.caption and alone.n_new_tokens == in_batch.n_new_tokens
        assert alone.n_video_tokens == in_batch.n_video_tokens > 0


@pytest.mark.parametrize("pooling", ["video", "prompt", "last"])
def test_pooled_layers_equal_output_hidden_states(model_dirs, videos, pooling):
    b = TransformersBackend(ExtractSpec(model=str(model_dirs["qwen2_5_vl"]), max_new_tokens=2, pooling=pooling))
    try:
        got = np.stack([f.hidden for f in b.extract(videos)])
        ref = reference_pooled(b.model, b.prepare(videos), pooling, b.layers)
    finally:
        b.close()
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    # the pre-norm last layer and the post-norm final state really differ
    assert np.abs(got[:, -2] - got[:, -1]).max() > 1e-3


def test_layer_selection_picks_rows_of_all(model_dirs, backend, videos):
    full = backend.extract(videos[:2])
    b = TransformersBackend(ExtractSpec(model=str(model_dirs["qwen2_5_vl"]), max_new_tokens=6, layers="0,2,final"))
    try:
        some = b.extract(videos[:2])
    finally:
        b.close()
    for f, s in zip(full, some, strict=True):
        assert s.layers == [0, 2, FINAL_LAYER]
        np.testing.assert_allclose(s.hidden, f.hidden[[0, 2, 5]], atol=1e-6, rtol=0)
        assert s.caption == f.caption


def test_two_pass_mode_matches_one_pass(model_dirs, backend, videos):
    one = backend.extract(videos)
    b = TransformersBackend(ExtractSpec(model=str(model_dirs["qwen2_5_vl"]), max_new_tokens=6,
                                        options={"mode": "two_pass"}))
    try:
        two = b.extract(videos)
    finally:
        b.close()
    for x, y in zip(one, two, strict=True):
        np.testing.assert_allclose(x.hidden, y.hidden, atol=1e-6, rtol=0)
        assert x.caption == y.caption


def test_same_input_twice_is_identical(model_dirs, backend, videos):
    first = backend.extract(videos)
    second = backend.extract(videos)
    fresh = load_backend("transformers", ExtractSpec(model=str(model_dirs["qwen2_5_vl"]), max_new_tokens=6))
    try:
        third = fresh.extract(videos)
    finally:
        fresh.close()
    for a, b, c in zip(first, second, third, strict=True):
        assert np.array_equal(a.hidden, b.hidden) and np.array_equal(a.hidden, c.hidden)
        assert a.caption == b.caption == c.caption
        assert a.n_new_tokens == b.n_new_tokens > 0


def test_bad_files_become_failures_and_the_rest_succeed(backend, corpus, tmp_path):
    bad = bad_files(tmp_path, corpus[0])
    paths = [corpus[0], bad["zero"], corpus[1], bad["truncated"], bad["text"], corpus[2], corpus[3]]
    progress = []
    results, failures = extract_videos(paths, backend, batch_size=2, decode_kwargs=DECODE,
                                       on_progress=lambda done, failed, total: progress.append((done, failed, total)))
    assert [r.features.video_id for r in results] == ["a", "b", "c", "d"]
    by_name = {f.video_id: f for f in failures}
    assert set(by_name) == {"zero", "truncated", "text"}
    for f in failures:
        assert f.stage == "decode" and f.error_type == "Unreadable" and f.message and f.permanent
    assert "0 bytes" in by_name["zero"].message
    assert progress[-1] == (7, 3, 7)
    alone = backend.extract([decode(corpus[1], **DECODE)])[0]
    np.testing.assert_allclose(results[1].features.hidden, alone.hidden, atol=1e-5, rtol=0)


def test_videos_prepared_one_at_a_time_collate_to_the_processors_batch(model_dirs, videos):
    """Decode workers run the processor per video; the replica pads and concatenates. That must be
    exactly what the processor gives for the whole batch, for both model families."""
    import torch

    from tasks.lvlm_transformers import processor_metadata

    for arch in ("qwen2_5_vl", "qwen3_vl"):
        b = TransformersBackend(ExtractSpec(model=str(model_dirs[arch]), max_new_tokens=0))
        try:
            whole = b.processor(text=[b.preprocessor.prompt_text] * len(videos), videos=[v.frames for v in videos],
                                video_metadata=[processor_metadata(v.meta) for v in videos], do_sample_frames=False,
                                padding=True, return_tensors="pt")
            collated = b.collate([b.preprocessor.preprocess(v) for v in videos])
            assert sorted(collated) == sorted(k for k, v in whole.items() if isinstance(v, torch.Tensor))
            for key, value in collated.items():
                assert torch.equal(value, whole[key].to(value.dtype)), f"{arch}: {key} differs"
        finally:
            b.close()


class _SmallMemory:
    """Stands in for a GPU running out of memory, which cannot happen on this CPU machine: batches
    larger than `fits` raise BackendOOM, as TransformersBackend does on torch.OutOfMemoryError."""

    name = "transformers"

    def __init__(self, inner, fits: int):
        self.inner, self.fits, self.info, self.calls = inner, fits, inner.info, []

    def extract(self, batch):
        self.calls.append(len(batch))
        if len(batch) > self.fits:
            raise BackendOOM(len(batch))
        return self.inner.extract(batch)

    def close(self):
        pass


def test_out_of_memory_splits_the_batch(backend, corpus):
    small = _SmallMemory(backend, fits=1)
    results, failures = extract_videos(corpus, small, batch_size=4, decode_kwargs=DECODE)
    assert not failures and len(results) == 4
    assert small.calls[0] == 4 and max(small.calls[1:]) <= 2
    none_fits = _SmallMemory(backend, fits=0)
    results, failures = extract_videos(corpus[:2], none_fits, batch_size=2, decode_kwargs=DECODE)
    assert not results and [f.error_type for f in failures] == ["BackendOOM", "BackendOOM"]
    assert all(f.stage == "model" and not f.permanent for f in failures)


def test_qwen3_vl_non_contiguous_video_tokens(model_dirs, videos):
    b = TransformersBackend(ExtractSpec(model=str(model_dirs["qwen3_vl"]), max_new_tokens=4))
    try:
        inputs = b.prepare(videos)
        ids = inputs["input_ids"][1]
        positions = (ids == b.video_token_id).nonzero().flatten()
        assert (positions.diff() > 1).any(), "Qwen3-VL puts timestamps between frame groups"
        batch = b.extract(videos)
        ref = reference_pooled(b.model, inputs, "video", b.layers)
        np.testing.assert_allclose(np.stack([f.hidden for f in batch]), ref, atol=1e-5, rtol=0)
        for video, in_batch in zip(videos, batch, strict=True):
            alone = b.extract([video])[0]
            np.testing.assert_allclose(alone.hidden, in_batch.hidden, atol=1e-5, rtol=0)
            assert alone.caption == in_batch.caption
    finally:
        b.close()


def test_caption_vectors_offline():
    from tasks.text_embed import embed_texts

    v = embed_texts(["a dog runs on the beach", "a puppy plays by the sea", "quarterly tax report"])
    assert v.shape == (3, 384) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2  # the packaged weights are real, not random


def test_cli_extract_writes_parquet(model_dirs, corpus, tmp_path, capsys):
    import pyarrow.parquet as pq

    from mvrec.cli import main

    video_dir = corpus[0].parent
    (video_dir / "broken.mp4").write_text("not a video")
    out = tmp_path / "features.parquet"
    try:
        main(["extract", str(video_dir), "--model", str(model_dirs["qwen2_5_vl"]), "--out", str(out),
              "--frames", "uniform:4", "--batch-size", "2", "--layers", "0,4,final", "--max-new-tokens", "3"])
    finally:
        (video_dir / "broken.mp4").unlink()
    captured = capsys.readouterr()
    assert "TEST MODEL" in " ".join(captured.err.split())  # rich wraps lines
    rows = pq.read_table(out).to_pylist()
    ok = {r["video_id"]: r for r in rows if r["status"] == "ok"}
    failed = [r for r in rows if r["status"] == "failed"]
    assert set(ok) == {"a", "b", "c", "d"}
    assert [r["video_id"] for r in failed] == ["broken"] and failed[0]["error_type"] == "Unreadable"
    assert ok["a"]["layers"] == [0, 4, -1] and len(ok["a"]["hidden"]) == 3 and len(ok["a"]["hidden"][0]) == 128
    assert ok["a"]["is_test_model"] is True and ok["a"]["num_frames"] == 4


def test_cli_extract_bad_option_is_one_line(model_dirs, corpus, tmp_path, capsys):
    from mvrec.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["extract", str(corpus[0].parent), "--model", str(model_dirs["qwen2_5_vl"]), "--out",
              str(tmp_path / "x.parquet"), "--frames", "sometimes"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--frames" in err and "Traceback" not in err
