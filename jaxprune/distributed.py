"""Multi-host runs: start JAX's own distributed runtime on request, and feed it per-host batches.

Design note. jaxprune has no launcher of its own: every host runs the same command
(``jaxprune train CONFIG``; see ``launch/``) and ``maybe_initialize`` turns that into one JAX
program over all hosts' devices with ``jax.distributed.initialize``. It does so only when asked,
through environment variables (set per process by the launch scripts) or a config object:

===========================  ===================================================================
``JAXPRUNE_DISTRIBUTED``     ``auto``: ``jax.distributed.initialize()`` without arguments, which
                             detects Cloud TPU pods, SLURM, Open MPI and k8s; ``off`` (default
                             when no coordinator is set) / ``on`` (= explicit, needs the three
                             variables below).
``JAXPRUNE_COORDINATOR``     ``host:port`` of process 0's coordinator service (setting it alone
                             implies ``on``).
``JAXPRUNE_NUM_PROCESSES``   total number of processes.
``JAXPRUNE_PROCESS_ID``      this process's id in ``[0, num_processes)``.
===========================  ===================================================================

After that, a ``jax.sharding.Mesh`` over ``jax.devices()`` spans every host, jitted steps run
SPMD across them, and orbax checkpoints (``jaxprune.checkpoint``) are written cooperatively
(each host saves its own shards; the primary host writes metadata). Data is the only thing a
host must do differently: ``host_batch_slice`` says which rows of the global batch this host
feeds, and ``global_batch_from_host`` assembles the global ``jax.Array`` from those rows.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import numpy as np

logger = logging.getLogger(__name__)

ENV_MODE = 'JAXPRUNE_DISTRIBUTED'
ENV_COORDINATOR = 'JAXPRUNE_COORDINATOR'
ENV_NUM_PROCESSES = 'JAXPRUNE_NUM_PROCESSES'
ENV_PROCESS_ID = 'JAXPRUNE_PROCESS_ID'
MODES = ('off', 'on', 'auto')
_FALSY = ('', '0', 'off', 'false', 'no', 'none')
_TRUTHY = ('1', 'on', 'true', 'yes', 'explicit')


class ProcessInfo(NamedTuple):
    """Where this process stands after ``maybe_initialize``.

    Attributes:
      process_index: this process's index (``jax.process_index()``; 0 when single-process).
      process_count: number of processes (``jax.process_count()``; 1 when single-process).
      distributed: whether JAX's distributed runtime is running.
    """

    process_index: int
    process_count: int
    distributed: bool


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Settings:
    mode: str = 'off'
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


def _as_int(name: str, value: Any) -> int | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        return int(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f'{name}={value!r} must be an integer, e.g. {name}=0') from e


def _mode(value: Any, *, has_coordinator: bool) -> str:
    v = str(value).strip().lower() if value is not None else ''
    if v == 'auto':
        return 'auto'
    if v in _TRUTHY:
        return 'on'
    if v in _FALSY:
        # An explicit coordinator asks for a distributed run even without the mode switch.
        return 'on' if has_coordinator and v == '' else 'off'
    raise ValueError(f'{ENV_MODE}={value!r} must be one of auto|on|off; use auto on TPU pods/SLURM')


def _from_mapping(env: Mapping[str, Any]) -> _Settings:
    coordinator = env.get(ENV_COORDINATOR) or None
    return _Settings(
        mode=_mode(env.get(ENV_MODE), has_coordinator=coordinator is not None),
        coordinator=coordinator,
        num_processes=_as_int(ENV_NUM_PROCESSES, env.get(ENV_NUM_PROCESSES)),
        process_id=_as_int(ENV_PROCESS_ID, env.get(ENV_PROCESS_ID)),
    )


def _from_config(cfg: Any) -> _Settings:
    # Duck-typed so that any config section works: ``cfg.distributed`` if present, else ``cfg``,
    # with optional fields ``mode``, ``coordinator``, ``num_processes``, ``process_id``.
    section = getattr(cfg, 'distributed', cfg)
    as_env = {
        ENV_MODE: getattr(section, 'mode', None),
        ENV_COORDINATOR: getattr(section, 'coordinator', None),
        ENV_NUM_PROCESSES: getattr(section, 'num_processes', None),
        ENV_PROCESS_ID: getattr(section, 'process_id', None),
    }
    # Per-process values cannot live in a yaml shared by all hosts: set env vars override it.
    for key in as_env:
        if os.environ.get(key):
            as_env[key] = os.environ[key]
    return _from_mapping(as_env)


def settings(cfg_or_env: Any = None) -> _Settings:
    """Parses the distributed settings (see the module docstring) without starting anything.

    Args:
      cfg_or_env: ``None`` (read ``os.environ``), a mapping of ``JAXPRUNE_*`` variables, or a
        config object with a ``distributed`` section (or the section itself) holding ``mode``,
        ``coordinator``, ``num_processes``, ``process_id``; set ``JAXPRUNE_*`` environment
        variables override a config object's fields.

    Returns:
      The parsed settings.

    Raises:
      ValueError: on an unknown mode, non-integer counts, or an explicit (``on``) mode missing
        one of coordinator / number of processes / process id, or an id out of range.
    """
    if cfg_or_env is None:
        s = _from_mapping(os.environ)
    elif isinstance(cfg_or_env, Mapping):
        s = _from_mapping(cfg_or_env)
    else:
        s = _from_config(cfg_or_env)
    if s.mode == 'on':
        missing = [name for name, v in ((ENV_COORDINATOR, s.coordinator),
                                        (ENV_NUM_PROCESSES, s.num_processes),
                                        (ENV_PROCESS_ID, s.process_id)) if v is None]
        if missing:
            raise ValueError(
                f'a distributed run needs {missing} set (e.g. {ENV_COORDINATOR}=10.0.0.1:1234 '
                f'{ENV_NUM_PROCESSES}=2 {ENV_PROCESS_ID}=0), or {ENV_MODE}=auto on TPU pods/SLURM')
        if ':' not in s.coordinator:
            raise ValueError(f'{ENV_COORDINATOR}={s.coordinator!r} must be host:port, e.g. '
                             '127.0.0.1:1234')
        if s.num_processes < 1 or not 0 <= s.process_id < s.num_processes:
            raise ValueError(
                f'{ENV_PROCESS_ID}={s.process_id} must be in [0, {ENV_NUM_PROCESSES}='
                f'{s.num_processes}); number processes 0..N-1 (e.g. from SLURM_PROCID)')
    return s


def maybe_initialize(cfg_or_env: Any = None) -> ProcessInfo:
    """Starts ``jax.distributed`` when the config or environment asks for it; else does nothing.

    Call it first, before anything else touches JAX (``jax.devices()``, any computation): JAX
    can only join a distributed runtime before its backends start. It is idempotent: when the
    runtime is already up it only reports where this process stands. With the mode ``off`` it
    does not touch JAX at all (so JAX flags may still be set afterwards).

    Args:
      cfg_or_env: see ``settings``: ``None`` (environment), a mapping, or a config object.

    Returns:
      A ``ProcessInfo`` (``process_index``, ``process_count``, ``distributed``). Logged at INFO.

    Raises:
      ValueError: for invalid settings (see ``settings``), or ``auto`` outside a cluster that
        JAX can detect.
      RuntimeError: when a distributed run is requested but JAX's backends already started;
        move the call to the top of the program.

    Example:
      >>> maybe_initialize({'JAXPRUNE_DISTRIBUTED': 'off'})
      ProcessInfo(process_index=0, process_count=1, distributed=False)
    """
    from jax._src import xla_bridge  # no public API tells whether backends started

    if jax.distributed.is_initialized():
        return _info(log=False)
    s = settings(cfg_or_env)
    if s.mode == 'off':
        return ProcessInfo(0, 1, False)
    if xla_bridge.backends_are_initialized():
        raise RuntimeError(
            f'{ENV_MODE}={s.mode!r} asks for a distributed run but JAX is already initialised in '
            'this process; call jaxprune.distributed.maybe_initialize() before any other JAX '
            'call (jax.devices(), device_put, jit, ...)')
    if s.mode == 'auto':
        logger.info('jax.distributed.initialize() with cluster auto-detection')
        try:
            jax.distributed.initialize()
        except ValueError as e:  # no cluster found: JAX only says coordinator_address is unset
            raise ValueError(
                f'{ENV_MODE}=auto found no cluster (JAX detects Cloud TPU pods, SLURM, Open MPI '
                f'and k8s): {e}; outside those set {ENV_COORDINATOR}, {ENV_NUM_PROCESSES} and '
                f'{ENV_PROCESS_ID} instead') from e
    else:
        logger.info('jax.distributed.initialize(coordinator=%s, num_processes=%d, process_id=%d)',
                    s.coordinator, s.num_processes, s.process_id)
        jax.distributed.initialize(
            coordinator_address=s.coordinator, num_processes=s.num_processes,
            process_id=s.process_id)
    return _info(log=True)


def _info(*, log: bool) -> ProcessInfo:
    info = ProcessInfo(jax.process_index(), jax.process_count(), jax.distributed.is_initialized())
    if log:
        logger.info('process %d of %d: %d local / %d global devices (%s)', info.process_index,
                    info.process_count, jax.local_device_count(), jax.device_count(),
                    jax.default_backend())
    return info


def host_batch_slice(
    global_batch_size: int, *, sharding: jax.sharding.Sharding | None = None
) -> tuple[int, int]:
    """The rows ``[start, stop)`` of the global batch that this host must load.

    Without ``sharding`` the batch is split evenly in process order:
    :math:`[p B / P, (p + 1) B / P)` for process :math:`p` of :math:`P`. With a batch
    ``sharding`` (e.g. ``sharding.batch_sharding(mesh)``) the rows are the ones this process's
    devices hold, which is also right when the batch is replicated across hosts (then every host
    loads all rows) or when devices are not ordered by process.

    Args:
      global_batch_size: rows of the global batch (the config's ``data.batch_size``).
      sharding: optional sharding of the batch's leading dimension.

    Returns:
      ``(start, stop)``; slice every host-side batch array with ``x[start:stop]``.

    Raises:
      ValueError: if the size is not divisible by the process count (without ``sharding``) or
        this process's rows are not one contiguous range (with it).

    Example:
      >>> host_batch_slice(8)  # single process
      (0, 8)
    """
    if global_batch_size < 1:
        raise ValueError(f'{global_batch_size=} must be >= 1')
    if sharding is None:
        p, n = jax.process_index(), jax.process_count()
        if global_batch_size % n:
            raise ValueError(
                f'{global_batch_size=} must be divisible by the process count {n}; pick a '
                f'multiple of {n}')
        per = global_batch_size // n
        return p * per, (p + 1) * per
    index_map = sharding.addressable_devices_indices_map((global_batch_size,))
    ranges = sorted({idx[0].indices(global_batch_size)[:2] for idx in index_map.values()})
    start, stop = ranges[0]
    for lo, hi in ranges[1:]:
        if lo > stop:
            raise ValueError(
                f'this process holds non-contiguous batch rows {ranges} of {global_batch_size=};'
                ' build the mesh from jax.devices() (process-ordered) or shard the batch over '
                'the leading mesh axes')
        stop = max(stop, hi)
    return start, stop


def global_batch_from_host(
    local_batch: Any,
    mesh: jax.sharding.Mesh,
    sharding: jax.sharding.Sharding | None = None,
    *,
    global_batch_size: int | None = None,
) -> Any:
    """Assembles global ``jax.Array`` batches from this host's rows.

    Each host passes the rows ``host_batch_slice`` gave it; the result is one global array per
    leaf, sharded over every host's devices (``jax.make_array_from_process_local_data``). In a
    single process it is a plain sharded ``device_put``.

    Args:
      local_batch: pytree (e.g. ``{'input_ids': int32[b, T], ...}``) of host arrays, leading
        dimension = this host's rows.
      mesh: the mesh; used when ``sharding`` is omitted.
      sharding: sharding of the global batch; defaults to ``jaxprune.sharding.batch_sharding``.
      global_batch_size: the global leading dimension; inferred from the sharding when omitted
        (hosts hold disjoint, equal parts). Pass it when the batch is replicated across hosts.

    Returns:
      A pytree like ``local_batch`` of global ``jax.Array`` s.
    """
    if sharding is None:
        from jaxprune import sharding as sharding_lib

        sharding = sharding_lib.batch_sharding(mesh, batch_size=global_batch_size)

    def one(x):
        x = np.asarray(x)
        shape = None if global_batch_size is None else (global_batch_size, *x.shape[1:])
        return jax.make_array_from_process_local_data(sharding, x, shape)

    return jax.tree.map(one, local_batch)
