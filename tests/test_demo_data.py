"""The demo corpus: deterministic by seed, real videos as promised, and real structure in the
interactions (topic continuity, popularity skew, a cold tail, an ID-only partner signal)."""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections import Counter
from itertools import pairwise
from pathlib import Path

import av
import numpy as np
import pytest

from mvrec.devtools.demo_data import (
    SIZES,
    TOPICS,
    CorpusParams,
    assign_topics,
    make_demo_corpus,
    make_interactions,
    plan_videos,
)
from video_clips import write_corrupt_files

SMALL = dict(videos=12, users=50)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict[str, Path]:
    """Seed 7 twice (with different worker counts: speed must not change output) and seed 8."""
    root = tmp_path_factory.mktemp("demo")
    dirs = {"a": root / "a", "a_again": root / "a_again", "b": root / "b"}
    make_demo_corpus(dirs["a"], seed=7, workers=2, **SMALL)
    make_demo_corpus(dirs["a_again"], seed=7, workers=1, **SMALL)
    make_demo_corpus(dirs["b"], seed=8, workers=1, **SMALL)
    return dirs


def read_items(corpus: Path) -> list[dict[str, str]]:
    with (corpus / "items.csv").open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def decoded_frame_hashes(corpus: Path) -> dict[str, list[str]]:
    """sha256 of every decoded frame's raw planes, per file (PyAV directly, no colour conversion)."""
    out = {}
    for row in read_items(corpus):
        with av.open(str(corpus / row["file"])) as container:
            out[row["file"]] = [hashlib.sha256(f.to_ndarray().tobytes()).hexdigest()
                                for f in container.decode(video=0)]
    return out


# ---------------------------------------------------------------- determinism


def test_same_seed_same_tsv_bytes_and_frames(corpora):
    a, again = corpora["a"], corpora["a_again"]
    for name in ("pairs.tsv", "items.csv", "corpus.json"):
        assert (a / name).read_bytes() == (again / name).read_bytes(), name
    hashes = decoded_frame_hashes(a)
    assert hashes == decoded_frame_hashes(again)
    assert all(len(h) >= 24 for h in hashes.values())  # 2 s at 12 fps at least


def test_same_seed_same_file_bytes(corpora):
    # Stronger than the frames: bitexact muxing and x264 without mbtree make whole files
    # reproducible (on the same FFmpeg build).
    for row in read_items(corpora["a"]):
        assert (corpora["a"] / row["file"]).read_bytes() == (corpora["a_again"] / row["file"]).read_bytes()


def test_different_seed_differs(corpora):
    a, b = corpora["a"], corpora["b"]
    assert (a / "pairs.tsv").read_bytes() != (b / "pairs.tsv").read_bytes()
    ha, hb = decoded_frame_hashes(a), decoded_frame_hashes(b)
    first_frames_a = {h[0] for h in ha.values()}
    first_frames_b = {h[0] for h in hb.values()}
    assert not first_frames_a & first_frames_b


# ---------------------------------------------------------------- files and layout


def test_layout_and_file_names(corpora):
    corpus = corpora["a"]
    items = read_items(corpus)
    assert [int(r["item_id"]) for r in items] == list(range(1, SMALL["videos"] + 1))
    for row in items:
        path = corpus / row["file"]
        assert re.fullmatch(r"videos/[1-9]\d*\.(mp4|mkv)", row["file"])
        assert path.stem == row["item_id"] and path.is_file()
        assert row["title"].strip()
    assert sorted(p.name for p in (corpus / "videos").iterdir()) == sorted(Path(r["file"]).name for r in items)

    lines = (corpus / "pairs.tsv").read_text(encoding="utf-8").splitlines()
    assert len(lines) == SMALL["users"]
    for user_id, line in enumerate(lines, start=1):
        assert re.fullmatch(r"\d+\t\d+( \d+)*", line), line
        user, seq = line.split("\t")
        assert int(user) == user_id
        assert all(1 <= int(i) <= SMALL["videos"] for i in seq.split())

    meta = json.loads((corpus / "corpus.json").read_text())
    assert meta["params"]["seed"] == 7
    assert set(meta["item_topic"]) == {r["item_id"] for r in items}


def test_videos_are_real_and_match_their_plan(corpora):
    corpus = corpora["a"]
    params = CorpusParams(seed=7, **SMALL)
    plans = {s.file: s for s in plan_videos(params, assign_topics(params.videos, params.n_topics, 7))}
    codec_names = {"libx264": "h264", "mpeg4": "mpeg4"}
    for row in read_items(corpus):
        plan = plans[row["file"]]
        with av.open(str(corpus / row["file"])) as container:
            assert ("mp4" in container.format.name) == (plan.ext == "mp4")
            assert ("matroska" in container.format.name) == (plan.ext == "mkv")
            stream = container.streams.video[0]
            assert stream.codec_context.name == codec_names[plan.codec]
            frames = [f for f in container.decode(video=0)]
            fps = float(stream.average_rate)  # PyAV 18 closes the streams with their container
        assert fps == plan.fps and 12 <= fps <= 30
        assert len(frames) == plan.n_frames
        assert 2.0 <= len(frames) / fps <= 6.0
        w, h = frames[0].width, frames[0].height
        assert (w, h) == (plan.width, plan.height)
        assert (min(w, h), max(w, h)) in SIZES


def test_plan_mixes_codecs_containers_orientations_and_sizes():
    params = CorpusParams(videos=300, seed=0)
    plans = list(plan_videos(params, assign_topics(300, params.n_topics, 0)))
    assert {(p.codec, p.ext) for p in plans} == {("libx264", "mp4"), ("mpeg4", "mp4"),
                                                 ("libx264", "mkv"), ("mpeg4", "mkv")}
    assert any(p.height > p.width for p in plans) and any(p.width > p.height for p in plans)
    sizes = Counter((min(p.width, p.height), max(p.width, p.height)) for p in plans)
    assert SIZES[0] in sizes and SIZES[-1] in sizes
    small = sum(n for s, n in sizes.items() if s[1] <= 426)
    assert small > 0.7 * len(plans)  # most are small, so the corpus encodes fast
    assert all(12 <= p.fps <= 30 and 2.0 <= p.n_frames / p.fps <= 6.0 for p in plans)


def test_topic_is_visible_in_the_pixels(corpora):
    """A nearest-palette guess from the mean colour of the first frame recovers the hidden topic."""
    corpus = corpora["a"]
    meta = json.loads((corpus / "corpus.json").read_text())
    centres = np.array([np.mean(t.background, axis=0) for t in TOPICS])
    right = 0
    items = read_items(corpus)
    for row in items:
        with av.open(str(corpus / row["file"])) as container:
            rgb = next(iter(container.decode(video=0))).to_ndarray(format="rgb24")
        guess = int(np.argmin(((centres - rgb.reshape(-1, 3).mean(0)) ** 2).sum(1)))
        right += guess == meta["item_topic"][row["item_id"]]
    assert right / len(items) >= 0.75


def test_titles_are_only_weakly_informative():
    params = CorpusParams(videos=1000, seed=3)
    plans = list(plan_videos(params, assign_topics(1000, params.n_topics, 3)))
    right = 0
    for p in plans:
        words = set(p.title.lower().split())
        scores = [len(words & set(t.words)) for t in TOPICS]
        right += max(scores) > 0 and int(np.argmax(scores)) == p.topic
    accuracy = right / len(plans)
    assert 2 / len(TOPICS) < accuracy < 0.6  # better than chance, far from the pixels


# ---------------------------------------------------------------- interaction structure


@pytest.fixture(scope="module")
def interactions():
    params = CorpusParams(videos=300, users=800, seed=1)
    return params, make_interactions(params)


def test_sequence_lengths_and_ids(interactions):
    params, inter = interactions
    assert len(inter.sequences) == params.users
    lengths = [len(s) for s in inter.sequences]
    assert min(lengths) >= 5 and max(lengths) <= 30
    assert len(set(lengths)) > 5  # a spread, not one fixed length
    assert all(1 <= i <= params.videos for s in inter.sequences for i in s)


def test_consecutive_items_share_a_topic_far_above_chance(interactions):
    _, inter = interactions
    topic = inter.item_topic
    pairs = [pair for s in inter.sequences for pair in pairwise(s)]
    same = np.mean([topic[a - 1] == topic[b - 1] for a, b in pairs])
    # Chance: two independent draws from the interacted items' topic distribution.
    shares = np.bincount([topic[i - 1] for s in inter.sequences for i in s]) / sum(map(len, inter.sequences))
    chance = float((shares ** 2).sum())
    assert same > 3 * chance


def test_popularity_skew_and_cold_tail(interactions):
    params, inter = interactions
    counts = np.bincount([i - 1 for s in inter.sequences for i in s], minlength=params.videos)
    cold = np.zeros(params.videos, dtype=bool)
    cold[np.array(inter.cold_items) - 1] = True
    assert cold.mean() == pytest.approx(params.cold_share, abs=0.01)
    assert counts[cold].mean() <= 4  # very few interactions each
    assert counts[~cold].mean() > 10 * counts[cold].mean()
    top_decile = np.sort(counts)[::-1][: params.videos // 10].sum()
    assert top_decile > 0.25 * counts.sum()  # Zipf-like head: 2.5x a uniform decile's share


def test_partner_links_carry_id_only_signal(interactions):
    params, inter = interactions
    pairs = [pair for s in inter.sequences for pair in pairwise(s)]
    followed_partner = np.mean([inter.partner[a - 1] == b for a, b in pairs])
    assert followed_partner > 20 / params.videos  # far above a uniformly random successor
    # Partners are not chosen by topic, so the pixels cannot predict them.
    same_topic_partner = np.mean(inter.item_topic[inter.partner - 1] == inter.item_topic)
    assert same_topic_partner < 0.35


def test_users_prefer_few_topics(interactions):
    _, inter = interactions
    topic = inter.item_topic
    top3_share = [sum(n for _, n in Counter(topic[i - 1] for i in s).most_common(3)) / len(s)
                  for s in inter.sequences]
    assert np.mean(top3_share) > 0.8


# ---------------------------------------------------------------- helpers for other tests


def test_write_corrupt_files(tmp_path):
    paths = write_corrupt_files(tmp_path)
    assert len(paths) == 4 and all(p.is_file() for p in paths)
    assert paths[0].stat().st_size == 0
    for path in paths[:3]:  # zero bytes, truncated mp4, text named .mp4: unopenable
        with pytest.raises(av.error.FFmpegError):
            with av.open(str(path)) as container:
                list(container.decode(video=0))
    # The truncated mkv keeps its header: it opens and yields fewer frames than were encoded.
    with av.open(str(paths[3])) as container:
        assert 0 <= len(list(container.decode(video=0))) < 45

    numbered = write_corrupt_files(tmp_path / "numbered", first_id=101)
    assert [p.stem for p in numbered] == ["101", "102", "103", "104"]


def test_cli_demo_data_writes_the_same_corpus(tmp_path, capsys):
    from mvrec.cli import main

    out = tmp_path / "cli"
    try:
        main(["demo-data", "--videos", "3", "--users", "10", "--seed", "5", "--out", str(out)])
    except SystemExit as e:
        assert e.code in (0, None)
    assert "wrote 3 videos" in capsys.readouterr().out
    ref = tmp_path / "ref"
    make_demo_corpus(ref, videos=3, users=10, seed=5, workers=1)
    assert (out / "pairs.tsv").read_bytes() == (ref / "pairs.tsv").read_bytes()
    assert decoded_frame_hashes(out) == decoded_frame_hashes(ref)


def test_rewriting_in_place_drops_videos_of_a_bigger_corpus(tmp_path):
    make_demo_corpus(tmp_path, videos=3, users=5, seed=0, workers=1)
    make_demo_corpus(tmp_path, videos=2, users=5, seed=0, workers=1)
    assert sorted(p.stem for p in (tmp_path / "videos").iterdir()) == ["1", "2"]


def test_refuses_a_directory_that_is_not_a_demo_corpus(tmp_path):
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "mine.mp4").write_bytes(b"precious")
    with pytest.raises(ValueError, match="not a demo corpus"):
        make_demo_corpus(tmp_path, videos=2, users=5, seed=0, workers=1)
    assert (tmp_path / "videos" / "mine.mp4").read_bytes() == b"precious"
