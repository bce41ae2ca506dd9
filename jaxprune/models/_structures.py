"""Prunable structures as data: which parameter slices each head group, neuron or hidden dim owns.

Structures are derived from the logical axis names on the parameters of an abstract model
(``nnx.eval_shape``), so the tables cannot drift from the modules:

- ``'heads'`` (per layer): one KV group and its ``q_per_kv`` query heads (plain heads for MHA).
  Owns ``q_per_kv * head_dim`` columns/rows on ``heads`` axes and ``head_dim`` on ``kv_heads`` axes.
- ``'mlp'`` (per layer): one FFN neuron, width 1 on ``mlp`` axes.
- ``'hidden'`` (global, ``layer=None``): one residual-stream dim, width 1 on ``embed`` axes of every
  parameter (embeddings, norms, projections, LoRA factors, head inputs).

Biases and LoRA factors are included through the same axis names.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable
from typing import Any

from flax import nnx

from jaxprune import typing as jpt
from jaxprune.lora import _spec as lora_spec
from jaxprune.models import _bert, _llama


@dataclasses.dataclass(frozen=True)
class Slice:
    """Unit ``i`` owns ``[i * width, (i + 1) * width)`` along ``axis`` of the param at ``path``."""

    path: tuple[str | int, ...]
    axis: int
    width: int


@dataclasses.dataclass(frozen=True)
class Structure:
    """A family of ``size`` prunable units of one ``kind`` in one ``layer`` (None = global)."""

    kind: str
    layer: int | None
    size: int
    params_per_unit: int
    slices: tuple[Slice, ...]


def _resolve_lora(lora_targets, lora_rank, lora):
    if lora is not None:
        return lora
    targets = tuple(lora_targets)
    if not targets:
        return None
    if lora_rank < 1:
        raise ValueError(f'{lora_rank=} must be >= 1 when lora_targets are given')
    return lora_spec.LoraSpec(
        rank=lora_rank, alpha=float(lora_rank), targets='|'.join(re.escape(t) for t in targets)
    )


def abstract_params(config: Any, *, lora: lora_spec.LoraSpec | None = None) -> nnx.State:
    """The ``nnx.Param`` state of a model for ``config`` as shape/dtype structs (no compute)."""
    if isinstance(config, _llama.LlamaConfig):
        build = lambda: _llama.Llama(config, lora=lora, rngs=nnx.Rngs(0))
    elif isinstance(config, _bert.BertConfig):
        build = lambda: _bert.BertForSequenceClassification(config, lora=lora, rngs=nnx.Rngs(0))
    else:
        raise TypeError(f'{type(config)=} must be LlamaConfig or BertConfig')
    return nnx.state(nnx.eval_shape(build), nnx.Param)


def _leaves(config, lora):
    """(path, shape, axes) for every parameter."""
    state = abstract_params(config, lora=lora)
    out = []
    for path, var in nnx.to_flat_state(state):
        axes = var.get_metadata().get('out_sharding')
        out.append((tuple(path), tuple(var.shape), tuple(axes)))
    return out


def structures(
    config: Any,
    *,
    lora_targets: Iterable[str] = (),
    lora_rank: int = 0,
    lora: lora_spec.LoraSpec | None = None,
) -> tuple[Structure, ...]:
    """All prunable structures of a model: per layer ``'heads'`` and ``'mlp'``, then ``'hidden'``.

    Args:
      config: a ``LlamaConfig`` or ``BertConfig`` (per-layer sizes respected).
      lora_targets: dotted module paths with LoRA adapters (e.g. ``'layers.0.attn.q_proj'``);
        requires ``lora_rank``.
      lora_rank: adapter rank for ``lora_targets``.
      lora: alternatively a ``LoraSpec`` (overrides ``lora_targets``/``lora_rank``).

    Returns:
      A tuple of ``Structure``. ``params_per_unit`` is exact for the given config:
      :math:`\\sum_{slices} \\text{width} \\cdot \\prod_{d \\ne axis} \\text{shape}_d`.

    Raises:
      ValueError: ``lora_targets`` without a rank.
    """
    spec = _resolve_lora(lora_targets, lora_rank, lora)
    leaves = _leaves(config, spec)
    hd, g = config.head_dim, config.q_per_kv
    width_of = {
        'heads': {jpt.HEADS: g * hd, jpt.KV_HEADS: hd},
        'mlp': {jpt.MLP: 1},
        'hidden': {jpt.EMBED: 1},
    }
    sizes = {'heads': config.kv_heads, 'mlp': config.mlp}

    def build(kind, layer, size):
        slices, ppu = [], 0
        for path, shape, axes in leaves:
            if layer is not None and not (path[0] == 'layers' and path[1] == layer):
                continue
            hits = [
                (ax, width_of[kind][name]) for ax, name in enumerate(axes) if name in width_of[kind]
            ]
            if len(hits) > 1:
                raise ValueError(f'{path=} has two {kind} axes {axes=}; structures assume one')
            for ax, w in hits:
                slices.append(Slice(path, ax, w))
                ppu += w * math.prod(s for i, s in enumerate(shape) if i != ax)
        return Structure(kind, layer, size, ppu, tuple(slices))

    out = []
    for layer in range(config.num_layers):
        for kind in ('heads', 'mlp'):
            out.append(build(kind, layer, sizes[kind](layer)))
    out.append(build('hidden', None, config.hidden_size))
    return tuple(out)


def param_count(config: Any, *, lora: lora_spec.LoraSpec | None = None) -> int:
    """Total number of parameters (LoRA factors included when ``lora`` is given)."""
    return sum(math.prod(shape) for _, shape, _ in _leaves(config, lora))


def prunable_param_count(config: Any) -> int:
    """Parameters owned by head groups and FFN neurons (attention and FFN projections).

    This is the denominator for "fraction of block parameters kept"; embeddings, norms, the
    output head and the attention/FFN output biases are not included.
    """
    return sum(s.size * s.params_per_unit for s in structures(config) if s.kind != 'hidden')
