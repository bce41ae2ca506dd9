"""Atomic, validated checkpoints of a training state on top of an orbax ``CheckpointManager``."""

import json
import logging
import operator
import pathlib
import time
from collections.abc import Callable
from typing import Any, Self

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec

from jaxprune.checkpoint import _diff

logger = logging.getLogger(__name__)

_STATE = 'state'
_META = 'meta'


class NonFiniteStateError(ValueError):
    """Raised by ``Checkpointer.save`` when a float leaf holds NaN or Inf (nothing is written)."""


class CorruptCheckpointError(RuntimeError):
    """Raised when a checkpoint step exists but cannot be read (truncated / missing files)."""


class StateMismatchError(ValueError):
    """Raised when a readable checkpoint's tree differs from the restore target (another model,
    optimizer or method settings); the message lists the differences."""


def as_directory(directory: str | pathlib.Path | epath.Path) -> pathlib.Path | epath.Path:
    """A checkpoint directory as a path object: URLs stay URLs, local paths become absolute.

    ``gs://bucket/run`` (or any ``scheme://``) becomes an ``etils.epath.Path``, which orbax reads
    and writes natively, so a TPU pod can checkpoint straight to a bucket every host sees; a local
    path is ``expanduser``-ed and made absolute. (``pathlib.Path('gs://b/x')`` would silently turn
    the URL into a relative local folder ``gs:/b/x``.)

      >>> str(as_directory('gs://bucket/run/checkpoints'))
      'gs://bucket/run/checkpoints'
      >>> as_directory('~/ckpt').is_absolute()
      True
    """
    if isinstance(directory, epath.Path) and not isinstance(directory, pathlib.Path):
        return directory
    text = str(directory)
    if '://' in text:
        return epath.Path(text)
    return pathlib.Path(text).expanduser().absolute()


def _is_key(x: Any) -> bool:
    return jax.dtypes.issubdtype(getattr(x, 'dtype', None), jax.dtypes.prng_key)


def _unwrap_keys(state: Any) -> Any:
    # Orbax stores plain arrays: typed PRNG keys are saved as their uint32 key data and rewrapped
    # on restore with the impl recorded in the target's dtype.
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, state)


def _storage_target(path, x: Any) -> jax.ShapeDtypeStruct:
    if not (hasattr(x, 'shape') and hasattr(x, 'dtype')):
        raise ValueError(
            f'restore target leaf {_diff._key_str(path)!r} is {type(x).__name__}, not an array; '
            'build the target with jax.eval_shape(...) or jax.ShapeDtypeStruct leaves'
        )
    sharding = getattr(x, 'sharding', None)
    if not _is_key(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
    if isinstance(sharding, NamedSharding):
        extra = (None,) * (len(data.shape) - len(x.shape))
        sharding = NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec, *extra))
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)


def _rewrap(target: Any, restored: Any) -> Any:
    # ``dtype._impl`` is the only way to get the PRNG impl of an abstract key (key_impl needs an
    # array); it accepts custom impls as well as the named ones.
    def one(t, r):
        return jax.random.wrap_key_data(r, impl=t.dtype._impl) if _is_key(t) else r

    return jax.tree.map(one, target, restored)


@jax.jit
def _all_finite(xs: list[jax.Array]) -> list[jax.Array]:
    # Jitted once per state structure (cached across saves); one small reduction per leaf.
    return [jnp.all(jnp.isfinite(x)) for x in xs]


def _nonfinite_paths(state: Any) -> list[str]:
    leaves = [
        (path, x)
        for path, x in jax.tree_util.tree_flatten_with_path(state)[0]
        if hasattr(x, 'dtype') and jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    if not leaves:
        return []
    flags = jax.device_get(_all_finite([x for _, x in leaves]))
    return [_diff._key_str(path) for (path, _), ok in zip(leaves, flags) if not ok]


def _check_json(meta: Any) -> None:
    try:
        json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f'{meta=} must be JSON-serialisable (dict of str/int/float/bool/list, finite floats); '
            f'convert numpy/jax scalars with float()/int(): {e}'
        ) from e


class Checkpointer:
    """Saves and restores ``(state, meta)`` pairs per step; keeps the last ``max_to_keep``.

    ``state`` is any pytree of arrays: params, optimizer state (masks included), PRNG keys
    (typed keys are stored as ``jax.random.key_data`` and rewrapped). ``meta`` is a JSON dict:
    data position, config, metrics. Each step is written by orbax into a temporary directory
    that is renamed when complete, so a crash never leaves a half-written step that looks
    valid. ``save`` waits for completion unless ``async_save=True``.

    Restoring needs an abstract ``target`` (a tree of ``jax.ShapeDtypeStruct`` with shardings,
    e.g. ``sharding.abstract_like(jax.eval_shape(init), shardings)``): without it orbax returns
    optax ``NamedTuple`` states as plain lists/dicts, and arrays land on default devices. The
    saved tree is checked against the target first; a mismatch raises a ``ValueError`` listing
    the differences (``tree_diff``) instead of orbax's low-level error.

    Args:
      directory: checkpoint root; steps are its integer-named subdirectories. Created if absent.
      max_to_keep: number of most recent steps kept; older ones are deleted after a save.
        ``None`` keeps all.
      save_interval_steps: ``save`` writes only when ``step % save_interval_steps == 0`` and
        returns ``False`` otherwise.
      async_save: write in a background thread; call ``wait()`` (or ``close()``) before
        reading the files or exiting.

    Example:
      >>> import shutil, tempfile
      >>> run_dir = tempfile.mkdtemp()
      >>> ckpt = Checkpointer(run_dir, max_to_keep=2)
      >>> state = {'params': {'w': jnp.ones((2, 3))}, 'rng': jax.random.key(0)}
      >>> ckpt.save(100, state, {'batches_seen': 100})
      True
      >>> target = jax.eval_shape(lambda: state)  # with shardings: sharding.abstract_like
      >>> restored, meta = ckpt.restore(target=target)  # latest step
      >>> meta
      {'batches_seen': 100}
      >>> step, restored, meta = ckpt.restore_latest_valid(target=target)  # None if empty
      >>> step
      100
      >>> ckpt.close(); shutil.rmtree(run_dir)
    """

    def __init__(
        self,
        directory: str | pathlib.Path | epath.Path,
        *,
        max_to_keep: int | None = 3,
        save_interval_steps: int = 1,
        async_save: bool = False,
    ):
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f'{max_to_keep=} must be >= 1 (or None to keep every step)')
        if save_interval_steps < 1:
            raise ValueError(f'{save_interval_steps=} must be >= 1')
        self.directory = as_directory(directory)
        self._async = async_save
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            save_interval_steps=save_interval_steps,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                _STATE: ocp.StandardCheckpointHandler(),
                _META: ocp.JsonCheckpointHandler(),
            },
        )

    # -- queries --------------------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        """Steps present on disk, ascending (re-read from the directory)."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest step on disk, or ``None`` if there is none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    # -- save -----------------------------------------------------------------------------------

    def save(self, step: int, state: Any, meta: dict[str, Any] | None = None) -> bool:
        """Writes ``state`` and ``meta`` as checkpoint ``step``.

        Args:
          step: the training step (non-negative int, larger than every saved step).
          state: pytree of arrays (params, opt state incl. masks, PRNG keys, ...). Use arrays,
            not Python scalars, for counters: a restore target needs ``shape``/``dtype``.
          meta: JSON-serialisable dict (data position, config, metrics); ``{}`` if omitted.

        Returns:
          ``True`` if the step was written, ``False`` if skipped by ``save_interval_steps``.

        Raises:
          NonFiniteStateError: (a ``ValueError``) if a float leaf contains NaN/Inf; names every
            such leaf. Nothing is written, so a NaN is never checkpointed.
          ValueError: if ``step`` is negative or already on disk, or ``meta`` is not JSON.
        """
        try:
            if isinstance(step, bool):
                raise TypeError
            step = operator.index(step)  # accepts numpy / jax integer scalars
        except TypeError as e:
            raise ValueError(f'{step=} must be a non-negative int') from e
        if step < 0:
            raise ValueError(f'{step=} must be a non-negative int')
        meta = {} if meta is None else meta
        _check_json(meta)
        if step in self.all_steps():
            raise ValueError(
                f'{step=} already exists in {self.directory}; resume from it or save a later step'
            )
        if not self._manager.should_save(step):
            return False
        bad = _nonfinite_paths(state)
        if bad:
            msg = (
                f'refusing to checkpoint {step=} in {self.directory}: non-finite values (NaN/Inf) '
                f'in {bad}; fix the divergence (lower the learning rate, guard the step with '
                'optax.apply_if_finite) and resume from the previous checkpoint'
            )
            logger.error(msg)
            raise NonFiniteStateError(msg)
        args = ocp.args.Composite(
            **{_STATE: ocp.args.StandardSave(_unwrap_keys(state)), _META: ocp.args.JsonSave(meta)}
        )
        saved = self._manager.save(step, args=args)
        if saved and not self._async:
            self._manager.wait_until_finished()
        if saved:
            logger.info('saved checkpoint step=%d in %s', step, self.directory)
        return bool(saved)

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases orbax resources."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- restore --------------------------------------------------------------------------------

    def _corrupt(self, step: int, reason: str) -> CorruptCheckpointError:
        older = [s for s in self.all_steps() if s < step]
        hint = (
            f'restore step={older[-1]} instead (or call restore_latest_valid)'
            if older
            else 'no older step exists; start from scratch'
        )
        return CorruptCheckpointError(
            f'checkpoint {step=} in {self.directory / str(step)} is unreadable ({reason}); {hint}'
        )

    def read_meta(self, step: int) -> dict[str, Any]:
        """The JSON meta of checkpoint ``step`` alone (no arrays are read).

        Raises:
          CorruptCheckpointError: if the meta cannot be read.
        """
        args = ocp.args.Composite(**{_META: ocp.args.JsonRestore()})
        try:
            meta = self._manager.restore(step, args=args)[_META]
        except Exception as e:  # orbax raises many types for unreadable/missing JSON
            raise self._corrupt(step, f'meta: {type(e).__name__}: {str(e)[:300]}') from e
        if meta is None:
            raise self._corrupt(step, 'meta JSON is missing')
        return meta

    def restore(
        self, step: int | None = None, *, target: Any | Callable[[dict[str, Any]], Any]
    ) -> tuple[Any, dict[str, Any]]:
        """Restores checkpoint ``step`` (default: latest) into the structure of ``target``.

        Args:
          step: the step to restore; ``None`` = the newest on disk.
          target: tree with the saved state's structure whose leaves have ``shape``, ``dtype``
            and optionally ``sharding`` (``jax.ShapeDtypeStruct`` or arrays). Restored arrays get
            the target's shardings; typed PRNG-key leaves come back as keys. Or a function
            ``target(meta) -> tree`` called with the step's meta before the state is read, for
            states whose shapes are recorded in the meta (e.g. a model compacted by pruning).

        Returns:
          ``(state, meta)``.

        Raises:
          FileNotFoundError: if the directory has no checkpoint or ``step`` is not on disk.
          StateMismatchError: (a ``ValueError``) if the saved tree differs from ``target``; the
            message lists missing and unexpected key paths and shape/dtype differences.
          CorruptCheckpointError: if the step's files are truncated or missing; the message
            names the directory and the previous step to fall back to.
        """
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(
                    f'no checkpoint in {self.directory}; check the path or start from scratch'
                )
            step = steps[-1]
        if step not in steps:
            raise FileNotFoundError(
                f'{step=} not found in {self.directory}; available steps: {steps}'
            )
        if callable(target):
            target = target(self.read_meta(step))
        storage_target = jax.tree_util.tree_map_with_path(_storage_target, target)
        try:
            found = self._manager.item_metadata(step)[_STATE]
        except Exception as e:  # orbax raises many types for unreadable metadata
            raise self._corrupt(step, f'metadata: {type(e).__name__}: {e}') from e
        if found is None:
            raise self._corrupt(step, 'metadata of the state is missing')
        found = getattr(found, 'tree', found)
        diff = _diff.tree_diff(storage_target, found)
        if diff:
            lines = '\n  '.join(diff)
            raise StateMismatchError(
                f'checkpoint {step=} in {self.directory} does not match the restore target '
                f'({len(diff)} differences; expected = target, found = checkpoint):\n  {lines}\n'
                'Build the target from the same model config/optimizer as the saved run.'
            )
        args = ocp.args.Composite(
            **{_STATE: ocp.args.StandardRestore(storage_target), _META: ocp.args.JsonRestore()}
        )
        try:
            out = self._manager.restore(step, args=args)
        except Exception as e:  # tensorstore / json errors for truncated or missing files
            raise self._corrupt(step, f'{type(e).__name__}: {str(e)[:300]}') from e
        meta = out[_META]
        if meta is None:
            raise self._corrupt(step, 'meta JSON is missing')
        return _rewrap(target, out[_STATE]), meta

    def restore_latest_valid(
        self, *, target: Any | Callable[[dict[str, Any]], Any], quarantine: bool = True
    ) -> tuple[int, Any, dict[str, Any]] | None:
        """Restores the newest step that reads cleanly, falling back to older ones.

        Corrupt steps are never deleted. With ``quarantine=True`` each corrupt step newer than
        the restored one is moved to ``<directory>/corrupt/<step>-<unix time>`` (and logged), so
        that the resumed run can save that step number again.

        Args:
          target: as in ``restore``; a function is called again with each older step's meta.
          quarantine: move corrupt newer steps aside (default) instead of leaving them in place.

        Returns:
          ``(step, state, meta)``, or ``None`` if the directory holds no checkpoint.

        Raises:
          ValueError: on a structure mismatch, or raised by a ``target`` function (these are
            configuration errors, not corruption, so no fallback is attempted).
          CorruptCheckpointError: if every step is corrupt.
        """
        steps = self.all_steps()
        if not steps:
            return None
        skipped = []
        for step in reversed(steps):
            try:
                state, meta = self.restore(step, target=target)
            except CorruptCheckpointError as e:
                logger.warning('%s; trying an older step', e)
                skipped.append(step)
                continue
            if skipped:
                logger.warning(
                    'restored step=%d from %s after skipping corrupt steps %s',
                    step,
                    self.directory,
                    skipped,
                )
                if quarantine:
                    self._quarantine(skipped)
            return step, state, meta
        raise CorruptCheckpointError(
            f'every checkpoint in {self.directory} is unreadable (steps {steps}); '
            'start from scratch or repair the files'
        )

    def _quarantine(self, steps: list[int]) -> None:
        dest = self.directory / 'corrupt'
        dest.mkdir(exist_ok=True)
        for step in steps:
            target = dest / f'{step}-{int(time.time())}'
            (self.directory / str(step)).rename(target)
            logger.warning('moved corrupt checkpoint step=%d to %s', step, target)
        self._manager.reload()
