"""Parameter averaging: an exponential moving average of the trained parameters in optax state."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxprune import _tree


class ParamEmaState(NamedTuple):
    r"""State of :func:`param_ema`.

    Attributes:
      count: ``int32[]``, number of updates averaged so far.
      weight: ``f32[]``, the total weight :math:`1 - \delta^t` of the averaged iterates (the bias
        correction).
      ema: params-shaped pytree, the *biased* moving average (zero-initialised, float32 for
        float leaves whatever the params' dtype); read it through :func:`averaged_params`, which
        divides by ``weight`` and casts back.
    """

    count: jax.Array
    weight: jax.Array
    ema: Any


def _is_float(x: Any) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.floating)


def param_ema(decay: float | jax.Array) -> optax.GradientTransformationExtraArgs:
    r"""Track an exponential moving average of the parameters *after* each update.

    .. math::
        \bar\theta_t = \delta\,\bar\theta_{t-1} + (1 - \delta)\,(\theta_{t-1} + u_t),
        \qquad \hat\theta_t = \bar\theta_t / (1 - \delta^t)

    Place it **last** in a chain: it sees the final update ``u_t`` and passes it through
    unchanged, so training itself is not affected. The average lives in the optimizer state,
    which makes it a params-shaped subtree like Adam's moments: structural surgery
    (:func:`jaxprune.surgery.prune_like`), LoRA rank resizing and sharding carry it, and
    checkpoints hold it. Non-float leaves are not averaged (their average stays zero and
    :func:`averaged_params` returns the live value).

    Args:
      decay: :math:`\delta \in [0, 1)`; the average spans about ``1 / (1 - decay)`` updates. A
        float (checked) or a scalar array, so ``optax.inject_hyperparams`` works.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update(u, state, params)`` needs ``params``.

    Raises:
      ValueError: if ``decay`` is outside [0, 1) or ``update`` is called without ``params``.

    References:
      Polyak & Juditsky, *Acceleration of Stochastic Approximation by Averaging*, SIAM J.
      Control Optim. 1992 (iterate averaging); the exponential form with bias correction follows
      ``optax.ema(debias=True)``, which averages updates rather than parameters.
    """
    if isinstance(decay, (int, float)) and not 0 <= decay < 1:  # arrays: inject_hyperparams
        raise ValueError(f'param_ema {decay=} must be in [0, 1)')

    def init_fn(params):
        ema = jax.tree.map(
            lambda p: jnp.zeros(jnp.shape(p), jnp.float32) if _is_float(p) else jnp.zeros_like(p),
            params)
        return ParamEmaState(count=jnp.zeros((), jnp.int32), weight=jnp.zeros((), jnp.float32),
                             ema=ema)

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError('param_ema.update needs params=')

        def one(e, p, u):
            if not _is_float(p):
                return e
            new = p.astype(jnp.float32) + u.astype(jnp.float32)
            return decay * e + (1 - decay) * new

        ema = jax.tree.map(one, state.ema, params, updates)
        weight = decay * state.weight + (1 - decay)
        return updates, ParamEmaState(count=optax.safe_increment(state.count), weight=weight,
                                      ema=ema)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _is_state(x: Any) -> bool:
    return isinstance(x, ParamEmaState)


def _find(opt_state: Any) -> list[ParamEmaState]:
    return [x for x in jax.tree.leaves(opt_state, is_leaf=_is_state) if _is_state(x)]


def _only(opt_state: Any) -> ParamEmaState:
    found = _find(opt_state)
    if len(found) != 1:
        raise ValueError(f'expected one ParamEmaState in the optimizer state, found {len(found)}; '
                         'build the optimizer with param_ema(...) last in the chain')
    return found[0]


def averaged_params(params: Any, opt_state: Any) -> Any:
    """The bias-corrected average held by the :func:`param_ema` state inside ``opt_state``.

    Args:
      params: the live parameters (same structure as the average); returned unchanged before
        the first averaged update, and used for non-float leaves.
      opt_state: an optimizer state containing exactly one :class:`ParamEmaState`.

    Returns:
      A pytree like ``params``.

    Raises:
      ValueError: if ``opt_state`` holds no or several :class:`ParamEmaState`.
    """
    state = _only(opt_state)

    def one(e, p):
        if not _is_float(p):
            return p
        avg = (e / jnp.maximum(state.weight, 1e-30)).astype(p.dtype)
        return jnp.where(state.weight > 0, avg, p)

    return jax.tree.map(one, state.ema, params)


def shift_average(opt_state: Any, new: Any, old: Any) -> Any:
    """Apply an edit made to the params *outside* the optimizer to their average as well.

    Afterwards the average is ``average + (new - old)``: the edit (e.g. LoRA rank growth, which
    sets fresh ``A`` columns without changing the function) counts as if it had always been
    there, so the averaged model keeps it. ``new`` and ``old`` are params-shaped pytrees of the
    same structure (pure dicts or ``nnx.State``), with the average's shapes; their leaves are
    matched to the average's by key path, as :func:`jaxprune.surgery.prune_like` matches
    optimizer states. Leaves the edit left in place (``new is old``) cost nothing, and without a
    :class:`ParamEmaState` in ``opt_state`` no difference is computed at all.

    Args:
      opt_state: an optimizer state (with zero or one :class:`ParamEmaState`).
      new: the params after the edit.
      old: the params before it, as the optimizer state sees them.

    Returns:
      ``opt_state`` with the average shifted by ``new - old``.
    """
    if not _find(opt_state):
        return opt_state
    plan = {_tree.path_names(path, drop_value=True): (n, o)
            for (path, n), o in zip(jax.tree_util.tree_leaves_with_path(new),
                                    jax.tree.leaves(old), strict=True)
            if n is not o}

    def shift(state: ParamEmaState) -> ParamEmaState:
        def one(e, pair):
            if not _is_float(e):
                return e
            n, o = pair
            return e + state.weight * (n.astype(jnp.float32) - o.astype(jnp.float32))

        return state._replace(ema=_tree.map_planned(state.ema, plan, one))

    return jax.tree.map(lambda x: shift(x) if _is_state(x) else x, opt_state, is_leaf=_is_state)
