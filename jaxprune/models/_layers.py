"""Building blocks shared by the Llama and BERT models: Linear (+LoRA), norms, Embed, RoPE.

Every parameter carries logical axis names as ``out_sharding`` metadata (see ``jaxprune.typing``).
Parameters are created with ``eager_sharding=False`` so that a model can be built without a mesh;
the sharding subpackage places them later from the same names.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from jaxprune import typing as jpt


def param(
    init: Any,
    key: jax.Array,
    shape: Sequence[int],
    dtype: Any,
    axes: Sequence[str],
    *,
    kind: type[nnx.Param] = nnx.Param,
) -> nnx.Param:
    """An ``nnx.Param`` (or subclass) initialised by ``init`` and tagged with logical ``axes``."""
    if len(axes) != len(shape):
        raise ValueError(f'{axes=} must name every dimension of {shape=}')
    return kind(init(key, tuple(shape), dtype), out_sharding=tuple(axes), eager_sharding=False)


def _zeros(key, shape, dtype):
    del key
    return jnp.zeros(shape, dtype)


def _ones(key, shape, dtype):
    del key
    return jnp.ones(shape, dtype)


class Linear(nnx.Module):
    """A dense layer ``y = x W + b`` with an optional LoRA adapter and activation masks.

    Kernels are 2-D ``(K, N)`` = (in, out). With ``lora_rank = r > 0`` the layer also owns
    ``lora_a: (K, r)`` (normal / sqrt(K)) and ``lora_b: (r, N)`` (zeros) as ``nnx.LoRAParam``, so a
    fresh adapter leaves the base function unchanged; the adapter scale is ``s = alpha / r``.

    The call supports two modes:

    .. math::
        \\text{dense:}\\quad y = \\big((W + s A\\,\\mathrm{diag}(m_r) B)^\\top (x \\odot m_{in})
            + b\\big) \\odot m_{out}

        \\text{lora\\_aware:}\\quad y = (W^\\top (x \\odot m_{in}) + b) \\odot m_{out}
            + s\\, B^\\top \\mathrm{diag}(m_r) A^\\top x

    In LoRA-aware mode (ATP training) the adapter path sees the unmasked input and is not masked
    at the output, so the adapter can learn to compensate for what the masks remove.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool,
        axes: tuple[str, str],
        lora_rank: int = 0,
        lora_alpha: float | None = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if lora_rank < 0:
            raise ValueError(f'{lora_rank=} must be >= 0; pass 0 to disable LoRA')
        self.in_features = in_features
        self.out_features = out_features
        self.kernel = param(
            nnx.initializers.lecun_normal(),
            rngs.params(),
            (in_features, out_features),
            param_dtype,
            axes,
        )
        self.bias = (
            param(_zeros, rngs.params(), (out_features,), param_dtype, (axes[1],))
            if use_bias
            else None
        )
        self.lora_rank = lora_rank
        self.lora_scale = float(lora_alpha if lora_alpha is not None else lora_rank) / max(
            lora_rank, 1
        )
        if lora_rank:
            std = 1.0 / math.sqrt(in_features)
            self.lora_a = param(
                lambda k, s, d: std * jax.random.normal(k, s, d),
                rngs.params(),
                (in_features, lora_rank),
                param_dtype,
                (axes[0], jpt.LORA_RANK),
                kind=nnx.LoRAParam,
            )
            self.lora_b = param(
                _zeros,
                rngs.params(),
                (lora_rank, out_features),
                param_dtype,
                (jpt.LORA_RANK, axes[1]),
                kind=nnx.LoRAParam,
            )
        else:
            self.lora_a = None
            self.lora_b = None

    def __call__(
        self,
        x: Float[Array, '... K'],
        *,
        in_mask: Float[Array, ' K'] | None = None,
        out_mask: Float[Array, ' N'] | None = None,
        rank_mask: Float[Array, ' r'] | None = None,
        lora_aware: bool = False,
    ) -> Float[Array, '... N']:
        xm = x if in_mask is None else x * in_mask.astype(x.dtype)
        # Optional extras, all attached after construction (absent = the plain layer):
        # ``input_gram`` (calibration, jaxprune.methods._calibrate) accumulates X^T X of the inputs;
        # ``sparse24_values``/``sparse24_meta`` (jaxprune.methods._ast_infer) replace the dense
        # kernel by a compressed 2:4 one; ``slorb`` (AST-Boosted) adds (P x) S, P summing blocks of
        # ``slorb_k`` input channels.
        gram = getattr(self, 'input_gram', None)
        if gram is not None:
            x2 = xm.reshape(-1, xm.shape[-1]).astype(jnp.float32)
            gram[...] = gram[...] + x2.T @ x2
        packed = getattr(self, 'sparse24_values', None)
        if packed is not None:
            return self._sparse24_call(xm, out_mask)
        kernel = self.kernel[...]
        lora = None
        if self.lora_rank:
            a = self.lora_a[...]
            if rank_mask is not None:
                a = a * rank_mask.astype(a.dtype)
            b = self.lora_b[...]
            if lora_aware:
                lora = self.lora_scale * ((x @ a) @ b)
            else:
                kernel = kernel + self.lora_scale * (a @ b)
        y = xm @ kernel
        y = self._slorb(xm, y)
        if self.bias is not None:
            y = y + self.bias[...]
        if out_mask is not None:
            y = y * out_mask.astype(y.dtype)
        if lora is not None:
            y = y + lora
        return y

    def _slorb(self, xm: jax.Array, y: jax.Array) -> jax.Array:
        s = getattr(self, 'slorb', None)
        if s is None:
            return y
        k = int(self.slorb_k)
        px = xm.reshape(*xm.shape[:-1], xm.shape[-1] // k, k).sum(-1)
        return y + (px @ s[...]).astype(y.dtype)

    def _sparse24_call(self, xm: jax.Array, out_mask: jax.Array | None) -> jax.Array:
        from jaxprune.kernels import sparse24

        if self.lora_rank:
            raise ValueError('a compressed 2:4 Linear cannot carry LoRA; merge LoRA before '
                             'compressing (jaxprune.methods._ast_infer)')
        s = sparse24.Sparse24(self.sparse24_values[...], self.sparse24_meta[...])
        impl = getattr(self, 'sparse24_impl', None)
        y = sparse24.sparse24_matmul(xm, s, implementation=impl)
        y = self._slorb(xm, y)
        if self.bias is not None:
            y = y + self.bias[...]
        if out_mask is not None:
            y = y * out_mask.astype(y.dtype)
        return y


def _masked_mean(x: jax.Array, mask: jax.Array | None) -> jax.Array:
    if mask is None:
        return jnp.mean(x, axis=-1, keepdims=True)
    # mask: [D] or per-example [..., 1, D] (Fisher salience differentiates per-example masks)
    kept = jnp.sum(mask, axis=-1, keepdims=True)
    return jnp.sum(x * mask, axis=-1, keepdims=True) / jnp.maximum(kept, 1.0)


class RMSNorm(nnx.Module):
    """RMSNorm with statistics over kept dims: ``x / sqrt(sum(x^2 m)/sum(m) + eps) * g * m``.

    Statistics are computed in float32 (as in Hugging Face Llama) and the result is cast back.
    With ``mask=None`` this is the usual RMSNorm.
    """

    def __init__(self, dim: int, *, eps: float, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = param(_ones, rngs.params(), (dim,), param_dtype, (jpt.EMBED,))

    def __call__(self, x: Float[Array, '... D'], mask: Float[Array, ' D'] | None = None):
        dtype = x.dtype
        h = x.astype(jnp.float32)
        m = None if mask is None else mask.astype(jnp.float32)
        var = _masked_mean(h * h, m)
        y = (h * jax.lax.rsqrt(var + self.eps)).astype(dtype) * self.scale[...].astype(dtype)
        return y if mask is None else y * mask.astype(dtype)


class LayerNorm(nnx.Module):
    """LayerNorm with mean/variance over kept dims only; the output is re-masked."""

    def __init__(self, dim: int, *, eps: float, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = param(_ones, rngs.params(), (dim,), param_dtype, (jpt.EMBED,))
        self.bias = param(_zeros, rngs.params(), (dim,), param_dtype, (jpt.EMBED,))

    def __call__(self, x: Float[Array, '... D'], mask: Float[Array, ' D'] | None = None):
        dtype = x.dtype
        h = x.astype(jnp.float32)
        m = None if mask is None else mask.astype(jnp.float32)
        mean = _masked_mean(h, m)
        c = h - mean
        if m is not None:
            c = c * m
        var = _masked_mean(c * c, m)
        y = (c * jax.lax.rsqrt(var + self.eps)).astype(dtype)
        y = y * self.scale[...].astype(dtype) + self.bias[...].astype(dtype)
        return y if mask is None else y * mask.astype(dtype)


class Embed(nnx.Module):
    """A lookup table ``(num_embeddings, features)``; ``attend`` is the tied output projection."""

    def __init__(
        self,
        num_embeddings: int,
        features: int,
        *,
        axes: tuple[str, str] = (jpt.VOCAB, jpt.EMBED),
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.embedding = param(
            nnx.initializers.normal(0.02),
            rngs.params(),
            (num_embeddings, features),
            param_dtype,
            axes,
        )

    def __call__(self, ids: Int[Array, ...]) -> Float[Array, '... D']:
        return jnp.take(self.embedding[...], ids, axis=0)

    def attend(self, x: Float[Array, '... D']) -> Float[Array, '... V']:
        return x @ self.embedding[...].T


def rope_inv_freq(
    head_dim: int, *, theta: float, scaling: Mapping[str, Any] | None = None
) -> np.ndarray:
    """Inverse RoPE frequencies ``theta^(-2i/d)``, optionally rescaled as in Hugging Face.

    Args:
      head_dim: rotary dimension (even).
      theta: the RoPE base.
      scaling: ``None`` or ``{'rope_type': 'default'|'linear'|'llama3', ...}`` (``'type'`` is
        accepted as an alias of ``'rope_type'``). ``linear`` divides frequencies by ``factor``;
        ``llama3`` applies the Llama 3.1 frequency-band rescaling with ``factor``,
        ``low_freq_factor``, ``high_freq_factor`` and ``original_max_position_embeddings``.

    Returns:
      float32 array ``[head_dim // 2]``.

    Raises:
      ValueError: odd ``head_dim`` or an unsupported ``rope_type``.
    """
    if head_dim % 2:
        raise ValueError(f'{head_dim=} must be even for RoPE')
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    scaling = dict(scaling or {})
    kind = scaling.get('rope_type', scaling.get('type', 'default'))
    if kind == 'default':
        pass
    elif kind == 'linear':
        inv = inv / float(scaling['factor'])
    elif kind == 'llama3':
        factor = float(scaling['factor'])
        low = float(scaling['low_freq_factor'])
        high = float(scaling['high_freq_factor'])
        old_len = float(scaling['original_max_position_embeddings'])
        low_wavelen = old_len / low
        high_wavelen = old_len / high
        wavelen = 2 * math.pi / inv
        out = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * out / factor + smooth * out
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = np.where(medium, smoothed, out)
    else:
        raise ValueError(f'rope_scaling {kind=} is not supported; use None, "linear" or "llama3"')
    return inv.astype(np.float32)


def apply_rope(
    x: Float[Array, 'B T H hd'], positions: Int[Array, 'B T'], inv_freq: np.ndarray
) -> Float[Array, 'B T H hd']:
    """Rotate ``x`` by RoPE in the Hugging Face "rotate_half" layout (first/second halves)."""
    freqs = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)  # [B, T, hd/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


class PerLayerSizes:
    """Per-layer sizes of a (possibly pruned) config: ``layer_heads``/``layer_mlp`` or uniform.

    Mixed into the frozen ``LlamaConfig`` and ``BertConfig`` dataclasses, which define
    ``num_heads``, ``intermediate_size``, ``num_layers``, ``layer_heads`` and ``layer_mlp``.
    """

    def heads(self, layer: int) -> int:
        """Query heads in ``layer``."""
        return self.num_heads if self.layer_heads is None else self.layer_heads[layer]

    def mlp(self, layer: int) -> int:
        """FFN width of ``layer``."""
        return self.intermediate_size if self.layer_mlp is None else self.layer_mlp[layer]

    @property
    def is_uniform(self) -> bool:
        """Every layer has the unpruned head count and FFN width."""
        return all(
            self.heads(i) == self.num_heads and self.mlp(i) == self.intermediate_size
            for i in range(self.num_layers)
        )
