"""Functional train and eval steps (flax gemma style).

The model is split once, ``graphdef, trainable, rest = nnx.split(model, trainable_filter, ...)``;
the step differentiates a pure ``loss_fn(trainable, rest, batch, masks, rng)`` with
``jax.value_and_grad`` and applies an optax update. Masks are read from the optimizer state
(``optax.tree.get(opt_state, 'masks')``, None when no transform keeps them) and passed to the
model as ``model(..., masks=masks)``.

A step whose loss or gradients are non-finite is skipped: parameters and optimizer state stay
unchanged and ``TrainState.skipped`` counts it, so a NaN never reaches a checkpoint.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxprune.train import _method

CLASSIFICATION = 'classification'
CAUSAL_LM = 'causal_lm'


class TrainState(NamedTuple):
    """Everything a step updates (donated to the jitted step).

    Attributes:
      step: int32[] number of optimizer steps attempted (skipped ones included).
      trainable: pytree of trained parameters (``nnx.State``).
      opt_state: optax state for ``trainable``.
      rng: PRNG key, split once per step.
      skipped: int32[] number of steps skipped because of a non-finite loss or gradient.
    """

    step: jax.Array
    trainable: Any
    opt_state: optax.OptState
    rng: jax.Array
    skipped: jax.Array


def loss_sums(out: jax.Array, labels: jax.Array, *, task: str) -> dict[str, jax.Array]:
    """Summed cross-entropy, correct predictions and counts over the valid labels.

    Classification: ``out`` is ``[B, L]`` logits, ``labels`` ``[B]``. Causal LM: ``out`` is
    ``[B, T, V]``, ``labels`` ``[B, T]`` already shifted by the data pipeline. Negative labels
    (padding rows or tokens) are ignored, which makes summed metrics exact over ragged splits.

    Returns:
      ``{'loss_sum', 'correct', 'count'}`` float32 scalars.
    """
    if task not in (CLASSIFICATION, CAUSAL_LM):
        raise ValueError(f'{task=} must be {CLASSIFICATION!r} or {CAUSAL_LM!r}')
    valid = labels >= 0
    safe = jnp.where(valid, labels, 0)
    logits = out.astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, safe)
    correct = (jnp.argmax(logits, axis=-1) == safe) & valid
    return {
        'loss_sum': jnp.sum(jnp.where(valid, ce, 0.0)),
        'correct': jnp.sum(correct.astype(jnp.float32)),
        'count': jnp.sum(valid.astype(jnp.float32)),
    }


def forward(model: nnx.Module, batch: dict[str, jax.Array], masks: Any) -> jax.Array:
    """Calls the model on a batch dict (``attention_mask`` passed when present)."""
    kwargs = {} if masks is None else {'masks': masks}
    if 'attention_mask' in batch:
        return model(batch['input_ids'], batch['attention_mask'], **kwargs)
    return model(batch['input_ids'], **kwargs)


def get_masks(opt_state: optax.OptState) -> Any:
    """The ``masks`` field of the optimizer state, or None when no transform keeps masks."""
    return optax.tree.get(opt_state, 'masks')


def loss_fn(
    trainable: Any,
    rest: Any,
    batch: dict[str, jax.Array],
    masks: Any,
    rng: jax.Array,
    *,
    graphdef: nnx.GraphDef,
    task: str,
    method: _method.Method,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean token/example cross-entropy plus the method's extra terms."""
    del rng  # The models are deterministic (no dropout); kept for methods that sample.
    fwd_trainable, fwd_rest, model_masks = _method.prepare_fn(method)(trainable, rest, masks)
    model = nnx.merge(graphdef, fwd_trainable, fwd_rest)
    out = forward(model, batch, model_masks)
    sums = loss_sums(out, batch['labels'], task=task)
    loss = sums['loss_sum'] / jnp.maximum(sums['count'], 1.0)
    extra, extra_logs = method.loss_extras(trainable, out, batch)
    return loss + extra, {**sums, 'ce': loss, **extra_logs}


def _all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def train_step(
    state: TrainState,
    rest: Any,
    batch: dict[str, jax.Array],
    *,
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    task: str,
    method: _method.Method,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step; a non-finite loss or gradient leaves the state unchanged.

    Returns:
      ``(new_state, metrics)`` where metrics hold ``loss`` (total), ``ce``, ``accuracy``,
      ``grad_norm``, ``count`` and ``nonfinite`` (1.0 when the step was skipped).
    """
    rng, step_rng = jax.random.split(state.rng)
    masks = get_masks(state.opt_state)
    fn = functools.partial(loss_fn, graphdef=graphdef, task=task, method=method)
    (loss, aux), grads, update_kwargs = _method.value_and_grad_fn(method)(
        fn, state.trainable, rest, batch, masks, step_rng, graphdef=graphdef)
    updates, new_opt = tx.update(grads, state.opt_state, state.trainable, **update_kwargs)
    new_params = optax.apply_updates(state.trainable, updates)
    ok = jnp.isfinite(loss) & _all_finite(grads)
    keep = functools.partial(jax.tree.map, lambda n, o: jnp.where(ok, n, o))
    new_state = TrainState(
        step=state.step + 1,
        trainable=keep(new_params, state.trainable),
        opt_state=keep(new_opt, state.opt_state),
        rng=rng,
        skipped=state.skipped + jnp.where(ok, 0, 1).astype(state.skipped.dtype),
    )
    metrics = {
        'loss': loss,
        'ce': aux['ce'],
        'accuracy': aux['correct'] / jnp.maximum(aux['count'], 1.0),
        'count': aux['count'],
        'grad_norm': optax.tree.norm(grads),
        'nonfinite': jnp.where(ok, 0.0, 1.0),
        **{k: v for k, v in aux.items() if k not in ('loss_sum', 'correct', 'count', 'ce')},
    }
    return new_state, metrics


def eval_step(
    trainable: Any,
    rest: Any,
    opt_state: optax.OptState,
    batch: dict[str, jax.Array],
    *,
    graphdef: nnx.GraphDef,
    task: str,
    method: _method.Method | None = None,
) -> dict[str, jax.Array]:
    """Summed eval metrics of one batch (``loss_sum``, ``correct``, ``count``)."""
    trainable, rest, model_masks = _method.prepare_fn(method)(trainable, rest, get_masks(opt_state))
    model = nnx.merge(graphdef, trainable, rest)
    out = forward(model, batch, model_masks)
    return loss_sums(out, batch['labels'], task=task)


def summarize(sums: dict[str, float], *, task: str) -> dict[str, float]:
    """Turns accumulated sums into ``loss``, ``accuracy`` (and ``perplexity`` for causal LM)."""
    count = max(float(sums['count']), 1.0)
    loss = float(sums['loss_sum']) / count
    out = {'loss': loss, 'accuracy': float(sums['correct']) / count, 'count': int(sums['count'])}
    if task == CAUSAL_LM:
        out['perplexity'] = float(jnp.exp(jnp.minimum(loss, 80.0)))
    return out


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    *,
    task: str,
    method: _method.Method,
    jit: bool = True,
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """``step(state, rest, batch) -> (state, metrics)``, jitted with the state donated."""
    fn = functools.partial(train_step, graphdef=graphdef, tx=tx, task=task, method=method)
    return jax.jit(fn, donate_argnums=(0,)) if jit else fn


def make_eval_step(
    graphdef: nnx.GraphDef, *, task: str, method: _method.Method | None = None, jit: bool = True
):
    """``eval(trainable, rest, opt_state, batch) -> sums``."""
    fn = functools.partial(eval_step, graphdef=graphdef, task=task, method=method)
    return jax.jit(fn) if jit else fn


def init_state(
    trainable: Any, tx: optax.GradientTransformation, *, seed: int
) -> TrainState:
    """A fresh ``TrainState`` at step 0."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        trainable=trainable,
        opt_state=tx.init(trainable),
        rng=jax.random.key_data(jax.random.key(seed)),
        skipped=jnp.zeros((), jnp.int32),
    )
