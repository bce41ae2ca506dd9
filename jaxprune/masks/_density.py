"""Exact, differentiable parameter density of DISP-style (dimension-independent) decoder masks.

The ATP search space (after DISP-LLM) gives every decoder layer six independent masks, all in
the masks layout of ``jaxprune.models`` (1 = keep):

==========  ============  =====================================================================
group       size          weights it trims (kernels are ``(K, N)`` = (in, out))
==========  ============  =====================================================================
attn_in     ``D``         rows of ``q_proj``, ``k_proj``, ``v_proj`` (their input dims)
attn_ctx    ``H * hd``    rows of ``o_proj`` (per query head and head dim, the attention context);
                          a column of ``v_proj`` (kv head ``g``, dim ``d``) once dim ``d`` is
                          pruned in *every* query head of group ``g``; the columns of ``q_proj``
                          and ``k_proj`` of a whole GQA group once all its context dims are pruned
attn_out    ``D``         columns of ``o_proj`` (its output dims)
mlp_in      ``D``         rows of ``gate_proj`` and ``up_proj``
mlp         ``F``         columns of ``gate_proj``/``up_proj`` and rows of ``down_proj``
mlp_out     ``D``         columns of ``down_proj``
==========  ============  =====================================================================

Query/key head dims are never pruned individually: RoPE rotates pairs of dims and ``q . k`` sums
over all of them, so they only disappear with a whole (GQA group of) head(s). The residual stream
(``hidden``) is kept intact by ATP; a ``hidden`` mask, if present, is honoured as a factor on all
four ``D``-sized masks. Query head ``h`` reads kv head ``h // q_per_kv`` (Hugging Face
``repeat_kv``), and ``attn_ctx`` index ``h * hd + d``.

**Prunable parameters** are the seven projection kernels of every decoder layer (no biases,
embeddings, norms or LM head: those are untouched by ATP), so ``density = kept / prunable`` and a
``target_density`` is the fraction of the prunable parameters that is kept. Per linear layer
``kept = sum(in_keep) * sum(out_keep)`` where the keep vectors are products/ORs of the masks
above (``OR(m) = 1 - prod(1 - m)``); the density is therefore a polynomial of the masks, exact for
``{0, 1}`` masks and differentiable for soft or straight-through masks. Its float32 count
(:func:`kept_params`) rounds above ``2**24``; :func:`kept_count` counts hard masks exactly in
``int32`` inside ``jit`` (budgets, exports). Removing a whole block
when one of its masks is entirely zero is not modelled (the emptied matrices count zero, the
others are still counted).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

GROUP_NAMES = ('attn_in', 'attn_ctx', 'attn_out', 'mlp_in', 'mlp', 'mlp_out')
PROJECTIONS = ('q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj')


@dataclasses.dataclass(frozen=True, kw_only=True)
class LayerDims:
    """The unpruned-by-ATP shape of one decoder layer.

    Attributes:
      hidden: residual width ``D``.
      heads: query heads ``H`` of this layer.
      kv_heads: key/value heads ``KV`` (``H % KV == 0``).
      head_dim: ``hd``.
      mlp: FFN width ``F`` of this layer.
    """

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp: int

    def __post_init__(self):
        for name in ('hidden', 'heads', 'kv_heads', 'head_dim', 'mlp'):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f'LayerDims.{name}={value!r} must be a positive int')
        if self.heads % self.kv_heads:
            raise ValueError(
                f'{self.heads=} must be a multiple of {self.kv_heads=} (grouped-query attention)'
            )

    @property
    def q_per_kv(self) -> int:
        return self.heads // self.kv_heads

    def group_sizes(self) -> dict[str, int]:
        """``{group name: number of units}`` for this layer."""
        d = self.hidden
        return {
            'attn_in': d, 'attn_ctx': self.heads * self.head_dim, 'attn_out': d,
            'mlp_in': d, 'mlp': self.mlp, 'mlp_out': d,
        }

    def kernel_shapes(self) -> dict[str, tuple[int, int]]:
        """``{projection: (K, N)}`` of the seven prunable kernels."""
        d, hd = self.hidden, self.head_dim
        return {
            'q_proj': (d, self.heads * hd), 'k_proj': (d, self.kv_heads * hd),
            'v_proj': (d, self.kv_heads * hd), 'o_proj': (self.heads * hd, d),
            'gate_proj': (d, self.mlp), 'up_proj': (d, self.mlp), 'down_proj': (self.mlp, d),
        }


def _field(config: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        if isinstance(config, Mapping) and name in config:
            return config[name]
        if hasattr(config, name):
            return getattr(config, name)
    if default is not None:
        return default
    raise ValueError(
        f'config {type(config).__name__} has none of the fields {names}; pass a LlamaConfig '
        '(or a mapping with these keys)'
    )


def layer_dims(config: Any) -> tuple[LayerDims, ...]:
    """Per-layer dims from a Llama-style config (``LlamaConfig`` or a Hugging Face-style dict).

    Reads ``num_layers``/``num_hidden_layers``, ``hidden_size``, ``num_heads``/
    ``num_attention_heads``, ``num_kv_heads``/``num_key_value_heads`` (default: no GQA),
    ``head_dim`` (default ``hidden_size // num_heads``), ``intermediate_size`` and the optional
    per-layer ``layer_heads``/``layer_mlp`` of a physically pruned model.

    Raises:
      ValueError: a required field is missing or the sizes are inconsistent.
    """
    layers = int(_field(config, 'num_layers', 'num_hidden_layers'))
    hidden = int(_field(config, 'hidden_size'))
    heads = int(_field(config, 'num_heads', 'num_attention_heads'))
    kv_heads = int(_field(config, 'num_kv_heads', 'num_key_value_heads', default=heads))
    head_dim = _field(config, 'head_dim', default=-1)
    head_dim = hidden // heads if head_dim in (-1, None) else int(head_dim)
    mlp = int(_field(config, 'intermediate_size'))
    q_per_kv = heads // kv_heads
    layer_heads = _field(config, 'layer_heads', default=()) or (heads,) * layers
    layer_mlp = _field(config, 'layer_mlp', default=()) or (mlp,) * layers
    if len(layer_heads) != layers or len(layer_mlp) != layers:
        raise ValueError(f'{layer_heads=} and {layer_mlp=} must have {layers} entries')
    return tuple(
        LayerDims(hidden=hidden, heads=int(h), kv_heads=int(h) // q_per_kv, head_dim=head_dim,
                  mlp=int(f))
        for h, f in zip(layer_heads, layer_mlp, strict=True)
    )


def _or(m: jax.Array, axis: Any) -> jax.Array:
    """Soft OR: ``1 - prod(1 - m)``; exact on ``{0, 1}``, polynomial elsewhere."""
    return 1.0 - jnp.prod(1.0 - m, axis=axis)


def linear_keep(layer_masks: Mapping[str, jax.Array], dims: LayerDims) -> dict[str, tuple]:
    """Per-projection ``(in_keep, out_keep)`` vectors implied by one layer's group masks.

    Args:
      layer_masks: one entry of ``masks['layers']``; missing groups mean keep all. ``heads``
        (per query head) and ``hidden`` are folded in when present.
      dims: the layer's :class:`LayerDims`.

    Returns:
      ``{projection: (in_keep f32[K], out_keep f32[N])}`` for the seven kernels; a weight
      ``W[k, n]`` survives iff ``in_keep[k] * out_keep[n] == 1``.
    """
    sizes = dims.group_sizes()
    m = {}
    for name in GROUP_NAMES:
        value = layer_masks.get(name)
        if value is None:
            m[name] = jnp.ones((sizes[name],), jnp.float32)
        else:
            if value.shape != (sizes[name],):
                raise ValueError(
                    f'mask {name!r} has shape {value.shape}, expected ({sizes[name]},) for {dims}'
                )
            m[name] = value.astype(jnp.float32)
    if layer_masks.get('heads') is not None:
        m['attn_ctx'] = m['attn_ctx'] * jnp.repeat(
            layer_masks['heads'].astype(jnp.float32), dims.head_dim
        )
    if layer_masks.get('hidden') is not None:
        hidden = layer_masks['hidden'].astype(jnp.float32)
        for name in ('attn_in', 'attn_out', 'mlp_in', 'mlp_out'):
            m[name] = m[name] * hidden
    ctx = m['attn_ctx'].reshape(dims.kv_heads, dims.q_per_kv, dims.head_dim)
    v_out = _or(ctx, axis=1).reshape(-1)  # [KV * hd]
    group = _or(ctx, axis=(1, 2))  # [KV]
    k_out = jnp.repeat(group, dims.head_dim)
    q_out = jnp.repeat(group, dims.q_per_kv * dims.head_dim)
    return {
        'q_proj': (m['attn_in'], q_out),
        'k_proj': (m['attn_in'], k_out),
        'v_proj': (m['attn_in'], v_out),
        'o_proj': (m['attn_ctx'], m['attn_out']),
        'gate_proj': (m['mlp_in'], m['mlp']),
        'up_proj': (m['mlp_in'], m['mlp']),
        'down_proj': (m['mlp'], m['mlp_out']),
    }


def prunable_params(dims: Sequence[LayerDims]) -> int:
    """Number of prunable parameters (the seven projection kernels of every layer)."""
    return sum(k * n for d in dims for k, n in d.kernel_shapes().values())


def _layers(masks: Mapping[str, Any] | None, dims: Sequence[LayerDims]) -> Sequence[Any]:
    layers = masks.get('layers') if masks is not None else None
    layers = layers if layers is not None else ({},) * len(dims)
    if len(layers) != len(dims):
        raise ValueError(f'masks have {len(layers)} layers but {len(dims)=}; pass matching dims')
    return layers


def kept_params(masks: Mapping[str, Any], dims: Sequence[LayerDims]) -> jax.Array:
    """Parameters kept by ``masks`` as a differentiable float32 scalar.

    Exact for ``{0, 1}`` masks only while the count stays below ``2**24`` (float32 sums); use
    :func:`kept_count` for an exact integer count of hard masks of any model size.

    Args:
      masks: ``{'layers': (layer_masks, ...)}`` in the ``jaxprune.models`` layout.
      dims: per-layer dims, e.g. ``layer_dims(config)``.
    """
    layers = _layers(masks, dims)
    total = jnp.zeros((), jnp.float32)
    for layer_masks, d in zip(layers, dims, strict=True):
        for keep_in, keep_out in linear_keep(layer_masks or {}, d).values():
            total = total + jnp.sum(keep_in) * jnp.sum(keep_out)
    return total


_INT32_MAX = 2**31 - 1
_HARD_KEYS = (*GROUP_NAMES, 'heads', 'hidden')


def kept_count(
    masks: Mapping[str, Any], dims: Sequence[LayerDims], *, per_layer: bool = False
) -> jax.Array:
    r"""Exact number of parameters kept by hard masks, in integer arithmetic (jit-safe).

    Every mask is binarised (``m > 0.5`` = kept), the keep vectors of :func:`linear_keep` are
    counted as ``int32`` and each projection contributes
    :math:`|\mathrm{in}| \cdot |\mathrm{out}|` (an ``int32`` product); layers are summed in
    ``int32``. Every intermediate is an integer below ``2**31``, checked from ``dims`` before
    tracing, so the result is exact at any scale where it fits (SmolLM2-135M: ~1.1e8 prunable),
    unlike the float32 :func:`kept_params`, which rounds above ``2**24``. Not differentiable: the
    generator's regulariser uses :func:`density`.

    Args:
      masks: ``{'layers': (layer_masks, ...)}`` in the ``jaxprune.models`` layout (missing
        groups keep everything; ``heads``/``hidden`` are folded in as in :func:`linear_keep`).
      dims: per-layer dims, e.g. ``layer_dims(config)``.
      per_layer: return ``int32[L]`` per-layer counts instead of their sum. Use it when the whole
        model has ``>= 2**31`` prunable parameters (e.g. 7B models) and sum on the host with
        Python ints: ``sum(int(c) for c in kept_count(m, dims, per_layer=True))``.

    Returns:
      ``int32`` scalar (or ``int32[L]``) with the kept projection parameters.

    Raises:
      ValueError: a layer (or, without ``per_layer``, the model) has ``>= 2**31`` prunable
        parameters, so ``int32`` could overflow; or mis-shaped masks.
    """
    layers = _layers(masks, dims)
    sizes = [sum(k * n for k, n in d.kernel_shapes().values()) for d in dims]
    if sizes and max(sizes) > _INT32_MAX:
        raise ValueError(f'a layer has {max(sizes)} prunable parameters (>= 2**31); kept_count '
                         'counts in int32: count such layers on the host')
    if not per_layer and sum(sizes) > _INT32_MAX:
        raise ValueError(f'the model has {sum(sizes)} prunable parameters (>= 2**31); pass '
                         'per_layer=True and sum the per-layer counts with Python ints')
    counts = []
    for layer_masks, d in zip(layers, dims, strict=True):
        hard = {k: (jnp.asarray(v) > 0.5).astype(jnp.float32)
                for k, v in (layer_masks or {}).items() if k in _HARD_KEYS and v is not None}
        total = jnp.zeros((), jnp.int32)
        for keep_in, keep_out in linear_keep(hard, d).values():  # {0, 1}: products/ORs exact
            total = total + (jnp.sum(keep_in > 0.5, dtype=jnp.int32)
                             * jnp.sum(keep_out > 0.5, dtype=jnp.int32))
        counts.append(total)
    counts = jnp.stack(counts) if counts else jnp.zeros((0,), jnp.int32)
    return counts if per_layer else jnp.sum(counts, dtype=jnp.int32)


def density(masks: Mapping[str, Any], dims: Sequence[LayerDims]) -> jax.Array:
    r"""Fraction of the prunable parameters kept by DISP-style masks.

    .. math::
        P(m) = \frac{1}{N_{prunable}} \sum_{l} \sum_{W \in \{q,k,v,o,gate,up,down\}}
            \Big(\sum_k \mathrm{in}^W_k\Big)\Big(\sum_n \mathrm{out}^W_n\Big)

    with the keep vectors of :func:`linear_keep`. Polynomial in the masks, hence differentiable
    w.r.t. soft or straight-through masks, and exact for hard ones.

    Args:
      masks: ``{'layers': (layer_masks, ...)}`` with any of the groups in ``GROUP_NAMES``.
      dims: per-layer dims, e.g. ``layer_dims(config)``.

    Returns:
      float32 scalar in ``[0, 1]``.

    References:
      Lu et al., 2024, *All-in-One Tuning and Structural Pruning for Domain-Specific LLMs*
      (ATP), the parameter-count function ``P(d)`` of the generator loss; Gao et al., 2024,
      *DISP-LLM: Dimension-Independent Structural Pruning for Large Language Models*.
    """
    return kept_params(masks, dims) / float(prunable_params(dims))


def log_ratio(x: jax.typing.ArrayLike, y: jax.typing.ArrayLike) -> jax.Array:
    r"""ATP's density regulariser :math:`R(x, y) = \log(\max(x, y) / \min(x, y))`.

    Equivalently :math:`|\log x - \log y|`.

    Symmetric, zero iff ``x == y``, and scale-free: over- and under-shooting the target by the
    same factor cost the same. Inputs must be positive.

    References:
      Lu et al., 2024 (ATP), the regulariser ``R`` of the generator objective.
    """
    x = jnp.asarray(x, jnp.float32)
    y = jnp.asarray(y, jnp.float32)
    return jnp.log(jnp.maximum(x, y)) - jnp.log(jnp.minimum(x, y))
