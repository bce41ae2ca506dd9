"""APT salience: reference loops, tap gradients vs finite differences, outlier term."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune.models import _structures as structures_lib
from jaxprune.scores import _apt

Slice = structures_lib.Slice
Structure = structures_lib.Structure


G, QPK, HD, F, D, L = 2, 2, 3, 5, 4, 2


def _structures():
    out = []
    for layer in range(L):
        o = Slice(('layers', layer, 'attn', 'o_proj', 'kernel'), 0, QPK * HD)
        d = Slice(('layers', layer, 'mlp', 'down_proj', 'kernel'), 0, 1)
        out.append(Structure('heads', layer, G, 7, (o,)))
        out.append(Structure('mlp', layer, F, 3, (d,)))
    out.append(Structure('hidden', None, D, 11, ()))
    return tuple(out)


def _acts_and_grads(key, b=2, t=3):
    acts, grads = [], []
    sizes = {'attn_ctx': G * QPK * HD, 'mlp': F, 'resid': D}
    for layer in range(L):
        a, g = {}, {}
        for i, (site, c) in enumerate(sizes.items()):
            k1, k2 = jax.random.split(jax.random.fold_in(key, 10 * layer + i))
            a[site] = jnp.abs(jax.random.normal(k1, (c,)))
            g[site] = jax.random.normal(k2, (b, t, c))
        acts.append(a)
        grads.append(g)
    return tuple(acts), tuple(grads)


def test_salience_from_taps_matches_reference():
    acts, grads = _acts_and_grads(jax.random.key(0))
    got = _apt.salience_from_taps(acts, grads, _structures())
    a = jax.tree.map(np.asarray, acts)
    g = jax.tree.map(np.asarray, grads)
    # Plain per-channel loops (tolerance: float32 summation order, rtol 1e-5).
    for layer in range(L):
        want = np.zeros(G)
        for group in range(G):
            for c in range(group * QPK * HD, (group + 1) * QPK * HD):
                want[group] += a[layer]['attn_ctx'][c] * np.abs(g[layer]['attn_ctx'][:, :, c]).sum()
        np.testing.assert_allclose(got[('heads', layer)], want, rtol=1e-5)
        want = [a[layer]['mlp'][j] * np.abs(g[layer]['mlp'][:, :, j]).sum() for j in range(F)]
        np.testing.assert_allclose(got[('mlp', layer)], want, rtol=1e-5)
    want = sum(
        np.array([a[ly]['resid'][j] * np.abs(g[ly]['resid'][:, :, j]).sum() for j in range(D)])
        for ly in range(L)
    )
    np.testing.assert_allclose(got[('hidden', None)], want, rtol=1e-5)
    assert set(got) == {(s.kind, s.layer) for s in _structures()}


def test_salience_from_taps_rejects_mismatched_width():
    acts, grads = _acts_and_grads(jax.random.key(0))
    bad = (Structure('heads', 0, 5, 1, ()),)
    with pytest.raises(ValueError, match='not a multiple'):
        _apt.salience_from_taps(acts, grads, bad)


def _toy_loss(w1, w2, x, tap):
    h = jnp.tanh(x @ w1) + tap
    return jnp.sum(jnp.sin(h @ w2) ** 2)


def test_tap_gradient_is_dl_dh_finite_difference():
    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    w1 = jax.random.normal(k1, (3, 4))
    w2 = jax.random.normal(k2, (4, 2))
    x = jax.random.normal(k3, (2, 5, 3))
    tap = jnp.zeros((2, 5, 4))
    grad = jax.grad(_toy_loss, argnums=3)(w1, w2, x, tap)
    eps = 1e-2
    for idx in [(0, 0, 0), (1, 3, 2), (0, 4, 3)]:
        e = jnp.zeros_like(tap).at[idx].set(eps)
        fd = (_toy_loss(w1, w2, x, tap + e) - _toy_loss(w1, w2, x, tap - e)) / (2 * eps)
        # Central difference in float32: error O(eps^2) plus rounding; atol 2e-3.
        np.testing.assert_allclose(grad[idx], fd, atol=2e-3)


def _kurtosis_np(x):
    x = np.asarray(x, np.float64)
    c = x - x.mean()
    return (c**4).mean() / (c**2).mean() ** 2 - 3.0


def test_outlier_scores_matches_reference():
    acts, _ = _acts_and_grads(jax.random.key(2))
    params = {'layers': {}}
    for layer in range(L):
        k1, k2 = jax.random.split(jax.random.key(10 + layer))
        params['layers'][layer] = {
            'attn': {'o_proj': {'kernel': jax.random.normal(k1, (G * QPK * HD, D))}},
            'mlp': {'down_proj': {'kernel': jax.random.t(k2, 2.0, (F, D))}},
        }
    got = _apt.outlier_scores(params, acts, _structures())
    for layer in range(L):
        w = np.abs(np.asarray(params['layers'][layer]['attn']['o_proj']['kernel']))
        o = w * np.asarray(acts[layer]['attn_ctx'])[:, None]
        want = [
            np.sqrt(max(_kurtosis_np(o[g * QPK * HD : (g + 1) * QPK * HD]), 0.0)) for g in range(G)
        ]
        np.testing.assert_allclose(got[('heads', layer)], want, rtol=1e-4)
        w = np.abs(np.asarray(params['layers'][layer]['mlp']['down_proj']['kernel']))
        want = [np.sqrt(max(_kurtosis_np(w[j]), 0.0)) for j in range(F)]
        np.testing.assert_allclose(got[('mlp', layer)], want, rtol=1e-4)
    np.testing.assert_array_equal(got[('hidden', None)], np.zeros(D))


def test_outlier_scores_rewards_heavy_tails():
    # One row with a single huge entry (kurtosis ~ D - 3) beats a flat row (kurtosis < 0 -> 0).
    kernel = jnp.ones((F, 16)).at[0, 3].set(100.0)
    params = {'layers': {0: {'mlp': {'down_proj': {'kernel': kernel}}}}}
    acts = ({'mlp': jnp.ones((F,))},)
    s = Structure('mlp', 0, F, 1, (Slice(('layers', 0, 'mlp', 'down_proj', 'kernel'), 0, 1),))
    got = _apt.outlier_scores(params, acts, (s,))[('mlp', 0)]
    assert got[0] > 3.0
    np.testing.assert_array_equal(got[1:], 0.0)


def test_apt_salience_adds_outlier_and_density_divides():
    acts, grads = _acts_and_grads(jax.random.key(3))
    with pytest.raises(ValueError, match='params'):
        _apt.apt_salience(acts, grads, _structures(), outlier=True)
    base = _apt.apt_salience(acts, grads, _structures())
    dens = _apt.salience_density(base, _structures())
    for s in _structures():
        np.testing.assert_allclose(
            dens[(s.kind, s.layer)], base[(s.kind, s.layer)] / s.params_per_unit
        )


def test_salience_zero_for_masked_units_tiny_llama():
    """Invariant on the real model: masked units get exactly zero salience, others positive."""
    from flax import nnx

    from jaxprune.masks import _structured
    from jaxprune.models import _llama, _structures

    config = _llama.LlamaConfig.tiny()
    model = _llama.Llama(config, rngs=nnx.Rngs(0))
    structs = _structures.structures(config)
    unit = {(s.kind, s.layer): jnp.ones((s.size,)) for s in structs}
    unit[('heads', 0)] = unit[('heads', 0)].at[1].set(0.0)
    unit[('mlp', 1)] = unit[('mlp', 1)].at[jnp.array([0, 5, 7])].set(0.0)
    unit[('hidden', None)] = unit[('hidden', None)].at[3].set(0.0)
    masks = _structured.to_model_masks(unit, num_layers=config.num_layers, q_per_kv=config.q_per_kv)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 6)))
    taps = _llama.make_taps(config, *ids.shape)

    @jax.jit
    def run(taps):
        def loss(taps):
            logits, acts = model(ids, masks=masks, taps=taps)
            return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0]), acts

        (_, acts), grads = jax.value_and_grad(loss, has_aux=True)(taps)
        return acts, grads

    acts, grads = run(taps)
    sal = _apt.salience_from_taps(acts, grads, structs)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    bonus = _apt.outlier_scores(params, acts, structs)
    for key, m in unit.items():
        s = np.asarray(sal[key])
        np.testing.assert_array_equal(s[np.asarray(m) == 0], 0.0)
        assert np.all(s[np.asarray(m) == 1] > 0), key
        assert np.all(np.isfinite(np.asarray(bonus[key])))
