"""Parameter averaging: an exponential moving average of the trained parameters in optax state."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class ParamEmaState(NamedTuple):
    """State of :func:`param_ema`.

    Attributes:
      count: ``int32[]``, number of updates averaged so far.
      ema: params-shaped pytree, the *biased* moving average (zero-initialised); read it through
        :func:`averaged_params`, which removes the bias.
    """

    count: jax.Array
    ema: Any


def _is_float(x: Any) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.floating)


def param_ema(decay: float) -> optax.GradientTransformationExtraArgs:
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
      decay: :math:`\delta \in [0, 1)`; the average spans about ``1 / (1 - decay)`` updates.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update(u, state, params)`` needs ``params``.

    Raises:
      ValueError: if ``decay`` is outside [0, 1) or ``update`` is called without ``params``.

    References:
      Polyak & Juditsky, *Acceleration of Stochastic Approximation by Averaging*, SIAM J.
      Control Optim. 1992 (iterate averaging); the exponential form with bias correction follows
      ``optax.ema(debias=True)``, which averages updates rather than parameters.
    """
    if not 0 <= decay < 1:
        raise ValueError(f'param_ema decay={decay} must be in [0, 1)')

    def init_fn(params):
        return ParamEmaState(count=jnp.zeros((), jnp.int32),
                             ema=jax.tree.map(jnp.zeros_like, params))

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError('param_ema.update needs params=')

        def one(e, p, u):
            if not _is_float(p):
                return e
            new = p.astype(jnp.float32) + u.astype(jnp.float32)
            return (decay * e.astype(jnp.float32) + (1 - decay) * new).astype(e.dtype)

        ema = jax.tree.map(one, state.ema, params, updates)
        return updates, ParamEmaState(count=optax.safe_increment(state.count), ema=ema)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _find(opt_state: Any) -> list[ParamEmaState]:
    is_state = lambda x: isinstance(x, ParamEmaState)
    return [x for x in jax.tree.leaves(opt_state, is_leaf=is_state) if is_state(x)]


def has_param_ema(opt_state: Any) -> bool:
    """Whether ``opt_state`` holds a :func:`param_ema` state."""
    return bool(_find(opt_state))


def averaged_params(params: Any, opt_state: Any, decay: float) -> Any:
    """The bias-corrected average held by the :func:`param_ema` state inside ``opt_state``.

    Args:
      params: the live parameters (same structure as the average); returned unchanged when no
        update has been averaged yet, and used for non-float leaves.
      opt_state: an optimizer state containing exactly one :class:`ParamEmaState`.
      decay: the decay the transform was built with (needed for the bias correction).

    Returns:
      A pytree like ``params``.

    Raises:
      ValueError: if ``opt_state`` holds no or several :class:`ParamEmaState`.
    """
    found = _find(opt_state)
    if len(found) != 1:
        raise ValueError(f'expected one ParamEmaState in the optimizer state, found {len(found)}; '
                         'build the optimizer with param_ema(...) last in the chain')
    state = found[0]
    count = state.count
    correction = 1 - jnp.asarray(decay, jnp.float32) ** count.astype(jnp.float32)

    def one(e, p):
        if not _is_float(p):
            return p
        avg = (e.astype(jnp.float32) / jnp.maximum(correction, 1e-30)).astype(p.dtype)
        return jnp.where(count > 0, avg, p)

    return jax.tree.map(one, state.ema, params)
