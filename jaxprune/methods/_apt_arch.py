"""Host-side architecture helpers for APT: configs, budget structures, rebuilt models.

Everything here runs outside ``jit`` at start-up, at pruning steps or on resume: the architecture
config of a run (without loading weights), the structures the density budget counts, a model
rebuilt at new shapes without running initializers, and keep vectors encoded for checkpoint
metadata.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprune import config as config_lib

Key = tuple[str, int | None]

# Top-level modules whose parameters the density budget leaves out (prune.count_embeddings=false).
EMBEDDING_MODULES = ('word_embed', 'pos_embed', 'type_embed', 'embed', 'lm_head')


def arch_config(run_cfg: config_lib.RunCfg) -> Any:
    """The architecture config of ``run_cfg.model`` without loading weights."""
    from jaxprune import models
    from jaxprune.train import _factory

    m = run_cfg.model
    if m.name_or_path == 'tiny-bert':
        return models.BertConfig.tiny(vocab_size=_factory.TINY_VOCAB, num_labels=m.num_labels)
    if m.name_or_path == 'tiny-llama':
        return models.LlamaConfig.tiny(vocab_size=_factory.TINY_VOCAB)
    from jaxprune import assets

    path = pathlib.Path(assets.resolve_model(m.name_or_path))
    if not (path / 'config.json').is_file():  # e.g. a .gguf file: load once for the config
        num_labels = m.num_labels if m.task == 'classification' else None
        return models.load_pretrained(path, num_labels=num_labels)[1]
    hf = json.loads((path / 'config.json').read_text())
    if hf.get('model_type') in ('bert', 'roberta'):
        return models.BertConfig.from_hf(hf, num_labels=m.num_labels)
    return models.LlamaConfig.from_hf(hf)


def budget_structures(structures: Any, shapes: dict, *, count_embeddings: bool) -> tuple:
    """Structures for the density budget: embedding/LM-head slices dropped unless counted.

    Surgery keeps using the full structures (it must slice the embeddings too); the budget and
    salience density then refer to the block parameters only.
    """
    if count_embeddings:
        return tuple(structures)
    out = []
    for s in structures:
        slices = tuple(sl for sl in s.slices if sl.path[0] not in EMBEDDING_MODULES)
        if len(slices) != len(s.slices):
            ppu = sum(
                sl.width * math.prod(d for i, d in enumerate(shapes[sl.path]) if i != sl.axis)
                for sl in slices
            )
            s = dataclasses.replace(s, slices=slices, params_per_unit=ppu)
        out.append(s)
    return tuple(out)


def rebuild_model(model: nnx.Module, config: Any, params: Any) -> nnx.Module:
    """``surgery.rebuild_model`` without running the initializers (``nnx.eval_shape``).

    Same result (params from ``params``, every adapter keeps its ``lora_scale``), but no random
    init is compiled and run for the new shapes, which dominates a pruning step otherwise.
    """
    from jaxprune.surgery import _prune

    spec = _prune._lora_spec_from_params(params)
    new = abstract_model(model, config, spec, jax.tree.leaves(params)[0].dtype)
    state = nnx.state(new, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(new, state)
    return new


def abstract_model(model: nnx.Module, config: Any, spec: Any, dtype: Any) -> nnx.Module:
    """``type(model)`` for ``config`` with abstract params; adapters keep ``model``'s scales."""
    from jaxprune.surgery import _prune

    new = nnx.eval_shape(
        lambda: type(model)(config, lora=spec, param_dtype=dtype, rngs=nnx.Rngs(0))
    )
    for path, scale in _prune._lora_scales(model).items():
        _prune._get_module(new, path).lora_scale = scale
    return new


def encode_keep(keep: dict[Key, np.ndarray]) -> dict[str, str]:
    """Keep vectors as JSON: ``'kind/layer'`` -> packed bits in hex (a few KB per step)."""
    return {f'{k}/{layer}': np.packbits(np.asarray(v, bool)).tobytes().hex()
            for (k, layer), v in keep.items()}


def decode_keep(encoded: dict[str, str], structures: Any) -> dict[Key, np.ndarray]:
    out = {}
    for st in structures:
        bits = np.frombuffer(bytes.fromhex(encoded[f'{st.kind}/{st.layer}']), np.uint8)
        out[(st.kind, st.layer)] = np.unpackbits(bits, count=st.size).astype(bool)
    return out


def prune_tree(tree: Any, keep: dict[Key, np.ndarray], structures: Any) -> Any:
    """``surgery.prune_like`` as one jitted gather program (as at a live pruning step)."""
    from jaxprune import surgery

    return jax.jit(lambda t: surgery.prune_like(t, keep, structures))(tree)


def same_shapes(a: Any, b: Any) -> bool:
    """Same tree structure and leaf shapes (trace-time check)."""
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    return ta == tb and all(jnp.shape(x) == jnp.shape(y) for x, y in zip(la, lb))


def setting(run_cfg: Any, dotted: str) -> Any:
    value = run_cfg
    for name in dotted.split('.'):
        value = getattr(value, name)
    return value
