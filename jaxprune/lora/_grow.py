"""LoRA rank growth for APT: rank masks inside jit, physical rank buckets outside jit.

Adapters live at a bucketed maximum rank ``R`` (``lora_a: (K, R)``, ``lora_b: (R, N)``) and a
rank mask ``f32[R]`` per adapter switches rank components on (model layout: ``masks['layers'][l]
['lora'][name]``, see ``jaxprune.masks._structured.to_model_masks``). Rank masks are keyed by the
adapter's module path, e.g. ``('layers', 0, 'attn', 'q_proj')``, in a plain dict.

Growth never changes the function: newly activated components get a fresh random ``A`` column and
a zero ``B`` row, so :math:`A\\,\\mathrm{diag}(m)\\,B` is unchanged at the moment of growth.
Dropping pruned hidden dims / heads from adapters is done by ``jaxprune.surgery`` (adapter
factors carry the same logical axes as their kernels).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import _tree

Path = tuple[Any, ...]


def adapters(params: Any) -> dict[Path, dict[str, jax.Array]]:
    """``{module_path: {'lora_a': (K, R), 'lora_b': (R, N)}}`` for every adapter in ``params``."""
    out: dict[Path, dict[str, jax.Array]] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = _tree.path_names(path)
        if names and names[-1] in ('lora_a', 'lora_b'):
            out.setdefault(names[:-1], {})[names[-1]] = leaf
    return out


def _set(tree: Any, path: Path, value: Any) -> Any:
    """Functional update of a nested dict/list pytree (pure-dict params) at ``path``."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(tree, dict):
        return {**tree, head: _set(tree[head], rest, value)}
    items = list(tree)
    items[head] = _set(items[head], rest, value)
    return type(tree)(items)


def init_rank_masks(params: Any, rank: int) -> dict[Path, jax.Array]:
    """Rank masks with the first ``rank`` components on for every adapter.

    Raises:
      ValueError: if ``rank`` exceeds an adapter's physical rank.
    """
    out = {}
    for path, ab in adapters(params).items():
        bucket = ab['lora_a'].shape[-1]
        if not 0 < rank <= bucket:
            raise ValueError(f'{rank=} must be in [1, {bucket}] for adapter {path}')
        out[path] = (jnp.arange(bucket) < rank).astype(jnp.float32)
    return out


def rank_salience(params: Any, grads: Any) -> dict[Path, jax.Array]:
    r"""Salience of each rank component: :math:`|\sum_k A_{k,j}\, \partial L / \partial A_{k,j}|`.

    Args:
      params: pure-dict params containing ``lora_a`` leaves.
      grads: gradients with the same structure (only ``lora_a`` leaves are read).

    Returns:
      ``{module_path: f32[R]}``.

    References:
      Zhao et al., ICML 2024, Sec. 4.3 (adapter salience from first-order Taylor terms).
    """
    p, g = adapters(params), adapters(grads)
    return {
        path: jnp.abs(jnp.sum(ab['lora_a'].astype(jnp.float32) * g[path]['lora_a'], axis=0))
        for path, ab in p.items()
    }


def ema(
    old: Mapping[Path, jax.Array] | None, new: Mapping[Path, jax.Array], beta: float = 0.85
) -> dict[Path, jax.Array]:
    """EMA ``beta * old + (1 - beta) * new`` of rank saliences (``new`` when ``old`` is None)."""
    if old is None:
        return dict(new)
    return {k: beta * old[k] + (1 - beta) * new[k] for k in new}


# Per-adapter edits are one small jitted program per factor shape: APT edits adapters outside
# jit at every pruning step, right after surgery changed their shapes, and eager ops there
# compiled one program per op and shape (measured: most of a pruning step's time). The random
# draws dominate compilation, so they are drawn at a few padded shapes and sliced (below).


def _normal(key: jax.Array, shape: tuple[int, int], dtype: Any) -> jax.Array:
    """``jax.random.normal(key, shape, dtype)`` drawn at ``(next power of two, cols)`` rows.

    Sliced back to ``shape[0]`` rows inside the consumer's jit. With JAX's default
    ``jax_threefry_partitionable=True`` the first rows of a draw do not depend on how many rows
    are drawn, so the values equal a direct draw at ``shape`` while only one threefry program
    per power of two is compiled for a whole run.
    """
    rows = 1 << max(0, shape[0] - 1).bit_length()
    return jax.random.normal(key, (rows, shape[1]), dtype)


@jax.jit
def _grow_factors(a, b, old_mask, new_rank, noise, scale):
    """Activates components ``[0, new_rank)``: fresh ones get a random ``A`` column, zero ``B``.

    ``scale`` is an argument, not a constant, so ``noise / scale`` stays a true division (XLA
    turns division by a constant into a multiply, one ulp off the eager result).
    """
    mask = (jnp.arange(a.shape[-1]) < new_rank).astype(jnp.float32)
    fresh = (mask > 0) & (old_mask <= 0)
    a = jnp.where(fresh[None, :], noise[: a.shape[0]] / scale, a)
    b = jnp.where(fresh[:, None], jnp.zeros((), b.dtype), b)
    return a, b, mask


@functools.partial(jax.jit, static_argnames=('axis', 'bucket'))
def move_active(x: jax.Array, mask: jax.Array, *, axis: int, bucket: int) -> jax.Array:
    """``x`` with the active components of ``mask`` (``> 0``) first along ``axis``, in their
    order, at size ``bucket`` (zeros after them); the caller checks that they fit."""
    active = mask > 0
    order = jnp.argsort(~active, stable=True)
    slot = jnp.arange(bucket)
    taken = jnp.take(x, order[jnp.minimum(slot, order.shape[0] - 1)], axis=axis)
    shape = [1] * x.ndim
    shape[axis] = bucket
    on = (slot < jnp.sum(active)).reshape(shape)
    return jnp.where(on, taken, jnp.zeros((), x.dtype))


@functools.partial(jax.jit, static_argnames=('bucket',))
def _resize_factors(a, b, mask, noise, scale, ratio, *, bucket):
    """:func:`resize_ranks` for one adapter: active components first, fresh slots random A."""
    on = jnp.arange(bucket) < jnp.sum(mask > 0)
    new_a = jnp.where(on[None, :], move_active(a, mask, axis=1, bucket=bucket),
                      noise[: a.shape[0]] / scale)
    new_b = move_active(b * ratio, mask, axis=0, bucket=bucket)
    return new_a, new_b, on.astype(jnp.float32)


def _scale(a: jax.Array) -> jax.Array:
    return jnp.asarray(math.sqrt(a.shape[0]), a.dtype)


def _check_fits(path: Path, mask: Any, bucket: int) -> None:
    active = int(np.sum(np.asarray(mask) > 0))
    if active > bucket:
        raise ValueError(f'adapter {path} has {active} active ranks > {bucket=}')


def grow_ranks(
    params: Any,
    rank_masks: Mapping[Path, jax.Array],
    salience: Mapping[Path, jax.Array],
    *,
    key: jax.Array,
    factor: float = 2.0,
    fraction: float = 0.5,
    max_rank: int = 64,
) -> tuple[Any, dict[Path, jax.Array]]:
    r"""Grow the ranks of the most salient adapters by a common ``factor``.

    Adapters are ranked by their total salience over active components; the top ``fraction``
    (APT: half) grow from rank :math:`r` to :math:`\min(\lceil r \cdot \mathrm{factor} \rceil,
    \mathrm{max\_rank}, R)`. New components get ``A`` columns drawn like the initializer
    (normal / :math:`\sqrt{K}`) and zero ``B`` rows, so the adapter output is unchanged.

    Args:
      params: pure-dict params.
      rank_masks: ``{module_path: f32[R]}``; active components must be a prefix.
      salience: ``{module_path: f32[R]}`` (e.g. an EMA of :func:`rank_salience`).
      key: PRNG key for the new ``A`` columns.
      factor: rank multiplier for grown adapters (``>= 1``); see :func:`growth_factor`.
      fraction: share of adapters that grow.
      max_rank: cap on any adapter's rank (APT default 64).

    Returns:
      ``(params, rank_masks)`` with the same shapes (jit-compatible).

    Raises:
      ValueError: for ``factor < 1`` or ``fraction`` outside ``(0, 1]``.

    References:
      Zhao et al., ICML 2024, Sec. 4.3 "Adaptive and efficient LM tuning".
    """
    if factor < 1:
        raise ValueError(f'{factor=} must be >= 1')
    if not 0 < fraction <= 1:
        raise ValueError(f'{fraction=} must be in (0, 1]')
    paths = sorted(rank_masks, key=str)
    total = jnp.stack([jnp.sum(salience[p] * rank_masks[p]) for p in paths])
    n_grow = max(1, math.ceil(fraction * len(paths)))
    chosen = jnp.zeros(len(paths), bool).at[jnp.argsort(-total)[:n_grow]].set(True)
    ab = adapters(params)
    new_masks = {}
    for i, path in enumerate(paths):
        a, b = ab[path]['lora_a'], ab[path]['lora_b']
        bucket = a.shape[-1]
        rank = jnp.sum(rank_masks[path] > 0)
        grown = jnp.minimum(jnp.ceil(rank * factor).astype(jnp.int32), min(max_rank, bucket))
        new_rank = jnp.where(chosen[i], jnp.maximum(grown, rank), rank)
        noise = _normal(jax.random.fold_in(key, i), a.shape, a.dtype)
        a, b, mask = _grow_factors(a, b, rank_masks[path], new_rank, noise, _scale(a))
        params = _set(params, path + ('lora_a',), a)
        params = _set(params, path + ('lora_b',), b)
        new_masks[path] = mask
    return params, new_masks


def tuning_params(params: Any, rank_masks: Mapping[Path, jax.Array]) -> int:
    """Number of active LoRA parameters: :math:`\\sum (K + N) \\cdot r` over adapters."""
    ab = adapters(params)
    return int(
        sum(
            (ab[p]['lora_a'].shape[0] + ab[p]['lora_b'].shape[1]) * int(jnp.sum(m > 0))
            for p, m in rank_masks.items()
        )
    )


def growth_factor(
    params: Any,
    rank_masks: Mapping[Path, jax.Array],
    target: float,
    *,
    fraction: float = 0.5,
) -> float:
    """Common factor for :func:`grow_ranks` so that active LoRA params reach about ``target``.

    Assumes the grown ``fraction`` of adapters holds ``fraction`` of the tuning parameters (the
    chosen set is not known before the salience ranking). Outside jit.
    """
    current = tuning_params(params, rank_masks)
    if current <= 0:
        raise ValueError('no active LoRA components; initialise rank masks first')
    return max(1.0, 1.0 + (target - current) / (fraction * current))


def resize_ranks(
    params: Any,
    rank_masks: Mapping[Path, jax.Array],
    bucket: int,
    *,
    key: jax.Array,
    rescale: bool = True,
) -> tuple[Any, dict[Path, jax.Array]]:
    """Change every adapter's physical rank to ``bucket`` (outside jit; shapes change).

    Active components move to the front; new slots get random ``A`` columns and zero ``B`` rows.
    A ``Linear`` rebuilt at rank ``bucket`` computes its scale as ``alpha / bucket``; with
    ``rescale`` the ``B`` factors are multiplied by ``bucket / old_rank`` (scale = alpha / rank
    convention) so the function is unchanged. Without it, set ``Linear.lora_scale`` yourself.

    Args:
      params: pure-dict params.
      rank_masks: ``{module_path: f32[R]}`` (any active pattern).
      bucket: new physical rank, at least the largest active rank.
      key: PRNG key for new ``A`` columns.
      rescale: compensate the ``alpha / rank`` scale change in ``B``.

    Returns:
      ``(params, rank_masks)`` at the new rank.

    Raises:
      ValueError: if an adapter has more active components than ``bucket``.
    """
    ab = adapters(params)
    new_masks = {}
    for i, (path, mask) in enumerate(sorted(rank_masks.items(), key=lambda kv: str(kv[0]))):
        a, b = ab[path]['lora_a'], ab[path]['lora_b']
        _check_fits(path, mask, bucket)
        ratio = bucket / a.shape[-1] if rescale else 1.0
        noise = _normal(jax.random.fold_in(key, i), (a.shape[0], bucket), a.dtype)
        new_a, new_b, new_masks[path] = _resize_factors(
            a, b, mask, noise, _scale(a), jnp.asarray(ratio, b.dtype), bucket=bucket)
        params = _set(params, path + ('lora_a',), new_a)
        params = _set(params, path + ('lora_b',), new_b)
    return params, new_masks


def resize_model_ranks(
    model: Any, rank_masks: Mapping[Path, jax.Array], bucket: int, *, key: jax.Array
) -> tuple[Any, dict[Path, jax.Array]]:
    """Rebuild an NNX model with every adapter at physical rank ``bucket`` (outside jit).

    Each adapter keeps its ``lora_scale``, so the function is unchanged. Optimizer state for the
    adapters must be re-initialised (or resized the same way) by the caller.
    """
    from flax import nnx

    from jaxprune.surgery import _prune

    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    params, masks = resize_ranks(params, rank_masks, bucket, key=key, rescale=False)
    return _prune.rebuild_model(model, model.config, params), masks


def resize_ranks_like(tree: Any, rank_masks: Mapping[Path, jax.Array], bucket: int) -> Any:
    """Resize every adapter-shaped leaf of ``tree`` (e.g. Adam ``mu``/``nu``) like
    :func:`resize_ranks`: active components move to the front, new slots are zero.

    A leaf is matched when a contiguous part of its key path equals ``module_path + ('lora_a',)``
    or ``module_path + ('lora_b',)``; other leaves (counts, kernels) are returned unchanged.
    """
    plan = {}
    for path, mask in rank_masks.items():
        _check_fits(path, mask, bucket)
        plan[tuple(path) + ('lora_a',)] = (mask, 1)
        plan[tuple(path) + ('lora_b',)] = (mask, 0)
    return _tree.map_planned(
        tree, plan, lambda x, e: move_active(x, e[0], axis=e[1], bucket=bucket))


def zero_inactive_ranks(tree: Any, rank_masks: Mapping[Path, jax.Array]) -> Any:
    """Zero the ``B`` rows of inactive components in every adapter-shaped part of ``tree``.

    Afterwards the adapter's output under any rank mask that contains ``rank_masks`` (e.g. after
    :func:`grow_ranks`) equals its output under ``rank_masks``. APT uses it for a teacher
    snapshot that shares the student's rank masks while the student's ranks grow. Leaves are
    matched like :func:`resize_ranks_like`; other leaves are returned unchanged.
    """
    plan = {tuple(p) + ('lora_b',): np.asarray(m) > 0 for p, m in rank_masks.items()}
    return _tree.map_planned(tree, plan, lambda x, on: x * jnp.asarray(on, x.dtype)[:, None])

