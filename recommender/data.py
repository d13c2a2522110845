"""Interactions -> padded sequences with a leave-one-out split.

Two input formats, both time-ordered:
    MicroLens:   user<TAB>item item item ...      (one line per user)
    pairs:       user item  |  user<TAB>item  |  user,item   (one line per interaction)
A header line whose fields are all column names (user, user_id, item, item_id, items) is skipped.

Items are reindexed from 1 in order of first appearance; 0 is padding. Users with fewer than
`min_seq_len` interactions are dropped. For a user sequence s:
    train  inputs s[:-3] -> targets s[1:-2]   (the model only ever sees s[:-2])
    valid  input  s[:-2] -> target  s[-2]
    test   input  s[:-1] -> target  s[-1]
Each input keeps its last `max_seq_len` items, left-padded with 0.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HEADER_NAMES = {"user", "user_id", "userid", "item", "item_id", "itemid", "items", "video_id", "timestamp"}


def read_interactions(path: str | Path) -> dict[str, list[str]]:
    """{user: [item, ...]} in file order. A malformed row raises ValueError naming file:line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"interactions file not found: {path}")
    seqs: dict[str, list[str]] = {}
    # utf-8-sig: a byte-order mark (Excel, Notepad) is not part of the first user's id.
    with path.open(encoding="utf-8-sig") as fh:
        lines = enumerate(fh, start=1)
        for lineno, raw in _named(lines, path):
            line = raw.rstrip("\r\n")  # keep a leading tab: an empty user is an error
            if not line.strip() or line.startswith("#"):
                continue
            if "\t" in line:
                user, _, rest = line.partition("\t")
                items = rest.split()
            else:
                fields = [f for f in re.split(r"[,\s]+", line.strip()) if f]
                user, items = (fields[0], fields[1:]) if fields else ("", [])
                if len(items) > 1:
                    raise ValueError(
                        f"{path}:{lineno}: expected 'user item' or 'user<TAB>item item ...', got {line[:80]!r}"
                    )
            user = user.strip()
            if lineno == 1 and {user.lower(), *(i.lower() for i in items)} <= HEADER_NAMES:
                continue  # a header row
            if not user or not items:
                raise ValueError(f"{path}:{lineno}: a row needs a user and at least one item, got {line[:80]!r}")
            seqs.setdefault(user, []).extend(items)
    if not seqs:
        raise ValueError(f"{path}: no interactions")
    return seqs


def _named(lines, path: Path):
    """The lines; a file that is not UTF-8 text (binary garbage) is a ValueError naming it."""
    try:
        yield from lines
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a UTF-8 text file of interactions ({e.reason})") from None


def _left_pad(seqs: list[np.ndarray], width: int) -> np.ndarray:
    out = np.zeros((len(seqs), width), dtype=np.int64)
    for row, s in enumerate(seqs):
        s = s[-width:]
        if len(s):
            out[row, width - len(s):] = s
    return out


@dataclass
class SeqData:
    users: list[str]                     # raw user ids, row order of every array below
    items: list[str]                     # raw item ids; items[0] = "" is padding
    seqs: list[np.ndarray]               # full sequences of item indices
    max_seq_len: int
    source: str = ""
    n_dropped_users: int = 0
    item_index: dict[str, int] = field(init=False)
    user_index: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.item_index = {item: i for i, item in enumerate(self.items) if i > 0}
        self.user_index = {u: i for i, u in enumerate(self.users)}
        T = self.max_seq_len
        self.train_inputs = _left_pad([s[:-3] for s in self.seqs], T)
        self.train_targets = _left_pad([s[1:-2] for s in self.seqs], T)
        self.valid_inputs = _left_pad([s[:-2] for s in self.seqs], T)
        self.valid_targets = np.array([s[-2] for s in self.seqs], dtype=np.int64)
        self.test_inputs = _left_pad([s[:-1] for s in self.seqs], T)
        self.test_targets = np.array([s[-1] for s in self.seqs], dtype=np.int64)
        # How often each item appears in training sequences: defines "cold" targets.
        counts = np.zeros(self.n_items + 1, dtype=np.int64)
        for s in self.seqs:
            np.add.at(counts, s[:-2], 1)
        self.train_counts = counts

    @property
    def n_items(self) -> int:
        return len(self.items) - 1

    @property
    def n_users(self) -> int:
        return len(self.users)

    def subset(self, rows: np.ndarray) -> "SeqData":
        """These users only, with the same items and the full data's training counts (cold stays cold)."""
        sub = SeqData([self.users[r] for r in rows], self.items, [self.seqs[r] for r in rows], self.max_seq_len,
                      self.source, self.n_dropped_users)
        sub.train_counts = self.train_counts
        return sub

    def history(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """The items each user has seen before the split's target, as CSR (indptr, indices).

        Evaluation masks them out of the ranking (the target itself stays rankable)."""
        cut = {"valid": 2, "test": 1}[split]
        parts = [s[:-cut] for s in self.seqs]
        indptr = np.zeros(len(parts) + 1, dtype=np.int64)
        np.cumsum([len(p) for p in parts], out=indptr[1:])
        return indptr, (np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64))

    def targets(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        if split == "valid":
            return self.valid_inputs, self.valid_targets
        if split == "test":
            return self.test_inputs, self.test_targets
        raise ValueError(f"unknown split {split!r} (valid | test)")


def build_sequences(
    user_items: dict[str, list[str]], min_seq_len: int = 5, max_seq_len: int = 10, source: str = ""
) -> SeqData:
    """Filter short users, reindex items from 1 over the kept users, build the split."""
    if min_seq_len < 3:
        raise ValueError(f"min_seq_len must be >= 3 for a leave-one-out split, got {min_seq_len}")
    kept = {u: s for u, s in user_items.items() if len(s) >= min_seq_len}
    if not kept:
        raise ValueError(f"{source or 'interactions'}: no user has >= {min_seq_len} interactions")
    items = [""]
    index: dict[str, int] = {}
    seqs = []
    for s in kept.values():
        for it in s:
            if it not in index:
                index[it] = len(items)
                items.append(it)
        seqs.append(np.array([index[it] for it in s], dtype=np.int64))
    return SeqData(list(kept), items, seqs, max_seq_len, source, len(user_items) - len(kept))


def load_sequences(path: str | Path, min_seq_len: int = 5, max_seq_len: int = 10) -> SeqData:
    return build_sequences(read_interactions(path), min_seq_len, max_seq_len, source=str(path))
