"""Ranking metrics against hand-computed cases, and vectorised ranking against a per-user loop."""

import math

import numpy as np
import pytest
import torch

from recommender.evaluate import full_ranks, history_index, history_mask, metrics_from_ranks, sampled_ranks


def test_metrics_hand_computed():
    # ranks 1, 3, 10, 11, 25: HR@10 = 3/5, HR@20 = 4/5.
    m = metrics_from_ranks(np.array([1, 3, 10, 11, 25]))
    assert m["HR@10"] == pytest.approx(3 / 5)
    assert m["HR@20"] == pytest.approx(4 / 5)
    # NDCG = 1/log2(rank+1): 1, 1/2, 1/log2(11), 1/log2(12)
    assert m["NDCG@10"] == pytest.approx((1 + 0.5 + 1 / math.log2(11)) / 5)
    assert m["NDCG@20"] == pytest.approx((1 + 0.5 + 1 / math.log2(11) + 1 / math.log2(12)) / 5)


def test_rank_one_gives_perfect_scores():
    m = metrics_from_ranks(np.ones(7))
    assert m == {"HR@10": 1.0, "NDCG@10": 1.0, "HR@20": 1.0, "NDCG@20": 1.0}


def test_full_ranks_mask_history_but_keep_target():
    # catalogue of 5 items (column 0 = padding); target 2; item 4 scores higher but was seen.
    scores = torch.tensor([[9.0, 1.0, 2.0, 3.0, 5.0, 0.5]])
    seen = torch.zeros(1, 6, dtype=torch.bool)
    seen[0, [2, 4]] = True  # the target is also in the history: it stays rankable
    ranks = full_ranks(scores, torch.tensor([2]), seen)
    # higher than target (2.0) and not masked: item 3 (3.0); padding (9.0) and item 4 are masked.
    assert ranks.tolist() == [2]


def test_history_mask_from_csr():
    indptr = np.array([0, 2, 2, 5])
    indices = np.array([1, 3, 2, 2, 4])
    mask = history_mask(indptr, indices, np.array([2, 0, 1]), 5)
    assert mask.tolist() == [[False, False, True, False, True],
                             [False, True, False, True, False],
                             [False] * 5]


def naive_ranks(scores: np.ndarray, targets: np.ndarray, histories: list[list[int]]) -> np.ndarray:
    """The reference: one user at a time, argsort the masked scores, find the target."""
    out = []
    for s, t, hist in zip(scores, targets, histories):
        s = s.copy()
        s[0] = -np.inf
        for h in hist:
            if h != t:
                s[h] = -np.inf
        order = np.argsort(-s, kind="stable")
        out.append(int(np.flatnonzero(order == t)[0]) + 1)
    return np.array(out)


def test_vectorised_full_ranking_equals_naive_loop():
    rng = np.random.default_rng(0)
    n_users, n_items = 300, 500
    scores = rng.standard_normal((n_users, n_items + 1)).astype(np.float32)
    targets = rng.integers(1, n_items + 1, n_users)
    histories = [list(rng.integers(1, n_items + 1, rng.integers(0, 30))) + ([int(t)] if u % 7 == 0 else [])
                 for u, t in enumerate(targets)]
    indptr = np.concatenate([[0], np.cumsum([len(h) for h in histories])])
    indices = np.concatenate([np.array(h, dtype=np.int64) for h in histories])
    vec = []
    for start in range(0, n_users, 64):  # batched, as evaluate() does
        users = np.arange(start, min(start + 64, n_users))
        seen = history_mask(indptr, indices, users, n_items + 1)
        dense = full_ranks(torch.from_numpy(scores[users]), torch.from_numpy(targets[users]), seen)
        # the index form (what evaluate() uses) must agree with the dense mask
        by_index = full_ranks(torch.from_numpy(scores[users]), torch.from_numpy(targets[users]),
                              history_index(indptr, indices, users))
        assert torch.equal(dense, by_index)
        vec.append(dense)
    vec = torch.cat(vec).numpy()
    ref = naive_ranks(scores, targets, histories)
    np.testing.assert_array_equal(vec, ref)
    assert metrics_from_ranks(vec) == metrics_from_ranks(ref)


def test_sampled_ranks_use_unseen_negatives_only():
    n_items = 200
    scores = torch.arange(n_items + 1, dtype=torch.float32).repeat(4, 1)  # item i scores i
    targets = torch.tensor([200, 1, 100, 150])
    seen = torch.zeros(4, n_items + 1, dtype=torch.bool)
    seen[:, 101:200] = True  # every item above 100 except the top one was seen
    ranks = sampled_ranks(scores, targets, seen, torch.Generator().manual_seed(0), num_negatives=100)
    assert ranks[0] == 1  # the best item
    assert ranks[1] == 101  # the worst: all 100 negatives score higher
    # target 100: the only unseen item above it is 200 (the negatives are 1..99 and maybe 200)
    assert ranks[2] in (1, 2)
    assert 1 <= ranks[3] <= 2
