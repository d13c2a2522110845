"""The typed config: defaults < preset < mvrec.toml < MVREC_* environment < flags, and loud errors."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mvrec.config import ConfigError, load_config

# One key per type: (section, key, file literal, file value, env string, env value, flag value).
PRECEDENCE_CASES = [
    pytest.param("extract", "batch_size", "3", 3, "5", 5, 7, id="int"),
    pytest.param("vllm", "gpu_memory_utilization", "0.5", 0.5, "0.6", 0.6, 0.7, id="float"),
    pytest.param("vllm", "multiprocessing", "true", True, "no", False, True, id="bool"),
    pytest.param("extract", "model", '"file/model"', "file/model", "env/model", "env/model", "flag/model", id="str"),
    pytest.param("store", "storage_options", '{ AWS_REGION = "file" }', {"AWS_REGION": "file"},
                 '{"AWS_REGION": "env"}', {"AWS_REGION": "env"}, {"AWS_REGION": "flag"}, id="dict"),
]


def env_name(section: str, key: str) -> str:
    return f"MVREC_{section.upper()}__{key.upper()}"


def write_toml(tmp_path: Path, text: str, name: str = "mvrec.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def isolated_cwd(tmp_path, monkeypatch):
    """No stray ./mvrec.toml or MVREC_* variables from the developer's shell."""
    monkeypatch.chdir(tmp_path)
    for name in list(__import__("os").environ):
        if name.startswith("MVREC_"):
            monkeypatch.delenv(name)


def test_defaults_are_embedded():
    cfg = load_config(env={})
    assert cfg.store.path == "./.mvrec/store"
    assert cfg.prefect.home == "./.mvrec/prefect"
    assert cfg.extract.device == "auto"
    assert cfg.extract.backend == "transformers"


@pytest.mark.parametrize("section, key, literal, file_value, env_str, env_value, flag_value", PRECEDENCE_CASES)
def test_precedence_file_env_flag(tmp_path, section, key, literal, file_value, env_str, env_value, flag_value):
    path = write_toml(tmp_path, f"[{section}]\n{key} = {literal}\n", name="settings.toml")
    default = getattr(getattr(load_config(env={}), section), key)
    assert default != file_value  # otherwise the file level would prove nothing

    from_file = load_config(path, env={})
    assert getattr(getattr(from_file, section), key) == file_value

    env = {env_name(section, key): env_str}
    from_env = load_config(path, env=env)
    assert getattr(getattr(from_env, section), key) == env_value

    from_flag = load_config(path, env=env, overrides={f"{section}.{key}": flag_value})
    assert getattr(getattr(from_flag, section), key) == flag_value
    assert type(getattr(getattr(from_flag, section), key)) is type(file_value)


def test_flag_none_means_not_given(tmp_path):
    path = write_toml(tmp_path, "[extract]\nbatch_size = 3\n")
    cfg = load_config(path, env={}, overrides={"extract.batch_size": None})
    assert cfg.extract.batch_size == 3


def test_mvrec_toml_in_working_directory_is_found(tmp_path):
    write_toml(tmp_path, '[extract]\nmodel = "local-model"\n')
    assert load_config(env={}).extract.model == "local-model"


def test_mvrec_config_env_points_at_another_file(tmp_path):
    write_toml(tmp_path, '[extract]\nmodel = "cwd-model"\n')
    other = write_toml(tmp_path, '[extract]\nmodel = "other-model"\n', name="other.toml")
    assert load_config(env={"MVREC_CONFIG": str(other)}).extract.model == "other-model"
    # An explicit path (mvrec --config) wins over MVREC_CONFIG.
    cwd_file = tmp_path / "mvrec.toml"
    assert load_config(cwd_file, env={"MVREC_CONFIG": str(other)}).extract.model == "cwd-model"


@pytest.mark.parametrize("how", ["path", "MVREC_CONFIG"])
def test_missing_config_file_is_named(tmp_path, how):
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="nope.toml"):
        if how == "path":
            load_config(missing, env={})
        else:
            load_config(env={"MVREC_CONFIG": str(missing)})


def test_unknown_section_in_file(tmp_path):
    path = write_toml(tmp_path, "[extrakt]\nbatch_size = 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    assert "extrakt" in str(err.value) and str(path) in str(err.value)


def test_unknown_key_in_file(tmp_path):
    path = write_toml(tmp_path, "[extract]\nbatch_sise = 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    assert "extract.batch_sise" in str(err.value) and str(path) in str(err.value)


def test_top_level_key_outside_a_section(tmp_path):
    path = write_toml(tmp_path, "batch_size = 3\n")
    with pytest.raises(ConfigError, match="batch_size"):
        load_config(path, env={})


def test_unknown_key_in_environment():
    with pytest.raises(ConfigError) as err:
        load_config(env={"MVREC_EXTRACT__BATCH_SISE": "3"})
    assert "MVREC_EXTRACT__BATCH_SISE" in str(err.value) and "environment" in str(err.value)


def test_unknown_section_in_environment():
    with pytest.raises(ConfigError, match="MVREC_EXTRAKT__BATCH_SIZE"):
        load_config(env={"MVREC_EXTRAKT__BATCH_SIZE": "3"})


def test_malformed_environment_name():
    with pytest.raises(ConfigError, match="MVREC_BATCHSIZE"):
        load_config(env={"MVREC_BATCHSIZE": "3"})


def test_unknown_key_from_flag():
    with pytest.raises(ConfigError) as err:
        load_config(env={}, overrides={"extract.batch_sise": 3})
    assert "option extract.batch_sise" in str(err.value)


@pytest.mark.parametrize(
    "toml, key",
    [
        ('[extract]\nbatch_size = "many"\n', "extract.batch_size"),
        ("[extract]\nbatch_size = 2.5\n", "extract.batch_size"),
        ('[vllm]\nmultiprocessing = "maybe"\n', "vllm.multiprocessing"),
        ('[vllm]\ngpu_memory_utilization = "most"\n', "vllm.gpu_memory_utilization"),
        ('[store]\nstorage_options = "none"\n', "store.storage_options"),
        ("[extract]\nmodel = [1, 2]\n", "extract.model"),
    ],
)
def test_bad_value_in_file_names_key_and_file(tmp_path, toml, key):
    path = write_toml(tmp_path, toml)
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    assert key in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize(
    "name, value",
    [
        ("MVREC_EXTRACT__BATCH_SIZE", "many"),
        ("MVREC_VLLM__MULTIPROCESSING", "maybe"),
        ("MVREC_STORE__STORAGE_OPTIONS", "{not json"),
        ("MVREC_PREFECT__RETRY_DELAY_S", "soon"),
    ],
)
def test_bad_value_in_environment_names_variable(name, value):
    with pytest.raises(ConfigError) as err:
        load_config(env={name: value})
    assert name in str(err.value) and repr(value) in str(err.value)


def test_bad_value_from_flag():
    with pytest.raises(ConfigError, match=r"option extract\.batch_size.*'many'"):
        load_config(env={}, overrides={"extract.batch_size": "many"})


def test_invalid_toml_names_the_file(tmp_path):
    path = write_toml(tmp_path, "[extract\nbatch_size = 3\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(path, env={})


# Values out of range: refused while the config loads, naming the key and where the value came from.
# (the cases first: a frame policy of uniform:0, fps:-1 or banana, and commit_size = -5)
OUT_OF_RANGE = [
    ("extract", "frames", "uniform:0", "whole number of frames >= 1"),
    ("extract", "frames", "fps:-1", "frames per second > 0"),
    ("extract", "frames", "banana", "is not 'uniform:N' or 'fps:F'"),
    ("extract", "commit_size", "-5", "must be >= 1, got -5"),
    ("extract", "batch_size", "0", "must be >= 1"),
    ("extract", "decode_workers", "0", "must be >= 1"),
    ("extract", "max_frames", "1", "must be >= 2"),
    ("extract", "max_new_tokens", "-1", "must be >= 0"),
    ("extract", "max_duration_s", "0", "must be > 0"),
    ("extract", "backend", "tensorflow", "is not one of transformers, vllm"),
    ("extract", "device", "gpu", "is not auto, cpu, cuda or cuda:N"),
    ("extract", "dtype", "fp8", "is not auto, float32, bfloat16 or float16"),
    ("extract", "pooling", "max", "is not one of video, prompt, last"),
    ("extract", "layers", "0,x", "is not 'all' or a comma list"),
    ("extract", "partial", "maybe", "is not one of accept, fail"),
    ("extract", "model", " ", "must not be empty"),
    ("extract", "engine", "dask", "is not one of threads, ray"),
    ("extract", "replicas", "-1", "must be >= 0"),
    ("prefect", "task_retries", "-1", "must be >= 0"),
    ("vllm", "gpu_memory_utilization", "1.5", "must be > 0 and <= 1"),
    ("vllm", "tensor_parallel_size", "0", "must be >= 1"),
    ("vllm", "cpu_omp_threads_bind", "all", "is not auto, nobind or a core list"),
    ("refresh", "cron", "nightly", "is not a cron expression"),
    ("train", "dropout", "1.0", "must be >= 0 and < 1"),
    ("train", "lr", "0", "must be > 0"),
    ("train", "min_seq_len", "2", "must be >= 3"),
    ("train", "representation", "concat", "is not one of id, replace, fuse, dff"),
    ("train", "source", "hidden:x", "is not caption, hidden:all or hidden:<layers>"),
    ("train", "n_heads", "3", "train.dim (64) is not a multiple of train.n_heads (3)"),
    ("study", "representations", "id,foo", "is not a comma list of id, replace, fuse, dff"),
    ("study", "seeds", "0", "must be >= 1"),
]


@pytest.mark.parametrize("section, key, value, problem", OUT_OF_RANGE, ids=lambda v: str(v))
def test_out_of_range_value_from_environment(section, key, value, problem):
    name = env_name(section, key)
    with pytest.raises(ConfigError) as e:
        load_config(env={name: value})
    assert str(e.value).startswith(f"environment {name}: {section}.{key}: ")
    assert problem in str(e.value)


def test_out_of_range_value_names_the_file_and_the_flag(tmp_path):
    path = write_toml(tmp_path, "[extract]\ncommit_size = -5\n")
    with pytest.raises(ConfigError, match=rf"^{path}: extract.commit_size: must be >= 1"):
        load_config(path, env={})
    with pytest.raises(ConfigError, match=r"^option extract.frames: extract.frames: "):
        load_config(env={}, overrides={"extract.frames": "banana"})
    with pytest.raises(ConfigError, match=r"^--frames: extract.frames: "):
        load_config(env={}, overrides={"extract.frames": "banana"}, override_sources={"extract.frames": "--frames"})


def test_storage_options_must_be_strings(tmp_path):
    path = write_toml(tmp_path, "[store]\nstorage_options = { AWS_ALLOW_HTTP = true }\n")
    with pytest.raises(ConfigError, match="store.storage_options: values must be strings.*AWS_ALLOW_HTTP"):
        load_config(path, env={})


def test_valid_values_pass():
    cfg = load_config(env={env_name("extract", "frames"): "fps:0.5", env_name("extract", "layers"): "0,2,final",
                           env_name("extract", "device"): "cuda:1", env_name("vllm", "cpu_omp_threads_bind"): "0-1,3",
                           env_name("train", "source"): "hidden:-1,4", env_name("refresh", "cron"): "@daily",
                           env_name("study", "representations"): "id,dff"})
    assert cfg.extract.frames == "fps:0.5" and cfg.train.source == "hidden:-1,4"


def test_every_key_has_a_check():
    from mvrec.config import Config

    cfg = Config()
    keys = [(section.name, key) for section in dataclasses.fields(cfg)
            for key in dataclasses.fields(getattr(cfg, section.name))]
    assert len(keys) > 60
    missing = [f"{s}.{k.name}" for s, k in keys if not callable(k.metadata.get("check"))]
    assert not missing, f"keys without a check (declare them with setting()): {missing}"


def test_the_code_takes_its_vocabularies_from_config():
    """One list of each set of choices: the modules that implement them use config's, not a copy."""
    import mvrec.config as config
    import recommender.evaluate
    import recommender.losses
    import recommender.model
    import tasks.decode
    import tasks.lvlm

    assert recommender.losses.LOSSES is config.LOSSES
    assert recommender.model.REPRESENTATIONS is config.REPRESENTATIONS
    assert recommender.evaluate.EVAL_PROTOCOLS is config.EVAL_PROTOCOLS
    assert tasks.lvlm.POOLINGS is config.POOLINGS
    assert tasks.decode.parse_policy is config.parse_policy


# Presets: one level of the precedence, above the defaults and below every key set explicitly.


def test_a_preset_sets_its_keys_over_the_defaults():
    from mvrec.config import PRESETS

    for name, keys in PRESETS.items():
        train = load_config(env={}, overrides={"train.preset": name}).train
        assert {k: getattr(train, k) for k in keys} == keys and train.preset == name


def test_explicit_keys_win_over_the_preset_at_every_level(tmp_path):
    path = write_toml(tmp_path, '[train]\npreset = "sasrec-bce"\ndropout = 0.3\n')
    train = load_config(path, env={"MVREC_TRAIN__BATCH_SIZE": "64"}, overrides={"train.lr": 0.01}).train
    assert (train.loss, train.max_seq_len) == ("bce", 50)  # from the preset
    assert (train.dropout, train.batch_size, train.lr) == (0.3, 64, 0.01)  # file, env, flag
    # the last level that names a preset wins, as for any key
    assert load_config(path, env={}, overrides={"train.preset": "sasrec-games"}).train.loss == "full"


def test_an_unknown_preset_names_its_source():
    with pytest.raises(ConfigError, match=r"^--preset: train.preset: 'nope' is not a preset \(sasrec-games"):
        load_config(env={}, overrides={"train.preset": "nope"}, override_sources={"train.preset": "--preset"})


def test_test_hooks_in_the_environment_are_not_config():
    assert load_config(env={"MVREC_TEST_PAUSE_AT": "commit", "MVREC_DEBUG": "1"}).extract.batch_size == 4


# Through the command line: the same rules, as one-line errors with exit code 2.


def run_mvrec(*args: str, cwd: Path, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("MVREC_")}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", "from mvrec.cli import main; main()", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_cli_config_show_applies_file_then_env(tmp_path):
    write_toml(tmp_path, "[extract]\nbatch_size = 3\nframes = \"uniform:4\"\n")
    done = run_mvrec("config", "show", "--json", cwd=tmp_path, env_extra={"MVREC_EXTRACT__BATCH_SIZE": "9"})
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert shown["extract"]["batch_size"] == 9  # env over file
    assert shown["extract"]["frames"] == "uniform:4"  # file over default


@pytest.mark.parametrize("how", ["--config", "MVREC_CONFIG"])
def test_cli_missing_config_file(tmp_path, how):
    missing = str(tmp_path / "missing.toml")
    if how == "--config":
        done = run_mvrec("--config", missing, "config", "show", cwd=tmp_path)
    else:
        done = run_mvrec("config", "show", cwd=tmp_path, env_extra={"MVREC_CONFIG": missing})
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "missing.toml" in lines[0]
    assert "Traceback" not in done.stderr


def test_cli_bad_value_in_file(tmp_path):
    write_toml(tmp_path, '[extract]\nbatch_size = "many"\n')
    done = run_mvrec("config", "show", cwd=tmp_path)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "extract.batch_size" in lines[0] and "'many'" in lines[0]


def test_gpu_defaults_replace_the_cpu_defaults_below_every_explicit_setting():
    from mvrec.config import GPU_DEFAULTS

    cpu, gpu = load_config(env={}), load_config(env={}, on_gpu=True)
    assert (cpu.extract.batch_size, cpu.vllm.max_num_seqs, cpu.extract.decode_workers, cpu.extract.commit_size) \
        == (4, 8, 2, 64)
    for (section, key), value in GPU_DEFAULTS.items():
        assert getattr(getattr(gpu, section), key) == value
    explicit = load_config(env={"MVREC_EXTRACT__BATCH_SIZE": "8"}, overrides={"extract.commit_size": 100}, on_gpu=True)
    assert (explicit.extract.batch_size, explicit.extract.commit_size, explicit.extract.decode_workers) == (8, 100, 12)


def test_the_flow_asks_for_gpu_defaults_when_the_replicas_run_on_cuda():
    import torch

    from tasks.dataplane import runs_on_gpu

    assert runs_on_gpu("cuda", "threads") and runs_on_gpu("cuda:1", "ray")
    assert not runs_on_gpu("cpu", "threads") and not runs_on_gpu("cpu", "ray")
    # auto follows what the engine sees: this machine's CUDA for threads (no GPU in CI)
    assert runs_on_gpu("auto", "threads") == torch.cuda.is_available()
