"""APT in the training loop: compaction invariants, budget, no revival, CLI end to end."""

import dataclasses
import itertools
import json
import math
import pathlib
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxprune.methods import _apt_arch, _apt_cfg  # (the package registers prune.method=apt)  # isort: skip
from jaxprune import checkpoint, config, surgery, train, transforms
from jaxprune.masks import _budget
from jaxprune.methods import _apt_export
from jaxprune.models import _bert, _structures
from jaxprune.train import _loop, _method

ROOT = pathlib.Path(__file__).resolve().parents[2]
APT_TINY = ROOT / 'configs' / 'apt_tiny.yaml'


def _cfg(tmp_path, *extra):
    return config.load_config(
        APT_TINY, [f'run_dir={tmp_path}', 'prune.export_dir=null', *extra]
    )


def _random_keep(structures, seed, p=0.6):
    rng = np.random.default_rng(seed)
    keep = {}
    for s in structures:
        k = rng.random(s.size) < p
        k[rng.integers(s.size)] = True  # no empty structure (surgery keeps a zeroed unit then)
        keep[(s.kind, s.layer)] = k
    return keep


def test_apt_cfg_registered_and_validates():
    cfg = config.load_config(APT_TINY)
    assert isinstance(cfg.prune, _apt_cfg.AptCfg)
    assert cfg.prune.target_density == 0.4 and cfg.prune.num_pruning_steps == 3
    with pytest.raises(ValueError, match='prune.beta'):
        config.load_config(APT_TINY, ['prune.beta=1.5'])
    with pytest.raises(ValueError, match='unknown config key'):
        config.load_config(APT_TINY, ['prune.pruning_stepz=3'])
    with pytest.raises(ValueError, match=r"prune.teacher='dence' must be one of"):
        config.load_config(APT_TINY, ['prune.teacher=dence'])


def test_budget_structures_matches_reference():
    arch = _bert.BertConfig.tiny()
    structs = _structures.structures(arch)
    shapes = _budget.param_shapes(nnx.to_pure_dict(_structures.abstract_params(arch)))
    got = {(s.kind, s.layer): s for s in
           _apt_arch.budget_structures(structs, shapes, count_embeddings=False)}
    # Reference: a hidden dim owns one row/column of every non-embedding tensor with an embed
    # axis: per layer q/k/v/up kernels (D x N) contribute N, out/down kernels contribute K,
    # biases of out/down and two LayerNorms (scale + bias) contribute 1 each; plus the pooler row.
    d, f, hn = arch.hidden_size, arch.intermediate_size, arch.num_heads * arch.head_dim
    per_layer = 3 * hn + hn + 1 + f + f + 1 + 2 * 2
    ref_hidden = arch.num_layers * per_layer + arch.pooler_size + 2  # + embed_norm scale/bias
    assert got[('hidden', None)].params_per_unit == ref_hidden
    assert all(sl.path[0] not in _apt_arch.EMBEDDING_MODULES
               for s in got.values() for sl in s.slices)
    full = {(s.kind, s.layer): s for s in structs}
    assert got[('heads', 0)] == full[('heads', 0)]  # heads/neurons own no embedding slices
    del d


@pytest.mark.parametrize('count_embeddings', [False, True])
def test_param_count_after_surgery_equals_budget_prediction(count_embeddings):
    arch = _bert.BertConfig.tiny()
    model = _bert.BertForSequenceClassification(arch, rngs=nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    structs = _structures.structures(arch)
    shapes = _budget.param_shapes(params)
    bstructs = _apt_arch.budget_structures(structs, shapes, count_embeddings=count_embeddings)
    keep = _random_keep(structs, seed=1)
    predicted = int(_budget.kept_param_count(keep, bstructs, shapes))
    new_arch, new_params = surgery.prune(arch, params, keep, structures=structs)
    new_shapes = _budget.param_shapes(new_params)
    new_b = _apt_arch.budget_structures(
        _structures.structures(new_arch), new_shapes, count_embeddings=count_embeddings)
    assert _budget.total_prunable_params(new_b, new_shapes) == predicted
    if count_embeddings:  # everything outside the budget is untouched by surgery
        total = sum(math.prod(s) for s in shapes.values())
        new_total = sum(math.prod(s) for s in new_shapes.values())
        unbudgeted = total - _budget.total_prunable_params(bstructs, shapes)
        assert new_total == unbudgeted + predicted


def _mask_states(cfg, scale=None):
    """The method's mask transform run for ``train.steps`` updates (through every pruning step)
    on random salience, that of the structures in ``scale`` multiplied by their factor. Yields
    ``(method, state)`` after each update."""
    scale = scale or {}
    method = _method.build_method(cfg.prune, run_cfg=cfg)
    tx = method.transform()
    params = {'w': jnp.zeros(3)}
    state = tx.init(params)
    rng = np.random.default_rng(0)
    update = jax.jit(lambda s, sal: tx.update(params, s, params, salience=sal)[1])
    for _ in range(cfg.train.steps):
        sal = {(s.kind, s.layer): jnp.asarray(rng.random(s.size), jnp.float32)
               * scale.get((s.kind, s.layer), 1.0) for s in method.budget_structures}
        state = update(state, sal)
        yield method, state


def test_mask_transform_never_revives_dead_units(tmp_path):
    cfg = _cfg(tmp_path, 'train.steps=12', 'prune.num_pruning_steps=2')
    dead = None
    for _, state in _mask_states(cfg):
        alive = {k: np.asarray(v) for k, v in state.alive.items()}
        if dead is not None:  # a unit that died stays dead with mask 0
            for k, a in alive.items():
                assert not np.any(a & dead[k])
                assert np.all(np.asarray(state.masks['units'][k])[dead[k]] == 0)
        dead = {k: ~v for k, v in alive.items()}
    assert int(state.prune_count) == 12
    assert any(d.any() for d in dead.values())  # the test pruned something


def _alive_after_masks(cfg, scale):
    """Alive counts per structure after :func:`_mask_states`, and the structure sizes."""
    *_, (method, state) = _mask_states(cfg, scale)
    return {k: int(np.asarray(v).sum()) for k, v in state.alive.items()}, {
        (s.kind, s.layer): s.size for s in method.budget_structures}


def test_min_keep_fraction_floors_every_structure(tmp_path):
    # Layer 1's heads and layer 0's neurons look useless: the pure global ranking empties them,
    # the floor keeps a quarter of each (and of every other structure).
    scale = {('heads', 1): 1e-4, ('mlp', 0): 1e-4}
    base = ('train.steps=12', 'prune.num_pruning_steps=2')
    free, sizes = _alive_after_masks(_cfg(tmp_path, *base), scale)
    floored, _ = _alive_after_masks(_cfg(tmp_path, *base, 'prune.min_keep_fraction=0.25'), scale)
    floor = {k: math.ceil(0.25 * n) for k, n in sizes.items()}
    assert any(free[k] < floor[k] for k in scale), free
    assert all(floored[k] >= floor[k] for k in sizes), (floored, floor)
    with pytest.raises(ValueError, match=r'prune.min_keep_fraction=1.5 must be in \[0, 1\]'):
        _cfg(tmp_path, 'prune.min_keep_fraction=1.5')


def test_hidden_distillation_matches_reference(tmp_path):
    """Layer-wise MSE, its weight in the loss and the projection gradient vs a plain computation."""
    cfg = _cfg(tmp_path, 'train.steps=12', 'prune.num_pruning_steps=2', 'prune.hidden_weight=0.7')
    s = _loop.setup(cfg)
    method = s.method
    masks = optax.tree.get(s.state.opt_state, 'masks')
    key = (jax.random.key(i) for i in itertools.count())
    masks = {
        **masks,
        'mu': jnp.float32(0.4),
        'units': {k: jax.random.uniform(next(key), v.shape) for k, v in masks['units'].items()},
        'teacher': jax.tree.map(
            lambda x: x + 0.1 * jax.random.normal(next(key), x.shape), masks['teacher']),
        'hidden_proj': {'kernel': masks['hidden_proj']['kernel']
                        + 0.1 * jax.random.normal(next(key), masks['hidden_proj']['kernel'].shape)},
    }
    trainable = jax.tree.map(lambda x: x + 0.05 * jnp.ones_like(x), s.state.trainable)
    ids = jnp.asarray(np.random.default_rng(0).integers(1, 200, (3, 7)), jnp.int32)
    am = jnp.asarray([[1] * 7, [1] * 5 + [0] * 2, [1] * 3 + [0] * 4], jnp.int32)
    batch = {'input_ids': ids, 'attention_mask': am, 'labels': jnp.asarray([0, 1, 1])}
    (loss, aux), _, extra = method.value_and_grad(
        None, trainable, s.rest, batch, masks, None, graphdef=s.graphdef)

    student = nnx.merge(s.graphdef, trainable, s.rest)
    teacher = nnx.merge(s.graphdef, masks['teacher'], s.rest)
    _, hs = student(ids, am, masks=method.model_masks(masks), output_hidden_states=True)
    _, ht = teacher(ids, am, masks=method.model_masks({'units': {}, 'rank': masks['rank']}),
                    output_hidden_states=True)
    w = np.asarray(am, np.float64)

    def mse(kernel):
        per_layer = [
            jnp.sum(jnp.mean((a @ k - b) ** 2, -1) * w) / w.sum()
            for a, b, k in zip(hs, ht, kernel, strict=True)
        ]
        return sum(per_layer) / len(per_layer)

    kernel = masks['hidden_proj']['kernel']
    np.testing.assert_allclose(aux['hidden_mse'], mse(kernel), rtol=1e-5)
    np.testing.assert_allclose(
        loss, 0.4 * (aux['kl'] + 0.7 * aux['hidden_mse']) + 0.6 * aux['ce'], rtol=1e-5)
    ref_grad = jax.grad(lambda k: 0.4 * 0.7 * mse(k))(kernel)
    np.testing.assert_allclose(extra['proj_grads']['kernel'], ref_grad, rtol=1e-4, atol=1e-7)
    # The transform takes an Adam step on the projections (past warmup's lr=0 at step 0).
    tx = method.transform()
    masks['hidden_proj_opt'] = {**masks['hidden_proj_opt'], 'step': jnp.int32(5)}
    state = optax.tree.set(tx.init(trainable), masks=masks)
    zeros = {k: jnp.zeros_like(v) for k, v in masks['units'].items()}
    _, new = tx.update(trainable, state, trainable, salience=zeros,
                       proj_grads=extra['proj_grads'])
    moved = np.asarray(new.masks['hidden_proj']['kernel'] - kernel)
    assert np.all(np.sign(moved[np.abs(ref_grad) > 1e-6]) == -np.sign(
        np.asarray(ref_grad)[np.abs(ref_grad) > 1e-6]))
    assert int(new.masks['hidden_proj_opt']['step']) == 6
    # hidden_weight=0: no projections, no hidden term.
    cfg0 = _cfg(tmp_path, 'train.steps=12', 'prune.num_pruning_steps=2', 'prune.hidden_weight=0')
    s0 = _loop.setup(cfg0)
    assert 'hidden_proj' not in optax.tree.get(s0.state.opt_state, 'masks')
    # Unset: on for encoders, off for causal LMs (massive residual activations), unless set.
    assert method.hidden and _method.build_method(
        _cfg(tmp_path).prune, run_cfg=_cfg(tmp_path)).hidden_weight == 1.0
    lm = ['model.name_or_path=tiny-llama', 'model.task=causal_lm', 'data.dataset=tiny-text']
    assert not _method.build_method(_cfg(tmp_path, *lm).prune, run_cfg=_cfg(tmp_path, *lm)).hidden
    lm_on = _cfg(tmp_path, *lm, 'prune.hidden_weight=0.5')
    assert _method.build_method(lm_on.prune, run_cfg=lm_on).hidden


@pytest.mark.parametrize('seed,bitfit', [(0, False), (1, False), (0, True)])
def test_pruning_step_compacted_equals_masked(tmp_path, seed, bitfit):
    """Hard masks -> surgery: logits equal (atol 1e-5), params match the budget, ranks grow."""
    # Seed 1 also averages the params (train.param_ema): the average must be cut like them.
    # bitfit: every bias and norm scale trains too (lora.head_modules), so the surgery cuts
    # trainable q/k/v/up biases (heads, neurons) and trainable norms (hidden dims).
    cfg = _cfg(tmp_path, 'train.steps=12', 'prune.num_pruning_steps=2',
               *(['train.param_ema=0.9'] if seed else []),
               *(['lora.head_modules=[classifier,pooler,bias,scale]'] if bitfit else []))
    s = _loop.setup(cfg)
    method = s.method
    opt_state = s.state.opt_state
    keep = _random_keep(method.structures, seed)
    masks = optax.tree.get(opt_state, 'masks')
    units = {k: jnp.asarray(v, jnp.float32) for k, v in keep.items()}
    proj = jax.random.normal(jax.random.key(seed), masks['hidden_proj']['kernel'].shape)
    proj_opt = {**masks['hidden_proj_opt'], 'm': {'kernel': proj + 1.0}}
    opt_state = optax.tree.set(opt_state, masks={
        **masks, 'units': units, 'hidden_proj': {'kernel': proj}, 'hidden_proj_opt': proj_opt})
    ts = s.state._replace(opt_state=opt_state)
    # Make the adapters non-trivial so the masked/compacted comparison covers LoRA too.
    trainable = jax.tree.map(
        lambda x: x + 0.05 * jax.random.normal(jax.random.key(seed), x.shape, x.dtype),
        ts.trainable)
    ts = ts._replace(trainable=trainable)
    if bitfit:  # the biases and norms of every block are among the perturbed trainable params
        paths = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(trainable)}
        assert any("'attn_norm']['scale']" in p for p in paths)
        assert any("'up']['bias']" in p for p in paths)
    if seed:  # one averaged update equal to the current params: the average is the params
        ts = ts._replace(opt_state=jax.tree.map(
            lambda x: x._replace(count=jnp.ones_like(x.count), weight=jnp.float32(0.1),
                                 ema=jax.tree.map(lambda p: 0.1 * p, trainable))
            if isinstance(x, transforms.ParamEmaState) else x,
            ts.opt_state, is_leaf=lambda x: isinstance(x, transforms.ParamEmaState)))
    model = nnx.merge(s.graphdef, ts.trainable, s.rest)
    batch = method._probe()
    masked = model(batch['input_ids'], batch['attention_mask'],
                   masks=method.model_masks({'units': units, 'rank': masks['rank']}))
    old_ranks = {k: int(np.sum(np.asarray(v) > 0)) for k, v in masks['rank'].items()}
    count = method.steps[-1]  # LoRA growth starts after the first pruning step
    old_bucket = method.bucket
    new = method.pruning_step(count, _method.LoopState(s.graphdef, ts, s.rest))
    assert method.bucket > old_bucket  # the adapters were resized to a larger bucket as well
    assert new.graphdef is not s.graphdef  # shapes changed: the loop re-jits
    new_masks = optax.tree.get(new.state.opt_state, 'masks')
    compacted = nnx.merge(new.graphdef, new.state.trainable, new.rest)(
        batch['input_ids'], batch['attention_mask'], masks=method.model_masks(new_masks))
    np.testing.assert_allclose(np.asarray(compacted), np.asarray(masked), atol=1e-5)
    assert method.events[-1]['compaction_max_abs_diff'] <= 1e-5
    # Physical size == budget prediction on the original model.
    predicted = int(_budget.kept_param_count(
        keep, _apt_arch.budget_structures(
            _structures.structures(_bert.BertConfig.tiny(vocab_size=264)),
            _budget.param_shapes(nnx.to_pure_dict(_structures.abstract_params(
                _bert.BertConfig.tiny(vocab_size=264)))), count_embeddings=False),
        _budget.param_shapes(nnx.to_pure_dict(_structures.abstract_params(
            _bert.BertConfig.tiny(vocab_size=264))))))
    assert _budget.total_prunable_params(method.budget_structures, method.shapes) == predicted
    assert method.events[-1]['density'] == pytest.approx(predicted / method.budget_base)
    # Adam moments and the teacher snapshot were sliced like the params.
    nu = optax.tree.get(new.state.opt_state, 'nu')
    assert jax.tree.map(jnp.shape, nu) == jax.tree.map(jnp.shape, new.state.trainable)
    teacher = new_masks['teacher']
    assert jax.tree.map(jnp.shape, teacher) == jax.tree.map(jnp.shape, new.state.trainable)
    if seed:  # the parameter average was sliced and rank-resized exactly like the params
        avg = transforms.averaged_params(new.state.trainable, new.state.opt_state)
        for a, b in zip(jax.tree.leaves(avg), jax.tree.leaves(new.state.trainable)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    # The distillation projections (and their Adam moments) lost the pruned hidden dims.
    idx = np.flatnonzero(keep[('hidden', None)])
    assert len(idx) < proj.shape[-1]
    np.testing.assert_array_equal(new_masks['hidden_proj']['kernel'],
                                  np.asarray(proj)[:, idx][:, :, idx])
    np.testing.assert_array_equal(new_masks['hidden_proj_opt']['m']['kernel'],
                                  np.asarray(proj + 1.0)[:, idx][:, :, idx])
    # Ranks grew for some adapters and never shrank; none exceeds max_rank.
    ranks = {k: int(np.sum(np.asarray(v) > 0)) for k, v in new_masks['rank'].items()}
    assert all(ranks[k] >= old_ranks[k] for k in ranks)
    assert any(ranks[k] > old_ranks[k] for k in ranks)
    assert max(ranks.values()) <= cfg.prune.max_rank


def test_dense_teacher_keeps_the_unpruned_model(tmp_path):
    """prune.teacher=dense: the unpruned backbone + the student's params as of the window start,
    untouched by surgery; the distillation terms against it match a plain computation."""
    cfg = _cfg(tmp_path, 'train.steps=24', 'prune.num_pruning_steps=2', 'prune.teacher=dense',
               'prune.prune_start_fraction=0.5', 'prune.hidden_weight=0.7')
    s = _loop.setup(cfg)
    method = s.method
    begin = method.distill_begin
    assert 0 < begin < method.steps[0]
    masks = optax.tree.get(s.state.opt_state, 'masks')
    assert all(not np.any(x) for x in jax.tree.leaves(masks['teacher_rest']))
    # After the first step the state holds a copy of the unpruned backbone.
    ls = method.on_step_end(1, _method.LoopState(s.graphdef, s.state, s.rest))
    masks = optax.tree.get(ls.state.opt_state, 'masks')
    jax.tree.map(np.testing.assert_array_equal, masks['teacher_rest'], s.rest)
    # The teacher follows the student before the window opens, and is frozen from then on.
    tx = method.transform()
    moved = jax.tree.map(lambda x: x + 1.0, s.state.trainable)
    zeros = {k: jnp.zeros_like(v) for k, v in masks['units'].items()}
    st = tx.init(s.state.trainable)
    for count, want in ((begin - 1, moved), (begin, st.masks['teacher'])):
        _, new = tx.update(moved, st._replace(prune_count=jnp.int32(count)), moved,
                           salience=zeros)
        jax.tree.map(np.testing.assert_array_equal, new.masks['teacher'], want)
    # A pruning step leaves the teacher alone; the projections lose only student-side dims.
    key = (jax.random.key(i) for i in itertools.count())
    keep = _random_keep(method.structures, 3)
    d = method.arch.hidden_size
    keep[('hidden', None)] = np.arange(d) % 3 != 0
    proj = jax.random.normal(next(key), masks['hidden_proj']['kernel'].shape)
    teacher = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(next(key), x.shape),
                           masks['teacher'])
    opt_state = optax.tree.set(ls.state.opt_state, masks={
        **masks, 'units': {k: jnp.asarray(v, jnp.float32) for k, v in keep.items()},
        'hidden_proj': {'kernel': proj}, 'teacher': teacher})
    ts = ls.state._replace(opt_state=opt_state, trainable=jax.tree.map(
        lambda x: x + 0.05 * jax.random.normal(next(key), x.shape, x.dtype), ls.state.trainable))
    new = method.pruning_step(method.steps[0], _method.LoopState(ls.graphdef, ts, ls.rest))
    nm = optax.tree.get(new.state.opt_state, 'masks')
    jax.tree.map(np.testing.assert_array_equal, nm['teacher'], teacher)
    jax.tree.map(np.testing.assert_array_equal, nm['teacher_rest'], s.rest)
    jax.tree.map(np.testing.assert_array_equal, nm['teacher_rank'], masks['teacher_rank'])
    idx = np.flatnonzero(keep[('hidden', None)])
    assert method.arch.hidden_size == len(idx) < d
    np.testing.assert_array_equal(nm['hidden_proj']['kernel'], np.asarray(proj)[:, idx, :])
    # Distillation terms of the compacted student against the dense teacher.
    nm = {**nm, 'mu': jnp.float32(0.4)}
    ids = jnp.asarray(np.random.default_rng(0).integers(1, 200, (3, 7)), jnp.int32)
    am = jnp.asarray([[1] * 7, [1] * 5 + [0] * 2, [1] * 3 + [0] * 4], jnp.int32)
    batch = {'input_ids': ids, 'attention_mask': am, 'labels': jnp.asarray([0, 1, 1])}
    (loss, aux), _, _ = method.value_and_grad(
        None, new.state.trainable, new.rest, batch, nm, None, graphdef=new.graphdef)
    student = nnx.merge(new.graphdef, new.state.trainable, new.rest)
    ls_, hs = student(ids, am, masks=method.model_masks(nm), output_hidden_states=True)
    dense = nnx.merge(method.teacher_graphdef, teacher, s.rest)
    lt, ht = dense(ids, am, masks=method.model_masks({'units': {}, 'rank': nm['teacher_rank']}),
                   output_hidden_states=True)
    assert hs[0].shape[-1] == len(idx) and ht[0].shape[-1] == d
    t = cfg.prune.temperature
    pt = jax.nn.softmax(lt / t)
    kl = np.mean(np.sum(pt * (jnp.log(pt) - jax.nn.log_softmax(ls_ / t)), -1)) * t * t
    w = np.asarray(am, np.float64)
    mse = np.mean([np.sum(np.mean((a @ k - b) ** 2, -1) * w) / w.sum()
                   for a, b, k in zip(hs, ht, nm['hidden_proj']['kernel'], strict=True)])
    assert kl > 1e-4
    np.testing.assert_allclose(aux['kl'], kl, rtol=1e-4)
    np.testing.assert_allclose(aux['hidden_mse'], mse, rtol=1e-4)
    np.testing.assert_allclose(loss, 0.4 * (kl + 0.7 * mse) + 0.6 * aux['ce'], rtol=1e-4)


def test_teacher_refresh_settings_are_checked(tmp_path):
    with pytest.raises(ValueError, match=r"prune.teacher_refresh='latest' must be one of"):
        _cfg(tmp_path, 'prune.teacher_refresh=latest')
    with pytest.raises(ValueError, match="prune.teacher_refresh=eval.*prune.teacher='dense'"):
        _cfg(tmp_path, 'prune.teacher_refresh=eval', 'prune.teacher=dense')
    cfg = _cfg(tmp_path, 'prune.teacher_refresh=eval', 'train.eval_every=0')
    with pytest.raises(ValueError, match='train.eval_every=0'):
        _method.build_method(cfg.prune, run_cfg=cfg)


def _teacher(ls):
    return optax.tree.get(ls.state.opt_state, 'masks')['teacher']


@pytest.mark.parametrize('max_rank', [16, 8])  # growth with a bucket resize / inside the bucket
def test_eval_refresh_keeps_the_best_student_through_a_pruning_step(tmp_path, max_rank):
    """prune.teacher_refresh=eval: the snapshot takes the student only when the validation
    accuracy improves, and a pruning step prunes and rank-resizes it with the student, so its
    logits on the compacted backbone equal its masked logits before (even as ranks grow)."""
    cfg = _cfg(tmp_path, 'train.steps=12', 'prune.num_pruning_steps=2',
               'prune.teacher_refresh=eval', 'train.eval_every=2', f'prune.max_rank={max_rank}')
    s = _loop.setup(cfg)
    m = s.method
    key = (jax.random.key(i) for i in itertools.count())

    def moved(ls):
        return _method.LoopState(ls.graphdef, ls.state._replace(trainable=jax.tree.map(
            lambda x: x + 0.05 * jax.random.normal(next(key), x.shape, x.dtype),
            ls.state.trainable)), ls.rest)

    ls = moved(_method.LoopState(s.graphdef, s.state, s.rest))
    best = ls.state.trainable
    ls = m.on_eval(2, {'accuracy': 0.6, 'loss': 0.7}, ls)
    jax.tree.map(np.testing.assert_array_equal, _teacher(ls), best)
    ls = moved(ls)
    for acc in (0.5, 0.6):  # not better than 0.6: the teacher stays
        ls = m.on_eval(4, {'accuracy': acc, 'loss': 0.1}, ls)
        jax.tree.map(np.testing.assert_array_equal, _teacher(ls), best)
    assert m.best_eval == 0.6 and m.checkpoint_meta()['best_eval'] == 0.6
    refreshes = [e for e in train.read_metrics(tmp_path) if e['event'] == 'teacher_refresh']
    assert [(e['step'], e['score']) for e in refreshes] == [(2, 0.6)]
    # A pruning step with growth (the last one) and random hard masks.
    masks = optax.tree.get(ls.state.opt_state, 'masks')
    units = {k: jnp.asarray(v, jnp.float32) for k, v in _random_keep(m.structures, 5).items()}
    ls = _method.LoopState(ls.graphdef, ls.state._replace(
        opt_state=optax.tree.set(ls.state.opt_state, masks={**masks, 'units': units})), ls.rest)
    batch = m._probe()

    def teacher_logits(graphdef, teacher, rest, masks):
        model = nnx.merge(graphdef, teacher, rest)
        return np.asarray(model(batch['input_ids'], batch['attention_mask'],
                                masks=m.model_masks(masks)))

    before = teacher_logits(ls.graphdef, best, ls.rest, {'units': units, 'rank': masks['rank']})
    bucket = m.bucket
    new = m.pruning_step(m.steps[-1], ls)
    nm = optax.tree.get(new.state.opt_state, 'masks')
    assert new.graphdef is not ls.graphdef
    assert jax.tree.map(jnp.shape, nm['teacher']) == jax.tree.map(jnp.shape, new.state.trainable)
    grown = [k for k in nm['rank'] if np.sum(nm['rank'][k]) > np.sum(masks['rank'][k])]
    assert grown and (m.bucket > bucket) == (max_rank > bucket)
    after = teacher_logits(new.graphdef, nm['teacher'], new.rest, {'units': {}, 'rank': nm['rank']})
    np.testing.assert_allclose(after, before, atol=1e-5)
    student = teacher_logits(new.graphdef, new.state.trainable, new.rest,
                             {'units': {}, 'rank': nm['rank']})
    assert np.max(np.abs(student - after)) > 1e-3  # the teacher is not the current student
    # The best score survives a resume.
    fresh = _method.build_method(cfg.prune, run_cfg=cfg)
    fresh.restore(m.checkpoint_meta(), _method.LoopState(s.graphdef, s.state, s.rest))
    assert fresh.best_eval == 0.6


def test_training_refreshes_the_teacher_at_evals_that_improve(tmp_path):
    """The loop hands every periodic validation to ``on_eval``: a refresh is logged exactly at
    the evaluations that beat the best accuracy so far (the first always does)."""
    cfg = _cfg(tmp_path, 'train.steps=12', 'prune.num_pruning_steps=2', 'train.eval_every=3',
               'prune.teacher_refresh=eval', 'prune.check_compaction=false')
    _loop.train(cfg, progress=False)
    events = train.read_metrics(tmp_path)
    evals = [(e['step'], e['accuracy']) for e in events if e['event'] == 'eval' and e['step'] < 12]
    assert [step for step, _ in evals] == [3, 6, 9]
    best, want = -1.0, []
    for step, acc in evals:
        if acc > best:
            best, want = acc, [*want, (step, acc)]
    assert [(e['step'], e['score']) for e in events if e['event'] == 'teacher_refresh'] == want


def test_compact_every_skips_surgery_until_a_compacting_step(tmp_path):
    """``prune.compact_every=2``: the first pruning step keeps every shape (same graphdef, so no
    re-jit; nothing recorded to replay); the second removes the units dead at *either* step,
    and its compacted logits equal the masked model's."""
    cfg = _cfg(tmp_path, 'train.steps=12', 'prune.num_pruning_steps=3', 'prune.compact_every=2')
    s = _loop.setup(cfg)
    method = s.method
    assert [method.compacts(c) for c in method.steps] == [False, True, True]
    keep1 = _random_keep(method.structures, 0, p=0.8)
    keep2 = {k: v & _random_keep(method.structures, 1, p=0.8)[k] for k, v in keep1.items()}

    def with_units(ts, keep):
        units = {k: jnp.asarray(v, jnp.float32) for k, v in keep.items()}
        m = optax.tree.get(ts.opt_state, 'masks')
        return ts._replace(opt_state=optax.tree.set(ts.opt_state, masks={**m, 'units': units}))

    trainable = jax.tree.map(  # non-trivial adapters: the comparison covers LoRA too
        lambda x: x + 0.05 * jax.random.normal(jax.random.key(0), x.shape, x.dtype),
        s.state.trainable)
    ts = with_units(s.state._replace(trainable=trainable), keep1)
    first = method.pruning_step(method.steps[0], _method.LoopState(s.graphdef, ts, s.rest))
    assert first.graphdef is s.graphdef  # masks only: the loop keeps its compiled step
    assert (jax.tree.map(jnp.shape, first.state.trainable)
            == jax.tree.map(jnp.shape, s.state.trainable))
    assert method.surgeries[-1]['keep'] is None and method.recompiles == 0
    assert method.events[-1]['compacted'] is False
    ts = with_units(first.state, keep2)
    batch = method._probe()
    model = nnx.merge(first.graphdef, ts.trainable, first.rest)
    rank = optax.tree.get(ts.opt_state, 'masks')['rank']
    units = {k: jnp.asarray(v, jnp.float32) for k, v in keep2.items()}
    masked = model(batch['input_ids'], batch['attention_mask'],
                   masks=method.model_masks({'units': units, 'rank': rank}))
    second = method.pruning_step(method.steps[1], _method.LoopState(first.graphdef, ts, first.rest))
    assert second.graphdef is not first.graphdef and method.events[-1]['compacted'] is True
    new_masks = optax.tree.get(second.state.opt_state, 'masks')
    compacted = nnx.merge(second.graphdef, second.state.trainable, second.rest)(
        batch['input_ids'], batch['attention_mask'], masks=method.model_masks(new_masks))
    np.testing.assert_allclose(np.asarray(compacted), np.asarray(masked), atol=1e-5)
    assert method.events[-1]['compaction_max_abs_diff'] <= 1e-5
    arch = surgery.pruned_config(method.initial_arch, keep2, _structures.structures(
        method.initial_arch))
    assert method.arch == arch  # one surgery removed what both steps killed
    assert method.surgeries[-1]['keep'] is not None and method.recompiles == 1
    with pytest.raises(ValueError, match='prune.compact_every=0'):
        _cfg(tmp_path, 'prune.compact_every=0')


def test_compact_every_grows_ranks_as_compaction_does(tmp_path):
    """A masking pruning step sizes the LoRA growth by the adapters' live dims, so it grows the
    ranks a compacting step grows from the same masks (mutation: counting the dead dims too
    sets a larger initial budget and grows fewer ranks), and a step that must resize the LoRA
    bucket compacts even where ``prune.compact_every`` would only mask."""
    def two_steps(sub, every):
        cfg = _cfg(tmp_path / sub, 'train.steps=12', 'prune.num_pruning_steps=3',
                   f'prune.compact_every={every}')
        s = _loop.setup(cfg)
        method, state = s.method, _method.LoopState(s.graphdef, s.state, s.rest)
        keep1 = _random_keep(method.structures, 0, p=0.7)
        keep2 = {k: v & _random_keep(method.structures, 1, p=0.7)[k] for k, v in keep1.items()}
        for count, keep in zip(method.steps[:2], (keep1, keep2)):
            if method.surgeries and method.surgeries[-1]['keep'] is not None:
                keep = {k: v[keep1[k]] for k, v in keep.items()}  # units of the survivors
            ts = state.state
            m = optax.tree.get(ts.opt_state, 'masks')
            units = {k: jnp.asarray(v, jnp.float32) for k, v in keep.items()}
            ts = ts._replace(opt_state=optax.tree.set(ts.opt_state, masks={**m, 'units': units}))
            state = method.pruning_step(count, _method.LoopState(state.graphdef, ts, state.rest))
        return method, _active_ranks(s.state), _active_ranks(state.state)

    def _active_ranks(ts):
        ranks = optax.tree.get(ts.opt_state, 'masks')['rank']
        return {p: int(np.sum(np.asarray(r) > 0)) for p, r in ranks.items()}

    ref, start, ref_ranks = two_steps('every', 1)
    got, _, got_ranks = two_steps('k3', 3)
    assert [r['keep'] is None for r in ref.surgeries] == [False, False]
    assert [got.compacts(c) for c in got.steps] == [False, False, True]
    # The first step only masks; the second grows the LoRA bucket, which re-jits anyway, so it
    # compacts as well.
    assert [r['keep'] is None for r in got.surgeries] == [True, False]
    assert got.surgeries[1]['bucket'] > got.surgeries[0]['bucket']
    assert got.recompiles == 1
    assert got.init_tuning == ref.init_tuning
    assert got_ranks == ref_ranks
    assert sum(ref_ranks.values()) > sum(start.values())  # the steps did grow ranks


@pytest.mark.slow
def test_compact_every_masks_between_compactions(tmp_path):
    """``prune.compact_every=2`` of 3 pruning steps: the first only hardens the masks (shapes
    unchanged, no re-jit), the second removes every unit dead so far, the last always compacts;
    the compacted model equals the masked one each time, and up to the first pruning step the run
    is the every-step run."""
    from jaxprune import models

    def run(sub, every):
        cfg = _cfg(tmp_path / sub, 'train.steps=12', f'prune.compact_every={every}')
        _loop.train(cfg, progress=False)
        return _events(tmp_path / sub, 'prune')

    ref, got = run('every', 1), run('k2', 2)
    assert [e['compacted'] for e in ref] == [True] * 3
    assert [e['compacted'] for e in got] == [False, True, True]
    unpruned = _bert.BertConfig.tiny(vocab_size=264)
    assert got[0]['backbone_params'] == models.param_count(unpruned)  # not compacted ...
    assert got[0]['density'] < 0.9  # ... but the masks are hard and meet the budget
    for k in ('kept_heads', 'kept_mlp', 'hidden', 'density'):
        assert got[0][k] == ref[0][k]  # the same masks at the first pruning step
    for e in got:  # rank growth and compaction both preserve the function
        assert e['compaction_max_abs_diff'] <= 1e-5
    for a, b in itertools.pairwise(got):  # dead units stay dead through the masked stretch
        assert all(y <= x for x, y in zip(a['kept_mlp'] + a['kept_heads'],
                                          b['kept_mlp'] + b['kept_heads']))
    # Re-jits only where shapes changed: a compaction or a LoRA bucket resize.
    bucket, recompiles = 8, 0
    for e in got:
        recompiles += e['compacted'] or e['lora_bucket'] != bucket
        assert e['recompiles'] == recompiles
        bucket = e['lora_bucket']
    assert got[-1]['recompiles'] < ref[-1]['recompiles']
    # The compaction after the masked step removed every dead unit: the physical model holds
    # exactly the units the masks keep.
    last = got[-1]
    kept = dataclasses.replace(unpruned, hidden_size=last['hidden'],
                               layer_heads=tuple(max(h, 1) for h in last['kept_heads']),
                               layer_mlp=tuple(max(f, 1) for f in last['kept_mlp']))
    assert last['backbone_params'] == models.param_count(kept)


def test_batches_pad_to_max_len_after_the_first_surgery(tmp_path, monkeypatch):
    """Before the first pruning step batches keep their length buckets; from it on every batch is
    ``data.max_len`` long (one train-step compile per architecture), and a checkpoint records the
    padding so a resumed run pads the same way."""
    lengths = []
    place = _loop._place
    monkeypatch.setattr(_loop, '_place', lambda b, sh: (lengths.append(b['input_ids'].shape),
                                                        place(b, sh))[1])
    cfg = _cfg(tmp_path, 'train.steps=6', 'prune.num_pruning_steps=1', 'checkpoint.every=2',
               'checkpoint.keep=3', 'prune.check_compaction=false', 'train.eval_every=0',
               'data.eval_batch_size=5', 'data.max_len=64')  # rows bucket to 48
    _loop.train(cfg, progress=False)
    [prune] = _events(tmp_path, 'prune')
    first = prune['step']
    train = [t for b, t in lengths if b == cfg.data.batch_size]  # evaluation batches hold 5 rows
    assert len(train) == 6 and 0 < first < 6
    assert max(train[:first]) < cfg.data.max_len
    assert set(train[first:]) == {cfg.data.max_len}
    ckpts = checkpoint.Checkpointer(cfg.checkpoint_dir)
    assert ckpts.read_meta(2)['pad_len'] is None
    assert ckpts.read_meta(6)['pad_len'] == cfg.data.max_len


def test_zero_inactive_ranks_keeps_the_adapter_output_under_grown_masks():
    from jaxprune.lora import _grow

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 4)).astype(np.float32), rng.normal(size=(4, 3)).astype(np.float32)
    tree = {'layers': [{'q': {'lora_a': jnp.asarray(a), 'lora_b': jnp.asarray(b),
                              'kernel': jnp.ones((5, 3))}}]}
    mask = np.array([1.0, 1.0, 0.0, 0.0])
    out = _grow.zero_inactive_ranks(tree, {('layers', 0, 'q'): jnp.asarray(mask)})
    q = out['layers'][0]['q']
    np.testing.assert_array_equal(q['lora_a'], a)
    np.testing.assert_array_equal(q['kernel'], np.ones((5, 3)))
    np.testing.assert_array_equal(q['lora_b'][2:], 0.0)
    grown = np.ones(4)  # every component switched on
    np.testing.assert_allclose(np.asarray(q['lora_a']) @ (grown[:, None] * np.asarray(q['lora_b'])),
                               a @ (mask[:, None] * b))


@pytest.fixture(scope='module')
def cli_run(tmp_path_factory):
    from jaxprune import cli

    run_dir = tmp_path_factory.mktemp('apt_cli')
    rc = cli.main(['train', str(APT_TINY), f'run_dir={run_dir}', 'train.steps=12',
                   'prune.num_pruning_steps=2', 'train.log_every=4'])
    assert rc == 0
    return run_dir


@pytest.mark.slow
def test_cli_train_end_to_end(cli_run):
    events = [json.loads(x) for x in (cli_run / 'metrics.jsonl').read_text().splitlines()]
    prune = [e for e in events if e['event'] == 'prune']
    assert [e['prune_count'] for e in prune] == [4, 9]  # pruning_steps(12, 2, end=0.75)
    for e in prune:
        assert e['compaction_max_abs_diff'] <= 1e-5  # compacted == masked at each step
        assert e['density'] <= e['target_density'] + 1e-6
        assert len(e['kept_heads']) == len(e['kept_mlp']) == len(e['lora_ranks']) == 2
    assert prune[-1]['density'] == pytest.approx(0.4, abs=0.05)
    # No revival: kept counts never increase from one pruning step to the next.
    for a, b in itertools.pairwise(prune):
        assert all(y <= x for x, y in zip(a['kept_heads'] + a['kept_mlp'],
                                          b['kept_heads'] + b['kept_mlp']))
        assert b['hidden'] <= a['hidden']
    assert prune[-1]['recompiles'] == 2
    final = [e for e in events if e['event'] == 'eval'][-1]
    assert final['step'] == 12 and 0.0 <= final['accuracy'] <= 1.0
    _, arch = _apt_export.load_pruned(cli_run / 'pruned')
    # A fully pruned structure keeps one zeroed unit (configs need >= 1 per layer).
    assert [arch.heads(i) for i in range(2)] == [max(h, 1) for h in prune[-1]['kept_heads']]
    assert [arch.mlp(i) for i in range(2)] == [max(f, 1) for f in prune[-1]['kept_mlp']]
    assert dataclasses.replace(arch).hidden_size == prune[-1]['hidden']


# ---- restore: the compacted model rebuilt from the checkpoint meta ----------------------------
PRUNED = ('train.steps=12', 'prune.num_pruning_steps=2', 'prune.max_rank=64', 'mesh.data=1',
          'prune.check_compaction=false')


def _prune_randomly(s, ls, count, seed):
    method, opt_state = s.method, ls.state.opt_state
    masks = optax.tree.get(opt_state, 'masks')
    units = {k: jnp.asarray(v, jnp.float32)
             for k, v in _random_keep(method.structures, seed).items()}
    ts = ls.state._replace(opt_state=optax.tree.set(opt_state, masks={**masks, 'units': units}))
    ts = ts._replace(trainable=jax.tree.map(  # non-trivial adapters
        lambda x: x + 0.05 * jax.random.normal(jax.random.key(seed), x.shape, x.dtype),
        ts.trainable))
    return method.pruning_step(count, _method.LoopState(ls.graphdef, ts, ls.rest))


def _pruned_ckpt(run_dir, *extra):
    """Both pruning steps (random cuts, rank growth, bucket resize) saved as the loop saves."""
    cfg = _cfg(run_dir, *PRUNED, *extra)
    s = _loop.setup(cfg)
    ls = s.method.on_step_end(1, _method.LoopState(s.graphdef, s.state, s.rest))
    for seed, count in enumerate(s.method.steps):
        ls = _prune_randomly(s, ls, count, seed)
        s.method.pruned_at.append(count)  # as on_step_end does
    s.graphdef, s.state, s.rest = ls.graphdef, ls.state, ls.rest
    with _loop._checkpointer(cfg) as ck:
        ck.save(9, s.state, _loop._meta(s, 9, 9))
    return cfg, s


@pytest.fixture(scope='module')
def pruned_ckpt(tmp_path_factory):
    return _pruned_ckpt(tmp_path_factory.mktemp('apt_pruned'))


@pytest.mark.parametrize('teacher', ['snapshot', 'dense'])
def test_restore_rebuilds_the_compacted_model_exactly(pruned_ckpt, tmp_path, teacher):
    # The dense teacher keeps the unpruned shapes in the state: the restore target has them too.
    cfg, live = pruned_ckpt if teacher == 'snapshot' else _pruned_ckpt(
        tmp_path, 'prune.teacher=dense')
    s = _loop.setup(cfg)
    with _loop._checkpointer(cfg) as ck:
        step, meta = _loop._restore(s, ck)
    assert step == 9 and meta['data_position'] == 9
    m, ref = s.method, live.method
    assert m.arch == ref.arch != _apt_arch.arch_config(cfg)  # really compacted
    assert m.bucket == ref.bucket > cfg.lora.rank  # and the LoRA bucket resized
    assert m.pruned_at == ref.pruned_at == list(ref.steps)
    assert m.checkpoint_meta() == ref.checkpoint_meta()  # growth reference, records, settings
    assert m.shapes == ref.shapes and m.budget_structures == ref.budget_structures
    # State from the checkpoint; the frozen backbone replayed from the original weights, bit-exact.
    jax.tree.map(np.testing.assert_array_equal, s.state, live.state)
    jax.tree.map(np.testing.assert_array_equal, s.rest, live.rest)
    if teacher == 'dense':  # the unpruned backbone came back from the checkpoint
        t_rest = optax.tree.get(s.state.opt_state, 'masks')['teacher_rest']
        jax.tree.map(np.testing.assert_array_equal, t_rest, _loop.setup(cfg).rest)
    batch = m._probe()

    def logits(x):
        masks = x.method.model_masks(optax.tree.get(x.state.opt_state, 'masks'))
        model = nnx.merge(x.graphdef, x.state.trainable, x.rest)
        return np.asarray(model(batch['input_ids'], batch['attention_mask'], masks=masks))

    np.testing.assert_allclose(logits(s), logits(live), rtol=1e-6, atol=0)


@pytest.mark.parametrize('teacher', ['snapshot', 'dense'])
def test_surgery_output_is_resharded_on_the_mesh(tmp_path, teacher):
    """On a data=2 x fsdp=2 x tensor=2 mesh, the compacted state after a pruning step is laid
    out by the sharding rules (as a fresh run at the new shapes), and a step still runs. A dense
    teacher's unpruned backbone (in the optimizer state) is laid out like the backbone."""
    cfg = _cfg(tmp_path, *PRUNED[:-2], 'mesh.data=2', 'mesh.fsdp=2', 'mesh.tensor=2',
               'prune.check_compaction=false', f'prune.teacher={teacher}')
    s = _loop.setup(cfg)
    assert s.mesh.shape == {'data': 2, 'fsdp': 2, 'tensor': 2}
    ls = s.method.on_step_end(1, _method.LoopState(s.graphdef, s.state, s.rest))
    if teacher == 'dense':
        unpruned = s.rest
        t_rest = optax.tree.get(ls.state.opt_state, 'masks')['teacher_rest']
        for x, y in zip(jax.tree.leaves(t_rest), jax.tree.leaves(unpruned), strict=True):
            assert x.sharding.is_equivalent_to(y.sharding, x.ndim), (x.shape, x.sharding)
        assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(t_rest))
    ls = _prune_randomly(s, ls, s.method.steps[0], 0)
    assert _loop._adopt(s, ls) and s.graphdef is ls.graphdef
    want_state, want_rest = _loop._shardings(s.tx, s.state.trainable, s.rest, s.mesh)
    for got, want in ((s.state, want_state), (s.rest, want_rest)):
        for x, sh in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            assert x.sharding.is_equivalent_to(sh, x.ndim), (x.shape, x.sharding, sh)
    sharded = [x for x in jax.tree.leaves(s.rest) if not x.sharding.is_fully_replicated]
    assert sharded  # the rules really shard something of the pruned backbone
    jax.tree.map(np.testing.assert_array_equal, s.state, ls.state)  # values untouched
    step = train.make_train_step(s.graphdef, s.tx, task='classification', method=s.method)
    batch = s.method._probe()
    labels = jnp.zeros((batch['input_ids'].shape[0],), jnp.int32)
    _, m = step(s.state, s.rest, {**batch, 'labels': labels})
    assert np.isfinite(float(m['loss']))
    assert not _loop._adopt(s, _method.LoopState(s.graphdef, s.state, s.rest))


@pytest.mark.parametrize('override', [
    'prune.num_pruning_steps=3', 'prune.max_rank=32', 'train.steps=16', 'lora.rank=16',
    'prune.teacher=dense'])
def test_restore_with_changed_shape_setting_names_the_field(pruned_ckpt, override):
    cfg, _ = pruned_ckpt
    s = _loop.setup(_cfg(cfg.run_dir, *PRUNED, override))
    field = override.split('=')[0]
    with _loop._checkpointer(cfg) as ck:
        with pytest.raises(ValueError, match=re.escape(field) + '.*differ from the checkpoint'):
            _loop._restore(s, ck)
        assert ck.all_steps() == [9]  # a configuration error: nothing quarantined


# ---- kill-and-resume across pruning steps ---------------------------------------------------
# 12 steps, pruning at counts 3, 6 and 9, checkpoints at 4, 8 and 12; every step's loss is logged.
# LoRA ranks grow at 6 and 9 and the bucket is resized both times (max_rank=64 keeps the growth
# uncapped, so a wrong growth reference after resume changes the losses). distill_weight < 1 keeps
# the task loss (and so the gradients) non-zero after the last pruning step, when the teacher
# equals the student.
RESUME = ('train.steps=12', 'checkpoint.every=4', 'checkpoint.keep=3', 'train.log_every=1',
          'prune.distill_weight=0.5', 'prune.max_rank=64', 'mesh.data=1')


class _Crash(Exception):
    pass


def _crash_after(stop):
    """A ``_loop._checkpointer`` whose ``save`` dies right after writing step ``stop``."""

    class Crashing(checkpoint.Checkpointer):
        def save(self, step, state, meta=None):
            out = super().save(step, state, meta)
            if step == stop:
                raise _Crash(step)
            return out

    return lambda cfg: Crashing(cfg.checkpoint_dir, max_to_keep=cfg.checkpoint.keep)


def _resume_cfg(run_dir, *extra):
    return config.load_config(
        APT_TINY, [f'run_dir={run_dir}', 'prune.export_dir=null', *RESUME, *extra])


def _events(run_dir, kind):
    return [e for e in train.read_metrics(run_dir) if e['event'] == kind]


def _losses(run_dir):
    return {e['step']: e['loss'] for e in _events(run_dir, 'train')}  # last write wins


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
    run = tmp_path_factory.mktemp('apt_ref')
    final = _loop.train(_resume_cfg(run), progress=False)
    return run, final


@pytest.fixture(scope='module')
def crashed(tmp_path_factory):
    """A run that died after saving step 8 (two of three pruning steps done; checkpoints 4, 8)."""
    run = tmp_path_factory.mktemp('apt_crash')
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_loop, '_checkpointer', _crash_after(8))
        with pytest.raises(_Crash):
            _loop.train(_resume_cfg(run), progress=False)
    return run


def _copy(run, tmp_path):
    shutil.copytree(run, tmp_path / 'run')
    return tmp_path / 'run'


def _assert_same_run(run, ref_run, final, ref_final):
    """Per-step losses and the final eval equal the uninterrupted run's (rtol 1e-6)."""
    got, ref = _losses(run), _losses(ref_run)
    assert sorted(got) == sorted(ref) == list(range(1, 13))
    np.testing.assert_allclose([got[k] for k in ref], list(ref.values()), rtol=1e-6)
    assert final['step'] == ref_final['step'] == 12 and final['count'] == ref_final['count']
    np.testing.assert_allclose(
        [final['loss'], final['accuracy']], [ref_final['loss'], ref_final['accuracy']], rtol=1e-6)


@pytest.mark.slow
def test_checkpoint_meta_records_the_surgeries(crashed):
    with checkpoint.Checkpointer(crashed / 'checkpoints') as ck:
        assert ck.all_steps() == [4, 8]
        metas = {step: ck.read_meta(step)['method'] for step in (4, 8)}
    prunes = _events(crashed, 'prune')
    for step, n in ((4, 1), (8, 2)):
        m = metas[step]
        assert [r['count'] for r in m['surgeries']] == [3, 6][:n]
        assert m['settings']['prune.num_pruning_steps'] == 3
        # The recorded shapes are the ones the pruning step logged.
        e = prunes[n - 1]
        assert m['arch']['layer_mlp'] == [max(f, 1) for f in e['kept_mlp']]
        assert m['arch']['hidden_size'] == e['hidden']


@pytest.mark.slow
def test_resume_after_pruning_equals_uninterrupted_run(crashed, uninterrupted, tmp_path):
    ref_run, ref_final = uninterrupted
    run = _copy(crashed, tmp_path)
    cfg = _resume_cfg(run)
    final = _loop.train(cfg, progress=False)
    assert [e['step'] for e in _events(run, 'resume')] == [8]
    prunes = _events(run, 'prune')
    assert [e['prune_count'] for e in prunes] == [3, 6, 9]  # none re-done, the last after resume
    assert prunes[-1]['lora_bucket'] > prunes[0]['lora_bucket']  # a bucket resize was replayed
    _assert_same_run(run, ref_run, final, ref_final)
    # `jaxprune eval` restores the compacted checkpoint too and reproduces the final eval.
    again = _loop.evaluate(cfg)
    assert again['step'] == 12
    np.testing.assert_allclose(again['loss'], final['loss'], rtol=1e-6)


@pytest.mark.slow
def test_resume_falls_back_past_a_corrupt_step_to_other_shapes(crashed, uninterrupted, tmp_path):
    """Step 8 (two surgeries) is corrupt: resume from 4 (one surgery), prune again at 6 and 9."""
    ref_run, ref_final = uninterrupted
    run = _copy(crashed, tmp_path)
    for f in (run / 'checkpoints' / '8' / 'state').rglob('*'):
        if f.is_file() and f.parent.name == 'd':
            f.write_bytes(b'')
    final = _loop.train(_resume_cfg(run), progress=False)
    assert [e['step'] for e in _events(run, 'resume')] == [4]
    moved = list((run / 'checkpoints' / 'corrupt').iterdir())
    assert len(moved) == 1 and moved[0].name.startswith('8-')
    prunes = _events(run, 'prune')
    assert [e['prune_count'] for e in prunes] == [3, 6, 6, 9]  # 6 again after the resume
    for k in ('kept_heads', 'kept_mlp', 'hidden', 'lora_ranks', 'lora_bucket', 'recompiles'):
        assert prunes[2][k] == prunes[1][k], k  # the same cut and growth as before the crash
    _assert_same_run(run, ref_run, final, ref_final)


DENSE = ('prune.teacher=dense', 'prune.prune_start_fraction=0.25')  # window opens at count 3


@pytest.mark.slow
def test_resume_with_the_dense_teacher_equals_uninterrupted_run(tmp_path):
    """The dense teacher (unpruned backbone + params frozen at count 3) survives a crash after
    two pruning steps: the resumed run's losses equal the uninterrupted run's."""
    ref_run = tmp_path / 'ref'
    ref_final = _loop.train(_resume_cfg(ref_run, *DENSE), progress=False)
    run = tmp_path / 'crash'
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_loop, '_checkpointer', _crash_after(8))
        with pytest.raises(_Crash):
            _loop.train(_resume_cfg(run, *DENSE), progress=False)
    final = _loop.train(_resume_cfg(run, *DENSE), progress=False)
    assert [e['step'] for e in _events(run, 'resume')] == [8]
    assert len(_events(run, 'prune')) == 3 and _events(run, 'prune')[0]['prune_count'] > 3
    assert any(e['kl'] > 0 for e in _events(run, 'train'))  # the teacher was really used
    _assert_same_run(run, ref_run, final, ref_final)


@pytest.mark.slow
def test_resume_after_a_masking_pruning_step_equals_uninterrupted_run(tmp_path):
    """``prune.compact_every=3``: a crash after the first pruning step, which only hardened the
    masks (nothing to replay but the masks in the optimizer state), resumes to the
    uninterrupted run's losses and final eval."""
    every = ('prune.compact_every=3',)
    ref_run = tmp_path / 'ref'
    ref_final = _loop.train(_resume_cfg(ref_run, *every), progress=False)
    assert _events(ref_run, 'prune')[0]['compacted'] is False
    run = tmp_path / 'crash'
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_loop, '_checkpointer', _crash_after(4))
        with pytest.raises(_Crash):
            _loop.train(_resume_cfg(run, *every), progress=False)
    final = _loop.train(_resume_cfg(run, *every), progress=False)
    assert [e['step'] for e in _events(run, 'resume')] == [4]
    prunes = _events(run, 'prune')
    assert [e['prune_count'] for e in prunes] == [3, 6, 9]
    assert [e['compacted'] for e in prunes] == [e['compacted'] for e in _events(ref_run, 'prune')]
    _assert_same_run(run, ref_run, final, ref_final)


def test_fisher_salience_in_the_training_step(tmp_path):
    """prune.salience=fisher: the step's salience is the per-example mask Fisher of the loss.

    At the first step mu = 0, so the loss is the batch-mean cross-entropy; the reference takes
    ``jax.vmap`` of ``jax.grad`` of every example's cross-entropy with respect to all-ones model
    masks (heads, neurons and the hidden dims), divides by the batch size (the batch mean) and
    sums the squares over the batch.
    """
    from jaxprune.train import _step

    cfg = _cfg(tmp_path, 'prune.salience=fisher')
    s = _loop.setup(cfg)
    method = s.method
    assert not method.outlier
    masks = optax.tree.get(s.state.opt_state, 'masks')
    batch = method._probe()
    batch['labels'] = jnp.asarray([0, 1])
    (_, aux), _, extra = method.value_and_grad(
        None, s.state.trainable, s.rest, batch, masks, None, graphdef=s.graphdef)
    assert float(aux['mu']) == 0.0
    model = nnx.merge(s.graphdef, s.state.trainable, s.rest)
    model_masks = method.model_masks(masks)
    arch, b = method.arch, batch['input_ids'].shape[0]
    ones = {'hidden': jnp.ones(arch.hidden_size), 'layers': tuple(
        {'heads': jnp.ones(arch.heads(i)), 'mlp': jnp.ones(arch.mlp(i))}
        for i in range(arch.num_layers))}

    def example_loss(m, ids, am, label):
        full = {**model_masks, 'hidden': m['hidden'], 'layers': tuple(
            {**lm, **mm} for lm, mm in zip(model_masks['layers'], m['layers'], strict=True))}
        out = model(ids[None], am[None], masks=full)
        return _step.loss_sums(out, label[None], task='classification')['loss_sum']

    per_ex = jax.vmap(jax.grad(example_loss), in_axes=(None, 0, 0, 0))(
        ones, batch['input_ids'], batch['attention_mask'], batch['labels'])
    got = extra['salience']
    for i, m in enumerate(per_ex['layers']):
        for kind in ('heads', 'mlp'):
            want = ((np.asarray(m[kind], np.float64) / b) ** 2).sum(0)
            np.testing.assert_allclose(got[(kind, i)], want, rtol=1e-3, atol=1e-12)
    want = ((np.asarray(per_ex['hidden'], np.float64) / b) ** 2).sum(0)
    np.testing.assert_allclose(got[('hidden', None)], want, rtol=1e-3, atol=1e-12)
    with pytest.raises(ValueError, match='prune.salience=fisher set prune.outlier=false'):
        _cfg(tmp_path, 'prune.salience=fisher', 'prune.outlier=true')
    with pytest.raises(ValueError, match=r"prune.salience='fischer' must be one of"):
        _cfg(tmp_path, 'prune.salience=fischer')


def test_fisher_step_on_the_mesh_equals_one_device(tmp_path):
    """prune.salience=fisher on a data=2 x fsdp=2 x tensor=2 mesh: the per-example mask taps
    are split over the data axis, and the step's loss and salience EMA equal one device's."""
    out = {}
    for name, mesh in (('mesh', ('mesh.data=2', 'mesh.fsdp=2', 'mesh.tensor=2')),
                       ('one', ('mesh.data=1',))):
        s = _loop.setup(_cfg(tmp_path / name, 'prune.salience=fisher', *mesh))
        assert s.mesh.devices.size == (8 if name == 'mesh' else 1)
        step = train.make_train_step(s.graphdef, s.tx, task='classification', method=s.method)
        batch = {**s.method._probe(), 'labels': jnp.asarray([0, 1], jnp.int32)}
        state, m = step(s.state, s.rest, batch)
        ema = optax.tree.get(state.opt_state, 'salience_ema')
        out[name] = float(m['loss']), jax.tree.map(np.asarray, ema)
    assert out['mesh'][0] == pytest.approx(out['one'][0], rel=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-12),
                 out['mesh'][1], out['one'][1])
    assert any(float(v.sum()) > 0 for v in jax.tree.leaves(out['one'][1]))
