"""LoRA rank growth: salience reference, function unchanged at growth, caps, physical resize."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxprune.lora import _grow, _spec
from jaxprune.masks import _structured
from jaxprune.models import _llama

LORA = _spec.LoraSpec(rank=8, alpha=16.0, targets=r'.*\.(q_proj|v_proj|down_proj)')


def _toy_params(seed=0, k=5, n=3, r=4):
    rng = np.random.default_rng(seed)
    return {
        'layers': {
            i: {
                'q': {
                    'kernel': jnp.asarray(rng.normal(size=(k, n))),
                    'lora_a': jnp.asarray(rng.normal(size=(k, r))),
                    'lora_b': jnp.asarray(rng.normal(size=(r, n))),
                }
            }
            for i in range(4)
        }
    }


def test_rank_salience_matches_reference():
    params, grads = _toy_params(0), _toy_params(1)
    got = _grow.rank_salience(params, grads)
    assert set(got) == {('layers', i, 'q') for i in range(4)}
    for i in range(4):
        a = np.asarray(params['layers'][i]['q']['lora_a'])
        g = np.asarray(grads['layers'][i]['q']['lora_a'])
        want = [
            abs(sum(a[kk, j] * g[kk, j] for kk in range(a.shape[0]))) for j in range(a.shape[1])
        ]
        np.testing.assert_allclose(got[('layers', i, 'q')], want, rtol=1e-5)


def test_grow_ranks_top_half_capped():
    params = _toy_params(0, r=8)
    masks = _grow.init_rank_masks(params, 2)
    sal = {p: jnp.full((8,), float(i)) for i, p in enumerate(sorted(masks, key=str))}
    new_params, new_masks = _grow.grow_ranks(
        params, masks, sal, key=jax.random.key(0), factor=3.0, max_rank=5
    )
    ranks = [int(new_masks[p].sum()) for p in sorted(masks, key=str)]
    assert ranks == [2, 2, 5, 5]  # top half by salience, ceil(2 * 3) = 6 capped at 5
    for p in masks:
        b = np.asarray(new_params[p[0]][p[1]][p[2]]['lora_b'])
        fresh = (np.asarray(new_masks[p]) > 0) & (np.asarray(masks[p]) == 0)
        np.testing.assert_array_equal(b[fresh], 0.0)
        np.testing.assert_array_equal(
            b[~fresh], np.asarray(params[p[0]][p[1]][p[2]]['lora_b'])[~fresh]
        )
    with pytest.raises(ValueError):
        _grow.grow_ranks(params, masks, sal, key=jax.random.key(0), factor=0.5)


def _model_with_lora(seed=0):
    config = _llama.LlamaConfig.tiny()
    model = _llama.Llama(config, lora=LORA, rngs=nnx.Rngs(seed))
    # Non-zero B everywhere (also in inactive rows): growth must zero the rows it activates.
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.3 if getattr(p[-1], 'key', None) == 'lora_b' else x,
        nnx.state(model, nnx.Param),
    )
    nnx.update(model, params)
    return model, config


def _logits(model, config, masks):
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 100, (2, 6)))
    return model(
        ids, masks=_structured.to_model_masks({}, num_layers=config.num_layers, lora_masks=masks)
    )


@pytest.mark.parametrize('use_jit', [False, True])
def test_grow_ranks_keeps_function(use_jit):
    """Invariant (float32, atol 1e-6): logits right after growth equal logits before."""
    model, config = _model_with_lora()
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    masks = _grow.init_rank_masks(params, 2)
    before = _logits(model, config, masks)
    sal = {p: jnp.arange(8.0) * (i + 1) for i, p in enumerate(sorted(masks, key=str))}
    grow = lambda p, m, s: _grow.grow_ranks(p, m, s, key=jax.random.key(1), factor=2.0)
    if use_jit:
        grow = jax.jit(grow)
    new_params, new_masks = grow(params, masks, sal)
    assert _grow.tuning_params(new_params, new_masks) > _grow.tuning_params(params, masks)
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, new_params)
    nnx.update(model, state)
    np.testing.assert_allclose(_logits(model, config, new_masks), before, atol=1e-6, rtol=0)


def test_growth_factor_reaches_target():
    params = _toy_params(0, r=16)
    masks = _grow.init_rank_masks(params, 2)
    current = _grow.tuning_params(params, masks)
    factor = _grow.growth_factor(params, masks, 2 * current)
    sal = {p: jnp.full((16,), float(i)) for i, p in enumerate(sorted(masks, key=str))}
    _, new_masks = _grow.grow_ranks(params, masks, sal, key=jax.random.key(0), factor=factor)
    assert _grow.tuning_params(params, new_masks) == 2 * current


def test_resize_model_ranks_keeps_function():
    """Invariant (float32, atol 1e-5): physical rank change keeps the logits."""
    model, config = _model_with_lora()
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    masks = _grow.init_rank_masks(params, 3)
    before = _logits(model, config, masks)
    small, new_masks = _grow.resize_model_ranks(model, masks, 4, key=jax.random.key(2))
    assert all(m.shape == (4,) for m in new_masks.values())
    np.testing.assert_allclose(_logits(small, config, new_masks), before, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match='active ranks'):
        _grow.resize_ranks(params, masks, 2, key=jax.random.key(0))


def test_resize_ranks_rescale_keeps_scaled_product():
    params = _toy_params(0, r=8)
    masks = _grow.init_rank_masks(params, 3)
    new, _ = _grow.resize_ranks(params, masks, 4, key=jax.random.key(0))
    for i in range(4):
        old = params['layers'][i]['q']
        got = new['layers'][i]['q']
        # alpha / rank scale: (1/8) A[:, :3] B[:3] == (1/4) A'[:, :3] B'[:3]  (rtol 1e-5)
        np.testing.assert_allclose(
            got['lora_a'][:, :3] @ got['lora_b'][:3] / 4,
            old['lora_a'][:, :3] @ old['lora_b'][:3] / 8,
            rtol=1e-5,
        )


def test_resize_ranks_like_optimizer_state():
    params = _toy_params(0, r=8)
    masks = _grow.init_rank_masks(params, 3)
    masks = {p: m.at[5].set(1.0) for p, m in masks.items()}  # non-prefix active pattern
    tx = optax.adam(1e-2)
    state = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)[1]
    new_params, _ = _grow.resize_ranks(params, masks, 6, key=jax.random.key(0))
    new_state = _grow.resize_ranks_like(state, masks, 6)
    assert jax.tree.map(jnp.shape, new_state[0].mu) == jax.tree.map(jnp.shape, new_params)
    mu_old = np.asarray(state[0].mu['layers'][0]['q']['lora_b'])
    mu_new = np.asarray(new_state[0].mu['layers'][0]['q']['lora_b'])
    np.testing.assert_array_equal(mu_new[:4], mu_old[[0, 1, 2, 5]])
    np.testing.assert_array_equal(mu_new[4:], 0.0)
    np.testing.assert_array_equal(
        new_state[0].nu['layers'][1]['q']['kernel'], state[0].nu['layers'][1]['q']['kernel']
    )
    tx.update(jax.tree.map(jnp.ones_like, new_params), new_state, new_params)


@pytest.mark.parametrize('axis', [0, 1])
def test_move_active_matches_numpy_reference(axis):
    """Reference: numpy fancy indexing of the active components, then zero padding."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(6, 5) if axis == 0 else (5, 6)).astype(np.float32)
    mask = np.array([0.0, 1.0, 0.0, 0.4, 1.0, 0.0], np.float32)  # soft, non-prefix
    for bucket in (3, 4, 8):
        got = np.asarray(_grow.move_active(jnp.asarray(x), jnp.asarray(mask), axis=axis,
                                           bucket=bucket))
        kept = np.take(x, np.flatnonzero(mask > 0), axis=axis)
        pad = [(0, 0), (0, 0)]
        pad[axis] = (0, bucket - 3)
        np.testing.assert_array_equal(got, np.pad(kept, pad))


def test_normal_draw_equals_a_direct_draw():
    """The padded draw's first rows are the values of a draw at the asked shape."""
    key = jax.random.key(7)
    for rows in (1, 3, 4, 5, 12):
        got = _grow._normal(key, (rows, 6), jnp.float32)
        assert got.shape[0] >= rows and got.shape[0] & (got.shape[0] - 1) == 0
        np.testing.assert_array_equal(got[:rows], jax.random.normal(key, (rows, 6)))


def test_resize_ranks_fresh_slots_are_scaled_normal_draws():
    """Slots past the active ranks: ``A = N(0, 1) / sqrt(fan_in)`` drawn per adapter, ``B = 0``."""
    params = _toy_params(0, r=8)
    masks = _grow.init_rank_masks(params, 3)
    key = jax.random.key(4)
    new, new_masks = _grow.resize_ranks(params, masks, 6, key=key)
    for i, path in enumerate(sorted(masks, key=str)):
        got = new[path[0]][path[1]][path[2]]
        want = jax.random.normal(jax.random.fold_in(key, i), (5, 6)) / np.sqrt(5)
        np.testing.assert_allclose(got['lora_a'][:, 3:], want[:, 3:], rtol=1e-6)
        np.testing.assert_array_equal(got['lora_b'][3:], 0.0)
        np.testing.assert_array_equal(new_masks[path], [1, 1, 1, 0, 0, 0])
