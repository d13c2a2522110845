"""Feature-store benchmark: write throughput, one-layer load, top-10 cosine (DuckDB vs numpy).

    python bench/store.py                  # 10k x 1536 layer load, 100k x 1536 top-k (about 1.5 GB RAM)
    python bench/store.py --top-n 20000    # smaller

Everything is measured side by side in one run on the same data; nothing here is asserted.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import duckdb  # noqa: E402

from storage import FeatureStore, connect  # noqa: E402


def block(start: int, n: int, dim: int, layer: int, eid: str, seed: int) -> pa.Table:
    flat = np.random.default_rng(seed).standard_normal(n * dim, dtype=np.float32)
    emb = pa.ListArray.from_arrays(pa.array(np.arange(0, (n + 1) * dim, dim, dtype=np.int32)), pa.array(flat))
    return pa.table({"video_id": [f"vid{i:07d}" for i in range(start, start + n)], "content_sha256": ["s" * 64] * n,
                     "extractor_id": [eid] * n, "layer": pa.array([layer] * n, pa.int32()), "embedding": emb})


def timed(fn, repeat: int = 3) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=1536)
    ap.add_argument("--load-n", type=int, default=10_000)
    ap.add_argument("--top-n", type=int, default=100_000)
    ap.add_argument("--dir", default=None, help="store directory (default: a temporary one, removed after)")
    args = ap.parse_args()
    d = args.dim
    root = Path(args.dir or tempfile.mkdtemp(prefix="mvrec-bench-store-"))
    store = FeatureStore(root / "store")
    print(f"store bench: dim={d}, store at {root}; duckdb {duckdb.__version__}")

    # 1. write throughput: commits of 64 videos x 8 layers, like an extraction flow
    videos, layers, commits = 64, 8, 10
    rows = videos * layers
    t_all = 0.0
    for c in range(commits):
        t = pa.concat_tables([block(c * videos, videos, d, k, "w", seed=c * 100 + k) for k in range(layers)])
        s = time.perf_counter()
        store.upsert_hidden_states(t)
        t_all += time.perf_counter() - s
    mb = commits * rows * d * 4 / 1e6
    print(f"write, new keys   : {commits} commits x {rows} rows ({videos} videos x {layers} layers): "
          f"{commits * rows / t_all:,.0f} rows/s, {mb / t_all:,.1f} MB/s of embeddings, {t_all / commits * 1000:.0f} ms/commit")
    s = time.perf_counter()
    store.upsert_hidden_states(pa.concat_tables([block(0, videos, d, k, "w", seed=k) for k in range(layers)]))
    t_up = time.perf_counter() - s
    print(f"write, same keys  : 1 commit x {rows} rows (replace): {rows / t_up:,.0f} rows/s, "
          f"{rows * d * 4 / 1e6 / t_up:,.1f} MB/s, {t_up * 1000:.0f} ms")

    # 2. load one layer for load-n items (other layers present, so pruning matters)
    n = args.load_n
    for k in (0, 1):
        for start in range(0, n, 5000):
            store.upsert_hidden_states(block(start, min(5000, n - start), d, k, "L", seed=start + k))
    ids = [f"vid{i:07d}" for i in np.random.default_rng(1).permutation(n)]
    t_load, fm = timed(lambda: FeatureStore(root / "store").layer_matrix("L", 1, ids))
    print(f"layer_matrix      : {n:,} x {d} float32 in item order: {t_load:.3f} s (median of 3; goal < 1 s) "
          f"shape={fm.values.shape}")

    # 3. top-10 cosine over top-n items: DuckDB SQL vs numpy brute force, same data
    n = args.top_n
    s = time.perf_counter()
    for start in range(0, n, 10_000):
        store.upsert_hidden_states(block(start, min(10_000, n - start), d, 0, "T", seed=10_000 + start))
    print(f"(wrote {n:,} x {d} for top-k in {time.perf_counter() - s:.1f} s)")
    qid = "vid0000042"

    con = connect(store)
    s = time.perf_counter()
    top_cold = con.top_k_similar(qid, "T", 0, 10)
    t_duck_cold = time.perf_counter() - s
    t_duck_view, top_duck = timed(lambda: con.top_k_similar(qid, "T", 0, 10))
    print(f"top-10 DuckDB view: {t_duck_view:.3f} s warm (median of 3; FLOAT[{d}] layer held by the pinned "
          f"connection); first query {t_duck_cold:.3f} s (reads the layer's Parquet once)")
    with connect(store, topk_cache_bytes=0) as plain:
        s = time.perf_counter()
        top_plain = plain.top_k_similar(qid, "T", 0, 10)
        t_duck_plain = time.perf_counter() - s
    print(f"top-10 DuckDB SQL : {t_duck_plain:.3f} s  (no cache: the same SQL over the read_parquet view, "
          f"decoding {n:,} x {d} each query)")

    ids_all = [f"vid{i:07d}" for i in range(n)]
    s = time.perf_counter()
    X = store.layer_matrix("T", 0, ids_all).values
    t_load_top = time.perf_counter() - s
    mem = duckdb.connect()
    arrow_tbl = pa.table({"video_id": ids_all, "e": pa.FixedSizeListArray.from_arrays(pa.array(X.reshape(-1)), d)})
    mem.register("a", arrow_tbl)
    mem.execute(f"CREATE TABLE t AS SELECT video_id, e::FLOAT[{d}] AS e FROM a")
    q = X[42]
    sql = (f"SELECT video_id, array_cosine_similarity(e, $q::FLOAT[{d}]) AS s FROM t "
           "WHERE video_id <> $v ORDER BY s DESC LIMIT 10")
    t_duck_mem, top_mem = timed(lambda: mem.execute(sql, {"q": q.tolist(), "v": qid}).fetchall())
    print(f"top-10 DuckDB mem : {t_duck_mem:.3f} s  (same SQL on an in-memory FLOAT[{d}] table)")

    def brute() -> list[str]:
        sims = (X @ q) / (np.linalg.norm(X, axis=1) * np.linalg.norm(q))
        sims[42] = -np.inf
        top = np.argpartition(-sims, 10)[:10]
        return [ids_all[i] for i in top[np.argsort(-sims[top])]]

    t_np, top_np = timed(brute)
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)

    def brute_pre() -> list[str]:
        sims = Xn @ (q / np.linalg.norm(q))
        sims[42] = -np.inf
        top = np.argpartition(-sims, 10)[:10]
        return [ids_all[i] for i in top[np.argsort(-sims[top])]]

    t_np_pre, _ = timed(brute_pre)
    print(f"top-10 numpy      : {t_np:.3f} s  (norms each query); {t_np_pre:.3f} s with pre-normalised rows; "
          f"matrix load {t_load_top:.2f} s")
    same = ([v for v, _ in top_duck] == top_np == [v for v, _ in top_mem] == [v for v, _ in top_cold]
            == [v for v, _ in top_plain])
    print(f"ratios            : DuckDB view (warm) / numpy = {t_duck_view / t_np:.1f}x, DuckDB mem / numpy = "
          f"{t_duck_mem / t_np:.1f}x, DuckDB view / DuckDB mem = {t_duck_view / t_duck_mem:.1f}x; "
          f"same top-10: {same}  (goal <= 1 s over {n:,} x {d})")
    con.close()
    if args.dir is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
