"""Layer-level references: Linear (+LoRA, masks, lora_aware), masked norms, RoPE scaling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxprune.models import _layers

TOL = 1e-5  # float32


def _linear(rank=3, bias=True, seed=0):
    lin = _layers.Linear(
        6,
        5,
        use_bias=bias,
        axes=('embed', 'mlp'),
        lora_rank=rank,
        lora_alpha=6.0,
        rngs=nnx.Rngs(seed),
    )
    if rank:  # non-zero B so the adapter matters
        lin.lora_b[...] = jax.random.normal(jax.random.key(1), lin.lora_b.shape)
    if bias:
        lin.bias[...] = jax.random.normal(jax.random.key(2), lin.bias.shape)
    return lin


def test_linear_params_and_metadata(graph_mode):
    lin = _layers.Linear(6, 5, use_bias=True, axes=('embed', 'mlp'), lora_rank=3, rngs=nnx.Rngs(0))
    assert lin.kernel.shape == (6, 5) and lin.lora_a.shape == (6, 3)
    assert lin.lora_b.shape == (3, 5) and not np.any(np.asarray(lin.lora_b[...]))
    assert isinstance(lin.lora_a, nnx.LoRAParam) and isinstance(lin.kernel, nnx.Param)
    assert lin.kernel.get_metadata()['out_sharding'] == ('embed', 'mlp')
    assert lin.lora_a.get_metadata()['out_sharding'] == ('embed', 'lora_rank')
    assert lin.lora_b.get_metadata()['out_sharding'] == ('lora_rank', 'mlp')
    assert lin.lora_scale == 1.0  # alpha defaults to rank


@pytest.mark.parametrize('lora_aware', [False, True])
def test_linear_matches_reference(lora_aware, graph_mode):
    lin = _linear()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 4, 6)).astype(np.float32)
    m_in = (rng.random(6) > 0.4).astype(np.float32)
    m_out = (rng.random(5) > 0.4).astype(np.float32)
    m_r = np.array([1.0, 0.0, 1.0], np.float32)
    w, b = np.asarray(lin.kernel[...]), np.asarray(lin.bias[...])
    a, bb = np.asarray(lin.lora_a[...]), np.asarray(lin.lora_b[...])
    s = 6.0 / 3
    delta = s * (a * m_r) @ bb
    if lora_aware:
        ref = ((x * m_in) @ w + b) * m_out + x @ delta
    else:
        ref = ((x * m_in) @ (w + delta) + b) * m_out
    y = lin(
        jnp.asarray(x),
        in_mask=jnp.asarray(m_in),
        out_mask=jnp.asarray(m_out),
        rank_mask=jnp.asarray(m_r),
        lora_aware=lora_aware,
    )
    np.testing.assert_allclose(y, ref, atol=TOL, rtol=0)


def test_linear_fresh_lora_is_identity(graph_mode):
    lin = _layers.Linear(6, 5, use_bias=False, axes=('embed', 'mlp'), lora_rank=2, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 6)), jnp.float32)
    np.testing.assert_array_equal(lin(x), x @ lin.kernel[...])
    np.testing.assert_array_equal(lin(x, lora_aware=True), x @ lin.kernel[...])


def test_linear_rejects_negative_rank():
    with pytest.raises(ValueError, match='lora_rank'):
        _layers.Linear(2, 2, use_bias=False, axes=('embed', 'mlp'), lora_rank=-1, rngs=nnx.Rngs(0))


@pytest.mark.parametrize('norm', ['rms', 'layer'])
def test_masked_norm_matches_reference(norm, graph_mode):
    """Masked statistics: kept dims equal the norm of the sub-vector; dropped dims are 0."""
    rng = np.random.default_rng(0)
    d = 10
    x = rng.normal(size=(3, d)).astype(np.float32)
    mask = np.ones(d, np.float32)
    mask[[1, 4, 7]] = 0
    keep = mask.astype(bool)
    if norm == 'rms':
        mod = _layers.RMSNorm(d, eps=1e-6, rngs=nnx.Rngs(0))
        sub = x[:, keep]
        ref_sub = sub / np.sqrt(np.mean(sub**2, -1, keepdims=True) + 1e-6)
        full = x / np.sqrt(np.mean(x**2, -1, keepdims=True) + 1e-6)
    else:
        mod = _layers.LayerNorm(d, eps=1e-6, rngs=nnx.Rngs(0))
        mod.bias[...] = jnp.asarray(rng.normal(size=d), jnp.float32)
        sub = x[:, keep]
        ref_sub = (sub - sub.mean(-1, keepdims=True)) / np.sqrt(sub.var(-1, keepdims=True) + 1e-6)
        full = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
    mod.scale[...] = jnp.asarray(rng.normal(size=d), jnp.float32)
    g = np.asarray(mod.scale[...])
    bias = np.asarray(mod.bias[...]) if norm == 'layer' else np.zeros(d, np.float32)
    y = np.asarray(mod(jnp.asarray(x), jnp.asarray(mask)))
    np.testing.assert_allclose(y[:, keep], ref_sub * g[keep] + bias[keep], atol=TOL, rtol=0)
    np.testing.assert_array_equal(y[:, ~keep], 0.0)
    np.testing.assert_allclose(mod(jnp.asarray(x)), full * g + bias, atol=TOL, rtol=0)
    # Values in dropped dims do not leak into the statistics.
    x2 = x.copy()
    x2[:, ~keep] = 1e3
    np.testing.assert_allclose(mod(jnp.asarray(x2), jnp.asarray(mask)), y, atol=TOL, rtol=0)


def test_rope_inv_freq_scalings():
    base = _layers.rope_inv_freq(16, theta=10000.0)
    np.testing.assert_allclose(base, 10000.0 ** (-np.arange(0, 16, 2) / 16), rtol=1e-6)
    lin = _layers.rope_inv_freq(16, theta=10000.0, scaling={'rope_type': 'linear', 'factor': 4})
    np.testing.assert_allclose(lin, base / 4, rtol=1e-6)
    l3 = _layers.rope_inv_freq(
        16,
        theta=10000.0,
        scaling={
            'rope_type': 'llama3',
            'factor': 8.0,
            'low_freq_factor': 1.0,
            'high_freq_factor': 4.0,
            'original_max_position_embeddings': 64,
        },
    )
    wavelen = 2 * np.pi / base
    np.testing.assert_allclose(l3[wavelen < 16], base[wavelen < 16], rtol=1e-6)  # high freq kept
    np.testing.assert_allclose(l3[wavelen > 64], base[wavelen > 64] / 8, rtol=1e-6)  # low freq
    with pytest.raises(ValueError, match='rope_scaling'):
        _layers.rope_inv_freq(16, theta=1e4, scaling={'rope_type': 'yarn', 'factor': 2})
    with pytest.raises(ValueError, match='head_dim'):
        _layers.rope_inv_freq(7, theta=1e4)


def test_apply_rope_preserves_norm_and_relative_positions():
    rng = np.random.default_rng(0)
    inv = _layers.rope_inv_freq(8, theta=100.0)
    q = jnp.asarray(rng.normal(size=(1, 1, 1, 8)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 1, 1, 8)), jnp.float32)

    def dot(pq, pk):
        rq = _layers.apply_rope(q, jnp.array([[pq]]), inv)
        rk = _layers.apply_rope(k, jnp.array([[pk]]), inv)
        return float(jnp.sum(rq * rk))

    np.testing.assert_allclose(dot(5, 2), dot(13, 10), rtol=1e-5)
    rq = _layers.apply_rope(q, jnp.array([[7]]), inv)
    np.testing.assert_allclose(jnp.linalg.norm(rq), jnp.linalg.norm(q), rtol=1e-6)
