"""Surgery: slicing vs a numpy reference, optimizer state, pruned == masked logits, counts."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxprune import surgery
from jaxprune.lora import _spec
from jaxprune.masks import _budget, _structured
from jaxprune.models import _bert, _llama, _structures
from jaxprune.models import _structures as structures_lib

Slice = structures_lib.Slice
Structure = structures_lib.Structure


def _toy():
    params = {
        'layers': {0: {'w': jnp.arange(24.0).reshape(4, 6), 'b': jnp.arange(6.0)}},
        'emb': jnp.arange(12.0).reshape(3, 4),
    }
    structs = (
        Structure(
            'heads', 0, 3, 0, (Slice(('layers', 0, 'w'), 1, 2), Slice(('layers', 0, 'b'), 0, 2))
        ),
        Structure('hidden', None, 4, 0, (Slice(('layers', 0, 'w'), 0, 1), Slice(('emb',), 1, 1))),
    )
    return params, structs


def test_prune_matches_reference():
    params, structs = _toy()
    keep = {('heads', 0): np.array([True, False, True]), ('hidden', None): np.array([0, 1, 1, 0])}
    _, got = surgery.prune(None, params, keep, structures=structs)
    w = np.arange(24.0).reshape(4, 6)[[1, 2]][:, [0, 1, 4, 5]]
    np.testing.assert_array_equal(got['layers'][0]['w'], w)
    np.testing.assert_array_equal(got['layers'][0]['b'], [0, 1, 4, 5])
    np.testing.assert_array_equal(got['emb'], np.arange(12.0).reshape(3, 4)[:, [1, 2]])


def test_prune_empty_structure_keeps_one_zeroed_unit():
    params, structs = _toy()
    keep = {('heads', 0): np.zeros(3, bool)}
    _, got = surgery.prune(None, params, keep, structures=structs)
    np.testing.assert_array_equal(got['layers'][0]['w'], np.zeros((4, 2)))
    np.testing.assert_array_equal(got['layers'][0]['b'], np.zeros(2))
    with pytest.raises(ValueError, match='expected'):
        surgery.prune(None, params, {('heads', 0): np.ones(2, bool)}, structures=structs)


def test_prune_like_optimizer_state():
    params, structs = _toy()
    tx = optax.adamw(1e-2)
    state = tx.init(params)
    state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)[1]
    keep = {('heads', 0): np.array([True, False, True])}
    shapes = _budget.param_shapes(params)
    new = surgery.prune_like(state, keep, structs, shapes)
    _, pruned_params = surgery.prune(None, params, keep, structures=structs)
    assert jax.tree.map(jnp.shape, new[0].mu) == jax.tree.map(jnp.shape, pruned_params)
    assert jax.tree.map(jnp.shape, new[0].nu) == jax.tree.map(jnp.shape, pruned_params)
    assert int(new[0].count) == 1
    # The pruned state works with the pruned params.
    tx.update(jax.tree.map(jnp.ones_like, pruned_params), new, pruned_params)


def test_prune_units_on_mask_state():
    _, structs = _toy()
    tree = ({('heads', 0): jnp.array([1.0, 0.0, 0.5]), ('hidden', None): jnp.arange(4.0)}, 7)
    keep = {('heads', 0): np.array([True, False, True])}
    got = surgery.prune_units(tree, keep, structs)
    np.testing.assert_array_equal(got[0][('heads', 0)], [1.0, 0.5])
    np.testing.assert_array_equal(got[0][('hidden', None)], np.arange(4.0))
    assert got[1] == 7


LORA = _spec.LoraSpec(rank=2, targets=r'.*\.(q_proj|v_proj|o_proj|down_proj|query|out|up)')
CONFIGS = [
    pytest.param(_llama.LlamaConfig.tiny(), id='llama-gqa'),
    pytest.param(
        _llama.LlamaConfig.tiny(num_kv_heads=4, attention_bias=True, mlp_bias=True),
        id='llama-mha-bias',
        marks=pytest.mark.slow,
    ),
    pytest.param(_bert.BertConfig.tiny(), id='bert'),
]


def _model(config, seed=0):
    cls = (
        _llama.Llama
        if isinstance(config, _llama.LlamaConfig)
        else (_bert.BertForSequenceClassification)
    )
    model = cls(config, lora=LORA, rngs=nnx.Rngs(seed))
    params = nnx.state(model, nnx.Param)
    # Non-zero LoRA B and biases so that every slice matters.
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: (
            x + 0.05 * (1 + jnp.arange(x.size).reshape(x.shape) % 3)
            if getattr(p[-1], 'key', None) in ('lora_b', 'bias')
            else x
        ),
        params,
    )
    nnx.update(model, params)
    return model


def _random_keep(structs, seed, empty=()):
    rng = np.random.default_rng(seed)
    keep = {}
    for s in structs:
        k = rng.random(s.size) < 0.6
        k[rng.integers(s.size)] = True
        if (s.kind, s.layer) in empty:
            k[:] = False
        keep[(s.kind, s.layer)] = k
    return keep


@pytest.mark.parametrize('config', CONFIGS)
@pytest.mark.parametrize('empty', [(), (('heads', 1), ('mlp', 0))], ids=['partial', 'empty'])
def test_pruned_logits_equal_masked_logits(config, empty):
    """Invariant (float32, atol 1e-5): prune_model(model, keep)(x) == model(x, masks=keep)."""
    model = _model(config)
    structs = _structures.structures(config, lora=LORA)
    keep = _random_keep(structs, 0, empty)
    masks = _structured.to_model_masks(
        {k: jnp.asarray(v, jnp.float32) for k, v in keep.items()},
        num_layers=config.num_layers,
        q_per_kv=config.q_per_kv,
    )
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 100, (2, 7)))
    masked = model(ids, masks=masks)
    small, new_config = surgery.prune_model(model, keep)
    np.testing.assert_allclose(small(ids), masked, atol=1e-5, rtol=0)
    assert new_config.hidden_size == max(int(keep[('hidden', None)].sum()), 1)
    # Parameter count == non-prunable + exact budget count (no empty structures here).
    if not empty:
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        total = sum(x.size for x in jax.tree.leaves(params))
        prunable = _budget.total_prunable_params(structs, params, count_lora=True)
        kept = _budget.kept_param_count(keep, structs, params, count_lora=True)
        predicted = total - prunable + int(kept)
        got = sum(x.size for x in jax.tree.leaves(nnx.state(small, nnx.Param)))
        assert got == predicted
        if isinstance(config, _llama.LlamaConfig):
            # BERT's pooler output is not an 'embed' axis, so a BERT config cannot describe the
            # pruned pooler (reported to the models owner); Llama must round-trip exactly.
            assert got == _structures.param_count(new_config, lora=LORA)
