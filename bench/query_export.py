"""`mvrec query -o FILE` export: peak RSS and time, against DuckDB's own COPY ... TO (the best
plain way to write a query result to a file; `mvrec query` refuses COPY because it writes
anywhere). Each run is a separate process, its peak RSS taken from wait4's rusage.

    python bench/query_export.py                 # 10M rows, csv and parquet
    python bench/query_export.py --rows 1000000  # smaller

Nothing here is asserted; the figures are printed side by side.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

COPY = """
import sys, duckdb
duckdb.connect().execute(f"COPY ({sys.argv[1]}) TO '{sys.argv[2]}' (FORMAT {sys.argv[3]})")
"""


def run(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of one child process."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr.read().decode()}")
    return wall, usage.ru_maxrss / 1024  # KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--formats", default="csv,parquet")
    args = ap.parse_args()
    sql = f"select range i, 'x'||range s from range({args.rows})"
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    print(f"query export: {args.rows:,} rows, `{sql}`; OMP_NUM_THREADS={threads}, "
          f"load average {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="mvrec-bench-export-") as d:
        store = Path(d) / "store"
        env = {**os.environ, "MVREC_STORE__PATH": str(store), "PYTHONPATH": str(ROOT)}
        subprocess.run([sys.executable, "-c", f"from storage import FeatureStore; FeatureStore({str(store)!r})"],
                       env=env, check=True)
        print(f"{'format':8} {'way':26} {'seconds':>8} {'peak RSS MB':>12} {'file MB':>8}")
        for fmt in args.formats.split(","):
            out_m, out_d = Path(d) / f"m.{fmt}", Path(d) / f"d.{fmt}"
            mvrec = [sys.executable, "-c", "from mvrec.cli import main; main()"]
            t_m, rss_m = run(mvrec + ["query", sql, "-f", fmt, "-o", str(out_m)], env)
            t_d, rss_d = run([sys.executable, "-c", COPY, sql, str(out_d), fmt], env)
            print(f"{fmt:8} {'mvrec query -o (streamed)':26} {t_m:8.1f} {rss_m:12.0f} {out_m.stat().st_size / 1e6:8.0f}")
            print(f"{fmt:8} {'duckdb COPY TO (baseline)':26} {t_d:8.1f} {rss_d:12.0f} {out_d.stat().st_size / 1e6:8.0f}")
            print(f"{fmt:8} ratio mvrec/COPY: time {t_m / t_d:.1f}x, peak RSS {rss_m / rss_d:.2f}x")
            out_m.unlink()
            out_d.unlink()


if __name__ == "__main__":
    main()
