"""Tests for ATP's alternating steps (jaxprune.methods._atp) on a stand-in loss and a tiny Llama."""

import functools

import disp_masks
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxprune.masks import _density, _gumbel
from jaxprune.methods import _atp
from jaxprune.scores import _atp_generator
from jaxprune.transforms import _group_lasso

TOY = {'num_layers': 2, 'hidden_size': 8, 'num_heads': 2, 'num_kv_heads': 2, 'head_dim': 4,
       'intermediate_size': 12}


def _importance(dims, seed=0):
    rng = np.random.default_rng(seed)
    return {'layers': tuple(
        {n: jnp.asarray(rng.exponential(1.0, s), jnp.float32)
         for n, s in d.group_sizes().items()} for d in dims)}


def _toy_loss(trainable, frozen, masks, batch, *, lora_aware):
    """Task stand-in: importance-weighted share of pruned units (plus a LoRA fit term)."""
    del batch, lora_aware
    losses = jax.tree.map(lambda m, w: jnp.sum((1.0 - m) * w) / jnp.sum(w), masks, frozen)
    fit = jnp.sum((trainable['w'] - 1.0) ** 2)
    return sum(jax.tree.leaves(losses)) + fit


def _gen_setup(cfg, lr=0.1):
    dims = _density.layer_dims(cfg)
    gen = _atp_generator.generator_init(jax.random.key(0), _atp_generator.mask_groups(cfg),
                                        width=16, num_layers=1, num_heads=2)
    tx = optax.adam(lr)
    return dims, gen, tx, tx.init(gen)


def test_generator_step_moves_density_to_target_and_lowers_loss():
    """80 generator steps: density ~0.9 (bias 3) -> within 0.05 of 0.5; mean loss of the last
    10 steps below the first 10 (stochastic, seeded)."""
    dims, gen, tx, opt = _gen_setup(TOY)
    frozen = _importance(dims)
    trainable = {'w': jnp.zeros(3)}
    step = jax.jit(functools.partial(
        _atp.generator_step, loss_fn=_toy_loss, tx=tx, dims=dims, target_density=0.5,
        reg_weight=5.0))
    logs = []
    for i in range(80):
        gen, opt, metrics = step(gen, opt, trainable, frozen, None, jax.random.key(i))
        logs.append(jax.tree.map(float, metrics))
    first, last = logs[:10], logs[-10:]
    assert set(logs[0]) == {'loss', 'task_loss', 'density', 'reg'}
    np.testing.assert_allclose(logs[0]['loss'], logs[0]['task_loss'] + 5.0 * logs[0]['reg'],
                               rtol=1e-6)
    assert first[0]['density'] > 0.8
    assert abs(np.mean([m['density'] for m in last]) - 0.5) < 0.05
    assert np.mean([m['loss'] for m in last]) < np.mean([m['loss'] for m in first])
    exported = _atp.atp_export_masks(gen)
    assert abs(float(_density.density(exported, dims)) - 0.5) < 0.15
    # the generator learned which units matter: kept units are the more important ones
    imp = np.concatenate([np.asarray(v) for v in jax.tree.leaves(frozen)])
    kept = np.concatenate([np.asarray(v) for v in jax.tree.leaves(exported)]) > 0
    assert imp[kept].mean() > imp[~kept].mean()


def test_generator_step_rejects_bad_target():
    dims, gen, tx, opt = _gen_setup(TOY)
    with pytest.raises(ValueError, match='target_density'):
        _atp.generator_step(gen, opt, {'w': jnp.zeros(3)}, _importance(dims), None,
                            jax.random.key(0), loss_fn=_toy_loss, tx=tx, dims=dims,
                            target_density=1.5)


def _reference_prior(importance, dims, groups, target, batches, sharpness, cap):
    """numpy: |sum_b dL/dm| of the toy loss, per parameter, cut by a linear scan of prefixes."""
    cost = {(g.layer, g.name): g.params_per_unit for g in groups}
    log_density = {'layers': tuple(
        {n: np.log(batches * np.asarray(x, np.float64) / np.sum(x) / cost[(layer, n)] + 1e-30)
         for n, x in lm.items()}
        for layer, lm in enumerate(importance['layers']))}
    cut, _ = disp_masks.reference_projection(log_density, dims, target, 0.0)
    flat = np.concatenate([x.ravel() for x in jax.tree.leaves(log_density)])
    kept = np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(cut)]) > 0.5
    theta = 0.5 * (flat[kept].min() + flat[~kept].max())
    return [np.clip(sharpness * (x - theta), -cap, cap) for x in jax.tree.leaves(log_density)], cut


@pytest.mark.parametrize('target,sharpness', [(0.5, 2.0), (0.75, 0.5)])
def test_taylor_prior_matches_reference(target, sharpness):
    """The prior on the toy loss (dL/dm_u = -w_u / sum w, exactly) equals a numpy reference with
    a brute-force budget cut (rtol 1e-5); its positive logits are exactly that cut."""
    dims = _density.layer_dims(TOY)
    groups = _atp_generator.mask_groups(TOY)
    frozen = _importance(dims, seed=3)
    got = _atp.taylor_prior({'w': jnp.zeros(3)}, frozen, [None] * 3, loss_fn=_toy_loss,
                            dims=dims, groups=groups, target_density=target, criterion='mask',
                            sharpness=sharpness,
                            cap=6.0)
    want, cut = _reference_prior(frozen, dims, groups, target, 3, sharpness, 6.0)
    for g, w in zip(jax.tree.leaves(got), want, strict=True):
        np.testing.assert_allclose(np.asarray(g), w, rtol=1e-5, atol=1e-5)
    for g, c in zip(jax.tree.leaves(got), jax.tree.leaves(cut), strict=True):
        np.testing.assert_array_equal(np.asarray(g) > 0, np.asarray(c) > 0.5)
    assert disp_masks.reference_kept(cut, dims) <= target * _density.prunable_params(dims)
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(got)) <= 6.0


def _random_llama_params(cfg, seed):
    rng = np.random.default_rng(seed)
    layers = {}
    for layer, d in enumerate(_density.layer_dims(cfg)):
        shapes = d.kernel_shapes()
        layers[layer] = {
            block: {p: {'kernel': rng.normal(size=shapes[p])} for p in projs}
            for block, projs in (('attn', ('q_proj', 'k_proj', 'v_proj', 'o_proj')),
                                 ('mlp', ('gate_proj', 'up_proj', 'down_proj')))}
    return {'layers': layers}


@pytest.mark.parametrize('kv_heads', [4, 2])
def test_unit_weight_scores_match_brute_force(kv_heads):
    """Each unit's score = sum |W G| over the weights that zeroing that unit alone removes
    (``linear_keep``), brute force per unit; under GQA a value column is shared by q_per_kv
    context channels, so there it is amortised and the scores still add up to sum |W G|."""
    from jaxprune import models

    cfg = models.LlamaConfig.tiny(num_kv_heads=kv_heads)
    dims = _density.layer_dims(cfg)
    w, g = _random_llama_params(cfg, 0), _random_llama_params(cfg, 1)
    got = _atp.unit_weight_scores(w, g, dims)
    block = {'q_proj': 'attn', 'k_proj': 'attn', 'v_proj': 'attn', 'o_proj': 'attn',
             'gate_proj': 'mlp', 'up_proj': 'mlp', 'down_proj': 'mlp'}
    for layer, d in enumerate(dims):
        score = {p: np.abs(w['layers'][layer][b][p]['kernel'] * g['layers'][layer][b][p]['kernel'])
                 for p, b in block.items()}
        for name, size in d.group_sizes().items():
            assert got['layers'][layer][name].shape == (size,)
            if name == 'attn_ctx' and d.q_per_kv > 1:
                continue  # a single context channel does not remove a shared value column
            for u in range(size):
                m = np.ones(size, np.float32)
                m[u] = 0
                keep = _density.linear_keep({name: jnp.asarray(m)}, d)
                removed = sum(
                    (x * (1 - np.outer(np.asarray(keep[p][0]), np.asarray(keep[p][1])))).sum()
                    for p, x in score.items())
                np.testing.assert_allclose(got['layers'][layer][name][u], removed, rtol=1e-10)
        total = {n: v.sum() for n, v in got['layers'][layer].items()}
        t = {p: x.sum() for p, x in score.items()}
        want = {'attn_in': t['q_proj'] + t['k_proj'] + t['v_proj'],
                'attn_ctx': t['o_proj'] + t['v_proj'], 'attn_out': t['o_proj'],
                'mlp_in': t['gate_proj'] + t['up_proj'],
                'mlp': t['gate_proj'] + t['up_proj'] + t['down_proj'], 'mlp_out': t['down_proj']}
        for n, expected in want.items():
            np.testing.assert_allclose(total[n], expected, rtol=1e-10)


def test_taylor_prior_cut_groups_only_cuts_those_groups():
    """Groups outside cut_groups get the cap logit (kept); the cut still meets the budget."""
    from jaxprune.methods import _atp_train

    dims = _density.layer_dims(TOY)
    groups = _atp_generator.mask_groups(TOY)
    got = _atp.taylor_prior({'w': jnp.zeros(3)}, _importance(dims, 2), [None], loss_fn=_toy_loss,
                            dims=dims, groups=groups, target_density=0.7, criterion='mask',
                            cut_groups=('mlp', 'attn_ctx'), cap=5.0)
    for lm in got['layers']:
        for name, v in lm.items():
            if name not in ('mlp', 'attn_ctx'):
                np.testing.assert_array_equal(np.asarray(v), 5.0)
    cut = _atp_train.project_masks(got, dims, target_density=0.7, bias=0.0)
    for c, g in zip(jax.tree.leaves(cut), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(np.asarray(c) > 0.5, np.asarray(g) > 0)
    assert disp_masks.reference_kept(cut, dims) <= 0.7 * _density.prunable_params(dims)
    assert min(float(jnp.min(lm['mlp'])) for lm in got['layers']) < 0  # something was cut
    with pytest.raises(ValueError, match='prior_groups'):
        _atp.taylor_prior({'w': jnp.zeros(3)}, _importance(dims, 2), [None], loss_fn=_toy_loss,
                          dims=dims, groups=groups, target_density=0.7, cut_groups=('heads',))


def test_taylor_prior_rejects_no_batches():
    dims = _density.layer_dims(TOY)
    with pytest.raises(ValueError, match='prior_batches'):
        _atp.taylor_prior({}, {}, [], loss_fn=_toy_loss, dims=dims,
                          groups=_atp_generator.mask_groups(TOY), target_density=0.5)


def test_warm_start_generator_reproduces_the_prior():
    """After the warm start, generator logits + bias == prior (atol 1e-5); only head biases
    change; the exact-budget projection of the generator is the prior's cut."""
    from jaxprune.methods import _atp_train

    dims, gen, _, _ = _gen_setup(TOY)
    groups = _atp_generator.mask_groups(TOY)
    prior = _atp.taylor_prior({'w': jnp.zeros(3)}, _importance(dims, 5), [None],
                              loss_fn=_toy_loss, dims=dims, groups=groups, target_density=0.6,
                              criterion='mask')
    warm = _atp.warm_start_generator(gen, prior, bias=3.0)
    logits = _atp_generator.generator_apply(warm)
    for g, p in zip(jax.tree.leaves(logits), jax.tree.leaves(prior), strict=True):
        np.testing.assert_allclose(np.asarray(g) + 3.0, np.asarray(p), atol=1e-5)
    same = {k: v for k, v in warm.items() if k != 'heads'}
    for a, b in zip(jax.tree.leaves(same), jax.tree.leaves({k: gen[k] for k in same}),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for hw, hg in zip(warm['heads'], gen['heads'], strict=True):
        for n in hw:
            np.testing.assert_array_equal(np.asarray(hw[n]['kernel']), np.asarray(hg[n]['kernel']))
    projected = _atp_train.project_masks(logits, dims, target_density=0.6, bias=3.0)
    for m, p in zip(jax.tree.leaves(projected), jax.tree.leaves(prior), strict=True):
        np.testing.assert_array_equal(np.asarray(m) > 0.5, np.asarray(p) > 0)


def test_llm_step_passes_masks_to_group_lasso():
    """A trailing group_lasso sees the step's masks: pruned LoRA rows vanish, kept ones fit."""
    dims = _density.layer_dims(TOY)
    f, d = dims[0].mlp, dims[0].hidden
    trainable = {'layers': {0: {'mlp': {'down_proj': {
        'lora_a': jax.random.normal(jax.random.key(0), (f, 2)),
        'lora_b': jax.random.normal(jax.random.key(1), (2, d))}}}}}
    masks = {'layers': ({'mlp': (jnp.arange(f) % 3 > 0).astype(jnp.float32)}, {})}
    seen = []

    def loss_fn(t, frozen, m, batch, *, lora_aware):
        seen.append(lora_aware)
        p = t['layers'][0]['mlp']['down_proj']
        return jnp.sum((p['lora_a'] @ p['lora_b'] - frozen) ** 2)

    target = jnp.ones((f, d))
    tx = _atp.atp_lora_tx(dims, learning_rate=1e-2, strength=20.0)
    opt = tx.init(trainable)
    step = jax.jit(functools.partial(_atp.llm_step, loss_fn=loss_fn, tx=tx))
    losses = []
    for _ in range(40):
        trainable, opt, metrics = step(trainable, opt, target, masks, None)
        losses.append(float(metrics['loss']))
    assert seen == [True]  # traced once, in LoRA-aware mode
    a = np.asarray(trainable['layers'][0]['mlp']['down_proj']['lora_a'])
    pruned = np.asarray(masks['layers'][0]['mlp']) == 0
    np.testing.assert_array_equal(a[pruned], 0.0)
    assert np.all(np.linalg.norm(a[~pruned], axis=1) > 0.1)
    assert losses[-1] < losses[0]


def test_llm_step_accepts_plain_optax_transform():
    def loss_fn(t, frozen, m, batch, *, lora_aware):
        return jnp.sum((t - frozen) ** 2) * jnp.sum(m['layers'][0]['mlp'])

    masks = {'layers': ({'mlp': jnp.ones(2)},)}
    tx = optax.sgd(0.1)
    t, _, metrics = _atp.llm_step(jnp.zeros(3), tx.init(jnp.zeros(3)), jnp.ones(3), masks, None,
                                  loss_fn=loss_fn, tx=tx)
    np.testing.assert_allclose(np.asarray(t), 0.4, rtol=1e-6)  # 0 - 0.1 * (2 * -1 * 2)
    np.testing.assert_allclose(float(metrics['loss']), 6.0, rtol=1e-6)


def test_atp_surgery_plan_indices():
    dims = _density.layer_dims(dict(TOY, num_kv_heads=1))
    ctx = jnp.zeros(8).at[jnp.array([0, 5])].set(1.0)  # head 0 dim 0, head 1 dim 1
    masks = {'layers': ({'attn_ctx': ctx, 'mlp': jnp.zeros(12).at[3].set(1.0)}, {})}
    plan = _atp.atp_surgery_plan(masks, dims)
    np.testing.assert_array_equal(plan[0]['o_rows'], [0, 5])
    np.testing.assert_array_equal(plan[0]['v_cols'], [0, 1])  # union over the shared KV head
    np.testing.assert_array_equal(plan[0]['kv_groups'], [0])
    np.testing.assert_array_equal(plan[0]['mlp'], [3])
    np.testing.assert_array_equal(plan[1]['attn_in'], np.arange(8))


# ---- real tiny Llama (jaxprune.models) ----


def _tiny_llama(lora_rank=4, seed=0, **overrides):
    from flax import nnx

    from jaxprune.lora import _spec
    from jaxprune.models import _llama

    cfg = _llama.LlamaConfig.tiny(**overrides)
    model = _llama.Llama(cfg, lora=_spec.LoraSpec(rank=lora_rank, alpha=8.0,
                                                  targets=r'.*_proj'), rngs=nnx.Rngs(seed))
    return cfg, model


def _randomize_lora(model, seed=1):
    from flax import nnx

    state = nnx.state(model, nnx.LoRAParam)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [0.3 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    nnx.update(model, jax.tree.unflatten(treedef, new))


def _forward(model):
    """A jitted functional forward ``fwd(ids, masks, lora_aware)`` of an NNX model's current state
    (eager NNX calls dispatch op by op and are slow on the shared CPU)."""
    from flax import nnx

    graphdef, state = nnx.split(model)

    @functools.partial(jax.jit, static_argnames='lora_aware')
    def fwd(state, ids, masks, lora_aware=False):
        return nnx.merge(graphdef, state)(ids, masks=masks, lora_aware=lora_aware)

    return functools.partial(fwd, state)


def _hard_masks(cfg, seed):
    gen = _atp_generator.generator_init(jax.random.key(seed), _atp_generator.mask_groups(cfg),
                                        width=16, num_layers=1, num_heads=2, head_scale=30.0)
    return _gumbel.sample_masks(_atp_generator.generator_apply(gen), jax.random.key(seed + 1),
                                bias=0.0)


def test_lora_aware_linear_matches_formula():
    """Training: (W x)*m + s B A x; evaluation: ((W + s A B) x)*m (rtol 1e-5)."""
    from flax import nnx

    from jaxprune.models import _layers

    lin = _layers.Linear(6, 5, use_bias=False, axes=('embed', 'mlp'), lora_rank=2,
                         lora_alpha=4.0, rngs=nnx.Rngs(0))
    lin.lora_b[...] = jax.random.normal(jax.random.key(3), (2, 5))
    x = np.asarray(jax.random.normal(jax.random.key(4), (3, 6)))
    m = np.array([1, 0, 1, 1, 0], np.float32)
    w, a, b = (np.asarray(v[...]) for v in (lin.kernel, lin.lora_a, lin.lora_b))
    s = lin.lora_scale
    np.testing.assert_allclose(np.asarray(lin(jnp.asarray(x), out_mask=m, lora_aware=True)),
                               (x @ w) * m + s * (x @ a) @ b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(lin(jnp.asarray(x), out_mask=m)),
                               (x @ (w + s * a @ b)) * m, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('seed', [0, 1])
def test_group_lasso_makes_lora_aware_equal_masked_forward(seed):
    """Once the prox has zeroed the LoRA groups of pruned channels, the LoRA-aware (training)
    forward equals the masked evaluation forward (atol 1e-5); before it they differ."""
    from flax import nnx

    cfg, model = _tiny_llama(seed=seed)
    _randomize_lora(model, seed)
    masks = _hard_masks(cfg, seed)
    ids = jax.random.randint(jax.random.key(9), (2, 6), 0, cfg.vocab_size)
    fwd = _forward(model)
    before = fwd(ids, masks, lora_aware=True)
    assert float(jnp.max(jnp.abs(before - fwd(ids, masks)))) > 1e-3
    lora = nnx.state(model, nnx.LoRAParam)
    tx = _group_lasso.group_lasso(_group_lasso.lora_shares_fn(_density.layer_dims(cfg)),
                                  strength=1e6, learning_rate=1.0)
    u, _ = tx.update(jax.tree.map(jnp.zeros_like, lora), tx.init(lora), lora, masks=masks)
    nnx.update(model, optax.apply_updates(lora, u))
    fwd = _forward(model)
    np.testing.assert_allclose(np.asarray(fwd(ids, masks, lora_aware=True)),
                               np.asarray(fwd(ids, masks)), atol=1e-5)


def test_atp_surgery_keep_pruned_model_equals_masked_model():
    """surgery.prune_model with atp_surgery_keep + residual masks == masked logits (atol 1e-5);
    the kept-parameter count is preserved."""
    from jaxprune import surgery

    cfg, model = _tiny_llama(seed=0)
    _randomize_lora(model)
    dims = _density.layer_dims(cfg)
    masks = jax.tree.map(np.asarray, _hard_masks(cfg, 3))
    layers = [dict(m) for m in masks['layers']]
    layers[0]['attn_ctx'] = layers[0]['attn_ctx'].copy()
    layers[0]['attn_ctx'][16:] = 0.0  # kill KV group 1 of layer 0
    layers[1]['mlp'] = layers[1]['mlp'].copy()
    layers[1]['mlp'][::2] = 0.0
    masks = {'layers': tuple(jax.tree.map(jnp.asarray, m) for m in layers)}
    ids = jax.random.randint(jax.random.key(9), (2, 6), 0, cfg.vocab_size)
    want = _forward(model)(ids, masks)
    keep, residual = _atp.atp_surgery_keep(masks, dims)
    assert not keep[('heads', 0)][1]
    new_model, new_cfg = surgery.prune_model(model, keep)
    assert new_cfg.heads(0) == 2 and new_cfg.mlp(1) <= 32
    np.testing.assert_allclose(np.asarray(_forward(new_model)(ids, residual)), np.asarray(want),
                               atol=1e-5)
    np.testing.assert_allclose(
        float(_density.kept_params(residual, _density.layer_dims(new_cfg))),
        float(_density.kept_params(masks, dims)), rtol=0)


def test_export_masks_drive_the_model():
    cfg, model = _tiny_llama()
    gen = _atp_generator.generator_init(jax.random.key(0), _atp_generator.mask_groups(cfg))
    masks = _atp.atp_export_masks(gen)
    ids = jnp.zeros((1, 4), jnp.int32)
    # a fresh generator keeps everything (|logits| < bias): the masked model is the dense one
    fwd = _forward(model)
    np.testing.assert_allclose(np.asarray(fwd(ids, masks)), np.asarray(fwd(ids, None)), atol=1e-6)


@pytest.mark.slow
def test_atp_alternating_steps_on_tiny_llama():
    """Control phase (generator + LoRA steps) then mask freeze on a tiny Llama: density moves to
    the target, the regularised loss drops, pruned LoRA groups are driven to zero."""
    from flax import nnx

    cfg, model = _tiny_llama(seed=0)
    dims = _density.layer_dims(cfg)
    graphdef, lora, frozen = nnx.split(model, nnx.LoRAParam, ...)
    loss_fn = _atp.causal_lm_loss(graphdef)
    gen = _atp_generator.generator_init(jax.random.key(0), _atp_generator.mask_groups(cfg),
                                        width=32, num_heads=4)
    gen_tx = optax.adamw(5e-2)
    gen_opt = gen_tx.init(gen)
    llm_tx = _atp.atp_lora_tx(
        dims, learning_rate=1e-2, strength=optax.exponential_decay(1e-2, 10, 2.0, end_value=10.0))
    llm_opt = llm_tx.init(lora)
    gen_step = jax.jit(functools.partial(
        _atp.generator_step, loss_fn=loss_fn, tx=gen_tx, dims=dims, target_density=0.6,
        reg_weight=4.0))
    llm_step = jax.jit(functools.partial(_atp.llm_step, loss_fn=loss_fn, tx=llm_tx))
    sample = jax.jit(_atp.sample_step_masks)
    rng = np.random.default_rng(0)
    base = rng.integers(0, cfg.vocab_size, (4, 17))
    logs = []
    for i in range(60):
        tokens = jnp.asarray(np.roll(base, i, axis=1))
        batch = {'input_ids': tokens[:, :-1], 'labels': tokens[:, 1:]}
        key = jax.random.key(i)
        gen, gen_opt, m = gen_step(gen, gen_opt, lora, frozen, batch, key)
        logs.append(jax.tree.map(float, m))
        masks = sample(gen, jax.random.fold_in(key, 1))
        lora, llm_opt, _ = llm_step(lora, llm_opt, frozen, masks, batch)
    first, last = logs[:5], logs[-5:]
    assert first[0]['density'] > 0.8
    assert abs(np.mean([m['density'] for m in last]) - 0.6) < 0.1
    assert np.mean([m['loss'] for m in last]) < np.mean([m['loss'] for m in first])
    # mask freeze: LoRA-only steps with the exported masks; pruned groups vanish
    masks = _atp.atp_export_masks(gen)
    for i in range(40):
        tokens = jnp.asarray(np.roll(base, i, axis=1))
        lora, llm_opt, _ = llm_step(lora, llm_opt, frozen, masks,
                                    {'input_ids': tokens[:, :-1], 'labels': tokens[:, 1:]})
    shares = _group_lasso.lora_shares_fn(dims)(masks, nnx.to_pure_dict(lora))
    pairs = [(np.broadcast_to(np.asarray(r), p.shape) > 0, np.asarray(p)) for r, p in zip(
        jax.tree.leaves(shares), jax.tree.leaves(nnx.to_pure_dict(lora)), strict=True)]
    assert sum(int(pruned.sum()) for pruned, _ in pairs) > 0
    for pruned, p in pairs:
        np.testing.assert_array_equal(p[pruned], 0.0)
        assert np.all(p[~pruned] != 0.0)
