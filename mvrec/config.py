"""The one typed configuration of mvrec.

Precedence, lowest to highest: embedded defaults < `mvrec.toml` < `MVREC_<SECTION>__<KEY>`
environment variables < command-line flags. Unknown sections or keys, values of the wrong type
and values out of range (CHECKS below) are an error that names the key and where its value came
from, raised while the config loads: before any command starts work.

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
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

CONFIG_FILE = "mvrec.toml"
ENV_PREFIX = "MVREC_"
ENV_CONFIG_PATH = "MVREC_CONFIG"  # points at a TOML file other than ./mvrec.toml
# MVREC_* variables that are not config keys: the debug switch and test-only hooks.
ENV_NOT_CONFIG = ("MVREC_CONFIG", "MVREC_DEBUG", "MVREC_TEST_")


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
    # Videos per store commit, at least: a commit takes every result waiting, so it grows when
    # commits lag behind the replicas (flows/extract.py).
    commit_size: int = 64
    # Where the data plane runs (tasks/dataplane.py): threads in this process, or a Ray cluster
    # (ray_address; empty starts a local one).
    engine: str = "threads"
    ray_address: str = ""
    # Model replicas, each loaded once: 0 = one per GPU the engine sees (at least 1).
    replicas: int = 0
    # Decode + preprocess workers (threads, or one-CPU Ray tasks).
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
    # constant | cosine (decays lr to 0 over max_epochs, by step; early stopping may end sooner)
    lr_schedule: str = "constant"
    weight_decay: float = 0.1
    grad_clip: float = 5.0
    batch_size: int = 512
    max_epochs: int = 100
    patience: int = 5
    # A named recipe whose train keys apply first (e.g. sasrec-games); see recommender/presets.py.
    preset: str = ""
    # auto (full up to 50k items, else sampled) | full (exact, chunked) | sampled (logQ-corrected) | bce
    loss: str = "auto"
    # Negatives of the sampled loss, shared by a batch, drawn from: uniform | popularity
    num_negatives: int = 1024
    negative_sampler: str = "uniform"
    # Validate on this many random users per epoch (0: all); the final metrics always use all.
    eval_users: int = 0
    seed: int = 0
    device: str = "auto"
    out: str = "./.mvrec/runs"
    # Item representation: id | replace | fuse | dff
    representation: str = "id"
    # caption | hidden:all | hidden:<l1,l2,...> (final = -1); ignored for `id`
    source: str = "hidden:all"
    # Mask each user's other training items out of the training softmax, as the paper does.
    mask_history: bool = True
    # The cold-item rule, off by default (the paper's models): items with fewer training interactions
    # than id_min_count drop their own ID embedding (fuse/dff: content only; id: one shared row), and
    # in training id_dropout of item occurrences do too. The study sets it for every cell (study.id_*).
    id_min_count: int = 0
    id_dropout: float = 0.0
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
    # The cold-item rule (train.id_min_count / id_dropout) for every cell, id included, so that the
    # cells treat cold items alike; see docs/recommender.md, "Controls".
    id_min_count: int = 5
    id_dropout: float = 0.5


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


def _apply(cfg: Config, section: str, key: str, value: Any, source: str,
           sources: dict[str, str] | None = None) -> None:
    sections = _sections()
    if section not in sections:
        raise ConfigError(f"{source}: unknown section [{section}] (known: {', '.join(sections)})")
    obj = getattr(cfg, section)
    fields = typing.get_type_hints(type(obj))
    if key not in fields:
        raise ConfigError(f"{source}: unknown key {section}.{key} (known: {', '.join(fields)})")
    setattr(obj, key, _coerce(value, fields[key], f"{source}: {section}.{key}"))
    if sources is not None:
        sources[f"{section}.{key}"] = source


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
    override_sources: Mapping[str, str] | None = None,
) -> Config:
    """Build the effective config.

    path: a TOML file; default `$MVREC_CONFIG`, else `./mvrec.toml` if it exists.
    env: environment mapping (default os.environ); `MVREC_SECTION__KEY=value`.
    overrides: command-line flags as {"section.key": value}; None values are skipped.
    override_sources: how to name an override's source in errors, e.g. {"extract.frames": "--frames"}.
    """
    env = os.environ if env is None else env
    cfg = Config()
    sources: dict[str, str] = {}  # "section.key" -> where its value came from

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
                _apply(cfg, section, key, value, str(file), sources)

    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or name.startswith(ENV_NOT_CONFIG):
            continue
        rest = name[len(ENV_PREFIX):]
        if "__" not in rest:
            raise ConfigError(f"environment: {name} is not MVREC_<SECTION>__<KEY>")
        section, key = rest.split("__", 1)
        _apply(cfg, section.lower(), key.lower(), value, f"environment {name}", sources)

    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        section, _, key = dotted.partition(".")
        _apply(cfg, section, key, value, (override_sources or {}).get(dotted, f"option {dotted}"), sources)
    check_config(cfg, sources)
    return cfg


# Checks of values, run on the whole config once it is loaded. Each takes the value and returns
# what is wrong with it, or None. Every key has one (tests/test_config.py holds them to that).


def _min(n: float) -> Callable[[Any], str | None]:
    return lambda v: None if v >= n else f"must be >= {n}, got {v!r}"


def _positive(v: float) -> str | None:
    return None if v > 0 else f"must be > 0, got {v!r}"


def _fraction(v: float) -> str | None:
    return None if 0 < v <= 1 else f"must be > 0 and <= 1, got {v!r}"


def _one_of(*choices: str) -> Callable[[Any], str | None]:
    return lambda v: None if v in choices else f"{v!r} is not one of {', '.join(choices)}"


def _unit_interval(v: float) -> str | None:
    return None if 0 <= v < 1 else f"must be >= 0 and < 1, got {v!r}"


def _any(v: Any) -> str | None:
    return None


def _nonempty(v: str) -> str | None:
    return None if str(v).strip() else "must not be empty"


def _device(v: str) -> str | None:
    return None if re.fullmatch(r"auto|cpu|cuda(:\d+)?", v) else f"{v!r} is not auto, cpu, cuda or cuda:N"


def _dtype(v: str) -> str | None:
    from tasks.lvlm import dtype_name

    try:
        dtype_name(v, on_cpu=True)
    except ValueError:
        return f"{v!r} is not auto, float32, bfloat16 or float16"
    return None


def _frames(v: str) -> str | None:
    from tasks.decode import parse_policy  # the one parser of frame policies

    try:
        parse_policy(v)
    except ValueError as e:
        return str(e).removeprefix("policy: ")
    return None


def _layers(v: str) -> str | None:
    """Syntax only; the range is checked against the model when it loads."""
    parts = [p.strip() for p in str(v).split(",")]
    if str(v).strip() == "all" or all(p in ("final", "-1") or p.isdigit() for p in parts):
        return None
    return f"{v!r} is not 'all' or a comma list of layer indices and 'final', such as 0,8,final"


def _train_source(v: str) -> str | None:
    if v == "caption" or (v.startswith("hidden:") and _layers(v[len("hidden:"):]) is None):
        return None
    return f"{v!r} is not caption, hidden:all or hidden:<layers> such as hidden:0,4,final"


def _representations(v: str) -> str | None:
    names = [n.strip() for n in v.split(",") if n.strip()]
    bad = [n for n in names if n not in REPRESENTATIONS]
    if not names or bad:
        return f"{v!r} is not a comma list of {', '.join(REPRESENTATIONS)}"
    return None


def _cron(v: str) -> str | None:
    # Prefect checks the fields themselves when `mvrec serve` registers the schedule.
    return None if v.startswith("@") or len(v.split()) in (5, 6) else f"{v!r} is not a cron expression"


def _cpu_bind(v: str) -> str | None:
    if v in ("auto", "nobind") or re.fullmatch(r"\d+(-\d+)?(,\d+(-\d+)?)*", v):
        return None
    return f"{v!r} is not auto, nobind or a core list such as 0-1"


def _string_table(v: dict) -> str | None:
    bad = [k for k, x in v.items() if not isinstance(x, str)]
    return f"values must be strings (quote them), not {', '.join(bad)}" if bad else None


def _preset(v: str) -> str | None:
    if not v:
        return None
    from recommender.presets import PRESETS

    return None if v in PRESETS else f"{v!r} is not a preset ({', '.join(PRESETS)})"


REPRESENTATIONS = ("id", "replace", "fuse", "dff")
LOSSES = ("auto", "full", "sampled", "bce")  # recommender/losses.py implements them

CHECKS: dict[str, Callable[[Any], str | None]] = {
    "store.path": _nonempty, "store.storage_options": _string_table,
    "prefect.home": _nonempty, "prefect.task_retries": _min(0), "prefect.retry_delay_s": _min(0),
    "extract.backend": _one_of("transformers", "vllm"), "extract.model": _nonempty, "extract.revision": _any,
    "extract.device": _device, "extract.dtype": _dtype, "extract.prompt": _any, "extract.max_new_tokens": _min(0),
    "extract.frames": _frames, "extract.max_frames": _min(2), "extract.max_pixels": _min(28 * 28),
    "extract.max_duration_s": _positive, "extract.max_file_bytes": _positive,
    "extract.pooling": _one_of("video", "prompt", "last"), "extract.layers": _layers, "extract.batch_size": _min(1),
    "extract.partial": _one_of("accept", "fail"), "extract.commit_size": _min(1), "extract.decode_workers": _min(1),
    "extract.engine": _one_of("threads", "ray"), "extract.ray_address": _any, "extract.replicas": _min(0),
    "extract.text_model": _nonempty,
    "vllm.max_model_len": _min(1), "vllm.max_num_seqs": _min(1), "vllm.dtype": _dtype,
    "vllm.tensor_parallel_size": _min(1), "vllm.data_parallel_size": _min(1),
    "vllm.gpu_memory_utilization": _fraction, "vllm.mm_processor_kwargs": _any, "vllm.cpu_kvcache_space_gib": _min(1),
    "vllm.cpu_omp_threads_bind": _cpu_bind, "vllm.multiprocessing": _any,
    "refresh.source": _nonempty, "refresh.interactions": _any, "refresh.cron": _cron, "refresh.deployment": _nonempty,
    "train.dim": _min(1), "train.max_seq_len": _min(1), "train.min_seq_len": _min(3), "train.n_blocks": _min(1),
    "train.n_heads": _min(1), "train.dropout": _unit_interval,
    "train.lr": _positive, "train.lr_schedule": _one_of("constant", "cosine"), "train.weight_decay": _min(0), "train.grad_clip": _positive, "train.batch_size": _min(1),
    "train.max_epochs": _min(1), "train.patience": _min(1), "train.preset": _preset, "train.loss": _one_of(*LOSSES),
    "train.num_negatives": _min(1), "train.negative_sampler": _one_of("uniform", "popularity"),
    "train.eval_users": _min(0), "train.seed": _min(0), "train.device": _device, "train.out": _nonempty,
    "train.representation": _one_of(*REPRESENTATIONS), "train.source": _train_source, "train.mask_history": _any,
    "train.id_min_count": _min(0), "train.id_dropout": _unit_interval,
    "train.eval_batch_size": _min(1), "train.eval_protocol": _one_of("full", "sampled"),
    "train.missing_features": _one_of("zero", "error"), "train.num_threads": _min(0),
    "study.seeds": _min(1), "study.out": _nonempty, "study.max_epochs": _min(1), "study.batch_size": _min(1),
    "study.lr": _positive, "study.layers": _layers, "study.representations": _representations,
    "study.id_min_count": _min(0), "study.id_dropout": _unit_interval,
}


def check_config(cfg: Config, sources: Mapping[str, str] | None = None) -> None:
    """Raise ConfigError for the first value out of range, naming the key and its source."""
    sources = sources or {}

    def fail(key: str, problem: str) -> None:
        raise ConfigError(f"{sources.get(key, 'default')}: {key}: {problem}")

    for section, values in cfg.to_dict().items():
        for key, value in values.items():
            check = CHECKS.get(f"{section}.{key}")
            if check is None:  # a key added without a check: refuse to guess
                raise TypeError(f"config key {section}.{key} has no entry in mvrec.config.CHECKS")
            problem = check(value)
            if problem:
                fail(f"{section}.{key}", problem)
    if cfg.train.dim % cfg.train.n_heads:
        key = "train.dim" if "train.dim" in sources else "train.n_heads"
        fail(key, f"train.dim ({cfg.train.dim}) is not a multiple of train.n_heads ({cfg.train.n_heads})")
