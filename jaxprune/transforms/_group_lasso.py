"""Proximal group lasso on the LoRA factors that feed pruned channels (ATP), as an optax transform.

Groups. For a LoRA pair ``A: (K, r)``, ``B: (r, N)`` of a kernel ``W: (K, N)`` (delta ``s A B``):

* output channel ``n`` of the adapter is written only by **column** ``B[:, n]``; when ``n`` is
  pruned by the layer's output keep-vector, that column is a group;
* input channel ``k`` is read only by **row** ``A[k, :]``; when ``k`` is pruned by the input
  keep-vector, that row is a group.

Rows of ``A`` and columns of ``B`` are disjoint, so the proximal map factorises over groups.
The keep-vectors per projection come from ``jaxprune.masks._density.linear_keep`` (e.g. ``v_proj``
columns follow ``attn_ctx`` ORed over the GQA group, ``o_proj`` rows follow ``attn_ctx``). Each
group gets a *pruned share* ``r_g = 1 - keep_g`` in ``[0, 1]`` (0 or 1 for hard masks, anything
in between for soft ones); kept groups (``r_g == 0``) are left bit-exactly untouched.

The transform is a projection-style last element of a chain: it returns ``u'`` with
``params + u' = prox(params + u)`` (the ``optax.keep_params_nonnegative`` pattern), so it needs
``params`` and the current masks (extra arg ``masks=``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxprune.masks import _density

SharesFn = Callable[[Any, optax.Params], Any]


class GroupLassoState(NamedTuple):
    """State of :func:`group_lasso`.

    Attributes:
      count: int32 scalar, number of updates applied (drives the schedules).
    """

    count: jax.Array


def prox_group(w: jax.Array, share: jax.Array, threshold: jax.Array) -> jax.Array:
    r"""Group soft-thresholding along the axes where ``share`` has size 1.

    .. math::
        w_g \leftarrow \frac{w_g}{\|w_g\|_2}\,\max\!\big(0, \|w_g\|_2 - t\, r_g\big)

    Groups with ``r_g == 0`` are returned unchanged (exactly). ``share`` must have ``w.ndim``
    dims, each 1 (reduced: part of a group) or equal to ``w``'s (indexes groups).
    """
    axes = tuple(i for i, s in enumerate(share.shape) if s == 1)
    w32 = w.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(jnp.square(w32), axis=axes, keepdims=True))
    shrunk = jnp.maximum(norm - threshold * share, 0.0)
    scale = jnp.where(norm > 0, shrunk / jnp.where(norm > 0, norm, 1.0), 0.0)
    return jnp.where(share > 0, (w32 * scale).astype(w.dtype), w)


def _path_key(entry: Any) -> Any:
    for attr in ('key', 'idx', 'name'):
        if hasattr(entry, attr):
            return getattr(entry, attr)
    return entry


def lora_shares_fn(
    dims: Sequence[_density.LayerDims],
    *,
    layers_key: str = 'layers',
    a_name: str = 'lora_a',
    b_name: str = 'lora_b',
) -> SharesFn:
    """Pruned shares of the LoRA groups of a Llama-style params tree.

    A leaf at a path ``(..., layers_key, i, ..., proj, a_name | b_name)`` with ``proj`` one of
    ``q_proj k_proj v_proj o_proj gate_proj up_proj down_proj`` is regularised: ``lora_a``
    ``(K, r)`` gets shares ``(K, 1)`` = ``1 - in_keep``, ``lora_b`` ``(r, N)`` gets ``(1, N)`` =
    ``1 - out_keep``. Every other leaf gets ``None`` (untouched).

    Args:
      dims: per-layer dims (``jaxprune.masks._density.layer_dims(config)``).
      layers_key, a_name, b_name: names in the params paths.

    Returns:
      ``shares_fn(masks, params) -> shares`` for :func:`group_lasso`, where ``masks`` is the
      models masks layout ``{'layers': (...)}``.
    """
    dims = tuple(dims)

    def shares_fn(masks, params):
        layers = masks['layers']
        if len(layers) != len(dims):
            raise ValueError(f'masks have {len(layers)} layers, expected {len(dims)}')
        keeps = {}

        def share(path, leaf):
            keys = [_path_key(p) for p in path]
            # nnx.State leaves may add a trailing 'value' entry; find the factor name itself.
            ends = [j for j, k in enumerate(keys) if k in (a_name, b_name)]
            if not ends or ends[-1] < 1 or layers_key not in keys:
                return None
            keys = keys[: ends[-1] + 1]
            proj = keys[-2]
            if proj not in _density.PROJECTIONS:
                return None
            i = keys.index(layers_key)
            if i + 1 >= len(keys) or not isinstance(keys[i + 1], int):
                return None
            layer = keys[i + 1]
            if layer not in keeps:
                keeps[layer] = _density.linear_keep(layers[layer], dims[layer])
            keep_in, keep_out = keeps[layer][proj]
            if keys[-1] == a_name:
                return (1.0 - keep_in)[:, None].astype(jnp.float32)
            return (1.0 - keep_out)[None, :].astype(jnp.float32)

        return jax.tree.map_with_path(share, params)

    return shares_fn


def group_lasso(
    shares_fn: SharesFn,
    *,
    strength: optax.ScalarOrSchedule,
    learning_rate: optax.ScalarOrSchedule,
) -> optax.GradientTransformationExtraArgs:
    r"""Proximal group-lasso step on the parameter groups that feed pruned channels.

    After the inner optimizer proposed ``u``, with ``p = params + u``:

    .. math::
        p_g \leftarrow \frac{p_g}{\|p_g\|_2}\max\big(0, \|p_g\|_2 - \eta(t)\,\alpha(t)\,r_g\big),
        \qquad u' = p - \mathrm{params}

    where ``eta`` is ``strength``, ``alpha`` the ``learning_rate`` of the inner step and ``r_g``
    the pruned share of group ``g`` (``shares_fn``). ATP ramps ``eta`` up exponentially; use e.g.
    ``optax.exponential_decay(init_value=1e-3, transition_steps=100, decay_rate=2.0,
    end_value=1.0)`` (a decay rate > 1 grows, ``end_value`` caps it).

    Args:
      shares_fn: ``shares_fn(masks, params) -> shares``: a pytree with the structure of
        ``params`` whose leaves are ``None`` (not regularised) or float arrays with
        ``param.ndim`` dims, size 1 along the axes a group spans and the parameter's size along
        the axes indexing groups (e.g. ``(K, 1)`` for rows of ``lora_a``). See
        :func:`lora_shares_fn`.
      strength: ``eta(t)``, scalar or schedule of the step count.
      learning_rate: ``alpha(t)``, the inner optimizer's learning rate (scalar or schedule).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update(updates, state, params, *,
      masks, **extra)`` needs ``params`` and ``masks`` (the current hard or soft masks). Place
      it last in a chain.

    Raises:
      ValueError: at update time when ``params`` is missing.

    Example:
      The columns of a LoRA ``B`` are groups; column 0 feeds a pruned channel (mask 0), so its
      norm 5 shrinks by ``eta * alpha = 2.5``; the kept column 1 is untouched:

      >>> import jax, jax.numpy as jnp, optax
      >>> params = {'lora_b': jnp.array([[3.0, 0.5], [4.0, 0.5]])}
      >>> shares_fn = lambda masks, p: {'lora_b': (1.0 - masks)[None, :]}
      >>> tx = group_lasso(shares_fn, strength=2.5, learning_rate=1.0)
      >>> zero = jax.tree.map(jnp.zeros_like, params)
      >>> updates, _ = tx.update(zero, tx.init(params), params, masks=jnp.array([0.0, 1.0]))
      >>> optax.apply_updates(params, updates)['lora_b']
      Array([[1.5, 0.5],
             [2. , 0.5]], dtype=float32)

    References:
      Lu et al., 2024 (ATP), arXiv:2412.14426, sparsity regularisation: group lasso on the
      LoRA weights of pruned structures with proximal updates; Yuan & Lin, 2006 (group
      lasso). Deviation: ``r_g`` generalises the paper's 0/1 selection of pruned groups to soft
      masks.
    """

    def init_fn(params):
        del params
        return GroupLassoState(count=jnp.zeros((), jnp.int32))

    def update_fn(updates, state, params=None, *, masks=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError('group_lasso needs params=; call tx.update(updates, state, params)')
        eta = strength(state.count) if callable(strength) else strength
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        threshold = jnp.asarray(eta, jnp.float32) * jnp.asarray(lr, jnp.float32)
        shares = shares_fn(masks, params)

        def apply(share, u, p):
            if share is None:
                return u
            if share.ndim != p.ndim or any(
                s not in (1, n) for s, n in zip(share.shape, p.shape, strict=True)
            ):
                raise ValueError(f'{share.shape=} does not describe groups of a {p.shape} param')
            new = p + u
            return jnp.where(share > 0, (prox_group(new, share, threshold) - p).astype(u.dtype), u)

        new_updates = jax.tree.map(apply, shares, updates, params, is_leaf=lambda x: x is None)
        return new_updates, GroupLassoState(count=optax.safe_increment(state.count))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
