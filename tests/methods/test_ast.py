"""AST recipe: training invariants on a tiny MLP, SLoRB, and optax conformance."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxprune.masks import _nm
from jaxprune.methods import _ast, _distill


def _mlp_params(dtype=jnp.float32):
    k = jax.random.split(jax.random.key(0), 3)
    return {'embed': {'embedding': jax.random.normal(k[0], (10, 8), dtype)},
            'layers': {0: {'up': {'kernel': jax.random.normal(k[1], (8, 16), dtype) / 3,
                                  'bias': jnp.zeros(16, dtype)},
                           'down': {'kernel': jax.random.normal(k[2], (16, 8), dtype) / 4}}}}


def _mlp(params, x):
    layer = params['layers'][0]
    h = jax.nn.gelu(x @ layer['up']['kernel'] + layer['up']['bias'])
    return h @ layer['down']['kernel']


def _data(seed=1):
    kx, kw = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (32, 8))
    return x, jnp.tanh(x @ jax.random.normal(kw, (8, 8)))


def _np_nm(w):
    a = np.abs(np.asarray(w, np.float64))
    g = a.reshape(-1, 4, a.shape[1])
    keep = np.zeros_like(g, bool)
    np.put_along_axis(keep, np.argsort(-g, axis=1, kind='stable')[:, :2], True, axis=1)
    return keep.reshape(a.shape)


def _train(tx, params, steps, x, y):
    def loss_fn(p, masks):
        return jnp.mean(jnp.square(_mlp(_ast.ast_forward_params(p, masks), x) - y))

    @jax.jit
    def step(p, state):
        masks = optax.tree.get(state, 'masks')
        loss, g = jax.value_and_grad(loss_fn)(p, masks)
        u, state = tx.update(g, state, p)
        return optax.apply_updates(p, u), state, loss, g

    state = tx.init(params)
    history = []
    for _ in range(steps):
        old_masks = state.masks
        new_params, state, loss, g = step(params, state)
        history.append((params, new_params, old_masks, state, float(loss), g))
        params = new_params
    return params, state, history


def test_ast_training_invariants():
    update_every = 3
    tx = _ast.ast(3e-2, update_every=update_every, decay=1e-2, decay_ramp_steps=4)
    x, y = _data()
    _, state, hist = _train(tx, _mlp_params(), 9, x, y)
    assert hist[-1][4] < hist[0][4]  # the sparse model learns
    for t, (p_old, p_new, old_masks, st, _, g) in enumerate(hist, start=1):
        masks = st.masks
        assert masks['embed']['embedding'] is None
        for name in ('up', 'down'):
            mk = np.asarray(masks['layers'][0][name]['kernel'])
            assert bool(_nm.is_nm(mk, n=2, m=4, axis=0))  # exact 2:4 along K, every step
            old = np.asarray(old_masks['layers'][0][name]['kernel'])
            if t % update_every == 0:
                # Recomputed from the post-update dense weights' magnitude.
                np.testing.assert_array_equal(mk, _np_nm(p_new['layers'][0][name]['kernel']))
            else:
                np.testing.assert_array_equal(mk, old)  # stable between recomputes
            # STE: pruned weights get gradient and are updated (dense training).
            gk = np.asarray(g['layers'][0][name]['kernel'])
            assert np.abs(gk[~old]).sum() > 0
            dw = np.asarray(p_new['layers'][0][name]['kernel'] - p_old['layers'][0][name]['kernel'])
            assert np.abs(dw[~old]).sum() > 0
        if t % update_every == 0:
            flips = sum((np.asarray(masks['layers'][0][nm]['kernel'])
                         != np.asarray(old_masks['layers'][0][nm]['kernel'])).sum()
                        for nm in ('up', 'down'))
            np.testing.assert_allclose(float(st.flip_rate), flips / (2 * 8 * 16), rtol=1e-6)
        assert 0.0 <= float(st.flip_rate) <= 1.0
    assert int(state.count) == 9


def test_ast_decay_shrinks_pruned_weights():
    x, y = _data()
    norms = {}
    for decay in (0.0, 5.0):
        tx = _ast.ast(1e-2, update_every=100, decay=decay, decay_ramp_steps=2)
        params, state, _ = _train(tx, _mlp_params(), 8, x, y)
        mk = np.asarray(state.masks['layers'][0]['up']['kernel'])
        norms[decay] = np.abs(np.asarray(params['layers'][0]['up']['kernel'])[~mk]).mean()
    w0 = _mlp_params()['layers'][0]['up']['kernel']
    mk0 = _np_nm(w0)
    # With decay the pruned weights shrink below both their start and the no-decay run.
    assert norms[5.0] < 0.7 * norms[0.0]
    assert norms[5.0] < np.abs(np.asarray(w0)[~mk0]).mean()


def test_ast_wanda_initial_mask():
    from jaxprune.scores import _wanda
    params = _mlp_params()
    act = {'layers.0.up.kernel': jnp.linspace(0.1, 3.0, 8),
           'layers.0.down.kernel': jnp.ones(16)}
    tx = _ast.ast(1e-3, decay_ramp_steps=0,
                  init_score_fn=lambda p: _wanda.wanda_scores(p, act_norms=act))
    state = tx.init(params)
    ref = _nm.nm_mask(jnp.abs(params['layers'][0]['up']['kernel']) * act['layers.0.up.kernel'][
        :, None])
    np.testing.assert_array_equal(np.asarray(state.masks['layers'][0]['up']['kernel']),
                                  np.asarray(ref))


# ---- SLoRB -------------------------------------------------------------------------------


@pytest.mark.parametrize('k', [4, 16])
def test_slorb_init_matches_reference(k):
    kw = jax.random.key(3)
    w = np.asarray(jax.random.normal(kw, (32, 5)))
    mask = np.asarray(_nm.nm_mask(np.abs(w)))
    s = np.asarray(_ast.slorb_init(w, mask, k=k))
    ref = np.zeros((32 // k, 5))
    for b in range(32 // k):
        for n in range(5):
            ref[b, n] = sum(w[i, n] * (1 - mask[i, n]) for i in range(b * k, b * k + k)) / k
    np.testing.assert_allclose(s, ref, rtol=1e-6, atol=1e-7)
    assert s.size == w.size // k  # +1/k parameters (6.25% for k=16)


@pytest.mark.parametrize('k', [4, 16])
def test_slorb_apply_function_preservation(k):
    kx, kw = jax.random.split(jax.random.key(4))
    x = jax.random.normal(kx, (2, 3, 32))
    w = jax.random.normal(kw, (32, 6))
    mask = _nm.nm_mask(jnp.abs(w))
    s = _ast.slorb_init(w, mask, k=k)
    y = x @ jnp.where(mask, w, 0.0) + _ast.slorb_apply(x, s, k=k)
    # Equivalent dense weight W*M + P^T S (P sums blocks of k input channels).
    px = np.asarray(x).reshape(2, 3, 32 // k, k).sum(-1)
    ref = np.asarray(x) @ np.where(mask, w, 0) + px @ np.asarray(s)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(y), np.asarray(x @ (jnp.where(mask, w, 0) + _ast.slorb_dense(s, k=k))),
        rtol=1e-5, atol=1e-5)
    # Pruned weights equal to c per block: the mean over all k rows (kept rows count as 0) is
    # c * (#pruned in the block) / k.
    c = jax.random.normal(jax.random.key(5), (32 // k, 6))
    w_c = jnp.where(mask, w, jnp.repeat(c, k, axis=0))
    pruned = (~mask).reshape(32 // k, k, 6).sum(1)
    np.testing.assert_allclose(np.asarray(_ast.slorb_init(w_c, mask, k=k)),
                               np.asarray(c * pruned / k), rtol=1e-5, atol=1e-6)


def test_slorb_init_is_least_squares():
    w = jax.random.normal(jax.random.key(6), (32, 4))
    mask = _nm.nm_mask(jnp.abs(w))
    s = _ast.slorb_init(w, mask, k=16)
    resid = jnp.where(mask, 0.0, w) - _ast.slorb_dense(s, k=16)
    # Normal equations of min_S ||W(1-M) - P^T S||_F: P resid = 0 (block sums vanish).
    np.testing.assert_allclose(np.asarray(resid.reshape(2, 16, 4).sum(1)), 0.0, atol=1e-5)
    tree = _ast.slorb_init_tree({'layers': {0: {'kernel': w}}, 'e': jnp.ones(3)},
                                {'layers': {0: {'kernel': mask}}, 'e': None}, k=16)
    assert tree['e'] is None and tree['layers'][0]['kernel'].shape == (2, 4)
    with pytest.raises(ValueError, match='divisible'):
        _ast.slorb_init(w[:24], mask[:24], k=16)
    with pytest.raises(ValueError, match='K // k'):
        _ast.slorb_apply(jnp.ones((2, 32)), jnp.ones((3, 4)), k=16)


# ---- conformance -------------------------------------------------------------------------


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_ast_conformance(dtype):
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     _ast.ast(1e-2, update_every=2, decay_ramp_steps=2))
    params = _mlp_params(dtype)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    abs_state = jax.eval_shape(tx.init, abstract)
    state = tx.init(params)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), abs_state) == jax.tree.map(
        lambda a: (a.shape, a.dtype), state)
    t0 = jax.tree.map(jax.typeof, state)
    update = jax.jit(tx.update)
    grads = jax.tree.map(lambda a: jnp.full_like(a, 0.1), params)
    for _ in range(4):
        u, state = update(grads, state, params)
        params = optax.apply_updates(params, u)
        assert jax.tree.map(jax.typeof, state) == t0  # masks' typeof stable across update
        assert all(a.dtype == dtype for a in jax.tree.leaves(params))
        assert all(np.isfinite(np.asarray(a, np.float32)).all() for a in jax.tree.leaves(params))
    masks = optax.tree.get(state, 'masks')
    assert all(bool(_nm.is_nm(mk)) for mk in jax.tree.leaves(masks))


def test_ast_inject_hyperparams():
    tx = optax.inject_hyperparams(_ast.ast, static_args=('n', 'm', 'update_every'))(
        learning_rate=1e-2, decay=6e-5, decay_ramp_steps=10, n=2, m=4, update_every=2)
    params = _mlp_params()
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    _, state = jax.jit(tx.update)(grads, state, params)
    state = optax.tree.set(state, learning_rate=1e-3)
    assert float(optax.tree.get(state, 'learning_rate')) == pytest.approx(1e-3)
    assert optax.tree.get(state, 'masks')['layers'][0]['up']['kernel'].dtype == jnp.bool_


@pytest.mark.slow  # compiles a (tiny) Llama forward+backward: ~30 s on 2 shared cores
def test_ast_on_tiny_llama_with_distillation():
    from flax import nnx

    from jaxprune.models import _llama
    model = _llama.Llama(_llama.LlamaConfig.tiny(), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    tx = _ast.ast(1e-3, decay_ramp_steps=2, update_every=1)
    state = tx.init(params)
    ids = jax.random.randint(jax.random.key(1), (2, 8), 0, 128)
    teacher = jax.lax.stop_gradient(nnx.merge(graphdef, params)(ids))

    @jax.jit
    def step(p, st):
        def loss_fn(p):
            logits = nnx.merge(graphdef, _ast.ast_forward_params(p, st.masks))(ids)
            return _distill.ast_loss(logits[:, :-1], teacher[:, :-1], ids[:, 1:])[0]
        loss, g = jax.value_and_grad(loss_fn)(p)
        u, st = tx.update(g, st, p)
        return optax.apply_updates(p, u), st, loss

    params, state, _ = step(params, state)
    masks = optax.tree.get(state, 'masks')
    sparse = [_nm.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(masks)[0]]
    assert len(sparse) == 14 and all(p.startswith('layers.') for p in sparse)
    assert all(bool(_nm.is_nm(mk)) for mk in jax.tree.leaves(masks))


def test_ast_multisteps_and_orbax_roundtrip(tmp_ckpt):
    import orbax.checkpoint as ocp

    tx = optax.MultiSteps(_ast.ast(1e-2, decay_ramp_steps=2, update_every=1), every_k_schedule=2)
    params = _mlp_params()
    state = tx.init(params)
    update = jax.jit(tx.update)
    grads = jax.tree.map(jnp.ones_like, params)
    masks0 = optax.tree.get(state, 'masks')
    _, state = update(grads, state, params)  # accumulation only: inner state untouched
    assert int(state.inner_opt_state.count) == 0
    for a, b in zip(jax.tree.leaves(masks0), jax.tree.leaves(optax.tree.get(state, 'masks'))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    _, state = update(grads, state, params)
    assert int(state.inner_opt_state.count) == 1  # one real AST update after 2 micro-steps
    with ocp.CheckpointManager(tmp_ckpt) as mngr:
        mngr.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
        mngr.wait_until_finished()
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        restored = mngr.restore(
            1, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))['state']
    assert jax.tree.structure(restored) == jax.tree.structure(state)  # None masks survive
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
