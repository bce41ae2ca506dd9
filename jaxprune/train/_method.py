"""The hook through which pruning methods plug into the training loop.

A ``Method`` contributes three things and nothing else:

* ``transforms(trainable)``: optax pieces inserted into the optimizer chain between gradient
  clipping and adamw (e.g. a ``sparsify`` wrapper that owns ``masks`` in its state). The loop reads
  masks from the optimizer state with ``optax.tree.get(opt_state, 'masks')`` and feeds them to the
  model, so masks are checkpointed and sharded with the optimizer state.
* ``loss_extras(trainable, out, batch)``: extra loss terms inside ``jit`` (pure; returns a scalar
  and a dict of scalars to log), e.g. a distillation or regulariser term.
* ``on_step_end(step, state)``: runs outside ``jit`` after every step with a host-side
  ``LoopState``; this is where shape-changing surgery happens (return a new state with a new
  graphdef; the loop re-jits when the graphdef changes).

``NoMethod`` (``prune.method: none``) is plain fine-tuning. Methods are built from their config
with ``register_method(name)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import optax
from flax import nnx


@dataclasses.dataclass
class LoopState:
    """Host-side view of the training state handed to ``Method.on_step_end``.

    Attributes:
      graphdef: the model's NNX graph definition (static structure).
      state: the jitted ``TrainState`` (step, trainable params, opt state, rng, skipped count).
      rest: the non-trained model state (frozen params and any other variables).
    """

    graphdef: nnx.GraphDef
    state: Any
    rest: Any


class Method(Protocol):
    """What a pruning method provides to the training loop (see the module docstring)."""

    def transforms(self, trainable: optax.Params) -> tuple[optax.GradientTransformation, ...]:
        ...

    def loss_extras(
        self, trainable: optax.Params, out: jax.Array, batch: dict[str, jax.Array]
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        ...

    def on_step_end(self, step: int, state: LoopState) -> LoopState:
        ...


@dataclasses.dataclass(frozen=True)
class NoMethod:
    """Plain fine-tuning: no extra transforms, no extra loss, no surgery."""

    def transforms(self, trainable):
        del trainable
        return ()

    def loss_extras(self, trainable, out, batch):
        del trainable, out, batch
        return jnp.zeros((), jnp.float32), {}

    def on_step_end(self, step, state):
        del step
        return state


_METHODS: dict[str, Callable[..., Method]] = {'none': lambda cfg, **kw: NoMethod()}


def register_method(name: str) -> Callable[[Callable[..., Method]], Callable[..., Method]]:
    """Registers ``builder(prune_cfg, *, run_cfg) -> Method`` for ``prune.method=name``."""

    def deco(builder):
        _METHODS[name] = builder
        return builder

    return deco


def build_method(prune_cfg: Any, *, run_cfg: Any = None) -> Method:
    """Builds the ``Method`` for ``prune_cfg.method``.

    Raises:
      ValueError: no builder is registered for the method.
    """
    name = prune_cfg.method
    if name not in _METHODS:
        raise ValueError(
            f'prune.method={name!r} has a config but no registered train Method; call '
            f'jaxprune.train.register_method({name!r}) (known: {sorted(_METHODS)})')
    return _METHODS[name](prune_cfg, run_cfg=run_cfg)
