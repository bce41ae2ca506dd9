"""ATP pruning-decision generator: a small pure-functional transformer over layer embeddings.

The generator maps learnable per-layer embeddings ``[L, W]`` through a few pre-LayerNorm
transformer-encoder layers (bidirectional attention across decoder layers, so decisions for
different layers are coordinated), a final LayerNorm and per-layer linear heads that emit one
logit per prunable unit of each DISP mask group (see ``jaxprune.masks._density``). It has no
input besides its own parameters: it is a learnable, structured prior over masks, sampled with
Gumbel-sigmoid (``jaxprune.masks._gumbel``).

Parameters are a plain pytree (dicts/tuples of arrays); all sizes are read from shapes, so
``generator_apply`` has no static arguments and ``jax.eval_shape(generator_init, ...)`` works.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxprune.masks import _density


@dataclasses.dataclass(frozen=True)
class MaskGroup:
    """One mask of the ATP search space.

    Attributes:
      name: group name in the masks layout (``attn_in``, ``attn_ctx``, ``attn_out``, ``mlp_in``,
        ``mlp``, ``mlp_out``).
      layer: decoder layer index.
      size: number of units (length of the mask).
      params_per_unit: prunable parameters attached to one unit when every other group is kept
        (its marginal cost; for ``attn_ctx`` under GQA the shared ``v_proj`` column is amortised
        over the ``q_per_kv`` heads that share it).
    """

    name: str
    layer: int
    size: int
    params_per_unit: float


def mask_groups(config: Any) -> tuple[MaskGroup, ...]:
    """The DISP-style mask groups of a Llama-style config, layer by layer.

    Args:
      config: a ``LlamaConfig`` (or Hugging Face-style mapping); see
        ``jaxprune.masks._density.layer_dims`` for the fields read.

    Returns:
      ``MaskGroup`` s ordered by layer, then ``attn_in, attn_ctx, attn_out, mlp_in, mlp,
      mlp_out``. The residual stream has no group: its width stays intact so RoPE and the
      embeddings are untouched.
    """
    groups = []
    for layer, d in enumerate(_density.layer_dims(config)):
        sizes = d.group_sizes()
        q, kv = d.heads * d.head_dim, d.kv_heads * d.head_dim
        per_unit = {
            'attn_in': q + 2 * kv,
            'attn_ctx': d.hidden + d.hidden / d.q_per_kv,
            'attn_out': q,
            'mlp_in': 2 * d.mlp,
            'mlp': 3 * d.hidden,
            'mlp_out': d.mlp,
        }
        for name in _density.GROUP_NAMES:
            groups.append(MaskGroup(name, layer, sizes[name], float(per_unit[name])))
    return tuple(groups)


def _dense(key, fan_in, shape, scale=1.0):
    return scale * jax.random.normal(key, shape, jnp.float32) / math.sqrt(fan_in)


def _layer_norm_params(width):
    return {'scale': jnp.ones((width,), jnp.float32), 'bias': jnp.zeros((width,), jnp.float32)}


def generator_init(
    key: jax.Array,
    groups: Sequence[MaskGroup],
    *,
    width: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    mlp_ratio: int = 4,
    head_scale: float = 0.1,
) -> dict[str, Any]:
    """Initial generator parameters.

    Args:
      key: PRNG key.
      groups: the search space, e.g. ``mask_groups(config)``; layers must be ``0..L-1``.
      width: embedding width ``W`` (64-128 in ATP-sized setups).
      num_layers: transformer-encoder layers.
      num_heads: attention heads (``width % num_heads == 0``); stored in the parameter shapes.
      mlp_ratio: encoder MLP width multiplier.
      head_scale: std multiplier of the output heads; small so initial logits are near 0 and the
        sampling bias decides the initial keep rate.

    Returns:
      ``{'embed': [L, W], 'encoder': (layer, ...), 'final_norm': {...},
      'heads': ({group name: {'kernel': [W, size], 'bias': [size]}}, ...)}``.

    Raises:
      ValueError: bad sizes or non-contiguous layer indices.
    """
    if width <= 0 or num_heads <= 0 or width % num_heads:
        raise ValueError(f'{width=} must be a positive multiple of {num_heads=}')
    if num_layers < 0 or mlp_ratio <= 0:
        raise ValueError(f'{num_layers=} must be >= 0 and {mlp_ratio=} > 0')
    layers = sorted({g.layer for g in groups})
    if not layers or layers != list(range(len(layers))):
        raise ValueError(f'groups must cover layers 0..L-1 contiguously, got {layers=}')
    num_decoder_layers = len(layers)
    head_dim = width // num_heads
    keys = iter(jax.random.split(key, 1 + 6 * num_layers + len(groups)))
    encoder = []
    for _ in range(num_layers):
        attn = {
            n: _dense(next(keys), width, (width, num_heads, head_dim)) for n in ('q', 'k', 'v')
        }
        attn['o'] = _dense(next(keys), width, (num_heads, head_dim, width))
        encoder.append({
            'norm1': _layer_norm_params(width),
            'attn': attn,
            'norm2': _layer_norm_params(width),
            'mlp': {
                'w1': _dense(next(keys), width, (width, mlp_ratio * width)),
                'b1': jnp.zeros((mlp_ratio * width,), jnp.float32),
                'w2': _dense(next(keys), mlp_ratio * width, (mlp_ratio * width, width)),
                'b2': jnp.zeros((width,), jnp.float32),
            },
        })
    heads = [{} for _ in range(num_decoder_layers)]
    for g in groups:
        if g.name in heads[g.layer]:
            raise ValueError(f'duplicate group {g.name!r} in layer {g.layer}')
        heads[g.layer][g.name] = {
            'kernel': _dense(next(keys), width, (width, g.size), head_scale),
            'bias': jnp.zeros((g.size,), jnp.float32),
        }
    return {
        'embed': jax.random.normal(next(keys), (num_decoder_layers, width), jnp.float32),
        'encoder': tuple(encoder),
        'final_norm': _layer_norm_params(width),
        'heads': tuple(heads),
    }


def _layer_norm(p, x, eps=1e-5):
    mean = jnp.mean(x, -1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), -1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * p['scale'] + p['bias']


def _encoder_layer(p, x):
    h = _layer_norm(p['norm1'], x)
    q = jnp.einsum('lw,wnd->nld', h, p['attn']['q'])
    k = jnp.einsum('lw,wnd->nld', h, p['attn']['k'])
    v = jnp.einsum('lw,wnd->nld', h, p['attn']['v'])
    att = jax.nn.softmax(q @ k.swapaxes(-1, -2) / math.sqrt(q.shape[-1]), axis=-1)
    x = x + jnp.einsum('nld,ndw->lw', att @ v, p['attn']['o'])
    h = _layer_norm(p['norm2'], x)
    h = jax.nn.gelu(h @ p['mlp']['w1'] + p['mlp']['b1'])
    return x + h @ p['mlp']['w2'] + p['mlp']['b2']


def generator_apply(params: dict[str, Any]) -> dict[str, Any]:
    """Logits of every mask group, in the ``jaxprune.models`` masks layout.

    .. math::
        h = \\mathrm{LN}(\\mathrm{Enc}(E)), \\qquad \\ell^{(l)}_{g} = h_l W^{(l)}_g + b^{(l)}_g

    Args:
      params: from :func:`generator_init`.

    Returns:
      ``{'layers': ({group name: f32[size]}, ...)}`` (one dict per decoder layer). Turn into
      masks with ``jaxprune.masks._gumbel.sample_masks`` (training) or ``deterministic_masks``.

    References:
      Lu et al., 2024 (ATP), arXiv:2412.14426, pruning-decision generator. Deviation: per-layer
      learnable embeddings replace DISP-LLM's fixed random inputs + GRU.
    """
    x = params['embed']
    for layer in params['encoder']:
        x = _encoder_layer(layer, x)
    x = _layer_norm(params['final_norm'], x)
    return {
        'layers': tuple(
            {name: x[l] @ head['kernel'] + head['bias'] for name, head in heads.items()}
            for l, heads in enumerate(params['heads'])
        )
    }
