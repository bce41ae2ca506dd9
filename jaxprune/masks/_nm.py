"""N:M semi-structured masks along the contraction axis of linear kernels.

Flax kernels are ``(K, N)`` = (in, out), so the matmul ``y = x @ W`` reduces over axis 0. Sparse
tensor cores (and ``jaxprune.kernels.sparse24``) need every group of ``M`` consecutive weights
*along K* to hold at most ``N`` non-zeros, so the groups run along **axis 0**, not the last axis
(the torch ``(out, in)`` layout groups along its last axis; copying that code verbatim onto a Flax
kernel silently produces a mask no sparse kernel can use).

Masks pytree convention
-----------------------
A masks pytree has the structure of the params pytree (a dict, an ``nnx.State``, ...) with

* a ``bool`` array of the kernel's shape for every sparse leaf (``True`` = keep), and
* ``None`` for every dense leaf (embeddings, norms, biases, LoRA factors, LM head, classifier).

``None`` costs no memory, is invisible to ``jax.jit``/orbax (an empty subtree) and keeps
``jax.typeof`` of the optimizer state stable. Consumers map with ``is_leaf=lambda x: x is None``
(see :func:`apply_masks` and :func:`ste_apply`).

Leaf paths are written as dotted strings, e.g. ``'layers.3.attn.q_proj.kernel'`` (see
:func:`path_str`); the ``include`` regexes and the Wanda ``act_norms`` keys use that form.
"""

import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

# Every linear kernel inside the transformer blocks. Embeddings ('embedding'), norms ('scale'),
# biases, LoRA factors ('lora_a'/'lora_b') and the head/pooler/classifier (not under 'layers')
# do not match.
DEFAULT_INCLUDE = r'(^|\.)layers\.\d+\..*\bkernel$'


def path_str(keypath: tuple[Any, ...]) -> str:
    """The dotted path of a pytree leaf, e.g. ``'layers.0.attn.q_proj.kernel'``.

    ``nnx.State`` leaves end in a ``.value`` attribute key, which is dropped so that dict and
    ``nnx.State`` params give the same strings.

    Args:
      keypath: a key path from ``jax.tree_util.tree_flatten_with_path``.

    Returns:
      The keys joined with ``'.'``.
    """
    parts = []
    for k in keypath:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            parts.append(str(k.key))
        else:
            parts.append(str(k))
    if parts and parts[-1] == 'value':
        parts = parts[:-1]
    return '.'.join(parts)


def _check_nm(n: int, m: int) -> None:
    if not (isinstance(n, int) and isinstance(m, int)):
        raise TypeError(f'{n=} and {m=} must be Python ints (static); e.g. n=2, m=4')
    if m < 1 or n < 1 or n > m:
        raise ValueError(f'{n=}, {m=}: need 1 <= n <= m; e.g. 2:4, 4:8 or 1:4')


def nm_mask(scores: jax.typing.ArrayLike, *, n: int = 2, m: int = 4, axis: int = 0) -> jax.Array:
    r"""Keep the ``n`` highest scores in every group of ``m`` consecutive entries along ``axis``.

    For a Flax kernel ``(K, N)`` use ``axis=0`` (the contraction axis). With ``g`` indexing groups
    along ``axis`` and ``j`` the other coordinates,

    .. math::
        M_{gm+i,\,j} = [\operatorname{rank}_{i' \in [0,m)}(s_{gm+i',\,j}) \text{ of } i < n]

    where ``rank`` orders by descending score. Ties are broken deterministically in favour of the
    lower index along ``axis`` (a stable sort), so equal scores (e.g. an all-zero group) still keep
    exactly ``n`` entries.

    Args:
      scores: score array (any float or int dtype; higher = more important, use ``|W|`` for
        magnitude). NaN scores rank unpredictably; do not pass them.
      n: entries kept per group.
      m: group size.
      axis: axis along which the groups run (0 for ``(K, N)`` kernels).

    Returns:
      ``bool`` array of ``scores.shape``; exactly ``n`` ``True`` per group.

    Raises:
      ValueError: if ``n > m`` or the grouped axis is not divisible by ``m``.

    Example:
      >>> import jax.numpy as jnp
      >>> nm_mask(jnp.array([[4.], [1.], [3.], [2.]]), n=2, m=4).ravel().tolist()
      [True, False, True, False]

    References:
      Mishra et al., *Accelerating Sparse Deep Neural Networks*, arXiv:2104.08378 (2:4 format);
      Zhou et al., *Learning N:M Fine-grained Structured Sparse Neural Networks From Scratch*,
      ICLR 2021 (magnitude N:M selection, Eq. 1).
    """
    _check_nm(n, m)
    scores = jnp.asarray(scores)
    if scores.ndim == 0:
        raise ValueError(f'{scores.shape=}: nm_mask needs at least one axis')
    axis = axis % scores.ndim
    size = scores.shape[axis]
    if size % m:
        raise ValueError(
            f'nm_mask: axis {axis} of shape {scores.shape} has {size} entries, not divisible by '
            f'{m=}; pad that axis to a multiple of {m} (e.g. {-(-size // m) * m}) or exclude '
            'this leaf')
    s = jnp.moveaxis(scores, axis, 0)
    rest = s.shape[1:]
    s = s.reshape(size // m, m, *rest)
    if jnp.issubdtype(s.dtype, jnp.bool_):
        s = s.astype(jnp.int32)
    # Stable ascending sort of the negated scores: descending order with ties to the lower index.
    key = -s.astype(jnp.float32) if jnp.issubdtype(s.dtype, jnp.integer) else -s
    order = jnp.argsort(key, axis=1, stable=True)
    rank = jnp.argsort(order, axis=1, stable=True)
    keep = (rank < n).reshape(size, *rest)
    return jnp.moveaxis(keep, 0, axis)


def is_nm(mask: jax.typing.ArrayLike, *, n: int = 2, m: int = 4, axis: int = 0,
          exact: bool = True) -> jax.Array:
    """Whether every group of ``m`` along ``axis`` keeps exactly (or at most) ``n`` entries.

    Args:
      mask: ``bool``/0-1 array (or a pruned weight: non-zero = kept).
      n: kept entries per group.
      m: group size.
      axis: grouped axis.
      exact: ``True`` checks ``== n`` per group, ``False`` checks ``<= n``.

    Returns:
      A scalar ``bool`` array.

    Raises:
      ValueError: if the grouped axis is not divisible by ``m``.
    """
    _check_nm(n, m)
    mask = jnp.asarray(mask) != 0
    axis = axis % mask.ndim
    if mask.shape[axis] % m:
        raise ValueError(f'{mask.shape=} axis {axis} not divisible by {m=}')
    g = jnp.moveaxis(mask, axis, 0)
    counts = g.reshape(g.shape[0] // m, m, *g.shape[1:]).sum(1)
    return jnp.all(counts == n) if exact else jnp.all(counts <= n)


def nm_masks(scores: Any, *, n: int = 2, m: int = 4, include: str = DEFAULT_INCLUDE) -> Any:
    """N:M masks (along axis 0) for every 2-D leaf of a scores pytree whose path matches.

    Args:
      scores: pytree shaped like the params (``None`` leaves allowed and skipped).
      n: kept entries per group of ``m`` along K (axis 0).
      m: group size.
      include: regex searched in each leaf's dotted path (:func:`path_str`); default: every
        ``kernel`` under ``layers`` (not embeddings, norms, LoRA, LM head or classifier).

    Returns:
      A masks pytree: ``bool`` masks for matching 2-D leaves, ``None`` elsewhere (see the
      module docstring).

    Raises:
      ValueError: if a matching kernel's K is not divisible by ``m`` (the message names it).

    Example:
      2:4 magnitude masks; each column keeps its two largest ``|w|`` per group of four rows:

      >>> import jax.numpy as jnp
      >>> w = jnp.array([[0.1, -4.0], [3.0, 0.2], [-2.0, 1.0], [0.5, 0.3]])  # (K=4, N=2)
      >>> params = {'layers': [{'mlp': {'kernel': w}}], 'embed': {'embedding': jnp.ones((8, 2))}}
      >>> masks = nm_masks(jax.tree.map(jnp.abs, params), n=2, m=4)
      >>> masks['layers'][0]['mlp']['kernel'].astype(int)
      Array([[0, 1],
             [1, 0],
             [1, 1],
             [0, 0]], dtype=int32)
      >>> masks['embed']['embedding'] is None  # not under 'layers': stays dense
      True
    """
    _check_nm(n, m)
    pattern = re.compile(include)

    def one(path, s):
        if s is None:
            return None
        p = path_str(path)
        if not pattern.search(p) or jnp.ndim(s) != 2:
            return None
        if s.shape[0] % m:
            raise ValueError(
                f'kernel {p!r} of shape {s.shape} has K={s.shape[0]} not divisible by {m=}; pad K '
                f'to a multiple of {m} or exclude it with include=')
        return nm_mask(s, n=n, m=m, axis=0)

    return jax.tree_util.tree_map_with_path(one, scores, is_leaf=lambda x: x is None)


def nm_masks_for(params: Any, *, n: int = 2, m: int = 4,
                 score_fn: Callable[[Any], Any] | None = None, scores: Any = None,
                 include: str = DEFAULT_INCLUDE) -> Any:
    """N:M masks for the sparse kernels of ``params`` from a score function or given scores.

    Args:
      params: parameter pytree (dict or ``nnx.State``) of ``(K, N)`` kernels.
      n: kept per group of ``m`` along K.
      m: group size.
      score_fn: ``score_fn(params) -> scores`` pytree (default: ``|W|``, magnitude).
      scores: precomputed scores pytree; mutually exclusive with ``score_fn``.
      include: leaf-path regex of the sparse kernels (see :func:`nm_masks`).

    Returns:
      The masks pytree (``bool`` for sparse kernels, ``None`` for every other leaf).

    Raises:
      ValueError: if both ``score_fn`` and ``scores`` are given, or a kernel's K % m != 0.
    """
    if score_fn is not None and scores is not None:
        raise ValueError('pass either score_fn= or scores=, not both')
    if scores is None:
        scores = score_fn(params) if score_fn is not None else jax.tree.map(jnp.abs, params)
    return nm_masks(scores, n=n, m=m, include=include)


def _map_masked(fn, params, masks):
    # masks is a prefix-compatible tree whose None leaves mean "dense".
    return jax.tree.map(lambda mk, p: p if mk is None else fn(p, mk), masks, params,
                        is_leaf=lambda x: x is None)


def apply_masks(params: Any, masks: Any) -> Any:
    """Hard-mask: ``W * M`` on sparse leaves, other leaves unchanged (gradient is masked too).

    Args:
      params: parameter pytree.
      masks: masks pytree (``None`` = dense leaf).

    Returns:
      A new params pytree with pruned entries set to zero (same dtypes).
    """
    return _map_masked(lambda p, mk: jnp.where(mk, p, jnp.zeros_like(p)), params, masks)


def ste_apply(params: Any, masks: Any) -> Any:
    r"""Straight-through masking: forward ``W * M``, gradient identity to the dense ``W``.

    .. math::
        \tilde W = W + \operatorname{sg}(W \odot M - W),\qquad
        \partial L / \partial W = \partial L / \partial \tilde W

    The forward value is exact (``w + (0 - w) == 0`` and ``w + (w - w) == w`` in floating point),
    so pruned logits are bit-identical to a hard-masked model.

    Args:
      params: dense parameter pytree.
      masks: masks pytree (``None`` = dense leaf).

    Returns:
      The masked params to feed the forward pass.

    References:
      Bengio et al., *Estimating or Propagating Gradients Through Stochastic Neurons*, 2013;
      Zhou et al., ICLR 2021, Eq. 4 (STE for N:M); Huang et al., AAAI 2025, Sec. 3.
    """
    def one(p, mk):
        return p + jax.lax.stop_gradient(jnp.where(mk, p, jnp.zeros_like(p)) - p)

    return _map_masked(one, params, masks)


def mask_density(masks: Any) -> jax.Array:
    """Fraction of kept entries over all sparse (non-``None``) leaves; 1.0 when there are none."""
    leaves = [x for x in jax.tree.leaves(masks) if x is not None]
    if not leaves:
        return jnp.ones((), jnp.float32)
    kept = sum(jnp.sum(x, dtype=jnp.float32) for x in leaves)
    return kept / sum(x.size for x in leaves)
