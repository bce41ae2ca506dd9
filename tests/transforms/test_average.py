"""param_ema: the bias-corrected parameter average against a numpy loop; training unaffected."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxprune import config
from jaxprune.transforms import _average


def _params():
    k = jax.random.split(jax.random.key(0), 2)
    return {'w': jax.random.normal(k[0], (4, 3)), 'b': jax.random.normal(k[1], (3,)),
            'step': jnp.asarray(7, jnp.int32)}


def _grads(t, params):
    return jax.tree.map(
        lambda p: (jnp.sin(jnp.arange(p.size, dtype=jnp.float32).reshape(p.shape) + t)
                   if jnp.issubdtype(p.dtype, jnp.floating) else jnp.zeros_like(p)), params)


@pytest.mark.parametrize('jit', [False, True])
@pytest.mark.parametrize('decay', [0.0, 0.5, 0.9])
def test_average_matches_numpy_reference_and_leaves_updates_alone(decay, jit):
    params = _params()
    inner = optax.adam(0.1)
    tx = optax.chain(inner, _average.param_ema(decay))
    state, ref_state = tx.init(params), inner.init(params)
    update = jax.jit(tx.update) if jit else tx.update
    p = params
    iterates = []
    for t in range(5):
        g = _grads(t, p)
        u, state = update(g, state, p)
        ref_u, ref_state = inner.update(g, ref_state, p)
        for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(ref_u)):  # passes updates through
            tol = {'rtol': 1e-6, 'atol': 1e-7} if jit else {'rtol': 0, 'atol': 0}
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), **tol)
        p = optax.apply_updates(p, u)
        iterates.append(p)
        # Reference: sum_i (1 - d) d^(t - i) theta_i / (1 - d^(t + 1)).
        weights = np.array([(1 - decay) * decay ** (t - i) for i in range(t + 1)])
        for name in ('w', 'b'):
            ref = sum(w * np.asarray(it[name]) for w, it in zip(weights, iterates))
            ref = ref / (1 - decay ** (t + 1))
            got = _average.averaged_params(p, state)[name]
            np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-6)
        assert int(_average.averaged_params(p, state)['step']) == 7  # non-float: live value
    if decay == 0.0:  # no memory: the average is the last iterate
        np.testing.assert_allclose(np.asarray(_average.averaged_params(p, state)['w']),
                                   np.asarray(p['w']), rtol=1e-6)


def test_before_the_first_update_the_average_is_the_live_params():
    params = _params()
    state = _average.param_ema(0.9).init(params)
    got = _average.averaged_params(params, state)
    np.testing.assert_array_equal(np.asarray(got['w']), np.asarray(params['w']))


def test_a_skipped_nonfinite_update_leaves_the_average_unchanged():
    params = {'w': jnp.ones((2, 2))}
    tx = optax.apply_if_finite(optax.chain(optax.sgd(0.1), _average.param_ema(0.5)), 10)
    state = tx.init(params)
    _, state = tx.update({'w': jnp.ones((2, 2))}, state, params)
    before = _average.averaged_params(params, state)
    _, state = tx.update({'w': jnp.full((2, 2), jnp.nan)}, state, params)
    after = _average.averaged_params(params, state)
    np.testing.assert_array_equal(np.asarray(before['w']), np.asarray(after['w']))
    np.testing.assert_allclose(np.asarray(after['w']), 0.9)  # one averaged iterate: 1 - 0.1


def test_errors_name_the_fix():
    with pytest.raises(ValueError, match=r'\[0, 1\)'):
        _average.param_ema(1.0)
    tx = _average.param_ema(0.5)
    with pytest.raises(ValueError, match='params='):
        tx.update({'w': jnp.ones(2)}, tx.init({'w': jnp.ones(2)}))
    with pytest.raises(ValueError, match='found 0'):
        _average.averaged_params({'w': jnp.ones(2)}, optax.sgd(0.1).init({'w': jnp.ones(2)}))
    two = optax.chain(tx, tx).init({'w': jnp.ones(2)})
    with pytest.raises(ValueError, match='found 2'):
        _average.averaged_params({'w': jnp.ones(2)}, two)
    with pytest.raises(ValueError, match='train.param_ema'):
        config.TrainCfg(param_ema=1.0)


def test_train_cfg_appends_the_average_last_without_changing_the_updates():
    params = {k: v for k, v in _params().items() if k != 'step'}
    plain = config.TrainCfg(steps=10, learning_rate=0.1, weight_decay=0.01).build_optimizer()
    avg = config.TrainCfg(steps=10, learning_rate=0.1, weight_decay=0.01,
                          param_ema=0.8).build_optimizer()
    s_plain, s_avg = plain.init(params), avg.init(params)
    assert isinstance(s_avg.inner_state[-1], _average.ParamEmaState)  # last in the chain
    with pytest.raises(ValueError, match='found 0'):
        _average.averaged_params(params, s_plain)
    p = params
    for t in range(3):
        g = _grads(t, p)
        u1, s_plain = plain.update(g, s_plain, p)
        u2, s_avg = avg.update(g, s_avg, p)
        for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        p = optax.apply_updates(p, u1)


def test_shift_average_applies_an_outside_edit_by_key_path():
    from flax import nnx

    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)  # nnx.State: key paths end with 'value'
    tx = optax.chain(optax.sgd(0.1), _average.param_ema(0.5))
    state = tx.init(params)
    for _ in range(3):
        u, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
        params = optax.apply_updates(params, u)
    before = _average.averaged_params(params, state)
    old = nnx.to_pure_dict(params)  # a pure dict, matched to the nnx.State average by path
    new = {**old, 'kernel': old['kernel'] + 2.0}  # the bias leaf is left in place
    shifted = _average.averaged_params(params, _average.shift_average(state, new, old))
    np.testing.assert_allclose(np.asarray(shifted['kernel'][...]),
                               np.asarray(before['kernel'][...]) + 2.0, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(shifted['bias'][...]),
                                  np.asarray(before['bias'][...]))
    plain = optax.sgd(0.1).init(params)
    assert _average.shift_average(plain, new, old) is plain  # no average: nothing to shift


def test_bfloat16_params_are_averaged_in_float32():
    params = {'w': jnp.full((4,), 1.0, jnp.bfloat16)}
    tx = optax.chain(optax.sgd(1.0), _average.param_ema(0.999))
    state = tx.init(params)
    ema_state = next(x for x in state if isinstance(x, _average.ParamEmaState))
    assert ema_state.ema['w'].dtype == jnp.float32
    p, ref = params, []
    for _ in range(20):  # steps of 1/256: below bfloat16's resolution of a 0.999-weighted sum
        u, state = tx.update({'w': jnp.full((4,), -1 / 256, jnp.bfloat16)}, state, p)
        p = optax.apply_updates(p, u)
        ref.append(np.asarray(p['w'], np.float32))
    weights = np.array([0.001 * 0.999 ** (19 - i) for i in range(20)])
    expected = (weights[:, None] * np.stack(ref)).sum(0) / (1 - 0.999 ** 20)
    got = _average.averaged_params(p, state)['w']
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32),
                               np.asarray(jnp.asarray(expected, jnp.bfloat16), np.float32))


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_param_ema_conformance(dtype):
    params = jax.tree.map(lambda x: x.astype(dtype),
                          {k: v for k, v in _params().items() if k != 'step'})
    grads = jax.tree.map(lambda x: jnp.full_like(x, 0.5), params)
    tx = optax.chain(optax.adamw(1e-3), _average.param_ema(0.9))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    state = tx.init(params)
    assert jax.tree.structure(jax.eval_shape(tx.init, abstract)) == jax.tree.structure(state)
    t0 = jax.tree.map(jax.typeof, state)
    update = jax.jit(tx.update)
    p = params
    for _ in range(3):
        u, state = update(grads, state, p)
        assert jax.tree.map(jax.typeof, state) == t0  # no dtype / shape drift under jit
        assert all(x.dtype == dtype for x in jax.tree.leaves(u))
        p = optax.apply_updates(p, u)
    assert all(x.dtype == dtype for x in jax.tree.leaves(_average.averaged_params(p, state)))
    # inject_hyperparams: the decay becomes a traced scalar; one update averages one iterate.
    inj = optax.chain(optax.sgd(0.1), optax.inject_hyperparams(_average.param_ema)(decay=0.5))
    st = inj.init(params)
    u, st = jax.jit(inj.update)(grads, st, params)
    np.testing.assert_allclose(
        np.asarray(_average.averaged_params(params, st)['w'], np.float32),
        np.asarray(optax.apply_updates(params, u)['w'], np.float32), rtol=1e-6)
    # MultiSteps: the average moves only when the inner chain applies an update.
    ms = optax.MultiSteps(optax.chain(optax.sgd(0.1), _average.param_ema(0.5)), every_k_schedule=2)
    st = ms.init(params)
    for _ in range(2):
        _, st = ms.update(grads, st, params)
    assert int(next(x for x in jax.tree.leaves(
        st, is_leaf=lambda x: isinstance(x, _average.ParamEmaState))
        if isinstance(x, _average.ParamEmaState)).count) == 1
