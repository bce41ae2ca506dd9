"""Config schemas and the strict YAML loader."""

import dataclasses
import pathlib

import jax.numpy as jnp
import optax
import pytest
import yaml

from jaxprune import config

CONFIGS = sorted((pathlib.Path(__file__).parent.parent / 'configs').glob('*.yaml'))


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: p.name)
def test_every_config_loads(path):
    cfg = config.load_config(path)
    assert isinstance(cfg, config.RunCfg)
    assert config.RunCfg.from_dict(cfg.to_dict()) == cfg


def test_configs_dir_is_not_empty():
    names = {p.name for p in CONFIGS}
    assert {'base.yaml', 'tiny.yaml', 'minilm_rotten_tomatoes_lora.yaml',
            'smollm2_shakespeare_lora.yaml'} <= names


def test_base_yaml_lists_every_default():
    raw = yaml.safe_load((config.CONFIG_DIR / 'base.yaml').read_text())
    assert raw == config.RunCfg().to_dict()


def test_lora_default_targets_match_lora_package():
    from jaxprune import lora

    assert config.LoraCfg().targets == lora.DEFAULT_TARGETS


def test_override_file_inherits_base(tmp_path):
    (tmp_path / 'parent.yaml').write_text('train:\n  steps: 7\n  learning_rate: 1e-3\n')
    (tmp_path / 'child.yaml').write_text('base: parent.yaml\ntrain:\n  steps: 9\n')
    cfg = config.load_config(tmp_path / 'child.yaml')
    assert cfg.train.steps == 9
    assert cfg.train.learning_rate == 1e-3  # '1e-3' is a YAML 1.1 string, coerced to float
    assert cfg.data == config.DataCfg()


def test_defaults_key_and_cycle(tmp_path):
    (tmp_path / 'a.yaml').write_text('defaults: b\n')
    (tmp_path / 'b.yaml').write_text('base: a.yaml\n')
    with pytest.raises(ValueError, match='cycle'):
        config.load_config(tmp_path / 'a.yaml')


@pytest.mark.parametrize('item,path,value', [
    ('train.steps=200', ('train', 'steps'), 200),
    ('train.learning_rate=3e-4', ('train', 'learning_rate'), 3e-4),
    ('lora.enabled=true', ('lora', 'enabled'), True),
    ('data.eval_max_examples=null', ('data', 'eval_max_examples'), None),
    ('run_dir=/tmp/x', ('run_dir',), '/tmp/x'),
    ('checkpoint.dir=ck', ('checkpoint', 'dir'), 'ck'),
])
def test_dotted_overrides(item, path, value):
    cfg = config.load_config(None, [item])
    node = cfg
    for p in path:
        node = getattr(node, p)
    assert node == value
    assert type(node) is type(value)


@pytest.mark.parametrize('item,suggestion', [
    ('train.stpes=3', "'train.steps'"),
    ('trian.steps=3', "'train'"),
    ('model.num_label=3', "'model.num_labels'"),
    ('lora.rnak=4', "'lora.rank'"),
])
def test_unknown_key_did_you_mean(item, suggestion):
    key = item.split('=')[0]
    with pytest.raises(ValueError, match=f"unknown config key '{key.split('.')[0]}") as e:
        config.load_config(None, [item])
    assert f'did you mean {suggestion}' in str(e.value)


def test_unknown_key_in_yaml_names_full_dotted_key(tmp_path):
    (tmp_path / 'c.yaml').write_text('checkpoint:\n  evry: 3\n')
    with pytest.raises(ValueError, match=r"'checkpoint\.evry'; did you mean 'checkpoint\.every'"):
        config.load_config(tmp_path / 'c.yaml')


@pytest.mark.parametrize('item,field', [
    ('train.learning_rate=0', 'train.learning_rate'),
    ('train.learning_rate=-1e-3', 'train.learning_rate'),
    ('train.steps=0', 'train.steps'),
    ('train.warmup_steps=1000', 'train.warmup_steps'),
    ('data.batch_size=0', 'data.batch_size'),
    ('data.eval_batch_size=-2', 'data.eval_batch_size'),
    ('model.task=regression', 'model.task'),
    ('model.dtype=float64', 'model.dtype'),
    ('lora.enabled=true', None),
    ('prune.target_density=1.5', 'prune.target_density'),
    ('prune.target_density=0.5', 'prune.target_density'),
    ('prune.method=nope', 'prune.method'),
    ('mesh.data=0', 'mesh.data'),
    ('train.steps=abc', 'train.steps'),
    ('train.full_finetune=3', 'train.full_finetune'),
    ('train.param_ema=1.0', 'train.param_ema'),
    ('model.pooling=max', 'model.pooling'),
])
def test_invalid_values_name_the_field(item, field):
    if field is None:  # a valid override: must not raise
        config.load_config(None, [item, 'lora.rank=4'])
        return
    with pytest.raises(ValueError, match=field.replace('.', r'\.')):
        config.load_config(None, [item])


def test_mean_pooling_is_for_classifiers_only():
    from jaxprune.models import _bert

    assert config._POOLINGS == _bert.POOLINGS  # the config check mirrors the model's choices
    assert config.load_config(None, ['model.pooling=mean']).model.pooling == 'mean'
    with pytest.raises(ValueError, match='classification only'):
        config.load_config(None, ['model.pooling=mean', 'model.task=causal_lm'])


def test_bad_override_syntax():
    with pytest.raises(ValueError, match='key.sub=value'):
        config.load_config(None, ['train.steps'])


def test_missing_file():
    with pytest.raises(FileNotFoundError, match='nope.yaml'):
        config.load_config('nope.yaml')


def test_to_dict_round_trip_through_yaml(tmp_path):
    cfg = config.load_config(None, ['train.steps=3', 'lora.enabled=true', 'mesh.fsdp=2'])
    config.save_config(cfg, tmp_path / 'c.yaml')
    assert config.load_config(tmp_path / 'c.yaml') == cfg


def test_configs_are_frozen():
    cfg = config.RunCfg()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.steps = 3


def test_registered_prune_subclass_gets_its_fields():
    @config.register_prune('_test_method')
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class _TestCfg(config.PruneCfg):
        n: int = 2

    cfg = config.load_config(None, ['prune.method=_test_method', 'prune.n=4',
                                    'prune.target_density=0.5'])
    assert isinstance(cfg.prune, _TestCfg) and cfg.prune.n == 4
    assert config.RunCfg.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="'prune.n'"):  # 'none' has no field n
        config.load_config(None, ['prune.n=4'])


@pytest.mark.parametrize('shape,n,expected', [
    ((-1, 1, 1), 8, {'data': 8, 'fsdp': 1, 'tensor': 1}),
    ((2, -1, 2), 8, {'data': 2, 'fsdp': 2, 'tensor': 2}),
    ((1, 1, 1), 8, {'data': 1, 'fsdp': 1, 'tensor': 1}),
])
def test_mesh_shape(shape, n, expected):
    d, f, t = shape
    assert config.MeshCfg(data=d, fsdp=f, tensor=t).shape(n) == expected


def test_schedule_warmup_then_cosine():
    tc = config.TrainCfg(steps=100, learning_rate=1e-3, warmup_steps=10, final_lr_ratio=0.1)
    sched = tc.build_schedule()
    assert float(sched(0)) == 0.0
    assert float(sched(10)) == pytest.approx(1e-3, rel=1e-6)
    assert float(sched(100)) == pytest.approx(1e-4, rel=1e-5)
    assert float(sched(55)) == pytest.approx(1e-4 + 0.5 * 9e-4, rel=1e-4)  # cosine midpoint


def test_optimizer_skips_nonfinite_updates():
    tx = config.TrainCfg(learning_rate=0.1).build_optimizer()
    params = {'w': jnp.ones((2, 2)), 'b': jnp.zeros(2)}
    state = tx.init(params)
    upd, _ = tx.update({'w': jnp.full((2, 2), jnp.nan), 'b': jnp.ones(2)}, state, params)
    assert all(bool(jnp.all(u == 0)) for u in jax_leaves(upd))
    upd, _ = tx.update({'w': jnp.ones((2, 2)), 'b': jnp.ones(2)}, state, params)
    assert float(optax.tree.norm(upd)) > 0


def jax_leaves(tree):
    import jax

    return jax.tree.leaves(tree)
