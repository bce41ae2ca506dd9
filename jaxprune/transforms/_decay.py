"""Annealed weight decay of the *pruned* weights (AST / SR-STE), reading masks from extra args."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class MaskedWeightDecayState(NamedTuple):
    """State of :func:`masked_weight_decay`.

    Attributes:
      count: ``int32[]``, number of updates so far (drives the schedule).
    """

    count: jax.Array


def _ramp(final: Any, ramp_steps: Any):
    def schedule(count):
        steps = jnp.asarray(ramp_steps, jnp.float32)
        frac = jnp.where(steps > 0, jnp.clip(count / jnp.maximum(steps, 1.0), 0.0, 1.0), 1.0)
        return jnp.asarray(final, jnp.float32) * frac
    return schedule


def masked_weight_decay(
    weight_decay: optax.ScalarOrSchedule = 6e-5,
    *,
    ramp_steps: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Add an (annealed) decay of the pruned weights to the gradient.

    .. math::
        g_t \leftarrow g_t + \lambda(t)\,(1 - M) \odot W_t,\qquad
        \lambda(t) = \lambda_{\text{final}} \min\!\big(1, t / T_{\text{ramp}}\big)

    Pruned weights (``M = 0``) are pulled towards zero ever harder as training proceeds, which
    lowers the mask flip rate and lets the mask settle (AST's annealed SR-STE term); kept weights
    and dense leaves are untouched. Place it **before** the optimizer in the chain (the term is
    added to the raw gradient, as in SR-STE).

    Masks come from one owner: this transformation reads ``masks=`` from the ``update`` extra
    arguments, which :func:`jaxprune.transforms._sparsify.sparsify` passes to its ``inner`` chain
    (the masks used by the current forward). It keeps no copy of them.

    Args:
      weight_decay: :math:`\lambda_{\text{final}}` as a float (with ``ramp_steps``: linear ramp from
        0) or any ``optax`` schedule of the step (then ``ramp_steps`` must be ``None``). AST uses
        a linear ramp over the first ~20% of training to 6e-5.
      ramp_steps: number of updates of the linear warm-up of :math:`\lambda`; ``None`` or 0 means
        constant :math:`\lambda`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update(g, state, params, masks=...)``.

    Raises:
      ValueError: if both a schedule and ``ramp_steps`` are given, or ``update`` is called without
        ``params`` or ``masks``.

    References:
      Huang et al., *Pruning Large Language Models with Semi-Structural Adaptive Sparse
      Training*, AAAI 2025, Sec. 3 (annealed decay of masked weights); Zhou et al., *Learning N:M
      Fine-grained Structured Sparse Neural Networks From Scratch*, ICLR 2021, Eq. 6 (SR-STE).
      Deviation: SR-STE adds the term to a plain SGD step; here it enters the gradient fed to the
      next transformation (AdamW in :func:`jaxprune.methods._ast.ast`), so Adam's per-coordinate
      normalisation rescales it. Put it after the optimizer (scaled by ``-lr``) for the
      decoupled, AdamW-style variant.
    """
    if callable(weight_decay):
        if ramp_steps is not None:
            raise ValueError(f'{ramp_steps=} must be None when weight_decay is a schedule')
        schedule = weight_decay
    else:
        schedule = _ramp(weight_decay, 0 if ramp_steps is None else ramp_steps)

    def init_fn(params):
        del params
        return MaskedWeightDecayState(count=jnp.zeros((), jnp.int32))

    def update_fn(updates, state, params=None, *, masks=None, **extra_args):
        del extra_args
        if params is None or masks is None:
            raise ValueError(
                'masked_weight_decay.update needs params= and masks=; put it in the inner chain '
                'of sparsify(...) (which passes masks=) or pass masks= yourself')
        lam = schedule(state.count)

        def one(mk, g, p):
            if mk is None:
                return g
            decay = jnp.where(mk, jnp.zeros_like(p), p).astype(jnp.float32) * lam
            return (g.astype(jnp.float32) + decay).astype(g.dtype)

        updates = jax.tree.map(one, masks, updates, params, is_leaf=lambda x: x is None)
        return updates, MaskedWeightDecayState(count=optax.safe_increment(state.count))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
