"""resolve_model: local folders, .gguf conversion into the cache, offline hub ids, errors."""

import json

import pytest
import tiny_gguf

from jaxprune import assets


def test_local_hf_folder_is_returned_as_is(tmp_path):
    (tmp_path / 'config.json').write_text(json.dumps({'model_type': 'llama'}))
    assert assets.resolve_model(tmp_path) == tmp_path
    assert assets.resolve_model(str(tmp_path)) == tmp_path


def test_folder_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match='no config.json'):
        assets.resolve_model(tmp_path)


def test_gguf_file_is_converted_once_into_the_cache(tmp_path, monkeypatch):
    tiny_gguf.write_tiny_gguf(tmp_path / 'tiny.gguf')
    folder = assets.resolve_model(tmp_path / 'tiny.gguf', cache_dir=tmp_path / 'cache')
    assert folder.parent == tmp_path / 'cache' / 'gguf' and folder.name.startswith('tiny-')
    assert (folder / 'model.safetensors').is_file() and (folder / 'tokenizer.json').is_file()

    def boom(*a, **k):
        raise AssertionError('converted twice')

    monkeypatch.setattr(assets._gguf, 'gguf_to_hf', boom)
    assert assets.resolve_model(tmp_path / 'tiny.gguf', cache_dir=tmp_path / 'cache') == folder


def test_hub_id_while_offline_explains_the_fix(monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    with pytest.raises(RuntimeError, match='HF_HUB_OFFLINE') as e:
        assets.resolve_model('HuggingFaceTB/SmolLM2-135M')
    assert 'smollm2-135m' in str(e.value) and 'local' in str(e.value)


@pytest.mark.parametrize(('ref', 'hint'), [('smollm2', 'smollm2-135m'), ('minilm', 'minilm-l6')])
def test_unknown_model_did_you_mean(ref, hint):
    with pytest.raises(FileNotFoundError, match=f"Did you mean '{hint}'"):
        assets.resolve_model(ref)


def test_dataset_asset_is_not_a_model():
    with pytest.raises(ValueError, match='load_dataset'):
        assets.resolve_model('shakespeare')


def test_non_gguf_file_is_rejected(tmp_path):
    (tmp_path / 'model.bin').write_bytes(b'')
    with pytest.raises(ValueError, match='not .gguf'):
        assets.resolve_model(tmp_path / 'model.bin')
