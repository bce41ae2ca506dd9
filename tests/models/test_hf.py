"""HF folder I/O without torch: errors, sharded index, bf16, LoRA merge on export, GGUF dispatch."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors import numpy as st_numpy

from jaxprune.lora import _spec
from jaxprune.models import _bert, _hf, _llama

IDS = jnp.asarray(np.random.default_rng(0).integers(0, 100, (2, 5)))


@pytest.fixture
def llama_dir(tmp_path):
    cfg = _llama.LlamaConfig.tiny()
    model = _llama.Llama(cfg, rngs=nnx.Rngs(0))
    return _hf.save_pretrained(model, cfg, tmp_path / 'llama'), model


def _rewrite(folder, fn):
    tensors = st_numpy.load_file(str(folder / 'model.safetensors'))
    st_numpy.save_file(fn(tensors), str(folder / 'model.safetensors'))


def test_roundtrip_through_own_format(llama_dir):
    folder, model = llama_dir
    loaded, cfg = _hf.load_pretrained(folder)
    assert cfg == model.config
    np.testing.assert_array_equal(loaded(IDS), model(IDS))


def test_missing_folder_and_files(tmp_path, llama_dir):
    with pytest.raises(FileNotFoundError, match='not a directory'):
        _hf.load_pretrained(tmp_path / 'nope')
    (tmp_path / 'empty').mkdir()
    with pytest.raises(FileNotFoundError, match='config.json'):
        _hf.load_pretrained(tmp_path / 'empty')
    folder, _ = llama_dir
    (folder / 'model.safetensors').unlink()
    with pytest.raises(FileNotFoundError, match='model.safetensors'):
        _hf.load_pretrained(folder)
    with pytest.raises(FileNotFoundError, match='does not exist'):
        _hf.load_pretrained(tmp_path / 'missing.gguf')


def test_pooling_is_refused_for_decoders(llama_dir):
    folder, _ = llama_dir
    with pytest.raises(ValueError, match="pooling='mean' applies to BERT"):
        _hf.load_pretrained(folder, pooling='mean')


def test_unknown_model_type(llama_dir):
    folder, _ = llama_dir
    cfg = json.loads((folder / 'config.json').read_text())
    (folder / 'config.json').write_text(json.dumps({**cfg, 'model_type': 'gpt2'}))
    with pytest.raises(ValueError, match="model_type='gpt2'"):
        _hf.load_pretrained(folder)


def test_missing_tensor_is_named(llama_dir):
    folder, _ = llama_dir
    key = 'model.layers.1.mlp.up_proj.weight'
    _rewrite(folder, lambda t: {k: v for k, v in t.items() if k != key})
    with pytest.raises(ValueError, match=key.replace('.', r'\.')):
        _hf.load_pretrained(folder)


def test_misshaped_tensor_names_key_and_shapes(llama_dir):
    folder, _ = llama_dir
    key = 'model.layers.0.self_attn.k_proj.weight'
    _rewrite(folder, lambda t: {**t, key: np.zeros((8, 32), np.float32)})
    with pytest.raises(ValueError, match=r'k_proj.*expected=\(16, 32\).*\(8, 32\)'):
        _hf.load_pretrained(folder)


def test_sharded_index_and_bf16(llama_dir):
    folder, model = llama_dir
    tensors = st_numpy.load_file(str(folder / 'model.safetensors'))
    (folder / 'model.safetensors').unlink()
    keys = sorted(tensors)
    shards = {
        'model-00001-of-00002.safetensors': keys[::2],
        'model-00002-of-00002.safetensors': keys[1::2],
    }
    weight_map = {}
    for fname, ks in shards.items():
        st_numpy.save_file({k: tensors[k] for k in ks}, str(folder / fname))
        weight_map.update({k: fname for k in ks})
    (folder / 'model.safetensors.index.json').write_text(json.dumps({'weight_map': weight_map}))
    loaded, _ = _hf.load_pretrained(folder)
    np.testing.assert_array_equal(loaded(IDS), model(IDS))
    loaded16, _ = _hf.load_pretrained(folder, dtype=jnp.bfloat16)
    assert loaded16.layers[0].attn.q_proj.kernel[...].dtype == jnp.bfloat16
    logits16 = loaded16(IDS)
    assert logits16.dtype == jnp.bfloat16
    # bf16 keeps 8 mantissa bits (~0.4 %); allow 3 % of the logit scale after two layers.
    ref = model(IDS)
    err = jnp.max(jnp.abs(logits16.astype(jnp.float32) - ref))
    assert err <= 0.03 * jnp.max(jnp.abs(ref)), (err, jnp.max(jnp.abs(ref)))


def test_bf16_safetensors_are_decoded(tmp_path):
    raw = np.arange(6, dtype=np.float32).reshape(2, 3)
    path = tmp_path / 'x.safetensors'
    header = json.dumps({'w': {'dtype': 'BF16', 'shape': [2, 3], 'data_offsets': [0, 12]}})
    data = raw.astype(ml_dtypes.bfloat16).tobytes()
    path.write_bytes(len(header).to_bytes(8, 'little') + header.encode() + data)
    out = _hf._load_file(path)
    np.testing.assert_array_equal(out['w'].astype(np.float32), raw)


def test_save_merges_lora(tmp_path):
    cfg = _llama.LlamaConfig.tiny(tie_word_embeddings=True)
    model = _llama.Llama(cfg, lora=_spec.LoraSpec(rank=2, alpha=4.0), rngs=nnx.Rngs(0))
    lora = nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))
    nnx.update(model, jax.tree.map(lambda x: x + 0.1, lora))
    _hf.save_pretrained(model, cfg, tmp_path / 'out')
    loaded, _ = _hf.load_pretrained(tmp_path / 'out')
    np.testing.assert_allclose(loaded(IDS), model(IDS), atol=1e-5, rtol=0)
    assert 'lm_head.weight' not in st_numpy.load_file(str(tmp_path / 'out/model.safetensors'))


def test_save_nonuniform_raises(tmp_path):
    cfg = _llama.LlamaConfig.tiny(layer_heads=(4, 2))
    model = _llama.Llama(cfg, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match='per-layer sizes'):
        _hf.save_pretrained(model, cfg, tmp_path / 'out')
    pruned = dataclasses.replace(_bert.BertConfig.tiny(), hidden_size=30)
    assert pruned.pooler_size == 32
    with pytest.raises(ValueError, match='pooler_size'):
        pruned.to_hf()
    bcfg = _bert.BertConfig.tiny(hidden_size=24)
    with pytest.raises(ValueError, match='head_dim'):
        _hf.save_pretrained(
            _bert.BertForSequenceClassification(bcfg, rngs=nnx.Rngs(0)), bcfg, tmp_path / 'bert'
        )


def test_classifier_of_other_width_is_fresh(tmp_path):
    cfg = _bert.BertConfig.tiny(num_labels=3)
    model = _bert.BertForSequenceClassification(cfg, rngs=nnx.Rngs(0))
    _hf.save_pretrained(model, cfg, tmp_path / 'b')
    loaded, lcfg = _hf.load_pretrained(tmp_path / 'b', num_labels=2)
    assert lcfg.num_labels == 2 and loaded(IDS).shape == (2, 2)
    np.testing.assert_array_equal(loaded.encode(IDS), model.encode(IDS))


def test_gguf_path_dispatches_to_assets(tmp_path, llama_dir, monkeypatch):
    folder, model = llama_dir
    calls = []

    def fake_gguf_to_hf(path, out_dir):
        calls.append(path)
        for f in folder.iterdir():
            (out_dir / f.name).write_bytes(f.read_bytes())
        return out_dir

    from jaxprune import assets

    monkeypatch.setattr(assets, 'gguf_to_hf', fake_gguf_to_hf)
    gguf = tmp_path / 'm.gguf'
    gguf.write_bytes(b'GGUF')
    loaded, _ = _hf.load_pretrained(gguf)
    assert calls == [gguf]
    np.testing.assert_array_equal(loaded(IDS), model(IDS))


def test_config_hf_roundtrip():
    cfg = _llama.LlamaConfig.tiny(
        rope_scaling={'rope_type': 'linear', 'factor': 2.0}, tie_word_embeddings=True
    )
    assert _llama.LlamaConfig.from_hf(cfg.to_hf()) == cfg
    legacy = {
        **cfg.to_hf(),
        'rope_parameters': None,
        'rope_scaling': {'type': 'linear', 'factor': 2.0},
    }
    assert _llama.LlamaConfig.from_hf(legacy) == cfg
    b = _bert.BertConfig.tiny(model_type='roberta', pad_token_id=1)
    assert _bert.BertConfig.from_hf(b.to_hf()) == b
    with pytest.raises(ValueError, match='hidden_act'):
        _bert.BertConfig.from_hf({**b.to_hf(), 'hidden_act': 'relu'})


@pytest.mark.parametrize(
    'kw, match',
    [
        ({'num_heads': 3}, 'num_kv_heads'),
        ({'head_dim': 7}, 'head_dim'),
        ({'layer_heads': (4,)}, 'layer_heads'),
        ({'layer_heads': (4, 3)}, 'q_per_kv'),
        ({'layer_mlp': (0, 4)}, 'layer_mlp'),
        ({'rope_scaling': {'rope_type': 'dynamic', 'factor': 2.0}}, 'rope_scaling'),
    ],
)
def test_llama_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        _llama.LlamaConfig.tiny(**kw)


def test_bert_config_validation():
    with pytest.raises(ValueError, match='model_type'):
        _bert.BertConfig.tiny(model_type='electra')
    with pytest.raises(ValueError, match='layer_mlp'):
        _bert.BertConfig.tiny(layer_mlp=(3,))
    with pytest.raises(ValueError, match='pooling'):
        _bert.BertConfig.tiny(pooling='max')


def test_presets_param_counts():
    from jaxprune.models import _structures

    assert _structures.param_count(_llama.LlamaConfig.smollm2_135m()) == 134_515_008
    # all-MiniLM-L6-v2 (22,713,216 with pooler) + a 2-way classifier.
    assert _structures.param_count(_bert.BertConfig.minilm_l6()) == 22_713_216 + 384 * 2 + 2
