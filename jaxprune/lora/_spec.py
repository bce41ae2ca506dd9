"""LoRA placement (`LoraSpec`), the trainable-parameter filter and merging adapters into kernels."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

DEFAULT_TARGETS = r'.*\.(q_proj|v_proj|query|value)'


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """Where and how large LoRA adapters are.

    Attributes:
      rank: adapter rank ``r`` (the maximum rank; rank masks can switch components off).
      alpha: scale numerator; the adapter output is multiplied by ``alpha / rank``.
      targets: a regular expression matched (``re.fullmatch``) against dotted module paths such as
        ``'layers.3.attn.q_proj'`` (Llama) or ``'layers.0.attn.query'`` (BERT). The default
        targets the query and value projections of both architectures.
    """

    rank: int = 8
    alpha: float = 16.0
    targets: str = DEFAULT_TARGETS

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f'{self.rank=} must be a positive int; pass e.g. rank=8')
        if not self.alpha > 0:
            raise ValueError(f'{self.alpha=} must be > 0; pass e.g. alpha=2 * rank')
        try:
            re.compile(self.targets)
        except re.error as e:
            raise ValueError(f'{self.targets=} is not a valid regular expression: {e}') from e

    @property
    def scale(self) -> float:
        """The adapter scale ``alpha / rank``."""
        return self.alpha / self.rank

    def matches(self, path: str) -> bool:
        """Whether the module at dotted ``path`` gets an adapter."""
        return re.fullmatch(self.targets, path) is not None


def lora_kwargs(spec: LoraSpec | None, path: str) -> dict[str, Any]:
    """Keyword arguments for ``Linear`` at ``path``: ``lora_rank``/``lora_alpha`` if targeted."""
    if spec is None or not spec.matches(path):
        return {}
    return {'lora_rank': spec.rank, 'lora_alpha': spec.alpha}


def target_paths(spec: LoraSpec | None, paths: Iterable[str]) -> tuple[str, ...]:
    """The subset of dotted module ``paths`` that ``spec`` targets (in input order)."""
    if spec is None:
        return ()
    return tuple(p for p in paths if spec.matches(p))


def trainable_filter(*, classifier: bool = False, head_names: tuple[str, ...] = ('classifier',)):
    """An NNX filter selecting what LoRA fine-tuning trains.

    Args:
      classifier: also train the classification head (a freshly initialised head must learn).
      head_names: path components that identify head parameters (default ``('classifier',)``).

    Returns:
      An ``nnx`` filter: ``nnx.LoRAParam`` plus, with ``classifier=True``, every ``nnx.Param``
      whose path contains one of ``head_names``. Use as
      ``nnx.split(model, trainable_filter(...), ...)``.
    """
    if not classifier:
        return nnx.LoRAParam
    heads = [nnx.All(nnx.Param, nnx.PathContains(n)) for n in head_names]
    return nnx.Any(nnx.LoRAParam, *heads)


def merge_lora(
    params: Mapping[Any, Any], *, scale: float, rank_masks: Mapping[Any, Any] | None = None
) -> dict[Any, Any]:
    """Fold every adapter into its kernel: ``W' = W + s A diag(m_r) B``; drop the LoRA leaves.

    Args:
      params: a pure nested dict of parameters (``nnx.to_pure_dict(nnx.state(model, nnx.Param))``).
        A node holding ``kernel``, ``lora_a`` and ``lora_b`` is a LoRA linear layer.
      scale: the adapter scale ``alpha / rank`` (``LoraSpec.scale``); it is static model
        configuration, not a parameter, so it must be given.
      rank_masks: optional pytree mirroring ``params`` down to the LoRA layers, holding a ``[r]``
        mask at the layer node (missing = all ones).

    Returns:
      A new dict without ``lora_a``/``lora_b`` leaves, loadable into a model built with
      ``lora=None``. Inputs are not mutated.
    """

    def walk(node, masks):
        if not isinstance(node, Mapping):
            return node
        out = {}
        if 'lora_a' in node and 'kernel' in node:
            a, b = jnp.asarray(node['lora_a']), jnp.asarray(node['lora_b'])
            if masks is not None and not isinstance(masks, Mapping):
                a = a * jnp.asarray(masks, a.dtype)
            kernel = jnp.asarray(node['kernel'])
            out['kernel'] = (kernel + scale * (a @ b).astype(kernel.dtype)).astype(kernel.dtype)
            for k, v in node.items():
                if k not in ('kernel', 'lora_a', 'lora_b'):
                    out[k] = v
            return out
        for k, v in node.items():
            sub = masks.get(k) if isinstance(masks, Mapping) else None
            out[k] = walk(v, sub)
        return out

    return walk(params, rank_masks)


def lora_param_count(params: Mapping[Any, Any]) -> int:
    """The number of LoRA parameters (``lora_a``/``lora_b`` leaves) in a pure params dict."""
    total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        last = path[-1]
        if getattr(last, 'key', None) in ('lora_a', 'lora_b'):
            total += int(jnp.size(leaf))
    return total
