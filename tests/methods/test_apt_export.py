"""Export of APT-pruned models: jaxprune round trip, and transformers (torch) when uniform."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxprune import surgery
from jaxprune.lora import _spec
from jaxprune.methods import _apt_export
from jaxprune.models import _bert, _llama, _structures


def _keep(structures, rule):
    return {(s.kind, s.layer): rule(s) for s in structures}


def _perturb_lora(model, seed=0):
    """Non-zero LoRA B so that folding the adapters is actually tested."""
    state = nnx.state(model, nnx.LoRAParam)
    state = jax.tree.map(
        lambda x: 0.1 * jax.random.normal(jax.random.key(seed), x.shape, x.dtype), state)
    nnx.update(model, state)
    return model


def _bert_pruned(uniform: bool, pooling: str = 'cls'):
    cfg = _bert.BertConfig.tiny(pooling=pooling)
    lora = _spec.LoraSpec(rank=4, alpha=8.0, targets=r'layers\.\d+\.(attn\.query|mlp\.up)')
    model = _perturb_lora(_bert.BertForSequenceClassification(cfg, lora=lora, rngs=nnx.Rngs(0)))
    structs = _structures.structures(cfg, lora=lora)
    rng = np.random.default_rng(0)
    if uniform:  # only FFN neurons, the same count per layer: representable by transformers
        keep = _keep(structs, lambda s: np.arange(s.size) % 2 == 0 if s.kind == 'mlp'
                     else np.ones(s.size, bool))
    else:
        keep = _keep(structs, lambda s: rng.random(s.size) < 0.6)
        for k in keep.values():
            k[0] = True
    return surgery.prune_model(model, keep)


def _ids(vocab, shape=(2, 12)):
    return jnp.asarray(np.random.default_rng(1).integers(1, vocab, size=shape), jnp.int32)


@pytest.mark.parametrize('uniform,pooling', [(False, 'cls'), (True, 'cls'), (True, 'mean')])
def test_save_pruned_roundtrip_matches_logits(tmp_path, uniform, pooling):
    """jaxprune load -> same logits as the pruned model with LoRA (atol 1e-5); a mean-pooling
    head round-trips through the jaxprune folder only (transformers reads the first token)."""
    model, cfg = _bert_pruned(uniform, pooling)
    ids = _ids(cfg.vocab_size)
    am = jnp.ones_like(ids).at[1, 9:].set(0)
    ref = model(ids, am)
    rank = {p: jnp.ones(4) for p in [('layers', 0, 'attn', 'query')]}  # others: all ranks
    info = _apt_export.save_pruned(model, cfg, tmp_path, rank_masks=rank)
    loaded, lcfg = _apt_export.load_pruned(tmp_path)
    assert lcfg == cfg
    np.testing.assert_allclose(np.asarray(loaded(ids, am)), np.asarray(ref), atol=1e-5)
    hf = uniform and pooling == 'cls'
    assert lcfg.pooling == pooling
    assert info['hf'] is hf
    assert (tmp_path / 'config.json').exists() is hf
    meta = json.loads((tmp_path / 'jaxprune.json').read_text())
    assert meta['config']['layer_mlp'] == [cfg.mlp(i) for i in range(cfg.num_layers)]
    assert info['params'] == sum(x.size for x in jax.tree.leaves(nnx.state(loaded, nnx.Param)))


def test_rank_masks_applied_when_folding(tmp_path):
    """A zero rank mask drops that adapter: exported kernel == frozen kernel (reference)."""
    model, _ = _bert_pruned(uniform=False)
    path = ('layers', 1, 'mlp', 'up')
    flat = _apt_export.merged_params(model, {path: jnp.zeros(4)})
    np.testing.assert_array_equal(flat['layers.1.mlp.up.kernel'],
                                  np.asarray(model.layers[1].mlp.up.kernel[...]))
    lin = model.layers[0].attn.query
    delta = np.asarray(lin.lora_a[...] @ lin.lora_b[...])
    ref = np.asarray(lin.kernel[...]) + lin.lora_scale * delta
    np.testing.assert_allclose(flat['layers.0.attn.query.kernel'], ref, atol=1e-6)


def test_load_pruned_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match='jaxprune.json'):
        _apt_export.load_pruned(tmp_path)
    model, cfg = _bert_pruned(uniform=False)
    _apt_export.save_pruned(model, cfg, tmp_path, hf=False)
    meta = json.loads((tmp_path / 'jaxprune.json').read_text())
    meta['config']['layer_mlp'] = [1, 1]
    (tmp_path / 'jaxprune.json').write_text(json.dumps(meta))
    with pytest.raises(ValueError, match='expected shape'):
        _apt_export.load_pruned(tmp_path)


def test_llama_uniform_roundtrip(tmp_path):
    cfg = _llama.LlamaConfig.tiny()
    model = _llama.Llama(cfg, rngs=nnx.Rngs(0))
    structs = _structures.structures(cfg)
    keep = _keep(structs, lambda s: np.arange(s.size) < max(1, s.size // 2)
                 if s.kind in ('heads', 'mlp') else np.ones(s.size, bool))
    model, pcfg = surgery.prune_model(model, keep)
    ids = _ids(cfg.vocab_size)
    _apt_export.save_pruned(model, pcfg, tmp_path)
    loaded, _ = _apt_export.load_pruned(tmp_path)
    np.testing.assert_allclose(np.asarray(loaded(ids)), np.asarray(model(ids)), atol=1e-5)


@pytest.mark.parametrize('arch', ['bert', 'llama'])
def test_transformers_loads_uniform_export(tmp_path, arch):
    """transformers (torch) on the exported HF folder -> same logits (atol 1e-4)."""
    torch = pytest.importorskip('torch')
    transformers = pytest.importorskip('transformers')
    if arch == 'bert':
        model, cfg = _bert_pruned(uniform=True)
        ids = _ids(cfg.vocab_size)
        ref = np.asarray(model(ids, jnp.ones_like(ids)))
        auto = transformers.AutoModelForSequenceClassification
    else:
        cfg = _llama.LlamaConfig.tiny()
        model = _llama.Llama(cfg, rngs=nnx.Rngs(0))
        keep = _keep(_structures.structures(cfg), lambda s: np.arange(s.size) < max(1, s.size // 2)
                     if s.kind in ('heads', 'mlp') else np.ones(s.size, bool))
        model, cfg = surgery.prune_model(model, keep)
        ids = _ids(cfg.vocab_size)
        ref = np.asarray(model(ids))
        auto = transformers.AutoModelForCausalLM
    info = _apt_export.save_pruned(model, cfg, tmp_path)
    assert info['hf'], info['hf_reason']
    hf = auto.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(np.asarray(ids), dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(out, ref, atol=1e-4)
