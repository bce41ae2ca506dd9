"""The hook through which pruning methods plug into the training loop.

A ``Method`` contributes these things and nothing else:

* ``transforms(trainable)``: optax pieces inserted into the optimizer chain between gradient
  clipping and adamw (e.g. a ``sparsify`` wrapper that owns ``masks`` in its state). The loop reads
  masks from the optimizer state with ``optax.tree.get(opt_state, 'masks')`` and feeds them to the
  model, so masks are checkpointed and sharded with the optimizer state.
* ``loss_extras(trainable, out, batch)``: extra loss terms inside ``jit`` (pure; returns a scalar
  and a dict of scalars to log), e.g. a distillation or regulariser term.
* ``prepare(trainable, rest, masks)`` (optional, inside ``jit``): maps the parameters and the
  optimizer-state ``masks`` to what the forward sees, returning ``(trainable, rest, model_masks)``.
  Structured methods pass masks through as ``model(..., masks=...)``; AST instead applies its
  weight masks to the kernels with a straight-through estimator and returns ``model_masks=None``.
* ``value_and_grad(fn, trainable, rest, batch, masks, rng, *, graphdef)`` (optional, inside
  ``jit``; ``graphdef`` is the trainable model's, for methods that run extra forwards, e.g. a
  teacher): computes ``((loss, aux), grads, update_kwargs)``; ``update_kwargs`` reach
  ``tx.update`` as extra args (APT passes ``salience=`` gathered from activation taps in the same
  backward pass). The default is ``jax.value_and_grad(fn, has_aux=True)`` with no extra args.
* ``prepare_model(model)`` (optional, outside ``jit``, once per ``setup``): may add parameters
  to the freshly built NNX model before it is split and the optimizer is initialised (AST-Boosted
  adds its SLoRB branch); returns the model. It also runs before a checkpoint restore, so the
  restore target has the added parameters.
* ``on_step_end(step, state)``: runs outside ``jit`` after every step with a host-side
  ``LoopState``; this is where shape-changing surgery happens (return a new state with a new
  graphdef; the loop re-jits when the graphdef changes).
* ``on_eval(step, metrics, state)`` (optional, outside ``jit``): runs after each periodic
  validation during training (``train.eval_every``) with its metrics (``loss``, ``accuracy``,
  ...) and the ``LoopState``; returns a ``LoopState`` with unchanged shapes (APT refreshes its
  teacher snapshot here when the metric improves). The default returns the state unchanged.
* ``checkpoint_meta()`` and ``restore(meta, state)`` (optional, outside ``jit``): resumable host
  state. Every checkpoint stores ``checkpoint_meta()`` (a JSON dict) as ``meta['method']``. On
  resume the loop calls ``restore(meta['method'], initial)`` with the freshly built ``LoopState``
  *before* reading the arrays: the method resets its host-side state from the meta and returns a
  ``LoopState`` whose ``graphdef``, ``rest`` and ``state.trainable`` (abstract leaves are fine)
  have the checkpoint's shapes; the loop derives the optimizer-state target from
  ``tx.init(trainable)``, reshards and restores. A method that compacts the model records what it
  needs to rebuild it (e.g. the surgeries done) here. ``restore`` may be called again with an older
  step's meta when a newer step is corrupt, always with the same ``initial`` state, so it must
  not depend on earlier calls. ``meta`` is None for checkpoints written without it. The defaults
  store ``{}`` and return ``initial`` unchanged.

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
    """What a pruning method provides to the training loop (see the module docstring).

    ``prepare``, ``value_and_grad``, ``prepare_model``, ``on_eval``, ``checkpoint_meta`` and
    ``restore`` are optional; the loop uses ``default_prepare``, ``default_value_and_grad``, the
    identity, ``default_on_eval``, ``default_checkpoint_meta`` and ``default_restore`` for a
    method that does not define them.
    """

    def transforms(self, trainable: optax.Params) -> tuple[optax.GradientTransformation, ...]:
        ...

    def loss_extras(
        self, trainable: optax.Params, out: jax.Array, batch: dict[str, jax.Array]
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        ...

    def on_step_end(self, step: int, state: LoopState) -> LoopState:
        ...


def default_prepare(trainable: Any, rest: Any, masks: Any) -> tuple[Any, Any, Any]:
    """Optimizer-state masks are the model's activation masks (structured methods)."""
    return trainable, rest, masks


def default_value_and_grad(fn, trainable, rest, batch, masks, rng, *, graphdef=None):
    """Plain ``jax.value_and_grad`` over ``trainable``; no extra args for ``tx.update``."""
    del graphdef
    (loss, aux), grads = jax.value_and_grad(fn, has_aux=True)(trainable, rest, batch, masks, rng)
    return (loss, aux), grads, {}


def prepare_model_fn(method: Any) -> Callable[[nnx.Module], nnx.Module]:
    """The method's ``prepare_model`` hook, or the identity."""
    return getattr(method, 'prepare_model', lambda model: model)


def default_on_eval(step: int, metrics: dict[str, float], state: LoopState) -> LoopState:
    """Nothing to do after a periodic validation."""
    del step, metrics
    return state


def on_eval_fn(method: Any) -> Callable[[int, dict[str, float], LoopState], LoopState]:
    """The method's ``on_eval`` hook, or the default."""
    return getattr(method, 'on_eval', default_on_eval)


def default_checkpoint_meta() -> dict[str, Any]:
    """No host-side state to save."""
    return {}


def default_restore(meta: dict[str, Any] | None, state: LoopState) -> LoopState:
    """Shapes never change: the freshly built state is the restore target."""
    del meta
    return state


def prepare_fn(method: Any) -> Callable[[Any, Any, Any], tuple[Any, Any, Any]]:
    """The method's ``prepare`` hook, or the default."""
    return getattr(method, 'prepare', default_prepare)


def value_and_grad_fn(method: Any) -> Callable[..., Any]:
    """The method's ``value_and_grad`` hook, or the default."""
    return getattr(method, 'value_and_grad', default_value_and_grad)


def checkpoint_meta_fn(method: Any) -> Callable[[], dict[str, Any]]:
    """The method's ``checkpoint_meta`` hook, or the default."""
    return getattr(method, 'checkpoint_meta', default_checkpoint_meta)


def restore_fn(method: Any) -> Callable[[dict[str, Any] | None, LoopState], LoopState]:
    """The method's ``restore`` hook, or the default."""
    return getattr(method, 'restore', default_restore)


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


_DRIVERS: dict[str, Callable[..., Any]] = {}


def register_driver(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Registers ``driver(run_cfg, *, progress=None) -> final eval dict`` for ``prune.method``.

    For methods whose training does not fit the single optimizer chain of the default loop
    (e.g. ATP alternates two optimizers): ``jaxprune.train.train`` (and so ``jaxprune train``)
    hands such configs to their driver.
    """

    def deco(driver):
        _DRIVERS[name] = driver
        return driver

    return deco


def driver_for(name: str) -> Callable[..., Any] | None:
    """The registered driver of method ``name``, or None (use the default loop)."""
    return _DRIVERS.get(name)


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
