"""Liveness torture: every run ends in bounded time and says why in one line (issue 30).
Run by hand; tests/test_reliability.py runs the fast cases, and the Ray ones on a local cluster.

    python bench/torture_liveness.py              # every case
    python bench/torture_liveness.py -k SIGINT    # cases whose name contains this

Each case runs a real `mvrec` in its own session (`setsid`, as a terminal starts a job), and:
- unreachable Ray address: `refresh --engine ray` against 127.0.0.1:<closed port> must exit 2 with
  one line naming the address, within seconds and before Prefect starts;
- Ctrl-C / SIGTERM: the signal goes to the whole process group (what a terminal and a service
  manager do) once the run has committed its first videos; the command must exit 130 / 143 within
  10 s, print at most 3 lines after the signal and no traceback, leave its run `failed` (not
  `running`), no process behind, and a rerun must complete with every video exactly once in every
  table (bench/torture_crash.py's exact check). For refresh and rerun-failed on threads and on a
  local Ray cluster, study, and serve (idle, against its own Prefect API);
- model errors: a model directory with no config.json is refused by the pre-flight (exit 2, one
  line); a model that cannot load fails the run in one line with no ANSI codes, in the terminal
  and in the run's stored message, on threads and on Ray;
- placement: two replicas asked on a cluster whose second GPU is taken: the run completes and says
  "placed 1 of 2" in its log, its report and `mvrec status`; the only GPU node removed mid-run: the
  run fails in one line within extract.place_timeout_s.

Prints one row per case: exit code, seconds, lines printed, and PROBLEMS if any.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]
MVREC = str(Path(sys.executable).with_name("mvrec"))
GOOD = 8  # demo videos in the corpus (plus the two bad files torture_crash adds)
SIGNAL_BOUND_S = 10.0
ANSI = re.compile(r"\x1b\[")


@dataclass
class Result:
    case: str
    rc: int | None
    seconds: float
    lines: int
    problems: list[str] = field(default_factory=list)
    said: str = ""  # the last line it printed

    def row(self) -> str:
        tail = f" PROBLEMS: {'; '.join(self.problems)}" if self.problems else ""
        return f"| {self.case} | {self.rc} | {self.seconds:.1f} | {self.lines} | {self.said[:110]} |{tail}"


class Bench:
    """The shared inputs: a corpus with the test model, and (for the Ray cases) a local cluster."""

    def __init__(self, root: Path):
        import torture_crash

        self.root, self.crash = root, torture_crash
        self.videos = torture_crash.make_corpus(root, GOOD)
        self.cluster = None

    def env(self, store: Path, token: str, **extra: str) -> dict[str, str]:
        # unbuffered, as on a terminal: what is printed after the signal was printed after it
        return {**self.crash.env_for(self.root, store, token, **extra), "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}

    def ray(self, gpu_nodes: int = 0):
        """A local cluster: a head with 2 CPUs (decode, CPU replicas), and `gpu_nodes` nodes with one
        declared GPU each (replicas that stand for GPU ones). Returns (cluster, gpu nodes)."""
        from ray.cluster_utils import Cluster

        self.close_ray()
        self.cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
        nodes = [self.cluster.add_node(num_cpus=0, num_gpus=1) for _ in range(gpu_nodes)]
        self.cluster.wait_for_nodes()
        return self.cluster, nodes

    def api_url(self) -> str:
        """A Prefect API for `mvrec serve` (schedules need a server): this process's, dies with it."""
        if not os.environ.get("PREFECT_API_URL"):
            from flows.runtime import configure_prefect, start_api
            from mvrec.config import PrefectConfig

            configure_prefect(PrefectConfig(home=str(self.root / "prefect-serve")))
            start_api()
        return os.environ["PREFECT_API_URL"]

    def close_ray(self) -> None:
        if self.cluster is not None:
            import ray

            if ray.is_initialized():
                ray.shutdown()
            self.cluster.shutdown()
            self.cluster = None


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def _run_rows(store: Path) -> dict[str, dict]:
    from storage import FeatureStore

    if not (store / "runs").exists():
        return {}
    return {r["run_id"]: r for r in FeatureStore(str(store), create=False).read("runs").to_pylist()}


def _survivors(token: str) -> list[str]:
    from processes import describe, survivors

    left = survivors(token)
    for p in left:
        p.kill()
    return [f"orphans: {describe(left)}"] if left else []


def start(args: list[str], env: dict[str, str], cwd: Path, out: Path) -> subprocess.Popen:
    """`mvrec ARGS` in its own session and process group, as a shell starts a job."""
    with open(out, "wb") as f:
        return subprocess.Popen([MVREC, *args], env=env, cwd=cwd, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)


def signal_group(proc: subprocess.Popen, sig: int, out: Path) -> tuple[int | None, float, list[str]]:
    """Send `sig` to proc's whole process group; (exit code, seconds to exit, lines printed after)."""
    before = len(out.read_bytes())
    t0 = time.perf_counter()
    os.killpg(proc.pid, sig)
    try:
        rc = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        rc = None
        proc.wait()
    seconds = time.perf_counter() - t0
    return rc, seconds, _lines(out.read_bytes()[before:].decode(errors="replace"))


def wait_for_pause(proc: subprocess.Popen, marker: Path, timeout: float = 600) -> bool:
    """Wait until the run pauses at its pause point, then let it go on (the signal comes next)."""
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.05)  # polling interval only
    marker.unlink()
    return True


def interrupted_run(b: Bench, name: str, command: str, sig: int, engine: str = "threads",
                    bound_s: float | None = SIGNAL_BOUND_S) -> Result:
    """refresh / rerun-failed, signalled after its first hidden_states commit; checked exactly."""
    t = b.root / f"case-{uuid.uuid4().hex[:8]}"
    t.mkdir()
    store, token, marker, out = t / "store", uuid.uuid4().hex, t / "paused", t / "out.log"
    extra = {"MVREC_TEST_PAUSE_AT": "hidden_states:after-commit", "MVREC_TEST_PAUSE_FILE": str(marker)}
    if engine == "ray":
        cluster, _ = b.ray()
        extra.update(MVREC_EXTRACT__ENGINE="ray", MVREC_EXTRACT__RAY_ADDRESS=cluster.address,
                     MVREC_EXTRACT__DEVICE="cpu", MVREC_EXTRACT__REPLICAS="1")
    problems: list[str] = []
    if command == "rerun-failed":
        # A first refresh stores the good videos and records the two bad files; rerun-failed retries
        # those two and is signalled after it commits their failure rows again.
        first = subprocess.run([MVREC, "refresh", str(b.videos)], env=b.env(store, token), cwd=t, capture_output=True,
                               text=True, timeout=1800)
        if first.returncode:
            return Result(name, first.returncode, 0.0, 0, [f"the first refresh exited {first.returncode}"])
        extra["MVREC_TEST_PAUSE_AT"] = "failures:after-commit"
    proc = start([command, str(b.videos)], b.env(store, token, **extra), t, out)
    if not wait_for_pause(proc, marker):
        proc.wait()
        b.close_ray()
        return Result(name, proc.returncode, 0.0, 0, [f"never reached its first commit: {out.read_text()[-400:]!r}"])
    rc, seconds, lines = signal_group(proc, sig, out)
    b.close_ray() if engine == "ray" else None
    problems += _after_signal(rc, seconds, lines, sig, bound_s)
    runs = _run_rows(store)
    mine = {r: v["status"] for r, v in runs.items() if v["owner"] and json.loads(v["owner"])["pid"] == proc.pid}
    if not mine or any(s != "failed" for s in mine.values()):
        problems.append(f"the interrupted run's record: {mine}, want failed")
    problems += _survivors(token)
    rerun = subprocess.run([MVREC, "refresh", str(b.videos)], env=b.env(store, token), cwd=t, capture_output=True,
                           text=True, timeout=1800)
    if rerun.returncode:
        problems.append(f"rerun exited {rerun.returncode}: {(rerun.stderr.strip().splitlines() or [''])[-1]}")
    else:
        problems += b.crash.check_store(store, GOOD, set())
    problems += _survivors(token)
    shutil.rmtree(t, ignore_errors=True)
    return Result(name, rc, seconds, len(lines), problems, (lines or [""])[-1])


def _after_signal(rc: int | None, seconds: float, lines: list[str], sig: int,
                  bound_s: float | None = SIGNAL_BOUND_S) -> list[str]:
    problems = [] if rc == 128 + sig else [f"exit {rc}, want {128 + sig}"]
    if bound_s is not None and seconds > bound_s:
        problems.append(f"{seconds:.1f} s to exit, want <= {bound_s:.0f}")
    if len(lines) > 3 or any("Traceback" in x for x in lines):
        problems.append(f"{len(lines)} lines after the signal: {lines[:6]}")
    return problems


def wait_for_line(proc: subprocess.Popen, out: Path, pattern: str, timeout: float = 900) -> bool:
    deadline = time.monotonic() + timeout
    while not re.search(pattern, out.read_text(errors="replace")):
        if proc.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.1)  # polling interval only
    return True


def interrupted_study(b: Bench, sig: int) -> Result:
    """`mvrec study` (its own Prefect API) signalled while it trains its cells."""
    name = f"study {signal.Signals(sig).name} to the group"
    t = b.root / f"case-{uuid.uuid4().hex[:8]}"
    t.mkdir()
    token, out, corpus = uuid.uuid4().hex, t / "out.log", b.root / "corpus"
    proc = start(["study", "-i", str(corpus / "pairs.tsv"), "--synthetic-topics", str(corpus / "corpus.json"),
                  "--seeds", "3", "--epochs", "50", "--layers", "0,4", "-o", str(t / "study")],
                 b.env(t / "store", token), t, out)
    # a cell has started once the study directory holds anything
    deadline = time.monotonic() + 900
    while not (t / "study").exists() or not any((t / "study").iterdir()):
        if proc.poll() is not None or time.monotonic() > deadline:
            return Result(name, proc.poll(), 0.0, 0, [f"the study never started a cell: {out.read_text()[-400:]!r}"])
        time.sleep(0.1)  # polling interval only
    rc, seconds, lines = signal_group(proc, sig, out)
    problems = _after_signal(rc, seconds, lines, sig) + _survivors(token)
    shutil.rmtree(t, ignore_errors=True)
    return Result(name, rc, seconds, len(lines), problems, (lines or [""])[-1])


def interrupted_serve(b: Bench, sig: int, api_url: str) -> Result:
    """`mvrec serve` (a deployment on a Prefect server), signalled while it waits for its schedule."""
    name = f"serve {signal.Signals(sig).name} to the group"
    t = b.root / f"case-{uuid.uuid4().hex[:8]}"
    t.mkdir()
    token, out = uuid.uuid4().hex, t / "out.log"
    env = {**b.env(t / "store", token), "PREFECT_API_URL": api_url}
    proc = start(["serve", str(b.videos), "--cron", "0 3 * * *", "--name", f"liveness-{uuid.uuid4().hex[:6]}"], env, t,
                 out)
    if not wait_for_line(proc, out, r"serving deployment"):
        proc.wait()
        return Result(name, proc.returncode, 0.0, 0, [f"serve never started: {out.read_text()[-400:]!r}"])
    time.sleep(3.0)  # let the runner start polling (a bench, not a test assertion)
    rc, seconds, lines = signal_group(proc, sig, out)
    problems = _after_signal(rc, seconds, lines, sig) + _survivors(token)
    shutil.rmtree(t, ignore_errors=True)
    return Result(name, rc, seconds, len(lines), problems, (lines or [""])[-1])


def fewer_replicas_placed(b: Bench) -> Result:
    """Two replicas asked on a cluster with two GPU nodes, one GPU already taken by another job: the
    run completes on one and says so in its output, its run record and `mvrec status`."""
    import ray

    name = "2 replicas asked, 1 GPU free"
    cluster, _ = b.ray(gpu_nodes=2)
    ray.init(address=cluster.address, log_to_driver=False)
    holder = ray.remote(num_gpus=1, num_cpus=0)(_Holder).remote()
    ray.get(holder.ready.remote())  # the other job holds one GPU from here on
    try:
        return one_line_exit(b, name, ["refresh", "{videos}"], 0, r"placed 1 of 2 model replicas",
                             {"MVREC_EXTRACT__ENGINE": "ray", "MVREC_EXTRACT__RAY_ADDRESS": cluster.address,
                              "MVREC_EXTRACT__REPLICAS": "2", "MVREC_EXTRACT__COMMIT_SIZE": "4"},
                             check=_placement_said)
    finally:
        ray.kill(holder)
        b.close_ray()


class _Holder:
    def ready(self) -> bool:
        return True


def _placement_said(store: Path, output: str) -> list[str]:
    problems = []
    runs = [r for r in _run_rows(store).values() if r["flow"] == "extract-features"]
    if not runs or not all("placed 1 of 2" in (r["message"] or "") and r["status"] == "completed" for r in runs):
        problems.append(f"run record: {[(r['status'], r['message']) for r in runs]}")
    if output.count("placed 1 of 2") < 2:  # the flow's log line and the CLI's note
        problems.append(f"said {output.count('placed 1 of 2')} time(s) in the output, want the log and the note")
    st = subprocess.run([MVREC, "status", "--no-files"], env={**os.environ, "MVREC_STORE__PATH": str(store),
                                                             "COLUMNS": "200"}, capture_output=True, text=True,
                        timeout=600)
    if "placed 1 of 2" not in st.stdout:
        problems.append(f"mvrec status does not say it: {st.stdout[-300:]!r}")
    return problems


def gpu_node_removed(b: Bench) -> Result:
    """The only GPU node removed after the first commit: the run fails in one line within
    extract.place_timeout_s (5 s here), its record `failed`; a rerun on threads completes exactly."""
    name = "only GPU node removed mid-run"
    t = b.root / f"case-{uuid.uuid4().hex[:8]}"
    t.mkdir()
    store, token, marker, out = t / "store", uuid.uuid4().hex, t / "paused", t / "out.log"
    cluster, (gpu,) = b.ray(gpu_nodes=1)
    extra = {"MVREC_TEST_PAUSE_AT": "hidden_states:after-commit", "MVREC_TEST_PAUSE_FILE": str(marker),
             "MVREC_EXTRACT__ENGINE": "ray", "MVREC_EXTRACT__RAY_ADDRESS": cluster.address,
             "MVREC_EXTRACT__PLACE_TIMEOUT_S": "5", "MVREC_EXTRACT__COMMIT_SIZE": "4"}
    proc = start(["refresh", str(b.videos)], b.env(store, token, **extra), t, out)
    try:
        deadline = time.monotonic() + 900
        while not marker.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                return Result(name, proc.wait(), 0.0, 0, [f"never reached its first commit: {out.read_text()[-400:]!r}"])
            time.sleep(0.05)  # polling interval only
        before = len(out.read_bytes())
        cluster.remove_node(gpu)
        t0 = time.perf_counter()
        marker.unlink()
        rc = proc.wait(timeout=600)
        seconds = time.perf_counter() - t0
    finally:
        b.close_ray()
    lines = _lines(out.read_bytes()[before:].decode(errors="replace"))
    errors = [x for x in lines if x.startswith("error:")]
    problems = [] if rc == 1 else [f"exit {rc}, want 1"]
    if len(lines) > 1 or not errors or "no model replica could be placed within 5 s" not in errors[-1] \
            or ANSI.search("".join(lines)):
        problems.append(f"{len(lines)} lines: {lines[:6]}")
    failed = [r for r in _run_rows(store).values() if r["status"] == "failed" and "no model replica" in r["message"]]
    if not failed:
        problems.append("no failed run naming the missing replica")
    problems += _survivors(token)
    rerun = subprocess.run([MVREC, "refresh", str(b.videos)], env=b.env(store, token), cwd=t, capture_output=True,
                           text=True, timeout=1800)
    problems += [f"rerun exited {rerun.returncode}"] if rerun.returncode else b.crash.check_store(store, GOOD, set())
    problems += _survivors(token)
    shutil.rmtree(t, ignore_errors=True)
    return Result(name, rc, seconds, len(lines), problems, (lines or [""])[-1])


def one_line_exit(b: Bench, name: str, args: list[str], want_rc: int, pattern: str, extra: dict[str, str],
                  prepare: Callable[[Path], None] | None = None, bound_s: float | None = None,
                  check: Callable[[Path, str], list[str]] | None = None) -> Result:
    """A command that must end on its own with `want_rc`, its last line matching `pattern`, every
    line of it free of ANSI codes and tracebacks, at most one error line."""
    t = b.root / f"case-{uuid.uuid4().hex[:8]}"
    t.mkdir()
    if prepare:
        prepare(t)
    store, token = t / "store", uuid.uuid4().hex
    fill = lambda s: s.replace("{videos}", str(b.videos)).replace("{root}", str(t))  # noqa: E731
    t0 = time.perf_counter()
    p = subprocess.run([MVREC, *map(fill, args)], env=b.env(store, token, **{k: fill(v) for k, v in extra.items()}),
                       cwd=t, capture_output=True, text=True, timeout=1800)
    seconds = time.perf_counter() - t0
    err = _lines(p.stderr)
    problems = [] if p.returncode == want_rc else [f"exit {p.returncode}, want {want_rc}"]
    errors = [x for x in err if not x.startswith("note:")]
    if want_rc == 0:  # a run that completes: the pattern anywhere in what it printed
        if not re.search(pattern, p.stdout + p.stderr):
            problems.append(f"{pattern!r} not in the output: {(p.stdout + p.stderr)[-600:]!r}")
    elif len(errors) > 1 or "Traceback" in p.stderr or ANSI.search(p.stderr + p.stdout):
        problems.append(f"{len(errors)} lines on stderr (ANSI: {bool(ANSI.search(p.stderr))}): {p.stderr[-600:]!r}")
    elif not errors or not re.search(pattern, errors[-1]):
        problems.append(f"last line {(errors or [''])[-1][:300]!r} does not match {pattern!r}")
    if bound_s is not None and seconds > bound_s:
        problems.append(f"{seconds:.1f} s, want <= {bound_s:.0f}")
    if check:
        problems += check(store, p.stdout + p.stderr)
    problems += _survivors(token)
    shutil.rmtree(t, ignore_errors=True)
    return Result(name, p.returncode, seconds, len(err), problems, (err or [""])[-1])


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # free once closed: nothing listens there


def _no_config(t: Path) -> None:
    (t / "model").mkdir()
    (t / "model" / "model.safetensors").write_bytes(b"")


def _broken_model(b: Bench) -> Callable[[Path], None]:
    """A model directory that passes the pre-flight (config.json and weights) and cannot load: its
    weights file is truncated garbage."""
    def prepare(t: Path) -> None:
        shutil.copytree(b.root / "model", t / "model")
        weights = next((t / "model").glob("*.safetensors"))
        weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    return prepare


def _stored_message_clean(store: Path, _: str) -> list[str]:
    runs = _run_rows(store)
    failed = [r for r in runs.values() if r["status"] == "failed"]
    if not failed:
        return [f"no failed run recorded: {[r['status'] for r in runs.values()]}"]
    bad = [r["message"] for r in failed if "\n" in r["message"] or ANSI.search(r["message"])
           or "did not load" not in r["message"]]
    return [f"stored message not one clean line: {bad[0][:300]!r}"] if bad else []


def unreachable_ray(b: Bench) -> Result:
    port = _closed_port()
    return one_line_exit(b, "unreachable ray_address", ["refresh", "{videos}", "--engine", "ray"], 2,
                         rf"127\.0\.0\.1:{port}", {"MVREC_EXTRACT__RAY_ADDRESS": f"127.0.0.1:{port}"}, bound_s=30.0,
                         check=lambda store, _: [] if not (store / "runs").exists() else ["a run was recorded"])


def model_without_config(b: Bench) -> Result:
    return one_line_exit(b, "model dir without config.json", ["refresh", "{videos}"], 2, r"model.*no config\.json",
                         {"MVREC_EXTRACT__MODEL": "{root}/model"}, _no_config)


def unloadable_model(b: Bench, engine: str) -> Result:
    extra = {"MVREC_EXTRACT__MODEL": "{root}/model"}
    if engine == "ray":
        cluster, _ = b.ray()
        extra.update(MVREC_EXTRACT__ENGINE="ray", MVREC_EXTRACT__RAY_ADDRESS=cluster.address,
                     MVREC_EXTRACT__DEVICE="cpu")
    try:
        return one_line_exit(b, f"model that cannot load ({engine})", ["refresh", "{videos}"], 1,
                             r"model .*/model did not load: \w+", extra, _broken_model(b), check=_stored_message_clean)
    finally:
        b.close_ray()


CASES = {
    "unreachable ray_address": unreachable_ray,
    "model dir without config.json": model_without_config,
    "model that cannot load (threads)": lambda b: unloadable_model(b, "threads"),
    "model that cannot load (ray)": lambda b: unloadable_model(b, "ray"),
    "refresh SIGINT to the group (threads)": lambda b: interrupted_run(
        b, "refresh SIGINT to the group (threads)", "refresh", signal.SIGINT),
    "refresh SIGTERM to the group (threads)": lambda b: interrupted_run(
        b, "refresh SIGTERM to the group (threads)", "refresh", signal.SIGTERM),
    "refresh SIGINT to the group (ray)": lambda b: interrupted_run(
        b, "refresh SIGINT to the group (ray)", "refresh", signal.SIGINT, "ray"),
    "refresh SIGTERM to the group (ray)": lambda b: interrupted_run(
        b, "refresh SIGTERM to the group (ray)", "refresh", signal.SIGTERM, "ray"),
    "rerun-failed SIGINT to the group": lambda b: interrupted_run(
        b, "rerun-failed SIGINT to the group", "rerun-failed", signal.SIGINT),
    "study SIGINT to the group": lambda b: interrupted_study(b, signal.SIGINT),
    "study SIGTERM to the group": lambda b: interrupted_study(b, signal.SIGTERM),
    "serve SIGINT to the group": lambda b: interrupted_serve(b, signal.SIGINT, b.api_url()),
    "serve SIGTERM to the group": lambda b: interrupted_serve(b, signal.SIGTERM, b.api_url()),
    "2 replicas asked, 1 GPU free": fewer_replicas_placed,
    "only GPU node removed mid-run": gpu_node_removed,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-k", default="", help="only cases whose name contains this")
    args = ap.parse_args()
    names = [n for n in CASES if args.k in n]
    print(f"liveness torture: {len(names)} cases as real mvrec processes, OMP_NUM_THREADS=1; load average "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="mvrec-liveness-") as d:
        b = Bench(Path(d))
        print("| case | exit | seconds | lines | last line |\n|---|---|---|---|---|", flush=True)
        try:
            for name in names:
                r = CASES[name](b)
                results.append(r)
                print(r.row(), flush=True)
        finally:
            b.close_ray()
    clean = sum(not r.problems for r in results)
    print(f"{len(results)} cases, {clean} clean; load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
