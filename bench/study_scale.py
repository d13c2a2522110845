"""The study grid on several slots (issue 32): serial against worker processes and a local Ray
cluster, on SYNTHETIC features (seeded N(0, 1), no signal) and MicroLens-shaped SYNTHETIC
interactions (bench/paper_scale.py's generator), a reduced paper-shaped grid of `fuse` cells (one
layer each: the paper's grid is mostly such cells, and they take similar time).

    python bench/study_scale.py                       # defaults: about 15 minutes on 2 busy cores
    python bench/study_scale.py --users 2000 --items 800 --dim 64 --layers 3 --seeds 1 --rounds 1 --ray-slots 2

Each run is its own process (its own memory). Prints, side by side:
  serial / processes  the same grid serially and on --slots worker processes, alternated over
                      --rounds rounds (serial, parallel, parallel, serial, ...) so the shared machine's
                      load falls on both; wall time, speed-up against serial (the sum of each side's
                      rounds), and whether every unit's metrics equal the first serial run's
  ray N               the grid on a local Ray cluster (ray.cluster_utils: a head with no CPU for the
                      driver, worker nodes of 1 CPU) with N slots
  memory              per node: the peak of the summed PSS of its processes (shared pages counted
                      once) against the features' bytes, and each worker's peak private memory (USS)
  kill + resume       the processes run SIGKILLed once --kill-after units are saved, then rerun: how
                      many units the rerun skipped and ran, and whether the result equals serial
  projection          the paper's full grid (3B and 7B) on a 4-node CPU cluster and on 8 GPUs, from
                      the per-epoch costs bench/paper_scale.py measured and this run's efficiency
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

# Per-epoch minutes of one unit on one core, and the whole grid on one H200 (hours, a projection),
# as bench/paper_scale.py printed them on 2026-12-03 (docs/benchmarks.md, "The study at the paper's
# scale"): 3B = 19,738 items x 37 layers x 2,048, 7B = 29 x 3,584; bfloat16 features.
PAPER = {"3B": {"layers": 37, "feature_gb": 3.0, "epoch_min": {"id": 2.3, "one layer": 6.6, "dff": 20.2},
                "h200_grid_h": 2.0, "process_gb": 4.39},
         "7B": {"layers": 29, "feature_gb": 4.1, "epoch_min": {"id": 2.6, "one layer": 9.0, "dff": 28.2},
                "h200_grid_h": 1.8, "process_gb": 5.77}}


def paper_scale():
    spec = importlib.util.spec_from_file_location("paper_scale", ROOT / "bench" / "paper_scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def inputs(args):
    """The interactions and a SYNTHETIC bank, the same bytes in every process (seeded)."""
    from recommender.data import build_sequences
    from recommender.features import FeatureBank

    seqs = paper_scale().synthetic_interactions(args.users, args.items, 7.19, args.seed)
    data = build_sequences(seqs, 5, 10)
    rng = np.random.default_rng(args.seed)
    hidden = np.zeros((data.n_items + 1, args.layers, args.dim), np.float32)
    rng.standard_normal(dtype=np.float32, out=hidden[1:])  # in place: no second copy at the peak
    return data, FeatureBank(hidden=hidden, layers=list(range(args.layers)),
                             snapshot={"kind": "SYNTHETIC N(0,1)", "seed": args.seed})


def configs(args):
    from mvrec.config import StudyConfig, TrainConfig

    train = TrainConfig(dim=64, num_threads=1, patience=args.epochs, max_seq_len=10)
    study = StudyConfig(seeds=args.seeds, max_epochs=args.epochs, batch_size=128, representations="fuse",
                        engine=args.engine, workers=args.slots, retries=1)
    return train, study


# ---------------------------------------------------------------------------------------------
# memory: per node, the summed PSS of its processes (shared pages divided among their sharers)


def tree(pid: int):
    import psutil

    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


class NodeMemory:
    """Samples every `every` s: per node (a list of (pid, with its children?)), the peak summed
    PSS; per process the peak USS."""

    def __init__(self, nodes: dict[str, list[tuple[int, bool]]], every: float = 1.0):
        self.nodes, self.every = nodes, every
        self.peak = {n: 0 for n in nodes}
        self.uss: dict[int, int] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def loop(self) -> None:
        import psutil

        while not self.stop.wait(self.every):
            for node, roots in self.nodes.items():
                total = 0
                for root, children in roots:
                    try:
                        procs = tree(root) if children else [psutil.Process(root)]
                    except psutil.NoSuchProcess:
                        continue
                    for p in procs:
                        try:
                            info = p.memory_full_info()
                        except (psutil.NoSuchProcess, psutil.AccessDenied):
                            continue
                        total += info.pss
                        self.uss[p.pid] = max(self.uss.get(p.pid, 0), info.uss)
                self.peak[node] = max(self.peak[node], total)

    def close(self) -> dict:
        self.stop.set()
        self.thread.join()
        return {"peak_pss": self.peak, "uss": self.uss}


# ---------------------------------------------------------------------------------------------
# one run (a child process): --phase run


def phase_run(args) -> dict:
    import torch

    from recommender.engines import make_engine
    from recommender.study import METRICS, Cell, run_study, study_train_config

    torch.set_num_threads(1)
    data, bank = inputs(args)
    feature_bytes = bank.hidden.nbytes
    train, study = configs(args)
    cells = [Cell("fuse", f"hidden:{layer}") for layer in range(args.cells)]
    cluster, nodes = None, {"this machine": [(os.getpid(), True)]}
    if args.engine == "ray":
        import ray
        from ray.cluster_utils import Cluster

        store = 4 * feature_bytes + 200_000_000  # per node's object store: the features and the results
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": store})
        per_node = [1] * args.slots if args.slots <= 2 else [args.slots // 2, args.slots - args.slots // 2]
        workers = [cluster.add_node(num_cpus=n, object_store_memory=store) for n in per_node]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        raylet = lambda node: (node.all_processes["raylet"][0].process.pid, True)  # noqa: E731 - its store, workers
        # the head: the driver alone (the cluster's processes are its children here) and the head's raylet
        nodes = {"head (driver)": [(os.getpid(), False), raylet(cluster.head_node)],
                 **{f"worker node {i + 1} ({n} CPU)": [raylet(w)] for i, (w, n) in enumerate(zip(workers, per_node, strict=True))}}
        processes = {"head (driver)": 1, **{f"worker node {i + 1} ({n} CPU)": n for i, n in enumerate(per_node)}}
    else:
        processes = {"this machine": 1 if args.engine == "serial" else args.slots + 1}  # the workers and the driver
    memory = NodeMemory(nodes)
    out = Path(args.out)
    try:
        started = time.perf_counter()
        engine = make_engine(study, data, bank, study_train_config(train, study), out)
        startup = time.perf_counter() - started
        summary = run_study(data, bank, train, study, out, engine=engine, fresh=args.fresh, cells=cells,
                            log=lambda m: print(m, file=sys.stderr, flush=True))
        wall = time.perf_counter() - started
    finally:
        mem = memory.close()
        if cluster is not None:
            import ray

            ray.shutdown()
            cluster.shutdown()
    units = {}
    for path in sorted(out.glob("runs/*/seed*/unit.json")):
        row = json.loads(path.read_text())["row"]
        units[f"{row['cell']} seed {row['seed']}"] = {
            "metrics": [row[f"{s}_{m}"] for s in ("valid", "test", "test_cold") for m in METRICS] + [row["best_epoch"]],
            "seconds": row["seconds"]}
    workers_uss = [u for pid, u in mem["uss"].items() if pid != os.getpid()]
    return {"wall_s": wall, "startup_s": startup, "units": units, "counts": summary["units"], "processes": processes,
            "feature_bytes": feature_bytes, "peak_pss": mem["peak_pss"], "driver_uss": mem["uss"].get(os.getpid(), 0),
            "max_worker_uss": max(workers_uss, default=0), "peak_rss_self": peak_rss(),
            "cpu_s": cpu_seconds()}


def cpu_seconds() -> float:
    """CPU time of this process and of its children that ended (the worker processes, after close)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---------------------------------------------------------------------------------------------
# the parent


def child_cmd(args, engine: str, slots: int, out: Path, fresh: bool = True) -> list[str]:
    cmd = [sys.executable, __file__, "--phase", "run", "--engine", engine, "--slots", str(slots), "--out", str(out)]
    for key in ("users", "items", "layers", "cells", "dim", "seeds", "epochs", "seed"):
        cmd += [f"--{key}", str(getattr(args, key))]
    return cmd + (["--fresh"] if fresh else [])


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def child(args, engine: str, slots: int, out: Path, fresh: bool = True) -> dict:
    proc = subprocess.run(child_cmd(args, engine, slots, out, fresh), stdout=subprocess.PIPE, text=True, env=env(),
                          cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"run {engine} x {slots} failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def kill_and_resume(args) -> dict:
    """The processes run, SIGKILLed once --kill-after units are saved; then the same run again."""
    import psutil

    out = args.work / "killed"
    shutil.rmtree(out, ignore_errors=True)  # the count below must see only this run's units
    driver = subprocess.Popen(child_cmd(args, "processes", args.slots, out), env=env(), cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while len(list(out.glob("runs/*/seed*/unit.json"))) < args.kill_after:
            if driver.poll() is not None:
                raise SystemExit("the run ended before it could be killed")
            time.sleep(0.1)
        workers = psutil.Process(driver.pid).children(recursive=True)
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    finally:
        driver.kill()
    saved = len(list(out.glob("runs/*/seed*/unit.json")))
    _, alive = psutil.wait_procs(workers, timeout=30)  # each worker exits when its driver is gone
    for p in alive:
        p.kill()
    rerun = child(args, "processes", args.slots, out, fresh=False)
    return {"saved_at_kill": saved, "workers_left": len(alive), **rerun}


def _spin(n: int) -> float:
    started = time.perf_counter()
    x = 0
    for i in range(n):
        x += i * i
    return time.perf_counter() - started


def capacity(n: int = 10_000_000) -> float:
    """How many CPUs this session gets now: the throughput of 2 processes spinning against 1 (on a
    machine shared by other sessions, Linux's autogroup scheduler shares the CPU per session, so a
    session's second process can get nothing more)."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(2) as pool:
        one = pool.apply(_spin, (n,))
        two = max(pool.map(_spin, [n, n]))
    return 2 * one / two


def same(a: dict, b: dict) -> tuple[int, int]:
    """(units whose metrics are identical, units compared)."""
    return sum(a["units"][u]["metrics"] == b["units"].get(u, {}).get("metrics") for u in a["units"]), len(a["units"])


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def memory_line(name: str, r: dict, overhead: float) -> str:
    F = r["feature_bytes"]
    parts = []
    for node, peak in r["peak_pss"].items():
        k = r["processes"][node]
        bound = 1.5 * F + k * overhead
        parts.append(f"{node} {gb(peak)} = {peak / F:.2f}x F (bound 1.5 F + {k} x overhead = {gb(bound)}: "
                     f"{'within' if peak <= bound else 'ABOVE'})")
    return f"  {name}: {'; '.join(parts)}; largest private memory (USS) of a worker {gb(r['max_worker_uss'])}"


def lpt(durations: list[float], slots: int) -> float:
    """Makespan of the longest-first greedy schedule of `durations` on `slots` equal slots."""
    load = [0.0] * slots
    for d in sorted(durations, reverse=True):
        load[load.index(min(load))] += d
    return max(load)


def project(efficiency: float, nodes: int, node_cores: int, gpus: int) -> list[str]:
    """The paper's grid (id, replace x2 + fuse x (caption + every layer), dff; 3 seeds; <= 30 epochs)."""
    from mvrec.config import StudyConfig

    study = StudyConfig()
    lines = []
    for shape, p in PAPER.items():
        cells = {"id": 1, "one layer": p["layers"] + 3, "dff": 1}
        units = [study.max_epochs * p["epoch_min"][kind] * 60 for kind, n in cells.items() for _ in range(n * study.seeds)]
        serial = sum(units)
        slots = nodes * node_cores
        cpu = lpt(units, slots) / efficiency
        node_mem = p["feature_gb"] + node_cores * (p["process_gb"] - p["feature_gb"])
        gpu = p["h200_grid_h"] * 3600 / gpus  # GPU units take near-equal time (a 2 ms launch floor a step)
        lines.append(
            f"PROJECTION {shape} ({sum(cells.values())} cells x {study.seeds} seeds = {len(units)} units, <= "
            f"{study.max_epochs} epochs): one core {serial / 86400:.1f} days; {nodes} CPU nodes x {node_cores} "
            f"cores, one unit a core, at {efficiency:.0%} parallel efficiency: "
            f"{cpu / 3600:.1f} h (longest unit {max(units) / 3600:.1f} h), per node {p['feature_gb']:.1f} GB of "
            f"features once + {node_cores} x {p['process_gb'] - p['feature_gb']:.1f} GB per unit = {node_mem:.0f} GB; "
            f"{gpus} H200s, one unit a GPU, from the one-GPU arithmetic: {gpu / 60:.0f} min "
            f"(gpus_per_unit 0.25 packs 4 units a GPU: not measured, no GPU here)")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--users", type=int, default=6000)
    ap.add_argument("--items", type=int, default=3000)
    ap.add_argument("--layers", type=int, default=24, help="layers in the features (their bytes: F)")
    ap.add_argument("--cells", type=int, default=4, help="fuse cells, at the first --cells layers")
    ap.add_argument("--dim", type=int, default=2048, help="feature width (the 3B model's)")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--slots", type=int, default=2, help="worker processes of the parallel runs")
    ap.add_argument("--rounds", type=int, default=2, help="serial/parallel pairs, alternated")
    ap.add_argument("--ray-slots", default="1,2,4")
    ap.add_argument("--kill-after", type=int, default=3, help="units saved before the driver is killed")
    ap.add_argument("--cluster-nodes", type=int, default=4)
    ap.add_argument("--node-cores", type=int, default=16)
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "study_scale")
    ap.add_argument("--phase", choices=["run"], help=argparse.SUPPRESS)
    ap.add_argument("--engine", default="serial", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--fresh", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--report", action="store_true", help="print the report of the last run (its results.json)")
    args = ap.parse_args()
    if args.report:
        saved = json.loads((args.work / "results.json").read_text())
        report(args, saved["runs"], saved["killed"])
        return
    if args.phase:
        print(json.dumps(phase_run(args)))
        return

    args.work.mkdir(parents=True, exist_ok=True)
    units = args.cells * args.seeds
    print(f"== SYNTHETIC features (seeded N(0,1), no signal): {args.items:,} items x {args.layers} layers x "
          f"{args.dim:,} float32; {args.users:,} SYNTHETIC users; grid: fuse x {args.cells} layers x {args.seeds} "
          f"seeds = {units} units, {args.epochs} epochs each; 1 torch thread a unit; {os.cpu_count()} CPUs; "
          f"load average at the start {' '.join(f'{x:.1f}' for x in os.getloadavg())} (a machine shared with "
          f"other jobs) ==", flush=True)
    print(f"CPUs this session gets now (2 spinning processes' throughput against 1's): {capacity():.2f}",
          flush=True)
    runs: dict[str, list[dict]] = {"serial": [], f"processes x {args.slots}": []}
    for r in range(args.rounds):
        order = ["serial", "processes"] if r % 2 == 0 else ["processes", "serial"]
        for engine in order:
            res = child(args, engine, 1 if engine == "serial" else args.slots, args.work / engine)
            res["slots"] = 1 if engine == "serial" else args.slots
            res["load"] = os.getloadavg()[0]
            runs["serial" if engine == "serial" else f"processes x {args.slots}"].append(res)
            print(f"round {r + 1} {engine:<9}: wall {res['wall_s']:6.1f} s (engine start {res['startup_s']:.1f} s), "
                  f"CPU {res['cpu_s']:.0f} s, load {res['load']:.1f}; CPUs this session gets: {capacity():.2f}",
                  flush=True)
    for slots in [int(s) for s in args.ray_slots.split(",") if s]:
        res = child(args, "ray", slots, args.work / f"ray{slots}")
        res["slots"], res["load"] = slots, os.getloadavg()[0]
        runs[f"ray x {slots}"] = [res]
        print(f"ray x {slots}: wall {res['wall_s']:.1f} s (engine start {res['startup_s']:.1f} s), "
              f"load {res['load']:.1f}", flush=True)
    killed = kill_and_resume(args)
    (args.work / "results.json").write_text(json.dumps({"runs": runs, "killed": killed}, default=str))
    report(args, runs, killed)


def report(args, runs: dict, killed: dict) -> None:
    reference = runs["serial"][0]
    units = len(reference["units"])
    print("\n== wall time, speed-up against serial (sum over rounds of each), identical units ==")
    mean_serial = sum(r["wall_s"] for r in runs["serial"]) / len(runs["serial"])
    cpu_unit = {}
    for name, rs in runs.items():
        wall = sum(r["wall_s"] for r in rs) / len(rs)
        ident = [same(r, reference) for r in rs]
        speed = mean_serial / wall
        unit_s = np.mean([u["seconds"] for r in rs for u in r["units"].values()])
        loads = ", ".join(f"{r['load']:.1f}" for r in rs)
        cpu = cpu_unit[name] = (sum(r.get("cpu_s", np.nan) for r in rs) / sum(len(r["units"]) for r in rs)
                                if not name.startswith("ray") else np.nan)  # Ray's workers are not children
        print(f"{name:<14} rounds {len(rs)}  wall {wall:6.1f} s  speed-up {speed:4.2f}x  CPU a unit {cpu:.1f} s  "
              f"units identical to serial {sum(i for i, _ in ident)}/{sum(n for _, n in ident)}  "
              f"mean unit {unit_s:.1f} s  load after each run {loads}")

    print("\n== memory per node against the features' bytes F ==")
    F = reference["feature_bytes"]
    overhead = max(0.0, reference["peak_rss_self"] - F)  # a serial run's process beyond its features
    print(f"F = {gb(F)}; the serial run's process peaked at {gb(reference['peak_rss_self'])} = F + {gb(overhead)} "
          "(interactions, model, torch): the per-unit overhead in the bound")
    for name, rs in runs.items():
        print(memory_line(name, rs[0], overhead))

    print("\n== kill + resume (processes) ==")
    ident, n = same(killed, reference)
    c = killed["counts"]
    print(f"driver SIGKILLed with {killed['saved_at_kill']} of {units} units saved; worker processes left after "
          f"30 s: {killed['workers_left']}; the rerun skipped {c['skipped']} and ran {c['ran']} "
          f"(failed {c['failed']}); units identical to serial {ident}/{n}")

    # Units in parallel cost their CPU time on free cores: the efficiency is serial CPU a unit over
    # the parallel run's (its workers' start-up included), not this shared machine's wall time.
    efficiency = cpu_unit["serial"] / cpu_unit[f"processes x {args.slots}"]
    print(f"\n== projections (PROJECTION: not run; parallel efficiency = serial CPU a unit / parallel CPU a unit "
          f"= {efficiency:.0%}) ==")
    for line in project(min(1.0, efficiency), args.cluster_nodes, args.node_cores, args.gpus):
        print(line)


if __name__ == "__main__":
    main()
