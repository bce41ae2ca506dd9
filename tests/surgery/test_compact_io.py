"""Compact (ATP/DISP dim-sliced) models on disk: round trip, forward, counts, clear errors."""

import json

import disp_masks
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import numpy as st_numpy

from jaxprune import models, surgery
from jaxprune.masks import _density
from jaxprune.surgery import _compact_io, _dims

PROJ = ('q', 'k', 'v', 'o', 'gate', 'up', 'down')


def _setup(seed=0, tied=False, empty_layer=None, dtype=jnp.float32):
    cfg = models.LlamaConfig.tiny(tie_word_embeddings=tied, num_layers=3)
    model = models.Llama(cfg, param_dtype=dtype, rngs=nnx.Rngs(seed))
    masks = disp_masks.random_masks(cfg, seed, empty_layer=empty_layer)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return cfg, model, masks, _dims.compact(cfg, params, masks)


@pytest.mark.parametrize('seed,tied,empty_layer', [(0, False, None), (1, True, 1)])
def test_save_load_compact_round_trip(tmp_path, seed, tied, empty_layer):
    """Arrays identical (bitwise, same dtypes); logits of the loaded model equal the in-memory
    ones exactly and the masked model's to atol/rtol 1e-5 (f32: same sums, fewer zero terms)."""
    cfg, model, masks, compact = _setup(seed, tied, empty_layer)
    dims = _density.layer_dims(cfg)
    counts = {'prunable': _density.prunable_params(dims),
              'kept': disp_masks.reference_kept(masks, dims)}
    out = surgery.save_compact(tmp_path / 'pruned', compact, cfg, {'counts': counts, 'run': 'x'})
    assert out == tmp_path / 'pruned'
    got, got_cfg, record = surgery.load_compact(out)
    assert got_cfg == cfg
    assert jax.tree.structure(got) == jax.tree.structure(compact)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(compact), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ids = jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab_size, (2, 9)), jnp.int32)
    fwd = jax.jit(_dims.compact_forward, static_argnames='config')
    loaded = np.asarray(fwd(got, ids, config=got_cfg))
    np.testing.assert_array_equal(loaded, np.asarray(fwd(compact, ids, config=cfg)))
    np.testing.assert_allclose(loaded, np.asarray(model(ids, masks=masks)), atol=1e-5, rtol=1e-5)
    # The folder itself: index arrays stored as int32, projection params == the exact count.
    flat = st_numpy.load_file(str(out / 'model.safetensors'))
    assert all(v.dtype == np.int32 for k, v in flat.items() if k.endswith('_idx'))
    stored = sum(v.size for k, v in flat.items() if k.rsplit('.', 1)[-1] in PROJ)
    assert stored == counts['kept'] == record['counts']['kept']
    assert stored == int(_density.kept_count(masks, dims))
    assert sum(r['params'] for r in record['layers']) == stored
    assert record['counts']['prunable'] == counts['prunable']
    assert record['density'] == pytest.approx(stored / counts['prunable'], rel=1e-12)
    assert record['meta']['run'] == 'x' and record['version'] == _compact_io.VERSION
    assert ('lm_head' in flat) is not tied
    if empty_layer is not None:
        assert record['layers'][empty_layer]['kv_groups'] == 0
        assert record['layers'][empty_layer]['mlp'] == 0


def test_save_load_compact_bf16(tmp_path):
    """bf16 kernels keep their dtype (safetensors BF16 via ml_dtypes); indices stay int32."""
    cfg, _, _, compact = _setup(2, dtype=jnp.bfloat16)
    got, _, _ = surgery.load_compact(surgery.save_compact(tmp_path, compact, cfg))
    assert got['layers'][0]['attn']['q'].dtype == jnp.bfloat16
    assert got['layers'][0]['attn']['in_idx'].dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got['layers'][2]['mlp']['down'], np.float32),
                                  np.asarray(compact['layers'][2]['mlp']['down'], np.float32))


def test_save_compact_rejects_wrong_counts_and_meta(tmp_path):
    cfg, _, _, compact = _setup(0)
    with pytest.raises(ValueError, match='projection parameters'):
        surgery.save_compact(tmp_path, compact, cfg, {'counts': {'kept': 1}})
    with pytest.raises(ValueError, match='JSON'):
        surgery.save_compact(tmp_path, compact, cfg, {'x': np.ones(2)})
    with pytest.raises(ValueError, match='shape'):  # config does not describe the params
        surgery.save_compact(tmp_path, compact, models.LlamaConfig.tiny(num_layers=3,
                                                                        hidden_size=16))


def _edit_json(path, **changes):
    f = path / 'jaxprune_compact.json'
    record = json.loads(f.read_text())
    record.update(changes)
    f.write_text(json.dumps(record))


def _edit_weights(path, fn):
    f = path / 'model.safetensors'
    flat = st_numpy.load_file(str(f))
    fn(flat)
    st_numpy.save_file(flat, str(f))


@pytest.mark.parametrize('case,error,match', [
    ('no_folder', FileNotFoundError, 'save_compact'),
    ('no_json', FileNotFoundError, 'jaxprune_compact.json.*<run_dir>/pruned'),
    ('no_weights', FileNotFoundError, 'model.safetensors.*save_compact'),
    ('bad_json', ValueError, 'not valid JSON'),
    ('format', ValueError, "format='jaxprune-pruned'"),
    ('version', ValueError, 'version=99'),
    ('shape', ValueError, r"'layers.1.attn.q' has shape \(\d+, 8\)"),
    ('missing_tensor', ValueError, r"missing \['layers.0.mlp.up'\]"),
    ('index_range', ValueError, "'layers.0.mlp.out_idx' must be int32 in"),
    ('index_dtype', ValueError, 'int64'),
    ('truncated', ValueError, 'unreadable'),
])
def test_load_compact_errors(tmp_path, case, error, match):
    cfg, _, _, compact = _setup(0)
    path = surgery.save_compact(tmp_path / 'm', compact, cfg)
    if case == 'no_folder':
        path = tmp_path / 'nothing'
    elif case == 'no_json':
        (path / 'jaxprune_compact.json').unlink()
    elif case == 'no_weights':
        (path / 'model.safetensors').unlink()
    elif case == 'bad_json':
        (path / 'jaxprune_compact.json').write_text('{"format": ')
    elif case == 'format':
        _edit_json(path, format='jaxprune-pruned')
    elif case == 'version':
        _edit_json(path, version=99)
    elif case == 'shape':
        _edit_weights(path, lambda f: f.update({'layers.1.attn.q': f['layers.1.attn.q'][:, :8]}))
    elif case == 'missing_tensor':
        _edit_weights(path, lambda f: f.pop('layers.0.mlp.up'))
    elif case == 'index_range':
        _edit_weights(path, lambda f: f['layers.0.mlp.out_idx'].__setitem__(0, cfg.hidden_size))
    elif case == 'index_dtype':
        _edit_weights(path, lambda f: f.update(
            {'layers.0.attn.in_idx': f['layers.0.attn.in_idx'].astype(np.int64)}))
    elif case == 'truncated':
        w = path / 'model.safetensors'
        w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(error, match=match):
        surgery.load_compact(path)
