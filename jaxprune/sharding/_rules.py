"""The rules table: logical axis names (``jaxprune.typing``) -> mesh axes -> ``PartitionSpec``."""

import types
from collections.abc import Mapping, Sequence

import jax
from jax.sharding import PartitionSpec

from jaxprune import typing as jpt

MeshAxes = str | tuple[str, ...] | None
Rules = Mapping[str, MeshAxes]

# Parameters (and every optimizer-state leaf or mask that mirrors one). FSDP splits the model
# dimension, tensor parallelism splits the "wide" axes; ``head_dim``/``lora_rank``/``layers``/
# ``labels`` are small or irregular after pruning and stay replicated.
DEFAULT_RULES: Rules = types.MappingProxyType(
    {
        jpt.VOCAB: 'tensor',
        jpt.EMBED: 'fsdp',
        jpt.HEADS: 'tensor',
        jpt.KV_HEADS: 'tensor',
        jpt.HEAD_DIM: None,
        jpt.MLP: 'tensor',
        jpt.LAYERS: None,
        jpt.LORA_RANK: None,
        jpt.LABELS: None,
        jpt.POSITION: None,
    }
)

BATCH = 'batch'
LENGTH = 'length'

# Activations: the batch is split over every data-like axis; the model dimension of activations
# is replicated (FSDP gathers weights, not activations); wide activations follow tensor parallel.
ACTIVATION_RULES: Rules = types.MappingProxyType(
    {
        BATCH: ('data', 'fsdp'),
        LENGTH: None,
        jpt.POSITION: None,
        jpt.EMBED: None,
        jpt.VOCAB: 'tensor',
        jpt.HEADS: 'tensor',
        jpt.KV_HEADS: 'tensor',
        jpt.HEAD_DIM: None,
        jpt.MLP: 'tensor',
        jpt.LAYERS: None,
        jpt.LORA_RANK: None,
        jpt.LABELS: None,
    }
)

# Mask entries (see the masks layout in ``jaxprune.models``) -> the logical axis they index.
# A mask shards like the axis it gates, so ``where(mask, ...)`` needs no communication.
MASK_AXES: Mapping[str, str] = types.MappingProxyType(
    {
        'hidden': jpt.EMBED,
        'heads': jpt.HEADS,
        'attn_ctx': jpt.HEADS,
        'mlp': jpt.MLP,
        'attn_in': jpt.EMBED,
        'attn_out': jpt.EMBED,
        'mlp_in': jpt.EMBED,
        'mlp_out': jpt.EMBED,
        'lora': jpt.LORA_RANK,
    }
)


def _as_tuple(mesh_axes: MeshAxes) -> tuple[str, ...]:
    if mesh_axes is None:
        return ()
    if isinstance(mesh_axes, str):
        return (mesh_axes,)
    return tuple(mesh_axes)


def logical_to_spec(
    axes: Sequence[str | None],
    rules: Rules,
    mesh: jax.sharding.Mesh,
    *,
    shape: Sequence[int] | None = None,
) -> PartitionSpec:
    """Maps logical axis names of one array to a ``PartitionSpec`` on ``mesh``.

    For dimension ``i`` with logical name ``axes[i]`` the candidate mesh axes are
    ``rules[axes[i]]``; a candidate is kept only if it exists in the mesh, has size > 1, is not
    already used by an earlier dimension, and (when ``shape`` is given) the product of the kept
    mesh-axis sizes divides ``shape[i]``. So tiny test models and pruned, irregular shapes still
    get a valid (partly replicated) sharding instead of an error.

    Args:
      axes: one logical name (or ``None`` = replicated) per array dimension.
      rules: ``logical name -> mesh axis | tuple of mesh axes | None``, e.g. ``DEFAULT_RULES``.
      mesh: the mesh the spec is for.
      shape: the array shape, enabling the divisibility fallback. Without it every rule applies.

    Returns:
      A ``PartitionSpec`` with one entry per dimension (trailing ``None`` kept).

    Raises:
      ValueError: if a name is missing from ``rules`` or ``shape`` has a different rank.

    Example:
      >>> mesh = jax.sharding.AbstractMesh((2, 2, 2), ('data', 'fsdp', 'tensor'))
      >>> logical_to_spec(('embed', 'mlp'), DEFAULT_RULES, mesh, shape=(64, 5))  # 5 % 2 != 0
      P('fsdp', None)
    """
    axes = tuple(axes)
    if shape is not None and len(shape) != len(axes):
        raise ValueError(
            f'logical {axes=} name {len(axes)} dims but {shape=} has {len(shape)}; annotate every '
            'dimension of the parameter'
        )
    mesh_sizes = dict(mesh.shape)
    used: set[str] = set()
    spec = []
    for i, name in enumerate(axes):
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise ValueError(
                f'logical axis {name!r} (dim {i} of {axes=}) has no rule; add it to the rules '
                f'table (known: {sorted(rules)})'
            )
        kept: list[str] = []
        size = 1
        for mesh_axis in _as_tuple(rules[name]):
            n = mesh_sizes.get(mesh_axis, 1)
            if n == 1 or mesh_axis in used:
                continue
            if shape is not None and shape[i] % (size * n):
                continue
            kept.append(mesh_axis)
            size *= n
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*spec)


def batch_sharding(
    mesh: jax.sharding.Mesh,
    *,
    batch_size: int | None = None,
    rules: Rules = ACTIVATION_RULES,
) -> jax.sharding.NamedSharding:
    """The sharding of a batch array: leading dim over ``rules['batch']``, the rest replicated.

    The spec has a single entry, so it is a valid prefix for arrays of any rank (``[B]``,
    ``[B, T]``, ...) and one sharding serves every entry of a batch dict.

    Args:
      mesh: the mesh.
      batch_size: if given, mesh axes that do not divide it are dropped (as in
        ``logical_to_spec``); otherwise the global batch must be divisible by the product of the
        batch mesh axes.
      rules: activation rules with a ``'batch'`` entry.

    Returns:
      ``NamedSharding(mesh, P(('data', 'fsdp')))`` (axes of size 1 dropped).

    Example:
      >>> mesh = jax.sharding.AbstractMesh((2, 2, 2), ('data', 'fsdp', 'tensor'))
      >>> batch_sharding(mesh).spec
      P(('data', 'fsdp'),)
    """
    shape = None if batch_size is None else (batch_size,)
    spec = logical_to_spec((BATCH,), rules, mesh, shape=shape)
    return jax.sharding.NamedSharding(mesh, spec)
