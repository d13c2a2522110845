"""The one typed configuration of mvrec.

Precedence, lowest to highest: embedded defaults < `mvrec.toml` < `MVREC_<SECTION>__<KEY>`
environment variables < command-line flags. Unknown sections or keys are an error that names
where they came from, never silently ignored.

    [extract]                          # mvrec.toml
    model = "Qwen/Qwen2.5-VL-3B-Instruct"
    batch_size = 8

    MVREC_EXTRACT__BATCH_SIZE=16       # environment

Every section is a plain dataclass; `Config` holds one of each.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

CONFIG_FILE = "mvrec.toml"
ENV_PREFIX = "MVREC_"
ENV_CONFIG_PATH = "MVREC_CONFIG"  # points at a TOML file other than ./mvrec.toml


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message names the key and its source."""


@dataclass
class StoreConfig:
    # A local directory or an object-store URI such as s3://bucket/prefix.
    path: str = "./.mvrec/store"
    # Passed to Delta Lake's object store, e.g. AWS_ENDPOINT_URL, AWS_REGION, AWS_ALLOW_HTTP.
    storage_options: dict[str, str] = field(default_factory=dict)


@dataclass
class PrefectConfig:
    # PREFECT_HOME for the embedded (ephemeral) mode; ignored when PREFECT_API_URL is set.
    home: str = "./.mvrec/prefect"
    # threads | dask | ray
    task_runner: str = "threads"
    max_workers: int = 2
    # Empty: start a local cluster. Otherwise the scheduler / Ray address to join.
    dask_address: str = ""
    ray_address: str = ""
    # Tag on LVLM tasks; `prefect concurrency-limit create gpu N` caps GPU concurrency.
    gpu_tag: str = "gpu"
    task_retries: int = 2
    retry_delay_s: float = 2.0


@dataclass
class ExtractConfig:
    # transformers | vllm
    backend: str = "transformers"
    # A hub id or a local directory; `mvrec build-test-model` makes a tiny local one.
    model: str = "Qwen/Qwen2.5-VL-3B-Instruct"
    revision: str = ""
    # auto | cpu | cuda | cuda:N
    device: str = "auto"
    # auto (fp32 on CPU, bf16 on GPU) | float32 | bfloat16 | float16
    dtype: str = "auto"
    prompt: str = "Describe this micro-video in one sentence."
    max_new_tokens: int = 32
    # uniform:N or fps:F
    frames: str = "uniform:8"
    max_frames: int = 32
    # Per-frame pixel budget; frames are downscaled to it while decoding.
    max_pixels: int = 224 * 224
    max_duration_s: float = 3600.0
    max_file_bytes: int = 2 * 1024**3
    # video (mean over video tokens) | prompt (mean over all prompt tokens) | last (last prompt token)
    pooling: str = "video"
    # "all" or a comma list of layer indices, e.g. "0,8,16,final"
    layers: str = "all"
    batch_size: int = 4
    # A video of which fewer frames decode than its header promises: accept (stored, flagged
    # `partial` in videos) | fail (a PartialVideo failure row instead).
    partial: str = "accept"
    # Rows per store commit.
    commit_size: int = 64
    decode_workers: int = 2
    # Sentence-transformers model for caption vectors; resolved offline when packaged.
    text_model: str = "all-MiniLM-L6-v2"


@dataclass
class VLLMConfig:
    max_model_len: int = 8192
    max_num_seqs: int = 8
    dtype: str = "auto"
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    gpu_memory_utilization: float = 0.85
    mm_processor_kwargs: dict[str, Any] = field(default_factory=dict)
    # CPU backend only: KV cache in GiB and OpenMP binding (auto | nobind | 0-1 ...).
    cpu_kvcache_space_gib: int = 1
    cpu_omp_threads_bind: str = "auto"
    # False runs the engine in-process (starts in ~3 s instead of ~20 s).
    multiprocessing: bool = False


@dataclass
class RefreshConfig:
    # What the nightly refresh reads: a directory, a manifest file (.txt/.csv) or a URI.
    source: str = "./videos"
    # A MicroLens pairs file; when set, each refresh retrains the recommender on the new features.
    interactions: str = ""
    cron: str = "0 2 * * *"
    deployment: str = "nightly"


@dataclass
class TrainConfig:
    dim: int = 64
    max_seq_len: int = 10
    min_seq_len: int = 5
    n_blocks: int = 2
    n_heads: int = 2
    dropout: float = 0.1
    lr: float = 1e-3
    weight_decay: float = 0.1
    grad_clip: float = 5.0
    batch_size: int = 512
    max_epochs: int = 100
    patience: int = 5
    # full | inbatch | sampled
    loss: str = "full"
    num_negatives: int = 256
    seed: int = 0
    device: str = "auto"
    out: str = "./.mvrec/runs"
    # Item representation: id | replace | fuse | dff
    representation: str = "id"
    # caption | hidden:all | hidden:<l1,l2,...> (final = -1); ignored for `id`
    source: str = "hidden:all"
    # Mask each user's other training items out of the training softmax, as the paper does.
    mask_history: bool = True
    eval_batch_size: int = 1024
    # full | sampled (100 random negatives, the SASRec paper's protocol)
    eval_protocol: str = "full"
    # Items with no features: zero (zero vector, listed in the run) | error
    missing_features: str = "zero"
    # 0: half the CPU cores (at most 4) torch threads; the CPU is usually shared.
    num_threads: int = 0


@dataclass
class StudyConfig:
    seeds: int = 3
    out: str = "./.mvrec/study"
    max_epochs: int = 30
    # The study trains many small models: smaller batches (more steps per epoch) and a higher lr
    # than the paper's 512 / 1e-3 converge within max_epochs on the demo corpus.
    batch_size: int = 128
    lr: float = 0.002
    # Hidden layers to study: all | comma list such as "0,4,8,final"
    layers: str = "all"
    # Representations to run (a subset of id,replace,fuse,dff); all four is the paper's grid.
    representations: str = "id,replace,fuse,dff"


@dataclass
class Config:
    store: StoreConfig = field(default_factory=StoreConfig)
    prefect: PrefectConfig = field(default_factory=PrefectConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    refresh: RefreshConfig = field(default_factory=RefreshConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    study: StudyConfig = field(default_factory=StudyConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)


def _sections() -> dict[str, type]:
    return typing.get_type_hints(Config)


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check or convert one value to the field's declared type."""
    tp = annotation
    origin = typing.get_origin(tp)
    if origin is dict or tp is dict:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{where}: expected a JSON object, got {value!r}") from e
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table/object, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"1", "true", "yes", "on", "0", "false", "no", "off"}:
            return value.lower() in {"1", "true", "yes", "on"}
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            out = tp(value)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from e
        if tp is int and isinstance(value, float) and value != out:
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return out
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    raise TypeError(f"config field {where} has an unsupported type {tp!r}")


def _apply(cfg: Config, section: str, key: str, value: Any, source: str) -> None:
    sections = _sections()
    if section not in sections:
        raise ConfigError(f"{source}: unknown section [{section}] (known: {', '.join(sections)})")
    obj = getattr(cfg, section)
    fields = typing.get_type_hints(type(obj))
    if key not in fields:
        raise ConfigError(f"{source}: unknown key {section}.{key} (known: {', '.join(fields)})")
    setattr(obj, key, _coerce(value, fields[key], f"{source}: {section}.{key}"))


def _read_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from e
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file: {e.strerror}") from e


def load_config(
    path: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build the effective config.

    path: a TOML file; default `$MVREC_CONFIG`, else `./mvrec.toml` if it exists.
    env: environment mapping (default os.environ); `MVREC_SECTION__KEY=value`.
    overrides: command-line flags as {"section.key": value}; None values are skipped.
    """
    env = os.environ if env is None else env
    cfg = Config()

    if path is None and env.get(ENV_CONFIG_PATH):
        path = env[ENV_CONFIG_PATH]
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"config file not found: {file}")
    else:
        file = Path(CONFIG_FILE)
        file = file if file.is_file() else None
    if file is not None:
        for section, table in _read_file(file).items():
            if not isinstance(table, dict):
                raise ConfigError(f"{file}: top-level key {section!r} must be a [section] table")
            for key, value in table.items():
                _apply(cfg, section, key, value, str(file))

    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_CONFIG_PATH or name == "MVREC_DEBUG":
            continue
        rest = name[len(ENV_PREFIX):]
        if "__" not in rest:
            raise ConfigError(f"environment: {name} is not MVREC_<SECTION>__<KEY>")
        section, key = rest.split("__", 1)
        _apply(cfg, section.lower(), key.lower(), value, f"environment {name}")

    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        section, _, key = dotted.partition(".")
        _apply(cfg, section, key, value, f"option {dotted}")
    return cfg
