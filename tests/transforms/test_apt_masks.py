"""APT mask transform: reference loop, hard masks at pruning steps, no revival, optax plumbing."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxprune.masks import _budget
from jaxprune.models import _structures as structures_lib
from jaxprune.schedules import _apt as schedules
from jaxprune.transforms import _apt_masks

Slice = structures_lib.Slice
Structure = structures_lib.Structure


def toy(layers=2, groups=2, qpk=2, hd=2, ffn=3, d=4):
    """Llama-shaped structures over a plain params dict (stand-in for models.structures)."""
    params = {'embed': jnp.zeros((5, d))}
    structs, hidden = [], [Slice(('embed',), 1, 1)]
    for ly in range(layers):
        h = groups * qpk * hd
        params[f'q{ly}'] = jnp.zeros((d, h))
        params[f'o{ly}'] = jnp.zeros((h, d))
        params[f'up{ly}'] = jnp.zeros((d, ffn))
        params[f'down{ly}'] = jnp.zeros((ffn, d))
        hidden += [
            Slice((f'q{ly}',), 0, 1),
            Slice((f'o{ly}',), 1, 1),
            Slice((f'up{ly}',), 0, 1),
            Slice((f'down{ly}',), 1, 1),
        ]
        structs.append(
            Structure(
                'heads',
                ly,
                groups,
                2 * d * qpk * hd,
                (Slice((f'q{ly}',), 1, qpk * hd), Slice((f'o{ly}',), 0, qpk * hd)),
            )
        )
        structs.append(
            Structure(
                'mlp', ly, ffn, 2 * d, (Slice((f'up{ly}',), 1, 1), Slice((f'down{ly}',), 0, 1))
            )
        )
    structs.append(
        Structure('hidden', None, d, 5 + layers * (2 * groups * qpk * hd + 2 * ffn), tuple(hidden))
    )
    return tuple(structs), params


def _salience(structs, seed):
    rng = np.random.default_rng(seed)
    return {(s.kind, s.layer): jnp.asarray(rng.random(s.size) + 0.01, jnp.float32) for s in structs}


def reference(structs, params, saliences, density_fn, steps, beta=0.85, eta=0.01):
    """Plain python loop of the APT mask update."""
    keys = [(s.kind, s.layer) for s in structs]
    masks = {k: np.ones(s.size) for k, s in zip(keys, structs)}
    alive = {k: np.ones(s.size, bool) for k, s in zip(keys, structs)}
    ema = None
    for t, sal in enumerate(saliences, start=1):
        sal = {k: np.asarray(v, np.float64) for k, v in sal.items()}
        ema = sal if ema is None else {k: beta * ema[k] + (1 - beta) * sal[k] for k in keys}
        dens = {
            k: jnp.asarray(ema[k] / s.params_per_unit, jnp.float32) for k, s in zip(keys, structs)
        }
        target = _budget.budget_keep(
            dens,
            structs,
            params,
            density_fn(t),
            eligible={k: jnp.asarray(v) for k, v in alive.items()},
        )
        for k in keys:
            keep = np.asarray(target[k]) & alive[k]
            if t in steps:
                masks[k] = keep.astype(float)
                alive[k] = keep
            else:
                masks[k] = np.clip(masks[k] + np.where(keep, eta, -eta), 0, 1) * alive[k]
    return masks, alive


@pytest.mark.parametrize('use_jit', [False, True])
def test_apt_masks_matches_reference(use_jit):
    structs, params = toy()
    steps = (3, 6)
    density = schedules.stepwise_density(0.5, steps)
    tx = _apt_masks.apt_masks(
        structs, params, density_schedule=density, pruning_steps=steps, step_size=0.2
    )
    state = tx.init(params)
    update = jax.jit(tx.update) if use_jit else tx.update
    sals = [_salience(structs, i) for i in range(8)]
    for sal in sals:
        _, state = update(params, state, params, salience=sal)
    want_masks, want_alive = reference(structs, params, sals, density, steps, eta=0.2)
    for k in want_masks:
        # float32 vs float64 mask arithmetic: atol 1e-6.
        np.testing.assert_allclose(state.masks[k], want_masks[k], atol=1e-6)
        np.testing.assert_array_equal(state.alive[k], want_alive[k])
    assert int(state.count) == 8


def test_apt_masks_hard_at_pruning_step_and_fits_budget():
    structs, params = toy()
    steps = (4,)
    tx = _apt_masks.apt_masks(structs, params, density_schedule=0.5, pruning_steps=steps)
    state = tx.init(params)
    for i in range(4):
        _, state = tx.update(params, state, params, salience=_salience(structs, i))
        values = np.concatenate([np.asarray(m) for m in state.masks.values()])
        if i < 3:
            assert np.all((values > 0) & (values <= 1))  # soft: nothing reached 0 yet
    assert set(np.unique(values)) <= {0.0, 1.0}
    keep = {k: m > 0 for k, m in state.masks.items()}
    total = _budget.total_prunable_params(structs, params)
    assert int(_budget.kept_param_count(keep, structs, params)) <= 0.5 * total


def test_apt_masks_never_revive():
    structs, params = toy()
    tx = _apt_masks.apt_masks(
        structs, params, density_schedule=0.4, pruning_steps=(1,), step_size=0.5
    )
    state = tx.init(params)
    _, state = tx.update(params, state, params, salience=_salience(structs, 0))
    dead = {k: ~np.asarray(a) for k, a in state.alive.items()}
    assert sum(d.sum() for d in dead.values()) > 0
    # Dead units become by far the most salient, and the budget loosens to 1: still 0.
    boosted = {k: jnp.where(dead[k], 1e6, 1e-3) for k in dead}
    tx = _apt_masks.apt_masks(
        structs, params, density_schedule=1.0, pruning_steps=(5,), step_size=0.5
    )
    for _ in range(5):
        _, state = tx.update(params, state, params, salience=boosted)
        for k in dead:
            np.testing.assert_array_equal(np.asarray(state.masks[k])[dead[k]], 0.0)
            assert not np.asarray(state.alive[k])[dead[k]].any()


def test_apt_masks_optax_plumbing():
    structs, params = toy()
    tx = optax.chain(
        _apt_masks.apt_masks(structs, params, density_schedule=0.6, pruning_steps=(2,)),
        optax.adamw(1e-3),
    )
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    abstract_state = jax.eval_shape(tx.init, abstract)
    state = tx.init(params)
    assert jax.tree.structure(abstract_state) == jax.tree.structure(state)
    grads = jax.tree.map(jnp.ones_like, params)
    step = jax.jit(lambda g, s, p, sal: tx.update(g, s, p, salience=sal))
    _, state2 = step(grads, state, params, _salience(structs, 0))
    assert jax.tree.map(jnp.shape, state2) == jax.tree.map(jnp.shape, state)
    masks = optax.tree.get(state2, 'masks')
    assert set(masks) == {(s.kind, s.layer) for s in structs}
    with pytest.raises(ValueError, match='salience lacks'):
        tx.update(grads, state, params, salience={})


def test_apt_masks_without_salience_keeps_ema():
    structs, params = toy()
    tx = _apt_masks.apt_masks(structs, params, density_schedule=0.6, pruning_steps=(9,))
    state = tx.init(params)
    _, s1 = tx.update(params, state, params, salience=_salience(structs, 0))
    _, s2 = tx.update(params, s1, params)
    for k in s1.salience_ema:
        np.testing.assert_array_equal(s1.salience_ema[k], s2.salience_ema[k])


def test_apt_masks_inject_hyperparams_and_multisteps():
    structs, params = toy()
    steps = (2,)
    tx = optax.inject_hyperparams(_apt_masks.apt_masks, static_args=('pruning_steps',))(
        structs, params, density_schedule=0.5, pruning_steps=steps, step_size=0.1
    )
    state = tx.init(params)
    _, state = jax.jit(lambda s, sal: tx.update(params, s, params, salience=sal))(
        state, _salience(structs, 0)
    )
    assert float(state.hyperparams['step_size']) == pytest.approx(0.1)
    assert optax.tree.get(state, 'masks') is not None
    multi = optax.MultiSteps(
        _apt_masks.apt_masks(structs, params, density_schedule=0.5, pruning_steps=steps), 2
    )
    mstate = multi.init(params)
    for i in range(4):
        _, mstate = multi.update(params, mstate, params, salience=_salience(structs, i))
    assert int(optax.tree.get(mstate, 'count')) == 2  # inner transform ran every 2nd call


def test_apt_masks_sharding_stable():
    """jax.typeof of the state is unchanged by a jitted update on an 8-device mesh."""
    structs, params = toy()
    mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    tx = _apt_masks.apt_masks(structs, params, density_schedule=0.5, pruning_steps=(3,))
    state = jax.device_put(tx.init(params), rep)
    sal = jax.device_put(_salience(structs, 0), rep)
    new = jax.jit(lambda s, sal: tx.update(params, s, params, salience=sal)[1])(state, sal)
    assert jax.tree.map(jax.typeof, new) == jax.tree.map(jax.typeof, state)
    assert jax.tree.map(lambda x: x.sharding, new) == jax.tree.map(lambda x: x.sharding, state)


def test_to_model_masks_layout():
    from jaxprune.masks import _structured

    unit = {
        ('heads', 0): jnp.array([1.0, 0.0]),
        ('mlp', 1): jnp.array([0.0, 1.0, 1.0]),
        ('hidden', None): jnp.array([1.0, 0.5]),
    }
    lora = {('layers', 1, 'attn', 'q_proj'): jnp.array([1.0, 0.0])}
    got = _structured.to_model_masks(unit, num_layers=2, q_per_kv=2, lora_masks=lora)
    np.testing.assert_array_equal(got['layers'][0]['heads'], [1, 1, 0, 0])
    np.testing.assert_array_equal(got['layers'][1]['mlp'], [0, 1, 1])
    np.testing.assert_array_equal(got['layers'][1]['lora']['q_proj'], [1, 0])
    np.testing.assert_array_equal(got['hidden'], [1, 0.5])
    assert 'mlp' not in got['layers'][0] and 'heads' not in got['layers'][1]
    with pytest.raises(ValueError, match='layers'):
        _structured.to_model_masks({}, num_layers=1, lora_masks={('lm_head',): jnp.ones(2)})
    hard = _structured.binarize(unit)
    np.testing.assert_array_equal(hard[('hidden', None)], [1, 1])
    assert bool(_structured.keep_from_masks(unit)[('heads', 0)][0])
