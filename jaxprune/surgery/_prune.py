"""Structured surgery: physically remove pruned heads, neurons and hidden dims.

Everything is driven by ``jaxprune.models.structures``: a structure's slices say which entries of
which parameter each unit owns, so removing units is ``take`` along those axes, for the params
and for any pytree that contains params-shaped subtrees (Adam ``mu``/``nu``, EMAs, gradients).
Unit-layout pytrees (masks, salience EMAs, ``AptMaskState``) shrink with :func:`prune_units`.

Empty structures. Configs need at least one head group / neuron / hidden dim per layer, but APT
may prune a structure completely. Then the lowest-index unit is kept *zeroed* (all of its slices
set to 0): its contribution is exactly 0, like the masked unit, so the pruned model still equals
the masked model. :func:`prune_units` keeps the same unit with mask 0 / ``alive`` False, so it
never revives. See :func:`effective_keep`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import _tree

Key = tuple[str, int | None]


def _structures_for(config: Any, params: Any = None) -> tuple[Any, ...]:
    from jaxprune.models import _structures  # local: surgery is usable on plain pytrees too

    return _structures.structures(config, lora=_lora_spec_from_params(params))


def _lora_spec_from_params(params: Any) -> Any:
    """A LoraSpec covering exactly the adapters present in a pure-dict ``params`` (or None)."""
    if params is None:
        return None
    paths, ranks = [], set()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = _tree.path_names(path)
        if names and names[-1] == 'lora_a':
            paths.append('.'.join(str(n) for n in names[:-1]))
            ranks.add(int(leaf.shape[-1]))
    if not paths:
        return None
    if len(ranks) > 1:
        raise ValueError(
            f'adapters have different ranks {sorted(ranks)}; resize them to one bucket'
        )
    from jaxprune.lora import _spec

    rank = ranks.pop()
    return _spec.LoraSpec(rank=rank, alpha=float(rank), targets='|'.join(map(re.escape, paths)))


def effective_keep(
    keep: Mapping[Key, Any], structures: Sequence[Any]
) -> tuple[dict[Key, np.ndarray], dict[Key, np.ndarray]]:
    """Keep vectors that leave at least one unit per structure, and which kept units are zeroed.

    Args:
      keep: ``{(kind, layer): bool[size]}``; missing keys keep everything.
      structures: the structures ``keep`` refers to.

    Returns:
      ``(keep, zeroed)`` numpy bool dicts over all structures; ``zeroed[k]`` marks the unit kept
      only because its structure would otherwise be empty.

    Raises:
      ValueError: if a keep vector has the wrong size.
    """
    out, zeroed = {}, {}
    for s in structures:
        key = (s.kind, s.layer)
        k = np.ones(s.size, bool) if key not in keep else np.asarray(keep[key]).astype(bool)
        if k.shape != (s.size,):
            raise ValueError(f'keep[{key}] has shape {k.shape}; expected ({s.size},)')
        z = np.zeros(s.size, bool)
        if not k.any():
            k = k.copy()
            k[0] = z[0] = True
        out[key], zeroed[key] = k, z
    return out, zeroed


def _index(keep: np.ndarray, width: int) -> np.ndarray:
    return (np.flatnonzero(keep)[:, None] * width + np.arange(width)).reshape(-1)


def _plan(keep, zeroed, structures):
    """param path -> list of (axis, kept index, zero index within the kept axis)."""
    plan: dict[tuple[Any, ...], list[tuple[int, np.ndarray, np.ndarray]]] = {}
    for s in structures:
        key = (s.kind, s.layer)
        k, z = keep[key], zeroed[key]
        for slc in s.slices:
            idx = _index(k, slc.width)
            zero = _index(z[k], slc.width)
            plan.setdefault(tuple(slc.path), []).append((slc.axis, idx, zero))
    return plan


def _apply(x: Any, ops) -> Any:
    for axis, idx, zero in ops:
        x = jnp.take(x, jnp.asarray(idx), axis=axis)
        if zero.size:
            where = [slice(None)] * x.ndim
            where[axis] = jnp.asarray(zero)
            x = x.at[tuple(where)].set(0)
    return x


def prune_like(
    tree: Any,
    keep: Mapping[Key, Any],
    structures: Sequence[Any],
    shapes: Mapping[tuple[Any, ...], tuple[int, ...]] | None = None,
) -> Any:
    """Apply the surgery of ``keep`` to every params-shaped subtree of ``tree``.

    A leaf is sliced when some contiguous part of its key path equals a structure slice path (so
    ``opt_state[0].mu['layers'][0]...`` is found) and, if ``shapes`` is given, its shape equals
    the parameter's shape (so scalars such as Adam's ``count`` are left alone).

    Args:
      tree: any pytree (params, gradients, optimizer state).
      keep: ``{(kind, layer): bool[size]}`` keep vectors.
      structures: structures of the *unpruned* model.
      shapes: optional ``{path: shape}`` of the unpruned params for an extra shape check.

    Returns:
      The pruned pytree (same structure, smaller leaves).
    """
    keep, zeroed = effective_keep(keep, structures)
    plan = _plan(keep, zeroed, structures)

    accept = None if shapes is None else (
        lambda part, x: tuple(np.shape(x)) == tuple(shapes[part]))
    return _tree.map_planned(tree, plan, _apply, accept=accept)


def pruned_config(config: Any, keep: Mapping[Key, Any], structures: Sequence[Any]) -> Any:
    """The config of the pruned model: ``layer_heads``, ``layer_mlp`` and ``hidden_size`` updated.

    Requires a config with ``num_layers``, ``q_per_kv``, ``heads(l)`` and ``mlp(l)`` (Llama, BERT).
    """
    keep, _ = effective_keep(keep, structures)
    heads = [config.heads(i) for i in range(config.num_layers)]
    mlp = [config.mlp(i) for i in range(config.num_layers)]
    hidden = config.hidden_size
    for (kind, layer), k in keep.items():
        if kind == 'heads':
            heads[layer] = int(k.sum()) * config.q_per_kv
        elif kind == 'mlp':
            mlp[layer] = int(k.sum())
        elif kind == 'hidden':
            hidden = int(k.sum())
    return dataclasses.replace(
        config, layer_heads=tuple(heads), layer_mlp=tuple(mlp), hidden_size=hidden
    )


def prune(
    config: Any,
    params: Any,
    keep: Mapping[Key, Any],
    *,
    structures: Sequence[Any] | None = None,
) -> tuple[Any, Any]:
    """Remove the units where ``keep`` is False from ``params`` and shrink ``config``.

    Pure and outside ``jit``. Invariant: the pruned model's outputs equal the masked model's
    (``masks = to_model_masks(keep)``); the pruned parameter count equals
    ``jaxprune.masks._budget.kept_param_count`` plus the non-prunable parameters.

    Args:
      config: the model config (``LlamaConfig`` / ``BertConfig``), or any config when
        ``structures`` is given and ``config`` is None.
      params: the pure-dict parameter state (``nnx.to_pure_dict(nnx.state(model, nnx.Param))``).
      keep: ``{(kind, layer): bool[size]}``; missing keys keep everything.
      structures: override ``jaxprune.models.structures(config, lora=...)`` (e.g. for plain
        pytrees in tests).

    Returns:
      ``(new_config, new_params)``; ``new_config`` is None when ``config`` is None.

    Raises:
      ValueError: if a keep vector does not match its structure's size.

    Example:
      Drop every other FFN neuron of layer 0 of a tiny Llama (``up``/``gate`` lose columns,
      ``down`` loses rows; layer 1 is untouched):

      >>> import numpy as np
      >>> from flax import nnx
      >>> from jaxprune import models
      >>> config = models.LlamaConfig.tiny()
      >>> params = nnx.to_pure_dict(nnx.state(models.Llama(config, rngs=nnx.Rngs(0)), nnx.Param))
      >>> keep = {('mlp', 0): np.arange(config.intermediate_size) % 2 == 0}
      >>> new_config, new_params = prune(config, params, keep)
      >>> new_config.layer_mlp
      (32, 64)
      >>> mlp = new_params['layers'][0]['mlp']
      >>> mlp['up_proj']['kernel'].shape, mlp['down_proj']['kernel'].shape
      ((32, 32), (32, 32))
    """
    if structures is None:
        structures = _structures_for(config, params)
    new_params = prune_like(params, keep, structures)
    new_config = None if config is None else pruned_config(config, keep, structures)
    return new_config, new_params


def prune_units(tree: Any, keep: Mapping[Key, Any], structures: Sequence[Any]) -> Any:
    """Prune unit-layout leaves: every ``dict`` keyed ``(kind, layer)`` gets its arrays sliced.

    Works on ``AptMaskState`` (masks, alive, salience EMA), scores and keep vectors. Units kept
    only to avoid an empty structure (:func:`effective_keep`) get mask 0 / ``alive`` False via the
    values already stored there (they were pruned, so their mask is 0).
    """
    keep, _ = effective_keep(keep, structures)

    def is_unit_dict(x):
        return isinstance(x, dict) and x and all(k in keep for k in x)

    def fn(x):
        if is_unit_dict(x):
            return {k: jnp.asarray(v)[jnp.asarray(np.flatnonzero(keep[k]))] for k, v in x.items()}
        return x

    return jax.tree.map(fn, tree, is_leaf=is_unit_dict)


def prune_model(model: Any, keep: Mapping[Key, Any]) -> tuple[Any, Any]:
    """Physically prune an NNX model: split, :func:`prune`, rebuild for the smaller config, merge.

    Args:
      model: a ``Llama`` or ``BertForSequenceClassification`` with a ``config`` attribute.
      keep: ``{(kind, layer): bool[size]}`` keep vectors (e.g. ``masks > 0``).

    Returns:
      ``(new_model, new_config)``.
    """
    from flax import nnx

    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    config, new_params = prune(model.config, params, keep)
    return rebuild_model(model, config, new_params), config


def rebuild_model(model: Any, config: Any, params: Any) -> Any:
    """A fresh model of ``type(model)`` for ``config`` holding the pure-dict ``params``.

    LoRA adapters are placed where ``params`` has them, at their (common) physical rank, and
    every adapter keeps the ``lora_scale`` it had in ``model`` (so a rank resize or surgery does
    not change the function). Outside jit.

    Raises:
      ValueError: if adapters in ``params`` have different physical ranks.
    """
    from flax import nnx

    spec = _lora_spec_from_params(params)
    scales = _lora_scales(model)
    dtype = jax.tree.leaves(params)[0].dtype
    new_model = type(model)(config, lora=spec, param_dtype=dtype, rngs=nnx.Rngs(0))
    for path, scale in scales.items():
        _get_module(new_model, path).lora_scale = scale
    state = nnx.state(new_model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(new_model, state)
    return new_model


def _lora_scales(model: Any) -> dict[tuple[Any, ...], float]:
    from flax import nnx

    return {
        tuple(path): node.lora_scale
        for path, node in nnx.iter_graph(model)
        if getattr(node, 'lora_a', None) is not None and hasattr(node, 'lora_scale')
    }


def _get_module(model: Any, path: Sequence[Any]) -> Any:
    node = model
    for p in path:
        node = node[p] if isinstance(p, int) else getattr(node, p)
    return node
