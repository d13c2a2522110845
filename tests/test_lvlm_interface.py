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
