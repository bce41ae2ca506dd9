"""Model-level masks, taps and LoRA semantics on tiny Llama and BERT models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxprune.lora import _spec
from jaxprune.models import _bert, _llama

TOL = 1e-5  # float32
LORA = _spec.LoraSpec(rank=2, alpha=4.0, targets=r'.*\.(q_proj|v_proj|down_proj|query|value|up)')
IDS = jnp.asarray(np.random.default_rng(0).integers(0, 100, (2, 6)))
EPS = 1e-2  # finite-difference step
AMASK = jnp.asarray([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])


def _model(arch, lora=None, seed=0):
    if arch == 'llama':
        return _llama.Llama(_llama.LlamaConfig.tiny(), lora=lora, rngs=nnx.Rngs(seed))
    return _bert.BertForSequenceClassification(
        _bert.BertConfig.tiny(), lora=lora, rngs=nnx.Rngs(seed)
    )


def _perturb_lora(model):
    params = nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))
    params = jax.tree.map(lambda x: x + 0.05 * jnp.ones_like(x), params)
    nnx.update(model, params)


def _ones_masks(model):
    cfg = model.config
    names = {'llama': ('q_proj', 'v_proj', 'down_proj'), 'bert': ('query', 'value', 'up')}
    arch = 'llama' if isinstance(cfg, _llama.LlamaConfig) else 'bert'
    d = cfg.hidden_size
    layers = tuple(
        {
            'heads': jnp.ones(cfg.heads(i)),
            'attn_ctx': jnp.ones(cfg.heads(i) * cfg.head_dim),
            'mlp': jnp.ones(cfg.mlp(i)),
            'attn_in': jnp.ones(d),
            'attn_out': jnp.ones(d),
            'mlp_in': jnp.ones(d),
            'mlp_out': jnp.ones(d),
            'lora': {n: jnp.ones(LORA.rank) for n in names[arch]},
        }
        for i in range(cfg.num_layers)
    )
    return {'hidden': jnp.ones(d), 'layers': layers}


@pytest.mark.parametrize('arch', ['llama', 'bert'])
@pytest.mark.parametrize('lora_aware', [False, True])
def test_all_ones_masks_equal_no_masks(arch, lora_aware, graph_mode):
    model = _model(arch, LORA)
    _perturb_lora(model)
    dense = model(IDS, AMASK, lora_aware=lora_aware)
    masked = model(IDS, AMASK, masks=_ones_masks(model), lora_aware=lora_aware)
    np.testing.assert_allclose(masked, dense, atol=TOL, rtol=0)
    # lora_aware only changes anything when masks are present.
    np.testing.assert_allclose(model(IDS, AMASK), dense, atol=TOL, rtol=0)


@pytest.mark.parametrize('arch', ['llama', 'bert'])
def test_head_and_ctx_masks_equal_zeroed_o_proj_rows(arch, graph_mode):
    model = _model(arch)
    cfg = model.config
    hd = cfg.head_dim
    heads = jnp.asarray([1.0, 0.0, 1.0, 0.0])
    ctx = jnp.ones(cfg.num_heads * hd).at[3].set(0.0)
    masks = {'layers': ({'heads': heads, 'attn_ctx': ctx}, {})}
    masked = model(IDS, AMASK, masks=masks)
    o = model.layers[0].attn.o_proj if arch == 'llama' else model.layers[0].attn.out
    rows = np.repeat(np.asarray(heads), hd) * np.asarray(ctx)
    o.kernel[...] = o.kernel[...] * rows[:, None]
    np.testing.assert_allclose(model(IDS, AMASK), masked, atol=TOL, rtol=0)


def test_input_and_output_masks_equal_zeroed_kernels(graph_mode):
    model = _model('llama')
    d = model.config.hidden_size
    m_in = jnp.asarray(np.arange(d) % 4 != 0, jnp.float32)
    m_out = jnp.asarray(np.arange(d) % 5 != 0, jnp.float32)
    masks = {'layers': ({'attn_in': m_in, 'mlp_out': m_out, 'mlp_in': m_out}, {})}
    masked = model(IDS, masks=masks)
    blk = model.layers[0]
    for lin in (blk.attn.q_proj, blk.attn.k_proj, blk.attn.v_proj):
        lin.kernel[...] = lin.kernel[...] * m_in[:, None]
    for lin in (blk.mlp.gate_proj, blk.mlp.up_proj):
        lin.kernel[...] = lin.kernel[...] * m_out[:, None]
    blk.mlp.down_proj.kernel[...] = blk.mlp.down_proj.kernel[...] * m_out[None, :]
    np.testing.assert_allclose(model(IDS), masked, atol=TOL, rtol=0)


@pytest.mark.parametrize('arch', ['llama', 'bert'])
def test_fresh_lora_equals_base(arch, graph_mode):
    base = _model(arch)
    with_lora = _model(arch, LORA, seed=1)
    params = nnx.to_pure_dict(nnx.state(base, nnx.Param))
    lora_params = nnx.to_pure_dict(nnx.state(with_lora, nnx.LoRAParam))
    nnx.update(with_lora, params)
    assert jax.tree.leaves(lora_params)  # adapters exist
    np.testing.assert_allclose(with_lora(IDS, AMASK), base(IDS, AMASK), atol=1e-6, rtol=0)
    np.testing.assert_allclose(
        with_lora(IDS, AMASK, lora_aware=True), base(IDS, AMASK), atol=1e-6, rtol=0
    )


def test_rank_mask_zero_equals_no_adapter(graph_mode):
    model = _model('llama', LORA)
    _perturb_lora(model)
    zero = {n: jnp.zeros(LORA.rank) for n in ('q_proj', 'v_proj', 'down_proj')}
    masks = {'layers': ({'lora': zero}, {'lora': zero})}
    out = model(IDS, masks=masks)
    params = nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))
    nnx.update(model, jax.tree.map(jnp.zeros_like, params))
    np.testing.assert_allclose(model(IDS), out, atol=TOL, rtol=0)


def test_lora_aware_adapter_bypasses_masks():
    """With lora_aware, masking a whole MLP leaves exactly the down_proj adapter path."""
    model = _model('llama', _spec.LoraSpec(rank=2, targets=r'.*down_proj'))
    _perturb_lora(model)
    cfg = model.config
    masks = {'layers': tuple({'mlp': jnp.zeros(cfg.mlp(i))} for i in range(cfg.num_layers))}
    aware = model(IDS, masks=masks, lora_aware=True)
    plain = model(IDS, masks=masks)
    assert float(jnp.max(jnp.abs(aware - plain))) > 1e-4
    # Reference: zero the base down_proj kernel; the adapter sees the unmasked FFN activation.
    for blk in model.layers:
        blk.mlp.down_proj.kernel[...] = jnp.zeros_like(blk.mlp.down_proj.kernel[...])
    np.testing.assert_allclose(model(IDS), aware, atol=TOL, rtol=0)


def _taps(model, bsz, t):
    return _llama.make_taps(model.config, bsz, t)


@pytest.mark.parametrize('arch', ['llama', 'bert'])
def test_taps_gradient_matches_finite_difference(arch, graph_mode):
    """<dL/dtap, v> == (L(tap + eps v) - L(tap - eps v)) / 2 eps; rtol 2e-2 (float32, eps 1e-2)."""
    model = _model(arch)
    graphdef, params = nnx.split(model)
    w = jax.random.normal(jax.random.key(3), model(IDS, AMASK).shape)

    @jax.jit
    def loss(taps):
        out, _ = nnx.merge(graphdef, params)(IDS, AMASK, taps=taps)
        return jnp.sum(out * w)

    taps = _taps(model, *IDS.shape)
    grads = jax.grad(loss)(taps)
    for site in ('attn_ctx', 'mlp', 'resid'):
        v = jax.tree.map(jnp.zeros_like, taps)
        v[1][site] = jax.random.normal(jax.random.key(4), taps[1][site].shape)
        plus = loss(jax.tree.map(lambda a, b: a + EPS * b, taps, v))
        minus = loss(jax.tree.map(lambda a, b: a - EPS * b, taps, v))
        fd = (plus - minus) / (2 * EPS)
        an = jnp.sum(grads[1][site] * v[1][site])
        np.testing.assert_allclose(an, fd, rtol=2e-2, atol=1e-4)


def test_tap_acts_match_explicit_computation(graph_mode):
    """acts = per-channel sum over real tokens of |H| (layer 0 of a Llama, computed by hand)."""
    model = _model('llama')
    cfg = model.config
    logits, acts = model(IDS, AMASK, taps=_taps(model, *IDS.shape))
    np.testing.assert_allclose(logits, model(IDS, AMASK), atol=TOL, rtol=0)
    blk = model.layers[0]
    x = model.embed(IDS)
    t = IDS.shape[1]
    positions = jnp.broadcast_to(jnp.arange(t), IDS.shape)
    allowed = jnp.tril(jnp.ones((t, t), bool))[None] & (AMASK[:, None, :] > 0)
    bias = jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min)
    from jaxprune.models import _layers

    inv = _layers.rope_inv_freq(cfg.head_dim, theta=cfg.rope_theta)
    a, _ = blk.attn(blk.attn_norm(x), positions, bias, inv, None, None, None, False)
    x1 = x + a
    hn = blk.mlp_norm(x1)
    h = jax.nn.silu(blk.mlp.gate_proj(hn)) * blk.mlp.up_proj(hn)
    f = blk.mlp.down_proj(h)
    wts = np.asarray(AMASK, np.float32)[..., None]
    np.testing.assert_allclose(acts[0]['mlp'], np.sum(np.abs(h) * wts, (0, 1)), rtol=1e-5)
    np.testing.assert_allclose(
        acts[0]['resid'], np.sum((np.abs(a) + np.abs(f)) * wts, (0, 1)), rtol=1e-5
    )
    assert acts[0]['attn_ctx'].shape == (cfg.num_heads * cfg.head_dim,)


@pytest.mark.parametrize('arch', ['llama', 'bert'])
def test_output_hidden_states_are_the_block_outputs(arch, graph_mode):
    """One entry per block, the last feeding the head; same with taps; logits unchanged."""
    model = _model(arch, LORA)
    _perturb_lora(model)
    masks = _ones_masks(model)
    masks['layers'][0]['mlp'] = masks['layers'][0]['mlp'].at[1].set(0.0)
    logits, hiddens = model(IDS, AMASK, masks=masks, output_hidden_states=True)
    np.testing.assert_allclose(logits, model(IDS, AMASK, masks=masks), atol=TOL, rtol=0)
    assert len(hiddens) == model.config.num_layers
    taps = _taps(model, *IDS.shape)
    _, acts, hiddens2 = model(IDS, AMASK, masks=masks, taps=taps,
                                    output_hidden_states=True)
    assert isinstance(acts[0], dict) and 'mlp' in acts[0]
    for h, h2 in zip(hiddens, hiddens2, strict=True):
        np.testing.assert_allclose(h, h2, atol=TOL, rtol=0)
    if arch == 'bert':
        last, _ = model.hidden_states(IDS, AMASK, masks=masks)
        np.testing.assert_allclose(hiddens[-1], last, atol=TOL, rtol=0)
    else:  # logits = lm_head(norm(last block output))
        x = model.norm(hiddens[-1], masks['hidden'])
        ref = model.embed.attend(x) if model.lm_head is None else model.lm_head(x)
        np.testing.assert_allclose(ref, logits, atol=TOL, rtol=0)
    # Layer 1's output is block 1 applied to layer 0's output (the list is not shifted).
    assert not np.allclose(hiddens[0], hiddens[1])


def test_masks_layer_count_is_checked():
    model = _model('llama')
    with pytest.raises(ValueError, match='one dict per layer'):
        model(IDS, masks={'layers': ({},)})


@pytest.mark.parametrize('arch', ['llama', 'bert'])
def test_functional_jit_matches_eager(arch, graph_mode):
    """split -> jit(merge + forward) with masks as traced inputs equals the eager call (1e-5)."""
    model = _model(arch, LORA)
    _perturb_lora(model)
    masks = _ones_masks(model)
    masks['layers'][0]['heads'] = jnp.asarray([1.0, 0.0, 1.0, 1.0])
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def fwd(params, masks):
        return nnx.merge(graphdef, params, rest)(IDS, AMASK, masks=masks, lora_aware=True)

    eager = model(IDS, AMASK, masks=masks, lora_aware=True)
    np.testing.assert_allclose(fwd(params, masks), eager, atol=TOL, rtol=0)
