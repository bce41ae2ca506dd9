"""Gumbel-sigmoid mask sampling with a straight-through estimator (ATP / DISP-LLM / ATO).

A unit with logit ``l`` is kept with probability ``sigmoid(l + bias)``: the difference of two
Gumbel(0, 1) variables is Logistic(0, 1), so ``l + bias + g1 - g2 >= 0`` is a Bernoulli sample.
The relaxation ``sigmoid((l + bias + g1 - g2) / tau)`` carries the gradient; the forward value is
the exact hard sample (straight-through). The positive ``bias`` makes a fresh generator keep
almost everything (``sigmoid(3) ~ 0.95``), so pruning starts gently.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

DEFAULT_TEMPERATURE = 0.4
DEFAULT_BIAS = 3.0


def straight_through(soft: jax.Array, hard: jax.Array) -> jax.Array:
    """``hard`` in the forward pass, the gradient of ``soft`` in the backward pass.

    Written as ``hard + (soft - stop_gradient(soft))`` so the forward value is bit-exactly
    ``hard`` (``soft - soft == 0`` exactly), unlike ``soft + stop_gradient(hard - soft)``.
    """
    hard = jax.lax.stop_gradient(hard.astype(soft.dtype))
    return hard + (soft - jax.lax.stop_gradient(soft))


def logistic_noise(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    """Logistic(0, 1) noise, distributed as ``g1 - g2`` for independent Gumbel(0, 1) ``g1, g2``."""
    return jax.random.logistic(key, shape, dtype)


def gumbel_sigmoid(
    logits: jax.Array,
    noise: jax.Array,
    *,
    temperature: float = DEFAULT_TEMPERATURE,
    bias: float = DEFAULT_BIAS,
    hard: bool = True,
) -> jax.Array:
    r"""A relaxed Bernoulli mask from logits and given logistic noise.

    .. math::
        s = \sigma\big((l + b + g_1 - g_2) / \tau\big), \qquad
        m = \mathbb{1}[s \ge 0.5] + s - \mathrm{sg}(s)

    Args:
      logits: generator logits ``l`` (any shape).
      noise: Logistic(0, 1) noise ``g1 - g2`` of the same shape (see :func:`logistic_noise`);
        pass zeros for the noiseless relaxation.
      temperature: ``tau > 0``; smaller is closer to a step function.
      bias: ``b``, added to the logits; positive values favour keeping.
      hard: return the straight-through hard mask (forward exactly ``{0, 1}``, backward the
        gradient of ``s``); otherwise the soft ``s``.

    Returns:
      float mask of ``logits.shape``.

    Raises:
      ValueError: ``temperature <= 0`` or mismatched shapes.

    References:
      Jang et al., 2017 and Maddison et al., 2017 (Gumbel-softmax/concrete); Lu et al., 2024
      (ATP), method section (pruning decisions via Gumbel-Sigmoid with STE).
    """
    if isinstance(temperature, (int, float)) and temperature <= 0:
        raise ValueError(f'{temperature=} must be > 0; ATP uses 0.4')
    if noise.shape != logits.shape:
        raise ValueError(f'{noise.shape=} must equal {logits.shape=}')
    z = logits + bias + noise.astype(logits.dtype)
    soft = jax.nn.sigmoid(z / temperature)
    if not hard:
        return soft
    # z >= 0 is exactly soft >= 0.5, without the rounding of the sigmoid near 0.5.
    return straight_through(soft, z >= 0)


def sample_masks(
    logits: Any,
    key: jax.Array,
    *,
    temperature: float = DEFAULT_TEMPERATURE,
    bias: float = DEFAULT_BIAS,
    hard: bool = True,
) -> Any:
    """:func:`gumbel_sigmoid` over every leaf of a logits pytree, with independent noise.

    Args:
      logits: a pytree of logit arrays (e.g. the masks-layout output of ``generator_apply``).
      key: PRNG key; leaf ``i`` uses ``jax.random.fold_in(key, i)`` in ``jax.tree.leaves`` order.
      temperature, bias, hard: as in :func:`gumbel_sigmoid`.

    Returns:
      a pytree of masks with the structure of ``logits``.
    """
    leaves, treedef = jax.tree.flatten(logits)
    out = [
        gumbel_sigmoid(
            leaf, logistic_noise(jax.random.fold_in(key, i), leaf.shape, leaf.dtype),
            temperature=temperature, bias=bias, hard=hard,
        )
        for i, leaf in enumerate(leaves)
    ]
    return jax.tree.unflatten(treedef, out)


def deterministic_masks(logits: Any, *, bias: float = DEFAULT_BIAS) -> Any:
    """Evaluation masks: ``1[l + bias >= 0]`` (the mode of the sampled mask), as float32.

    Not differentiable (zero gradient); use for evaluation and export.
    """
    return jax.tree.map(lambda l: (l + bias >= 0).astype(jnp.float32), logits)
