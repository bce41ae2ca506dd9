"""masked_weight_decay: annealed decay of pruned weights only; optax conformance."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxprune.masks import _nm
from jaxprune.transforms import _decay


def _setup(dtype=jnp.float32):
    k = jax.random.split(jax.random.key(0), 2)
    params = {'layers': {0: {'kernel': jax.random.normal(k[0], (8, 4), dtype)}},
              'bias': jnp.ones(4, dtype)}
    masks = _nm.nm_masks_for(params)
    grads = jax.tree.map(lambda x: jnp.full_like(x, 0.25), params)
    return params, masks, grads


@pytest.mark.parametrize('ramp_steps', [None, 0, 4])
@pytest.mark.parametrize('jit', [False, True])
def test_masked_weight_decay_matches_reference(ramp_steps, jit):
    params, masks, grads = _setup()
    tx = _decay.masked_weight_decay(0.1, ramp_steps=ramp_steps)
    state = tx.init(params)
    update = jax.jit(tx.update) if jit else tx.update
    w = np.asarray(params['layers'][0]['kernel'])
    mk = np.asarray(masks['layers'][0]['kernel'])
    for t in range(6):
        updates, state = update(grads, state, params, masks=masks)
        lam = 0.1 * (min(1.0, t / ramp_steps) if ramp_steps else 1.0)
        ref = 0.25 + lam * (1 - mk) * w
        np.testing.assert_allclose(np.asarray(updates['layers'][0]['kernel']), ref,
                                   rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(np.asarray(updates['bias']), 0.25)  # dense leaf untouched


def test_masked_weight_decay_schedule_and_errors():
    params, masks, grads = _setup()
    tx = _decay.masked_weight_decay(optax.constant_schedule(0.5))
    updates, _ = tx.update(grads, tx.init(params), params, masks=masks)
    w = params['layers'][0]['kernel']
    np.testing.assert_allclose(
        np.asarray(updates['layers'][0]['kernel']),
        np.asarray(0.25 + 0.5 * jnp.where(masks['layers'][0]['kernel'], 0., w)), rtol=1e-6)
    with pytest.raises(ValueError, match='masks='):
        tx.update(grads, tx.init(params), params)
    with pytest.raises(ValueError, match='ramp_steps'):
        _decay.masked_weight_decay(optax.constant_schedule(0.5), ramp_steps=3)


def test_masked_weight_decay_shrinks_pruned_weights_only():
    params, masks, _ = _setup()
    zero = jax.tree.map(jnp.zeros_like, params)
    tx = optax.chain(_decay.masked_weight_decay(1.0), optax.sgd(0.1))
    state = tx.init(params)
    p = params
    for _ in range(5):
        u, state = tx.update(zero, state, p, masks=masks)
        p = optax.apply_updates(p, u)
    mk = np.asarray(masks['layers'][0]['kernel'])
    w0, w1 = np.asarray(params['layers'][0]['kernel']), np.asarray(p['layers'][0]['kernel'])
    np.testing.assert_allclose(w1[~mk], w0[~mk] * 0.9 ** 5, rtol=1e-5)
    np.testing.assert_array_equal(w1[mk], w0[mk])


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_masked_weight_decay_conformance(dtype):
    params, masks, grads = _setup(dtype)
    tx = optax.chain(_decay.masked_weight_decay(6e-5, ramp_steps=3), optax.adamw(1e-3))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    abs_state = jax.eval_shape(tx.init, abstract)
    state = tx.init(params)
    assert jax.tree.structure(abs_state) == jax.tree.structure(state)
    t0 = jax.tree.map(jax.typeof, state)
    update = jax.jit(tx.update)
    for _ in range(3):
        u, state = update(grads, state, params, masks=masks)
        assert jax.tree.map(jax.typeof, state) == t0
        assert all(x.dtype == dtype for x in jax.tree.leaves(u))
        assert all(np.isfinite(np.asarray(x, np.float32)).all() for x in jax.tree.leaves(u))
    inj = optax.inject_hyperparams(_decay.masked_weight_decay)(weight_decay=0.2, ramp_steps=2)
    st = inj.init(params)
    u, st = jax.jit(inj.update)(grads, st, params, masks=masks)
    np.testing.assert_allclose(np.asarray(u['layers'][0]['kernel'], np.float32),
                               np.asarray(grads['layers'][0]['kernel'], np.float32))  # t=0: 0
    u, st = jax.jit(inj.update)(grads, st, params, masks=masks)
    w = params['layers'][0]['kernel']
    ref = grads['layers'][0]['kernel'] + 0.1 * jnp.where(masks['layers'][0]['kernel'], 0, w)
    np.testing.assert_allclose(np.asarray(u['layers'][0]['kernel'], np.float32),
                               np.asarray(ref, np.float32), rtol=1e-2 if dtype != jnp.float32
                               else 1e-6)
