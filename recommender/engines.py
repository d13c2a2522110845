"""Where the study's units (cell x seed) run: `study.engine` = serial | processes | ray.

Every engine has the same three calls: `run(unit)` (blocks until the unit's result is back; safe
from several threads), `width` (units at a time) and `close()`. The driver (run_units) keeps
`width` units in flight from as many threads, and saves each result as it arrives.

- serial: this process, one unit at a time (the reference).
- processes: `study.workers` worker processes on this machine. The features are written once to
  memory-mapped .npy files that every worker maps, so the machine holds them once (the page cache),
  not once per worker. Threads would share torch's one global random generator, so two units at
  once would draw each other's dropout masks: processes keep every unit's numbers its own.
- ray: Ray tasks (connect_ray: `study.ray_address`, the cluster this process joined, or a local
  one). The interactions and the features are put into Ray's object store once; each node fetches
  them once and its workers read them zero-copy. A unit declares its resources: train.num_threads
  CPUs, or `study.gpus_per_unit` of a GPU (0.25 packs four small models on one). A task whose
  node dies is run again elsewhere by Ray (NODE_RETRIES); a unit that raises is retried by the
  driver (study.retries), like on the other engines.

A unit trains with the same seed, threads and feature values on every engine, so its metrics are
bit-identical whichever engine ran it (tests/test_study_engines.py).
"""

from __future__ import annotations

import contextvars
import hashlib
import multiprocessing
import os
import shutil
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool, ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from mvrec.config import StudyConfig, TrainConfig
from recommender.data import SeqData
from recommender.features import FeatureBank
from recommender.study import Unit, run_unit

NODE_RETRIES = 3  # times Ray runs a unit again after its node or worker process died


class UnitLost(RuntimeError):
    """The process running a unit died (not an error of the unit's own code)."""


def run_with_retries(engine: Any, unit: Unit, retries: int, log: Callable[[str], None] = print) -> dict[str, Any]:
    """engine.run(unit), tried again up to `retries` times; the last error is raised."""
    for attempt in range(retries + 1):
        try:
            return engine.run(unit)
        except Exception as e:  # noqa: BLE001 - any failure of a unit is retried, then reported
            if attempt == retries:
                raise
            log(f"{unit.name}: try {attempt + 1} failed ({type(e).__name__}: {e}); trying again")
    raise AssertionError("unreachable")


def run_units(engine: Any, units: list[Unit], call: Callable[[Any, Unit], dict[str, Any]]
              ) -> Iterator[tuple[Unit, Any]]:
    """(unit, result or the exception it ended with) as each finishes; `engine.width` at a time.
    Each driver thread runs `call` in a copy of this thread's context (a Prefect flow's, so that a
    task called there is a task run of the flow)."""
    if not units:
        return
    with ThreadPoolExecutor(max_workers=min(engine.width, len(units)), thread_name_prefix="study-unit") as pool:
        futures = {pool.submit(contextvars.copy_context().run, call, engine, unit): unit for unit in units}
        for future in as_completed(futures):
            try:
                yield futures[future], future.result()
            except Exception as e:  # noqa: BLE001 - reported as the unit's failure
                yield futures[future], e


def unit_threads(train_cfg: TrainConfig) -> int:
    return max(1, train_cfg.num_threads)


# ---------------------------------------------------------------------------------------------
# the feature bank as plain arrays (shared memory) and back


def bank_arrays(bank: FeatureBank) -> dict[str, Any]:
    """The bank with numpy matrices (half types as their int16 bits: numpy has no bfloat16)."""
    out = {"layers": bank.layers, "missing": bank.missing, "snapshot": bank.snapshot, "dtypes": {}}
    for name in ("hidden", "caption"):
        m = getattr(bank, name)
        if isinstance(m, torch.Tensor) and m.dtype != torch.float32:
            out["dtypes"][name] = str(m.dtype).removeprefix("torch.")
            m = m.view(torch.int16).numpy()
        elif isinstance(m, torch.Tensor):
            m = m.numpy()
        out[name] = m
    return out


def bank_from_arrays(arrays: dict[str, Any]) -> FeatureBank:
    """bank_arrays undone, with no copy (read-only shared arrays stay shared: torch warns, never writes)."""
    bank = FeatureBank(layers=arrays["layers"], missing=arrays["missing"], snapshot=arrays["snapshot"])
    for name in ("hidden", "caption"):
        m = arrays[name]
        if m is not None and name in arrays["dtypes"]:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "The given NumPy array is not writable"
                m = torch.from_numpy(m).view(getattr(torch, arrays["dtypes"][name]))
        setattr(bank, name, m)
    return bank


def share_bank(bank: FeatureBank, folder: Path) -> dict[str, Any]:
    """Write the bank's matrices once as .npy files under `folder`; -> what open_bank maps."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = bank_arrays(bank)
    for name in ("hidden", "caption"):
        if arrays[name] is not None:
            path, partial = folder / f"{name}.npy", folder / f"{name}.partial.npy"
            np.save(partial, arrays[name])
            os.replace(partial, path)  # a new file: a worker of a killed run may still map the old one
            arrays[name] = str(path)
    return arrays


def shared_folder(out: Path, bank: FeatureBank) -> Path:
    """Where the processes engine writes the bank: shared memory (/dev/shm) when it has room, so the
    pages are never written to disk nor dropped and read again; else the study directory. The name
    follows the study directory, so a rerun after a kill replaces what the killed run left."""
    need = sum(torch.as_tensor(m).nbytes for m in (bank.hidden, bank.caption) if m is not None)
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 2 * need:
        return shm / f"mvrec-features-{hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:12]}"
    return out / ".shared-features"


def open_bank(shared: dict[str, Any]) -> FeatureBank:
    """The shared bank, memory-mapped copy-on-write: every process reads the same pages."""
    arrays = {**shared, **{n: np.load(shared[n], mmap_mode="c") for n in ("hidden", "caption") if shared[n]}}
    return bank_from_arrays(arrays)


def adopt(bank: FeatureBank, shared: FeatureBank) -> None:
    """`bank` reads the shared matrices (the same values) instead of its own, so a node holds the
    features once, the driver included, as long as nothing else holds the old arrays."""
    bank.hidden, bank.caption = shared.hidden, shared.caption


# ---------------------------------------------------------------------------------------------
# engines


class SerialEngine:
    """This process, one unit at a time."""

    width = 1

    def __init__(self, data: SeqData, bank: FeatureBank, train_cfg: TrainConfig, max_batches: int | None = None,
                 log: Callable[[str], None] = print):
        self.data, self.bank, self.cfg, self.max_batches, self.log = data, bank, train_cfg, max_batches, log
        self.lock = threading.Lock()

    def describe(self) -> str:
        return "this process (serial)"

    def run(self, unit: Unit) -> dict[str, Any]:
        with self.lock:
            return run_unit(self.data, self.bank, unit, self.cfg, self.max_batches, self.log)

    def close(self) -> None:
        pass


_WORKER: dict[str, Any] = {}  # in a worker process: the data, the mapped bank, the config


def _watch_parent(parent: int) -> None:
    """A worker whose driver died (killed) exits too, instead of finishing units nobody saves."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _process_init(data: SeqData, shared: dict[str, Any], cfg: TrainConfig, max_batches: int | None,
                  gpus_per_unit: float, counter: Any) -> None:
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    with counter.get_lock():
        index, counter.value = counter.value, counter.value + 1
    if gpus_per_unit > 0 and torch.cuda.is_available():  # worker k takes GPU floor(k x share)
        torch.cuda.set_device(int(index * gpus_per_unit) % torch.cuda.device_count())
    _WORKER.update(data=data, bank=open_bank(shared), cfg=cfg, max_batches=max_batches)


def _process_unit(unit: Unit) -> dict[str, Any]:
    return run_unit(_WORKER["data"], _WORKER["bank"], unit, _WORKER["cfg"], _WORKER["max_batches"],
                    log=lambda m: None)


class ProcessEngine:
    """`workers` processes on this machine, each started once, reading one memory-mapped bank."""

    def __init__(self, data: SeqData, bank: FeatureBank, train_cfg: TrainConfig, workers: int, shared_dir: Path,
                 max_batches: int | None = None, gpus_per_unit: float = 0.0):
        self.width = workers or max(1, (os.cpu_count() or 1) // unit_threads(train_cfg))
        self.shared_dir = shared_dir
        ctx = multiprocessing.get_context("spawn")  # no fork of a process that holds threads
        shared = share_bank(bank, shared_dir)
        adopt(bank, open_bank(shared))  # the driver maps the file too and lets its own copy go
        self.init = (data, shared, train_cfg, max_batches, gpus_per_unit, ctx.Value("i", 0))
        self.ctx, self.lock = ctx, threading.Lock()
        self.pool = self._pool()

    def _pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.width, mp_context=self.ctx, initializer=_process_init, initargs=self.init)

    def describe(self) -> str:
        return f"{self.width} worker processes"

    def run(self, unit: Unit) -> dict[str, Any]:
        pool = self.pool
        try:
            return pool.submit(_process_unit, unit).result()
        except BrokenProcessPool as e:  # a worker died: every unit it had in flight comes here
            with self.lock:
                if self.pool is pool:
                    pool.shutdown(wait=False, cancel_futures=True)
                    self.pool = self._pool()
            raise UnitLost(f"a worker process died while {unit.name} ran") from e

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(self.shared_dir, ignore_errors=True)


def _ray_unit(data: SeqData, arrays: dict[str, Any], cfg: TrainConfig, unit: Unit,
              max_batches: int | None) -> dict[str, Any]:
    return run_unit(data, bank_from_arrays(arrays), unit, cfg, max_batches, log=lambda m: None)


class RayEngine:
    """Units as Ray tasks; the data and the bank in the object store once, read zero-copy per node."""

    def __init__(self, data: SeqData, bank: FeatureBank, train_cfg: TrainConfig, address: str = "",
                 workers: int = 0, gpus_per_unit: float = 0.0, max_batches: int | None = None):
        import ray

        from tasks.dataplane import connect_ray

        self.joined = ray.is_initialized()  # a connection this process had already stays open
        self.ray = connect_ray(address)
        self.refs = (ray.put(data), ray.put(bank_arrays(bank)), ray.put(train_cfg))
        if self.joined:  # the driver reads the store's copy and drops its own (a connection that outlives
            adopt(bank, bank_from_arrays(ray.get(self.refs[1])))  # the study keeps those pages valid)
        resources = {"num_cpus": unit_threads(train_cfg), "num_gpus": gpus_per_unit}
        self.remote = ray.remote(max_retries=NODE_RETRIES, **resources)(_ray_unit)
        self.max_batches = max_batches
        total = ray.cluster_resources()
        slots = total.get("GPU", 0) / gpus_per_unit if gpus_per_unit else total.get("CPU", 0) / resources["num_cpus"]
        self.width = workers or max(1, int(slots))

    def describe(self) -> str:
        return f"Ray, {self.width} units at a time"

    def run(self, unit: Unit) -> dict[str, Any]:
        return self.ray.get(self.remote.remote(*self.refs, unit, self.max_batches))

    def close(self) -> None:
        self.refs = ()
        if not self.joined:
            self.ray.shutdown()


def make_engine(study_cfg: StudyConfig, data: SeqData, bank: FeatureBank, train_cfg: TrainConfig, out: Path,
                max_batches: int | None = None, log: Callable[[str], None] = print) -> Any:
    """The engine `study.engine` names, `study.workers` wide (0: as many as fit)."""
    if study_cfg.engine == "serial":
        return SerialEngine(data, bank, train_cfg, max_batches, log)
    if study_cfg.engine == "processes":
        return ProcessEngine(data, bank, train_cfg, study_cfg.workers, shared_folder(out, bank), max_batches,
                             study_cfg.gpus_per_unit)
    if study_cfg.engine == "ray":
        return RayEngine(data, bank, train_cfg, study_cfg.ray_address, study_cfg.workers, study_cfg.gpus_per_unit,
                         max_batches)
    raise ValueError(f"study.engine: {study_cfg.engine!r} is not one of serial, processes, ray")
