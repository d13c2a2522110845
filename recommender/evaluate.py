"""Ranking metrics: full ranking over the catalogue (or the sampled 100-negative protocol).

rank = 1 + number of candidates scored strictly higher than the target, after each user's
history (everything before the target, except the target itself) is masked out; candidates that
score exactly the same as the target (items that share one embedding, e.g. the study's rare-item
row) put it at a uniformly random place among them (seeded), neither first nor last.
HR@K = [rank <= K];  NDCG@K = [rank <= K] / log2(rank + 1).  All vectorised over users.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mvrec.config import EVAL_PROTOCOLS

KS = (10, 20)
COLD_THRESHOLD = 5  # a target is cold when it has fewer training interactions than this


def metrics_from_ranks(ranks: np.ndarray | torch.Tensor, ks=KS) -> dict[str, float]:
    ranks = torch.as_tensor(ranks, dtype=torch.float64)
    if len(ranks) == 0:
        return {f"{m}@{k}": float("nan") for k in ks for m in ("HR", "NDCG")}
    out = {}
    for k in ks:
        hit = ranks <= k
        out[f"HR@{k}"] = hit.double().mean().item()
        out[f"NDCG@{k}"] = torch.where(hit, 1.0 / torch.log2(ranks + 1), torch.zeros_like(ranks)).mean().item()
    return out


def history_index(indptr: np.ndarray, indices: np.ndarray, users: np.ndarray,
                  device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """CSR histories of `users` -> (row, item) index pairs, rows numbered 0..len(users)-1."""
    starts, ends = indptr[users], indptr[users + 1]
    lengths = ends - starts
    rows = np.repeat(np.arange(len(users)), lengths)
    # Positions of every history entry of these users in `indices`, without a Python loop.
    offsets = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    cols = indices[np.repeat(starts, lengths) + offsets]
    return torch.as_tensor(rows, device=device), torch.as_tensor(cols, device=device)


def history_mask(indptr: np.ndarray, indices: np.ndarray, users: np.ndarray, n_cols: int,
                 device: str | torch.device = "cpu") -> torch.Tensor:
    """CSR histories of `users` -> bool [len(users), n_cols] with True at seen items."""
    mask = torch.zeros(len(users), n_cols, dtype=torch.bool, device=device)
    mask[history_index(indptr, indices, users, device)] = True
    return mask


def _tie_break(higher: torch.Tensor, equal: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """1-based ranks: after the `higher` candidates, at a uniform place among the `equal` ones."""
    u = torch.rand(len(higher), generator=generator).to(higher.device)
    return (higher + (u * (equal + 1)).long() + 1).to(torch.int32)


@dataclass
class Ties:
    """Items that share one embedding (identical rows of the item table): every user scores them
    equally. groups [n_items + 1]: a group id per item (row 0, padding: -1); sizes: items per group."""
    groups: torch.Tensor
    sizes: torch.Tensor
    generator: torch.Generator


def item_ties(items: torch.Tensor, seed: int = 0) -> Ties | None:
    """The tie groups of an item table [n_items + 1, dim], or None when its real rows are distinct
    (one sort of the table: the check that keeps tie-free models on the plain count)."""
    if len(items) < 3:
        return None
    _, inverse, sizes = torch.unique(items[1:], dim=0, return_inverse=True, return_counts=True)
    if int(sizes.max()) == 1:
        return None
    groups = torch.cat([torch.full((1,), -1, dtype=inverse.dtype, device=inverse.device), inverse])
    return Ties(groups, sizes, torch.Generator().manual_seed(seed))


def _tied_unseen(ties: Ties, targets: torch.Tensor, seen: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
                 n_cols: int) -> torch.Tensor:
    """Per user, the unseen items other than the target in the target's tie group: [B]."""
    groups, sizes = ties.groups.to(targets.device), ties.sizes.to(targets.device)
    rows, items = seen if isinstance(seen, tuple) else seen.nonzero(as_tuple=True)
    g = groups[targets]
    same = (groups[items] == g[rows]) & (items != targets[rows])
    seen_pairs = torch.unique(rows[same] * n_cols + items[same])  # a history may repeat an item
    return sizes[g] - 1 - torch.bincount(seen_pairs // n_cols, minlength=len(targets))


def full_ranks(scores: torch.Tensor, targets: torch.Tensor, seen: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
               ties: Ties | None = None) -> torch.Tensor:
    """scores [B, n_items + 1] (column 0 = padding), targets [B] -> 1-based ranks (int32). Overwrites `scores`.

    seen: bool [B, n_items + 1], or (rows, items) index pairs (cheaper: no dense mask).
    The target's score is read before masking, so a target that is also in the history stays
    rankable (it never counts as scoring higher than itself).

    The count is fused into `scores` itself: `gt_` turns each score into 1.0 / 0.0 in place and a
    float32 row sum counts them (exact below 2**24 columns), so no extra [B, n] tensor is allocated;
    summing a bool tensor with an integer dtype was about 2x slower.

    ties: the item table's tie groups (item_ties), when it has any: the target then takes a random
    place among the unseen items of its group, which score exactly what it scores. They are known
    from the table, so the count stays one pass (counting equal scores too took 3.3x as long)."""
    if scores.dtype != torch.float32:
        scores = scores.float()
    target_scores = scores.gather(1, targets[:, None])
    if isinstance(seen, tuple):
        scores[seen] = float("-inf")
    else:
        scores.masked_fill_(seen, float("-inf"))
    scores[:, 0] = float("-inf")
    equal = None if ties is None else _tied_unseen(ties, targets, seen, scores.shape[1])
    if scores.shape[1] >= 2**24:  # float32 counts would round
        higher = (scores > target_scores).sum(1, dtype=torch.int64)
    else:
        higher = scores.gt_(target_scores).sum(1).long()
    if equal is None:
        return (higher + 1).to(torch.int32)
    return _tie_break(higher, equal, ties.generator)


def sampled_ranks(scores: torch.Tensor, targets: torch.Tensor, seen: torch.Tensor, generator: torch.Generator,
                  num_negatives: int = 100) -> torch.Tensor:
    """Rank of the target among `num_negatives` uniform random unseen items (SASRec paper protocol)."""
    B, n_cols = scores.shape
    blocked = seen.clone()
    blocked[:, 0] = True
    blocked[torch.arange(B, device=targets.device), targets] = True
    neg = torch.randint(1, n_cols, (B, num_negatives), generator=generator).to(scores.device)
    for _ in range(100):  # resample collisions with history/target, all users at once
        bad = blocked.gather(1, neg)
        if not bad.any():
            break
        neg[bad] = torch.randint(1, n_cols, (int(bad.sum()),), generator=generator).to(scores.device)
    target_scores = scores.gather(1, targets[:, None]).float()
    neg_scores = scores.gather(1, neg).float()
    higher, equal = (neg_scores > target_scores).sum(1), (neg_scores == target_scores).sum(1)
    if equal.any():  # drawn only then, so the negatives of later batches stay those of a tie-free model
        return _tie_break(higher, equal, generator)
    return (higher + 1).to(torch.int32)


@torch.no_grad()
def full_ranking_ranks(model, data, split: str = "valid", batch_size: int = 1024,
                       device: str | torch.device = "cpu", seed: int = 0) -> torch.Tensor:
    """1-based full-ranking ranks of every user's `split` target, int32 [n_users], on the CPU.

    Per batch of users: encode (last position only), score every item into one reused buffer
    (a fresh [B, n] tensor per batch cost page faults), mask the history in place, count.
    Ties are broken at random (seeded by `seed`) when the item table has duplicate rows."""
    model.eval()
    inputs, targets = data.targets(split)
    indptr, indices = data.history(split)
    items = model.all_items()
    items_t = items.T  # [dim, n_items + 1], a view (same product as before)
    ties = item_ties(items, seed)
    buf = torch.empty(min(batch_size, data.n_users), items_t.shape[1], dtype=torch.float32, device=device)
    ranks = torch.empty(data.n_users, dtype=torch.int32)
    for start in range(0, data.n_users, batch_size):
        users = np.arange(start, min(start + batch_size, data.n_users))
        user_vec = model.user_vectors(torch.as_tensor(inputs[users], device=device)).float()
        scores = torch.mm(user_vec, items_t, out=buf[:len(users)])
        tgt = torch.as_tensor(targets[users], device=device)
        seen = history_index(indptr, indices, users, device)
        ranks[start:start + len(users)] = full_ranks(scores, tgt, seen, ties).cpu()
    return ranks


@torch.no_grad()
def evaluate(model, data, split: str = "valid", batch_size: int = 1024, device: str | torch.device = "cpu",
             protocol: str = "full", ks=KS, cold_threshold: int = COLD_THRESHOLD, seed: int = 0) -> dict[str, float]:
    """Metrics for every user, plus `cold/...` for targets with < cold_threshold training interactions."""
    return split_metrics(split_ranks(model, data, split, batch_size, device, protocol, seed), data, split, ks,
                         cold_threshold)


@torch.no_grad()
def split_ranks(model, data, split: str = "valid", batch_size: int = 1024, device: str | torch.device = "cpu",
                protocol: str = "full", seed: int = 0) -> torch.Tensor:
    """1-based rank of every user's `split` target, int32 [n_users] (full ranking or sampled-100)."""
    if protocol not in EVAL_PROTOCOLS:
        raise ValueError(f"unknown evaluation protocol {protocol!r} ({' | '.join(EVAL_PROTOCOLS)})")
    model.eval()
    inputs, targets = data.targets(split)
    if protocol == "full":
        ranks = full_ranking_ranks(model, data, split, batch_size, device, seed)
    else:
        indptr, indices = data.history(split)
        items = model.all_items()
        gen = torch.Generator().manual_seed(seed)
        parts = []
        for start in range(0, data.n_users, batch_size):
            users = np.arange(start, min(start + batch_size, data.n_users))
            seq = torch.as_tensor(inputs[users], device=device)
            tgt = torch.as_tensor(targets[users], device=device)
            scores = model.user_vectors(seq) @ items.T
            seen = history_mask(indptr, indices, users, scores.shape[1], device)
            parts.append(sampled_ranks(scores, tgt, seen, gen).cpu())
        ranks = torch.cat(parts)
    return ranks


def split_metrics(ranks: torch.Tensor, data, split: str, ks=KS, cold_threshold: int = COLD_THRESHOLD) -> dict[str, float]:
    """HR@K / NDCG@K of `ranks` (split_ranks), overall and `cold/...` on the cold targets."""
    _, targets = data.targets(split)
    out = metrics_from_ranks(ranks, ks)
    cold = torch.as_tensor(data.train_counts[targets] < cold_threshold)
    out.update({f"cold/{k}": v for k, v in metrics_from_ranks(ranks[cold], ks).items()})
    out["cold/n_users"] = int(cold.sum())
    return out
