"""Device meshes from a ``{axis_name: size}`` dict (``-1`` = all remaining devices)."""

import math
from collections.abc import Mapping, Sequence

import jax
from jax.sharding import AxisType

# The conventional axis order of jaxprune meshes: data parallel, fully sharded data parallel
# (parameters split along ``embed``) and tensor parallel (heads / mlp / vocab split).
DEFAULT_MESH_SHAPE = {'data': -1, 'fsdp': 1, 'tensor': 1}


def make_mesh(
    shape: Mapping[str, int] | None = None,
    *,
    devices: Sequence[jax.Device] | None = None,
) -> jax.sharding.Mesh:
    """Builds a mesh with ``Auto`` axis types from named axis sizes.

    One size may be ``-1``: it takes all devices left over by the other axes. ``Auto`` axes
    (rather than ``jax.make_mesh``'s default ``Explicit``) let ``jax.jit`` in/out shardings and
    ``with_sharding_constraint`` drive the partitioner, which is what the train step uses.

    Args:
      shape: ordered mapping ``axis name -> size``, e.g. ``{'data': -1, 'fsdp': 2, 'tensor': 1}``.
        Defaults to ``DEFAULT_MESH_SHAPE`` (pure data parallel over every device).
      devices: devices to lay out; defaults to ``jax.devices()``.

    Returns:
      A ``jax.sharding.Mesh`` whose axis sizes multiply to ``len(devices)``.

    Raises:
      ValueError: on an empty shape, sizes that are not positive (or ``-1``), more than one
        ``-1``, or sizes whose product does not divide / equal the device count.

    Example:
      >>> mesh = make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1})
      >>> mesh.axis_names
      ('data', 'fsdp', 'tensor')
    """
    shape = dict(DEFAULT_MESH_SHAPE if shape is None else shape)
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if not shape:
        raise ValueError(f'{shape=} is empty; pass e.g. {DEFAULT_MESH_SHAPE}')
    bad = {k: v for k, v in shape.items() if not isinstance(v, int) or (v < 1 and v != -1)}
    if bad:
        raise ValueError(f'mesh sizes {bad} must be positive ints or -1 (= fill); got {shape=}')
    fill = [k for k, v in shape.items() if v == -1]
    if len(fill) > 1:
        raise ValueError(f'{shape=} has -1 on {fill}; at most one axis may fill the devices')
    fixed = math.prod(v for v in shape.values() if v != -1)
    if fill:
        if n % fixed:
            raise ValueError(
                f'mesh {shape=}: the fixed axes need a multiple of {fixed} devices but there are '
                f'{n}; choose sizes whose product divides {n}'
            )
        shape[fill[0]] = n // fixed
    elif fixed != n:
        raise ValueError(
            f'mesh {shape=} uses {fixed} devices but there are {n}; make the sizes multiply to '
            f'{n} or set one axis to -1'
        )
    names = tuple(shape)
    return jax.make_mesh(
        tuple(shape.values()),
        names,
        axis_types=(AxisType.Auto,) * len(names),
        devices=devices,
    )
