"""Per-layer input/output dim surgery for DISP/ATP masks, with a compact Llama forward.

``jaxprune.surgery.prune`` removes what a ``LlamaConfig`` can express (whole GQA groups, FFN
neurons, a uniform hidden width). ATP (after DISP-LLM) also prunes, per layer and independently,

* the *input* dims of ``q/k/v_proj`` (``attn_in``) and ``gate/up_proj`` (``mlp_in``),
* the *output* dims of ``o_proj`` (``attn_out``) and ``down_proj`` (``mlp_out``),
* single value-head dims (``attn_ctx``): rows of ``o_proj`` and, once a dim is pruned in every
  query head of a GQA group, the matching ``v_proj`` column.

The residual stream keeps its full width ``D`` (embeddings, RoPE, norms are untouched). A block
gathers its kept input dims after the norm and scatters its output back into the residual
(``x.at[..., out_idx].add(y)``): DISP's selection matrices ``S_l`` as index arrays. Value columns
are computed only where kept and scattered into a zero ``[B, T, KV * hd]`` tensor before the
attention product; only the kept context channels enter ``o_proj``.

No model config can describe these ragged per-layer index sets, so :func:`compact` returns a
plain pytree (sliced kernels + ``int32`` index arrays whose *shapes* are static) and
:func:`compact_forward` is its forward. Invariant (tested): ``compact_forward(compact(config,
params, masks))`` equals ``Llama(config)(x, masks=masks)`` (evaluation semantics), and the number
of projection parameters equals ``jaxprune.masks._density.kept_count(masks, dims)`` exactly.
Biased projections (``attention_bias``/``mlp_bias``) are not supported (a pruned input dim does not
remove a bias, so the count model would differ); SmolLM2/Llama have none.

On disk: ``jaxprune.surgery.save_compact`` / ``load_compact`` (``_compact_io``) store the pytree as
``model.safetensors`` (flat keys, ``int32`` indices) + ``jaxprune_compact.json`` (config, per-layer
kept dims, counts).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.models import _layers

PROJECTIONS = ('q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj')
_KERNELS = ('q', 'k', 'v', 'o', 'gate', 'up', 'down')


def _idx(mask: Any, size: int) -> np.ndarray:
    if mask is None:
        return np.arange(size, dtype=np.int32)
    m = np.asarray(mask, np.float32)
    if m.shape != (size,):
        raise ValueError(f'mask of shape {m.shape} must have shape ({size},)')
    return np.flatnonzero(m > 0.5).astype(np.int32)


def _kernel(params: Any, layer: int, block: str, proj: str) -> np.ndarray:
    node = params['layers'][layer][block][proj]
    if 'lora_a' in node:
        raise ValueError(
            f'layers.{layer}.{block}.{proj} still has LoRA factors; merge them first '
            '(jaxprune.lora.merge_lora) so the pruned weights hold W + s A B')
    if node.get('bias') is not None:
        raise ValueError(f'layers.{layer}.{block}.{proj} has a bias; biased projections are '
                         'not supported by dim surgery (use jaxprune.surgery.prune only)')
    return np.asarray(node['kernel'])


def compact(config: Any, params: Any, masks: Any) -> dict[str, Any]:
    """Slice every projection of a Llama to the dims kept by DISP-style masks (outside jit).

    Args:
      config: the ``LlamaConfig`` that ``params`` belong to (per-layer heads/FFN widths are read,
        so a model already pruned by ``jaxprune.surgery.prune`` works).
      params: pure-dict params (``nnx.to_pure_dict(nnx.state(model, nnx.Param))``) with LoRA
        already merged.
      masks: hard masks ``{'layers': ({'attn_in', 'attn_ctx', 'attn_out', 'mlp_in', 'mlp',
        'mlp_out'}, ...)}`` for ``config`` (missing = keep all); ``heads`` is folded into
        ``attn_ctx``. A ``hidden`` mask is not supported (ATP keeps the residual width).

    Returns:
      ``{'embed', 'norm', 'lm_head' (None when tied), 'layers': ({'attn_norm', 'mlp_norm',
      'attn': {'in_idx', 'q', 'k', 'v', 'v_idx', 'o_idx', 'o', 'out_idx'}, 'mlp': {'in_idx',
      'gate', 'up', 'down', 'out_idx'}}, ...)}``: kernels ``(K, N)`` and ``int32`` indices.
      ``v_idx`` indexes columns of the kept groups' ``[G_kept * hd]`` value layout and ``o_idx``
      channels of their ``[G_kept * q_per_kv * hd]`` context.

    Raises:
      ValueError: LoRA factors or biases present, a ``hidden`` mask, or mis-sized masks.
    """
    if masks is not None and masks.get('hidden') is not None:
        raise ValueError("masks['hidden'] is not supported by dim surgery; prune the hidden "
                         'width with jaxprune.surgery.prune first')
    layer_masks = (masks or {}).get('layers') or ({},) * config.num_layers
    if len(layer_masks) != config.num_layers:
        raise ValueError(f'masks have {len(layer_masks)} layers; expected {config.num_layers}')
    d, hd, g = config.hidden_size, config.head_dim, config.q_per_kv
    layers = []
    for i, m in enumerate(layer_masks):
        m = m or {}
        heads, kv, f = config.heads(i), config.kv_heads(i), config.mlp(i)
        ctx = np.ones(heads * hd, np.float32) if m.get('attn_ctx') is None else np.asarray(
            m['attn_ctx'], np.float32)
        if ctx.shape != (heads * hd,):
            raise ValueError(f'layer {i}: attn_ctx has shape {ctx.shape}; expected ({heads * hd},)')
        if m.get('heads') is not None:
            ctx = ctx * np.repeat(np.asarray(m['heads'], np.float32), hd)
        ctx = (ctx > 0.5).reshape(kv, g, hd)
        groups = np.flatnonzero(ctx.any(axis=(1, 2)))
        kept_ctx = ctx[groups]  # [Gk, g, hd]
        v_keep = kept_ctx.any(axis=1).reshape(-1)  # [Gk * hd]
        q_cols = (groups[:, None] * g * hd + np.arange(g * hd)).reshape(-1)
        kv_cols = (groups[:, None] * hd + np.arange(hd)).reshape(-1)
        a_in, a_out = _idx(m.get('attn_in'), d), _idx(m.get('attn_out'), d)
        wq, wk, wv, wo = (_kernel(params, i, 'attn', p) for p in PROJECTIONS[:4])
        attn = {
            'in_idx': a_in,
            'q': wq[np.ix_(a_in, q_cols)],
            'k': wk[np.ix_(a_in, kv_cols)],
            'v': wv[np.ix_(a_in, kv_cols[v_keep])],
            'v_idx': np.flatnonzero(v_keep).astype(np.int32),
            'o_idx': np.flatnonzero(kept_ctx.reshape(-1)).astype(np.int32),
            'o': wo[np.ix_(q_cols[kept_ctx.reshape(-1)], a_out)],
            'out_idx': a_out,
        }
        neurons = _idx(m.get('mlp'), f)
        m_in, m_out = _idx(m.get('mlp_in'), d), _idx(m.get('mlp_out'), d)
        wg, wu, wd = (_kernel(params, i, 'mlp', p) for p in PROJECTIONS[4:])
        mlp = {
            'in_idx': m_in,
            'gate': wg[np.ix_(m_in, neurons)],
            'up': wu[np.ix_(m_in, neurons)],
            'down': wd[np.ix_(neurons, m_out)],
            'out_idx': m_out,
        }
        lp = params['layers'][i]
        layers.append({
            'attn_norm': lp['attn_norm']['scale'], 'mlp_norm': lp['mlp_norm']['scale'],
            'attn': attn, 'mlp': mlp,
        })
    out = {
        'embed': params['embed']['embedding'],
        'norm': params['norm']['scale'],
        'lm_head': None if config.tie_word_embeddings else params['lm_head']['kernel'],
        'layers': tuple(layers),
    }
    return jax.tree.map(jnp.asarray, out)


def projection_param_count(compact_params: Any) -> int:
    """Number of parameters in the seven projection kernels of a :func:`compact` pytree."""
    total = 0
    for layer in compact_params['layers']:
        for block, names in (('attn', ('q', 'k', 'v', 'o')), ('mlp', ('gate', 'up', 'down'))):
            total += sum(int(np.prod(layer[block][n].shape)) for n in names)
    return total


def param_count(compact_params: Any) -> int:
    """All stored parameters (float leaves) of a :func:`compact` pytree; indices excluded."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(compact_params)
               if jnp.issubdtype(x.dtype, jnp.floating))


def _rms_norm(x, scale, eps):
    h = x.astype(jnp.float32)
    var = jnp.mean(h * h, axis=-1, keepdims=True)
    return (h * jax.lax.rsqrt(var + eps)).astype(x.dtype) * scale.astype(x.dtype)


def _attention(p, h, positions, bias, inv_freq, *, head_dim, q_per_kv):
    bsz, t, _ = h.shape
    x = h[..., p['in_idx']]
    groups = p['k'].shape[1] // head_dim
    q = (x @ p['q']).reshape(bsz, t, groups * q_per_kv, head_dim)
    k = (x @ p['k']).reshape(bsz, t, groups, head_dim)
    v = jnp.zeros((bsz, t, groups * head_dim), h.dtype).at[..., p['v_idx']].set(x @ p['v'])
    v = v.reshape(bsz, t, groups, head_dim)
    q = _layers.apply_rope(q, positions, inv_freq).reshape(bsz, t, groups, q_per_kv, head_dim)
    k = _layers.apply_rope(k, positions, inv_freq)
    scores = jnp.einsum('btkgd,bskd->bkgts', q, k).astype(jnp.float32) / jnp.sqrt(head_dim)
    probs = jax.nn.softmax(scores + bias[:, None, None], axis=-1).astype(v.dtype)
    ctx = jnp.einsum('bkgts,bskd->btkgd', probs, v).reshape(bsz, t, -1)
    return ctx[..., p['o_idx']] @ p['o']


def _mlp(p, h):
    x = h[..., p['in_idx']]
    return (jax.nn.silu(x @ p['gate']) * (x @ p['up'])) @ p['down']


def compact_forward(
    compact_params: Any,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    config: Any,
) -> jax.Array:
    """Logits ``[B, T, V]`` of a :func:`compact` model; jit with ``config`` static.

    Same computation as ``jaxprune.models.Llama.__call__`` with the masks the compact params were
    cut with (evaluation semantics), on the kept dims only.

    Args:
      compact_params: output of :func:`compact`.
      input_ids: ``int32[B, T]``.
      attention_mask: optional ``[B, T]`` (1 = real token; pad on the right).
      config: the ``LlamaConfig`` passed to :func:`compact` (rope, eps, head_dim, tying).
    """
    bsz, t = input_ids.shape
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))[None]
    positions = jnp.broadcast_to(jnp.arange(t), (bsz, t))
    allowed = causal if attention_mask is None else causal & (attention_mask[:, None, :] > 0)
    bias = jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min)
    inv_freq = _layers.rope_inv_freq(
        config.head_dim, theta=config.rope_theta, scaling=config.rope_scaling_dict)
    eps = config.rms_norm_eps
    x = jnp.take(compact_params['embed'], input_ids, axis=0)
    for layer in compact_params['layers']:
        h = _rms_norm(x, layer['attn_norm'], eps)
        a = _attention(layer['attn'], h, positions, bias, inv_freq, head_dim=config.head_dim,
                       q_per_kv=config.q_per_kv)
        x = x.at[..., layer['attn']['out_idx']].add(a)
        h = _rms_norm(x, layer['mlp_norm'], eps)
        x = x.at[..., layer['mlp']['out_idx']].add(_mlp(layer['mlp'], h))
    x = _rms_norm(x, compact_params['norm'], eps)
    head = compact_params['lm_head']
    return x @ compact_params['embed'].T if head is None else x @ head
