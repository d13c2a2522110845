"""Idempotent refresh: the second run on an unchanged corpus must do no LVLM work and take
<= 5% of the first run's wall time.

Measured two ways, side by side in one run:
- in-process: two calls of the nightly_refresh flow in one Python process (what a long-lived
  worker serving the deployment does);
- CLI: two `mvrec refresh` processes (each pays Python imports and an embedded Prefect start).

    python bench/refresh.py [--videos 64]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", type=int, default=64)
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mvrec-bench-refresh-"))
    os.environ["PREFECT_HOME"] = str(work / "prefect")
    from flows.runtime import configure_prefect
    from mvrec.config import PrefectConfig

    configure_prefect(PrefectConfig(home=str(work / "prefect")))
    from mvrec.devtools.demo_data import make_demo_corpus
    from mvrec.devtools.test_model import build_test_model

    make_demo_corpus(work / "corpus", videos=args.videos, users=100, seed=0)
    build_test_model(work / "model")
    print(f"corpus: {args.videos} demo videos; model: local random-weight TEST MODEL (4 layers, hidden 128)")

    from flows.refresh import nightly_refresh

    ov = {"extract.model": str(work / "model"), "store.path": str(work / "store-a")}
    t = time.perf_counter()
    nightly_refresh(str(work / "corpus" / "videos"), overrides=ov)
    first = time.perf_counter() - t
    t = time.perf_counter()
    again = nightly_refresh(str(work / "corpus" / "videos"), overrides=ov)
    second = time.perf_counter() - t
    new_calls = again["extract"]["processed"]
    print(f"in-process  first {first:7.2f} s   second {second:6.2f} s   ratio {second / first:6.2%}   "
          f"LVLM videos in second run: {new_calls}")

    mvrec = str(Path(sys.executable).with_name("mvrec"))
    env = {**os.environ, "MVREC_EXTRACT__MODEL": str(work / "model"), "MVREC_STORE__PATH": str(work / "store-b"),
           "MVREC_PREFECT__HOME": str(work / "prefect")}
    times = []
    for _ in range(2):
        t = time.perf_counter()
        subprocess.run([mvrec, "refresh", str(work / "corpus" / "videos")], env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - t)
    print(f"CLI         first {times[0]:7.2f} s   second {times[1]:6.2f} s   ratio {times[1] / times[0]:6.2%}   "
          "(each process pays imports and an embedded Prefect start)")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"kept {work}")


if __name__ == "__main__":
    main()
