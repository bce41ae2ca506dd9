"""Tests for Gumbel-sigmoid sampling with STE (jaxprune.masks._gumbel)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune.masks import _gumbel


def _np_gumbel_sigmoid(logits, noise, temperature, bias):
    soft = 1.0 / (1.0 + np.exp(-(logits + bias + noise) / temperature))
    return soft, (soft >= 0.5).astype(np.float32)


@pytest.mark.parametrize('temperature,bias', [(0.4, 3.0), (1.0, 0.0), (0.1, -1.0)])
@pytest.mark.parametrize('jit', [False, True])
def test_gumbel_sigmoid_matches_reference(temperature, bias, jit):
    """Same noise -> same soft (rtol 1e-5) and identical hard masks as a numpy reference."""
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (64,)).astype(np.float32)
    u = rng.uniform(1e-6, 1 - 1e-6, (64,))
    noise = (np.log(u) - np.log1p(-u)).astype(np.float32)  # g1 - g2 ~ Logistic(0, 1)
    want_soft, want_hard = _np_gumbel_sigmoid(logits.astype(np.float64), noise, temperature, bias)
    fn = _gumbel.gumbel_sigmoid
    if jit:
        fn = jax.jit(fn, static_argnames=('temperature', 'bias', 'hard'))
    soft = fn(jnp.asarray(logits), jnp.asarray(noise), temperature=temperature, bias=bias,
              hard=False)
    hard = fn(jnp.asarray(logits), jnp.asarray(noise), temperature=temperature, bias=bias)
    np.testing.assert_allclose(np.asarray(soft), want_soft, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(hard), want_hard)


def test_gumbel_sigmoid_hard_is_exactly_binary():
    logits = jax.random.normal(jax.random.key(0), (4096,)) * 4
    noise = _gumbel.logistic_noise(jax.random.key(1), logits.shape)
    hard = np.asarray(_gumbel.gumbel_sigmoid(logits, noise))
    assert set(np.unique(hard).tolist()) == {0.0, 1.0}


def test_gumbel_sigmoid_ste_gradient_equals_soft_gradient():
    logits = jax.random.normal(jax.random.key(0), (32,))
    noise = _gumbel.logistic_noise(jax.random.key(1), logits.shape)
    w = jax.random.normal(jax.random.key(2), (32,))

    def f(l, hard):
        return jnp.sum(w * _gumbel.gumbel_sigmoid(l, noise, temperature=0.7, hard=hard))

    g_hard = jax.grad(f)(logits, True)
    g_soft = jax.grad(f)(logits, False)
    assert np.count_nonzero(np.asarray(g_hard)) == 32
    np.testing.assert_array_equal(np.asarray(g_hard), np.asarray(g_soft))
    # and the forward differs from the soft one (it is the hard sample)
    assert float(f(logits, True)) != pytest.approx(float(f(logits, False)))


def test_straight_through_forward_is_bitwise_hard():
    soft = jnp.array([0.3, 0.7, 0.1 + 1e-7, 0.9999])
    hard = jnp.array([1.0, 0.0, 1.0, 0.0])
    np.testing.assert_array_equal(np.asarray(_gumbel.straight_through(soft, hard)), hard)


def test_sample_masks_keep_rate_matches_sigmoid():
    """P(keep) = sigmoid(logit + bias); 20k draws per unit, tolerance 0.015 (> 4 sigma)."""
    logits = {'a': jnp.array([-3.0, -1.0, 0.0, 2.0]), 'b': (jnp.array([-5.0]),)}
    keys = jax.random.split(jax.random.key(0), 20000)
    draws = jax.vmap(lambda k: _gumbel.sample_masks(logits, k, bias=1.0))(keys)
    rate = jax.tree.map(lambda x: np.asarray(jnp.mean(x, 0)), draws)
    want = jax.tree.map(lambda l: np.asarray(jax.nn.sigmoid(l + 1.0)), logits)
    jax.tree.map(lambda r, w: np.testing.assert_allclose(r, w, atol=0.015), rate, want)


def test_sample_masks_leaves_get_independent_noise():
    logits = {'a': jnp.zeros(256), 'b': jnp.zeros(256)}
    m = _gumbel.sample_masks(logits, jax.random.key(0), bias=0.0)
    assert not np.array_equal(np.asarray(m['a']), np.asarray(m['b']))


def test_deterministic_masks():
    logits = {'x': jnp.array([-3.5, -3.0, -2.9, 4.0])}
    out = _gumbel.deterministic_masks(logits, bias=3.0)
    np.testing.assert_array_equal(np.asarray(out['x']), [0.0, 1.0, 1.0, 1.0])
    assert out['x'].dtype == jnp.float32


def test_gumbel_sigmoid_errors():
    with pytest.raises(ValueError, match='temperature'):
        _gumbel.gumbel_sigmoid(jnp.zeros(3), jnp.zeros(3), temperature=0.0)
    with pytest.raises(ValueError, match='noise.shape'):
        _gumbel.gumbel_sigmoid(jnp.zeros(3), jnp.zeros(4))
