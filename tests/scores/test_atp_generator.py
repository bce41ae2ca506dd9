"""Tests for the ATP pruning-decision generator (jaxprune.scores._atp_generator)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune.masks import _density
from jaxprune.scores import _atp_generator

MHA = {'num_layers': 3, 'hidden_size': 12, 'num_heads': 3, 'num_kv_heads': 3, 'head_dim': 4,
       'intermediate_size': 10}
GQA = {'num_layers': 2, 'hidden_size': 16, 'num_heads': 4, 'num_kv_heads': 2, 'head_dim': 4,
       'intermediate_size': 12, 'layer_mlp': (12, 7)}


def _np_layer_norm(p, x):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-5) * p['scale'] + p['bias']


def _np_generator(params):
    """Plain numpy forward with an explicit loop over attention heads."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x = p['embed']
    for layer in p['encoder']:
        h = _np_layer_norm(layer['norm1'], x)
        out = np.zeros_like(x)
        for n in range(layer['attn']['q'].shape[1]):
            q = h @ layer['attn']['q'][:, n]
            k = h @ layer['attn']['k'][:, n]
            v = h @ layer['attn']['v'][:, n]
            s = q @ k.T / np.sqrt(q.shape[-1])
            a = np.exp(s - s.max(-1, keepdims=True))
            a /= a.sum(-1, keepdims=True)
            out += (a @ v) @ layer['attn']['o'][n]
        x = x + out
        h = _np_layer_norm(layer['norm2'], x) @ layer['mlp']['w1'] + layer['mlp']['b1']
        h = np.asarray(jax.nn.gelu(jnp.asarray(h)), np.float64)
        x = x + h @ layer['mlp']['w2'] + layer['mlp']['b2']
    x = _np_layer_norm(p['final_norm'], x)
    return [{n: x[l] @ hp['kernel'] + hp['bias'] for n, hp in heads.items()}
            for l, heads in enumerate(p['heads'])]


@pytest.mark.parametrize('cfg', [MHA, GQA])
def test_mask_groups_sizes_and_order(cfg):
    groups = _atp_generator.mask_groups(cfg)
    dims = _density.layer_dims(cfg)
    assert [g.name for g in groups[:6]] == list(_density.GROUP_NAMES)
    assert len(groups) == 6 * len(dims)
    for g in groups:
        assert g.size == dims[g.layer].group_sizes()[g.name]


@pytest.mark.parametrize('cfg', [MHA, GQA])
def test_mask_groups_params_per_unit_accounting(cfg):
    """sum(size * params_per_unit) counts every kernel entry twice (once per in and out unit),
    except q/k output dims which are not individually prunable (counted once)."""
    groups = _atp_generator.mask_groups(cfg)
    dims = _density.layer_dims(cfg)
    total = sum(g.size * g.params_per_unit for g in groups)
    qk = sum(np.prod(d.kernel_shapes()[n]) for d in dims for n in ('q_proj', 'k_proj'))
    np.testing.assert_allclose(total, 2 * _density.prunable_params(dims) - qk, rtol=1e-12)


def test_mask_groups_params_per_unit_is_density_gradient_mha():
    """For MHA the marginal cost of a unit at full density is d kept_params / d m."""
    dims = _density.layer_dims(MHA)
    ones = {'layers': tuple(
        {n: jnp.ones(s) for n, s in d.group_sizes().items()} for d in dims)}
    grads = jax.grad(_density.kept_params)(ones, dims)
    for g in _atp_generator.mask_groups(MHA):
        np.testing.assert_allclose(np.asarray(grads['layers'][g.layer][g.name]),
                                   g.params_per_unit, rtol=1e-6)


@pytest.mark.parametrize('cfg', [MHA, GQA])
def test_generator_apply_matches_reference(cfg):
    """jnp forward == numpy forward (float32 vs float64: rtol 1e-4, atol 1e-5)."""
    groups = _atp_generator.mask_groups(cfg)
    params = _atp_generator.generator_init(jax.random.key(0), groups, width=16, num_heads=4,
                                           head_scale=1.0)
    out = jax.jit(_atp_generator.generator_apply)(params)
    want = _np_generator(params)
    assert len(out['layers']) == len(want)
    for got_l, want_l in zip(out['layers'], want):
        assert set(got_l) == set(_density.GROUP_NAMES)
        for name in want_l:
            np.testing.assert_allclose(np.asarray(got_l[name]), want_l[name], rtol=1e-4,
                                       atol=1e-5)


def test_generator_output_is_masks_layout_and_initially_keeps_most():
    groups = _atp_generator.mask_groups(GQA)
    params = _atp_generator.generator_init(jax.random.key(0), groups)
    logits = _atp_generator.generator_apply(params)
    dims = _density.layer_dims(GQA)
    for layer, d in zip(logits['layers'], dims):
        assert {n: v.shape for n, v in layer.items()} == {
            n: (s,) for n, s in d.group_sizes().items()}
    # small heads: logits near 0, so with bias 3 the eval masks keep everything
    assert max(float(jnp.max(jnp.abs(v))) for v in jax.tree.leaves(logits)) < 3.0


def test_generator_init_is_abstract_friendly_and_grads_reach_all_params():
    groups = _atp_generator.mask_groups(GQA)
    shapes = jax.eval_shape(
        lambda k: _atp_generator.generator_init(k, groups, width=32, num_layers=1),
        jax.random.key(0))
    assert shapes['embed'].shape == (2, 32)
    assert shapes['encoder'][0]['attn']['q'].shape == (32, 4, 8)
    params = _atp_generator.generator_init(jax.random.key(0), groups, width=32, num_layers=1)
    w = jax.tree.map(lambda x: jax.random.normal(jax.random.key(1), x.shape),
                     _atp_generator.generator_apply(params))

    def f(p):
        out = _atp_generator.generator_apply(p)
        return sum(jnp.sum(a * b) for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(w)))

    grads = jax.grad(f)(params)
    for path, g in jax.tree.leaves_with_path(grads):
        assert float(jnp.max(jnp.abs(g))) > 0, jax.tree_util.keystr(path)


def test_generator_init_errors():
    groups = _atp_generator.mask_groups(GQA)
    with pytest.raises(ValueError, match='num_heads'):
        _atp_generator.generator_init(jax.random.key(0), groups, width=30, num_heads=4)
    bad = tuple(g for g in groups if g.layer != 0)
    with pytest.raises(ValueError, match='layers'):
        _atp_generator.generator_init(jax.random.key(0), bad)
    with pytest.raises(ValueError, match='duplicate'):
        _atp_generator.generator_init(jax.random.key(0), groups + groups[:1])
