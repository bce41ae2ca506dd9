"""Key paths as plain names, shared by the modules that match trees by path."""

from typing import Any


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
