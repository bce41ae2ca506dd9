"""ATP end to end: exact-budget projection, dim surgery, export == masked model, the driver."""

import json
import pathlib

import disp_masks
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxprune import config, lora, models, surgery
from jaxprune.masks import _density
from jaxprune.methods import _atp_cfg, _atp_train
from jaxprune.scores import _atp_generator
from jaxprune.surgery import _dims

ROOT = pathlib.Path(__file__).resolve().parents[2]
ALL = r'.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)'


def _lora_model(cfg, seed=0):
    """A tiny Llama with LoRA on every projection and non-zero B (so merging matters)."""
    model = models.Llama(cfg, lora=lora.LoraSpec(rank=4, alpha=8.0, targets=ALL),
                         rngs=nnx.Rngs(seed))
    key = jax.random.key(seed + 1)
    for _, node in nnx.iter_graph(model):
        if getattr(node, 'lora_b', None) is not None:
            key, sub = jax.random.split(key)
            node.lora_b[...] = 0.1 * jax.random.normal(sub, node.lora_b[...].shape)
    return model


@pytest.mark.parametrize('jit', [False, True])
@pytest.mark.parametrize('seed,keep,empty_layer', [(0, 0.6, None), (1, 0.3, 1), (2, 1.0, None)])
def test_compact_matches_reference(seed, keep, empty_layer, jit):
    """Compact forward == masked Llama (f32, atol 1e-5); stored params == reference count."""
    cfg = models.LlamaConfig.tiny()
    model = models.Llama(cfg, rngs=nnx.Rngs(seed))
    masks = disp_masks.random_masks(cfg, seed, keep, empty_layer)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    c = _dims.compact(cfg, params, masks)
    ids = jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab_size, (2, 11)), jnp.int32)
    att = jnp.ones((2, 11), jnp.int32).at[1, 8:].set(0)
    fwd = lambda c, ids, att: _dims.compact_forward(c, ids, att, config=cfg)
    fwd = jax.jit(fwd) if jit else fwd
    got = fwd(c, ids, att)
    want = model(ids, att, masks=masks)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
    dims = _density.layer_dims(cfg)
    assert _dims.projection_param_count(c) == disp_masks.reference_kept(masks, dims)


def test_compact_rejects_unmerged_lora():
    cfg = models.LlamaConfig.tiny()
    params = nnx.to_pure_dict(nnx.state(_lora_model(cfg), nnx.Param))
    with pytest.raises(ValueError, match='merge'):
        _dims.compact(cfg, params, None)


def _gen_logits(cfg, seed):
    groups = _atp_generator.mask_groups(cfg)
    params = _atp_generator.generator_init(jax.random.key(seed), groups, width=16, num_layers=1,
                                           head_scale=1.0)
    return _atp_generator.generator_apply(params)


@pytest.mark.parametrize('target', [0.25, 0.6, 0.9])
def test_project_masks_matches_reference(target):
    cfg = models.LlamaConfig.tiny()
    dims = _density.layer_dims(cfg)
    logits = _gen_logits(cfg, 0)
    got = _atp_train.project_masks(logits, dims, target_density=target, bias=0.5)
    want, _ = disp_masks.reference_projection(logits, dims, target, 0.5)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


@pytest.mark.parametrize('target', [0.4, 0.6, 0.75])
def test_project_masks_exact_budget(target):
    """density <= target < density(next unit); so |density - target| <= one unit's cost."""
    cfg = models.LlamaConfig.tiny(num_layers=3)
    dims = _density.layer_dims(cfg)
    logits = _gen_logits(cfg, 1)
    masks = _atp_train.project_masks(logits, dims, target_density=target, bias=0.0)
    _, nxt = disp_masks.reference_projection(logits, dims, target, 0.0)
    prunable = _density.prunable_params(dims)
    kept = disp_masks.reference_kept(masks, dims)
    assert int(_density.kept_count(masks, dims)) == kept
    assert kept <= target * prunable < disp_masks.reference_kept(nxt, dims)
    # The largest single-unit cost in this model bounds the gap (q+k columns of a GQA group).
    d = dims[0]
    max_unit = d.hidden * (d.q_per_kv + 2) * d.head_dim + d.hidden
    assert abs(kept / prunable - target) <= max_unit / prunable
    np.testing.assert_allclose(float(_density.density(masks, dims)), kept / prunable, rtol=1e-6)


@pytest.mark.parametrize('seed,empty_layer', [(0, None), (3, 0)])
def test_export_logits_equal_masked(seed, empty_layer):
    """Exported (merged + surgery + dim slicing) == masked model in evaluation semantics.

    Tolerance: atol 2e-5 in f32 (same sums over fewer zero terms, merged W + sAB).
    """
    cfg = models.LlamaConfig.tiny()
    model = _lora_model(cfg, seed)
    dims = _density.layer_dims(cfg)
    masks = _atp_train.project_masks(_gen_logits(cfg, seed), dims, target_density=0.6, bias=0.0)
    if empty_layer is not None:
        layers = list(masks['layers'])
        layers[empty_layer] = {**layers[empty_layer],
                               'attn_ctx': jnp.zeros_like(layers[empty_layer]['attn_ctx']),
                               'mlp': jnp.zeros_like(layers[empty_layer]['mlp'])}
        masks = {'layers': tuple(layers)}
    compact, new_cfg, counts = _atp_train.atp_export(model, masks)
    ids = jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab_size, (2, 9)), jnp.int32)
    got = _dims.compact_forward(compact, ids, config=new_cfg)
    want = model(ids, masks=masks, lora_aware=False)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)
    assert counts['kept'] == counts['kept_by_density'] == disp_masks.reference_kept(masks, dims)
    assert counts['prunable'] == _density.prunable_params(dims)
    if empty_layer is None:  # the removed share is the target share, up to one unit
        assert counts['kept'] <= 0.6 * counts['prunable']
        assert 0.6 - counts['kept'] / counts['prunable'] < 0.02


def test_atp_config_and_trainer_dispatch():
    cfg = config.load_config(ROOT / 'configs' / 'atp_tiny.yaml')
    assert isinstance(cfg.prune, _atp_cfg.AtpCfg)
    assert cfg.prune.target_density == 0.6
    smol = config.load_config(ROOT / 'configs' / 'atp_smollm2_shakespeare.yaml')
    assert smol.prune.method == 'atp' and smol.lora.enabled
    with pytest.raises(ValueError, match='control_fraction'):
        config.load_config(ROOT / 'configs' / 'atp_tiny.yaml', ['prune.control_fraction=1.5'])
    with pytest.raises(ValueError, match='target_density'):
        config.load_config(ROOT / 'configs' / 'atp_tiny.yaml', ['prune.target_density=0'])
    with pytest.raises(ValueError, match='prior_criterion'):
        config.load_config(ROOT / 'configs' / 'atp_tiny.yaml', ['prune.prior_criterion=hessian'])
    from jaxprune import train

    with pytest.raises(ValueError, match='train_atp'):
        train.build_method(cfg.prune, run_cfg=cfg)


@pytest.mark.parametrize('prior_batches,criterion', [(0, 'weight'), (2, 'weight'), (2, 'mask')])
def test_train_atp_tiny_end_to_end(tmp_path, prior_batches, criterion):
    """The driver on the tiny Llama: exact budget, export == masked, lasso zeroes pruned LoRA.

    A strong lasso (eta * lr ~ 3 per step) zeroes every pruned LoRA group after the freeze, so
    the LoRA-aware (training) and merged (evaluation) semantics agree (rtol 1e-4 on perplexity).
    With a Taylor prior the run logs it and its deterministic density is within one unit's cost
    (<= 2 %) below the target.
    """
    cfg = config.load_config(ROOT / 'configs' / 'atp_tiny.yaml', [
        f'run_dir={tmp_path}', 'train.steps=6', 'train.log_every=3', 'prune.lasso_init=1000',
        'prune.lasso_max=1000', 'data.eval_max_examples=20',
        f'prune.prior_batches={prior_batches}', f'prune.prior_criterion={criterion}'])
    run = _atp_train.run_atp(cfg, progress=False)
    rec = run.record
    assert rec['control_steps'] == 3
    p = rec['params']
    assert p['kept'] == p['kept_by_density']
    assert p['kept'] <= 0.6 * p['prunable'] and 0.6 - p['kept'] / p['prunable'] < 0.02
    assert rec['pruned_lora_norm'] == 0.0
    np.testing.assert_allclose(rec['eval_export']['perplexity'], rec['eval_masked']['perplexity'],
                               rtol=1e-4)
    np.testing.assert_allclose(rec['eval_lora_aware']['perplexity'],
                               rec['eval_masked']['perplexity'], rtol=1e-4)
    events = [json.loads(x) for x in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
    train_events = [e for e in events if e['event'] == 'train']
    assert [e['phase'] for e in train_events] == ['control', 'frozen']
    assert 'sampled_density' in train_events[0]
    priors = [e for e in events if e['event'] == 'prior']
    assert len(priors) == (1 if prior_batches else 0)
    if prior_batches:
        assert priors[0]['batches'] == 2 and 0.58 <= priors[0]['density'] <= 0.6
        assert rec['tokens']['prior'] == 2 * 4 * 32
    assert (tmp_path / 'checkpoints').is_dir()
    # The export on disk is the in-memory export, bit for bit, with the same counts.
    assert rec['export_path'] == str(tmp_path / 'pruned')
    compact, cfg_disk, disk = surgery.load_compact(rec['export_path'])
    assert cfg_disk == run.compact_config
    for a, b in zip(jax.tree.leaves(compact), jax.tree.leaves(run.compact), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert disk['counts'] == p
    assert disk['density'] == p['kept'] / p['prunable'] and disk['meta']['method'] == 'atp'


def test_train_atp_on_a_mesh_matches_one_device(tmp_path):
    """The driver on a data=2 x fsdp=2 x tensor=2 mesh: LoRA/frozen params really sharded, and
    the same losses, exact budget and export perplexity as on one device (rtol 1e-4)."""
    def run(name, *mesh):
        cfg = config.load_config(ROOT / 'configs' / 'atp_tiny.yaml', [
            f'run_dir={tmp_path / name}', 'train.steps=4', 'train.log_every=1',
            'data.eval_max_examples=8', *mesh])
        out = _atp_train.run_atp(cfg, progress=False)
        lines = (tmp_path / name / 'metrics.jsonl').read_text().splitlines()
        events = [json.loads(x) for x in lines]
        return out, [e['loss'] for e in events if e['event'] == 'train']

    one, one_losses = run('one', 'mesh.data=1')
    many, many_losses = run('many', 'mesh.data=2', 'mesh.fsdp=2', 'mesh.tensor=2')
    lora_leaves = jax.tree.leaves(nnx.state(many.model, nnx.LoRAParam))
    assert any(not x.sharding.is_fully_replicated for x in lora_leaves)
    frozen = jax.tree.leaves(nnx.state(many.model, nnx.Param))
    assert any(len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated
               for x in frozen)
    np.testing.assert_allclose(many_losses, one_losses, rtol=1e-4)
    assert many.record['params'] == one.record['params']
    np.testing.assert_allclose(many.record['eval_export']['perplexity'],
                               one.record['eval_export']['perplexity'], rtol=1e-4)


def test_train_atp_refuses_several_processes(monkeypatch, tmp_path):
    monkeypatch.setattr(jax, 'process_count', lambda: 2)
    cfg = config.load_config(ROOT / 'configs' / 'atp_tiny.yaml', [f'run_dir={tmp_path}'])
    with pytest.raises(ValueError, match='one process'):
        _atp_train.run_atp(cfg, progress=False)


def test_train_atp_refuses_parameter_averaging(tmp_path):
    cfg = config.load_config(ROOT / 'configs' / 'atp_tiny.yaml',
                             [f'run_dir={tmp_path}', 'train.param_ema=0.9'])
    with pytest.raises(ValueError, match='train.param_ema=0'):
        _atp_train.run_atp(cfg, progress=False)
    assert not any(tmp_path.iterdir())  # refused before writing anything


@pytest.mark.slow
def test_export_smollm2_equals_masked():
    """SmolLM2-135M with projected random-generator masks: exported == masked (atol 1e-4)."""
    from jaxprune import assets

    model, cfg = models.load_pretrained(assets.resolve_model('smollm2-135m'))
    dims = _density.layer_dims(cfg)
    masks = _atp_train.project_masks(_gen_logits(cfg, 0), dims, target_density=0.6, bias=0.0)
    compact, new_cfg, counts = _atp_train.atp_export(model, masks)
    assert counts['kept'] == counts['kept_by_density']
    assert abs(counts['kept'] / counts['prunable'] - 0.6) < 1e-3
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 16)), jnp.int32)
    got = _dims.compact_forward(compact, ids, config=new_cfg)
    want = model(ids, masks=masks)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, rtol=1e-4)
