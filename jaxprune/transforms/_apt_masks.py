"""APT's adaptive structured masks as an optax transform (the mask owner of the APT chain).

Each ``update`` receives the salience of the step (``salience=`` extra arg, unit layout
``{(kind, layer): f32[size]}``, see ``jaxprune.scores._apt``), folds it into an EMA, runs the
budget search at the scheduled density and moves every soft mask one ``step_size`` towards the
search result. At a pruning step the masks become hard: exactly the search result, so the model
meets the budget, and units that were dropped are marked dead for good (they are never revived,
even before the training loop removes them physically with ``jaxprune.surgery``).

Gradients pass through unchanged: APT masks act on activations inside the forward pass
(``model(x, masks=to_model_masks(state.masks, ...))``), so the gradient of a masked unit's
weights is already zero where it matters.
"""

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxprune.masks import _budget
from jaxprune.scores import _apt as apt_scores

Key = tuple[str, int | None]


class AptMaskState(NamedTuple):
    """State of :func:`apt_masks`.

    Attributes:
      count: ``i32[]`` number of updates applied.
      masks: ``{(kind, layer): f32[size]}`` soft masks in ``[0, 1]`` (hard ``{0, 1}`` right after a
        pruning step).
      alive: ``{(kind, layer): bool[size]}`` units not yet hard-pruned; dead units stay at 0.
      salience_ema: ``{(kind, layer): f32[size]}`` EMA of the salience.
    """

    count: jax.Array
    masks: dict[Key, jax.Array]
    alive: dict[Key, jax.Array]
    salience_ema: dict[Key, jax.Array]


def _value(x: optax.ScalarOrSchedule, count: jax.Array) -> jax.Array:
    return x(count) if callable(x) else jnp.asarray(x, jnp.float32)


def apt_masks(
    structures: Sequence[Any],
    shapes_or_params: Any,
    *,
    density_schedule: optax.ScalarOrSchedule,
    pruning_steps: Sequence[int],
    beta: optax.ScalarOrSchedule = 0.85,
    step_size: optax.ScalarOrSchedule = 0.01,
    budget_base: int | None = None,
    min_keep: Mapping[Key, int] | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Adaptive structured masks for heads, neurons and hidden dims (APT).

    With salience :math:`s_t`, EMA :math:`\bar s_t = \beta \bar s_{t-1} + (1-\beta) s_t` (the first
    update sets :math:`\bar s_1 = s_1`), target keep set
    :math:`K_t = \mathrm{budget}(\bar s_t / \mathrm{params\_per\_unit},\ \rho(t))` and soft masks

    .. math:: m_t = \mathrm{clip}(m_{t-1} + \eta\,(2\,[u \in K_t] - 1),\ 0,\ 1)\cdot
              \mathrm{alive}_{t-1}

    At a pruning step (``t`` in ``pruning_steps``): :math:`m_t = [u \in K_t]` and
    :math:`\mathrm{alive}_t = \mathrm{alive}_{t-1} \wedge K_t`. Budget searches exclude dead units.

    Training-loop contract: right after the update whose ``count`` equals a pruning step, read
    ``state.masks``, call ``jaxprune.surgery.prune`` with ``keep = masks > 0``, prune this state
    with ``jaxprune.surgery.prune_units`` and rebuild this transform for the new structures.

    Deliberate deviations: the reference code keeps a separate "pruning controller" outside the
    optimizer; here the masks live in optimizer state so they are checkpointed and sharded with
    it. Binarization uses the budget-search result (not ``m >= 0.5``) so the hard mask meets the
    budget exactly.

    Args:
      structures: the model's structures (static; the transform is rebuilt after surgery).
      shapes_or_params: params pytree or ``jaxprune.masks._budget.param_shapes`` output.
      density_schedule: target density :math:`\rho(t)` of prunable parameters, e.g.
        ``jaxprune.schedules._apt.stepwise_density``.
      pruning_steps: static update counts at which masks become hard.
      beta: salience EMA decay.
      step_size: soft-mask step :math:`\eta` per update.
      budget_base: the parameter count densities refer to (default: the prunable count of
        ``structures``). Pass the original model's count when rebuilding after surgery.
      min_keep: optional per-structure floors ``{(kind, layer): m}`` for the budget search
        (``jaxprune.masks._budget.budget_keep``); absolute unit counts, so pass the same dict
        when rebuilding after surgery. Not in the paper (a guard against emptying a layer).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes ``salience=``.

    References:
      Zhao et al., ICML 2024, Sec. 4.2 (adaptive pruning with gradually updated masks, Eq. 5).
    """
    structures = tuple(structures)
    keys = [apt_scores.structure_key(s) for s in structures]
    steps = jnp.asarray(sorted(int(s) for s in pruning_steps) or [-1], jnp.int32)

    def init_fn(params):
        del params
        return AptMaskState(
            count=jnp.zeros((), jnp.int32),
            masks={k: jnp.ones((s.size,), jnp.float32) for k, s in zip(keys, structures)},
            alive={k: jnp.ones((s.size,), bool) for k, s in zip(keys, structures)},
            salience_ema={k: jnp.zeros((s.size,), jnp.float32) for k, s in zip(keys, structures)},
        )

    def update_fn(updates, state, params=None, *, salience=None, **extra_args):
        del params, extra_args
        count = state.count + 1
        if salience is None:
            ema = state.salience_ema
        else:
            missing = set(keys) - set(salience)
            if missing:
                raise ValueError(
                    f'salience lacks {sorted(missing, key=str)}; pass one per structure'
                )
            b = _value(beta, state.count)
            first = state.count == 0
            ema = {
                k: jnp.where(first, salience[k], b * state.salience_ema[k] + (1 - b) * salience[k])
                for k in keys
            }
        dens = apt_scores.salience_density(ema, structures)
        target = _budget.budget_keep(
            dens,
            structures,
            shapes_or_params,
            _value(density_schedule, count),
            eligible=state.alive,
            budget_base=budget_base,
            min_keep=min_keep,
        )
        eta = _value(step_size, state.count)
        prune_now = jnp.any(steps == count)
        masks, alive = {}, {}
        for k in keys:
            keep = target[k] & state.alive[k]
            soft = jnp.clip(state.masks[k] + jnp.where(keep, eta, -eta), 0.0, 1.0)
            soft = jnp.where(state.alive[k], soft, 0.0)
            masks[k] = jnp.where(prune_now, keep.astype(jnp.float32), soft)
            alive[k] = jnp.where(prune_now, keep, state.alive[k])
        return updates, AptMaskState(count=count, masks=masks, alive=alive, salience_ema=ema)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
