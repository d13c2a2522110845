"""The demo corpus' positive control: `cold_test_share` makes a share of test targets cold."""

import numpy as np

from mvrec.devtools.demo_data import CorpusParams, make_interactions
from recommender.data import build_sequences
from recommender.evaluate import COLD_THRESHOLD


def _cold_test_targets(share: float) -> tuple[int, list]:
    inter = make_interactions(CorpusParams(cold_test_share=share))
    data = build_sequences({str(u): [str(i) for i in s] for u, s in enumerate(inter.sequences)}, 5, 10)
    return int((data.train_counts[data.test_targets] < COLD_THRESHOLD).sum()), inter


def test_cold_items_option_gives_hundreds_of_cold_test_targets():
    n_cold, inter = _cold_test_targets(0.3)
    assert n_cold >= 300
    cold = set(inter.cold_items)
    topic = inter.item_topic
    swapped = [s for s in inter.sequences if s[-1] in cold]
    # the cold test item follows its topic: the previous item's (what content features can see)
    assert np.mean([topic[s[-1] - 1] == topic[s[-2] - 1] for s in swapped]) > 0.9


def test_default_corpus_is_unchanged_by_the_option():
    assert make_interactions(CorpusParams()).sequences == make_interactions(CorpusParams(cold_test_share=0.0)).sequences
    assert _cold_test_targets(0.0)[0] < 50
