"""Meshes, the logical-axis rules table and shardings for params, optimizer state and masks.

Design note. Every ``nnx.Param`` carries logical axis names (``out_sharding=('embed', 'mlp')``,
vocabulary in ``jaxprune.typing``). ONE table, ``DEFAULT_RULES``, maps those names to mesh axes
(``embed -> fsdp``; ``heads``/``kv_heads``/``mlp``/``vocab -> tensor``); activations have their
own table (``ACTIVATION_RULES``, ``batch -> ('data', 'fsdp')``), as in levanter. Everything else
is derived: optimizer-state leaves that mirror a parameter (Adam moments, accumulated gradients,
param-shaped masks) take its sharding; structured masks shard like the axis they gate; scalars
are replicated. A mesh axis that does not divide a dimension is dropped for that dimension, so
tiny test models and pruned, irregular shapes always get a valid sharding. All functions are
pure; nothing here sets a global mesh.

Typical use (the train step is a plain ``jax.jit`` with these in/out shardings)::

  mesh = sharding.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1})
  graphdef, params = nnx.split(model, nnx.Param)
  p_sh = sharding.param_shardings(params, mesh)
  o_sh = sharding.opt_state_shardings(jax.eval_shape(tx.init, params), p_sh)
  params = sharding.shard_like(params, p_sh)
  opt_state = jax.jit(tx.init, out_shardings=o_sh)(params)
  batch = sharding.shard_like(batch, sharding.batch_sharding(mesh))

Parameters with logical ``out_sharding`` names must be created with ``eager_sharding=False`` (as
``jaxprune.models`` does) or under ``nnx.use_eager_sharding(False)``: flax otherwise tries to
place them on a mesh axis literally named ``'embed'``. Place them afterwards with ``shard_like``.
"""

from jaxprune.sharding._mesh import DEFAULT_MESH_SHAPE, make_mesh
from jaxprune.sharding._rules import (
    ACTIVATION_RULES,
    BATCH,
    DEFAULT_RULES,
    LENGTH,
    MASK_AXES,
    Rules,
    batch_sharding,
    logical_to_spec,
)
from jaxprune.sharding._shard import (
    abstract_like,
    mask_shardings,
    opt_state_shardings,
    param_shardings,
    shard_like,
)

__all__ = [
    'ACTIVATION_RULES',
    'BATCH',
    'DEFAULT_MESH_SHAPE',
    'DEFAULT_RULES',
    'LENGTH',
    'MASK_AXES',
    'Rules',
    'abstract_like',
    'batch_sharding',
    'logical_to_spec',
    'make_mesh',
    'mask_shardings',
    'opt_state_shardings',
    'param_shardings',
    'shard_like',
]
