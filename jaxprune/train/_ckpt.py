"""Checkpoint I/O of the loop: ``TrainState`` arrays plus a JSON ``meta`` record.

``meta`` holds ``step``, ``data_position`` (train batches consumed), ``skipped`` and the run config
dict. Saving refuses a non-finite state, so a NaN never reaches disk.
"""

from __future__ import annotations

import logging
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

logger = logging.getLogger(__name__)


def is_finite(tree: Any) -> bool:
    """Whether every floating leaf of ``tree`` is finite (host check)."""
    for x in jax.tree.leaves(tree):
        if jnp.issubdtype(x.dtype, jnp.floating) and not bool(jnp.all(jnp.isfinite(x))):
            return False
    return True


class Checkpoints:
    """Thin wrapper over an orbax ``CheckpointManager`` (atomic saves, keep the last ``keep``)."""

    def __init__(self, directory: str | pathlib.Path, *, keep: int):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = pathlib.Path(directory).resolve()
        self._mngr = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        )

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> bool:
        """Saves and waits; returns False (and logs) when ``state`` is not finite."""
        if not is_finite(state):
            logger.warning('step %d: state is not finite; checkpoint skipped', step)
            return False
        ocp = self._ocp
        self._mngr.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                    meta=ocp.args.JsonSave(meta)),
            force=True,
        )
        self._mngr.wait_until_finished()
        return True

    def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """Restores ``(state, meta)`` of ``step`` (default latest) against an abstract target."""
        ocp = self._ocp
        step = self._mngr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f'no checkpoint in {str(self.directory)!r}')
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype,
                                           sharding=getattr(x, 'sharding', None)), target)
        out = self._mngr.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                    meta=ocp.args.JsonRestore()),
        )
        return out['state'], dict(out['meta'])

    def close(self) -> None:
        self._mngr.close()
