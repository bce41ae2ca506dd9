"""Tests for the DISP-style density of ATP masks (jaxprune.masks._density)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune.masks import _density

# (hidden, heads, kv_heads, head_dim, mlp) per layer; MHA, GQA and non-uniform layers.
CONFIGS = {
    'mha': {'num_layers': 2, 'hidden_size': 12, 'num_heads': 3, 'num_kv_heads': 3,
            'head_dim': 4, 'intermediate_size': 10},
    'gqa': {'num_layers': 2, 'hidden_size': 16, 'num_heads': 4, 'num_kv_heads': 2,
            'head_dim': 4, 'intermediate_size': 12},
    'ragged': {'num_layers': 3, 'hidden_size': 8, 'num_heads': 4, 'num_kv_heads': 2,
               'head_dim': 2, 'intermediate_size': 16, 'layer_heads': (4, 2, 4),
               'layer_mlp': (16, 8, 5)},
}


def _random_masks(dims, rng, p_keep=0.6, kill_group=True):
    layers = []
    for d in dims:
        m = {n: (rng.random(s) < p_keep).astype(np.float32) for n, s in d.group_sizes().items()}
        if kill_group:  # make whole GQA groups / whole shared value dims die sometimes
            ctx = m['attn_ctx'].reshape(d.kv_heads, d.q_per_kv, d.head_dim)
            ctx[rng.integers(d.kv_heads)] = 0.0
            ctx[:, :, rng.integers(d.head_dim)] = 0.0
            m['attn_ctx'] = ctx.reshape(-1)
        layers.append(m)
    return {'layers': tuple(layers)}


def _bruteforce_kept(masks, dims):
    """Count nonzeros of explicit all-ones kernels after zeroing the rows/cols each mask trims."""
    total = 0
    for m, d in zip(masks['layers'], dims):
        hd, qpk = d.head_dim, d.q_per_kv
        w = {name: np.ones(shape) for name, shape in d.kernel_shapes().items()}
        for name in ('q_proj', 'k_proj', 'v_proj'):
            w[name][m['attn_in'] == 0, :] = 0
        for h in range(d.heads):
            for j in range(hd):
                if m['attn_ctx'][h * hd + j] == 0:
                    w['o_proj'][h * hd + j, :] = 0
        w['o_proj'][:, m['attn_out'] == 0] = 0
        for g in range(d.kv_heads):
            heads = range(g * qpk, (g + 1) * qpk)
            for j in range(hd):  # a value dim dies when no head of its group reads it
                if all(m['attn_ctx'][h * hd + j] == 0 for h in heads):
                    w['v_proj'][:, g * hd + j] = 0
            if all(m['attn_ctx'][h * hd + j] == 0 for h in heads for j in range(hd)):
                w['k_proj'][:, g * hd:(g + 1) * hd] = 0
                for h in heads:
                    w['q_proj'][:, h * hd:(h + 1) * hd] = 0
        for name in ('gate_proj', 'up_proj'):
            w[name][m['mlp_in'] == 0, :] = 0
            w[name][:, m['mlp'] == 0] = 0
        w['down_proj'][m['mlp'] == 0, :] = 0
        w['down_proj'][:, m['mlp_out'] == 0] = 0
        total += sum(int(np.count_nonzero(v)) for v in w.values())
    return total


@pytest.mark.parametrize('name', sorted(CONFIGS))
@pytest.mark.parametrize('seed', [0, 1, 2])
def test_density_matches_reference(name, seed):
    """Exact equality with a brute-force nonzero count (integers; float32 sums are exact here)."""
    dims = _density.layer_dims(CONFIGS[name])
    masks = _random_masks(dims, np.random.default_rng(seed))
    expected = _bruteforce_kept(masks, dims)
    jmasks = jax.tree.map(jnp.asarray, masks)
    assert float(_density.kept_params(jmasks, dims)) == expected
    total = sum(np.prod(s) for d in dims for s in d.kernel_shapes().values())
    assert _density.prunable_params(dims) == total
    np.testing.assert_allclose(float(_density.density(jmasks, dims)), expected / total, rtol=1e-6)


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_density_full_and_empty(name):
    dims = _density.layer_dims(CONFIGS[name])
    assert float(_density.density({'layers': ({},) * len(dims)}, dims)) == 1.0
    zeros = {'layers': tuple(
        {n: jnp.zeros(s) for n, s in d.group_sizes().items()} for d in dims)}
    assert float(_density.density(zeros, dims)) == 0.0


def test_density_prunable_matches_real_llama():
    """prunable_params equals the summed sizes of the 7 projection kernels of a real model."""
    from flax import nnx

    from jaxprune.models import _llama

    cfg = _llama.LlamaConfig.tiny(layer_heads=(4, 2), layer_mlp=(64, 40))
    model = _llama.Llama(cfg, rngs=nnx.Rngs(0))
    state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    count = 0
    for path, leaf in jax.tree.leaves_with_path(state):
        keys = [p.key for p in path]
        if keys[-1] == 'kernel' and keys[-2] in _density.PROJECTIONS:
            count += leaf.size
    assert _density.prunable_params(_density.layer_dims(cfg)) == count


@pytest.mark.parametrize('name', ['mha', 'gqa'])
def test_density_gradient_matches_polynomial(name):
    """Gradient w.r.t. soft masks equals the analytic derivative of sum(in) * sum(out)."""
    dims = _density.layer_dims(CONFIGS[name])
    rng = np.random.default_rng(0)
    masks = {'layers': tuple(
        {n: jnp.asarray(rng.uniform(0.2, 0.9, s), jnp.float32)
         for n, s in d.group_sizes().items()} for d in dims)}
    grads = jax.grad(_density.kept_params)(masks, dims)
    for m, g, d in zip(masks['layers'], grads['layers'], dims):
        keep = _density.linear_keep(m, d)
        s = {k: (float(jnp.sum(a)), float(jnp.sum(b))) for k, (a, b) in keep.items()}
        # attn_in rows of q/k/v: derivative = summed kept output widths (tolerance: f32 sums).
        want_in = s['q_proj'][1] + s['k_proj'][1] + s['v_proj'][1]
        np.testing.assert_allclose(np.asarray(g['attn_in']), want_in, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(g['mlp']),
                                   2 * s['gate_proj'][0] + s['down_proj'][1], rtol=1e-5)
        np.testing.assert_allclose(np.asarray(g['mlp_out']), s['down_proj'][0], rtol=1e-5)
        assert np.all(np.asarray(g['attn_ctx']) > 0)


def test_density_reads_heads_and_hidden_masks():
    dims = _density.layer_dims(CONFIGS['gqa'])
    d = dims[0]
    heads = jnp.array([1.0, 1.0, 0.0, 0.0])  # kills KV group 1
    ctx = jnp.repeat(heads, d.head_dim)
    a = _density.kept_params({'layers': ({'heads': heads}, {})}, dims)
    b = _density.kept_params({'layers': ({'attn_ctx': ctx}, {})}, dims)
    assert float(a) == float(b)
    hidden = jnp.ones(d.hidden).at[:3].set(0.0)
    c = _density.kept_params({'layers': ({'hidden': hidden}, {})}, dims)
    m = {n: hidden for n in ('attn_in', 'attn_out', 'mlp_in', 'mlp_out')}
    assert float(c) == float(_density.kept_params({'layers': (m, {})}, dims))


def test_density_errors():
    dims = _density.layer_dims(CONFIGS['gqa'])
    with pytest.raises(ValueError, match='attn_in'):
        _density.kept_params({'layers': ({'attn_in': jnp.ones(3)}, {})}, dims)
    with pytest.raises(ValueError, match='layers'):
        _density.kept_params({'layers': ({},)}, dims)
    with pytest.raises(ValueError, match='num_layers'):
        _density.layer_dims({'hidden_size': 4})
    with pytest.raises(ValueError, match='multiple'):
        _density.LayerDims(hidden=4, heads=3, kv_heads=2, head_dim=2, mlp=4)


def test_layer_dims_from_llama_config_and_hf_dict():
    from jaxprune.models import _llama

    cfg = _llama.LlamaConfig.tiny(layer_heads=(4, 2), layer_mlp=(64, 40))
    dims = _density.layer_dims(cfg)
    assert dims[1] == _density.LayerDims(hidden=32, heads=2, kv_heads=1, head_dim=8, mlp=40)
    hf = {'num_hidden_layers': 2, 'hidden_size': 32, 'num_attention_heads': 4,
          'num_key_value_heads': 2, 'intermediate_size': 64}
    assert _density.layer_dims(hf)[0] == _density.LayerDims(
        hidden=32, heads=4, kv_heads=2, head_dim=8, mlp=64)


@pytest.mark.parametrize('x,y,want', [(0.5, 0.5, 0.0), (0.25, 0.5, np.log(2)),
                                      (0.5, 0.25, np.log(2)), (1.0, 0.1, np.log(10))])
def test_log_ratio_matches_reference(x, y, want):
    np.testing.assert_allclose(float(_density.log_ratio(x, y)), want, rtol=1e-6, atol=1e-7)


def test_log_ratio_gradient_points_to_target():
    g_hi = jax.grad(_density.log_ratio)(0.8, 0.5)
    g_lo = jax.grad(_density.log_ratio)(0.3, 0.5)
    np.testing.assert_allclose(float(g_hi), 1 / 0.8, rtol=1e-6)
    np.testing.assert_allclose(float(g_lo), -1 / 0.3, rtol=1e-6)


# SmolLM2-135M layer shapes, 8 layers: 28.3M prunable params (> 2**24), built from dims only.
LARGE = {'num_layers': 8, 'hidden_size': 576, 'num_heads': 9, 'num_kv_heads': 3, 'head_dim': 64,
         'intermediate_size': 1536}


@pytest.mark.parametrize('jit', [False, True])
def test_kept_count_matches_reference_above_float32_range(jit):
    """int32 count == brute-force numpy nonzero count (exact) where float32 sums cannot be."""
    dims = _density.layer_dims(LARGE)
    masks = _random_masks(dims, np.random.default_rng(4), p_keep=0.9)
    expected = _bruteforce_kept(masks, dims)
    jmasks = jax.tree.map(jnp.asarray, masks)
    # The case is meaningful: float32 cannot hold the count and kept_params is off (by 3).
    assert expected > 2**24 and int(np.float32(expected)) != expected
    assert float(_density.kept_params(jmasks, dims)) != expected
    count = jax.jit(_density.kept_count, static_argnums=1) if jit else _density.kept_count
    got = count(jmasks, dims)
    assert got.dtype == jnp.int32 and int(got) == expected
    per_layer = _density.kept_count(jmasks, dims, per_layer=True)
    assert per_layer.shape == (len(dims),) and sum(int(c) for c in per_layer) == expected


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_kept_count_binarises_soft_masks(name):
    """m > 0.5 is kept: the count of soft masks equals the float count of their rounding."""
    dims = _density.layer_dims(CONFIGS[name])
    rng = np.random.default_rng(3)
    soft = {'layers': tuple({n: jnp.asarray(rng.uniform(0, 1, s), jnp.float32)
                             for n, s in d.group_sizes().items()} for d in dims)}
    hard = jax.tree.map(lambda m: (m > 0.5).astype(jnp.float32), soft)
    assert int(_density.kept_count(soft, dims)) == int(_density.kept_params(hard, dims))
    heads = {'layers': ({'heads': jnp.array([0.9, 0.8, 0.2, 0.1])},) + ({},) * (len(dims) - 1)}
    if name == 'gqa':  # heads folded in like linear_keep: KV group 1 dies
        want = {'layers': ({'heads': jnp.array([1.0, 1.0, 0.0, 0.0])}, {})}
        assert int(_density.kept_count(heads, dims)) == int(_density.kept_params(want, dims))


def test_kept_count_int32_guard():
    """A 7B-shaped model (6.5e9 prunable) overflows int32 as a sum, not per layer."""
    dims = _density.layer_dims({'num_layers': 32, 'hidden_size': 4096, 'num_heads': 32,
                                'num_kv_heads': 32, 'head_dim': 128,
                                'intermediate_size': 11008})
    with pytest.raises(ValueError, match='per_layer=True'):
        _density.kept_count(None, dims)
    per_layer = _density.kept_count(None, dims, per_layer=True)
    assert sum(int(c) for c in per_layer) == _density.prunable_params(dims) > 2**31
    huge = (_density.LayerDims(hidden=65536, heads=8, kv_heads=8, head_dim=8192, mlp=8),)
    with pytest.raises(ValueError, match='a layer has'):
        _density.kept_count(None, huge, per_layer=True)
