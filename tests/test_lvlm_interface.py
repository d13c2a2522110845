"""The backend-independent pieces of tasks/lvlm.py: layer selection and lineage revisions."""

import pytest

from tasks.lvlm import FINAL_LAYER, layer_rows, model_revision, parse_layers


def test_parse_layers_and_rows():
    assert parse_layers("all", 4) == [0, 1, 2, 3, 4, FINAL_LAYER]
    assert parse_layers("0, 4,final", 4) == [0, 4, FINAL_LAYER]
    assert layer_rows([0, 4, FINAL_LAYER], 4) == [0, 4, 5]
    with pytest.raises(ValueError, match="layers: 5 is out of range 0..4"):
        parse_layers("5", 4)
    with pytest.raises(ValueError, match="'middle'"):
        parse_layers("middle", 4)


def test_model_revision_of_a_local_directory_follows_its_files(tmp_path):
    (tmp_path / "config.json").write_text('{"a": 1}')
    (tmp_path / "model.safetensors").write_bytes(b"x" * 10)
    first = model_revision(str(tmp_path))
    assert first.startswith("local-") and first == model_revision(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"x" * 11)  # new weights -> new lineage
    assert model_revision(str(tmp_path)) != first
    assert model_revision(str(tmp_path), "v2") == "v2"  # an explicit revision wins


def test_model_revision_of_a_hub_id():
    class Config:
        _commit_hash = "abc123"

    assert model_revision("Qwen/Qwen2.5-VL-3B-Instruct") == "main"
    assert model_revision("Qwen/Qwen2.5-VL-3B-Instruct", "refs/pr/1") == "refs/pr/1"
    assert model_revision("Qwen/Qwen2.5-VL-3B-Instruct", "", Config()) == "abc123"


def test_failures_are_permanent_where_the_error_says_so():
    from tasks.decode import TooLong
    from tasks.lvlm import BackendOOM, Failure
    from tasks.lvlm_vllm import VideoRejected

    corrupt = Failure.of("v", "/v.mp4", "decode", TooLong("/v.mp4", "too long"))
    assert (corrupt.error_type, corrupt.message, corrupt.permanent) == ("TooLong", "too long", True)
    assert Failure.of("v", "/v.mp4", "model", VideoRejected("v", "bad frames")).permanent
    assert not Failure.of("v", "/v.mp4", "decode", OSError(5, "Input/output error")).permanent
    assert not Failure.of("v", "/v.mp4", "model", BackendOOM(1)).permanent


def test_plan_skips_only_permanent_failures_of_the_same_content():
    from flows.plan import plan_work
    from tasks.discover import VideoRef

    refs = [VideoRef(v, f"/{v}.mp4", 1, f"sha-{v}") for v in ("done", "broken", "flaky", "changed", "new")]
    failures = [{"video_id": "broken", "content_sha256": "sha-broken", "permanent": True},
                {"video_id": "flaky", "content_sha256": "sha-flaky", "permanent": False},
                {"video_id": "changed", "content_sha256": "an older file", "permanent": True}]
    todo, counts = plan_work(refs, {("done", "sha-done")}, failures)
    assert [r.video_id for r in todo] == ["flaky", "changed", "new"]
    assert (counts["done"], counts["known_broken"]) == (1, 1)
    todo, _ = plan_work(refs, {("done", "sha-done")}, failures, only_failed=True)
    assert [r.video_id for r in todo] == ["broken", "flaky", "changed"]


def test_the_vllm_worker_extension_is_importable_by_its_name():
    """vLLM imports the hooks by this string in every worker; no vllm needed to check it resolves."""
    import importlib

    from tasks.lvlm_vllm import _EXT_CLS

    module, _, name = _EXT_CLS.rpartition(".")
    extension = getattr(importlib.import_module(module), name)
    assert {"mvrec_install_hooks", "mvrec_collect", "mvrec_reset"} <= set(vars(extension))


def test_extractor_id_does_not_depend_on_how_the_model_path_is_spelled(tmp_path, monkeypatch):
    from flows.plan import extractor_record
    from mvrec.config import load_config

    model = tmp_path / "models" / "m"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path / "models")

    def eid(spelling: str) -> str:
        return extractor_record(load_config(env={}, overrides={"extract.model": spelling})).extractor_id

    assert eid("m") == eid("./m") == eid(str(model)) == eid(f"{tmp_path}/models/../models/m")
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text("{}")
    assert eid(str(other)) != eid("m")  # the same content elsewhere is another model directory
    assert eid("Org/hub-model") != eid("Org/other-model")  # hub ids as they are


def test_cli_and_flow_build_the_same_spec_and_decode_options():
    """One place builds them from the config: `mvrec extract --backend vllm` gets the [vllm] options."""
    from mvrec.config import load_config
    from tasks.extract import decode_options, extract_spec

    cfg = load_config(overrides={"extract.backend": "vllm", "vllm.max_model_len": 4096, "extract.frames": "fps:2",
                                 "extract.partial": "fail", "store.path": "/data/store"})
    spec, opts = extract_spec(cfg), decode_options(cfg)
    assert spec.options["max_model_len"] == 4096 and spec.options["data_parallel_size"] == 1
    assert (opts.policy, opts.allow_partial, opts.cache_dir) == ("fps:2", False, "/data/cache")
    assert extract_spec(load_config(overrides={"extract.backend": "transformers"})).options == {}
