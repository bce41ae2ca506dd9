"""N:M masks along the contraction axis: reference, invariants, errors, path filtering."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune.masks import _nm


def _np_nm_mask(s, n, m, axis):
    """Plain numpy loop: keep the n largest per group of m along axis, ties to the lower index."""
    s = np.moveaxis(np.asarray(s, np.float64), axis, 0)
    keep = np.zeros(s.shape, bool)
    flat = s.reshape(s.shape[0], -1)
    kf = keep.reshape(s.shape[0], -1)
    for g in range(0, s.shape[0], m):
        for j in range(flat.shape[1]):
            col = flat[g:g + m, j]
            order = sorted(range(m), key=lambda i: (-col[i], i))
            for i in order[:n]:
                kf[g + i, j] = True
    return np.moveaxis(kf.reshape(s.shape), 0, axis)


@pytest.mark.parametrize('n,m', [(2, 4), (4, 8), (1, 4)])
@pytest.mark.parametrize('axis', [0, 1])
@pytest.mark.parametrize('jit', [False, True])
def test_nm_mask_matches_reference(n, m, axis, jit):
    rng = np.random.default_rng(0)
    s = rng.normal(size=(16, 24)).astype(np.float32)
    s[:4, :3] = 0.5  # ties resolve to the lower index
    fn = jax.jit(_nm.nm_mask, static_argnames=('n', 'm', 'axis')) if jit else _nm.nm_mask
    got = np.asarray(fn(s, n=n, m=m, axis=axis))
    np.testing.assert_array_equal(got, _np_nm_mask(s, n, m, axis))


@pytest.mark.parametrize('n,m', [(2, 4), (4, 8), (1, 4)])
def test_nm_mask_exact_count_along_k(n, m):
    s = jax.random.normal(jax.random.key(1), (32, 8))
    mask = _nm.nm_mask(jnp.abs(s), n=n, m=m)
    counts = np.asarray(mask).reshape(32 // m, m, 8).sum(1)
    assert (counts == n).all()
    assert bool(_nm.is_nm(mask, n=n, m=m))
    # Along the wrong (last) axis the count is generally not n.
    assert not bool(_nm.is_nm(mask, n=n, m=m, axis=1))


def test_nm_mask_golden_axis0_not_last_axis():
    # One K-group of 4 rows, 2 output columns: rows 0,2 win in column 0; rows 1,3 in column 1.
    s = jnp.array([[4., 1.], [1., 4.], [3., 2.], [2., 3.]])
    np.testing.assert_array_equal(
        np.asarray(_nm.nm_mask(s)), [[True, False], [False, True], [True, False], [False, True]])


def test_nm_mask_all_ties_keeps_exactly_n():
    mask = _nm.nm_mask(jnp.zeros((8, 3)), n=2, m=4)
    np.testing.assert_array_equal(np.asarray(mask)[:4, 0], [True, True, False, False])
    assert bool(_nm.is_nm(mask))


@pytest.mark.parametrize('kwargs,match', [
    ({'n': 3, 'm': 2}, 'n <= m'),
    ({'n': 2, 'm': 4}, 'pad'),
])
def test_nm_mask_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _nm.nm_mask(jnp.ones((6, 4)), **kwargs)


def _tree():
    k = jax.random.split(jax.random.key(0), 6)
    return {
        'embed': {'embedding': jax.random.normal(k[0], (16, 8))},
        'layers': {
            0: {'attn': {'q_proj': {'kernel': jax.random.normal(k[1], (8, 8)),
                                    'lora_a': jax.random.normal(k[2], (8, 4))}},
                'mlp': {'down_proj': {'kernel': jax.random.normal(k[3], (16, 8)),
                                      'bias': jnp.zeros(8)}},
                'attn_norm': {'scale': jnp.ones(8)}},
        },
        'lm_head': {'kernel': jax.random.normal(k[4], (8, 16))},
    }


def test_nm_masks_for_path_filter():
    params = _tree()
    masks = _nm.nm_masks_for(params)
    sparse = {_nm.path_str(p) for p, x in jax.tree_util.tree_flatten_with_path(masks)[0]}
    assert sparse == {'layers.0.attn.q_proj.kernel', 'layers.0.mlp.down_proj.kernel'}
    assert masks['embed']['embedding'] is None and masks['lm_head']['kernel'] is None
    assert masks['layers'][0]['attn']['q_proj']['lora_a'] is None
    w = params['layers'][0]['mlp']['down_proj']['kernel']
    np.testing.assert_array_equal(np.asarray(masks['layers'][0]['mlp']['down_proj']['kernel']),
                                  _np_nm_mask(np.abs(w), 2, 4, 0))


def test_nm_masks_for_names_bad_kernel():
    params = {'layers': {0: {'kernel': jnp.ones((6, 4))}}}
    with pytest.raises(ValueError, match='layers.0.kernel'):
        _nm.nm_masks_for(params)
    with pytest.raises(ValueError, match='not both'):
        _nm.nm_masks_for(params, scores=params, score_fn=lambda p: p)


def test_ste_apply_forward_masked_gradient_dense():
    w = jax.random.normal(jax.random.key(2), (8, 4))
    params = {'layers': {0: {'kernel': w}}, 'norm': jnp.ones(4)}
    masks = _nm.nm_masks_for(params)
    mk = masks['layers'][0]['kernel']
    x = jax.random.normal(jax.random.key(3), (5, 8))

    def loss(p):
        q = _nm.ste_apply(p, masks)
        return jnp.sum(jnp.sin(x @ q['layers'][0]['kernel']) * q['norm'])

    fwd = _nm.ste_apply(params, masks)['layers'][0]['kernel']
    np.testing.assert_array_equal(np.asarray(fwd), np.asarray(jnp.where(mk, w, 0.)))
    g = jax.grad(loss)(params)['layers'][0]['kernel']
    # Identity STE: the gradient w.r.t. dense W equals the gradient w.r.t. the masked weight.
    wm = jnp.where(mk, w, 0.)
    g_ref = jax.grad(lambda q: jnp.sum(jnp.sin(x @ q)))(wm)
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), rtol=1e-6, atol=1e-6)
    assert np.abs(np.asarray(g)[~np.asarray(mk)]).sum() > 0  # pruned weights receive gradient
    # apply_masks masks the gradient too.
    g_hard = jax.grad(
        lambda p: jnp.sum(jnp.sin(x @ _nm.apply_masks(p, masks)['layers'][0]['kernel'])))(params)
    assert np.abs(np.asarray(g_hard['layers'][0]['kernel'])[~np.asarray(mk)]).sum() == 0


def test_nm_masks_for_nnx_state_paths():
    from flax import nnx

    from jaxprune.models import _llama
    model = _llama.Llama(_llama.LlamaConfig.tiny(), rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    masks = _nm.nm_masks_for(params)
    paths = sorted(_nm.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(masks)[0])
    assert len(paths) == 2 * 7 and all(p.startswith('layers.') for p in paths)
    assert all(bool(_nm.is_nm(x)) for x in jax.tree.leaves(masks))
    masked = _nm.ste_apply(params, masks)
    assert jax.tree.structure(masked) == jax.tree.structure(params)
    assert 0.49 < float(_nm.mask_density(masks)) < 0.51
