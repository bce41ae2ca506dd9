"""AST sparse inference: compressed 2:4 model == masked dense model; export is exactly 2:4."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import numpy as st_numpy

from jaxprune.masks import _nm
from jaxprune.methods import _ast_infer, _ast_train
from jaxprune.models import _llama

CFG = _llama.LlamaConfig.tiny()


def _model():
    return _llama.Llama(CFG, rngs=nnx.Rngs(0))


def _ids(b=2, t=12, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, CFG.vocab_size, (b, t)), jnp.int32)


def _masked_copy(model, masks):
    m = _model()
    nnx.update(m, nnx.state(model, nnx.Param))
    params = nnx.state(m, nnx.Param)
    nnx.update(m, _nm.apply_masks(params, masks))
    return m


@pytest.mark.parametrize('implementation', ['xla', None])
@pytest.mark.parametrize('slorb', [False, True])
def test_compress_model_matches_masked_logits(implementation, slorb):
    """Compressed logits == masked dense logits (f32, atol 1e-5: only the summation order of the
    2:4 product differs)."""
    model = _model()
    masks = _nm.nm_masks_for(nnx.state(model, nnx.Param))
    if slorb:
        _ast_train.add_slorb(model, masks, k=8)
    ref_model = _model()
    if slorb:
        _ast_train.add_slorb(ref_model, masks, k=8)
    nnx.update(ref_model, nnx.state(model, nnx.Param))
    nnx.update(ref_model, _nm.apply_masks(nnx.state(ref_model, nnx.Param), _nm.nm_masks_for(
        nnx.state(ref_model, nnx.Param))))
    ids = _ids()
    ref = ref_model(ids)
    done = _ast_infer.compress_model(model, masks, implementation=implementation)
    assert len(done) == 14
    assert model.layers[0].attn.q_proj.kernel is None
    np.testing.assert_allclose(model(ids), ref, atol=1e-5)


def test_compressed_forward_reads_only_compressed_weights():
    """Changing the (dropped) dense kernel cannot matter; changing a compressed value does."""
    model = _model()
    masks = _nm.nm_masks_for(nnx.state(model, nnx.Param))
    _ast_infer.compress_model(model, masks, implementation='xla')
    ids = _ids()
    before = model(ids)
    v = model.layers[0].mlp.down_proj.sparse24_values
    v[...] = v[...] * 2.0
    assert not np.allclose(model(ids), before, atol=1e-4)


def test_weight_bytes_counts_compressed_kernels():
    model = _model()
    dense = _ast_infer.weight_bytes(model)
    masks = _nm.nm_masks_for(nnx.state(model, nnx.Param))
    kernel_bytes = sum(int(m.size) * 4 for m in jax.tree.leaves(masks))
    _ast_infer.compress_model(model, masks)
    comp = _ast_infer.weight_bytes(model)
    # f32 values: half the kernel; metadata: one byte per 8 rows and column.
    expected_sparse = sum(int(m.size) * 2 + (m.shape[0] // 8) * m.shape[1]
                          for m in jax.tree.leaves(masks))
    assert comp['sparse'] == expected_sparse
    assert comp['total'] == dense['total'] - kernel_bytes + expected_sparse


def test_pack_bitmask_matches_reference():
    """Values in K order per output row, bits little-endian per byte (numpy reference)."""
    w = np.arange(1, 17, dtype=np.float32).reshape(2, 8)
    keep = np.array([[1, 0, 0, 1, 0, 1, 1, 0], [0, 0, 1, 1, 1, 1, 0, 0]], bool)
    out = _ast_infer.pack_bitmask(np.where(keep, w, 0), keep)
    np.testing.assert_array_equal(out['compressed'], [[1, 4, 6, 7], [11, 12, 13, 14]])
    np.testing.assert_array_equal(out['bitmask'], [[0b01101001], [0b00111100]])
    np.testing.assert_array_equal(out['shape'], [2, 8])
    back, k2 = _ast_infer.unpack_bitmask(out['compressed'], out['bitmask'], out['shape'])
    np.testing.assert_array_equal(back, np.where(keep, w, 0))
    np.testing.assert_array_equal(k2, keep)
    with pytest.raises(ValueError, match='2:4'):
        _ast_infer.pack_bitmask(w, np.ones_like(keep))


def test_export_is_exactly_24_and_round_trips(tmp_path):
    """Every sparse layer in the folder is exactly 2:4 along K (HF input axis); reload gives the
    masked logits (atol 1e-5) and the same masks."""
    model = _model()
    masks = _nm.nm_masks_for(nnx.state(model, nnx.Param))
    ref = _masked_copy(model, masks)(_ids())
    _ast_infer.export_sparse24(model, CFG, masks, tmp_path)
    tensors = st_numpy.load_file(str(tmp_path / 'model.safetensors'))
    bitmasks = [k for k in tensors if k.endswith('.bitmask')]
    assert len(bitmasks) == 14
    assert not any(k.endswith(('proj.weight',)) for k in tensors)
    for key in bitmasks:
        module = key.removesuffix('.bitmask')
        w, keep = _ast_infer.unpack_bitmask(tensors[f'{module}.compressed'], tensors[key],
                                            tensors[f'{module}.shape'])
        n, k = w.shape
        assert np.all(keep.reshape(n, k // 4, 4).sum(-1) == 2), key
        assert np.all(np.count_nonzero(w.reshape(n, k // 4, 4), axis=-1) <= 2), key
    qcfg = json.loads((tmp_path / 'config.json').read_text())['quantization_config']
    assert qcfg['format'] == 'sparse-24-bitmask'
    loaded, cfg, got_masks = _ast_infer.load_sparse24(tmp_path, implementation='xla')
    assert cfg == CFG
    np.testing.assert_allclose(loaded(_ids()), ref, atol=1e-5)
    want = _ast_infer.mask_dict(masks)
    assert set(got_masks) == set(want)
    for k, mk in want.items():
        np.testing.assert_array_equal(np.asarray(got_masks[k]), np.asarray(mk))


def test_export_round_trips_slorb(tmp_path):
    model = _model()
    masks = _nm.nm_masks_for(nnx.state(model, nnx.Param))
    _ast_train.add_slorb(model, masks, k=8)
    ids = _ids()
    comp = _model()
    _ast_train.add_slorb(comp, masks, k=8)
    nnx.update(comp, nnx.state(model, nnx.Param))
    _ast_infer.compress_model(comp, masks)
    _ast_infer.export_sparse24(model, CFG, masks, tmp_path)
    loaded, _, _ = _ast_infer.load_sparse24(tmp_path)
    np.testing.assert_allclose(loaded(ids), comp(ids), atol=1e-5)


def test_generate_matches_reference_greedy():
    """Compressed greedy decoding == a plain argmax loop on the masked dense model."""
    model = _model()
    masks = _nm.nm_masks_for(nnx.state(model, nnx.Param))
    dense = _masked_copy(model, masks)
    prompt = np.asarray(_ids(1, 5, seed=3))
    seq = prompt.copy()
    for _ in range(4):
        nxt = np.argmax(np.asarray(dense(jnp.asarray(seq)))[:, -1], -1)
        seq = np.concatenate([seq, nxt[:, None].astype(np.int32)], 1)
    _ast_infer.compress_model(model, masks, implementation='xla')
    out, dt = _ast_infer.generate(model, prompt, max_new_tokens=4, timing=True)
    np.testing.assert_array_equal(out, seq)
    assert dt > 0


def test_eval_perplexity_matches_reference():
    model = _model()
    ids = np.asarray(_ids(2, 9))
    batch = {'input_ids': ids[:, :-1], 'labels': ids[:, 1:].copy()}
    batch['labels'][0, :3] = -100
    got = _ast_infer.eval_perplexity(model, [batch])
    logits = np.asarray(model(jnp.asarray(batch['input_ids'])), np.float64)
    lp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    valid = batch['labels'] >= 0
    nll = -np.take_along_axis(lp, np.where(valid, batch['labels'], 0)[..., None], -1)[..., 0]
    ref = nll[valid].mean()
    assert got['tokens'] == int(valid.sum())
    np.testing.assert_allclose(got['loss'], ref, rtol=1e-5)


def test_load_sparse24_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match='config.json'):
        _ast_infer.load_sparse24(tmp_path / 'nope')


def _folded_model(params, masks, k):
    """A plain Llama (no SLoRB) with kernels ``W * M + repeat(S, k)`` (plain jnp reference)."""
    flat = {_nm.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    md = _ast_infer.mask_dict(masks)
    out = _model()
    state = nnx.state(out, nnx.Param)

    def one(path, x):
        key = _nm.path_str(path)
        if key not in md:
            return flat[key]
        s = flat.get(key.removesuffix('kernel') + 'slorb')
        w = jnp.where(md[key], flat[key], 0)
        return w if s is None else w + jnp.repeat(s, k, axis=0)

    nnx.update(out, jax.tree_util.tree_map_with_path(one, state))
    return out


@pytest.mark.parametrize('implementation', ['xla', None])
def test_compress_and_export_slorb_match_folded_reference(tmp_path, implementation):
    """A SLoRB model with trained (perturbed) S: compressed 2:4 logits and exported-reloaded
    logits == a plain model with kernels W*M + repeat(S, 16) (atol 1e-5), and S matters (the
    masked model without S differs by > 1e-3)."""
    model = _model()
    masks = _nm.nm_masks_for(nnx.state(model, nnx.Param))
    assert len(_ast_train.add_slorb(model, masks, k=16)) == 14
    rng = np.random.default_rng(1)
    nnx.update(model, jax.tree_util.tree_map_with_path(
        lambda p, x: x + jnp.asarray(0.05 * rng.normal(size=x.shape), x.dtype)
        if _nm.path_str(p).endswith('slorb') else x, nnx.state(model, nnx.Param)))
    params = nnx.state(model, nnx.Param)
    ids = _ids()
    ref = _folded_model(params, masks, 16)(ids)
    no_s = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.zeros_like(x) if _nm.path_str(p).endswith('slorb') else x, params)
    assert float(jnp.max(jnp.abs(ref - _folded_model(no_s, masks, 16)(ids)))) > 1e-3

    _ast_infer.export_sparse24(model, CFG, masks, tmp_path)
    tensors = st_numpy.load_file(str(tmp_path / 'model.safetensors'))
    assert sum(key.endswith('.slorb') for key in tensors) == 14
    qcfg = json.loads((tmp_path / 'config.json').read_text())['quantization_config']
    assert qcfg['jaxprune_slorb_k'] == 16
    loaded, _, _ = _ast_infer.load_sparse24(tmp_path, implementation=implementation)
    np.testing.assert_allclose(loaded(ids), ref, atol=1e-5)

    _ast_infer.compress_model(model, masks, implementation=implementation)
    assert model.layers[0].attn.q_proj.kernel is None
    np.testing.assert_allclose(model(ids), ref, atol=1e-5)
