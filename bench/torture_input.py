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
    unprivileged: bool = False  # run without the capabilities that let root ignore file permissions
    holder: str | None = None  # Python run (case env) before the command; kept until the command ends
    root_only: bool = False  # needs to mount a tmpfs


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


def _store_of(n: int) -> Callable[[Path], None]:
    """n good videos and an empty store."""
    def prepare(t: Path) -> None:
        _good(n)(t)
        _store(t)
    return prepare


def _read_only_store(t: Path) -> None:
    _store_of(2)(t)
    subprocess.run(["chmod", "-R", "a-w", str(t / "store")], check=True)


def _unchanged_store(t: Path) -> list[str]:
    subprocess.run(["chmod", "-R", "u+w", str(t / "store")], check=True)
    return _expect(t / "store", "SELECT count(*) FROM runs", [(0,)])


def _store_is_a_file(t: Path) -> None:
    _good(1)(t)
    (t / "store").write_text("not a store\n")


def _full_output_disk(t: Path) -> None:
    """A store, and the output folder on a 1 MB tmpfs that is already full (root only)."""
    _store(t)
    (t / "out").mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(t / "out")], check=True)
    with open(t / "out" / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:  # ENOSPC
            pass


def _nothing_but_filler(t: Path) -> list[str]:
    left = sorted(p.name for p in (t / "out").iterdir())
    return [] if left == ["filler"] else [f"files left in the full folder: {left}"]


def _log_untouched(t: Path) -> list[str]:
    bad = [p.name for p in (t / "store" / "videos" / "_delta_log").iterdir() if not p.name.endswith(".json")]
    return ([f"written into _delta_log: {bad}"] if bad else []) + _expect(t / "store", "SELECT count(*) FROM videos",
                                                                          [(0,)])


def _junk_checkpoint(t: Path) -> None:
    (t / "junk.pt").write_bytes(bytes(range(256)) * 40)
    (t / "run.json").write_text('{"not": "a checkpoint"}\n')


def _garbage_pairs(t: Path) -> None:
    (t / "garbage.bin").write_bytes(bytes(range(128, 256)) * 64)


def _bom_pairs(t: Path) -> None:
    lines = (t.parent / "corpus" / "pairs.tsv").read_text().splitlines()
    (t / "bom.tsv").write_bytes(("\ufeff" + "\n".join(lines) + "\n").encode())


def _bom_first_user(t: Path) -> list[str]:
    first = (t.parent / "corpus" / "pairs.tsv").read_text().split("\t", 1)[0]
    p = subprocess.run([MVREC, "recommend", "-u", first, "--run", str(t / "run")], env=_ENV[0], capture_output=True,
                       text=True, cwd=t, timeout=600)
    return [] if p.returncode == 0 else [f"recommend -u {first} (the first user) exited {p.returncode}: "
                                         f"{p.stderr.strip()[-200:]}"]


def _odd_files(t: Path) -> None:
    _good(3)(t)
    os.mkfifo(t / "videos" / "fifo.mp4")
    (t / "videos" / "zero.mp4").symlink_to("/dev/zero")
    shutil.copy(t / "videos" / "1.mp4", t / "videos" / "3.mkv")  # 3.mp4 and 3.mkv: one video id


def _revert_and_check(t: Path) -> list[str]:
    """Issue 23: refresh (done), 2.mp4 becomes 5.mp4's content, refresh, 2.mp4 back, refresh: the
    store serves the original 2's features and status lists no changed file."""
    from flows.plan import extractor_record
    from mvrec.config import load_config
    from storage import FeatureStore

    original = (t / "videos" / "2.mp4").read_bytes()
    problems = []

    def refresh(step: str) -> None:
        p = subprocess.run([MVREC, "refresh", str(t / "videos")], env=_ENV[0], capture_output=True, text=True, cwd=t,
                           timeout=1800)
        if p.returncode:
            problems.append(f"{step}: refresh exited {p.returncode}: {p.stderr.strip()[-200:]}")

    shutil.copy(t / "videos" / "5.mp4", t / "videos" / "2.mp4")
    refresh("after the swap")
    (t / "videos" / "2.mp4").write_bytes(original)
    refresh("after the revert")
    saved = {k: os.environ.get(k) for k in _ENV[0] if k.startswith("MVREC_")}
    os.environ.update({k: v for k, v in _ENV[0].items() if k.startswith("MVREC_")})
    try:
        eid = extractor_record(load_config()).extractor_id
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    store = FeatureStore(str(t / "store"), create=False)
    import hashlib

    import numpy as np

    sha = hashlib.sha256(original).hexdigest()
    if store.completed(eid) & {("2", s) for s in (sha,)} != {("2", sha)}:
        problems.append("video 2's current content is not the completed one")
    two, five = (store.layer_matrix(eid, 0, [v]).values for v in ("2", "5"))
    if np.allclose(two, five):
        problems.append("layer_matrix(eid, 0, ['2']) returns 5.mp4's features after the revert")
    st = subprocess.run([MVREC, "status", "--json"], env=_ENV[0], capture_output=True, text=True, cwd=t, timeout=600)
    changed = json.loads(st.stdout)["changed_files"]["count"] if st.returncode == 0 else None
    if changed != 0:
        problems.append(f"status lists {changed} changed files after the revert")
    return problems


_STALLED: list = []  # the listening socket of a server that accepts and never answers


def _stalled_manifest(t: Path) -> None:
    """A manifest naming a good video and a URL whose server never answers (a stalled network read)."""
    import socket

    _good(2)(t)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    _STALLED.append(server)
    url = f"http://127.0.0.1:{server.getsockname()[1]}/stalled.mp4"
    (t / "list.txt").write_text(f"videos/1.mp4\n{url}\nvideos/2.mp4\n")


def _timed_out(t: Path) -> list[str]:
    while _STALLED:
        _STALLED.pop().close()
    return _expect(t / "store", "SELECT count(*) FROM videos", [(2,)]) + _expect(
        t / "store", "SELECT video_id, permanent, error_type = 'ReadTimeout' OR message LIKE 'ReadTimeout: %' "
                     "FROM failures", [("stalled", False, True)])


_HOLD_LEASE = """
import sys
from flows.plan import extractor_record
from mvrec.config import load_config
from storage import open_store
cfg = load_config()
with open_store(cfg.store).run_lease(extractor_record(cfg).extractor_id):
    print("held", flush=True)
    sys.stdin.readline()
"""

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
    Case("SQL pg_settings", ["query", "SELECT name, setting FROM pg_settings"], 2,
         r"duckdb_settings\(\) not allowed.*pg_settings", {}, _store),
    Case("SQL information_schema.views", ["query", "SELECT view_definition FROM information_schema.views"], 2,
         r"reads duckdb_views\(\)\.sql", {}, _store),
    # the store cannot be used: one line, exit 2, before any work, nothing written
    Case("read-only store under refresh", ["refresh", "{videos}"], 2, r"^error: store not writable: .*Permission denied",
         {}, _read_only_store, _unchanged_store, unprivileged=True),
    Case("store path is a file", ["refresh", "{videos}"], 2, r"store\.path: .*store is a file", {}, _store_is_a_file),
    Case("query -o on a full disk", ["query", "SELECT range AS i FROM range(200000)", "-f", "csv", "-o",
                                     "{root}/out/rows.csv"], 2, r"--out .*rows\.csv: cannot write it: No space left",
         {}, _full_output_disk, _nothing_but_filler, root_only=True),
    Case("query -o inside the store", ["query", "SELECT 1 AS x", "-f", "csv", "-o",
                                       "{store}/videos/_delta_log/x.csv"], 2, r"inside the feature store", {}, _store,
         _log_untouched),
    Case("recommend --run on random bytes", ["recommend", "-u", "1", "--run", "{root}/junk.pt"], 2,
         r"junk\.pt is not an mvrec checkpoint", {}, _junk_checkpoint),
    Case("recommend --run on a JSON file", ["recommend", "-u", "1", "--run", "{root}/run.json"], 2,
         r"run\.json is not an mvrec checkpoint", {}, _junk_checkpoint),
    Case("train -i on binary garbage", ["train", "-i", "{root}/garbage.bin"], 2,
         r"garbage\.bin: not a UTF-8 text file", {}, _garbage_pairs),
    # another run holds the store for this extractor: one line naming it, exit 1 (try later)
    Case("overlapping refresh", ["refresh", "{videos}", "--always"], 1,
         r"another run is extracting extractor \w+ into .*: process \d+ on .*this run did not start",
         {}, _store_of(1), lambda t: _expect(t / "store", "SELECT count(*) FROM runs", [(0,)]), holder=_HOLD_LEASE),
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
    Case("FIFO, /dev/zero and x.mp4 + x.mkv in the source", ["refresh", "{videos}"], 0, r"NotARegularFile|processed",
         {}, _odd_files,
         lambda t: _expect(t / "store", "SELECT count(*) FROM videos", [(2,)]) + _expect(
             t / "store", "SELECT video_id, error_type FROM failures ORDER BY 1",
             [("3", "DuplicateVideoId"), ("fifo", "NotARegularFile"), ("zero", "NotARegularFile")]), slow=True),
    # a read that never makes progress (read timeout 60 s): a transient failure (exit 1, retry later),
    # recorded as a row that is not permanent; the rest committed
    Case("stalled network read", ["refresh", "{root}/list.txt"], 1, r"transient", {}, _stalled_manifest,
         _timed_out, slow=True),
    Case("file reverted to its earlier content", ["refresh", "{videos}"], 0, r"processed", {}, _good(5),
         _revert_and_check, slow=True),
    Case("pairs file with a byte-order mark", ["train", "-i", "{root}/bom.tsv", "--epochs", "1", "-o", "{root}/run"],
         0, r"users", {}, _bom_pairs, _bom_first_user, slow=True),
    # the store's disk fills up during the run: exit 1, the run does not stay `running`
    Case("disk full", ["refresh", "{videos}"], 1, r"No space left|os error 28", {"MVREC_STORE__PATH": "{root}/store/s"},
         _small_disk, _after_full_disk, slow=True, pause=("videos:before-write", _fill_disk)),
]
_ENV: list[dict[str, str]] = [{}]  # the env of the case being run (for a check that runs mvrec again)
# Root ignores permission bits (CAP_DAC_OVERRIDE); without these capabilities the kernel applies them.
_UNPRIVILEGED = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner,-linux_immutable"]


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
    holder = None
    if case.holder:
        holder = subprocess.Popen([sys.executable, "-c", case.holder], env=env, cwd=ROOT, stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        holder.stdout.readline()  # "held"
    prefix = _UNPRIVILEGED if case.unprivileged and os.geteuid() == 0 else []
    proc = subprocess.Popen([*prefix, MVREC, *map(sub, case.args)], env={**env, **pause_env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=t)
    if case.pause:
        while not marker.exists() and proc.poll() is None:
            time.sleep(0.05)  # polling interval only
        if marker.exists():
            case.pause[1](t)
            marker.unlink()
    out, err_text = proc.communicate(timeout=1800)
    if holder is not None:
        holder.communicate("\n")
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
        for mount in (t / "store", t / "out"):
            if os.path.ismount(mount):
                subprocess.run(["umount", str(mount)], check=True)
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
        print("(not root: the disk-full cases need to mount a tmpfs; skipped)")
        cases = [c for c in cases if c.name != "disk full" and not c.root_only]
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
