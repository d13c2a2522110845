"""What Prefect costs the extraction: the extract-features flow against a real Prefect server on
loopback, minus the same work done by plain functions, on N demo videos with the local test model.

Variants, each in a fresh process with a fresh store (model load, decode, LVLM, store commits and
the run record are timed; Python imports are not):
- plain:   discover -> hash -> plan -> the data plane on threads (tasks/dataplane.py) -> the same
           quality gate and commits (every result waiting once commit_size videos wait); no Prefect;
- flow:    flows.extract.extract_features of this tree (discover-videos, hash-videos, commit-batch);
- before:  the flow of an older commit (--before REV), run from a `git archive` of that commit.
Orchestration overhead = flow wall time - the same work as plain functions (`plain`), as a share
of the flow's wall time. On a shared machine wall time swings with
the other jobs, so CPU seconds are printed too: the worker process's own, plus what the Prefect
server's processes spent while it ran (the flow's API calls). Each variant runs --rounds times,
interleaved (forward, then backward) against drifting load; the table shows the fastest round.
Task runs are counted by the server for each flow run.

    python bench/flow_overhead.py [--videos 1000] [--before 96ba618] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# workers (one process per variant)


def _overrides(a) -> dict:
    return {"extract.model": a.model, "store.path": a.store, "extract.batch_size": a.batch_size,
            "extract.commit_size": a.commit_size, "extract.frames": "uniform:4"}


def worker_plain(a) -> dict:
    """The flow's work without Prefect: the same plan, data plane, quality gate and commits."""
    from dataclasses import asdict

    from flows.extract import batch_rows, failure_rows, plane_spec
    from flows.plan import extractor_record, plan_work
    from mvrec.config import load_config
    from storage import ExtractionBatch, ExtractorRecord, open_store
    from storage.quality import gate_batch
    from tasks.dataplane import in_background, run_plane
    from tasks.discover import discover_videos, hash_videos
    from tasks.extract import Batch
    from tasks.lvlm import Failure

    t0, c0 = time.perf_counter(), time.process_time()
    cfg = load_config(overrides=_overrides(a))
    store, record = open_store(cfg.store), extractor_record(cfg)
    eid = record.extractor_id
    run_id = store.start_run("extract-plain", extractor_id=eid)
    refs = discover_videos(a.videos_dir)
    hashed, unreadable = hash_videos(refs)
    todo, _ = plan_work(hashed, store.completed(eid), store.failures(eid))
    by_id = {r.video_id: r for r in refs + hashed}
    if unreadable:
        store.write_batch(ExtractionBatch(failures=failure_rows(
            [Failure(r.video_id, r.uri, "read", "Unreadable", why, True) for r, why in unreadable], by_id, run_id, eid)))
    processed, model = 0, None
    for arrived in in_background(run_plane(todo, plane_spec(cfg)), min_videos=cfg.extract.commit_size):
        if model is None:
            model = arrived[0][1]
            store.upsert_extractor(ExtractorRecord(**{**asdict(record), "dim": model.hidden_size,
                                                      "num_layers": model.num_layers}))
        batch = Batch([done for b, _ in arrived for done in b.results], [f for b, _ in arrived for f in b.failures])
        gated = gate_batch(batch_rows(batch, by_id, run_id, eid), model.hidden_size, run_id)
        store.write_batch(gated.batch)
        processed += len(batch.results) - len(gated.rejected)
    store.finish_run(run_id, counts={"processed": processed})
    return {"seconds": time.perf_counter() - t0, "cpu": time.process_time() - c0, "processed": processed}


def worker_flow(a) -> dict:
    from flows.extract import extract_features

    t0, c0 = time.perf_counter(), time.process_time()
    state = extract_features(a.videos_dir, overrides=_overrides(a), return_state=True)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    summary = state.result()
    return {"seconds": seconds, "cpu": cpu, "processed": summary["processed"],
            "flow_run_id": str(state.state_details.flow_run_id)}


def run_worker(a) -> None:
    sys.path.insert(0, a.code_root)
    os.chdir(a.code_root)
    import torch

    torch.set_num_threads(1)
    result = {"plain": worker_plain, "flow": worker_flow}[a.worker](a)
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------
# the driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrefectServer:
    """`prefect server start` on loopback in its own process group; stopped (the group) on exit."""

    def __init__(self, home: Path, log: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                    "PREFECT_LOGGING_LEVEL": "WARNING", "PREFECT_API_URL": self.url}
        self.log = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                      "--port", str(self.port)], env=self.env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def wait_healthy(self, timeout: float = 180) -> float:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prefect server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                urllib.request.urlopen(self.url + "/health", timeout=2)
                return time.perf_counter() - t0
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"prefect server not healthy after {timeout} s")

    def cpu_seconds(self) -> float:
        """CPU seconds (user + system) of every process in the server's group so far."""
        total = 0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rpartition(")")[2].split()
            except OSError:
                continue  # exited meanwhile
            if int(fields[2]) == self.proc.pid:  # pgid (the server leads its own group)
                total += int(fields[11]) + int(fields[12])  # utime, stime
        return total / os.sysconf("SC_CLK_TCK")

    def task_runs(self, flow_run_id: str) -> int:
        body = json.dumps({"flow_runs": {"id": {"any_": [flow_run_id]}}}).encode()
        req = urllib.request.Request(self.url + "/task_runs/count", data=body,
                                     headers={"Content-Type": "application/json"})
        return int(json.loads(urllib.request.urlopen(req, timeout=30).read()))

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def run_variant(name: str, worker: str, code_root: Path, work: Path, server: PrefectServer, a) -> dict:
    store = work / f"store-{name}"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", worker, "--code-root", str(code_root),
           "--videos-dir", str(work / "corpus" / "videos"), "--model", str(work / "model"), "--store", str(store),
           "--batch-size", str(a.batch_size), "--commit-size", str(a.commit_size)]
    env = {**server.env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(code_root)}
    load, server_cpu = os.getloadavg()[0], server.cpu_seconds()
    with open(work / f"{name}.log", "w") as log:
        out = subprocess.run(cmd, env=env, cwd=code_root, stdout=subprocess.PIPE, stderr=log, text=True,
                             timeout=3600)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if out.returncode or line is None:
        raise RuntimeError(f"{name} failed (exit {out.returncode}); see {work / f'{name}.log'}")
    result = json.loads(line[len("RESULT "):])
    result["task_runs"] = server.task_runs(result["flow_run_id"]) if "flow_run_id" in result else 0
    result["load"] = (load, os.getloadavg()[0])
    result["server_cpu"] = server.cpu_seconds() - server_cpu
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--commit-size", type=int, default=64)
    ap.add_argument("--before", default="", help="git revision of the flow to compare (e.g. 96ba618)")
    ap.add_argument("--work", default="", help="work directory (default: a temporary one); corpus and model are reused")
    # worker mode (internal)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--worker", choices=["plain", "flow"])
    for opt in ("--code-root", "--videos-dir", "--model", "--store"):
        ap.add_argument(opt)
    a = ap.parse_args()
    if a.worker:
        return run_worker(a)

    sys.path.insert(0, str(ROOT))
    work = Path(a.work or tempfile.mkdtemp(prefix="mvrec-bench-overhead-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    from mvrec.devtools.demo_data import make_demo_corpus
    from mvrec.devtools.test_model import build_test_model

    corpus = work / "corpus"
    if not (corpus / "corpus.json").exists() or json.loads((corpus / "corpus.json").read_text())["params"]["videos"] != a.videos:
        make_demo_corpus(corpus, videos=a.videos, users=100, seed=0)
    if not (work / "model" / "config.json").exists():
        build_test_model(work / "model")
    variants = [("plain", "plain", ROOT), ("flow", "flow", ROOT)]
    if a.before:
        before = work / f"code-{a.before}"
        if not before.exists():
            before.mkdir()
            archive = subprocess.run(["git", "-C", str(ROOT), "archive", a.before], check=True, capture_output=True)
            subprocess.run(["tar", "-x", "-C", str(before)], input=archive.stdout, check=True)
        variants.append((f"before ({a.before})", "flow", before))

    print(f"{a.videos} demo videos, local random-weight TEST MODEL (4 layers, hidden 128), batch {a.batch_size}, "
          f"commit {a.commit_size}, frames uniform:4; OMP_NUM_THREADS=1, torch threads 1; {os.cpu_count()} CPUs")
    with PrefectServer(work / "prefect-home", work / "server.log") as server:
        print(f"prefect server on {server.url}: healthy after {server.wait_healthy():.1f} s")
        results: dict[str, dict] = {}
        for i in range(a.rounds):
            for name, worker, code_root in (variants if i % 2 == 0 else variants[::-1]):
                subprocess.run(["rm", "-rf", str(work / f"store-{name.split()[0]}")], check=True)
                r = run_variant(name.split()[0], worker, code_root, work, server, a)
                print(f"  round {i + 1}  {name:<18} {r['seconds']:8.1f} s wall  {r['cpu']:7.1f} CPU-s  "
                      f"(+ {r['server_cpu']:5.1f} server)  {r['processed']} processed  {r['task_runs']:5d} task runs  "
                      f"load {r['load'][0]:.2f} -> {r['load'][1]:.2f}", flush=True)
                if name not in results or r["seconds"] < results[name]["seconds"]:
                    results[name] = r
    same = results["plain"]["seconds"]
    print(f"\nfastest of {a.rounds} round(s)")
    print(f"{'variant':<18} {'wall s':>8} {'videos/s':>9} {'task runs/1000 videos':>22} {'overhead vs plain':>20}")
    for name, r in results.items():
        s = r["seconds"]
        overhead = f"{s - same:7.1f} s {100 * (s - same) / s:6.1f}%" if r["task_runs"] else ""
        print(f"{name:<18} {s:8.1f} {r['processed'] / s:9.2f} {r['task_runs'] * 1000 / a.videos:22.0f} {overhead:>20}")
    # the server spends CPU even when idle: count it on both sides
    same_cpu = results["plain"]["cpu"] + results["plain"]["server_cpu"]
    print(f"\nCPU seconds (process + server while it ran) vs plain ({same_cpu:.1f} CPU-s), fastest round:")
    for name, r in results.items():
        if r["task_runs"]:
            cpu = r["cpu"] + r["server_cpu"]
            print(f"{name:<18} {cpu:8.1f} CPU-s   overhead {cpu - same_cpu:6.1f} CPU-s = {100 * (cpu - same_cpu) / cpu:5.1f}%")


if __name__ == "__main__":
    main()
