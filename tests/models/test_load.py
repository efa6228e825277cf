import pytest

from dejavu.models.load import resolve


def test_missing_gguf_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        resolve(str(tmp_path / "nope.gguf"))


def test_folder_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="without config.json"):
        resolve(str(tmp_path))


def test_missing_local_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        resolve(str(tmp_path / "missing" / "model"))


def test_hub_id_passes_through():
    assert resolve("facebook/opt-125m") == ("facebook/opt-125m", {})
