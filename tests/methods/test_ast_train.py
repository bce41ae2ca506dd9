"""AST in the training loop: config, optimizer-state transform, Method hooks, end-to-end run."""

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxprune import config, methods
from jaxprune import train as train_lib
from jaxprune.masks import _nm
from jaxprune.methods import _ast_train
from jaxprune.models import _llama

CFG = _llama.LlamaConfig.tiny()


def _split():
    model = _llama.Llama(CFG, rngs=nnx.Rngs(0))
    return nnx.split(model, nnx.Param, ...)


def _batch(b=2, t=8, seed=0):
    ids = np.random.default_rng(seed).integers(0, CFG.vocab_size, (b, t + 1)).astype(np.int32)
    return {'input_ids': jnp.asarray(ids[:, :-1]), 'labels': jnp.asarray(ids[:, 1:])}


def test_ast_cfg_registered_and_validated():
    cfg = config.load_config('configs/ast_tiny.yaml')
    assert isinstance(cfg.prune, _ast_train.AstCfg)
    assert (cfg.prune.n, cfg.prune.m, cfg.prune.temperature, cfg.prune.kd_weight) == (2, 4, 2.0,
                                                                                     0.5)
    smol = config.load_config('configs/ast_smollm2_shakespeare.yaml')
    assert smol.prune.init_score == 'wanda' and smol.prune.update_every == 10
    with pytest.raises(ValueError, match='target_density'):
        _ast_train.AstCfg(method='ast', target_density=0.6)
    with pytest.raises(ValueError, match='init_score'):
        _ast_train.AstCfg(method='ast', init_score='random')
    with pytest.raises(ValueError, match='update_every'):
        _ast_train.AstCfg(method='ast', update_every=0)


def test_ast_train_transform_matches_reference():
    """g + lambda(t)(1 - M) W with lambda ramping linearly over 4 steps (numpy reference)."""
    w = jnp.asarray(np.random.default_rng(0).normal(size=(8, 4)), jnp.float32)
    params = {'layers': {'0': {'kernel': w}}, 'bias': jnp.ones(4)}
    tx = _ast_train.ast_train_transform(decay=0.1, decay_ramp_steps=4, update_every=2,
                                        include=r'kernel')
    state = tx.init(params)
    mask0 = np.asarray(state.masks['weights']['layers']['0']['kernel'])
    np.testing.assert_array_equal(mask0, np.asarray(_nm.nm_mask(jnp.abs(w))))
    g = jax.tree.map(jnp.ones_like, params)
    for t in range(6):
        u, state = tx.update(g, state, params)
        lam = 0.1 * min(1.0, t / 4) if t else 0.0
        want = 1.0 + lam * (1 - mask0) * np.asarray(w)
        np.testing.assert_allclose(u['layers']['0']['kernel'], want, rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(u['bias'], 1.0)
    assert int(state.masks['step']) == 6
    np.testing.assert_array_equal(state.masks['teacher']['layers']['0']['kernel'], w)


def test_ast_train_transform_flip_rate_on_recompute_steps():
    w = jnp.asarray(np.random.default_rng(1).normal(size=(8, 4)), jnp.float32)
    params = {'layers': {'0': {'kernel': w}}}
    tx = _ast_train.ast_train_transform(update_every=2, include='kernel', keep_teacher=False)
    state = tx.init(params)
    old = state.masks['weights']
    new = jax.tree.map(lambda m: ~m if m is not None else None, old,
                       is_leaf=lambda x: x is None)
    g = jax.tree.map(jnp.zeros_like, params)
    _, s1 = tx.update(g, state, params, new_masks=new)  # step 0: not a recompute step
    assert float(s1.flip_rate) == 0.0
    _, s2 = tx.update(g, s1, params, new_masks=new)  # step 1: still not
    assert float(s2.flip_rate) == 0.0
    _, s3 = tx.update(g, s2, params, new_masks=old)  # step 2: recompute; every entry flipped
    assert float(s3.flip_rate) == 1.0
    assert s3.masks['teacher'] is None


@pytest.mark.parametrize('step,expect_fresh', [(0, False), (9, False), (10, True), (20, True)])
def test_recompute_timing(step, expect_fresh):
    """Masks are recomputed from |W| exactly when the update count is a positive multiple of T."""
    method = _ast_train.AstMethod(_ast_train.AstCfg(method='ast', update_every=10))
    _, trainable, _ = _split()
    fresh = _nm.nm_masks(jax.tree.map(jnp.abs, trainable))
    stale = jax.tree.map(lambda m: ~m if m is not None else None, fresh,
                         is_leaf=lambda x: x is None)
    got = method.recompute(trainable, {'weights': stale, 'step': jnp.int32(step)})
    want = fresh if expect_fresh else stale
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)


def test_prepare_is_ste_masked_forward():
    """Forward == hard-masked model; gradient reaches pruned weights (straight-through)."""
    graphdef, trainable, rest = _split()
    method = _ast_train.AstMethod(_ast_train.AstCfg(method='ast', distill=False))
    masks = _nm.nm_masks(jax.tree.map(jnp.abs, trainable))
    batch = _batch()

    def loss(tr):
        t, r, mm = method.prepare(tr, rest, {'weights': masks})
        assert mm is None
        return jnp.mean(nnx.merge(graphdef, t, r)(batch['input_ids']) ** 2)

    hard = nnx.merge(graphdef, _nm.apply_masks(trainable, masks), rest)
    np.testing.assert_allclose(loss(trainable), jnp.mean(hard(batch['input_ids']) ** 2),
                               rtol=1e-6)
    g = jax.grad(loss)(trainable)['layers'][0]['mlp']['up_proj']['kernel'][...]
    mk = masks['layers'][0]['mlp']['up_proj']['kernel']
    assert float(jnp.abs(jnp.where(mk, 0.0, g)).sum()) > 0


def test_loss_extras_matches_reference():
    """kd_weight * T^2 * mean_t KL(softmax(t/T) || softmax(s/T)) over valid labels (rtol 1e-5)."""
    method = _ast_train.AstMethod(_ast_train.AstCfg(method='ast', temperature=2.0,
                                                    kd_weight=0.5))
    rng = np.random.default_rng(0)
    s = rng.normal(size=(2, 3, 5)).astype(np.float32)
    t = rng.normal(size=(2, 3, 5)).astype(np.float32)
    labels = np.array([[1, 2, -100], [0, 4, 3]])
    extra, logs = method.loss_extras(None, jnp.asarray(s), {
        'labels': jnp.asarray(labels), 'teacher_logits': jnp.asarray(t)})

    def logsm(x):
        x = x.astype(np.float64) / 2.0
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    kl = (np.exp(logsm(t)) * (logsm(t) - logsm(s))).sum(-1) * 4.0
    ref = kl[labels >= 0].mean()
    np.testing.assert_allclose(logs['kd'], ref, rtol=1e-5)
    np.testing.assert_allclose(extra, 0.5 * ref, rtol=1e-5)
    zero, none = method.loss_extras(None, jnp.asarray(s), {'labels': jnp.asarray(labels)})
    assert float(zero) == 0.0 and none == {}


def test_value_and_grad_distills_from_frozen_teacher():
    """The loss is CE + 0.5 KL against the teacher in the state; with student == teacher and
    full masks the KL is 0; the update kwargs carry the step's masks."""
    graphdef, trainable, rest = _split()
    method = _ast_train.AstMethod(_ast_train.AstCfg(method='ast'))
    ones = jax.tree.map(lambda x: jnp.ones(x.shape, bool) if x.ndim == 2 else None, trainable)
    ones = _nm.nm_masks(ones)
    dense = jax.tree.map(lambda m: jnp.ones_like(m) if m is not None else None, ones,
                         is_leaf=lambda x: x is None)
    masks = {'weights': dense, 'teacher': trainable, 'step': jnp.int32(3)}
    fn = functools.partial(train_lib.train_step.__globals__['loss_fn'], graphdef=graphdef,
                           task='causal_lm', method=method)
    (loss, aux), _grads, kw = method.value_and_grad(fn, trainable, rest, _batch(), masks,
                                                   jax.random.key(0), graphdef=graphdef)
    np.testing.assert_allclose(aux['kd'], 0.0, atol=1e-6)
    np.testing.assert_allclose(loss, aux['ce'], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(kw['new_masks']), jax.tree.leaves(dense), strict=True):
        np.testing.assert_array_equal(a, b)


def test_train_loop_end_to_end(tmp_path):
    """configs/ast_tiny.yaml through the real loop: flip rates logged after each recompute,
    final masks exactly 2:4 along K, teacher untouched, finite eval."""
    cfg = config.load_config('configs/ast_tiny.yaml', [
        f'run_dir={tmp_path}', 'train.steps=11', 'checkpoint.every=0'])
    final = train_lib.train(cfg, progress=False)
    assert np.isfinite(final['perplexity'])
    recs = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
    flips = [r for r in recs if r['event'] == 'mask']
    assert [r['step'] for r in flips] == [6, 11]
    assert all(0.0 <= r['flip_rate'] <= 1.0 for r in flips)
    s = train_lib.setup(cfg)
    assert not _slorb_paths(s.state.trainable)  # prune.slorb=false adds no branch
    from jaxprune import checkpoint, sharding

    ck = checkpoint.Checkpointer(cfg.checkpoint_dir)
    _, state, _ = ck.restore_latest_valid(target=sharding.abstract_like(s.state))
    ck.close()
    masks = _ast_train.final_masks(state.opt_state)
    leaves = [m for m in jax.tree.leaves(masks) if m is not None]
    assert len(leaves) == 14
    assert all(bool(_nm.is_nm(m, n=2, m=4)) for m in leaves)
    teacher = optax.tree.get(state.opt_state, 'masks')['teacher']
    init = s.state.trainable
    for a, b in zip(jax.tree.leaves(teacher), jax.tree.leaves(init), strict=True):
        np.testing.assert_array_equal(a, b)
    # The run ends with the compressed 2:4 export; it reloads to the masked dense model's logits.
    from jaxprune.methods import _ast_infer

    reloaded, _, _ = _ast_infer.load_sparse24(tmp_path / 'sparse24', implementation='xla')
    masked = nnx.merge(s.graphdef, methods.ast_forward_params(state.trainable, masks), s.rest)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg_vocab(masked), (2, 8)), jnp.int32)
    np.testing.assert_allclose(reloaded(ids), masked(ids), atol=1e-5)


def cfg_vocab(model):
    return model.config.vocab_size


def test_slorb_needs_slorb_params():
    _, trainable, _ = _split()
    method = _ast_train.AstMethod(_ast_train.AstCfg(method='ast', slorb=True))
    with pytest.raises(ValueError, match='SLoRB'):
        method.transforms(trainable)


def test_add_slorb_forward_matches_reference():
    """A Linear with SLoRB computes x (W) + (P x) S == x (W + repeat(S, k)) (atol 1e-5)."""
    model = _llama.Llama(CFG, rngs=nnx.Rngs(0))
    masks = _nm.nm_masks_for(nnx.state(model, nnx.Param))
    done = _ast_train.add_slorb(model, masks, k=8)
    assert len(done) == 14
    lin = model.layers[1].mlp.down_proj
    s = lin.slorb[...]
    assert s.shape == (CFG.intermediate_size // 8, CFG.hidden_size)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, CFG.intermediate_size)),
                    jnp.float32)
    ref = x @ (lin.kernel[...] + jnp.repeat(s, 8, axis=0))
    np.testing.assert_allclose(lin(x), ref, atol=1e-5)
    assert _ast_train._has_slorb(nnx.state(model, nnx.Param))


def test_recompute_uses_the_initial_score():
    """With Wanda initial masks the recompute keeps the Wanda score (fixed norms), not |W|."""
    _, trainable, _ = _split()
    rng = np.random.default_rng(0)
    flat = jax.tree_util.tree_flatten_with_path(trainable)[0]
    norms = {_nm.path_str(p): jnp.asarray(rng.uniform(0.01, 10.0, x.shape[0]), jnp.float32)
             for p, x in flat if x.ndim == 2 and 'layers' in _nm.path_str(p)}
    method = _ast_train.AstMethod(_ast_train.AstCfg(method='ast', init_score='wanda'),
                                  act_norms=norms)
    from jaxprune.scores import _wanda

    want = _nm.nm_masks(_wanda.wanda_scores(trainable, act_norms=norms))
    mag = _nm.nm_masks(jax.tree.map(jnp.abs, trainable))
    got = method.recompute(trainable, {'weights': mag, 'step': jnp.int32(10)})
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got),
                                                         jax.tree.leaves(mag), strict=True))


# ---------------------------------------------------------------------------------------------
# AST-Boosted (prune.slorb=true) through the loop's prepare_model hook.


def _np_nm_keep(score, n=2, m=4):
    """Numpy reference N:M mask: the n largest scores of every group of m rows (along K)."""
    k, cols = score.shape
    order = np.argsort(-score.reshape(k // m, m, cols), axis=1)
    keep = np.zeros((k // m, m, cols), bool)
    np.put_along_axis(keep, order[:, :n], True, axis=1)
    return keep.reshape(k, cols)


def _np_slorb(w, keep, k=16):
    """Numpy reference SLoRB init: block means (over k rows) of the pruned weights."""
    return np.where(keep, 0.0, w).reshape(w.shape[0] // k, k, w.shape[1]).mean(1)


def _flat(tree):
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)[0]
    return {_nm.path_str(p): x for p, x in flat if x is not None}


def _slorb_paths(params):
    return sorted(p.removesuffix('.slorb') for p in _flat(params) if p.endswith('.slorb'))


def _folded(params, masks, k=16):
    """{path: array}: every SLoRB'd kernel replaced by W * M + repeat(S, k) (plain jnp), no S."""
    flat, mk = _flat(params), _flat(masks)
    out = {p: x for p, x in flat.items() if not p.endswith('.slorb')}
    for mod in _slorb_paths(params):
        w, keep = out[f'{mod}.kernel'], mk[f'{mod}.kernel']
        out[f'{mod}.kernel'] = jnp.where(keep, w, 0) + jnp.repeat(flat[f'{mod}.slorb'], k, 0)
    return out


def _plain_model(arch, flat):
    """A Llama without SLoRB whose params are ``flat`` (every path must be present)."""
    model = _llama.Llama(arch, rngs=nnx.Rngs(1))
    state = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.asarray(flat[_nm.path_str(p)], x.dtype), state))
    return model


@pytest.mark.parametrize('init_score', ['magnitude', 'wanda'])
def test_prepare_model_slorb_matches_reference(init_score):
    """S of every sparse Linear == numpy block mean (k=16) of the weights pruned by the numpy 2:4
    mask of the run's initial score (|W|, or |W| * ||X|| for Wanda); rtol 1e-6."""
    model = _llama.Llama(CFG, rngs=nnx.Rngs(0))
    dense = {p: np.asarray(x) for p, x in _flat(nnx.state(model, nnx.Param)).items()}
    rng = np.random.default_rng(0)
    norms = {p: jnp.asarray(rng.uniform(0.01, 10.0, x.shape[0]), jnp.float32)
             for p, x in dense.items() if x.ndim == 2 and p.startswith('layers.')}
    method = _ast_train.AstMethod(
        _ast_train.AstCfg(method='ast', slorb=True, init_score=init_score),
        act_norms=norms if init_score == 'wanda' else None)
    assert method.prepare_model(model) is model
    params = _flat(nnx.state(model, nnx.Param))
    mods = _slorb_paths(nnx.state(model, nnx.Param))
    assert len(mods) == 14
    for mod in mods:
        w = dense[f'{mod}.kernel']
        score = np.abs(w) * (np.asarray(norms[f'{mod}.kernel'])[:, None]
                             if init_score == 'wanda' else 1.0)
        want = _np_slorb(w, _np_nm_keep(score))
        np.testing.assert_allclose(np.asarray(params[f'{mod}.slorb']), want, rtol=1e-6,
                                   atol=1e-8, err_msg=mod)
    before = {p: np.asarray(x) for p, x in params.items()}
    method.prepare_model(model)  # idempotent: an existing S is kept
    for p, x in _flat(nnx.state(model, nnx.Param)).items():
        np.testing.assert_array_equal(np.asarray(x), before[p])


def test_prepare_model_without_slorb_adds_nothing():
    model = _llama.Llama(CFG, rngs=nnx.Rngs(0))
    before = jax.tree.structure(nnx.state(model, nnx.Param))
    _ast_train.AstMethod(_ast_train.AstCfg(method='ast')).prepare_model(model)
    assert jax.tree.structure(nnx.state(model, nnx.Param)) == before
    assert not _slorb_paths(nnx.state(model, nnx.Param))


def test_prepare_model_rejects_slorb_k_not_dividing_k():
    """Tiny Llama kernels have K in {32, 64}: k=12 fails naming the field and a k that fits."""
    model = _llama.Llama(CFG, rngs=nnx.Rngs(0))
    method = _ast_train.AstMethod(_ast_train.AstCfg(method='ast', slorb=True, slorb_k=12))
    with pytest.raises(ValueError, match=r'prune\.slorb_k=12 .*K=32.*prune\.slorb_k=16'):
        method.prepare_model(model)
    assert not _slorb_paths(nnx.state(model, nnx.Param))


def _restore(cfg):
    from jaxprune import checkpoint, sharding

    s = train_lib.setup(cfg)
    ck = checkpoint.Checkpointer(cfg.checkpoint_dir)
    step, state, _ = ck.restore_latest_valid(target=sharding.abstract_like(s.state))
    ck.close()
    return s, step, state


def test_train_loop_slorb_end_to_end(tmp_path):
    """``prune.slorb=true`` through ``jaxprune.train``: the trainable params gain S (init ==
    numpy block mean under the optimizer state's initial masks, rtol 1e-6); the step's forward ==
    a plain model with kernels W*M + repeat(S, 16) (atol 1e-5) and != the masked model without
    S; S trains; the teacher has S = 0; a run resumed from step 3 ends bit-equal to the
    uninterrupted one; the compressed 2:4 model of the result == the folded reference (1e-5)."""
    import shutil

    from jaxprune.methods import _ast_infer

    def cfg_for(run_dir):
        return config.load_config('configs/ast_tiny.yaml', [
            f'run_dir={run_dir}', 'mesh.data=1', 'prune.slorb=true', 'train.steps=6',
            'checkpoint.every=3', 'checkpoint.keep=3'])

    cfg = cfg_for(tmp_path / 'a')
    s = train_lib.setup(cfg)
    init = s.state.trainable
    ast_state = optax.tree.get(s.state.opt_state, 'masks')
    mods = _slorb_paths(init)
    assert len(mods) == 14
    flat0, mk0 = _flat(init), _flat(ast_state['weights'])
    for mod in mods:
        want = _np_slorb(np.asarray(flat0[f'{mod}.kernel']), np.asarray(mk0[f'{mod}.kernel']))
        np.testing.assert_allclose(np.asarray(flat0[f'{mod}.slorb']), want, rtol=1e-6,
                                   atol=1e-8, err_msg=mod)
    ids = _batch(2, 8)['input_ids']
    t, r, model_masks = s.method.prepare(init, s.rest, ast_state)
    assert model_masks is None
    got = nnx.merge(s.graphdef, t, r)(ids)
    ref = _plain_model(s.arch, _folded(init, ast_state['weights']))(ids)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    no_s = {p: x for p, x in _flat(init).items() if not p.endswith('.slorb')}
    for mod in mods:
        no_s[f'{mod}.kernel'] = jnp.where(mk0[f'{mod}.kernel'], no_s[f'{mod}.kernel'], 0)
    assert float(jnp.max(jnp.abs(got - _plain_model(s.arch, no_s)(ids)))) > 1e-3

    assert np.isfinite(train_lib.train(cfg, progress=False)['perplexity'])
    _, step, state = _restore(cfg)
    assert step == 6
    trained = _flat(state.trainable)
    moved = [float(np.max(np.abs(np.asarray(trained[f'{m}.slorb']) - np.asarray(
        flat0[f'{m}.slorb'])))) for m in mods]
    assert min(moved) > 1e-4, moved
    teacher = _flat(optax.tree.get(state.opt_state, 'masks')['teacher'])
    assert all(float(jnp.max(jnp.abs(teacher[f'{m}.slorb']))) == 0.0 for m in mods)

    # Resume: drop the final checkpoint of a copy and run again from step 3.
    shutil.copytree(tmp_path / 'a', tmp_path / 'b')
    cfg_b = cfg_for(tmp_path / 'b')
    shutil.rmtree(pathlib.Path(cfg_b.checkpoint_dir) / '6')
    train_lib.train(cfg_b, progress=False)
    resumes = [json.loads(line) for line in (tmp_path / 'b' / 'metrics.jsonl').read_text()
               .splitlines() if json.loads(line)['event'] == 'resume']
    assert [r['step'] for r in resumes] == [3]
    s_b, step_b, state_b = _restore(cfg_b)
    assert step_b == 6
    for p, x in _flat(state_b.trainable).items():
        np.testing.assert_array_equal(np.asarray(x), np.asarray(trained[p]), err_msg=p)

    # Inference: compressed 2:4 + SLoRB == W*M + repeat(S, 16) with the trained S.
    masks = _ast_train.final_masks(state.opt_state)
    ref = _plain_model(s.arch, _folded(state.trainable, masks))(ids)
    model = nnx.merge(s_b.graphdef, state.trainable, s_b.rest)
    _ast_infer.compress_model(model, masks, implementation='xla')
    np.testing.assert_allclose(model(ids), ref, atol=1e-5)
