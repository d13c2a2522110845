"""The demo corpus' controls: `cold_test_share` makes a share of test targets cold (positive);
`unrelated_visuals` draws each video from a random topic, unrelated to behaviour (negative)."""

import numpy as np

import json

import av
import pytest

from mvrec.devtools.demo_data import TOPICS, CorpusParams, assign_topics, make_interactions, plan_videos, render_frames
from recommender.data import build_sequences
from recommender.evaluate import COLD_THRESHOLD


def _cold_targets(share: float, split: str = "test") -> tuple[int, list]:
    inter = make_interactions(CorpusParams(cold_test_share=share))
    data = build_sequences({str(u): [str(i) for i in s] for u, s in enumerate(inter.sequences)}, 5, 10)
    return int((data.train_counts[data.targets(split)[1]] < COLD_THRESHOLD).sum()), inter


def test_cold_items_option_gives_hundreds_of_cold_test_targets():
    n_cold, inter = _cold_targets(0.3)
    assert n_cold >= 300
    # validation looks like the test split, so early stopping and the layer choice see cold targets too
    assert abs(_cold_targets(0.3, "valid")[0] - n_cold) < 0.25 * n_cold
    cold = set(inter.cold_items)
    topic = inter.item_topic
    swapped = [s for s in inter.sequences if s[-1] in cold]
    # the cold test item follows its topic: the previous item's (what content features can see)
    assert np.mean([topic[s[-1] - 1] == topic[s[-2] - 1] for s in swapped]) > 0.9


def test_default_corpus_is_unchanged_by_the_option():
    assert make_interactions(CorpusParams()).sequences == make_interactions(CorpusParams(cold_test_share=0.0)).sequences
    assert _cold_targets(0.0)[0] < 50 and _cold_targets(0.0, "valid")[0] < 50


def _palette_guess(mean_rgb: np.ndarray) -> int:
    centres = np.array([np.mean(t.background, axis=0) for t in TOPICS])
    return int(np.argmin(((centres - mean_rgb) ** 2).sum(1)))


def test_unrelated_visuals_draw_each_video_from_a_random_topic():
    params = CorpusParams(videos=3000, unrelated_visuals=True)
    topics = assign_topics(params.videos, params.n_topics, params.seed)
    plans = list(plan_videos(params, topics))
    look = np.array([p.look for p in plans])
    # independent of the item's topic: the joint counts match the product of the margins
    joint = np.histogram2d(topics, look, bins=params.n_topics)[0]
    expected = joint.sum(1, keepdims=True) * joint.sum(0, keepdims=True) / joint.sum()
    chi2 = ((joint - expected) ** 2 / expected).sum()
    assert chi2 < 81 + 5 * np.sqrt(2 * 81)  # 81 degrees of freedom: look = topic would give 27,000
    assert len(set(look)) == params.n_topics
    # seeded and reproducible; titles (and every other field) stay the item's own
    default = list(plan_videos(CorpusParams(videos=3000), topics))
    assert [p.look for p in plan_videos(params, topics)] == look.tolist()
    assert all(p.look is None for p in default)
    assert [(p.title, p.topic, p.seed, p.width) for p in plans] == [(p.title, p.topic, p.seed, p.width) for p in default]


def test_unrelated_visuals_keep_the_interactions():
    assert make_interactions(CorpusParams(cold_test_share=0.3, unrelated_visuals=True)).sequences == \
        make_interactions(CorpusParams(cold_test_share=0.3)).sequences


@pytest.mark.parametrize("unrelated", [False, True])
def test_rendered_pixels_follow_the_look(unrelated):
    params = CorpusParams(videos=40, seed=2, unrelated_visuals=unrelated)
    plans = list(plan_videos(params, assign_topics(params.videos, params.n_topics, params.seed)))
    guesses = []
    for p in plans:
        frame = av.VideoFrame.from_ndarray(next(render_frames(p)), format="yuv420p").to_ndarray(format="rgb24")
        guesses.append(_palette_guess(frame.reshape(-1, 3).mean(0)))
    guesses = np.array(guesses)
    drawn_from = np.array([p.topic if p.look is None else p.look for p in plans])
    assert np.mean(guesses == drawn_from) >= 0.75
    if unrelated:  # the item's topic is no longer in the pixels
        assert np.mean(guesses == np.array([p.topic for p in plans])) < 0.3


def test_cli_unrelated_visuals(tmp_path, capsys):
    from mvrec.cli import main
    from mvrec.devtools.demo_data import make_demo_corpus

    out, ref = tmp_path / "cli", tmp_path / "ref"
    try:
        main(["demo-data", "--videos", "4", "--users", "10", "--seed", "5", "--unrelated-visuals", "--out", str(out)])
    except SystemExit as e:
        assert e.code in (0, None)
    assert "wrote 4 videos" in capsys.readouterr().out
    make_demo_corpus(ref, videos=4, users=10, seed=5, workers=1)
    assert (out / "pairs.tsv").read_bytes() == (ref / "pairs.tsv").read_bytes()
    assert (out / "items.csv").read_bytes() == (ref / "items.csv").read_bytes()
    meta = json.loads((out / "corpus.json").read_text())
    assert meta["params"]["unrelated_visuals"] is True and "video_look" not in json.loads((ref / "corpus.json").read_text())
    for item, look in meta["video_look"].items():
        with av.open(str(next((out / "videos").glob(f"{item}.*")))) as container:
            rgb = next(iter(container.decode(video=0))).to_ndarray(format="rgb24")
        assert _palette_guess(rgb.reshape(-1, 3).mean(0)) == look
