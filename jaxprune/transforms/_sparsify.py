"""``sparsify``: the mask owner. Keeps masks in optimizer state and recomputes them on schedule.

Design
------
* The masks live in :class:`SparsifyState` (field ``masks``), so they are checkpointed and
  sharded with the optimizer state and ``optax.tree.get(state, 'masks')`` finds them. Models never
  store masks; the training step reads them from the state and feeds the forward pass through
  ``jaxprune.masks._nm.ste_apply`` (AST: dense weights, straight-through gradient).
* The wrapped ``inner`` transformation receives ``masks=`` (the masks used by this step's forward)
  as an extra argument. This is how ``masked_weight_decay`` reads them: one owner, no copies.
* Masks are recomputed from the **post-update** weights ``optax.apply_updates(params, updates)``
  after every ``update_every``-th update (count 10, 20, ... for ``update_every=10``), inside jit
  under ``lax.cond`` with static shapes. The next step's forward then uses masks that match the
  weights it sees.
"""

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxprune.masks import _nm
from jaxprune.scores import _magnitude

# 2:4 along K on every kernel under 'layers' (module-level so the default is one object).
_DEFAULT_MASK_FN = functools.partial(_nm.nm_masks, n=2, m=4)


class SparsifyState(NamedTuple):
    """State of :func:`sparsify`.

    Attributes:
      inner_state: state of the wrapped transformation.
      masks: masks pytree shaped like the params: ``bool`` arrays for sparse leaves (``True`` =
        keep), ``None`` for dense leaves.
      count: ``int32[]``, number of updates applied so far.
      flip_rate: ``f32[]``, fraction of sparse mask entries that changed at the most recent
        recompute (0 before the first one).
    """

    inner_state: optax.OptState
    masks: Any
    count: jax.Array
    flip_rate: jax.Array


def _flip_rate(old: Any, new: Any) -> jax.Array:
    olds = [x for x in jax.tree.leaves(old) if x is not None]
    news = [x for x in jax.tree.leaves(new) if x is not None]
    if not olds:
        return jnp.zeros((), jnp.float32)
    flips = sum(jnp.sum(a != b, dtype=jnp.float32) for a, b in zip(olds, news, strict=True))
    return flips / sum(a.size for a in olds)


def sparsify(
    inner: optax.GradientTransformation,
    *,
    score_fn: Callable[[optax.Params], Any] = _magnitude.magnitude_scores,
    mask_fn: Callable[[Any], Any] = _DEFAULT_MASK_FN,
    update_every: int = 10,
    init_score_fn: Callable[[optax.Params], Any] | None = None,
    hard: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""Wrap ``inner`` with periodically recomputed sparsity masks held in the optimizer state.

    At ``init`` the masks are ``mask_fn(init_score_fn(params))``. Every update runs
    ``inner.update(updates, inner_state, params, masks=masks, **extra_args)`` and, when the new
    count is a multiple of ``update_every``,

    .. math::
        W' = W + u, \qquad M' = \mathrm{mask\_fn}(\mathrm{score\_fn}(W')),\qquad
        \mathrm{flip} = \frac{\sum [M' \ne M]}{\#M}

    With the defaults (magnitude scores, 2:4 along K) and a straight-through forward this is
    AST's adaptive mask learning: the dense weights keep training and the mask follows their
    magnitude.

    Args:
      inner: the wrapped transformation (e.g. ``optax.chain(masked_weight_decay(...), adamw)``);
        it receives ``masks=`` as an extra argument (plain transformations ignore it).
      score_fn: ``score_fn(params) -> scores`` pytree used at each recompute.
      mask_fn: ``mask_fn(scores) -> masks`` pytree (``bool`` / ``None`` leaves); static shapes.
      update_every: recompute period in updates (a Python int ``>= 1``).
      init_score_fn: score function for the initial masks (e.g. Wanda with calibration norms);
        defaults to ``score_fn``.
      hard: if ``True`` also project the updated weights onto the (new) masks,
        ``u' = where(M', u, -W)`` (``optax.keep_params_nonnegative`` pattern), turning this into
        classic hard pruning. AST keeps ``hard=False`` (dense weights).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state :class:`SparsifyState`. ``update``
      requires ``params``; other extra arguments are forwarded to ``inner``, except a caller's
      ``masks=``, which is replaced by the state's masks (this wrapper is the only mask owner).

    Raises:
      ValueError: if ``update_every < 1``, or ``update`` is called without ``params``.

    Example:
      One 2:4 kernel under ``layers``; a gradient step makes ``w[0, 0]`` the largest of its group,
      so the recomputed mask keeps rows 0 and 1 of column 0 instead of rows 1 and 2:

      >>> import jax.numpy as jnp, optax
      >>> w = jnp.array([[1.0, -4.0], [3.0, 0.2], [-2.0, 1.0], [0.5, 0.3]])
      >>> params = {'layers': [{'kernel': w}]}
      >>> tx = sparsify(optax.sgd(0.1), update_every=1)
      >>> state = tx.init(params)
      >>> state.masks['layers'][0]['kernel'][:, 0].tolist()
      [False, True, True, False]
      >>> grads = {'layers': [{'kernel': jnp.zeros((4, 2)).at[0, 0].set(-30.0)}]}
      >>> updates, state = tx.update(grads, state, params)
      >>> state.masks['layers'][0]['kernel'][:, 0].tolist()
      [True, True, False, False]
      >>> int(state.count), float(state.flip_rate)  # 2 of 8 mask entries changed
      (1, 0.25)

    References:
      Huang et al., *Pruning Large Language Models with Semi-Structural Adaptive Sparse
      Training*, AAAI 2025, Sec. 3 (adaptive masks recomputed every few steps, flip rate);
      Lee et al., *JaxPruner*, 2023 (``SparseState`` wrapper design).
    """
    if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
        raise ValueError(f'{update_every=} must be a Python int >= 1; e.g. 10')
    inner = optax.with_extra_args_support(inner)
    init_score_fn = score_fn if init_score_fn is None else init_score_fn

    def init_fn(params):
        masks = mask_fn(init_score_fn(params))
        return SparsifyState(
            inner_state=inner.init(params), masks=masks, count=jnp.zeros((), jnp.int32),
            flip_rate=jnp.zeros((), jnp.float32))

    def update_fn(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError('sparsify.update needs params= (masks are computed from weights)')
        extra_args.pop('masks', None)  # this wrapper owns the masks
        updates, inner_state = inner.update(
            updates, state.inner_state, params, masks=state.masks, **extra_args)
        count = optax.safe_increment(state.count)
        new_params = optax.apply_updates(params, updates)

        def recompute(_):
            masks = mask_fn(score_fn(new_params))
            return masks, _flip_rate(state.masks, masks)

        def keep(_):
            return state.masks, state.flip_rate

        masks, flip_rate = jax.lax.cond(count % update_every == 0, recompute, keep, None)
        if hard:
            updates = jax.tree.map(
                lambda mk, u, p: u if mk is None else jnp.where(mk, u, -p).astype(u.dtype),
                masks, updates, params, is_leaf=lambda x: x is None)
        return updates, SparsifyState(inner_state, masks, count, flip_rate)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
