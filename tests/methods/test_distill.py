"""Distillation losses: KL vs numpy/torch-free reference, masking, gradients, hidden MSE."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune.methods import _distill


def _np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _logits(shape, seed):
    return np.asarray(jax.random.normal(jax.random.key(seed), shape) * 3, np.float64)


@pytest.mark.parametrize('temperature', [1.0, 2.0, 4.0])
@pytest.mark.parametrize('jit', [False, True])
def test_kl_per_token_matches_reference(temperature, jit):
    s, t = _logits((2, 5, 11), 0), _logits((2, 5, 11), 1)
    lps, lpt = _np_log_softmax(s / temperature), _np_log_softmax(t / temperature)
    ref = temperature**2 * (np.exp(lpt) * (lpt - lps)).sum(-1)
    fn = _distill.kl_per_token
    if jit:
        fn = jax.jit(fn, static_argnames='temperature')
    got = fn(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), temperature=temperature)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-4, atol=1e-5)


def test_kl_invariants():
    s = jnp.asarray(_logits((4, 7), 2), jnp.float32)
    assert float(jnp.max(jnp.abs(_distill.kl_per_token(s, s)))) < 1e-5  # KL(p||p) = 0
    t = jnp.asarray(_logits((4, 7), 3), jnp.float32)
    assert float(jnp.min(_distill.kl_per_token(s, t))) >= 0.0
    # Shift invariance of softmax: adding a constant per position changes nothing.
    np.testing.assert_allclose(np.asarray(_distill.kl_per_token(s + 5.0, t)),
                               np.asarray(_distill.kl_per_token(s, t)), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match='temperature'):
        _distill.kl_per_token(s, t, temperature=0.0)


def test_ast_loss_matches_reference_with_padding():
    s, t = _logits((2, 6, 9), 4), _logits((2, 6, 9), 5)
    labels = np.array([[1, 2, 3, -100, 4, 5], [0, 8, -100, -100, 7, 1]])
    mask = np.array([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    valid = (labels != -100) & (mask == 1)
    lps = _np_log_softmax(s)
    picked = np.take_along_axis(lps, np.where(valid, labels, 0)[..., None], -1)[..., 0]
    ce_ref = -picked[valid].mean()
    lps2, lpt2 = _np_log_softmax(s / 2), _np_log_softmax(t / 2)
    kd_ref = (4 * (np.exp(lpt2) * (lpt2 - lps2)).sum(-1))[valid].mean()
    loss, aux = _distill.ast_loss(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32),
                                  jnp.asarray(labels), mask=jnp.asarray(mask))
    np.testing.assert_allclose(float(aux['ce']), ce_ref, rtol=1e-5)
    np.testing.assert_allclose(float(aux['kd']), kd_ref, rtol=1e-4)
    np.testing.assert_allclose(float(loss), ce_ref + 0.5 * kd_ref, rtol=1e-4)
    # Changing logits at an invalid position leaves the loss and its gradient unchanged.
    s2 = s.copy()
    s2[0, 3] += 100.0
    loss2, _ = _distill.ast_loss(jnp.asarray(s2, jnp.float32), jnp.asarray(t, jnp.float32),
                                 jnp.asarray(labels), mask=jnp.asarray(mask))
    np.testing.assert_allclose(float(loss2), float(loss), rtol=1e-6)
    g = jax.grad(lambda z: _distill.ast_loss(z, jnp.asarray(t, jnp.float32), jnp.asarray(labels),
                                             mask=jnp.asarray(mask))[0])(
        jnp.asarray(s, jnp.float32))
    assert float(jnp.abs(g[0, 3]).sum()) == 0.0 and float(jnp.abs(g[0, 5]).sum()) == 0.0
    assert float(jnp.abs(g[0, 0]).sum()) > 0.0


def test_ast_loss_classification_shapes():
    s, t = _logits((8, 3), 6), _logits((8, 3), 7)
    loss, aux = _distill.ast_loss(jnp.asarray(s), jnp.asarray(t), jnp.arange(8) % 3,
                                  kd_weight=0.0)
    np.testing.assert_allclose(float(loss), float(aux['ce']), rtol=1e-6)


def test_hidden_mse_matches_reference():
    k = jax.random.split(jax.random.key(0), 5)
    hs = [jax.random.normal(k[0], (2, 3, 4)), jax.random.normal(k[1], (2, 3, 4))]
    ht = [jax.random.normal(k[2], (2, 3, 6)), jax.random.normal(k[3], (2, 3, 4))]
    proj = [jax.random.normal(k[4], (4, 6)), None]
    mask = np.array([[1, 1, 0], [1, 0, 0]], bool)
    ref = 0.0
    for a, b, p in zip(hs, ht, proj):
        a = np.asarray(a) @ np.asarray(p) if p is not None else np.asarray(a)
        ref += ((a - np.asarray(b)) ** 2).mean(-1)[mask].mean()
    got = _distill.hidden_mse(hs, ht, proj, mask=jnp.asarray(mask))
    np.testing.assert_allclose(float(got), ref / 2, rtol=1e-5)
    assert float(_distill.hidden_mse(hs[1:], hs[1:])) == 0.0
    with pytest.raises(ValueError, match='projection'):
        _distill.hidden_mse(hs[:1], ht[:1])
