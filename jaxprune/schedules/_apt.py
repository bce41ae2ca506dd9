"""APT schedules: pruning cadence, cubic density, tuning-parameter growth, distillation weight.

Everything here is a plain optax schedule (``step -> value``) except :func:`pruning_steps`, which
returns the static tuple of steps at which masks are binarized and the model is compacted.
"""

from collections.abc import Sequence

import jax.numpy as jnp
import optax

DEFAULT_ENCODER_DENSITY = 0.4
DEFAULT_DECODER_DENSITY = 0.7


def pruning_steps(
    total_steps: int,
    *,
    num_pruning_steps: int = 10,
    start_fraction: float = 0.0,
    end_fraction: float = 0.7,
) -> tuple[int, ...]:
    """Evenly spaced pruning steps inside ``[start_fraction, end_fraction] * total_steps``.

    The first pruning step is one interval after the window start (salience needs some EMA
    history) and the last is at ``end_fraction * total_steps``; the rest of training recovers.

    Args:
      total_steps: number of optimizer steps of the run.
      num_pruning_steps: how many times masks are binarized and the model compacted (APT: 10).
      start_fraction: where the pruning window opens, as a fraction of training.
      end_fraction: where the last pruning step happens.

    Returns:
      Strictly increasing tuple of step indices (0-based counts of completed updates).

    Raises:
      ValueError: for an empty window or more pruning steps than steps in the window.
    """
    if num_pruning_steps < 1:
        raise ValueError(f'{num_pruning_steps=} must be >= 1')
    if not 0.0 <= start_fraction < end_fraction <= 1.0:
        raise ValueError(f'need 0 <= {start_fraction=} < {end_fraction=} <= 1')
    start = round(start_fraction * total_steps)
    end = round(end_fraction * total_steps)
    if end - start < num_pruning_steps:
        raise ValueError(
            f'pruning window [{start}, {end}) of {total_steps=} is shorter than '
            f'{num_pruning_steps=}; train longer or prune fewer times'
        )
    steps = tuple(
        round(start + (end - start) * (i + 1) / num_pruning_steps)
        for i in range(num_pruning_steps)
    )
    return steps


def cubic_density(
    target_density: float, *, begin_step: int, end_step: int, init_density: float = 1.0
) -> optax.Schedule:
    r"""Cubic decay :math:`\rho_t = \rho_T + (\rho_0 - \rho_T)(1 - \frac{t - t_0}{t_1 - t_0})^3`.

    This is ``optax.polynomial_schedule(power=3)``; constant before ``begin_step`` and after
    ``end_step``.

    References:
      Zhu & Gupta, *To prune, or not to prune*, 2017, Eq. 1; used by APT (Zhao et al., ICML 2024,
      Sec. 4.2) for the target parameter count.
    """
    if not 0.0 < target_density <= init_density:
        raise ValueError(f'{target_density=} must be in (0, {init_density=}]')
    return optax.polynomial_schedule(
        init_value=init_density,
        end_value=target_density,
        power=3,
        transition_steps=max(end_step - begin_step, 1),
        transition_begin=begin_step,
    )


def stepwise_density(
    target_density: float, steps: Sequence[int], *, init_density: float = 1.0
) -> optax.Schedule:
    r"""Density target held constant between pruning steps, following the cubic curve.

    Between pruning steps :math:`s_{i-1} < t \le s_i` the schedule returns the cubic density at
    :math:`s_i`, the budget the next pruning step enforces, so soft masks move towards it while
    the previous compaction recovers. After the last pruning step it returns ``target_density``.

    Args:
      target_density: final fraction of prunable parameters (APT: 0.4 encoders, 0.7 decoders).
      steps: static pruning steps (:func:`pruning_steps`).
      init_density: density before pruning starts.

    Returns:
      An optax schedule.
    """
    if not steps:
        raise ValueError(f'{steps=} must contain at least one pruning step')
    begin = 0 if len(steps) == 1 else 2 * steps[0] - steps[1]
    cubic = cubic_density(
        target_density, begin_step=max(begin, 0), end_step=steps[-1], init_density=init_density
    )
    values = jnp.asarray([cubic(s) for s in steps] + [target_density], jnp.float32)
    points = jnp.asarray(steps, jnp.int32)

    def schedule(count):
        index = jnp.searchsorted(points, jnp.asarray(count, jnp.int32), side='left')
        return values[index]

    return schedule


def tuning_growth(
    init_value: float, steps: Sequence[int], *, factor: float = 4.0
) -> optax.Schedule:
    """Linear growth of the tuning-parameter budget from ``init_value`` to ``factor`` times it.

    The growth spans the pruning window (first to last pruning step); APT grows LoRA ranks at
    pruning steps until the tuning budget is 4x the initial one (Sec. 4.3).
    """
    if not steps:
        raise ValueError(f'{steps=} must contain at least one pruning step')
    return optax.linear_schedule(
        init_value=init_value,
        end_value=init_value * factor,
        transition_steps=max(steps[-1] - steps[0], 1),
        transition_begin=steps[0],
    )


def distill_start(steps: Sequence[int]) -> int:
    """The update count where the pruning window opens: :func:`distill_weight` rises from here.

    One pruning interval before the first pruning step (``0`` with a single pruning step).
    """
    if not steps:
        raise ValueError(f'{steps=} must contain at least one pruning step')
    return 0 if len(steps) == 1 else max(2 * steps[0] - steps[1], 0)


def distill_weight(steps: Sequence[int], *, final: float = 1.0) -> optax.Schedule:
    r"""Self-distillation weight :math:`\mu` rising linearly 0 -> ``final`` over the pruning window.

    The loss is :math:`\mu L_\mathrm{distill} + (1 - \mu) L_\mathrm{task}` (APT Sec. 4.4).
    """
    begin = distill_start(steps)
    return optax.linear_schedule(
        init_value=0.0,
        end_value=final,
        transition_steps=max(steps[-1] - begin, 1),
        transition_begin=begin,
    )
