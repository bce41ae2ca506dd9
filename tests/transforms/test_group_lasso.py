"""Tests for the proximal group lasso on LoRA factors (jaxprune.transforms._group_lasso)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxprune.masks import _density
from jaxprune.transforms import _group_lasso

DIMS = (_density.LayerDims(hidden=8, heads=2, kv_heads=1, head_dim=4, mlp=6),)


def _np_prox(w, share, threshold, axis):
    out = w.astype(np.float64).copy()
    for g in range(w.shape[1 - axis]):
        idx = (slice(None), g) if axis == 0 else (g, slice(None))
        r = share[g]
        if r == 0:
            continue
        v = out[idx]
        n = np.linalg.norm(v)
        out[idx] = 0.0 if n == 0 else v / n * max(0.0, n - threshold * r)
    return out


def _params(key, k=8, r=3, n=6):
    ka, kb = jax.random.split(key)
    return {'a': jax.random.normal(ka, (k, r)), 'b': jax.random.normal(kb, (r, n))}


def _shares_fn(masks, params):
    del params
    return {'a': (1.0 - masks['in'])[:, None], 'b': (1.0 - masks['out'])[None, :]}


@pytest.mark.parametrize('jit', [False, True])
@pytest.mark.parametrize('strength,lr', [(0.5, 1.0), (3.0, 0.5), (100.0, 1.0)])
def test_group_lasso_matches_reference(strength, lr, jit):
    """params + u' == numpy prox(params + u); rows of A / cols of B; atol 1e-5 (float32)."""
    params = _params(jax.random.key(0))
    updates = _params(jax.random.key(1))
    masks = {'in': jnp.array([1, 0, 1, 0, 0, 1, 1, 0.5]), 'out': jnp.array([0, 1, 1, 0, 0.25, 1])}
    tx = _group_lasso.group_lasso(_shares_fn, strength=strength, learning_rate=lr)
    update = jax.jit(tx.update) if jit else tx.update
    new_u, state = update(updates, tx.init(params), params, masks=masks)
    new_p = optax.apply_updates(params, new_u)
    t = strength * lr
    p_plus_u = {k: np.asarray(params[k] + updates[k]) for k in params}
    want_a = _np_prox(p_plus_u['a'], 1 - np.asarray(masks['in']), t, axis=1)
    want_b = _np_prox(p_plus_u['b'], 1 - np.asarray(masks['out']), t, axis=0)
    np.testing.assert_allclose(np.asarray(new_p['a']), want_a, atol=1e-5)
    np.testing.assert_allclose(np.asarray(new_p['b']), want_b, atol=1e-5)
    assert int(state.count) == 1


def test_group_lasso_zeroes_small_groups_and_keeps_kept_groups_exactly():
    params = _params(jax.random.key(0))
    updates = jax.tree.map(lambda x: 0.1 * x, _params(jax.random.key(1)))
    masks = {'in': jnp.array([1, 0, 1, 0, 0, 1, 1, 0.0]), 'out': jnp.array([0, 1, 1, 0, 0, 1.0])}
    tx = _group_lasso.group_lasso(_shares_fn, strength=1e3, learning_rate=1.0)
    new_u, _ = tx.update(updates, tx.init(params), params, masks=masks)
    new_p = optax.apply_updates(params, new_u)
    pruned_in = np.asarray(masks['in']) == 0
    pruned_out = np.asarray(masks['out']) == 0
    # pruned groups: threshold 1e3 >> norms -> exactly zero
    np.testing.assert_array_equal(np.asarray(new_p['a'])[pruned_in], 0.0)
    np.testing.assert_array_equal(np.asarray(new_p['b'])[:, pruned_out], 0.0)
    # kept groups: the inner update passes through bit-exactly
    np.testing.assert_array_equal(np.asarray(new_u['a'])[~pruned_in],
                                  np.asarray(updates['a'])[~pruned_in])
    np.testing.assert_array_equal(np.asarray(new_u['b'])[:, ~pruned_out],
                                  np.asarray(updates['b'])[:, ~pruned_out])


def test_group_lasso_shrinks_norm_by_threshold():
    """A group with norm above the threshold keeps its direction and loses exactly t * r."""
    w = jnp.array([[3.0, 4.0]])  # one row group of norm 5
    out = _group_lasso.prox_group(w, jnp.array([[0.5]]), jnp.float32(2.0))
    np.testing.assert_allclose(np.asarray(out), [[3.0 * 4 / 5, 4.0 * 4 / 5]], rtol=1e-6)


def test_group_lasso_schedule_and_inject_hyperparams():
    params = _params(jax.random.key(0))
    masks = {'in': jnp.zeros(8), 'out': jnp.zeros(6)}
    ramp = optax.exponential_decay(1e-3, transition_steps=1, decay_rate=10.0, end_value=1e3)
    tx = _group_lasso.group_lasso(_shares_fn, strength=ramp, learning_rate=1.0)
    state = tx.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    norms = []
    p = params
    for _ in range(4):
        u, state = tx.update(zeros, state, p, masks=masks)
        p = optax.apply_updates(p, u)
        norms.append(float(jnp.linalg.norm(p['a'])))
    assert norms[0] > norms[1] > norms[2] > norms[3]  # growing strength shrinks faster
    injected = optax.inject_hyperparams(_group_lasso.group_lasso, static_args=('shares_fn',))(
        shares_fn=_shares_fn, strength=0.5, learning_rate=1.0)
    s = injected.init(params)
    u1, s = injected.update(zeros, s, params, masks=masks)
    u2, _ = _group_lasso.group_lasso(_shares_fn, strength=0.5, learning_rate=1.0).update(
        zeros, _group_lasso.GroupLassoState(jnp.zeros((), jnp.int32)), params, masks=masks)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), u1, u2)
    assert float(s.hyperparams['strength']) == 0.5


def test_group_lasso_conformance_eval_shape_jit_chain_adamw():
    params = _params(jax.random.key(0))
    masks = {'in': (jnp.arange(8) % 2).astype(jnp.float32), 'out': jnp.ones(6)}
    tx = optax.chain(optax.adamw(1e-2),
                     _group_lasso.group_lasso(_shares_fn, strength=10.0, learning_rate=1e-2))
    abstract = jax.eval_shape(tx.init, jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params))
    state = tx.init(params)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), abstract) == jax.tree.map(
        lambda x: (x.shape, x.dtype), state)

    @jax.jit
    def step(p, s):
        g = jax.grad(lambda q: jnp.sum(q['a'] ** 2) + jnp.sum(q['b'] ** 2))(p)
        u, s = tx.update(g, s, p, masks=masks)
        return optax.apply_updates(p, u), s

    p = params
    types0 = jax.tree.map(jax.typeof, state)
    for _ in range(30):
        p, state = step(p, state)
    assert jax.tree.map(jax.typeof, state) == types0  # state types stable across jit steps
    pruned = np.asarray(masks['in']) == 0
    # adamw moves ~1e-2 per step; the prox removes 0.1 per step -> pruned rows reach 0
    np.testing.assert_array_equal(np.asarray(p['a'])[pruned], 0.0)
    assert np.all(np.abs(np.asarray(p['a'])[~pruned]) > 0)
    np.testing.assert_array_equal(np.asarray(state[1].count), 30)


def test_group_lasso_requires_params():
    tx = _group_lasso.group_lasso(_shares_fn, strength=1.0, learning_rate=1.0)
    params = _params(jax.random.key(0))
    with pytest.raises(ValueError, match='params'):
        tx.update(params, tx.init(params), None, masks={'in': jnp.ones(8), 'out': jnp.ones(6)})


def test_lora_shares_fn_on_llama_paths():
    """Shares follow linear_keep: A rows <- in-keep, B cols <- out-keep; others untouched."""
    params = {'layers': {0: {
        'attn': {'v_proj': {'kernel': jnp.ones((8, 4)), 'lora_a': jnp.ones((8, 2)),
                            'lora_b': jnp.ones((2, 4))},
                 'o_proj': {'lora_a': jnp.ones((8, 2)), 'lora_b': jnp.ones((2, 8))}},
        'mlp': {'down_proj': {'lora_a': jnp.ones((6, 2)), 'lora_b': jnp.ones((2, 8))}}}},
        'lm_head': {'lora_a': jnp.ones((8, 2))}}
    ctx = jnp.array([1, 0, 0, 1, 0, 0, 1, 1.0])  # 2 heads, 1 KV head: v col d dies if 0 in both
    masks = {'layers': ({'attn_in': jnp.ones(8).at[0].set(0.0), 'attn_ctx': ctx,
                         'mlp': jnp.array([1, 0, 1, 1, 1, 1.0])},)}
    shares = _group_lasso.lora_shares_fn(DIMS)(masks, params)
    attn = shares['layers'][0]['attn']
    assert attn['v_proj']['kernel'] is None and shares['lm_head']['lora_a'] is None
    np.testing.assert_array_equal(np.asarray(attn['v_proj']['lora_a'][:, 0]),
                                  [1, 0, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(np.asarray(attn['v_proj']['lora_b'][0]), [0, 1, 0, 0])
    np.testing.assert_array_equal(np.asarray(attn['o_proj']['lora_a'][:, 0]), 1 - ctx)
    down = shares['layers'][0]['mlp']['down_proj']
    np.testing.assert_array_equal(np.asarray(down['lora_a'][:, 0]), [0, 1, 0, 0, 0, 0])
    assert attn['o_proj']['lora_b'].shape == (1, 8)


def test_group_lasso_bf16_and_multisteps():
    """bf16 params keep their dtype; MultiSteps forwards masks= and applies the prox every k."""
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _params(jax.random.key(0)))
    masks = {'in': jnp.zeros(8), 'out': jnp.ones(6)}
    tx = _group_lasso.group_lasso(_shares_fn, strength=1e3, learning_rate=1.0)
    u, _ = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), tx.init(params), params,
                              masks=masks)
    assert jax.tree.map(lambda x: x.dtype, u) == jax.tree.map(lambda x: x.dtype, params)
    new = optax.apply_updates(params, u)
    np.testing.assert_array_equal(np.asarray(new['a'], np.float32), 0.0)
    np.testing.assert_array_equal(np.asarray(new['b']), np.asarray(params['b']))
    multi = optax.MultiSteps(optax.chain(optax.sgd(0.0), tx), every_k_schedule=2)
    params = _params(jax.random.key(0))
    state = multi.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    u1, state = multi.update(zeros, state, params, masks=masks)
    np.testing.assert_array_equal(np.asarray(u1['a']), 0.0)  # accumulating: no step yet
    u2, state = multi.update(zeros, state, params, masks=masks)
    np.testing.assert_array_equal(np.asarray(optax.apply_updates(params, u2)['a']), 0.0)


def test_group_lasso_sharding_stable():
    """Under jit on an 8-device mesh the updates keep the params' shardings and types."""
    from jax.sharding import AxisType, NamedSharding, PartitionSpec

    if len(jax.devices()) < 8:
        pytest.skip('needs 8 (fake CPU) devices')
    mesh = jax.make_mesh((8,), ('x',), axis_types=(AxisType.Auto,))
    params = _params(jax.random.key(0), k=16, r=2, n=8)
    params = {'a': jax.device_put(params['a'], NamedSharding(mesh, PartitionSpec('x', None))),
              'b': jax.device_put(params['b'], NamedSharding(mesh, PartitionSpec(None, 'x')))}
    masks = {'in': (jnp.arange(16) % 2).astype(jnp.float32), 'out': jnp.zeros(8)}
    tx = optax.chain(optax.adamw(1e-2),
                     _group_lasso.group_lasso(_shares_fn, strength=1.0, learning_rate=1e-2))
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    update = jax.jit(tx.update)
    u, state1 = update(grads, state, params, masks=masks)
    for name in params:
        assert u[name].sharding.is_equivalent_to(params[name].sharding, 2)
    _, state2 = update(grads, state1, optax.apply_updates(params, u), masks=masks)
    assert jax.tree.map(jax.typeof, state2) == jax.tree.map(jax.typeof, state1)
