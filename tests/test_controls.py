"""The demo corpus' controls: `cold_test_share` makes a share of test targets cold (positive);
`unrelated_visuals` draws each video from a random topic, unrelated to behaviour (negative);
bench/controls.py's permuted twin and criteria."""

import importlib.util
import json
from pathlib import Path

import av
import numpy as np
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


def _bench():
    spec = importlib.util.spec_from_file_location("controls", Path(__file__).resolve().parent.parent / "bench" / "controls.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_permuted_twin_gives_each_item_another_items_features(tmp_path):
    from recommender.pipeline import FeatureSpec, load_inputs

    bench = _bench()
    rng = np.random.default_rng(1)
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("".join(f"{u}\t{' '.join(str(i) for i in rng.choice(40, 8, replace=False) + 1)}\n"
                             for u in range(60)))
    corpus = tmp_path / "corpus.json"
    corpus.write_text(json.dumps({"item_topic": {str(i): f"t{i % 4}" for i in range(1, 41)}}))
    spec = FeatureSpec(topics=str(corpus))
    twin = bench.permuted_twin(pairs, spec, tmp_path / "twin.npz")
    data, bank = load_inputs(pairs, bench.TRAIN, spec)
    _, twin_bank = load_inputs(pairs, bench.TRAIN, twin)
    n = len(data.items)
    assert twin_bank.layers == bank.layers and twin_bank.missing["hidden"] == []
    # the same rows (a bijection over items), almost none left in place
    dist = ((twin_bank.hidden[1:, None] - bank.hidden[None, 1:]) ** 2).sum((2, 3))
    source = dist.argmin(1)
    assert np.allclose(dist[np.arange(n - 1), source], 0) and len(set(source)) == n - 1
    assert (source == np.arange(n - 1)).mean() < 0.2
    # the item information is gone: a row's topic no longer follows its item's (1 in 4 by chance)
    topic = np.array([int(i) % 4 for i in data.items[1:]])
    assert (topic[source] == topic).mean() < 0.5
    # seeded: the same draw again, another with another seed
    again = bench.permuted_twin(pairs, spec, tmp_path / "again.npz")
    other = bench.permuted_twin(pairs, spec, tmp_path / "other.npz", seed=1)
    assert (np.load(again.features)["item_ids"] == np.load(twin.features)["item_ids"]).all()
    assert not (np.load(other.features)["item_ids"] == np.load(twin.features)["item_ids"]).all()


def _cell(mean: float, sd: float) -> dict:
    return {"test_cold_HR@10": mean, "test_cold_HR@10_std": sd}


def test_versus_is_the_difference_over_the_two_cells_standard_error():
    bench = _bench()
    diff, se = bench.versus(_cell(0.5, 0.03), _cell(0.2, 0.04), seeds=3)
    assert diff == pytest.approx(0.3) and se == pytest.approx(0.05 / np.sqrt(3))


def test_criteria_compare_with_id_and_the_permuted_twin():
    bench = _bench()
    ident = _cell(0.04, 0.015)
    strong = {"fuse": _cell(0.69, 0.014), "dff": _cell(0.65, 0.05)}
    spread = {"fuse": _cell(0.11, 0.02), "dff": _cell(0.12, 0.02)}
    assert bench.positive_passes(strong, spread, ident, 3)
    # beating id is not enough when the permuted twin does as well
    assert not bench.positive_passes(spread, spread, ident, 3)
    assert not bench.positive_passes(strong, {"fuse": spread["fuse"], "dff": _cell(0.64, 0.05)}, ident, 3)
    assert bench.negative_passes(spread, {"fuse": _cell(0.10, 0.02), "dff": _cell(0.11, 0.02)}, 3)
    assert not bench.negative_passes(strong, spread, 3)
    # one-sided: doing worse than the twin is no gain
    assert bench.negative_passes({"fuse": _cell(0.02, 0.01), "dff": _cell(0.12, 0.02)}, spread, 3)
