"""Sharding tests on 8 simulated CPU devices (tests/conftest.py sets XLA_FLAGS)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxprune.sharding import _mesh, _rules, _shard

MESH3 = {'data': 2, 'fsdp': 2, 'tensor': 2}


def _param(key, shape, axes, scale=0.5):
    return nnx.Param(scale * jax.random.normal(key, shape), out_sharding=axes, eager_sharding=False)


class TinyMLP(nnx.Module):
    """Stand-in for a jaxprune model: embed -> mlp -> embed -> labels, logical axis metadata."""

    def __init__(self, d=8, f=16, labels=4, *, rngs):
        self.up = _param(rngs.params(), (d, f), ('embed', 'mlp'))
        self.up_b = nnx.Param(jnp.zeros((f,)), out_sharding=('mlp',), eager_sharding=False)
        self.down = _param(rngs.params(), (f, d), ('mlp', 'embed'))
        self.norm = nnx.Param(jnp.ones((d,)), out_sharding=('embed',), eager_sharding=False)
        self.head = _param(rngs.params(), (d, labels), ('embed', 'labels'))

    def __call__(self, x):
        h = jax.nn.gelu(x @ self.up[...] + self.up_b[...])
        y = (x + h @ self.down[...]) * self.norm[...]
        return y @ self.head[...]


def _setup():
    model = TinyMLP(rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optax.adamw(1e-2, weight_decay=1e-2)
    kx, ky = jax.random.split(jax.random.key(1))
    batch = {
        'x': jax.random.normal(kx, (16, 8)),
        'y': jax.random.randint(ky, (16,), 0, 4),
    }
    return graphdef, params, tx, batch


def _make_step(graphdef, tx, p_sh=None, o_sh=None, b_sh=None):
    def loss_fn(params, batch):
        logits = nnx.merge(graphdef, params)(batch['x'])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch['y']).mean()

    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    if p_sh is None:
        return jax.jit(step)
    return jax.jit(step, in_shardings=(p_sh, o_sh, b_sh), out_shardings=(p_sh, o_sh, None))


# --- mesh ---------------------------------------------------------------------------------------


def test_make_mesh_fills_minus_one():
    mesh = _mesh.make_mesh({'data': -1, 'fsdp': 2, 'tensor': 1})
    assert dict(mesh.shape) == {'data': 4, 'fsdp': 2, 'tensor': 1}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_make_mesh_default_is_data_parallel():
    mesh = _mesh.make_mesh()
    assert dict(mesh.shape) == {'data': 8, 'fsdp': 1, 'tensor': 1}


def test_make_mesh_subset_of_devices():
    mesh = _mesh.make_mesh({'data': -1}, devices=jax.devices()[:1])
    assert mesh.devices.size == 1


@pytest.mark.parametrize(
    'shape, match',
    [
        ({'data': -1, 'fsdp': 3}, 'multiple of 3'),
        ({'data': 2, 'fsdp': 2}, 'uses 4 devices but there are 8'),
        ({'data': -1, 'fsdp': -1}, 'at most one axis'),
        ({'data': 0}, 'positive'),
        ({}, 'empty'),
    ],
)
def test_make_mesh_errors(shape, match):
    with pytest.raises(ValueError, match=match):
        _mesh.make_mesh(shape)


# --- rules --------------------------------------------------------------------------------------


def test_default_rules_cover_vocabulary():
    from jaxprune import typing as jpt

    assert set(jpt.LOGICAL_AXES) <= set(_rules.DEFAULT_RULES)
    assert _rules.DEFAULT_RULES['embed'] == 'fsdp'
    assert _rules.DEFAULT_RULES['mlp'] == 'tensor'
    assert _rules.DEFAULT_RULES['lora_rank'] is None
    assert _rules.ACTIVATION_RULES['batch'] == ('data', 'fsdp')


@pytest.mark.parametrize(
    'axes, shape, expected',
    [
        (('embed', 'mlp'), (8, 16), P('fsdp', 'tensor')),
        (('embed', 'mlp'), (8, 3), P('fsdp', None)),  # 3 % tensor(2): dropped
        (('embed', 'mlp'), (5, 3), P(None, None)),  # pruned to odd sizes: replicated
        (('mlp', 'embed'), (16, 8), P('tensor', 'fsdp')),
        (('vocab', 'embed'), (10, 8), P('tensor', 'fsdp')),
        (('embed', 'lora_rank'), (8, 4), P('fsdp', None)),
        (('heads', 'mlp'), (4, 4), P('tensor', None)),  # tensor used once only
        (('embed',), (8,), P('fsdp')),
        ((None, 'embed'), (3, 8), P(None, 'fsdp')),
        ((), (), P()),
    ],
)
def test_logical_to_spec_divisibility(axes, shape, expected):
    mesh = _mesh.make_mesh(MESH3)
    assert _rules.logical_to_spec(axes, _rules.DEFAULT_RULES, mesh, shape=shape) == expected


def test_logical_to_spec_tuple_rule_partial_divisibility():
    mesh = _mesh.make_mesh(MESH3)
    rules = _rules.ACTIVATION_RULES
    assert _rules.logical_to_spec(('batch',), rules, mesh, shape=(8,)) == P(('data', 'fsdp'))
    # 2 is divisible by data (2) but not by data*fsdp (4): keep data only.
    assert _rules.logical_to_spec(('batch',), rules, mesh, shape=(2,)) == P('data')
    assert _rules.logical_to_spec(('batch',), rules, mesh, shape=(3,)) == P(None)


def test_logical_to_spec_skips_missing_and_size_one_axes():
    mesh = _mesh.make_mesh({'data': 8, 'fsdp': 1})  # no 'tensor' axis; fsdp of size 1
    spec = _rules.logical_to_spec(('embed', 'mlp'), _rules.DEFAULT_RULES, mesh, shape=(8, 8))
    assert spec == P(None, None)


def test_logical_to_spec_never_reuses_mesh_axis():
    mesh = _mesh.make_mesh(MESH3)
    rules = {'a': ('data', 'tensor'), 'b': ('tensor', 'fsdp')}
    spec = _rules.logical_to_spec(('a', 'b'), rules, mesh, shape=(8, 8))
    assert spec == P(('data', 'tensor'), 'fsdp')
    flat = [a for e in spec for a in _rules._as_tuple(e)]
    assert len(flat) == len(set(flat))


@pytest.mark.parametrize(
    'axes, shape, match', [(('embd',), (8,), 'no rule'), (('embed',), (8, 8), 'name 1 dims')]
)
def test_logical_to_spec_errors(axes, shape, match):
    mesh = _mesh.make_mesh(MESH3)
    with pytest.raises(ValueError, match=match):
        _rules.logical_to_spec(axes, _rules.DEFAULT_RULES, mesh, shape=shape)


@pytest.mark.parametrize('batch_size, expected', [(None, P(('data', 'fsdp'))), (2, P('data'))])
def test_batch_sharding(batch_size, expected):
    mesh = _mesh.make_mesh(MESH3)
    assert _rules.batch_sharding(mesh, batch_size=batch_size).spec == expected


# --- trees --------------------------------------------------------------------------------------


def test_param_shardings_reads_metadata():
    mesh = _mesh.make_mesh(MESH3)
    _, params, _, _ = _setup()
    sh = nnx.to_pure_dict(_shard.param_shardings(params, mesh))
    assert sh['up'].spec == P('fsdp', 'tensor')
    assert sh['up_b'].spec == P('tensor')
    assert sh['down'].spec == P('tensor', 'fsdp')
    assert sh['norm'].spec == P('fsdp')
    assert sh['head'].spec == P('fsdp', None)


def test_param_shardings_on_abstract_state_matches_concrete():
    mesh = _mesh.make_mesh(MESH3)
    abstract = nnx.eval_shape(lambda: TinyMLP(rngs=nnx.Rngs(0)))
    _, abs_params = nnx.split(abstract, nnx.Param)
    _, params, _, _ = _setup()
    a = nnx.to_pure_dict(_shard.param_shardings(abs_params, mesh))
    c = nnx.to_pure_dict(_shard.param_shardings(params, mesh))
    assert a == c


def test_param_shardings_plain_arrays_replicated():
    mesh = _mesh.make_mesh(MESH3)
    sh = _shard.param_shardings({'w': jnp.ones((8, 8))}, mesh)
    assert sh['w'].spec == P()


def test_opt_state_shardings_mirror_params():
    mesh = _mesh.make_mesh(MESH3)
    _, params, _, _ = _setup()
    tx = optax.MultiSteps(
        optax.chain(optax.clip_by_global_norm(1.0), optax.inject_hyperparams(optax.adamw)(1e-3)),
        every_k_schedule=2,
    )
    p_sh = _shard.param_shardings(params, mesh)
    state = jax.eval_shape(tx.init, params)
    o_sh = _shard.opt_state_shardings(state, p_sh)
    adam = o_sh.inner_opt_state[1].inner_state[0]
    for tree in (adam.mu, adam.nu, o_sh.acc_grads):
        assert tree['up'].get_value().spec == P('fsdp', 'tensor')
        assert tree['head'].get_value().spec == P('fsdp', None)
    assert adam.count.spec == P()
    assert o_sh.inner_opt_state[1].hyperparams['learning_rate'].spec == P()
    assert o_sh.mini_step.spec == P()


def test_opt_state_shardings_masks_follow_their_axis():
    mesh = _mesh.make_mesh(MESH3)
    p_sh = {'up': NamedSharding(mesh, P('fsdp', 'tensor'))}
    state = {
        'param_masks': {'up': jnp.ones((8, 16), bool)},  # mirrors a parameter
        'masks': {  # structured layout (jaxprune.models)
            'hidden': jnp.ones((8,)),
            'layers': (
                {'mlp': jnp.ones((16,)), 'heads': jnp.ones((3,)), 'lora': {'q': jnp.ones(4)}},
            ),
        },
        'count': jnp.zeros((), jnp.int32),
    }
    o_sh = _shard.opt_state_shardings(state, p_sh)
    assert o_sh['param_masks']['up'].spec == P('fsdp', 'tensor')
    assert o_sh['masks']['hidden'].spec == P('fsdp')
    assert o_sh['masks']['layers'][0]['mlp'].spec == P('tensor')
    assert o_sh['masks']['layers'][0]['heads'].spec == P(None)  # 3 heads: not divisible
    assert o_sh['masks']['layers'][0]['lora']['q'].spec == P(None)
    assert o_sh['count'].spec == P()
    m_sh = _shard.mask_shardings(state['masks'], mesh)
    assert m_sh['layers'][0]['mlp'].spec == P('tensor')


def test_opt_state_shardings_shape_mismatch_replicates():
    mesh = _mesh.make_mesh(MESH3)
    p_sh = {'w': NamedSharding(mesh, P('fsdp', 'tensor'))}
    # adafactor-like factored row statistics under the same path: rank 1 -> replicated.
    o_sh = _shard.opt_state_shardings(
        {'v_row': {'w': jnp.ones((8,))}, 'v': {'w': jnp.ones((3, 3))}}, p_sh
    )
    assert o_sh['v_row']['w'].spec == P()
    assert o_sh['v']['w'].spec == P()


def test_opt_state_shardings_copy_of_the_frozen_backbone_follows_rest_shardings():
    mesh = _mesh.make_mesh(MESH3)
    p_sh = {'lora_a': NamedSharding(mesh, P(None, 'tensor'))}
    r_sh = {'up': NamedSharding(mesh, P('fsdp', 'tensor'))}
    state = {'masks': {'teacher_rest': {'up': jnp.ones((8, 16))},  # a backbone copy
                       'teacher': {'lora_a': jnp.ones((4, 16))}},
             'mu': {'lora_a': jnp.ones((4, 16))}}
    o_sh = _shard.opt_state_shardings(state, p_sh, rest_shardings=r_sh)
    assert o_sh['masks']['teacher_rest']['up'].spec == P('fsdp', 'tensor')
    assert o_sh['masks']['teacher']['lora_a'].spec == P(None, 'tensor')
    assert o_sh['mu']['lora_a'].spec == P(None, 'tensor')
    # Without the rest shardings the copy is replicated (no parameter path ends like it).
    assert _shard.opt_state_shardings(state, p_sh)['masks']['teacher_rest']['up'].spec == P()


def test_opt_state_shardings_needs_named_shardings():
    with pytest.raises(ValueError, match='param_shardings'):
        _shard.opt_state_shardings({}, {})


# --- train step: sharded == single device, stable shardings ----------------------------------


def _run(mesh, steps=3):
    graphdef, params, tx, batch = _setup()
    p_sh = _shard.param_shardings(params, mesh)
    o_sh = _shard.opt_state_shardings(jax.eval_shape(tx.init, params), p_sh)
    b_sh = _rules.batch_sharding(mesh)
    params = _shard.shard_like(params, p_sh)
    opt_state = jax.jit(tx.init, out_shardings=o_sh)(params)
    batch = _shard.shard_like(batch, b_sh)
    step = _make_step(graphdef, tx, p_sh, o_sh, b_sh)
    types0 = jax.tree.map(jax.typeof, (params, opt_state))
    shard0 = jax.tree.map(lambda x: x.sharding, (params, opt_state))
    losses = []
    for _ in range(steps):
        params, opt_state, loss = step(params, opt_state, batch)
        losses.append(float(loss))
        assert jax.tree.map(jax.typeof, (params, opt_state)) == types0
        assert jax.tree.map(lambda x: x.sharding, (params, opt_state)) == shard0
    return params, opt_state, losses, p_sh


def test_sharded_train_step_matches_single_device():
    """3 adamw steps on a (2, 2, 2) mesh equal 3 steps on one device (atol 1e-6)."""
    params8, opt8, losses8, p_sh = _run(_mesh.make_mesh(MESH3))
    params1, opt1, losses1, _ = _run(_mesh.make_mesh({'data': -1}, devices=jax.devices()[:1]))
    np.testing.assert_allclose(losses8, losses1, atol=1e-6, rtol=0)
    assert losses8[-1] < losses8[0]  # the step does train
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=0), params8, params1)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=0), opt8, opt1)
    # The parameters really are distributed: 'up' is split 2 x 2 over fsdp x tensor.
    up = params8['up'][...]
    assert up.sharding.spec == P('fsdp', 'tensor')
    assert {s.data.shape for s in up.addressable_shards} == {(4, 8)}
    assert p_sh['up'].get_value().mesh.devices.size == 8


def test_unsharded_jit_step_keeps_types():
    """Without explicit shardings the step is type-stable as well (optax sharding_test style)."""
    graphdef, params, tx, batch = _setup()
    opt_state = tx.init(params)
    step = _make_step(graphdef, tx)
    t0 = jax.tree.map(jax.typeof, (params, opt_state))
    for _ in range(3):
        params, opt_state, _ = step(params, opt_state, batch)
        assert jax.tree.map(jax.typeof, (params, opt_state)) == t0


def test_opt_state_shardings_nnx_shardings_match_pure_dict_state():
    """Shardings from an nnx.State apply to an optimizer state built on its pure-dict form."""
    mesh = _mesh.make_mesh(MESH3)
    _, params, tx, _ = _setup()
    p_sh = _shard.param_shardings(params, mesh)
    o_sh = _shard.opt_state_shardings(jax.eval_shape(tx.init, nnx.to_pure_dict(params)), p_sh)
    assert o_sh[0].mu['up'].spec == P('fsdp', 'tensor')
    assert o_sh[0].nu['down'].spec == P('tensor', 'fsdp')


def test_abstract_like_carries_shardings():
    mesh = _mesh.make_mesh(MESH3)
    tree = {'w': jnp.ones((8, 4)), 'k': jax.random.key(0)}
    sh = {'w': NamedSharding(mesh, P('fsdp')), 'k': NamedSharding(mesh, P())}
    out = _shard.abstract_like(tree, sh)
    assert out['w'] == jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=sh['w'])
    assert out['k'].dtype == tree['k'].dtype and out['k'].sharding == sh['k']
    kept = _shard.abstract_like(_shard.shard_like(tree, sh))
    assert kept['w'].sharding == sh['w']
