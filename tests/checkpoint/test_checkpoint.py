"""Checkpoint tests: exact round trips, keep-last-N, NaN refusal, readable diffs, corruption."""

import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxprune import checkpoint
from jaxprune.checkpoint import _checkpointer, _diff
from jaxprune.sharding import _mesh


@pytest.fixture(autouse=True)
def _close_checkpointers(monkeypatch):
    """Closes every Checkpointer a test opens (an unclosed one can leave orbax's async thread
    calling into a closed event loop after the test, a PytestUnraisableExceptionWarning)."""
    opened = []
    init = _checkpointer.Checkpointer.__init__

    def tracked(self, *args, **kwargs):
        init(self, *args, **kwargs)
        opened.append(self)

    monkeypatch.setattr(_checkpointer.Checkpointer, '__init__', tracked)
    yield
    for ckpt in opened:
        ckpt.close()


OPTIMIZERS = {
    'adamw': lambda: optax.adamw(1e-2, weight_decay=0.1),
    'chain': lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2)),
    'inject': lambda: optax.inject_hyperparams(optax.adamw)(learning_rate=1e-2),
    'multisteps': lambda: optax.MultiSteps(optax.adamw(1e-2), every_k_schedule=2),
}


def _params():
    k1, k2 = jax.random.split(jax.random.key(0))
    return {
        'dense': {'kernel': jax.random.normal(k1, (8, 4), jnp.bfloat16), 'bias': jnp.zeros((4,))},
        'norm': jax.random.normal(k2, (8,)),
    }


def _state(tx, steps=2):
    """A train state after a few real updates, so moments and counts are non-trivial."""
    params = _params()
    opt_state = tx.init(params)
    for i in range(steps):
        grads = jax.tree.map(lambda p, g=0.1 * (i + 1): jnp.full_like(p, g), params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    return {
        'params': params,
        'opt_state': opt_state,
        'masks': {'mlp': jnp.array([True, False, True, True]), 'hidden': jnp.ones((8,))},
        'rng': jax.random.key(42),
        'rng_data': jax.random.key_data(jax.random.key(7)),
    }


def _assert_identical(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # exact


# --- tree_diff ----------------------------------------------------------------------------------


def test_tree_diff_matches_reference():
    expected = {'a': jnp.zeros((2, 3)), 'b': jnp.zeros(3, jnp.bfloat16), 'c': {'d': jnp.zeros(1)}}
    found = {'a': jnp.zeros((2, 4)), 'b': jnp.zeros(3), 'e': jnp.zeros((), jnp.int32)}
    assert _diff.tree_diff(expected, found) == [
        'missing: c/d (expected float32[1])',
        'unexpected: e (found int32[])',
        'shape: a expected (2, 3), found (2, 4)',
        'dtype: b expected bfloat16, found float32',
    ]


def test_tree_diff_empty_for_equal_structure_across_container_types():
    tx = optax.adamw(1e-3)
    state = tx.init(_params())
    as_dicts = [
        {'count': state[0].count, 'mu': state[0].mu, 'nu': state[0].nu},
        {},
        {},
    ]
    assert _diff.tree_diff(state, as_dicts) == []
    assert _diff.tree_diff(state, state) == []


# --- round trips --------------------------------------------------------------------------------


@pytest.mark.parametrize('name', sorted(OPTIMIZERS))
def test_round_trip_exact(tmp_ckpt, name):
    """bf16 params, bool masks, PRNG keys and optax states come back bit-identical."""
    state = _state(OPTIMIZERS[name]())
    meta = {'batches_seen': 12, 'config': {'lr': 0.01, 'name': name}, 'metrics': {'loss': 1.5}}
    ckpt = _checkpointer.Checkpointer(tmp_ckpt)
    assert ckpt.save(3, state, meta)
    assert ckpt.latest_step() == 3
    restored, restored_meta = ckpt.restore(target=jax.eval_shape(lambda: state))
    _assert_identical(restored, state)
    assert restored_meta == meta
    assert type(restored['opt_state']) is type(state['opt_state'])  # NamedTuples, not lists
    # The restored state keeps training exactly like the original.
    tx = OPTIMIZERS[name]()
    grads = jax.tree.map(jnp.ones_like, state['params'])
    u1, _ = tx.update(grads, state['opt_state'], state['params'])
    u2, _ = tx.update(grads, restored['opt_state'], restored['params'])
    _assert_identical(u1, u2)


def test_round_trip_async(tmp_ckpt):
    state = _state(OPTIMIZERS['adamw']())
    with _checkpointer.Checkpointer(tmp_ckpt, async_save=True) as ckpt:
        assert ckpt.save(1, state, {})
        ckpt.wait()
        restored, _ = ckpt.restore(1, target=jax.eval_shape(lambda: state))
    _assert_identical(restored, state)


def test_keep_last_n(tmp_ckpt):
    ckpt = _checkpointer.Checkpointer(tmp_ckpt, max_to_keep=2)
    for step in range(5):
        assert ckpt.save(step, {'w': jnp.full((3,), float(step))}, {'step': step})
    assert ckpt.all_steps() == [3, 4]
    assert sorted(p.name for p in tmp_ckpt.iterdir() if p.name.isdigit()) == ['3', '4']
    state, meta = ckpt.restore(3, target={'w': jax.ShapeDtypeStruct((3,), jnp.float32)})
    np.testing.assert_array_equal(state['w'], [3.0, 3.0, 3.0])
    assert meta == {'step': 3}


def test_save_interval_and_duplicate_step(tmp_ckpt):
    ckpt = _checkpointer.Checkpointer(tmp_ckpt, save_interval_steps=2)
    state = {'w': jnp.ones(2)}
    assert ckpt.save(0, state)
    assert not ckpt.save(1, state)
    assert ckpt.save(2, state)
    assert ckpt.all_steps() == [0, 2]
    with pytest.raises(ValueError, match='already exists'):
        ckpt.save(2, state)


# --- guards -------------------------------------------------------------------------------------


@pytest.mark.parametrize('bad', [jnp.nan, jnp.inf, -jnp.inf])
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_nan_is_never_checkpointed(tmp_ckpt, caplog, bad, dtype):
    ckpt = _checkpointer.Checkpointer(tmp_ckpt)
    assert ckpt.save(0, {'params': {'w': jnp.ones(3, dtype)}})
    state = {'params': {'w': jnp.array([1.0, bad, 2.0], dtype)}, 'mask': jnp.ones(3, bool)}
    with caplog.at_level(logging.ERROR), pytest.raises(_checkpointer.NonFiniteStateError) as e:
        ckpt.save(1, state)
    assert 'params/w' in str(e.value) and 'mask' not in str(e.value)
    assert 'params/w' in caplog.text
    assert ckpt.all_steps() == [0]
    assert not any(p.name.startswith('1') for p in tmp_ckpt.iterdir())


def test_meta_must_be_json(tmp_ckpt):
    ckpt = _checkpointer.Checkpointer(tmp_ckpt)
    with pytest.raises(ValueError, match='JSON'):
        ckpt.save(0, {'w': jnp.ones(2)}, {'loss': jnp.ones(())})
    assert ckpt.all_steps() == []


def test_mismatch_raises_readable_diff(tmp_ckpt):
    state = _state(OPTIMIZERS['adamw']())
    ckpt = _checkpointer.Checkpointer(tmp_ckpt)
    ckpt.save(0, state, {})
    target = jax.eval_shape(lambda: state)
    target['params']['extra'] = jax.ShapeDtypeStruct((2,), jnp.float32)  # not in checkpoint
    del target['masks']['hidden']  # in checkpoint, not in target
    target['params']['norm'] = jax.ShapeDtypeStruct((9,), jnp.float32)  # pruned differently
    target['params']['dense']['kernel'] = jax.ShapeDtypeStruct((8, 4), jnp.float32)  # dtype
    with pytest.raises(ValueError) as e:
        ckpt.restore(0, target=target)
    msg = str(e.value)
    assert str(tmp_ckpt) in msg and '4 differences' in msg
    assert 'missing: params/extra (expected float32[2])' in msg
    assert 'unexpected: masks/hidden (found float32[8])' in msg
    assert 'shape: params/norm expected (9,), found (8,)' in msg
    assert 'dtype: params/dense/kernel expected float32, found bfloat16' in msg


def test_missing_checkpoint_errors(tmp_ckpt):
    ckpt = _checkpointer.Checkpointer(tmp_ckpt)
    target = {'w': jax.ShapeDtypeStruct((2,), jnp.float32)}
    with pytest.raises(FileNotFoundError, match='no checkpoint'):
        ckpt.restore(target=target)
    assert ckpt.restore_latest_valid(target=target) is None
    ckpt.save(0, {'w': jnp.ones(2)})
    with pytest.raises(FileNotFoundError, match=r'available steps: \[0\]'):
        ckpt.restore(5, target=target)


# --- corruption ---------------------------------------------------------------------------------


def _truncate_data(step_dir: pathlib.Path):
    files = [p for p in (step_dir / 'state').rglob('*') if p.is_file() and p.parent.name == 'd']
    assert files
    for p in files:
        p.write_bytes(b'')


def _remove_metadata(step_dir: pathlib.Path):
    (step_dir / 'state' / '_METADATA').unlink()


@pytest.mark.parametrize('corrupt', [_truncate_data, _remove_metadata])
def test_corrupt_checkpoint_error_and_fallback(tmp_ckpt, corrupt):
    ckpt = _checkpointer.Checkpointer(tmp_ckpt, max_to_keep=5)
    for step in range(3):
        ckpt.save(step, {'w': jnp.arange(64.0) + step}, {'step': step})
    corrupt(tmp_ckpt / '2')
    target = {'w': jax.ShapeDtypeStruct((64,), jnp.float32)}
    with pytest.raises(_checkpointer.CorruptCheckpointError) as e:
        ckpt.restore(target=target)
    msg = str(e.value)
    assert str(tmp_ckpt / '2') in msg and 'step=1' in msg

    step, state, meta = ckpt.restore_latest_valid(target=target)
    assert step == 1 and meta == {'step': 1}
    np.testing.assert_array_equal(state['w'], np.arange(64.0) + 1)
    # Nothing deleted: the corrupt step was moved aside, and its number can be saved again.
    moved = list((tmp_ckpt / 'corrupt').iterdir())
    assert len(moved) == 1 and moved[0].name.startswith('2-') and any(moved[0].rglob('*'))
    assert ckpt.all_steps() == [0, 1]
    assert ckpt.save(2, {'w': jnp.zeros(64)}, {'step': 2})
    assert ckpt.restore(target=target)[1] == {'step': 2}


def test_all_corrupt_raises(tmp_ckpt):
    ckpt = _checkpointer.Checkpointer(tmp_ckpt)
    ckpt.save(0, {'w': jnp.ones(8)})
    _remove_metadata(tmp_ckpt / '0')
    with pytest.raises(_checkpointer.CorruptCheckpointError, match='every checkpoint'):
        ckpt.restore_latest_valid(target={'w': jax.ShapeDtypeStruct((8,), jnp.float32)})
    assert (tmp_ckpt / '0').exists()  # never deleted


# --- sharded restore ----------------------------------------------------------------------------


def test_restore_into_sharded_target(tmp_ckpt):
    """Saved from one layout, restored into a (data 2, fsdp 2, tensor 2) sharded target."""
    mesh = _mesh.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
    state = _state(OPTIMIZERS['adamw']())
    saved_sh = jax.tree.map(lambda x: NamedSharding(mesh, P()), state)
    ckpt = _checkpointer.Checkpointer(tmp_ckpt)
    ckpt.save(0, jax.device_put(state, saved_sh), {})

    def spec(x):
        if x.ndim == 2:
            return P('fsdp', 'tensor')
        if x.ndim == 1 and x.shape[0] % 2 == 0 and x.dtype != jnp.uint32:
            return P('fsdp')
        return P()

    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec(x))),
        jax.eval_shape(lambda: state),
    )
    restored, _ = ckpt.restore(0, target=target)
    _assert_identical(restored, state)
    for r, t in zip(jax.tree.leaves(restored), jax.tree.leaves(target)):
        assert r.sharding == t.sharding
    kernel = restored['params']['dense']['kernel']
    assert {s.data.shape for s in kernel.addressable_shards} == {(4, 2)}


def test_restore_nnx_state_with_derived_shardings(tmp_ckpt):
    """The trainer's path: nnx.State params + adamw state, targets from jaxprune.sharding."""
    from flax import nnx

    from jaxprune.sharding import _shard

    class Tiny(nnx.Module):
        def __init__(self, rngs):
            self.up = nnx.Param(
                jax.random.normal(rngs.params(), (8, 16)),
                out_sharding=('embed', 'mlp'),
                eager_sharding=False,
            )
            self.bias = nnx.Param(jnp.ones((16,)), out_sharding=('mlp',), eager_sharding=False)

    _, params = nnx.split(Tiny(nnx.Rngs(0)), nnx.Param)
    tx = optax.adamw(1e-2)
    state = {'params': params, 'opt_state': tx.init(params), 'step': jnp.array(3)}
    ckpt = _checkpointer.Checkpointer(tmp_ckpt)
    ckpt.save(3, state, {'batches_seen': 3})

    mesh = _mesh.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
    p_sh = _shard.param_shardings(params, mesh)
    o_sh = _shard.opt_state_shardings(jax.eval_shape(tx.init, params), p_sh)
    shardings = {'params': p_sh, 'opt_state': o_sh, 'step': NamedSharding(mesh, P())}
    target = _shard.abstract_like(jax.eval_shape(lambda: state), shardings)
    restored, meta = ckpt.restore(target=target)
    assert meta == {'batches_seen': 3}
    _assert_identical(restored, state)
    assert isinstance(restored['params'], nnx.State)
    assert restored['params']['up'][...].sharding.spec == P('fsdp', 'tensor')
    assert restored['opt_state'][0].mu['up'][...].sharding.spec == P('fsdp', 'tensor')
    assert restored['opt_state'][0].count.sharding.spec == P()


@pytest.mark.parametrize('step', [-1, 1.5, True, 'x'])
def test_save_rejects_bad_step(tmp_ckpt, step):
    ckpt = _checkpointer.Checkpointer(tmp_ckpt)
    with pytest.raises(ValueError, match='non-negative int'):
        ckpt.save(step, {'w': jnp.ones(2)})


def test_save_accepts_integer_scalars(tmp_ckpt):
    ckpt = _checkpointer.Checkpointer(tmp_ckpt)
    assert ckpt.save(np.int64(4), {'w': jnp.ones(2)})
    assert ckpt.save(jnp.asarray(5), {'w': jnp.ones(2)})
    assert ckpt.all_steps() == [4, 5]


def test_restore_target_must_be_abstract_arrays(tmp_ckpt):
    ckpt = _checkpointer.Checkpointer(tmp_ckpt)
    ckpt.save(0, {'w': jnp.ones(2), 'n': jnp.array(3)})
    with pytest.raises(ValueError, match="target leaf 'n' is int"):
        ckpt.restore(target={'w': jax.ShapeDtypeStruct((2,), jnp.float32), 'n': 3})


@pytest.mark.parametrize('url', ['gs://bucket/run/checkpoints', 's3://b/x'])
def test_as_directory_keeps_urls(url):
    d = checkpoint.as_directory(url)
    assert str(d) == url  # pathlib would turn it into the local folder 'gs:/bucket/...'
    assert str(d / '3') == f'{url}/3'


def test_as_directory_local_is_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert checkpoint.as_directory('ckpt') == tmp_path / 'ckpt'
    assert checkpoint.as_directory(tmp_path) == tmp_path


def test_run_config_checkpoint_dir_keeps_a_bucket_url():
    from jaxprune import config

    cfg = config.load_config(None, ['run_dir=/tmp/r', 'checkpoint.dir=gs://bucket/ckpt'])
    assert str(cfg.checkpoint_dir) == 'gs://bucket/ckpt'
    assert str(config.load_config(None, ['run_dir=/tmp/r']).checkpoint_dir) == '/tmp/r/checkpoints'
