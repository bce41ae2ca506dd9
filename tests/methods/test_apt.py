"""APT recipe: loss vs reference, salience in one pass, and an end-to-end tiny Llama run."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxprune import surgery
from jaxprune.lora import _spec
from jaxprune.masks import _budget, _structured
from jaxprune.methods import _apt
from jaxprune.models import _llama, _structures
from jaxprune.scores import _apt as apt_scores

LORA = _spec.LoraSpec(rank=4, alpha=8.0, targets=r'.*\.(q_proj|v_proj)')


def _np_kl(s, t, temp):
    ls = s / temp - np.log(np.exp(s / temp).sum(-1, keepdims=True))
    lt = t / temp - np.log(np.exp(t / temp).sum(-1, keepdims=True))
    return (np.exp(lt) * (lt - ls)).sum(-1).mean() * temp**2


def test_apt_loss_matches_reference():
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(2, 3, 7)), rng.normal(size=(2, 3, 7))
    hs, ht = [rng.normal(size=(2, 3, 4))], [rng.normal(size=(2, 3, 4))]
    proj = _apt.init_projections(1, 4)
    loss, aux = _apt.apt_loss(
        jnp.float32(1.5),
        s,
        t,
        mu=0.25,
        temperature=2.0,
        student_hiddens=hs,
        teacher_hiddens=ht,
        projections=proj,
    )
    kl = _np_kl(s, t, 2.0)
    mse = ((hs[0] - ht[0]) ** 2).mean()
    # float32 vs float64: rtol 1e-5.
    np.testing.assert_allclose(aux['kl'], kl, rtol=1e-5)
    np.testing.assert_allclose(aux['hidden'], mse, rtol=1e-5)
    np.testing.assert_allclose(loss, 0.25 * (kl + mse) + 0.75 * 1.5, rtol=1e-5)
    with pytest.raises(ValueError, match='teacher_hiddens'):
        _apt.apt_loss(0.0, s, t, mu=0.5, student_hiddens=hs)


def test_prune_projections_and_teacher_snapshot():
    proj = [{'kernel': jnp.arange(16.0).reshape(4, 4)}]
    got = _apt.prune_projections(proj, np.array([1, 0, 1, 0], bool))
    np.testing.assert_array_equal(got[0]['kernel'], [[0.0, 2.0], [8.0, 10.0]])
    # An unpruned teacher keeps its side: rows (student dims) only, twice in a row.
    once = _apt.prune_projections(proj, np.array([1, 0, 1, 1], bool), teacher_side=False)
    np.testing.assert_array_equal(once[0]['kernel'], np.arange(16.0).reshape(4, 4)[[0, 2, 3]])
    twice = _apt.prune_projections(once, np.array([0, 1, 1], bool), teacher_side=False)
    np.testing.assert_array_equal(twice[0]['kernel'], np.arange(16.0).reshape(4, 4)[[2, 3]])
    np.testing.assert_array_equal(_apt.init_projections(1, 2, teacher_size=3)[0]['kernel'],
                                  np.eye(2, 3))
    params = {'q': {'kernel': jnp.ones(2), 'lora_a': jnp.ones(2), 'lora_b': jnp.zeros(2)}}
    snap = _apt.teacher_snapshot(params)
    assert snap['q']['kernel'] is None
    moved = {'q': {**params['q'], 'lora_b': jnp.full(2, 5.0)}}
    teacher = _apt.teacher_params(moved, snap)
    np.testing.assert_array_equal(teacher['q']['lora_b'], 0.0)
    np.testing.assert_array_equal(teacher['q']['kernel'], 1.0)


def _setup(seed=0):
    config = _llama.LlamaConfig.tiny()
    model = _llama.Llama(config, lora=LORA, rngs=nnx.Rngs(seed))
    ids = jnp.asarray(np.random.default_rng(seed).integers(0, 128, (2, 8)))
    return config, model, ids


def _loss_fn(graphdef, rest, config, ids, masks):
    def loss_fn(lora, taps):
        model = nnx.merge(graphdef, lora, rest)
        logits, acts = model(ids, masks=masks, taps=taps)
        labels = jnp.concatenate([ids[:, 1:], jnp.full((ids.shape[0], 1), -100)], axis=1)
        logp = jax.nn.log_softmax(logits, -1)
        valid = labels != -100
        nll = -jnp.take_along_axis(logp, jnp.where(valid, labels, 0)[..., None], -1)[..., 0]
        return jnp.sum(nll * valid) / jnp.sum(valid), (acts, logits)

    return loss_fn


def test_value_grads_and_salience_matches_reference():
    config, model, ids = _setup()
    structs = _structures.structures(config, lora=LORA)
    graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
    taps = _llama.make_taps(config, *ids.shape)
    loss_fn = _loss_fn(graphdef, rest, config, ids, None)
    loss, grads, sal, _ = jax.jit(_apt.value_grads_and_salience, static_argnums=(0, 3))(
        loss_fn, lora, taps, structs
    )
    # Reference: separate passes for the tap gradient and the acts.
    (_, (acts, _)) = jax.jit(loss_fn)(lora, taps)
    tap_grads = jax.jit(jax.grad(lambda t: loss_fn(lora, t)[0]))(taps)
    want = apt_scores.salience_from_taps(acts, tap_grads, structs)
    for k in want:
        np.testing.assert_allclose(sal[k], want[k], rtol=1e-5)
    np.testing.assert_allclose(loss, jax.jit(loss_fn)(lora, taps)[0], rtol=1e-6)
    assert jax.tree.structure(grads) == jax.tree.structure(lora)


@pytest.mark.slow
def test_apt_end_to_end_tiny_llama():
    """Two pruning steps: budget met, pruned == masked logits at each step (atol 1e-5)."""
    config, model, ids = _setup()
    structs = _structures.structures(config, lora=LORA)
    full = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    total0 = _budget.total_prunable_params(structs, full)
    largest_unit = max(s.params_per_unit for s in structs)
    steps = (2, 4)

    def make_tx(st, p):
        return _apt.apt(
            1e-2,
            structures=st,
            shapes_or_params=p,
            target_density=0.6,
            total_steps=6,
            pruning_steps=steps,
            step_size=0.3,
            budget_base=total0,
        )

    tx = make_tx(structs, full)
    graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
    opt_state = tx.init(lora)
    for step in range(1, 6):
        unit_masks = optax.tree.get(opt_state, 'masks')
        masks = _structured.to_model_masks(
            unit_masks, num_layers=config.num_layers, q_per_kv=config.q_per_kv
        )
        taps = _llama.make_taps(config, *ids.shape)
        loss_fn = _loss_fn(graphdef, rest, config, ids, masks)
        _, grads, sal, _ = jax.jit(_apt.value_grads_and_salience, static_argnums=(0, 3))(
            loss_fn, lora, taps, structs
        )
        updates, opt_state = tx.update(grads, opt_state, lora, salience=sal)
        lora = optax.apply_updates(lora, updates)
        if step in steps:
            model = nnx.merge(graphdef, lora, rest)
            hard = optax.tree.get(opt_state, 'masks')
            assert all(set(np.unique(np.asarray(m))) <= {0.0, 1.0} for m in hard.values())
            masked = model(
                ids,
                masks=_structured.to_model_masks(
                    hard, num_layers=config.num_layers, q_per_kv=config.q_per_kv
                ),
            )
            full = nnx.to_pure_dict(nnx.state(model, nnx.Param))
            config, full, opt_state, _ = _apt.after_pruning_step(config, full, opt_state, structs)
            model = surgery.rebuild_model(model, config, full)
            np.testing.assert_allclose(model(ids), masked, atol=1e-5, rtol=0)
            structs = _structures.structures(config, lora=LORA)
            tx = make_tx(structs, full)
            graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
            assert jax.tree.map(jnp.shape, opt_state[1][0].mu) == jax.tree.map(jnp.shape, lora)
    final = _budget.total_prunable_params(structs, full)
    # Budget met relative to the original model, and not over-pruned by more than one unit.
    assert 0.6 * total0 - largest_unit <= final <= 0.6 * total0
