"""Bad-input torture: every class of odd input, run as real `mvrec` processes, each checked for its
exit code (docs/cli.md: 0 completed, 1 run failed, 2 bad input before any work), one line naming
the culprit and no traceback, what the store holds after, and no process left behind.
Run by hand; tests/test_reliability.py runs the fast cases.

    python bench/torture_input.py            # every case (the refresh cases start Prefect: minutes)
    python bench/torture_input.py --fast     # the cases that fail before any work (seconds)

Prints the table (case, exit code, first line of the message) and `N trials, N clean` with the
orphan processes found.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # tests/processes.py: the orphan check the tests use
MVREC = str(Path(sys.executable).with_name("mvrec"))


@dataclass
class Case:
    name: str
    args: list[str]  # after `mvrec`; {videos}, {root}, {store} are filled in
    rc: int
    message: str  # regex the last stderr line must match (rc != 0), or the stdout (rc 0)
    env: dict[str, str] = field(default_factory=dict)
    prepare: Callable[[Path], None] | None = None  # makes the input in the trial folder
    check: Callable[[Path], list[str]] | None = None  # store checks after the run: problems
    slow: bool = False  # runs a flow (starts Prefect)
    # (pause point, what to do there): the run is paused at a storage/delta.py pause point, the
    # function changes the world (fills the disk), and the run goes on
    pause: tuple[str, Callable[[Path], None]] | None = None


def _rows(store: Path, sql: str) -> list[tuple]:
    from storage import FeatureStore, connect

    with connect(FeatureStore(str(store), create=False)) as con:
        return con.execute(sql).fetchall()


def _expect(store: Path, sql: str, want: list[tuple]) -> list[str]:
    got = _rows(store, sql)
    return [] if got == want else [f"{sql}: {got}, want {want}"]


def _good(n: int) -> Callable[[Path], None]:
    def prepare(t: Path) -> None:
        (t / "videos").mkdir()
        for i in range(1, n + 1):
            shutil.copy(t.parent / "corpus" / "videos" / f"{i}.mp4", t / "videos" / f"{i}.mp4")
    return prepare


def _odd_name(t: Path) -> None:
    _good(5)(t)
    shutil.copy(t / "videos" / "1.mp4", t / "videos" / os.fsdecode(b"bad\xffname.mp4"))


def _links(t: Path) -> None:
    _good(2)(t)
    (t / "videos" / "dangling.mp4").symlink_to("nowhere.mp4")
    (t / "videos" / "loop_a.mp4").symlink_to("loop_b.mp4")
    (t / "videos" / "loop_b.mp4").symlink_to("loop_a.mp4")
    (t / "videos" / "up").symlink_to(".")


def _manifest(t: Path) -> None:
    _good(2)(t)
    (t / "list.txt").write_text("videos/1.mp4\nvideos/missing.mp4\nvideos/2.mp4\n")


def _bad_csv(t: Path) -> None:
    (t / "list.csv").write_text("name\nvideos/1.mp4\n")


def _store(t: Path) -> None:
    from storage import FeatureStore

    FeatureStore(str(t / "store"))


def _secret(t: Path) -> None:
    _store(t)
    (t / ".tmp").mkdir()
    (t / ".tmp" / "secret.csv").write_text("password\nhunter2\n")


def _small_disk(t: Path) -> None:
    """The store on its own 8 MB tmpfs (root only)."""
    _good(4)(t)
    (t / "store").mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(t / "store")], check=True)


def _fill_disk(t: Path) -> None:
    """Called while the run is paused before its first videos commit: no space left from here on."""
    with open(t / "store" / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:  # ENOSPC: full, as intended
            pass


def _after_full_disk(t: Path) -> list[str]:
    # The run must not stay `running`: failed when that could still be written, else abandoned by
    # the next start. Free the space and rerun: it completes, and the failed run is closed.
    os.remove(t / "store" / "filler")
    rerun = subprocess.run([MVREC, "refresh", str(t / "videos")], env=_ENV[0], capture_output=True, text=True,
                           cwd=t, timeout=1800)
    problems = [] if rerun.returncode == 0 else [f"rerun after freeing space exited {rerun.returncode}"]
    statuses = sorted(s for (s,) in _rows(t / "store" / "s", "SELECT status FROM runs"))
    if "running" in statuses or "completed" not in statuses or not {"failed", "abandoned"} & set(statuses):
        problems.append(f"run statuses after the rerun: {statuses}")
    problems += _expect(t / "store" / "s", "SELECT count(*) FROM videos", [(4,)])
    print(f"  (disk full: run statuses after freeing space and rerunning: {statuses})", flush=True)
    return problems


STORE = "{store}"
CASES = [
    # bad config or flags: exit 2 before any work
    Case("frame policy uniform:0", ["refresh", "{videos}"], 2, r"extract\.frames", {"MVREC_EXTRACT__FRAMES": "uniform:0"},
         _good(1)),
    Case("frame policy fps:-1", ["refresh", "{videos}"], 2, r"extract\.frames", {"MVREC_EXTRACT__FRAMES": "fps:-1"},
         _good(1)),
    Case("frame policy banana", ["refresh", "{videos}"], 2, r"extract\.frames", {"MVREC_EXTRACT__FRAMES": "banana"},
         _good(1)),
    Case("commit_size = -5", ["refresh", "{videos}"], 2, r"extract\.commit_size", {"MVREC_EXTRACT__COMMIT_SIZE": "-5"},
         _good(1)),
    Case("missing source", ["refresh", "{root}/nope"], 2, r"nope"),
    Case("missing model directory", ["refresh", "{videos}", "--model", "{root}/no-model"], 2, r"no-model", {}, _good(1)),
    Case("manifest CSV without a uri column", ["refresh", "{root}/list.csv"], 2, r"list\.csv.*'uri'", {}, _bad_csv),
    Case("unknown --extractor", ["study", "-i", "{root}/../corpus/pairs.tsv", "--extractor", "nope"], 2, r"'nope'",
         {}, _store),
    # SQL: refused, one line, exit 2
    Case("SQL reads a file", ["query", "SELECT * FROM read_csv('/etc/passwd')"], 2, r"passwd|refused|not allowed",
         {}, _store),
    Case("SQL globs a folder", ["query", "SELECT * FROM glob('/etc/*')"], 2, r"refused|not allowed", {}, _store),
    Case("SQL reads a URL", ["query", "SELECT * FROM read_csv('https://example.com/x.csv')"], 2,
         r"refused|not allowed", {}, _store),
    Case("SQL reads the temp directory", ["query", "SELECT * FROM read_csv('{root}/.tmp/secret.csv')"], 2,
         r"refused|not allowed", {}, _secret),
    Case("SQL duckdb_settings()", ["query", "SELECT * FROM duckdb_settings()"], 2, r"duckdb_settings\(\) not allowed",
         {}, _store),
    Case("SQL writes", ["query", "DELETE FROM videos"], 2, r"DELETE statements are not allowed", {}, _store),
    # odd files next to good videos: failure rows with a reason, the rest committed, exit 0
    Case("non-UTF-8 file name", ["refresh", "{videos}"], 0, r"UndecodableName", {}, _odd_name,
         lambda t: _expect(t / "store", "SELECT count(*) FROM videos", [(5,)]) + _expect(
             t / "store", "SELECT video_id, stage, error_type FROM failures", [("bad\\xffname", "read", "UndecodableName")]),
         slow=True),
    Case("symlink loops and a dangling symlink", ["refresh", "{videos}"], 0, r"SymlinkLoop", {}, _links,
         lambda t: _expect(t / "store", "SELECT count(*) FROM videos", [(2,)]) + _expect(
             t / "store", "SELECT video_id, error_type FROM failures ORDER BY 1",
             [("dangling", "DanglingSymlink"), ("loop_a", "SymlinkLoop"), ("loop_b", "SymlinkLoop"),
              ("up", "SymlinkLoop")]), slow=True),
    Case("manifest line naming a missing file", ["refresh", "{root}/list.txt"], 0, r"MissingFile", {}, _manifest,
         lambda t: _expect(t / "store", "SELECT count(*) FROM videos", [(2,)]) + _expect(
             t / "store", "SELECT video_id, error_type, message LIKE '%list.txt:2)' FROM failures",
             [("missing", "MissingFile", True)]), slow=True),
    # the store's disk fills up during the run: exit 1, the run does not stay `running`
    Case("disk full", ["refresh", "{videos}"], 1, r"No space left|os error 28", {"MVREC_STORE__PATH": "{root}/store/s"},
         _small_disk, _after_full_disk, slow=True, pause=("videos:before-write", _fill_disk)),
]
_ENV: list[dict[str, str]] = [{}]  # the env of the case being run (for a check that runs mvrec again)


def run_case(case: Case, base: Path, token: str) -> dict:
    """One case in a fresh folder under `base` (which holds corpus/ and model/)."""
    from processes import describe, survivors, tagged_env

    t = base / f"case-{uuid.uuid4().hex[:8]}"
    t.mkdir()
    if case.prepare:
        case.prepare(t)
    fill = {"{videos}": str(t / "videos"), "{root}": str(t), "{store}": str(t / "store")}

    def sub(s: str) -> str:
        for k, v in fill.items():
            s = s.replace(k, v)
        return s

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MVREC_", "PREFECT_"))}
    env.update({"MVREC_EXTRACT__MODEL": str(base / "model"), "MVREC_STORE__PATH": str(t / "store"),
                "MVREC_EXTRACT__FRAMES": "uniform:4", "MVREC_EXTRACT__COMMIT_SIZE": "4",
                "MVREC_PREFECT__HOME": str(base / "prefect"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                "COLUMNS": "200"})
    env.update({k: sub(v) for k, v in case.env.items()})
    _ENV[0] = env = tagged_env(token, env)
    marker = t / "paused"
    pause_env = {"MVREC_TEST_PAUSE_AT": case.pause[0], "MVREC_TEST_PAUSE_FILE": str(marker)} if case.pause else {}
    proc = subprocess.Popen([MVREC, *map(sub, case.args)], env={**env, **pause_env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=t)
    if case.pause:
        while not marker.exists() and proc.poll() is None:
            time.sleep(0.05)  # polling interval only
        if marker.exists():
            case.pause[1](t)
            marker.unlink()
    out, err_text = proc.communicate(timeout=1800)
    p = subprocess.CompletedProcess(proc.args, proc.returncode, out, err_text)
    err = p.stderr.strip().splitlines()
    last = err[-1] if err else ""
    problems = []
    if p.returncode != case.rc:
        problems.append(f"exit {p.returncode}, want {case.rc}")
    if case.rc == 2 and (len([x for x in err if not x.startswith("note:")]) != 1 or "Traceback" in p.stderr):
        problems.append(f"{len(err)} lines on stderr, want one: {p.stderr[-600:]!r}")
    text = last if case.rc else p.stdout
    if not re.search(case.message, text):
        problems.append(f"message {text[-300:]!r} does not match {case.message!r}")
    try:
        if case.check and p.returncode == case.rc:
            problems += case.check(t)
    finally:
        if os.path.ismount(t / "store"):
            subprocess.run(["umount", str(t / "store")], check=True)
    left = survivors(token)
    for x in left:
        x.kill()
    if left:
        problems.append(f"orphans: {describe(left)}")
    shown = last if p.returncode else next((x for x in p.stdout.splitlines() if re.search(case.message, x)), "")
    return {"case": case.name, "rc": p.returncode, "message": shown.strip()[:150], "problems": problems,
            "orphans": len(left)}


def make_base(base: Path) -> None:
    from mvrec.devtools.demo_data import make_demo_corpus
    from mvrec.devtools.test_model import build_test_model

    make_demo_corpus(base / "corpus", videos=5, users=20, seed=5, max_duration_s=2.0, workers=1)
    build_test_model(base / "model", layers=2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fast", action="store_true", help="only the cases that fail before any work")
    ap.add_argument("-k", default="", help="only cases whose name contains this")
    args = ap.parse_args()
    cases = [c for c in CASES if (not args.fast or not c.slow) and args.k in c.name]
    if os.geteuid() != 0:
        print("(not root: the disk-full case needs to mount a tmpfs; skipped)")
        cases = [c for c in cases if c.name != "disk full"]
    print(f"bad-input torture: {len(cases)} cases as real mvrec processes; load average {os.getloadavg()[0]:.2f}",
          flush=True)
    clean = orphans = 0
    with tempfile.TemporaryDirectory(prefix="mvrec-input-") as d:
        base = Path(d)
        make_base(base)
        print("| case | exit | message |\n|---|---|---|", flush=True)
        for case in cases:
            r = run_case(case, base, uuid.uuid4().hex)
            clean += not r["problems"]
            orphans += r["orphans"]
            print(f"| {r['case']} | {r['rc']} | {r['message']} |" + (f" PROBLEMS: {'; '.join(r['problems'])}"
                                                                     if r["problems"] else ""), flush=True)
    print(f"{len(cases)} trials, {clean} clean; {orphans} orphan processes found")
    print(json.dumps({"trials": len(cases), "clean": clean, "orphans": orphans}))


if __name__ == "__main__":
    main()
