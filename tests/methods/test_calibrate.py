"""Calibration: Gram matrices / Wanda norms of Linear inputs, sequential SparseGPT."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxprune.masks import _nm
from jaxprune.methods import _calibrate, _oneshot
from jaxprune.models import _llama


def _model(seed=0):
    return _llama.Llama(_llama.LlamaConfig.tiny(), rngs=nnx.Rngs(seed))


def _batches(n=2, b=2, t=8, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 128, (b, t)).astype(np.int32) for _ in range(n)]


def _block_inputs(model, ids):
    """Reference: run the blocks one by one in plain Python, recording Linear inputs by hand."""
    cfg = model.config
    positions, bias, inv_freq = _calibrate._llama_aux(model, ids.shape[1], ids.shape[0])
    x = model.embed(jnp.asarray(ids))
    rec = {}
    for li, block in enumerate(model.layers):
        a_in = block.attn_norm(x, None)
        for name in ('q_proj', 'k_proj', 'v_proj'):
            rec[f'layers.{li}.attn.{name}.kernel'] = a_in
        h, _ = block(x, positions, bias, inv_freq, None, None, None, None, False)
        m_in = block.mlp_norm(x + (h - x - _mlp_out(block, x, positions, bias, inv_freq)), None)
        for name in ('gate_proj', 'up_proj'):
            rec[f'layers.{li}.mlp.{name}.kernel'] = m_in
        x = h
    del cfg
    return rec


def _mlp_out(block, x, positions, bias, inv_freq):
    a, _ = block.attn(block.attn_norm(x, None), positions, bias, inv_freq, None, None, None, False)
    return block.mlp(block.mlp_norm(x + a, None), None, None, None, False)[0]


def test_collect_input_grams_matches_reference():
    """q/k/v and gate/up Grams equal X^T X of hand-recorded inputs (rtol 1e-4, f32)."""
    model = _model()
    batches = _batches()
    grams = _calibrate.collect_input_grams(model, batches)
    assert len(grams) == 2 * 7
    ref = {}
    for ids in batches:
        for k, x in _block_inputs(model, ids).items():
            x2 = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
            ref[k] = ref.get(k, 0) + x2.T @ x2
    for k, h in ref.items():
        np.testing.assert_allclose(np.asarray(grams[k]), h, rtol=1e-4, atol=1e-4)
    # Detached: the model has no calibration variables left and is unchanged.
    assert not nnx.state(model, _calibrate.InputGram)


def test_collect_input_norms_is_sqrt_diag():
    model = _model()
    grams = _calibrate.collect_input_grams(model, _batches())
    norms = _calibrate.collect_input_norms(model, _batches())
    for k, h in grams.items():
        np.testing.assert_allclose(norms[k], np.sqrt(np.diag(h)), rtol=1e-6)
        assert norms[k].shape == (h.shape[0],)


def test_collect_input_grams_rejects_bad_include():
    with pytest.raises(ValueError, match='include'):
        _calibrate.collect_input_grams(_model(), _batches(), include='nothing_matches')


def test_sparsegpt_sequential_first_block_matches_oneshot():
    """Block 0 sees the embeddings in both procedures, so its kernels match the one-shot
    SparseGPT on full-model Grams exactly (atol 1e-5); later blocks see pruned inputs."""
    batches = _batches()
    ref_model = _model()
    grams = _calibrate.collect_input_grams(ref_model, batches)
    params = nnx.state(ref_model, nnx.Param)
    pruned, _ = _oneshot.sparsegpt_prune_params(params, grams)
    model, masks = _calibrate.sparsegpt_sequential(_model(), batches)
    got = nnx.state(model, nnx.Param)
    for k in ('attn.q_proj', 'attn.v_proj', 'mlp.gate_proj', 'mlp.down_proj'):
        a = got['layers'][0][k.split('.')[0]][k.split('.')[1]]['kernel'][...]
        b = pruned['layers'][0][k.split('.')[0]][k.split('.')[1]]['kernel'][...]
        np.testing.assert_allclose(a, b, atol=1e-5)
    # Later blocks differ (their inputs come from pruned blocks) and every mask is exact 2:4.
    a1 = got['layers'][1]['mlp']['down_proj']['kernel'][...]
    b1 = pruned['layers'][1]['mlp']['down_proj']['kernel'][...]
    assert not np.allclose(a1, b1, atol=1e-6)
    assert len(masks) == 14
    for k, mk in masks.items():
        assert bool(_nm.is_nm(mk, n=2, m=4)), k
    tree = _calibrate.masks_tree(got, masks)
    n_sparse = sum(x is not None for x in jax.tree.leaves(tree, is_leaf=lambda x: x is None))
    assert n_sparse == 14
