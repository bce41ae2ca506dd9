"""Readable differences between two pytrees of arrays / shape-dtype structs."""

from typing import Any

import jax


def _key_str(path) -> str:
    parts = []
    for k in path:
        for attr in ('key', 'name', 'idx'):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return '/'.join(parts) or '<root>'


def _flat(tree: Any) -> dict[str, Any]:
    return {_key_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(getattr(x, 'shape', ()))


def _dtype(x: Any) -> str:
    dtype = getattr(x, 'dtype', None)
    return type(x).__name__ if dtype is None else str(dtype)


def _describe(x: Any) -> str:
    return f'{_dtype(x)}{list(_shape(x))}'


def tree_diff(expected: Any, found: Any) -> list[str]:
    """Lists the differences between two pytrees, one readable line per difference.

    Leaves are compared by key path (``params/layers/0/kernel``; dict keys, NamedTuple fields and
    sequence indices all print as path segments, so an optax ``ScaleByAdamState.mu`` matches a
    restored ``{'mu': ...}``), then by shape and dtype. Values are not compared.

    Args:
      expected: the tree you want (e.g. a restore target of ``jax.ShapeDtypeStruct``).
      found: the tree you have (e.g. checkpoint metadata); leaves need ``.shape``/``.dtype``.

    Returns:
      Lines grouped as missing, unexpected, then shape/dtype (each by path); empty if the trees
      agree: ``missing: <path> (expected <dtype>[shape])``,
      ``unexpected: <path> (found ...)``, ``shape: <path> expected (8, 16), found (8, 12)``,
      ``dtype: <path> expected bfloat16, found float32``.

    Example:
      >>> import jax.numpy as jnp
      >>> tree_diff({'w': jnp.zeros((2, 3))}, {'w': jnp.zeros((2, 4)), 'b': jnp.zeros(3)})
      ['unexpected: b (found float32[3])', 'shape: w expected (2, 3), found (2, 4)']
    """
    want, have = _flat(expected), _flat(found)
    lines = []
    for key in sorted(want.keys() - have.keys()):
        lines.append(f'missing: {key} (expected {_describe(want[key])})')
    for key in sorted(have.keys() - want.keys()):
        lines.append(f'unexpected: {key} (found {_describe(have[key])})')
    for key in sorted(want.keys() & have.keys()):
        a, b = want[key], have[key]
        if _shape(a) != _shape(b):
            lines.append(f'shape: {key} expected {_shape(a)}, found {_shape(b)}')
        if _dtype(a) != _dtype(b):
            lines.append(f'dtype: {key} expected {_dtype(a)}, found {_dtype(b)}')
    return lines
