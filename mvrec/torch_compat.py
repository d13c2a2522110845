"""Let CUDA-only builds of torchvision, torchaudio and torchcodec import cleanly on a CPU torch.

Why: PyPI's torchvision/torchaudio/torchcodec wheels link against CUDA libraries. Next to the
CPU torch 2.13 wheel they fail at import time, and transformers' Qwen-VL video processors
(torchvision), `transformers.audio_utils` (torchaudio) and vLLM's media modules (torchcodec)
import them. We need none of their compiled ops, only their pure-Python parts.

What: a lazy import hook. Nothing is imported until one of the three packages is; then

- torchvision: try loading its `_C` library; if that fails, define the `nms` and `qnms` op
  schemas so that `torchvision._meta_registrations` can register fakes. Transforms work; nms and
  roi ops do not.
- torchaudio: its extension loader returns False on OSError instead of raising.
- torchcodec: an OSError while importing becomes an ImportError (callers treat it as absent).

Where working builds are installed (GPU machines, real CPU builds) every branch above is a no-op.

`install()` adds the hook to this process. `python -m mvrec.torch_compat --install-pth`
writes a .pth file into site-packages so that every interpreter of the environment, including vLLM's
worker processes, gets the hook at start-up. Importing this module is cheap: it imports no torch.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import sysconfig
from pathlib import Path

PTH_NAME = "mvrec_torch_compat.pth"
_torchvision_lib = None  # keeps the fallback op definitions alive


def _prepare_torchvision(spec: importlib.machinery.ModuleSpec) -> None:
    """Before torchvision/__init__ runs: make sure torchvision::nms exists."""
    global _torchvision_lib
    import torch

    try:
        torch.ops.torchvision.nms  # noqa: B018  already defined (a working build was loaded)
        return
    except (AttributeError, RuntimeError):
        pass
    pkg_dir = Path(next(iter(spec.submodule_search_locations or [])))
    for lib in sorted(pkg_dir.glob("_C*.so")) + sorted(pkg_dir.glob("_C*.pyd")):
        try:
            torch.ops.load_library(str(lib))
            return  # a working build: nothing to do
        except (OSError, RuntimeError):
            break
    if _torchvision_lib is None:
        _torchvision_lib = torch.library.Library("torchvision", "DEF")
        _torchvision_lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _torchvision_lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


def _patch_torchaudio_utils(module) -> None:
    """After torchaudio._extension.utils runs: OSError while loading the extension -> False."""
    original = module._load_lib

    def _load_lib(lib: str) -> bool:
        try:
            return original(lib)
        except OSError:
            return False

    module._load_lib = _load_lib


class _WrappedLoader(importlib.abc.Loader):
    def __init__(self, loader, name: str, spec):
        self._loader, self._name, self._spec = loader, name, spec

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        if self._name == "torchvision":
            _prepare_torchvision(self._spec)
            self._loader.exec_module(module)
        elif self._name == "torchaudio._extension.utils":
            self._loader.exec_module(module)
            _patch_torchaudio_utils(module)
        elif self._name == "torchcodec":
            try:
                self._loader.exec_module(module)
            except OSError as e:  # a CUDA build without CUDA libraries: treat as not installed
                raise ImportError(f"torchcodec is unusable here: {e}") from e
        else:
            self._loader.exec_module(module)

    def __getattr__(self, item):  # is_package, get_code, get_source, ...
        return getattr(self._loader, item)


class _CompatFinder(importlib.abc.MetaPathFinder):
    NAMES = {"torchvision", "torchaudio._extension.utils", "torchcodec"}

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self.NAMES:
            return None
        for finder in sys.meta_path:
            # Skip every copy of this hook (another import of the module, an older install's), not
            # only this one: two copies would otherwise call each other forever.
            if _is_compat_finder(finder) or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _WrappedLoader(spec.loader, fullname, spec)
                return spec
        return None


def _is_compat_finder(finder) -> bool:
    return type(finder).__name__ == _CompatFinder.__name__


def install() -> None:
    """Add the import hook to this process (idempotent)."""
    if not any(_is_compat_finder(f) for f in sys.meta_path):
        sys.meta_path.insert(0, _CompatFinder())


def write_pth(site_packages: str | None = None) -> Path:
    """Write the .pth file that installs the hook in every interpreter of this environment."""
    target = Path(site_packages or sysconfig.get_paths()["purelib"]) / PTH_NAME
    target.write_text("import mvrec.torch_compat as _m; _m.install()\n")
    return target


if __name__ == "__main__":
    if "--install-pth" in sys.argv[1:]:
        print(f"wrote {write_pth()}")
    else:
        print(__doc__)
