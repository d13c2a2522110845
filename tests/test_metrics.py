"""Ranking metrics against hand-computed cases, and vectorised ranking against a per-user loop."""

import math

import numpy as np
import pytest
import torch

from recommender.evaluate import (full_ranking_ranks, full_ranks, history_index, history_mask, item_ties,
                                  metrics_from_ranks, sampled_ranks)


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
    for s, t, hist in zip(scores, targets, histories, strict=True):
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


def _tied_table(n_users: int):
    """Item rows: 1-2 score 9 for the user (higher), the target 3 and items 4-7 share one row (ties),
    8-9 score 1."""
    user = torch.tensor([1.0, 0.0])
    items = torch.tensor([[0.0, 0], [9, 0], [9, 1], [5, 0], [5, 0], [5, 0], [5, 0], [5, 0], [1, 0], [1, 1]])
    scores = (user @ items.T).repeat(n_users, 1)
    return items, scores, torch.full((n_users,), 3), torch.zeros(n_users, 10, dtype=torch.bool)


def test_tied_target_takes_a_uniform_place_among_its_ties():
    items, scores, targets, seen = _tied_table(5000)
    ties = item_ties(items, seed=0)
    assert ties.sizes[ties.groups[3]] == 5 and (ties.groups[[4, 5, 6, 7]] == ties.groups[3]).all()
    ranks = full_ranks(scores.clone(), targets, seen, ties)
    # 2 items above, 4 tied: ranks 3..7, each about 1/5 of the time (not always 3, as a strict count says)
    counts = np.bincount(ranks.numpy(), minlength=8)
    assert counts[:3].sum() == 0 and counts[3:].sum() == 5000
    assert np.all(np.abs(counts[3:] / 5000 - 0.2) < 0.03), counts
    assert torch.equal(ranks, full_ranks(scores.clone(), targets, seen, item_ties(items, seed=0)))  # seeded
    assert full_ranks(scores.clone(), targets, seen).unique().tolist() == [3]  # without ties: the strict count
    # a seen tie drops out of the tie set (dense mask or index pairs, repeats counted once);
    # a target in the history stays rankable
    seen[:, [4, 5, 3]] = True
    dense = full_ranks(scores.clone(), targets, seen, item_ties(items, seed=0))
    assert set(dense.tolist()) == {3, 4, 5}
    rows, cols = seen.nonzero(as_tuple=True)
    pairs = (torch.cat([rows, rows]), torch.cat([cols, cols]))
    assert torch.equal(full_ranks(scores.clone(), targets, pairs, item_ties(items, seed=0)), dense)


def test_sampled_ranks_break_ties_at_random_and_keep_tie_free_draws():
    n_items = 300
    scores = torch.zeros(4, n_items + 1)  # every item ties with the target
    ranks = sampled_ranks(scores, torch.tensor([1, 2, 3, 4]), torch.zeros(4, n_items + 1, dtype=torch.bool),
                          torch.Generator().manual_seed(0), num_negatives=100)
    big = sampled_ranks(torch.zeros(4000, n_items + 1), torch.ones(4000, dtype=torch.long),
                        torch.zeros(4000, n_items + 1, dtype=torch.bool), torch.Generator().manual_seed(0))
    assert ranks.min() >= 1 and ranks.max() <= 101
    assert abs(big.double().mean().item() - 51) < 1.5  # uniform over 1..101
    # no ties: the strict count over the same negatives, and no extra draw from the generator
    n_items = 5000
    distinct = torch.randn(6, n_items + 1)
    gen_a, gen_b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    tgt, seen = torch.arange(1, 7), torch.zeros(6, n_items + 1, dtype=torch.bool)
    a = sampled_ranks(distinct, tgt, seen, gen_a)
    neg = torch.randint(1, n_items + 1, (6, 100), generator=gen_b)  # the draw sampled_ranks makes
    assert not (neg == tgt[:, None]).any()  # (seed 3: no collision with the target, so no redraw)
    expected = (distinct.gather(1, neg) > distinct.gather(1, tgt[:, None])).sum(1) + 1
    assert a.tolist() == expected.tolist()
    assert torch.equal(gen_a.get_state(), gen_b.get_state())


def test_item_ties_look_at_real_items_only():
    table = torch.randn(6, 4)
    table[0] = 0  # padding
    assert item_ties(table) is None
    table[5] = 0  # equal to the padding row only: not a tie (padding is never ranked)
    assert item_ties(table) is None
    table[3] = table[2]
    ties = item_ties(table)
    assert ties.groups[0] == -1 and ties.groups[2] == ties.groups[3] and ties.sizes[ties.groups[2]] == 2
    assert len(set(ties.groups[[1, 2, 4, 5]].tolist())) == 4


def test_model_without_ties_ranks_as_the_strict_count_and_shared_rows_tie_at_random():
    """full_ranking_ranks on a real model: tie-free, it equals the one-pass strict count; with a
    shared rare-item row (the study's `id` cell) the cold targets' ranks spread over their ties."""
    from mvrec.config import TrainConfig
    from recommender.data import build_sequences
    from recommender.synthetic import planted
    from recommender.train import build_model

    seqs, _ = planted(200, 60, n_topics=6, seed=1)
    data = build_sequences(seqs)
    torch.manual_seed(0)
    model = build_model(TrainConfig(dim=16), data.n_items).eval()
    ranks = full_ranking_ranks(model, data, "test", batch_size=64)
    inputs, targets = data.targets("test")
    indptr, indices = data.history("test")
    users = np.arange(data.n_users)
    with torch.no_grad():
        scores = model.score_all(torch.as_tensor(inputs))
    strict = full_ranks(scores, torch.as_tensor(targets), history_index(indptr, indices, users))
    assert torch.equal(ranks, strict)

    rare = build_model(TrainConfig(dim=16, id_min_count=10**6), data.n_items, None, data.train_counts).eval()
    with torch.no_grad():  # every item is rare: one shared row, every score ties
        assert item_ties(rare.all_items()).sizes.tolist() == [data.n_items]
    tied = full_ranking_ranks(rare, data, "test", batch_size=64, seed=0)
    assert torch.equal(tied, full_ranking_ranks(rare, data, "test", batch_size=64, seed=0))
    ties = np.array([data.n_items - 1 - len(set(indices[indptr[u]:indptr[u + 1]].tolist()) - {int(targets[u])})
                     for u in range(data.n_users)])  # unseen items other than the target: all tie with it
    assert np.all(tied.numpy() >= 1) and np.all(tied.numpy() <= ties + 1)
    # a uniform place among them: mean rank 1 + ties / 2, not 1 (what a strict count would say)
    assert abs(tied.double().mean().item() - (1 + ties / 2).mean()) < 3 * np.sqrt((ties ** 2 / 12).mean() / len(ties))
