"""Where model replicas go. One model replica is a set of t GPUs (t = vllm.tensor_parallel_size;
1 for the other backends): one replica per set, and no GPU in two sets.

- threads: the GPUs this process sees (CUDA_VISIBLE_DEVICES, else all of torch's) are cut into
  consecutive sets of t. With more than one GPU, a vLLM replica runs in its own child process
  started with CUDA_VISIBLE_DEVICES set to its set (tasks/replica_process.py); any other replica
  (t = 1) runs in this process on cuda:<its GPU>.
- ray: each replica actor reserves t GPUs (num_gpus = t) and Ray sets the actor's
  CUDA_VISIBLE_DEVICES. An actor's GPUs are on one node, so a node holds floor(its GPUs / t).

`replicas` 0 places one replica per t GPUs the engine sees. A combination that cannot be placed
raises Unplaceable, one line naming the keys, before any model loads.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

# Backends whose replicas, on threads with several GPUs, each run in a child process pinned by
# CUDA_VISIBLE_DEVICES: vLLM's engine uses every GPU its process sees and ignores a cuda:N device.
PROCESS_BACKENDS: tuple[str, ...] = ("vllm",)


class Unplaceable(ValueError):
    """The replicas asked for do not fit the GPUs the engine sees."""


def gpus_per_replica(options: Mapping[str, Any] | None) -> int:
    """t: the backend options' tensor_parallel_size (only vLLM's options carry one), else 1."""
    return int((options or {}).get("tensor_parallel_size", 1) or 1)


def cuda_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


def visible_gpus(device: str = "auto") -> list[str]:
    """This process's GPUs as a child process names them in CUDA_VISIBLE_DEVICES; only GPU N for
    device cuda:N, none for cpu."""
    if device == "cpu":
        return []
    count = cuda_count()
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [g.strip() for g in listed.split(",") if g.strip()][:count] if listed is not None else \
        [str(i) for i in range(count)]
    if device.startswith("cuda:"):
        index = int(device.split(":", 1)[1])
        return ids[index:index + 1]
    return ids


def _refuse(replicas: int, t: int, seen: str, fits: int) -> None:
    if fits == 0:
        raise Unplaceable(f"vllm.tensor_parallel_size={t}: a replica needs {t} GPUs on one node, and the engine "
                          f"sees {seen}")
    if replicas > fits:
        raise Unplaceable(f"extract.replicas={replicas} x vllm.tensor_parallel_size={t} needs {replicas * t} GPUs, "
                          f"and the engine sees {seen}: {fits} replica(s) fit (extract.replicas = 0 places them)")


def gpu_sets(gpus: Sequence[str], t: int, replicas: int, device: str = "auto") -> list[tuple[str, ...]]:
    """One GPU set per replica on threads: consecutive runs of t of `gpus`, none shared. No GPUs
    (a CPU run) gives no sets, unless the device asks for CUDA."""
    if not gpus:
        if device.startswith("cuda"):
            raise Unplaceable(f"extract.device={device}: no GPU is visible to this process")
        return []
    fits = len(gpus) // t
    _refuse(replicas, t, f"{len(gpus)} GPU(s) ({','.join(gpus)})", fits)
    return [tuple(gpus[i * t:(i + 1) * t]) for i in range(replicas or fits)]


def ray_node_gpus(ray: Any) -> list[int]:
    """GPUs of each live node of the cluster `ray` is connected to."""
    return [int(node["Resources"].get("GPU", 0)) for node in ray.nodes() if node.get("Alive")]


def ray_replicas(node_gpus: Sequence[int], t: int, replicas: int, device: str = "auto") -> int:
    """How many replica actors to start on a cluster with these GPUs per node. Without GPUs (or with
    device cpu) replicas run on CPUs, as many as asked (0: one), unless the device asks for CUDA."""
    if device == "cpu" or not any(node_gpus):
        if device.startswith("cuda"):
            raise Unplaceable(f"extract.device={device}: the Ray cluster has no GPU")
        return replicas or 1
    fits = sum(gpus // t for gpus in node_gpus)
    _refuse(replicas, t, f"{sum(node_gpus)} GPU(s) on {len(node_gpus)} node(s) ({'+'.join(map(str, node_gpus))})",
            fits)
    return replicas or fits


def check_placement(cfg: Any) -> int:
    """The number of replicas cfg's engine will place, or Unplaceable (one line) before any model
    loads. Ray: connects to the cluster to count its GPUs per node."""
    extract = cfg.extract
    t = cfg.vllm.tensor_parallel_size if extract.backend == "vllm" else 1
    if extract.engine == "ray":
        from tasks.dataplane import connect_ray

        return ray_replicas(ray_node_gpus(connect_ray(extract.ray_address)), t, extract.replicas, extract.device)
    return len(gpu_sets(visible_gpus(extract.device), t, extract.replicas, extract.device)) or max(1, extract.replicas)


def thread_placements(plane: Any) -> list[Any]:
    """The plane each replica on threads loads with, one per GPU set ([] on CPU). A replica runs in
    its own child process pinned to its set (plane.gpus) where its backend takes every GPU its
    process sees and this process sees more than its set; else here, on cuda:<its GPU>."""
    from dataclasses import replace

    spec = plane.spec
    everything = visible_gpus()
    sets = gpu_sets(visible_gpus(spec.device), gpus_per_replica(spec.options), plane.replicas, spec.device)
    return [replace(plane, gpus=gpus) if plane.backend in PROCESS_BACKENDS and len(everything) > len(gpus)
            else replace(plane, spec=replace(spec, device=f"cuda:{everything.index(gpus[0])}")) for gpus in sets]
