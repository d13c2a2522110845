"""Recommender benchmark on synthetic interactions (default 100k users x 20k items), CPU.

Prints:
  - the time of one training epoch (SASRec, ID items, full softmax over the catalogue);
  - full-ranking evaluation time: the vectorised batched evaluator over all users, against a
    per-user loop (score, mask history, argsort, find the target) on a sample of the same users,
    both as time per user, and their ratio (goal >= 20x), and how often their ranks agree;
  - what random tie-breaking costs: the duplicate-row check every evaluation makes, and the
    tie-aware count on the same model with two items given one shared row.

    python bench/train.py [--users 100000] [--items 20000] [--loop-users 2000] [--threads 0]
                          [--epoch-batches N]   # time N batches and extrapolate (a full epoch
                                                # took > 25 min on a shared 2-core box)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from mvrec.config import TrainConfig  # noqa: E402
from recommender.data import build_sequences  # noqa: E402
from recommender.evaluate import full_ranking_ranks, history_mask, item_ties  # noqa: E402
from recommender.synthetic import planted  # noqa: E402
from recommender.losses import next_item_loss  # noqa: E402
from recommender.train import build_model, set_threads  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--loop-users", type=int, default=2000, help="users in the per-user loop sample")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: auto, half the cores)")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--epoch-batches", type=int, default=0,
                    help="time only this many training batches and extrapolate the epoch (0: a full epoch)")
    args = ap.parse_args()
    set_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {os.cpu_count()} cores")

    t = time.perf_counter()
    seqs, _ = planted(args.users, args.items, n_topics=200, seed=0)
    data = build_sequences(seqs)
    n_inter = sum(len(s) for s in data.seqs)
    print(f"data: {data.n_users} users, {data.n_items} items, {n_inter} interactions "
          f"({time.perf_counter() - t:.1f} s to generate and split)")

    cfg = TrainConfig(dim=args.dim, num_threads=args.threads)
    torch.manual_seed(0)
    model = build_model(cfg, data.n_items)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    hist_ptr, hist_idx = data.history("valid")
    order = np.random.default_rng(0).permutation(data.n_users)
    model.train()
    starts = list(range(0, len(order), cfg.batch_size))
    timed = starts[:args.epoch_batches] if args.epoch_batches else starts
    t = time.perf_counter()
    for b in timed:
        batch = order[b:b + cfg.batch_size]
        seen = history_mask(hist_ptr, hist_idx, batch, data.n_items + 1)
        loss = next_item_loss(model, torch.as_tensor(data.train_inputs[batch]),
                              torch.as_tensor(data.train_targets[batch]), seen)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
    elapsed = time.perf_counter() - t
    epoch_s = elapsed * len(starts) / len(timed)
    how = "measured" if len(timed) == len(starts) else \
        f"extrapolated from {len(timed)} of {len(starts)} batches ({elapsed:.1f} s, {elapsed / len(timed):.2f} s/batch)"
    print(f"train: one epoch, batch {cfg.batch_size}, full softmax over {data.n_items} items: {epoch_s:.1f} s ({how})")

    model.eval()
    inputs, targets = data.targets("test")
    indptr, indices = data.history("test")
    with torch.no_grad():
        items = model.all_items()
        # Vectorised: the evaluator training uses (recommender.evaluate), batches of users, the
        # history masked in place, ranks counted in place; same thread count as the loop below.
        t = time.perf_counter()
        vec_ranks = full_ranking_ranks(model, data, "test", cfg.eval_batch_size).numpy()
        vec_s = time.perf_counter() - t
        t = time.perf_counter()
        item_ties(items)
        check_s = time.perf_counter() - t

        # Per-user loop on a sample: the same model and users, one at a time, argsort.
        sample = np.random.default_rng(1).choice(data.n_users, min(args.loop_users, data.n_users), replace=False)
        t = time.perf_counter()
        loop_ranks = []
        for u in sample:
            s = (model.user_vectors(torch.as_tensor(inputs[u:u + 1])) @ items.T)[0].numpy().copy()  # score all
            s[0] = -np.inf
            for h in indices[indptr[u]:indptr[u + 1]]:
                if h != targets[u]:
                    s[h] = -np.inf
            ranking = np.argsort(-s)
            loop_ranks.append(int(np.flatnonzero(ranking == targets[u])[0]) + 1)
        loop_s = time.perf_counter() - t
    # Batch-1 and batch-1024 matmuls round differently, so near-ties can swap: report, not assert.
    diff = np.abs(np.array(loop_ranks) - vec_ranks[sample])
    agree = f"{(diff == 0).mean():.1%} identical, max |diff| {diff.max()}"
    vec_per_user = vec_s / data.n_users
    loop_per_user = loop_s / len(sample)
    print(f"eval vectorised: {data.n_users} users in {vec_s:.2f} s ({vec_per_user * 1e6:.1f} us/user)")
    print(f"eval per-user argsort loop: {len(sample)} users in {loop_s:.2f} s ({loop_per_user * 1e6:.1f} us/user; "
          f"{loop_per_user * data.n_users:.0f} s extrapolated to all users)")
    with torch.no_grad():  # the same model with two items sharing a row: the tie-aware path
        model.items.id.weight[2] = model.items.id.weight[1]
        t = time.perf_counter()
        full_ranking_ranks(model, data, "test", cfg.eval_batch_size)
        tie_s = time.perf_counter() - t
    print(f"eval duplicate-row check (inside every evaluation): {check_s * 1e3:.1f} ms ({check_s / vec_s:.2%} of "
          f"it); tie-aware count (items 1 and 2 share a row): {tie_s:.2f} s, {tie_s / vec_s:.2f}x the tie-free one")
    print(f"eval speed-up vectorised / loop: {loop_per_user / vec_per_user:.1f}x (goal >= 20x; both on "
          f"{torch.get_num_threads()} thread(s)); "
          f"ranks on the sample: {agree}")


if __name__ == "__main__":
    main()
