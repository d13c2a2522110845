"""Synthetic interactions with a planted content signal, for tests and benchmarks.

Every item has a topic; each user follows one topic (with probability `focus`, else any item),
so the next item is predictable from content. Features: layer l = signal_l * topic vector + noise.
"""

from __future__ import annotations

import numpy as np


def planted(n_users: int, n_items: int, n_topics: int = 20, seq_len: tuple[int, int] = (5, 12),
            focus: float = 0.9, layer_signal=(0.0, 1.0), dim: int = 16, seed: int = 0):
    """-> ({user: [item, ...]}, {item: features [L, dim]}), ids as strings."""
    rng = np.random.default_rng(seed)
    item_topic = rng.integers(0, n_topics, n_items)
    by_topic = [np.flatnonzero(item_topic == t) for t in range(n_topics)]
    lengths = rng.integers(seq_len[0], seq_len[1] + 1, n_users)
    user_topic = rng.integers(0, n_topics, n_users)
    total = int(lengths.sum())
    owner = np.repeat(np.arange(n_users), lengths)
    on_topic = rng.random(total) < focus
    picks = rng.integers(0, n_items, total)  # off-topic: any item
    for t in range(n_topics):  # on-topic: an item of the user's topic, vectorised per topic
        rows = np.flatnonzero(on_topic & (user_topic[owner] == t))
        if len(by_topic[t]):
            picks[rows] = by_topic[t][rng.integers(0, len(by_topic[t]), len(rows))]
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    seqs = {f"u{u}": [f"i{i}" for i in picks[bounds[u]:bounds[u + 1]]] for u in range(n_users)}
    directions = rng.standard_normal((n_topics, dim)).astype(np.float32)
    noise = rng.standard_normal((n_items, len(layer_signal), dim)).astype(np.float32) * 0.5
    feats = np.asarray(layer_signal, np.float32)[None, :, None] * directions[item_topic][:, None, :] + noise
    return seqs, {f"i{i}": feats[i] for i in range(n_items)}
