"""The one typed configuration of mvrec, and the ground of the project: it imports nothing from
mvrec's packages, and tasks/, recommender/ and flows/ take their vocabularies from it (backends,
poolings, dtypes, frame policies, representations, losses, engines) and the presets' data.

Precedence, lowest to highest:

    embedded defaults < train.preset < mvrec.toml < MVREC_<SECTION>__<KEY> environment < flags

A preset (`train.preset`, named at any level) sets its train keys over the defaults, and every key
set explicitly, at any level, wins over it. Unknown sections or keys, values of the wrong type and
values out of range (each field's check) are an error that names the key and where its value came
from, raised while the config loads: before any command starts work.

    [extract]                          # mvrec.toml
    model = "Qwen/Qwen2.5-VL-3B-Instruct"
    batch_size = 8

    MVREC_EXTRACT__BATCH_SIZE=16       # environment

Every section is a plain dataclass; `Config` holds one of each. Each field is `setting(default,
check)`: the check returns what is wrong with a value, or None.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
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


# ---------------------------------------------------------------------------------------------
# vocabularies: the one list of each set of choices; the modules that implement them import it

# tasks/lvlm_transformers.py, tasks/lvlm_vllm.py; standin: the accelerator stand-in of benches (tasks/lvlm_standin.py)
BACKENDS = ("transformers", "vllm", "standin")
ENGINES = ("threads", "ray")  # tasks/dataplane.py
STUDY_ENGINES = ("serial", "processes", "ray")  # recommender/engines.py
POOLINGS = ("video", "prompt", "last")  # tasks/lvlm.py
REPRESENTATIONS = ("id", "replace", "fuse", "dff")  # recommender/model.py
LOSSES = ("auto", "full", "sampled", "gbce", "bce")  # recommender/losses.py
BLOCKS = ("sasrec", "ligr")  # recommender/model.py
EVAL_PROTOCOLS = ("full", "sampled")  # recommender/evaluate.py
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16", "half": "float16"}


def dtype_name(dtype: str, on_cpu: bool) -> str:
    """auto: float32 on CPU, bfloat16 on GPU; otherwise the canonical name of `dtype`."""
    if not dtype or dtype == "auto":
        return "float32" if on_cpu else "bfloat16"
    if dtype not in DTYPES:
        raise ValueError(f"dtype: {dtype!r} is not auto, float32, bfloat16 or float16")
    return DTYPES[dtype]


@dataclass(frozen=True)
class Policy:
    """Which frames to decode (tasks/decode.py): uniform:N or fps:F."""

    kind: str  # uniform | fps
    value: float  # frames (uniform) or frames per second (fps)


def parse_policy(policy: str) -> Policy:
    """'uniform:8' or 'fps:2.0'. Raises ValueError naming the `policy` parameter."""
    kind, sep, value = str(policy).strip().partition(":")
    if not sep or kind not in ("uniform", "fps"):
        raise ValueError(f"policy: {policy!r} is not 'uniform:N' or 'fps:F'")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"policy: {policy!r} has a non-numeric value {value!r}") from None
    if kind == "uniform" and (number < 1 or number != int(number)):
        raise ValueError(f"policy: {policy!r} needs a whole number of frames >= 1")
    if kind == "fps" and not (number > 0 and math.isfinite(number)):
        raise ValueError(f"policy: {policy!r} needs frames per second > 0")
    return Policy(kind, number)


# Named training recipes (`train.preset`, `--preset`); docs/recommender.md says what each is for.
#   sasrec-games  Amazon Games-like catalogues (tens of thousands of items, sequences up to 50): the
#                 SASRec paper's dimensions, the exact full softmax, a cosine lr over 25 epochs.
#   sasrec-bce    the published recipe (SASRec paper / pmixer SASRec.pytorch), for comparison.
#   esasrec-games sasrec-games with LiGR blocks and a 2,048-negative sampled softmax (eSASRec).
_GAMES = dict(dim=50, max_seq_len=50, min_seq_len=3, n_blocks=2, n_heads=1, eval_protocol="sampled")
PRESETS: dict[str, dict[str, Any]] = {
    # The whole cosine schedule runs (patience = max_epochs); the best validation epoch is kept.
    "sasrec-games": {**_GAMES, "loss": "full", "lr": 4e-3, "lr_schedule": "cosine", "max_epochs": 25, "patience": 25,
                     "dropout": 0.6, "mask_history": False, "batch_size": 128, "weight_decay": 0.1,
                     "eval_users": 10_000},
    "sasrec-bce": {**_GAMES, "loss": "bce", "dropout": 0.5, "lr": 1e-3, "batch_size": 128, "weight_decay": 0.0,
                   "eval_users": 10_000, "patience": 3},
}
# eSASRec's recipe (arXiv 2508.06450) on this backbone: LiGR blocks and a sampled softmax; the best
# epoch by full-ranking validation. Measured in docs/results.md; not the study's default.
PRESETS["esasrec-games"] = {**PRESETS["sasrec-games"], "block": "ligr", "loss": "sampled", "num_negatives": 2048,
                            "eval_protocol": "full"}


# ---------------------------------------------------------------------------------------------
# checks of values: each takes the value and returns what is wrong with it, or None

Check = Callable[[Any], "str | None"]


def _min(n: float) -> Check:
    return lambda v: None if v >= n else f"must be >= {n}, got {v!r}"


def _positive(v: float) -> str | None:
    return None if v > 0 else f"must be > 0, got {v!r}"


def _fraction(v: float) -> str | None:
    return None if 0 < v <= 1 else f"must be > 0 and <= 1, got {v!r}"


def _one_of(*choices: str) -> Check:
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
    try:
        dtype_name(v, on_cpu=True)
    except ValueError as e:
        return str(e).removeprefix("dtype: ")
    return None


def _frames(v: str) -> str | None:
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
    return None if not v or v in PRESETS else f"{v!r} is not a preset ({', '.join(PRESETS)})"


def setting(default: Any, check: Check) -> Any:
    """A config field with the check of its values (run by check_config)."""
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata={"check": check})
    return field(default=default, metadata={"check": check})


# ---------------------------------------------------------------------------------------------
# sections


@dataclass
class StoreConfig:
    # A local directory or an object-store URI such as s3://bucket/prefix.
    path: str = setting("./.mvrec/store", _nonempty)
    # Passed to Delta Lake's object store, e.g. AWS_ENDPOINT_URL, AWS_REGION, AWS_ALLOW_HTTP.
    storage_options: dict[str, str] = setting({}, _string_table)
    # The nightly flow's maintenance (storage/maintenance.py) compacts, vacuums and checkpoints a
    # table once one partition holds more small files, or more versions passed since its last
    # checkpoint, than these. 0 turns that check off.
    maintain_max_files: int = setting(50, _min(0))
    maintain_max_versions: int = setting(50, _min(0))
    # Vacuum deletes files unreferenced for longer than this; every tagged version's are kept.
    vacuum_retention_hours: float = setting(168.0, _min(0))


@dataclass
class PrefectConfig:
    # PREFECT_HOME for the embedded (ephemeral) mode; ignored when PREFECT_API_URL is set.
    home: str = setting("./.mvrec/prefect", _nonempty)
    task_retries: int = setting(2, _min(0))
    retry_delay_s: float = setting(2.0, _min(0))


@dataclass
class ExtractConfig:
    backend: str = setting("transformers", _one_of(*BACKENDS))
    # A hub id or a local directory; `mvrec build-test-model` makes a tiny local one.
    model: str = setting("Qwen/Qwen2.5-VL-3B-Instruct", _nonempty)
    revision: str = setting("", _any)
    # auto | cpu | cuda | cuda:N
    device: str = setting("auto", _device)
    # auto (fp32 on CPU, bf16 on GPU) | float32 | bfloat16 | float16
    dtype: str = setting("auto", _dtype)
    prompt: str = setting("Describe this micro-video in one sentence.", _any)
    max_new_tokens: int = setting(32, _min(0))
    # uniform:N or fps:F
    frames: str = setting("uniform:8", _frames)
    max_frames: int = setting(32, _min(2))
    # Per-frame pixel budget; frames are downscaled to it while decoding.
    max_pixels: int = setting(224 * 224, _min(28 * 28))
    max_duration_s: float = setting(3600.0, _positive)
    max_file_bytes: int = setting(2 * 1024**3, _positive)
    # video (mean over video tokens) | prompt (mean over all prompt tokens) | last (last prompt token)
    pooling: str = setting("video", _one_of(*POOLINGS))
    # "all" or a comma list of layer indices, e.g. "0,8,16,final"
    layers: str = setting("all", _layers)
    batch_size: int = setting(4, _min(1))
    # A video of which fewer frames decode than its header promises: accept (stored, flagged
    # `partial` in videos) | fail (a PartialVideo failure row instead).
    partial: str = setting("accept", _one_of("accept", "fail"))
    # Videos per store commit, at least: a commit takes every result waiting, so it grows when
    # commits lag behind the replicas (flows/extract.py).
    commit_size: int = setting(64, _min(1))
    # ... and at most: a lagging commit grows up to this many videos (one bounded commit per table).
    max_commit_size: int = setting(4096, _min(1))
    # Where the data plane runs (tasks/dataplane.py): threads in this process, or a Ray cluster
    # (ray_address; empty starts a local one).
    engine: str = setting("threads", _one_of(*ENGINES))
    ray_address: str = setting("", _any)
    # Model replicas, each loaded once: 0 = one per GPU the engine sees (at least 1).
    replicas: int = setting(0, _min(0))
    # With no replica ready and no live node able to hold one (the only GPU node gone), fail after
    # this many seconds (one line) instead of waiting for such a node.
    place_timeout_s: float = setting(120.0, _positive)
    # Decode + preprocess workers (threads, or one-CPU Ray tasks).
    decode_workers: int = setting(2, _min(1))
    # Sentence-transformers model for caption vectors; resolved offline when packaged.
    text_model: str = setting("all-MiniLM-L6-v2", _nonempty)


@dataclass
class VLLMConfig:
    max_model_len: int = setting(8192, _min(1))
    max_num_seqs: int = setting(8, _min(1))
    dtype: str = setting("auto", _dtype)
    # GPUs per model replica (one engine sharded over t GPUs): extract.replicas counts such sets.
    tensor_parallel_size: int = setting(1, _min(1))
    # Deprecated alias of extract.replicas (load_config says so); an explicit extract.replicas wins.
    data_parallel_size: int = setting(1, _min(1))
    gpu_memory_utilization: float = setting(0.85, _fraction)
    mm_processor_kwargs: dict[str, Any] = setting({}, _any)
    # CPU backend only: KV cache in GiB and OpenMP binding (auto | nobind | 0-1 ...).
    cpu_kvcache_space_gib: int = setting(1, _min(1))
    cpu_omp_threads_bind: str = setting("auto", _cpu_bind)
    # False runs the engine in-process: no __main__ guard, and it starts sooner (docs/benchmarks.md).
    multiprocessing: bool = setting(False, _any)


@dataclass
class RefreshConfig:
    # What the nightly refresh reads: a directory, a manifest file (.txt/.csv) or a URI.
    source: str = setting("./videos", _nonempty)
    # A MicroLens pairs file; when set, each refresh retrains the recommender on the new features.
    interactions: str = setting("", _any)
    cron: str = setting("0 2 * * *", _cron)
    deployment: str = setting("nightly", _nonempty)
    # The change check trusts a file's recorded stat (size, mtime, ctime, inode; an object's ETag)
    # and reads no bytes of an unchanged file. verify_days > 0 also re-reads every file whose
    # hash is older than that many days (0: only `mvrec refresh --verify` re-reads everything).
    verify_days: float = setting(0.0, _min(0))


@dataclass
class TrainConfig:
    dim: int = setting(64, _min(1))
    max_seq_len: int = setting(10, _min(1))
    min_seq_len: int = setting(5, _min(3))
    n_blocks: int = setting(2, _min(1))
    n_heads: int = setting(2, _min(1))
    # Encoder block: sasrec (LayerNorm, GELU FFN) | ligr (RMSNorm, gated residuals, SwiGLU; eSASRec)
    block: str = setting("sasrec", _one_of(*BLOCKS))
    dropout: float = setting(0.1, _unit_interval)
    lr: float = setting(1e-3, _positive)
    # constant | cosine (decays lr to 0 over max_epochs, by step; early stopping may end sooner)
    lr_schedule: str = setting("constant", _one_of("constant", "cosine"))
    weight_decay: float = setting(0.1, _min(0))
    grad_clip: float = setting(5.0, _positive)
    batch_size: int = setting(512, _min(1))
    max_epochs: int = setting(100, _min(1))
    patience: int = setting(5, _min(1))
    # A named recipe (PRESETS above) whose keys sit between the defaults and everything set explicitly.
    preset: str = setting("", _preset)
    # auto (full up to 50k items, else sampled) | full (exact, chunked) | sampled (logQ-corrected) | gbce | bce
    loss: str = setting("auto", _one_of(*LOSSES))
    # Negatives of the sampled and gbce losses, shared by a batch, drawn from: uniform | popularity
    num_negatives: int = setting(1024, _min(1))
    # gbce's calibration t (gSASRec): 0 = plain BCE over the negatives, 1 = calibrated to the catalogue
    gbce_t: float = setting(0.75, _unit_interval)
    negative_sampler: str = setting("uniform", _one_of("uniform", "popularity"))
    # Validate on this many random users per epoch (0: all); the final metrics always use all.
    eval_users: int = setting(0, _min(0))
    seed: int = setting(0, _min(0))
    device: str = setting("auto", _device)
    out: str = setting("./.mvrec/runs", _nonempty)
    # Item representation: id | replace | fuse | dff
    representation: str = setting("id", _one_of(*REPRESENTATIONS))
    # caption | hidden:all | hidden:<l1,l2,...> (final = -1); ignored for `id`
    source: str = setting("hidden:all", _train_source)
    # Mask each user's other training items out of the training softmax, as the paper does.
    mask_history: bool = setting(True, _any)
    # The cold-item rule, off by default (the paper's models): items with fewer training interactions
    # than id_min_count drop their own ID embedding (fuse/dff: content only; id: one shared row), and
    # in training id_dropout of item occurrences do too. The study sets it for every cell (study.id_*).
    id_min_count: int = setting(0, _min(0))
    id_dropout: float = setting(0.0, _unit_interval)
    eval_batch_size: int = setting(1024, _min(1))
    # full | sampled (100 random negatives, the SASRec paper's protocol)
    eval_protocol: str = setting("full", _one_of(*EVAL_PROTOCOLS))
    # Items with no features: zero (zero vector, listed in the run) | error
    missing_features: str = setting("zero", _one_of("zero", "error"))
    # The item features' dtype in memory: float32 | bfloat16 | float16 (half the bytes; the model
    # mixes and projects them chunk by chunk, so no float32 copy of the whole matrix is made).
    features_dtype: str = setting("float32", _one_of("float32", "bfloat16", "float16"))
    # 0: half the CPU cores (at most 4) torch threads; the CPU is usually shared.
    num_threads: int = setting(0, _min(0))


@dataclass
class StudyConfig:
    seeds: int = setting(3, _min(1))
    out: str = setting("./.mvrec/study", _nonempty)
    max_epochs: int = setting(30, _min(1))
    # The study trains many small models: smaller batches (more steps per epoch) and a higher lr
    # than the paper's 512 / 1e-3 converge within max_epochs on the demo corpus.
    batch_size: int = setting(128, _min(1))
    lr: float = setting(0.002, _positive)
    # Hidden layers to study: all | comma list such as "0,4,8,final"
    layers: str = setting("all", _layers)
    # Representations to run (a subset of id,replace,fuse,dff); all four is the paper's grid.
    representations: str = setting("id,replace,fuse,dff", _representations)
    # The cold-item rule (train.id_min_count / id_dropout) for every cell, id included, so that the
    # cells treat cold items alike; see docs/recommender.md, "Controls".
    id_min_count: int = setting(5, _min(0))
    id_dropout: float = setting(0.5, _unit_interval)
    # Where the cell x seed units run (recommender/engines.py): serial | processes (this machine) |
    # ray (ray_address; empty joins the cluster this process is in, or starts a local one).
    engine: str = setting("serial", _one_of(*STUDY_ENGINES))
    # Units at a time: 0 = as many as fit (cores / train.num_threads; the cluster's CPUs or GPUs).
    workers: int = setting(0, _min(0))
    # A GPU share per unit (0.25 packs four small models on one GPU); 0 = CPU units.
    gpus_per_unit: float = setting(0.0, _min(0))
    # Further tries of a unit that failed, before it is reported as missing.
    retries: int = setting(1, _min(0))
    ray_address: str = setting("", _any)


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


# ---------------------------------------------------------------------------------------------
# loading

# One value from one level of the precedence: (section, key, value, where it came from).
Setting = tuple[str, str, Any, str]


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


def _apply(cfg: Config, one: Setting, sources: dict[str, str]) -> None:
    section, key, value, source = one
    sections = _sections()
    if section not in sections:
        raise ConfigError(f"{source}: unknown section [{section}] (known: {', '.join(sections)})")
    obj = getattr(cfg, section)
    fields = typing.get_type_hints(type(obj))
    if key not in fields:
        raise ConfigError(f"{source}: unknown key {section}.{key} (known: {', '.join(fields)})")
    setattr(obj, key, _coerce(value, fields[key], f"{source}: {section}.{key}"))
    sources[f"{section}.{key}"] = source


def _file_settings(file: Path) -> list[Setting]:
    try:
        with file.open("rb") as fh:
            tables = tomllib.load(fh)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{file}: invalid TOML: {e}") from e
    except OSError as e:
        raise ConfigError(f"{file}: cannot read config file: {e.strerror}") from e
    out = []
    for section, table in tables.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{file}: top-level key {section!r} must be a [section] table")
        out += [(section, key, value, str(file)) for key, value in table.items()]
    return out


def _env_settings(env: Mapping[str, str]) -> list[Setting]:
    out = []
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or name.startswith(ENV_NOT_CONFIG):
            continue
        rest = name[len(ENV_PREFIX):]
        if "__" not in rest:
            raise ConfigError(f"environment: {name} is not MVREC_<SECTION>__<KEY>")
        section, key = rest.split("__", 1)
        out.append((section.lower(), key.lower(), value, f"environment {name}"))
    return out


def _flag_settings(overrides: Mapping[str, Any], names: Mapping[str, str]) -> list[Setting]:
    out = []
    for dotted, value in overrides.items():
        section, _, key = dotted.partition(".")
        if value is not None:  # a flag not given
            out.append((section, key, value, names.get(dotted, f"option {dotted}")))
    return out


def _config_file(path: str | Path | None, env: Mapping[str, str]) -> Path | None:
    if path is None and env.get(ENV_CONFIG_PATH):
        path = env[ENV_CONFIG_PATH]
    if path is None:
        return Path(CONFIG_FILE) if Path(CONFIG_FILE).is_file() else None
    if not Path(path).is_file():
        raise ConfigError(f"config file not found: {path}")
    return Path(path)


# What feeds one H200 when the model runs on CUDA (the arithmetic: docs/gpu.md#gpu-defaults). A level
# just above the embedded defaults: a preset, mvrec.toml, MVREC_* or a flag still wins.
GPU_DEFAULTS: dict[tuple[str, str], Any] = {
    ("extract", "batch_size"): 32,  # ~9.5k prompt tokens per forward for demo-sized videos
    ("vllm", "max_num_seqs"): 32,  # a whole batch in one engine step
    ("extract", "decode_workers"): 12,  # of 16 cores: 4 left for the replica's thread, the flow and the system
    ("extract", "commit_size"): 512,  # ~5 s of videos per commit at ~100 videos/s
}


def load_config(
    path: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    override_sources: Mapping[str, str] | None = None,
    on_gpu: bool = False,
) -> Config:
    """Build the effective config.

    on_gpu: the model runs on CUDA; GPU_DEFAULTS replace the CPU defaults (the extraction flow asks
    tasks.dataplane.runs_on_gpu, then loads again).

    path: a TOML file; default `$MVREC_CONFIG`, else `./mvrec.toml` if it exists.
    env: environment mapping (default os.environ); `MVREC_SECTION__KEY=value`.
    overrides: command-line flags as {"section.key": value}; None values are skipped.
    override_sources: how to name an override's source in errors, e.g. {"extract.frames": "--frames"}.
    """
    env = os.environ if env is None else env
    file = _config_file(path, env)
    explicit = [*(_file_settings(file) if file else []), *_env_settings(env),
                *_flag_settings(overrides or {}, override_sources or {})]

    cfg, sources = Config(), {}
    for (section, key), value in (GPU_DEFAULTS.items() if on_gpu else ()):
        _apply(cfg, (section, key, value, "GPU default"), sources)
    named = [(value, source) for section, key, value, source in explicit if (section, key) == ("train", "preset")]
    if named:  # the last level that names a preset wins, as for any key
        apply_preset(cfg, *named[-1], sources)
    for one in explicit:
        _apply(cfg, one, sources)
    _alias_data_parallel(cfg, sources)
    check_config(cfg, sources)
    return cfg


_SAID: set[str] = set()  # deprecation lines already printed by this process


def _alias_data_parallel(cfg: Config, sources: dict[str, str]) -> None:
    """vllm.data_parallel_size = d was d vLLM engines on their own GPU sets: d replicas of the data
    plane now. It sets extract.replicas unless that is set explicitly, and says so once."""
    dp = cfg.vllm.data_parallel_size
    if dp <= 1:
        return
    source = sources.get("vllm.data_parallel_size", "default")
    if "extract.replicas" not in sources:
        cfg.extract.replicas = dp
        sources["extract.replicas"] = source
    line = (f"{source}: vllm.data_parallel_size is deprecated; it is an alias of extract.replicas "
            f"(now {cfg.extract.replicas}): set that instead")
    if line not in _SAID:
        _SAID.add(line)
        print(f"note: {line}", file=sys.stderr)


def apply_preset(cfg: Config, name: Any, source: str, sources: dict[str, str]) -> None:
    """Set the train keys of preset `name` (named by `source`) in cfg: one level of the precedence."""
    if problem := _preset(str(name)):
        raise ConfigError(f"{source}: train.preset: {problem}")
    for key, value in PRESETS.get(str(name), {}).items():
        _apply(cfg, ("train", key, value, f"preset {name}"), sources)


def check_config(cfg: Config, sources: Mapping[str, str] | None = None) -> None:
    """Raise ConfigError for the first value out of range, naming the key and its source."""
    sources = sources or {}

    def fail(key: str, problem: str) -> None:
        raise ConfigError(f"{sources.get(key, 'default')}: {key}: {problem}")

    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        for one in dataclasses.fields(values):
            if "check" not in one.metadata:  # a key added as a plain field: refuse to guess
                raise TypeError(f"config key {section.name}.{one.name} has no check: declare it with setting()")
            if problem := one.metadata["check"](getattr(values, one.name)):
                fail(f"{section.name}.{one.name}", problem)
    if cfg.train.dim % cfg.train.n_heads:
        key = "train.dim" if "train.dim" in sources else "train.n_heads"
        fail(key, f"train.dim ({cfg.train.dim}) is not a multiple of train.n_heads ({cfg.train.n_heads})")
