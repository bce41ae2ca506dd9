"""Structures: exact parameter accounting and the pruned == masked invariant."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxprune.lora import _spec
from jaxprune.models import _bert, _llama, _structures

LORA = _spec.LoraSpec(rank=2, targets=r'.*\.(q_proj|o_proj|down_proj|query|out|up)')
CONFIGS = [
    pytest.param(_llama.LlamaConfig.tiny(), id='llama-gqa'),
    pytest.param(
        _llama.LlamaConfig.tiny(num_kv_heads=4, attention_bias=True, mlp_bias=True),
        id='llama-mha-bias',
    ),
    pytest.param(
        _llama.LlamaConfig.tiny(layer_heads=(4, 2), layer_mlp=(64, 40)), id='llama-nonuniform'
    ),
    pytest.param(_bert.BertConfig.tiny(), id='bert'),
]


def _model(config, lora=None, seed=0):
    if isinstance(config, _llama.LlamaConfig):
        return _llama.Llama(config, lora=lora, rngs=nnx.Rngs(seed))
    return _bert.BertForSequenceClassification(config, lora=lora, rngs=nnx.Rngs(seed))


def _flat(params):
    return {
        tuple(getattr(k, 'key', k) for k in p): np.asarray(x)
        for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
    }


def _slice(params, struct, keep):
    """Test-local surgery: keep the units where ``keep`` is True along every slice."""
    flat = _flat(params)
    for sl in struct.slices:
        idx = (np.flatnonzero(keep)[:, None] * sl.width + np.arange(sl.width)).reshape(-1)
        flat[sl.path] = np.take(flat[sl.path], idx, axis=sl.axis)
    return flat


@pytest.mark.parametrize('config', CONFIGS)
@pytest.mark.parametrize('lora', [None, LORA], ids=['base', 'lora'])
def test_params_per_unit_matches_brute_force(config, lora):
    model = _model(config, lora)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    total = sum(x.size for x in _flat(params).values())
    assert total == _structures.param_count(config, lora=lora)
    for struct in _structures.structures(config, lora=lora):
        keep = np.ones(struct.size, bool)
        keep[struct.size // 2] = False
        after = sum(x.size for x in _slice(params, struct, keep).values())
        assert total - after == struct.params_per_unit, (struct.kind, struct.layer)


def test_lora_targets_form_matches_spec():
    config = _llama.LlamaConfig.tiny()
    targets = ('layers.0.attn.q_proj', 'layers.1.mlp.down_proj')
    a = _structures.structures(config, lora_targets=targets, lora_rank=3)
    b = _structures.structures(
        config,
        lora=_spec.LoraSpec(rank=3, targets=r'layers\.0\.attn\.q_proj|layers\.1\.mlp\.down_proj'),
    )
    assert [s.params_per_unit for s in a] == [s.params_per_unit for s in b]
    assert any('lora_b' in sl.path for sl in a[0].slices)
    with pytest.raises(ValueError, match='lora_rank'):
        _structures.structures(config, lora_targets=targets)


def test_prunable_param_count_llama():
    c = _llama.LlamaConfig.tiny()
    d, h, kv, hd, f = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size
    per_layer = d * h * hd * 2 + d * kv * hd * 2 + 3 * d * f
    assert _structures.prunable_param_count(c) == c.num_layers * per_layer


def _pruned_config(config, struct, n_keep):
    if struct.kind == 'hidden':
        return type(config)(**{**config.__dict__, 'hidden_size': n_keep})
    per = (
        [config.heads(i) for i in range(config.num_layers)]
        if struct.kind == 'heads'
        else [config.mlp(i) for i in range(config.num_layers)]
    )
    per[struct.layer] = n_keep * (config.q_per_kv if struct.kind == 'heads' else 1)
    field = 'layer_heads' if struct.kind == 'heads' else 'layer_mlp'
    return type(config)(**{**config.__dict__, field: tuple(per)})


def _mask_for(config, struct, keep):
    unit = jnp.asarray(keep, jnp.float32)
    if struct.kind == 'hidden':
        return {'hidden': unit}
    layers = [{} for _ in range(config.num_layers)]
    if struct.kind == 'heads':
        layers[struct.layer]['heads'] = jnp.repeat(unit, config.q_per_kv)
    else:
        layers[struct.layer]['mlp'] = unit
    return {'layers': tuple(layers)}


@pytest.mark.parametrize('config', CONFIGS)
@pytest.mark.parametrize('kind', ['heads', 'mlp', 'hidden'])
def test_pruned_logits_equal_masked_logits(config, kind):
    """Invariant (tolerance 1e-5, float32): slicing the units out == masking them."""
    model = _model(config, LORA, seed=1)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    # Non-zero LoRA B so that adapters matter.
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.1 if getattr(p[-1], 'key', None) == 'lora_b' else x, params
    )
    nnx.update(model, params)
    struct = next(s for s in _structures.structures(config, lora=LORA) if s.kind == kind)
    keep = np.arange(struct.size) % 3 != 1
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 100, (2, 7)))
    masked = model(ids, masks=_mask_for(config, struct, keep))

    new_cfg = _pruned_config(config, struct, int(keep.sum()))
    small = _model(new_cfg, LORA)
    flat = _slice(params, struct, keep)
    state = nnx.to_pure_dict(nnx.state(small, nnx.Param))
    shapes = jax.tree.map(jnp.shape, state)
    state = jax.tree_util.tree_map_with_path(
        lambda p, _: jnp.asarray(flat[tuple(getattr(k, 'key', k) for k in p)]), state
    )
    assert jax.tree.map(jnp.shape, state) == shapes  # the pruned config describes the slices
    assert _structures.param_count(new_cfg, lora=LORA) == sum(x.size for x in flat.values())
    nnx.update(small, state)
    np.testing.assert_allclose(small(ids), masked, atol=1e-5, rtol=0)


@pytest.mark.parametrize('config', CONFIGS)
def test_every_param_has_logical_axes(config):
    from jaxprune import typing as jpt

    state = _structures.abstract_params(config, lora=LORA)
    for path, var in nnx.to_flat_state(state):
        axes = var.get_metadata().get('out_sharding')
        assert axes is not None and len(axes) == len(var.shape), path
        assert all(a is None or a in jpt.LOGICAL_AXES for a in axes), (path, axes)
        if path[-1] == 'lora_a':
            assert axes[1] == 'lora_rank' and isinstance(var, nnx.LoRAParam)
        if path[-1] == 'lora_b':
            assert axes[0] == 'lora_rank' and isinstance(var, nnx.LoRAParam)
