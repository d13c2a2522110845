"""Runs that crash are marked, runs that fail say so, and no process outlives its test.

The processes here are real: a writer that SIGKILLs itself, an ephemeral Prefect API server whose
parent is SIGKILLed. `no_orphans` fails a test if any process it started survives it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from storage import FeatureStore
from storage.runs import owner_gone, process_owner


def _runs(store: FeatureStore) -> dict[str, dict]:
    return {r["run_id"]: r for r in store.read("runs").to_pylist()}


def test_a_killed_run_is_marked_abandoned_by_the_next_start(tmp_path):
    # A real crash: the writer records its run, then SIGKILLs itself (no finally, no atexit).
    script = textwrap.dedent(f"""
        import os, signal
        from storage import FeatureStore
        FeatureStore({str(tmp_path / 'store')!r}).start_run("extract-features", run_id="killed")
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    rc = subprocess.run([sys.executable, "-c", script], timeout=120).returncode
    assert rc == -signal.SIGKILL
    store = FeatureStore(str(tmp_path / "store"))
    assert _runs(store)["killed"]["status"] == "running"
    assert owner_gone(_runs(store)["killed"]["owner"])

    store.start_run("extract-features", run_id="next")
    runs = _runs(store)
    assert runs["killed"]["status"] == "abandoned"
    # Found by the next start, before that run's own row was written.
    assert runs["killed"]["started"] <= runs["killed"]["finished"] <= runs["next"]["started"]
    assert runs["killed"]["message"].startswith("abandoned: process ") and "was gone when found at" in runs[
        "killed"]["message"]
    assert runs["next"]["status"] == "running"  # this process is alive: never marked
    assert store.mark_abandoned() == []


def test_status_shows_a_killed_run_as_abandoned_without_writing(tmp_path):
    from storage.status import store_status

    script = textwrap.dedent(f"""
        import os, signal
        from storage import FeatureStore
        FeatureStore({str(tmp_path / 'store')!r}).start_run("extract-features", run_id="killed")
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    store = FeatureStore(str(tmp_path / "store"))
    store.start_run("extract-features", run_id="alive")  # this process: running
    assert subprocess.run([sys.executable, "-c", script], timeout=120).returncode == -signal.SIGKILL
    version = store.table("runs").version()
    shown = {r["run_id"]: r for r in store_status(FeatureStore(store.root, create=False), check_files=False)["runs"]}
    assert shown["killed"]["status"] == "abandoned" and "is gone" in shown["killed"]["message"]
    assert shown["alive"]["status"] == "running"
    assert store.table("runs").version() == version and _runs(store)["killed"]["status"] == "running"  # only read


def test_a_reused_pid_or_another_host_is_told_apart(tmp_path):
    me = json.loads(process_owner())
    assert not owner_gone(process_owner())
    # The same pid with another start time is a newer process that reused the pid: the run's is gone.
    assert owner_gone(json.dumps({**me, "pid_started": me["pid_started"] - 100}))
    # A run of another host cannot be checked from here: left alone. No owner (older rows): left alone.
    assert not owner_gone(json.dumps({**me, "host": me["host"] + "-elsewhere", "pid": 2**22 + 7}))
    assert not owner_gone(None)


def test_an_exception_inside_a_run_ends_it_failed(tmp_path):
    store = FeatureStore(str(tmp_path / "store"))
    run_id = store.start_run("extract-features")
    with pytest.raises(OSError, match="No space left"):
        with store.failing_run(run_id):
            raise OSError(28, "No space left on device")
    row = _runs(store)[run_id]
    assert row["status"] == "failed" and row["finished"] is not None
    assert row["message"] == "OSError: [Errno 28] No space left on device"


def _bench(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def input_base(tmp_path_factory):
    base = tmp_path_factory.mktemp("input")
    _bench("torture_input").make_base(base)
    return base


FAST_INPUT = ["frame policy banana", "commit_size = -5", "missing source", "manifest CSV without a uri column",
              "unknown --extractor", "SQL reads the temp directory", "SQL duckdb_settings()",
              # issue 23
              "SQL pg_settings", "SQL information_schema.views", "read-only store under refresh",
              "store path is a file", "query -o on a full disk", "query -o inside the store",
              "recommend --run on random bytes", "recommend --run on a JSON file", "train -i on binary garbage",
              "overlapping refresh"]


@pytest.mark.parametrize("name", FAST_INPUT)
def test_bad_input_slice(input_base, name, no_orphans):
    # A slice of bench/torture_input.py (run it by hand for every class, refresh runs included).
    torture = _bench("torture_input")
    (case,) = [c for c in torture.CASES if c.name == name]
    if case.root_only and os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    got = torture.run_case(case, input_base, no_orphans)
    assert got["problems"] == [] and got["rc"] == case.rc


@pytest.mark.slow
def test_odd_file_names_slice(input_base, no_orphans):
    torture = _bench("torture_input")
    (case,) = [c for c in torture.CASES if c.name == "non-UTF-8 file name"]
    got = torture.run_case(case, input_base, no_orphans)
    assert got["problems"] == [] and got["rc"] == 0


@pytest.mark.slow
def test_crash_torture_slice(tmp_path, no_orphans):
    # Two trials of bench/torture_crash.py (run it by hand for 20+): SIGKILLed inside a commit,
    # between the data files and the log entry, then rerun and checked row by row.
    torture = _bench("torture_crash")
    videos = torture.make_corpus(tmp_path, videos=5)
    # The first hidden_states commit: how many follow depends on how fast results arrive (a commit
    # takes every result waiting), so only the first is sure to happen.
    for point, nth in (("hidden_states:mid-write", 1), ("captions:after-commit", 1)):
        got = torture.trial(tmp_path, videos, 5, point, nth, 0.0, api_url=None)
        assert got["killed"] and got["problems"] == [] and got["orphans"] == 0, (point, got)
        assert got["abandoned"] == 1


def test_a_killed_query_slice(tmp_path, no_orphans):
    # bench/torture_crash.py's query trial: a SIGKILLed `mvrec query`, then another query.
    torture = _bench("torture_crash")
    store = FeatureStore(str(tmp_path / "store"))
    got = torture.query_trial(tmp_path, Path(store.root))
    assert got["problems"] == [] and got["orphans"] == 0


# --- issue 23: run leases, killed queries' temp directories ------------------------------------

LEASE_HOLDER = textwrap.dedent("""
    import sys
    from storage import FeatureStore
    with FeatureStore(sys.argv[1]).run_lease(sys.argv[2]) as owner:
        print("held", owner["pid"], flush=True)
        sys.stdin.readline()  # hold until told, or until killed
""")


def test_a_second_run_of_the_same_extractor_is_refused_naming_the_owner(tmp_path):
    from storage import RunLeaseHeld

    store = FeatureStore(str(tmp_path / "store"))
    with store.run_lease("e1") as owner:
        assert store.lease_holder("e1") == owner and owner["pid"] == os.getpid()
        with pytest.raises(RunLeaseHeld, match=rf"another run is extracting extractor e1 into .*: process "
                                               rf"{os.getpid()} on .*, started .* UTC; this run did not start"):
            with FeatureStore(str(tmp_path / "store")).run_lease("e1"):
                pass
        with store.run_lease("e2"):  # another extractor: its own lease
            assert store.lease_holder("e2")["pid"] == os.getpid()
    assert store.lease_holder("e1") is None
    with store.run_lease("e1"):  # free again
        pass


def test_a_lease_expires_when_its_owner_is_killed(tmp_path, no_orphans):
    from processes import tagged_env

    from storage import RunLeaseHeld

    store = FeatureStore(str(tmp_path / "store"))
    child = subprocess.Popen([sys.executable, "-c", LEASE_HOLDER, store.root, "e1"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env=tagged_env(no_orphans))
    try:
        assert child.stdout.readline().split() == ["held", str(child.pid)]
        assert store.lease_holder("e1")["pid"] == child.pid
        with pytest.raises(RunLeaseHeld, match=f"process {child.pid} on "):
            with store.run_lease("e1"):
                pass
    finally:
        child.kill()  # SIGKILL: no finally, no atexit in the owner
        child.wait()
    assert store.lease_holder("e1") is None  # the kernel released it with its owner
    with store.run_lease("e1") as owner:
        assert owner["pid"] == os.getpid()


KILLED_QUERY = textwrap.dedent("""
    import os, signal, sys
    from storage import connect
    con = connect(sys.argv[1])
    print(con.temp_dir, flush=True)
    if sys.argv[2] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    sys.stdin.readline()
""")


def test_a_killed_querys_temp_directory_is_removed_by_the_next_connection(tmp_path, no_orphans):
    from processes import tagged_env

    from storage import connect

    store = FeatureStore(str(tmp_path / "store"))

    def query(how: str) -> tuple[subprocess.Popen, str]:
        p = subprocess.Popen([sys.executable, "-c", KILLED_QUERY, store.root, how], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env=tagged_env(no_orphans))
        return p, p.stdout.readline().strip()

    killed, left = query("kill")
    assert killed.wait() == -signal.SIGKILL and os.path.isdir(left)  # what issue 23 found
    alive, kept = query("wait")
    try:
        with connect(store) as con:
            assert not os.path.exists(left)  # its owner is dead: removed
            assert os.path.isdir(kept) and os.path.isdir(con.temp_dir)  # a live query's: kept
    finally:
        alive.communicate("\n")
    assert not os.path.exists(kept)  # closed normally: removed by its own connection


def test_a_pairs_file_with_a_byte_order_mark_keeps_the_first_users_id(tmp_path):
    from recommender.data import read_interactions

    (tmp_path / "pairs.tsv").write_bytes("\ufeffu1\t1 2 3\nu2\t2 3 4\n".encode())
    assert list(read_interactions(tmp_path / "pairs.tsv")) == ["u1", "u2"]


def test_binary_garbage_as_interactions_is_an_error_naming_the_file(tmp_path):
    from recommender.data import read_interactions

    (tmp_path / "garbage.bin").write_bytes(bytes(range(128, 256)) * 8)
    with pytest.raises(ValueError, match=r"garbage\.bin: not a UTF-8 text file of interactions"):
        read_interactions(tmp_path / "garbage.bin")
