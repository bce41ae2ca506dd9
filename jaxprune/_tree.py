"""Key paths as plain names, shared by the modules that match trees by path."""

from collections.abc import Callable, Mapping
from typing import Any

import jax


def key_name(key: Any) -> Any:
    """``DictKey('q')`` -> ``'q'``, ``SequenceKey(0)`` -> ``0``, ``GetAttrKey('value')`` ->
    ``'value'``; anything else is returned as is."""
    for attr in ('key', 'idx', 'name'):
        if hasattr(key, attr):
            return getattr(key, attr)
    return key


def path_names(path: Any, *, drop_value: bool = False) -> tuple[Any, ...]:
    """A key path as a tuple of names; ``drop_value`` strips the trailing ``value`` of an
    ``nnx.State`` leaf, so an ``nnx.State`` and its pure dict give the same names."""
    names = tuple(key_name(k) for k in path)
    if drop_value and names and names[-1] == 'value':
        names = names[:-1]
    return names


def map_planned(
    tree: Any,
    plan: Mapping[tuple[Any, ...], Any],
    fn: Callable[[Any, Any], Any],
    *,
    accept: Callable[[tuple[Any, ...], Any], bool] | None = None,
) -> Any:
    """``fn(leaf, plan[part])`` for every leaf with a contiguous ``part`` of its key path in
    ``plan`` (the longest part from the left wins, among those ``accept(part, leaf)`` allows);
    other leaves are returned unchanged. So a plan keyed by parameter paths reaches the same
    paths inside an optimizer state (``opt_state[0].mu['layers'][0]...``)."""

    def one(path, x):
        names = path_names(path)
        for start in range(len(names)):
            for end in range(len(names), start, -1):
                part = names[start:end]
                if part in plan and (accept is None or accept(part, x)):
                    return fn(x, plan[part])
        return x

    return jax.tree_util.tree_map_with_path(one, tree)
