"""APT's global budget search: keep the densest units whose exact parameter count fits.

Count model. A parameter tensor is *prunable* when at least one structure slices it. Structure
``i`` owns ``width_i`` consecutive entries per unit along one axis of each tensor it slices, so
with ``k_i`` kept units the kept extent of that axis is ``k_i * width_i``; unsliced axes keep
their full extent. The kept count of the model is

.. math::  N(k) = \\sum_{p \\text{ prunable}} \\prod_{a} \\mathrm{extent}_{p,a}(k)

which is exact including interactions (a head's parameter count shrinks with the hidden size;
biases and norms scale with the one axis they have). ``N`` is monotone in every ``k_i``, hence in
the length of a prefix of the global density ranking, so a binary search over the prefix length
finds the largest prefix within budget. Everything runs inside ``jit`` with static shapes.

LoRA factors (paths ending in ``lora_a``/``lora_b``) are tuning parameters, not backbone: they
are left out of the count unless ``count_lora=True`` (APT constrains the backbone size; the
tuning budget has its own schedule). Surgery still slices them.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import _tree
from jaxprune.scores import _apt as apt_scores

Key = tuple[str, int | None]


def param_shapes(params: Any) -> dict[tuple[Any, ...], tuple[int, ...]]:
    """Map every leaf's key path (dict keys, sequence indices) to its shape.

    Accepts arrays or ``jax.ShapeDtypeStruct`` leaves, so ``jax.eval_shape`` output works.
    """
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return {_tree.path_names(path): tuple(leaf.shape) for path, leaf in leaves}


class _CountPlan:
    """Static (python) description of the exact kept-parameter count."""

    def __init__(
        self,
        structures: Sequence[Any],
        shapes: Mapping[tuple[Any, ...], tuple[int, ...]],
        count_lora: bool = False,
    ):
        self.keys = [apt_scores.structure_key(s) for s in structures]
        self.sizes = [int(s.size) for s in structures]
        axes: dict[tuple[Any, ...], dict[int, tuple[int, int]]] = {}
        for index, s in enumerate(structures):
            for slc in s.slices:
                path = tuple(slc.path)
                if not count_lora and path[-1] in ('lora_a', 'lora_b'):
                    continue
                if path not in shapes:
                    raise ValueError(
                        f'structure {self.keys[index]} slices {path=} which is not in the params; '
                        'pass the params (or shapes) of the same config as the structures'
                    )
                shape = shapes[path]
                if shape[slc.axis] != s.size * slc.width:
                    raise ValueError(
                        f'{path=} axis {slc.axis} has extent {shape[slc.axis]} but structure '
                        f'{self.keys[index]} expects size*width={s.size}*{slc.width}'
                    )
                if slc.axis in axes.setdefault(path, {}):
                    raise ValueError(f'{path=} axis {slc.axis} is sliced by two structures')
                axes[path][slc.axis] = (index, slc.width)
        # One term per prunable tensor: constant factor and the (structure, width) of sliced axes.
        self.terms = []
        total = 0
        for path, sliced in axes.items():
            const = 1
            for axis, extent in enumerate(shapes[path]):
                if axis not in sliced:
                    const *= extent
            self.terms.append((const, tuple(sliced.values())))
            total += int(np.prod(shapes[path], dtype=np.int64))
        self.total = total
        # Exact integer arithmetic while it fits int32, float32 beyond (relative error ~1e-7).
        self.dtype = jnp.int32 if total < 2**31 - 1 else jnp.float32

    def count(self, kept: jax.Array) -> jax.Array:
        """Exact kept-parameter count for ``kept[i]`` kept units of structure ``i``."""
        kept = kept.astype(self.dtype)
        total = jnp.zeros((), self.dtype)
        for const, factors in self.terms:
            term = jnp.asarray(const, self.dtype)
            for index, width in factors:
                term = term * kept[index] * width
            total = total + term
        return total


def total_prunable_params(
    structures: Sequence[Any], shapes_or_params: Any, *, count_lora: bool = False
) -> int:
    """Number of parameters in tensors that some structure slices (the budget's 100 %)."""
    return _CountPlan(structures, _as_shapes(shapes_or_params), count_lora).total


def kept_param_count(
    keep: Mapping[Key, jax.Array],
    structures: Sequence[Any],
    shapes_or_params: Any,
    *,
    count_lora: bool = False,
) -> jax.Array:
    """Exact number of prunable parameters left after keeping the units where ``keep`` is true.

    Args:
      keep: ``{(kind, layer): bool[size]}`` keep vectors (missing keys keep everything).
      structures: the model's structures.
      shapes_or_params: the params pytree (arrays or ``ShapeDtypeStruct``) or
        :func:`param_shapes` output.
      count_lora: also count LoRA factors (module docstring).

    Returns:
      Scalar count (int32, or float32 for models with more than ``2**31`` prunable params).
    """
    plan = _CountPlan(structures, _as_shapes(shapes_or_params), count_lora)
    kept = jnp.stack(
        [
            jnp.sum(keep[k]).astype(jnp.int32) if k in keep else jnp.asarray(size, jnp.int32)
            for k, size in zip(plan.keys, plan.sizes, strict=True)
        ]
    )
    return plan.count(kept)


def _as_shapes(shapes_or_params: Any) -> dict[tuple[Any, ...], tuple[int, ...]]:
    if isinstance(shapes_or_params, Mapping) and all(
        isinstance(k, tuple) and isinstance(v, tuple) for k, v in shapes_or_params.items()
    ):
        return dict(shapes_or_params)
    return param_shapes(shapes_or_params)


def budget_keep(
    density_scores: Mapping[Key, jax.Array],
    structures: Sequence[Any],
    shapes_or_params: Any,
    density: jax.typing.ArrayLike,
    *,
    eligible: Mapping[Key, jax.Array] | None = None,
    budget_base: int | None = None,
    count_lora: bool = False,
    min_keep: Mapping[Key, int] | None = None,
) -> dict[Key, jax.Array]:
    r"""Keep the largest prefix of the global density ranking that fits the parameter budget.

    All units of all structures (heads, neurons, hidden dims) are ranked together by salience
    density (descending; ties keep structure order). With :math:`N(k)` the exact kept count of
    the first :math:`k` units (module docstring), the result keeps the first

    .. math:: k^* = \max\{k : N(k) \le \rho \cdot N_\mathrm{total}\}

    units, found by binary search in :math:`\lceil \log_2(U+1) \rceil` steps. Shapes are static.

    Args:
      density_scores: ``{(kind, layer): f32[size]}`` salience per parameter
        (:func:`jaxprune.scores._apt.salience_density`).
      structures: the model's structures (static).
      shapes_or_params: params pytree (or :func:`param_shapes`) of the same config.
      density: target fraction :math:`\rho` of prunable parameters to keep, may be traced.
      eligible: optional ``{(kind, layer): bool[size]}``; ineligible units (already removed) are
        never kept, ranked last and not counted.
      budget_base: parameter count that ``density`` refers to; default the prunable count of
        these structures. After surgery pass the *original* model's count so that the schedule
        keeps meaning "fraction of the original model".
      count_lora: also count LoRA factors (module docstring).
      min_keep: optional ``{(kind, layer): m}``; the ``m`` densest eligible units of that
        structure rank ahead of every other unit (a per-layer floor, e.g. so that no layer loses
        all but one head). The budget still binds: if the floors alone exceed it, the densest
        floor units are kept. Structures not named have no floor.

    Returns:
      ``{(kind, layer): bool[size]}`` keep vectors.

    References:
      Zhao et al., ICML 2024, Sec. 4.2 "Adaptive pruning": global ranking by salience density
      and a binary search for the mask that meets the parameter constraint.
    """
    plan = _CountPlan(structures, _as_shapes(shapes_or_params), count_lora)
    flat = jnp.concatenate([density_scores[k].astype(jnp.float32).ravel() for k in plan.keys])
    flat = jnp.where(jnp.isnan(flat), -jnp.inf, flat)
    if eligible is not None:
        ok = jnp.concatenate(
            [
                eligible[k].astype(bool).ravel() if k in eligible else jnp.ones((n,), bool)
                for k, n in zip(plan.keys, plan.sizes, strict=True)
            ]
        )
    else:
        ok = jnp.ones(flat.shape, bool)
    if min_keep:
        flat = _apply_floors(flat, ok, plan, min_keep)
    # Stable descending sort: ineligible units go last.
    order = jnp.lexsort((-flat, ~ok))
    rank = jnp.zeros(flat.shape, jnp.int32).at[order].set(jnp.arange(flat.size, dtype=jnp.int32))
    segment = np.repeat(np.arange(len(plan.sizes)), plan.sizes)
    base = plan.total if budget_base is None else int(budget_base)
    budget = jnp.asarray(density, jnp.float32) * float(base)

    def keep_of(k):
        return (rank < k) & ok

    def fits(k):
        kept = jax.ops.segment_sum(keep_of(k).astype(jnp.int32), segment, len(plan.sizes))
        return plan.count(kept).astype(jnp.float32) <= budget

    def body(_, bounds):
        lo, hi = bounds
        mid = (lo + hi + 1) // 2
        ok_mid = fits(mid)
        return jnp.where(ok_mid, mid, lo), jnp.where(ok_mid, hi, mid - 1)

    steps = int(np.ceil(np.log2(flat.size + 1))) + 1
    lo, _ = jax.lax.fori_loop(
        0, steps, body, (jnp.zeros((), jnp.int32), jnp.asarray(flat.size, jnp.int32))
    )
    keep = keep_of(lo)
    out, start = {}, 0
    for k, n in zip(plan.keys, plan.sizes, strict=True):
        out[k] = keep[start : start + n]
        start += n
    return out


def _apply_floors(
    flat: jax.Array, ok: jax.Array, plan: '_CountPlan', min_keep: Mapping[Key, int]
) -> jax.Array:
    """Lifts the ``min_keep[k]`` densest eligible units of each structure above every other unit.

    The lifted units keep their order among themselves (one common offset), so if the floors alone
    exceed the budget the densest of them are kept.
    """
    unknown = set(min_keep) - set(plan.keys)
    if unknown:
        raise ValueError(f'min_keep names {sorted(unknown, key=str)}, not structures here')
    finite = ok & jnp.isfinite(flat)
    top = jnp.max(jnp.where(finite, flat, -jnp.inf), initial=0.0)
    bottom = jnp.min(jnp.where(finite, flat, jnp.inf), initial=0.0)
    offset = top - bottom + 1.0
    pieces, start = [], 0
    for k, n in zip(plan.keys, plan.sizes, strict=True):
        seg, seg_ok = flat[start : start + n], ok[start : start + n]
        m = min(int(min_keep.get(k, 0)), n)
        if m > 0:
            # Rank within the structure (eligible first, densest first); the top m are lifted.
            order = jnp.lexsort((-seg, ~seg_ok))
            rank = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
            seg = jnp.where((rank < m) & seg_ok, seg + offset, seg)
        pieces.append(seg)
        start += n
    return jnp.concatenate(pieces)
