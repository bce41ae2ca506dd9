"""Checkpoints: atomic orbax saves of the train state, validated restores with readable diffs.

Design note. One ``Checkpointer`` per run directory wraps an orbax ``CheckpointManager`` with two
items per step: ``state`` (a pytree of arrays: params, optimizer state with its ``masks``, PRNG
key data) and ``meta`` (JSON: data position, config, metrics). Orbax writes each step into a
temporary directory and renames it when complete, so a step on disk is either whole or absent.
Three guards sit on top: ``save`` refuses states with NaN/Inf (a NaN is never checkpointed);
``restore`` compares the checkpoint's metadata with an abstract target and reports a readable
``tree_diff`` instead of an orbax traceback; unreadable steps raise ``CorruptCheckpointError``
naming the directory and the previous step, and ``restore_latest_valid`` falls back to it
without deleting anything.

Resume sketch::

  ckpt = checkpoint.Checkpointer(run_dir / 'ckpt', max_to_keep=3)
  target = sharding.abstract_like(jax.eval_shape(make_state), state_shardings)
  found = ckpt.restore_latest_valid(target=target)
  if found is not None:
      step, state, meta = found  # meta['batches_seen'] -> data iterator ``start=``
  ...
  ckpt.save(step, state, {'batches_seen': n, 'config': cfg, 'metrics': m})
"""

from jaxprune.checkpoint._checkpointer import (
    Checkpointer,
    CorruptCheckpointError,
    NonFiniteStateError,
    StateMismatchError,
    as_directory,
)
from jaxprune.checkpoint._diff import tree_diff

__all__ = [
    'Checkpointer', 'CorruptCheckpointError', 'NonFiniteStateError', 'StateMismatchError',
    'as_directory', 'tree_diff',
]
