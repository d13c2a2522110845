"""Crash torture: SIGKILL `mvrec refresh` at random points, rerun it, and check the store exactly.
Run by hand; tests/test_reliability.py runs a fast slice (two trials).

    python bench/torture_crash.py                       # 20 kills
    python bench/torture_crash.py --kills 4 --seed 7

The corpus: `--videos` demo videos, a file that is not a video, and a copy of a video under a
name that is not valid UTF-8. Each trial, on a fresh store, starts a real `mvrec refresh` (its
own ephemeral Prefect API, test model, commit size 4) and SIGKILLs it at a random point:
  - inside a commit, through the test-only pause points of storage/delta.py:
    <table>:before-write | mid-write | after-commit, at the table's k-th write in the run;
  - or after a random delay (Prefect starting, the model loading, decoding, ...).
Then:
  - no process of the killed run is left (psutil; every process it started carries a token in
    its environment, found again after reparenting);
  - `mvrec status`, before the rerun, shows the runs the killed process left `running` as
    `abandoned` (it only reads; the rerun records them);
  - a rerun `mvrec refresh` exits 0;
  - exact row counts: videos and captions = the good videos (every caption embedded),
    hidden_states = good videos x layers, no duplicate key in any table, failures = exactly the
    two bad files, no run left `running`, and every run the killed process left running is
    `abandoned`.
A kill point the run never reaches (it finished first) is not a kill: the trial is redone with
another point. Then `--query-kills` trials SIGKILL a running `mvrec query` and run another: the
killed query's spill directory must be gone after it (issue 23). Prints `N trials, N clean` with the orphan processes found.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # tests/processes.py: the orphan check the tests use
MVREC = str(Path(sys.executable).with_name("mvrec"))
LAYERS = 2  # test model decoder layers: stored layers 0..2 and -1
COMMIT = 4
# Pause points that a refresh of this corpus reaches, with how many times each table may be written
# (at most: a commit takes every result waiting, so fast results make fewer commits; a trial whose
# pause never comes is not counted and another is drawn).
TABLE_WRITES = {"videos": 2, "captions": 3, "hidden_states": 2, "failures": 2, "runs": 2, "extractors": 1}
STAGES = ("before-write", "mid-write", "after-commit")


def make_corpus(root: Path, videos: int) -> Path:
    """Demo videos, one file that is not a video, one good video under a non-UTF-8 name; and the model."""
    from mvrec.devtools.demo_data import make_demo_corpus
    from mvrec.devtools.test_model import build_test_model

    make_demo_corpus(root / "corpus", videos=videos, users=20, seed=11, max_duration_s=2.5, workers=1)
    build_test_model(root / "model", layers=LAYERS)
    d = root / "corpus" / "videos"
    (d / "not_a_video.mp4").write_text("this is text, not a video\n")
    shutil.copy(next(d.glob("1.*")), d / os.fsdecode(b"bad\xffname.mp4"))
    return d


def env_for(root: Path, store: Path, token: str, api_url: str | None = None, **extra: str) -> dict[str, str]:
    from processes import tagged_env

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MVREC_", "PREFECT_"))}
    env.update({"MVREC_EXTRACT__MODEL": str(root / "model"), "MVREC_STORE__PATH": str(store),
                "MVREC_EXTRACT__FRAMES": "uniform:4", "MVREC_EXTRACT__COMMIT_SIZE": str(COMMIT),
                "MVREC_EXTRACT__BATCH_SIZE": "4", "MVREC_PREFECT__HOME": str(root / "prefect"),
                "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **extra})
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return tagged_env(token, env)


def kill_at(proc: subprocess.Popen, marker: Path, point: str | None, nth: int, delay: float) -> bool:
    """SIGKILL `proc` at its nth pause at `point` (skipping the earlier ones), or after `delay` s.
    False if it exited first."""
    if point is None:
        try:
            proc.wait(timeout=delay)
            return False
        except subprocess.TimeoutExpired:
            pass
    else:
        seen = 0
        while True:
            if marker.exists():
                seen += 1
                if seen == nth:
                    break
                marker.unlink()  # let it go on to the next write
            elif proc.poll() is not None:
                return False
            time.sleep(0.02)  # polling interval only
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


def check_store(store: Path, good: int, left_running: set[str]) -> list[str]:
    from storage import FeatureStore, connect

    problems = []
    keys = {"videos": "video_id, content_sha256", "captions": "video_id, content_sha256, extractor_id",
            "hidden_states": "video_id, content_sha256, extractor_id, layer", "failures": "video_id, extractor_id, stage"}
    want = {"videos": good, "captions": good, "hidden_states": good * (LAYERS + 2), "failures": 2}
    with connect(FeatureStore(str(store), create=False)) as con:
        for t, k in keys.items():
            (n, d), = con.execute(f"SELECT count(*), count(DISTINCT ({k})) FROM {t}").fetchall()
            if n != want[t] or d != n:
                problems.append(f"{t}: {n} rows ({n - d} duplicates), want {want[t]}")
        (unembedded,), = con.execute("SELECT count(*) FROM captions WHERE text_embedding IS NULL").fetchall()
        if unembedded:
            problems.append(f"{unembedded} captions without text_embedding")
        failed = sorted(r[0] for r in con.execute("SELECT video_id FROM failures").fetchall())
        if failed != ["bad\\xffname", "not_a_video"]:
            problems.append(f"failures {failed}")
        runs = dict(con.execute("SELECT run_id, status FROM runs").fetchall())
    if "running" in runs.values():
        problems.append(f"runs left running: {[r for r, s in runs.items() if s == 'running']}")
    if any(runs.get(r) != "abandoned" for r in left_running):
        problems.append(f"killed run(s) not abandoned: { {r: runs.get(r) for r in left_running} }")
    return problems


def running_runs_of(store: Path, pid: int) -> set[str]:
    import json

    from storage import FeatureStore

    if not (store / "runs").exists():
        return set()
    rows = FeatureStore(str(store), create=False).read("runs").to_pylist()
    return {r["run_id"] for r in rows if r["status"] == "running" and r["owner"]
            and json.loads(r["owner"])["pid"] == pid}


def status_shows_abandoned(root: Path, store: Path, token: str, killed_runs: set[str]) -> list[str]:
    """`mvrec status` after the kill, before any rerun: the killed run's rows still say `running`,
    and status shows them `abandoned` (its process is gone)."""
    import json

    if not killed_runs:
        return []
    p = subprocess.run([MVREC, "status", "--json", "--no-files"], env=env_for(root, store, token),
                       capture_output=True, text=True, timeout=600)
    if p.returncode:
        return [f"status after the kill exited {p.returncode}: {(p.stderr.strip().splitlines() or [''])[-1]}"]
    shown = {r["run_id"]: r["status"] for r in json.loads(p.stdout)["runs"]}
    wrong = {r: shown.get(r) for r in killed_runs if shown.get(r) != "abandoned"}
    return [f"status shows the killed run(s) as {wrong}"] if wrong else []


QUERY = "SELECT count(*) FROM range(3000000000) a WHERE a.range % 7 = 3"  # runs for minutes


def query_trial(root: Path, store: Path) -> dict:
    """SIGKILL a running `mvrec query`, then run another: the killed one's spill directory
    (mvrec-duckdb-<pid>-...) is removed by the next connection, and no process is left."""
    import tempfile

    from processes import describe, survivors

    token = uuid.uuid4().hex
    tmp = Path(tempfile.gettempdir())
    proc = subprocess.Popen([MVREC, "query", QUERY, "-f", "csv"], env=env_for(root, store, token),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    mine: list[Path] = []
    while not mine and proc.poll() is None:
        mine = list(tmp.glob(f"mvrec-duckdb-{proc.pid}-*"))
        time.sleep(0.02)  # polling interval only
    problems = [] if mine else [f"the query exited ({proc.returncode}) before its spill directory was seen"]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if mine and not mine[0].is_dir():
        problems.append("the killed query's spill directory was already gone (nothing to test)")
    after = subprocess.run([MVREC, "query", "SELECT 1 AS x", "-f", "csv"], env=env_for(root, store, token),
                           capture_output=True, text=True, timeout=600)
    if after.returncode:
        problems.append(f"the next query exited {after.returncode}")
    if mine and mine[0].exists():
        problems.append(f"{mine[0]} left after the next query")
    left = survivors(token)
    for p in left:
        p.kill()
    problems += [f"orphans: {describe(left)}"] if left else []
    return {"problems": problems, "orphans": len(left)}


def trial(root: Path, videos_dir: Path, good: int, point: str | None, nth: int, delay: float,
          api_url: str | None) -> dict:
    """One kill and its rerun on a fresh store. Returns killed (bool), problems, orphans."""
    from processes import describe, survivors

    store, token, marker = root / f"store-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex, root / "paused"
    marker.unlink(missing_ok=True)
    pause = {"MVREC_TEST_PAUSE_AT": point, "MVREC_TEST_PAUSE_FILE": str(marker)} if point else {}
    log = root / "killed.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([MVREC, "refresh", str(videos_dir)], env=env_for(root, store, token, **pause),
                                stdout=out, stderr=subprocess.STDOUT)
    killed = kill_at(proc, marker, point, nth, delay)
    left = survivors(token)
    for p in left:
        p.kill()
    problems = [f"orphans: {describe(left)}"] if left else []
    if not killed:
        shutil.rmtree(store, ignore_errors=True)
        return {"killed": False, "problems": problems, "orphans": len(left)}
    left_running = running_runs_of(store, proc.pid)
    problems += status_shows_abandoned(root, store, token, left_running)
    rerun = subprocess.run([MVREC, "refresh", str(videos_dir)], env=env_for(root, store, token, api_url),
                           capture_output=True, text=True, timeout=1800)
    if rerun.returncode != 0:
        problems.append(f"rerun exited {rerun.returncode}: {(rerun.stderr.strip().splitlines() or [''])[-1]}")
    else:
        problems += check_store(store, good, left_running)
    orphans = len(left)
    left = survivors(token)
    problems += [f"orphans after the rerun: {describe(left)}"] if left else []
    shutil.rmtree(store, ignore_errors=True)
    return {"killed": True, "problems": problems, "orphans": orphans + len(left), "abandoned": len(left_running)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--videos", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-delay", type=float, default=45.0, help="upper bound of a random kill delay, seconds")
    ap.add_argument("--query-kills", type=int, default=3, help="SIGKILLed `mvrec query` runs (spill directories)")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    from flows.runtime import configure_prefect, start_api
    from mvrec.config import PrefectConfig

    with tempfile.TemporaryDirectory(prefix="mvrec-crash-") as d:
        root = Path(d)
        videos_dir = make_corpus(root, args.videos)
        # Reruns share one API server (this process's, dies with it); killed runs start their own.
        configure_prefect(PrefectConfig(home=str(root / "prefect-bench")))
        start_api()
        api_url = os.environ["PREFECT_API_URL"]
        print(f"crash torture: {args.videos} videos + 2 bad files, commit size {COMMIT}, test model, "
              f"OMP_NUM_THREADS=1; load average {os.getloadavg()[0]:.2f}", flush=True)
        trials = clean = orphans = attempts = abandoned = 0
        while trials < args.kills and attempts < 3 * args.kills:
            attempts += 1
            if rng.random() < 0.7:
                table = rng.choice(sorted(TABLE_WRITES))
                point, nth, delay = f"{table}:{rng.choice(STAGES)}", rng.randint(1, TABLE_WRITES[table]), 0.0
                what = f"{point} #{nth}"
            else:
                point, nth, delay = None, 0, rng.uniform(1.0, args.max_delay)
                what = f"after {delay:.1f} s"
            t0 = time.perf_counter()
            r = trial(root, videos_dir, args.videos, point, nth, delay, api_url)
            orphans += r["orphans"]
            if not r["killed"]:
                print(f"  ({what}: the run finished first; not counted)", flush=True)
                continue
            trials += 1
            clean += not r["problems"]
            abandoned += r["abandoned"]
            print(f"trial {trials}: kill {what}, {r['abandoned']} run(s) left running -> abandoned: "
                  + ("clean" if not r["problems"] else "PROBLEMS: " + "; ".join(r["problems"]))
                  + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
        store = root / "query-store"
        from storage import FeatureStore

        FeatureStore(str(store))
        for _ in range(args.query_kills):
            r = query_trial(root, store)
            trials += 1
            clean += not r["problems"]
            orphans += r["orphans"]
            print(f"trial {trials}: SIGKILL a running query, then query again: "
                  + ("clean" if not r["problems"] else "PROBLEMS: " + "; ".join(r["problems"])), flush=True)
    print(f"{trials} trials, {clean} clean; {orphans} orphan processes found; {abandoned} killed runs marked "
          "abandoned by the rerun (and shown abandoned by `mvrec status` before it)")


if __name__ == "__main__":
    main()
