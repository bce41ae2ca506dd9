"""sparsify: mask ownership, schedule, flip rate, hard projection and optax conformance."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxprune.masks import _nm
from jaxprune.transforms import _sparsify


def _params(dtype=jnp.float32):
    k = jax.random.split(jax.random.key(0), 3)
    return {'layers': {0: {'kernel': jax.random.normal(k[0], (8, 4), dtype)},
                       1: {'kernel': jax.random.normal(k[1], (16, 8), dtype)}},
            'norm': {'scale': jnp.ones(4, dtype)}}


def _grads(params, seed):
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        tree, [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def _np_masks(params):
    """Numpy 2:4 along axis 0 of |W| (independent of the implementation)."""
    out = {}
    for i, layer in params['layers'].items():
        a = np.abs(np.asarray(layer['kernel'], np.float64))
        g = a.reshape(-1, 4, a.shape[1])
        order = np.argsort(-g, axis=1, kind='stable')
        keep = np.zeros_like(g, bool)
        np.put_along_axis(keep, order[:, :2], True, axis=1)
        out[i] = keep.reshape(a.shape)
    return out


@pytest.mark.parametrize('update_every', [1, 3])
@pytest.mark.parametrize('jit', [False, True])
def test_sparsify_matches_reference(update_every, jit):
    tx = _sparsify.sparsify(optax.sgd(0.5), update_every=update_every)
    params = _params()
    state = tx.init(params)
    update = jax.jit(tx.update) if jit else tx.update
    ref_masks = _np_masks(params)
    for t in range(1, 7):
        g = _grads(params, t)
        updates, state = update(g, state, params)
        new_params = optax.apply_updates(params, updates)
        if t % update_every == 0:
            new_ref = _np_masks(new_params)
            flips = sum((new_ref[i] != ref_masks[i]).sum() for i in new_ref)
            total = sum(x.size for x in new_ref.values())
            np.testing.assert_allclose(float(state.flip_rate), flips / total, rtol=1e-6)
            ref_masks = new_ref
        for i in ref_masks:
            np.testing.assert_array_equal(np.asarray(state.masks['layers'][i]['kernel']),
                                          ref_masks[i])
        # AST keeps the weights dense: the plain SGD step is applied to every weight.
        np.testing.assert_allclose(np.asarray(updates['layers'][0]['kernel']),
                                   -0.5 * np.asarray(g['layers'][0]['kernel']), rtol=1e-6)
        params = new_params
        assert int(state.count) == t


def test_sparsify_masks_found_and_passed_to_inner():
    seen = {}

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None, *, masks=None, **kw):
        del params, kw
        seen['masks'] = masks
        return updates, state

    tx = _sparsify.sparsify(optax.GradientTransformationExtraArgs(init, update))
    params = _params()
    state = tx.init(params)
    found = optax.tree.get(state, 'masks')
    assert found is state.masks
    assert state.masks['norm']['scale'] is None
    tx.update(_grads(params, 1), state, params, masks='ignored')
    assert seen['masks'] is state.masks


def test_sparsify_hard_projects_onto_masks():
    tx = _sparsify.sparsify(optax.sgd(0.1), update_every=1, hard=True)
    params = _params()
    state = tx.init(params)
    updates, state = tx.update(_grads(params, 3), state, params)
    new = optax.apply_updates(params, updates)
    for i in (0, 1):
        w = np.asarray(new['layers'][i]['kernel'])
        mk = np.asarray(state.masks['layers'][i]['kernel'])
        assert (w[~mk] == 0).all() and bool(_nm.is_nm(w != 0))


def test_sparsify_errors():
    with pytest.raises(ValueError, match='update_every'):
        _sparsify.sparsify(optax.sgd(1.0), update_every=0)
    tx = _sparsify.sparsify(optax.sgd(1.0))
    params = _params()
    with pytest.raises(ValueError, match='params'):
        tx.update(params, tx.init(params))


def test_sparsify_mask_fn_nm_variants():
    tx = _sparsify.sparsify(optax.sgd(1.0), mask_fn=functools.partial(_nm.nm_masks, n=4, m=8))
    state = tx.init(_params())
    assert bool(_nm.is_nm(state.masks['layers'][1]['kernel'], n=4, m=8))


# ---- conformance -------------------------------------------------------------------------


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_sparsify_conformance(dtype):
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     _sparsify.sparsify(optax.adamw(1e-2), update_every=2))
    params = _params(dtype)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    abs_state = jax.eval_shape(tx.init, abstract)
    state = tx.init(params)
    assert jax.tree.structure(abs_state) == jax.tree.structure(state)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), abs_state) == jax.tree.map(
        lambda x: (x.shape, x.dtype), state)
    update = jax.jit(tx.update)
    t0 = jax.tree.map(jax.typeof, state)
    for s in range(4):
        updates, state = update(_grads(params, s), state, params)
        params = optax.apply_updates(params, updates)
        assert jax.tree.map(jax.typeof, state) == t0
        assert all(u.dtype == dtype for u in jax.tree.leaves(updates))
    masks = optax.tree.get(state, 'masks')
    assert jax.tree.leaves(masks)[0].dtype == jnp.bool_
    assert all(np.isfinite(np.asarray(x, np.float32)).all() for x in jax.tree.leaves(params))


def test_sparsify_inject_hyperparams():
    tx = optax.inject_hyperparams(
        lambda learning_rate: _sparsify.sparsify(optax.adam(learning_rate)))(learning_rate=0.1)
    params = _params()
    state = tx.init(params)
    _, state = jax.jit(tx.update)(_grads(params, 0), state, params)
    assert optax.tree.get(state, 'masks') is not None
    state = optax.tree.set(state, learning_rate=0.01)
    assert float(optax.tree.get(state, 'learning_rate')) == pytest.approx(0.01)


@pytest.mark.parametrize('spec', [('a', 'b'), (None, 'b')])
def test_sparsify_sharding_stable(spec):
    from jax.sharding import AxisType, NamedSharding, PartitionSpec

    mesh = jax.make_mesh((2, 4), ('a', 'b'), axis_types=(AxisType.Explicit,) * 2)
    with jax.set_mesh(mesh):
        w = jax.random.normal(jax.random.key(0), (16, 8))
        params = {'layers': {0: {'kernel': jax.device_put(
            w, NamedSharding(mesh, PartitionSpec(*spec)))}}}
        tx = _sparsify.sparsify(optax.adamw(1e-2), update_every=1)
        state = jax.jit(tx.init)(params)
        t0 = jax.tree.map(jax.typeof, state)
        mask_type = jax.typeof(state.masks['layers'][0]['kernel'])
        assert mask_type.sharding.spec == jax.typeof(params['layers'][0]['kernel']).sharding.spec
        _, state = jax.jit(tx.update)(params, state, params)
        assert jax.tree.map(jax.typeof, state) == t0  # masks shard like the kernel, stably
    np.testing.assert_array_equal(np.asarray(state.masks['layers'][0]['kernel']),
                                  _np_masks({'layers': {0: {'kernel': w - 1e-2 * jnp.sign(w)}}})[0])


def test_sparsify_on_nnx_state():
    from flax import nnx

    class Tiny(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.List([nnx.Linear(8, 4, rngs=rngs), nnx.Linear(4, 8, rngs=rngs)])

    params = nnx.state(Tiny(nnx.Rngs(0)), nnx.Param)
    tx = _sparsify.sparsify(optax.adamw(1e-2), update_every=1)
    state = tx.init(params)
    masks = optax.tree.get(state, 'masks')
    paths = {_nm.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(masks)[0]}
    assert paths == {'layers.0.kernel', 'layers.1.kernel'}  # biases stay dense (None)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, state = jax.jit(tx.update)(grads, state, params)
    new = optax.apply_updates(params, updates)
    w = new['layers'][0]['kernel'][...]
    np.testing.assert_array_equal(np.asarray(state.masks['layers'][0]['kernel'][...]),
                                  np.asarray(_nm.nm_mask(jnp.abs(w))))
    assert type(_nm.ste_apply(new, state.masks)) is type(params)
