"""A model replica in its own child process, started with the environment it must see (its GPU
set in CUDA_VISIBLE_DEVICES) before anything in it imports CUDA. The data plane uses it on threads
with several GPUs for backends that take every GPU their process sees (tasks/placement.py).

The child is started with `spawn`, so the calling script needs an `if __name__ == "__main__":`
guard (the `mvrec` console script has one), as in vLLM's multiprocess mode.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from tasks.lvlm import ExtractSpec, VideoFeatures, load_backend


def placement_here(device: str = "") -> dict[str, Any]:
    """What this process runs on: its pid, CUDA_VISIBLE_DEVICES and the model's device."""
    return {"pid": os.getpid(), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "device": device}


def _child_main(backend_name: str, spec: ExtractSpec, env: dict[str, str], conn: Any) -> None:
    os.environ.update(env)
    try:
        backend = load_backend(backend_name, spec)
        run = getattr(backend, "extract_prepared", None) or backend.extract
        conn.send(("ready", (backend.info, placement_here(spec.device))))
    except BaseException as e:  # noqa: BLE001 - the parent raises it
        conn.send(("error", e))
        return
    try:
        while True:
            batch = conn.recv()
            if batch is None:
                break
            try:
                conn.send(("ok", run(batch)))
            except Exception as e:  # noqa: BLE001 - the caller decides; the replica lives on
                conn.send(("error", e))
    finally:
        backend.close()


class ProcessBackend:
    """An LVLM backend loaded in a child process with `env`; `extract` sends it one batch at a time.
    It is ready (or has raised the child's load error) when the constructor returns."""

    def __init__(self, backend_name: str, spec: ExtractSpec, env: dict[str, str]):
        import multiprocessing

        self.name, self.spec = backend_name, spec
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_child_main, args=(backend_name, spec, env, child), daemon=True)
        self.proc.start()
        child.close()
        try:
            self.info, self.placement = self._reply()
        except BaseException:
            self.close()
            raise

    def _reply(self) -> Any:
        try:
            kind, value = self.conn.recv()
        except EOFError:
            self.proc.join(timeout=10)  # its exit code says how it died
            raise RuntimeError(f"model replica process {self.proc.pid} died (exit code {self.proc.exitcode})") from None
        if kind == "error":
            raise value
        return value

    def extract(self, batch: Sequence[Any]) -> list[VideoFeatures]:
        self.conn.send(list(batch))
        return self._reply()

    def close(self) -> None:
        try:
            if self.proc.is_alive():
                self.conn.send(None)
                self.proc.join(timeout=60)
        except (OSError, BrokenPipeError):
            pass
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(timeout=10)

