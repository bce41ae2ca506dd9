"""Structured (heads / neurons / hidden dims / LoRA ranks) masks and their model layout.

Two layouts exist on purpose:

* **unit layout** ``{(kind, layer): f32[size]}`` -- one entry per structure, indexed by units
  (a head *group* for GQA). Scores, the APT mask state, budget keep vectors and surgery use it.
* **model layout** -- what ``model(..., masks=...)`` reads (see the contract)::

      {'hidden': f32[D], 'layers': ({'heads': f32[H_l], 'mlp': f32[F_l], 'lora': {...}}, ...)}

  where ``'heads'`` is per *query* head, so a group mask is repeated ``q_per_kv`` times.

LoRA rank masks are keyed by the adapter's module path, e.g. ``('layers', 0, 'attn', 'q_proj')``,
and land in ``layers[l]['lora'][path[-1]]``.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxprune.scores import _apt as apt_scores

Key = tuple[str, int | None]


def ones_like_structures(
    structures: Sequence[Any], dtype: jnp.dtype = jnp.float32
) -> dict[Key, jax.Array]:
    """All-ones unit-layout masks (keep everything) for ``structures``."""
    return {apt_scores.structure_key(s): jnp.ones((s.size,), dtype) for s in structures}


def to_model_masks(
    unit_masks: Mapping[Key, jax.Array],
    *,
    num_layers: int,
    q_per_kv: int | Sequence[int] = 1,
    lora_masks: Mapping[tuple[Any, ...], jax.Array] | None = None,
) -> dict[str, Any]:
    """Convert unit-layout masks (and LoRA rank masks) to the model's ``masks=`` layout.

    Args:
      unit_masks: ``{(kind, layer): f32[size]}``; missing keys mean keep all.
      num_layers: number of decoder/encoder layers.
      q_per_kv: query heads per KV group (an int, or one per layer); 1 without GQA.
      lora_masks: ``{module_path: f32[r]}`` rank masks; paths start with ``('layers', l, ...)``.

    Returns:
      ``{'hidden': ..., 'layers': tuple(dict, ...)}`` with only the entries that exist.

    Raises:
      ValueError: if a LoRA path does not start with ``('layers', l)``.
    """
    if isinstance(q_per_kv, int):
        q_per_kv = (q_per_kv,) * num_layers
    layers = []
    for layer in range(num_layers):
        entry = {}
        if ('heads', layer) in unit_masks:
            entry['heads'] = jnp.repeat(unit_masks[('heads', layer)], q_per_kv[layer])
        if ('mlp', layer) in unit_masks:
            entry['mlp'] = unit_masks[('mlp', layer)]
        layers.append(entry)
    for path, mask in (lora_masks or {}).items():
        if len(path) < 3 or path[0] != 'layers' or not isinstance(path[1], int):
            raise ValueError(f'LoRA mask {path=} must start with ("layers", layer_index, ...)')
        layers[path[1]].setdefault('lora', {})[path[-1]] = mask
    out: dict[str, Any] = {'layers': tuple(layers)}
    if ('hidden', None) in unit_masks:
        out['hidden'] = unit_masks[('hidden', None)]
    return out


def binarize(unit_masks: Mapping[Key, jax.Array], threshold: float = 0.5) -> dict[Key, jax.Array]:
    """Hard ``{0, 1}`` float masks: 1 where the soft mask is ``>= threshold``."""
    return {k: (m >= threshold).astype(m.dtype) for k, m in unit_masks.items()}


def keep_from_masks(unit_masks: Mapping[Key, jax.Array]) -> dict[Key, jax.Array]:
    """Boolean keep vectors (``mask > 0``) for :func:`jaxprune.surgery.prune`."""
    return {k: m > 0 for k, m in unit_masks.items()}
