"""LoraSpec validation, placement, trainable filter and merge_lora."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxprune.lora import _spec
from jaxprune.models import _bert, _llama

IDS = jnp.asarray(np.random.default_rng(0).integers(0, 100, (2, 5)))


@pytest.mark.parametrize(
    'kw, match',
    [
        ({'rank': 0}, 'rank'),
        ({'rank': 2.5}, 'rank'),
        ({'alpha': 0.0}, 'alpha'),
        ({'targets': '(unclosed'}, 'targets'),
    ],
)
def test_lora_spec_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        _spec.LoraSpec(**kw)


def test_default_targets_are_query_and_value():
    spec = _spec.LoraSpec()
    assert spec.scale == 2.0
    assert _spec.LoraSpec(4, 8.0) == _spec.LoraSpec(rank=4, alpha=8.0)
    hits = [
        'layers.3.attn.q_proj',
        'layers.0.attn.v_proj',
        'layers.1.attn.query',
        'layers.1.attn.value',
    ]
    misses = ['layers.3.attn.k_proj', 'layers.0.attn.o_proj', 'layers.0.mlp.up_proj', 'lm_head']
    assert all(spec.matches(p) for p in hits)
    assert not any(spec.matches(p) for p in misses)
    assert _spec.target_paths(spec, hits + misses) == tuple(hits)
    assert _spec.target_paths(None, hits) == ()


@pytest.mark.parametrize('graph', [True, False], ids=['graph', 'tree'])
def test_placement_in_models(graph):
    with nnx.set_graph_mode(graph):
        spec = _spec.LoraSpec(rank=3, targets=r'layers\.1\..*_proj')
        model = _llama.Llama(_llama.LlamaConfig.tiny(), lora=spec, rngs=nnx.Rngs(0))
        lora = nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))
        assert set(lora['layers']) == {1}
        assert set(lora['layers'][1]['attn']) == {'q_proj', 'k_proj', 'v_proj', 'o_proj'}
        assert set(lora['layers'][1]['mlp']) == {'gate_proj', 'up_proj', 'down_proj'}
        assert lora['layers'][1]['mlp']['down_proj']['lora_a'].shape == (64, 3)


def _paths(state):
    return {
        '.'.join(str(getattr(k, 'key', k)) for k in p)
        for p, _ in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state))[0]
    }


@pytest.mark.parametrize('classifier', [False, True])
def test_trainable_filter(classifier):
    model = _bert.BertForSequenceClassification(
        _bert.BertConfig.tiny(), lora=_spec.LoraSpec(rank=2), rngs=nnx.Rngs(0)
    )
    trainable, rest = nnx.state(model, _spec.trainable_filter(classifier=classifier), ...)
    got = _paths(trainable)
    lora = {p for p in got if p.endswith(('lora_a', 'lora_b'))}
    assert len(lora) == 2 * 2 * 2  # 2 layers x (query, value) x (a, b)
    heads = got - lora
    assert heads == ({'classifier.kernel', 'classifier.bias'} if classifier else set())
    assert not any(p.endswith(('lora_a', 'lora_b')) for p in _paths(rest))


@pytest.mark.parametrize('arch', ['llama', 'bert'])
def test_merge_lora_matches_model(arch):
    """merge_lora(params) loaded into a LoRA-free model reproduces the LoRA model (tol 1e-5)."""
    spec = _spec.LoraSpec(rank=2, alpha=3.0, targets=r'.*(q_proj|down_proj|query|up)')

    def build(lora):
        if arch == 'llama':
            return _llama.Llama(_llama.LlamaConfig.tiny(), lora=lora, rngs=nnx.Rngs(0))
        cfg = _bert.BertConfig.tiny()
        return _bert.BertForSequenceClassification(cfg, lora=lora, rngs=nnx.Rngs(0))

    model = build(spec)
    lora = nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))
    keys = iter(jax.random.split(jax.random.key(1), 64))
    nnx.update(model, jax.tree.map(lambda x: jax.random.normal(next(keys), x.shape), lora))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    merged = _spec.merge_lora(params, scale=spec.scale)
    assert _spec.lora_param_count(merged) == 0
    assert _spec.lora_param_count(params) > 0
    plain = build(None)
    nnx.update(plain, merged)
    np.testing.assert_allclose(plain(IDS), model(IDS), atol=1e-5, rtol=0)
    # Inputs are not mutated.
    assert 'lora_a' in params['layers'][0]['attn']['q_proj' if arch == 'llama' else 'query']


def test_merge_lora_reference_with_rank_mask():
    rng = np.random.default_rng(0)
    w, a, b = rng.normal(size=(4, 3)), rng.normal(size=(4, 2)), rng.normal(size=(2, 3))
    params = {'lin': {'kernel': w, 'bias': np.ones(3), 'lora_a': a, 'lora_b': b}, 'x': np.ones(2)}
    mask = np.array([0.0, 1.0])
    out = _spec.merge_lora(params, scale=0.5, rank_masks={'lin': mask})
    np.testing.assert_allclose(out['lin']['kernel'], w + 0.5 * (a * mask) @ b, rtol=1e-6)
    assert set(out['lin']) == {'kernel', 'bias'} and 'x' in out
