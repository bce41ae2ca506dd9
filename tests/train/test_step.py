"""The functional train/eval step: losses, NaN skipping, LoRA freezing, masks, sharding."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxprune import config, sharding
from jaxprune.train import _factory, _method, _step

CLS = config.ModelCfg(name_or_path='tiny-bert', task='classification')
LM = config.ModelCfg(name_or_path='tiny-llama', task='causal_lm')


def _batch(task, b=8, t=16, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, _factory.TINY_VOCAB, size=(b, t)).astype(np.int32)
    if task == 'classification':
        mask = np.ones((b, t), np.int32)
        mask[:, t // 2:] = rng.integers(0, 2, size=(b, t - t // 2))
        return {'input_ids': ids, 'attention_mask': mask,
                'labels': rng.integers(0, 2, size=b).astype(np.int32)}
    labels = np.roll(ids, -1, axis=1)
    labels[:, -1] = -1
    return {'input_ids': ids, 'labels': labels}


def _split(model_cfg, lora=False, lr=3e-3, **lora_kw):
    lcfg = config.LoraCfg(enabled=lora, rank=4, **lora_kw)
    model, _, _ = _factory.build_model(model_cfg, lcfg)
    run = config.RunCfg(model=model_cfg, lora=lcfg)
    from jaxprune.train import _loop

    graphdef, trainable, rest = nnx.split(model, _loop.trainable_filter(run), ...)
    tx = config.TrainCfg(learning_rate=lr, steps=100).build_optimizer()
    return model, graphdef, trainable, rest, tx


def _ref_sums(logits, labels):
    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    valid = labels >= 0
    safe = np.where(valid, labels, 0)
    nll = lse - np.take_along_axis(logits, safe[..., None], -1)[..., 0]
    return {'loss_sum': (nll * valid).sum(),
            'correct': ((logits.argmax(-1) == safe) & valid).sum(), 'count': valid.sum()}


@pytest.mark.parametrize('shape', [(6, 3), (2, 5, 11)])
def test_loss_sums_matches_reference(shape):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=shape).astype(np.float32) * 3
    labels = rng.integers(-1, shape[-1], size=shape[:-1])  # -1 entries are ignored
    task = 'classification' if len(shape) == 2 else 'causal_lm'
    got = _step.loss_sums(jnp.asarray(logits), jnp.asarray(labels), task=task)
    ref = _ref_sums(logits, labels)
    for k in ref:  # float32 vs float64 reference
        np.testing.assert_allclose(float(got[k]), ref[k], rtol=1e-5)


@pytest.mark.parametrize('model_cfg', [CLS, LM], ids=['classification', 'causal_lm'])
def test_train_step_reduces_loss(model_cfg):
    _, graphdef, trainable, rest, tx = _split(model_cfg)
    step = _step.make_train_step(graphdef, tx, task=model_cfg.task, method=_method.NoMethod())
    state = _step.init_state(trainable, tx, seed=0)
    batch = _batch(model_cfg.task)
    losses = []
    for _ in range(10):
        state, m = step(state, rest, batch)
        losses.append(float(m['loss']))
    assert int(state.step) == 10 and int(state.skipped) == 0
    # Overfitting one batch: the loss must fall well below its start.
    assert losses[-1] < 0.7 * losses[0], losses


class _NanOnFlag(_method.NoMethod):
    def loss_extras(self, trainable, out, batch):
        return jnp.where(batch['poison'] > 0, jnp.nan, 0.0), {}


def test_nonfinite_step_is_skipped():
    _, graphdef, trainable, rest, tx = _split(CLS)
    step = _step.make_train_step(graphdef, tx, task='classification', method=_NanOnFlag())
    state = _step.init_state(trainable, tx, seed=0)
    good = {**_batch('classification'), 'poison': np.float32(0)}
    bad = {**good, 'poison': np.float32(1)}
    state, _ = step(state, rest, good)
    before = jax.device_get(state)
    state, m = step(state, rest, bad)
    after = jax.device_get(state)
    assert float(m['nonfinite']) == 1.0 and not np.isfinite(float(m['loss']))
    assert int(after.step) == int(before.step) + 1 and int(after.skipped) == 1
    for a, b in zip(jax.tree.leaves(after.trainable), jax.tree.leaves(before.trainable)):
        np.testing.assert_array_equal(a, b)  # bit-identical params
    for a, b in zip(jax.tree.leaves(after.opt_state), jax.tree.leaves(before.opt_state)):
        np.testing.assert_array_equal(a, b)  # and optimizer state
    state, m = step(state, rest, good)
    assert float(m['nonfinite']) == 0.0 and int(state.skipped) == 1
    changed = [not np.array_equal(a, b) for a, b in
               zip(jax.tree.leaves(jax.device_get(state.trainable)),
                   jax.tree.leaves(after.trainable))]
    assert any(changed)


@pytest.mark.parametrize('heads', [('classifier', 'pooler'), ('classifier',)])
def test_lora_only_training_leaves_base_params_bit_identical(heads):
    """Only the adapters and ``lora.head_modules`` change; every other parameter is bit-equal."""
    model, graphdef, trainable, rest, tx = _split(CLS, lora=True, head_modules=heads)
    base_before = jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    paths = [_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(
        nnx.to_pure_dict(trainable))[0]]
    assert paths and all(('lora_' in p) or p.startswith(heads) for p in paths), paths
    assert any('lora_' in p for p in paths)
    assert {h for h in heads if any(p.startswith(h) for p in paths)} == set(heads)
    step = _step.make_train_step(graphdef, tx, task='classification', method=_method.NoMethod())
    state = _step.init_state(trainable, tx, seed=0)
    for i in range(3):
        state, _ = step(state, rest, _batch('classification', seed=i))
    trained = nnx.merge(graphdef, state.trainable, rest)
    after = jax.device_get(nnx.to_pure_dict(nnx.state(trained, nnx.Param)))
    flat_b = dict(jax.tree_util.tree_flatten_with_path(base_before)[0])
    flat_a = dict(jax.tree_util.tree_flatten_with_path(after)[0])
    n_base = n_lora_changed = 0
    for k, v in flat_b.items():
        name = _name(k)
        if 'lora_' in name or name.startswith(heads):
            n_lora_changed += not np.array_equal(v, flat_a[k])
        else:
            np.testing.assert_array_equal(v, flat_a[k], err_msg=name)
            n_base += 1
    assert n_base > 10 and n_lora_changed > 0


def _name(path):
    return '/'.join(str(getattr(p, 'key', getattr(p, 'idx', p))) for p in path)


class MaskState(NamedTuple):
    masks: dict


def _mask_keeper(masks):
    return optax.GradientTransformation(lambda p: MaskState(masks), lambda u, s, p=None: (u, s))


def test_masks_are_read_from_opt_state_and_reach_the_model():
    model, graphdef, trainable, rest, _ = _split(CLS)
    d = model.config.hidden_size
    hidden = jnp.asarray((np.arange(d) % 2).astype(np.float32))
    masks = {'hidden': hidden}
    tx = config.TrainCfg(steps=10).build_optimizer(_mask_keeper(masks))
    opt_state = tx.init(trainable)
    assert _step.get_masks(opt_state) is not None
    assert _step.get_masks(config.TrainCfg(steps=10).build_optimizer().init(trainable)) is None
    batch = _batch('classification')
    ev = _step.make_eval_step(graphdef, task='classification')
    got = ev(trainable, rest, opt_state, batch)
    ref = _step.loss_sums(model(batch['input_ids'], batch['attention_mask'], masks=masks),
                          batch['labels'], task='classification')
    dense = _step.loss_sums(model(batch['input_ids'], batch['attention_mask']),
                            batch['labels'], task='classification')
    np.testing.assert_allclose(float(got['loss_sum']), float(ref['loss_sum']), rtol=1e-5)
    assert abs(float(got['loss_sum']) - float(dense['loss_sum'])) > 1e-4


def test_train_step_on_8_devices_matches_1_device():
    assert jax.device_count() >= 8
    _, graphdef, trainable, rest, _ = _split(CLS)
    # SGD: Adam's first steps are sign-like and amplify reduction-order noise in tiny gradients.
    tx = optax.sgd(0.5)
    step = _step.make_train_step(graphdef, tx, task='classification', method=_method.NoMethod())
    batch = _batch('classification')
    results = []
    for shape in ({'data': 1, 'fsdp': 1, 'tensor': 1}, {'data': 2, 'fsdp': 2, 'tensor': 2}):
        n = shape['data'] * shape['fsdp'] * shape['tensor']
        mesh = sharding.make_mesh(shape, devices=jax.devices()[:n])
        p_sh = sharding.param_shardings(trainable, mesh)
        t = sharding.shard_like(jax.tree.map(jnp.copy, trainable), p_sh)
        r = sharding.shard_like(rest, sharding.param_shardings(rest, mesh))
        b = sharding.shard_like(batch, sharding.batch_sharding(mesh, batch_size=8))
        state = _step.init_state(t, tx, seed=0)
        state, m = step(state, r, b)
        state, m = step(state, r, b)
        results.append((jax.device_get(state.trainable), float(m['loss'])))
        if n == 8:
            shards = {len(x.sharding.device_set) for x in jax.tree.leaves(state.trainable)}
            assert shards == {8}
    (p1, l1), (p8, l8) = results
    np.testing.assert_allclose(l8, l1, rtol=1e-5)  # reduction order differs across devices
    for a, b in zip(jax.tree.leaves(p8), jax.tree.leaves(p1)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
