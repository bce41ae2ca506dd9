"""Shardings for parameter, optimizer-state and mask trees, and placing trees on a mesh."""

from typing import Any

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxprune.sharding import _rules

_LOGICAL_KEY = 'out_sharding'


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _logical_axes(var: nnx.Variable) -> tuple[str | None, ...] | None:
    # flax 0.12 stores logical names under ``out_sharding``; the deprecated ``sharding`` and
    # ``sharding_names`` keywords are remapped to it when the Variable is created.
    axes = var.get_metadata().get(_LOGICAL_KEY)
    if axes is None:
        return None
    if isinstance(axes, PartitionSpec):
        axes = tuple(axes)
    return tuple(axes)


def _named(mesh, axes, shape, rules) -> NamedSharding:
    if axes is None or shape is None:
        return NamedSharding(mesh, PartitionSpec())
    return NamedSharding(mesh, _rules.logical_to_spec(axes, rules, mesh, shape=shape))


def param_shardings(
    state: Any,
    mesh: jax.sharding.Mesh,
    rules: _rules.Rules = _rules.DEFAULT_RULES,
) -> Any:
    """Reads the logical-axis metadata of ``nnx.Variable`` leaves and returns their shardings.

    Works on concrete states (``nnx.split(model, nnx.Param)``) and abstract ones
    (``nnx.eval_shape``): only ``.shape`` and the ``out_sharding`` metadata are read. Each
    Variable is replaced by a Variable of the same type and metadata holding a ``NamedSharding``,
    so the result has exactly the tree structure of ``state`` and can be passed to
    ``jax.device_put`` / ``jax.jit(in_shardings=..., out_shardings=...)`` next to it. Use
    ``nnx.to_pure_dict(result)`` to get shardings for the pure-dict form of the parameters.
    Variables without metadata and plain arrays are replicated.

    Args:
      state: an ``nnx.State`` (or any pytree) with ``nnx.Variable`` and/or array leaves.
      mesh: the mesh.
      rules: logical -> mesh axis rules; dimensions that a mesh axis does not divide stay
        replicated (see ``logical_to_spec``).

    Returns:
      A tree like ``state`` with ``NamedSharding`` values.

    Raises:
      ValueError: if a Variable's logical axes do not match its rank or name an unknown axis.

    Example:
      >>> lin = nnx.Linear(
      ...     8, 4, rngs=nnx.Rngs(0),
      ...     kernel_metadata={'out_sharding': ('embed', 'mlp'), 'eager_sharding': False})
      >>> mesh = jax.sharding.AbstractMesh((2, 2), ('fsdp', 'tensor'))  # or make_mesh(...)
      >>> shardings = nnx.to_pure_dict(param_shardings(nnx.state(lin, nnx.Param), mesh))
      >>> shardings['kernel'].spec, shardings['bias'].spec
      (P('fsdp', 'tensor'), P())
    """

    def one(x):
        if _is_variable(x):
            value = x.get_value()
            return x.replace(_named(mesh, _logical_axes(x), getattr(value, 'shape', None), rules))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, state, is_leaf=_is_variable)


def _path_key(path) -> tuple[str, ...]:
    # NamedTuple fields (GetAttrKey), dict keys (DictKey) and list indices (SequenceKey) all
    # normalise to strings, so ``mu['layers'][0]['kernel']`` matches ``params['layers'][0]...``.
    out = []
    for k in path:
        for attr in ('key', 'name', 'idx'):
            if hasattr(k, attr):
                out.append(str(getattr(k, attr)))
                break
        else:
            out.append(str(k))
    return tuple(out)


def _strip_value(key: tuple[str, ...]) -> tuple[str, ...]:
    # nnx.Variable leaves add a trailing ``value`` segment; dropping it lets shardings computed
    # on an ``nnx.State`` match an optimizer state built from its pure-dict form and vice versa.
    return key[:-1] if key and key[-1] == 'value' else key


def mask_shardings(
    masks: Any,
    mesh: jax.sharding.Mesh,
    rules: _rules.Rules = _rules.DEFAULT_RULES,
) -> Any:
    """Shardings for a structured-masks tree: each mask shards like the logical axis it gates.

    The entry name decides the axis (``_rules.MASK_AXES``): ``hidden``/``*_in``/``*_out`` ->
    ``embed``, ``heads``/``attn_ctx`` -> ``heads``, ``mlp`` -> ``mlp``, anything under ``lora``
    -> ``lora_rank``. 1-D masks use that rule (with the divisibility fallback); other leaves
    are replicated.

    Args:
      masks: the masks pytree (layout documented in ``jaxprune.models``).
      mesh: the mesh.
      rules: logical -> mesh axis rules.

    Returns:
      A tree like ``masks`` with ``NamedSharding`` leaves.
    """

    def one(path, x):
        return _mask_leaf_sharding(_path_key(path), x, mesh, rules)

    return jax.tree_util.tree_map_with_path(one, masks)


def _mask_leaf_sharding(key, x, mesh, rules) -> NamedSharding:
    shape = getattr(x, 'shape', ())
    if len(shape) == 1:
        for name in reversed(key):
            if name in _rules.MASK_AXES:
                return _named(mesh, (_rules.MASK_AXES[name],), shape, rules)
    return NamedSharding(mesh, PartitionSpec())


def opt_state_shardings(
    opt_state: Any,
    params_shardings: Any,
    *,
    rules: _rules.Rules = _rules.DEFAULT_RULES,
    rest_shardings: Any = None,
) -> Any:
    """Shardings for an optimizer state, derived from the parameter shardings.

    A state leaf whose key path *ends with* a parameter's key path (``.../mu/layers/0/kernel``
    ends with ``layers/0/kernel``) takes the parameter's sharding if that sharding fits the
    leaf's shape (rank and divisibility; otherwise it is replicated):
    this covers Adam moments, accumulated gradients (``MultiSteps``), param-shaped masks, and
    ``optax.masked`` states. Remaining 1-D leaves named like a structured-mask entry (``mlp``,
    ``heads``, ...) shard like the axis they gate (``mask_shardings``). Everything else (counts,
    hyperparameters, factored statistics) is replicated.

    Args:
      opt_state: concrete or abstract (``jax.eval_shape(tx.init, params)``) optimizer state.
      params_shardings: the output of ``param_shardings`` (or any tree of ``NamedSharding`` with
        the parameter structure).
      rules: rules for the structured-mask fallback.
      rest_shardings: optional shardings of the model's frozen state (``param_shardings(rest,
        mesh)``). State leaves that end with one of its key paths take its sharding the same
        way, so a copy of the frozen backbone kept in the optimizer state (APT's dense
        teacher) is laid out like the backbone instead of replicated.

    Returns:
      A tree like ``opt_state`` with ``NamedSharding`` leaves.

    Raises:
      ValueError: if ``params_shardings`` holds no ``NamedSharding`` (so no mesh is known).

    Example:
      >>> import optax
      >>> mesh = jax.sharding.AbstractMesh((2,), ('fsdp',))
      >>> p_sh = {'w': NamedSharding(mesh, PartitionSpec('fsdp'))}
      >>> opt_state = jax.eval_shape(optax.adam(1e-3).init, {'w': jax.numpy.ones(4)})
      >>> o_sh = opt_state_shardings(opt_state, p_sh)
      >>> o_sh[0].mu['w'].spec, o_sh[0].count.spec
      (P('fsdp',), P())
    """
    sh_leaves = jax.tree_util.tree_flatten_with_path(
        params_shardings, is_leaf=lambda x: isinstance(x, NamedSharding)
    )[0]
    if not sh_leaves or not isinstance(sh_leaves[0][1], NamedSharding):
        raise ValueError(
            f'params_shardings must be a tree of NamedSharding (got {type(params_shardings)}); '
            'build it with param_shardings(params, mesh)'
        )
    mesh = sh_leaves[0][1].mesh
    if rest_shardings is not None:  # key paths are disjoint: trainable and rest split one model
        sh_leaves = sh_leaves + jax.tree_util.tree_flatten_with_path(
            rest_shardings, is_leaf=lambda x: isinstance(x, NamedSharding))[0]
    table = {_strip_value(_path_key(p)): s for p, s in sh_leaves}
    by_len = sorted(table, key=len, reverse=True)

    def one(path, x):
        key = _strip_value(_path_key(path))
        shape = getattr(x, 'shape', ())
        for pkey in by_len:
            if len(pkey) > len(key) or key[len(key) - len(pkey) :] != pkey:
                continue
            sharding = table[pkey]
            if _fits(sharding, shape):
                return sharding
            break
        return _mask_leaf_sharding(key, x, mesh, rules)

    return jax.tree_util.tree_map_with_path(one, opt_state)


def _fits(sharding: NamedSharding, shape) -> bool:
    if len(sharding.spec) > len(shape):
        return False
    sizes = dict(sharding.mesh.shape)
    for dim, entry in zip(shape, sharding.spec):
        n = 1
        for axis in _rules._as_tuple(entry):
            n *= sizes[axis]
        if dim % n:
            return False
    return True


def shard_like(tree: Any, shardings: Any) -> Any:
    """Places ``tree`` on devices with ``shardings`` (same structure, or a prefix of it).

    Args:
      tree: arrays (or ``nnx.State``) to place.
      shardings: matching ``NamedSharding`` tree, e.g. from ``param_shardings``.

    Returns:
      ``jax.device_put(tree, shardings)``: new arrays, ``tree`` is not modified.
    """
    return jax.device_put(tree, shardings)


def abstract_like(tree: Any, shardings: Any = None) -> Any:
    """``jax.ShapeDtypeStruct`` tree of ``tree`` with the given shardings (a restore target).

    Args:
      tree: concrete or abstract arrays (``jax.eval_shape`` output works).
      shardings: tree of shardings with the structure of ``tree``; ``None`` keeps each leaf's
        own ``.sharding`` if it has one.

    Returns:
      A tree of ``jax.ShapeDtypeStruct(shape, dtype, sharding=...)``, e.g. for
      ``Checkpointer.restore(target=...)``.
    """
    if shardings is None:
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, 'sharding', None)),
            tree,
        )
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )
