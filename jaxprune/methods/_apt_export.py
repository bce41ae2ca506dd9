"""Export of an APT-pruned model: a folder jaxprune loads back, and an HF folder when possible.

Layout of the folder written by :func:`save_pruned`::

    jaxprune.json           {'format': 'jaxprune-pruned', 'version': 1, 'arch': 'bert'|'llama',
                             'config': {...}}   # the full config, per-layer heads/neurons included
    jaxprune.safetensors    flat NNX parameter names (``layers.0.attn.query.kernel``), LoRA merged
    config.json             \\ only when the pruned shape is representable by transformers
    model.safetensors       /  (uniform layers; BERT also needs heads * head_dim == hidden size)

LoRA adapters are folded into the kernels with their rank masks applied
(:math:`W + s\\,A\\,\\mathrm{diag}(m)\\,B`), so the exported model has no adapters and no masks.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import numpy as st_numpy

FORMAT = 'jaxprune-pruned'
CONFIG_FILE = 'jaxprune.json'
WEIGHTS_FILE = 'jaxprune.safetensors'


def _arch_name(config: Any) -> str:
    from jaxprune import models

    if isinstance(config, models.BertConfig):
        return 'bert'
    if isinstance(config, models.LlamaConfig):
        return 'llama'
    raise TypeError(f'{type(config)=} must be BertConfig or LlamaConfig')


def merged_params(
    model: nnx.Module, rank_masks: Mapping[tuple[Any, ...], jax.Array] | None = None
) -> dict[str, np.ndarray]:
    """Flat ``{dotted_name: array}`` params with every adapter folded into its kernel.

    Args:
      model: a ``Llama`` or ``BertForSequenceClassification`` (adapters optional).
      rank_masks: ``{module_path: f32[R]}``; an adapter without a mask uses all its ranks.

    Returns:
      Float32 numpy arrays keyed like ``layers.0.attn.query.kernel`` (no ``lora_*`` entries).
    """
    from jaxprune.models import _layers

    rank_masks = {tuple(k): v for k, v in (rank_masks or {}).items()}
    flat = _flat(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    for mpath, module in nnx.iter_modules(model):
        if isinstance(module, _layers.Linear) and module.lora_rank:
            name = '.'.join(str(p) for p in mpath)
            a, b = flat.pop(f'{name}.lora_a'), flat.pop(f'{name}.lora_b')
            m = rank_masks.get(tuple(mpath))
            m = np.ones(a.shape[-1], np.float32) if m is None else np.asarray(m, np.float32)
            flat[f'{name}.kernel'] = flat[f'{name}.kernel'] + module.lora_scale * ((a * m) @ b)
    return flat


def _flat(tree: Any, prefix: str = '') -> dict[str, np.ndarray]:
    out = {}
    for k, v in tree.items():
        name = f'{prefix}{k}'
        if isinstance(v, Mapping):
            out.update(_flat(v, name + '.'))
        else:
            out[name] = np.asarray(jnp.asarray(v, jnp.float32))
    return out


def _plain_model(config: Any, flat: Mapping[str, np.ndarray], dtype: Any) -> nnx.Module:
    from jaxprune import models

    rngs = nnx.Rngs(0)
    if isinstance(config, models.BertConfig):
        model = models.BertForSequenceClassification(config, param_dtype=dtype, rngs=rngs)
    else:
        model = models.Llama(config, param_dtype=dtype, rngs=rngs)
    state = nnx.state(model, nnx.Param)
    pure = nnx.to_pure_dict(state)
    names = set(_flat(pure))
    if names != set(flat):
        missing, extra = sorted(names - set(flat)), sorted(set(flat) - names)
        raise ValueError(
            f'pruned weights do not match the config: {missing=} {extra=}; the folder is '
            'inconsistent (re-export it)'
        )
    for name, value in flat.items():
        node = pure
        parts = [int(p) if p.isdigit() else p for p in name.split('.')]
        for p in parts[:-1]:
            node = node[p]
        want = tuple(node[parts[-1]].shape)
        if tuple(value.shape) != want:
            raise ValueError(f'tensor {name!r}: expected shape {want}, found {value.shape}')
        node[parts[-1]] = jnp.asarray(value, dtype)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)
    return model


def uniform_config(config: Any) -> Any:
    """The same architecture without per-layer sizes when every layer has the same shape.

    Pruning leaves ``layer_heads``/``layer_mlp`` set even when all layers agree; Hugging Face
    configs need the global ``num_heads``/``intermediate_size`` instead. Returns ``config``
    unchanged when the layers differ.
    """
    heads = {config.heads(i) for i in range(config.num_layers)}
    mlp = {config.mlp(i) for i in range(config.num_layers)}
    if len(heads) != 1 or len(mlp) != 1:
        return config
    (h,), (f,) = heads, mlp
    kw = {'num_heads': h, 'intermediate_size': f, 'layer_heads': None, 'layer_mlp': None}
    if 'num_kv_heads' in {f.name for f in dataclasses.fields(config)}:
        kw['num_kv_heads'] = h // config.q_per_kv
    return dataclasses.replace(config, **kw)


def save_pruned(
    model: nnx.Module,
    config: Any,
    path: str | pathlib.Path,
    *,
    rank_masks: Mapping[tuple[Any, ...], jax.Array] | None = None,
    hf: bool = True,
) -> dict[str, Any]:
    """Write a pruned model as a jaxprune folder (+ a transformers folder when representable).

    Args:
      model: the (physically pruned) model, LoRA adapters allowed.
      config: its config (``layer_heads`` / ``layer_mlp`` per layer).
      path: output folder (created).
      rank_masks: LoRA rank masks ``{module_path: f32[R]}`` applied when folding adapters.
      hf: also write ``config.json`` + ``model.safetensors`` through
        ``jaxprune.models.save_pretrained`` when ``config.to_hf()`` accepts the shapes.

    Returns:
      ``{'path', 'hf': bool, 'hf_reason': str | None, 'params': int}``.
    """
    from jaxprune import models

    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    flat = merged_params(model, rank_masks)
    st_numpy.save_file(flat, str(path / WEIGHTS_FILE), metadata={'format': FORMAT})
    cfg_dict = dataclasses.asdict(config)
    if cfg_dict.get('rope_scaling') is not None:  # stored as sorted items; JSON wants a dict
        cfg_dict['rope_scaling'] = dict(config.rope_scaling)
    meta = {'format': FORMAT, 'version': 1, 'arch': _arch_name(config), 'config': cfg_dict}
    (path / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    info = {'path': str(path), 'hf': False, 'hf_reason': None,
            'params': int(sum(v.size for v in flat.values()))}
    if hf:
        hf_config = uniform_config(config)
        try:
            hf_config.to_hf()
        except ValueError as e:
            info['hf_reason'] = str(e)
        else:
            plain = _plain_model(hf_config, flat, jnp.float32)
            models.save_pretrained(plain, hf_config, path)
            info['hf'] = True
    return info


def load_pruned(path: str | pathlib.Path, *, dtype: Any = jnp.float32) -> tuple[nnx.Module, Any]:
    """Load a folder written by :func:`save_pruned` (per-layer sizes restored).

    Raises:
      FileNotFoundError: the folder has no ``jaxprune.json`` / ``jaxprune.safetensors``.
      ValueError: an unknown format or architecture, or weights that do not fit the config.
    """
    from jaxprune import models

    path = pathlib.Path(path)
    cfg_file, w_file = path / CONFIG_FILE, path / WEIGHTS_FILE
    for f in (cfg_file, w_file):
        if not f.is_file():
            raise FileNotFoundError(f'{f=} not found; pass a folder written by save_pruned')
    meta = json.loads(cfg_file.read_text())
    if meta.get('format') != FORMAT:
        raise ValueError(f"{cfg_file}: format={meta.get('format')!r}; expected {FORMAT!r}")
    cls = {'bert': models.BertConfig, 'llama': models.LlamaConfig}.get(meta.get('arch'))
    if cls is None:
        raise ValueError(f"{cfg_file}: arch={meta.get('arch')!r} must be 'bert' or 'llama'")
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    kw = {k: tuple(v) if isinstance(v, list) else v
          for k, v in meta['config'].items() if k in fields}
    config = cls(**kw)
    return _plain_model(config, st_numpy.load_file(str(w_file)), dtype), config
