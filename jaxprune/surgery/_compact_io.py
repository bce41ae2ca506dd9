"""Save and load :func:`jaxprune.surgery._dims.compact` models (ATP/DISP exports) as a folder.

No ``LlamaConfig`` can describe the ragged per-layer dims of a compact model, so it is stored in
its own small format, next to (not instead of) the Hugging Face one:

* ``model.safetensors``: every leaf under a flat dotted key (``embed``, ``norm``, ``lm_head``
  (absent when tied), ``layers.{i}.attn_norm``, ``layers.{i}.attn.q``, ``layers.{i}.attn.in_idx``,
  ``layers.{i}.mlp.down``, ...); kernels keep their dtype, index arrays are ``int32``.
* ``jaxprune_compact.json``: ``format``/``version``, the ``LlamaConfig`` fields the forward needs
  (the config the compact params were cut with: rope, eps, head_dim, GQA, tying), the kept dims
  and projection parameters per layer, ``counts`` (``kept`` projection params, ``total`` float
  params, plus the caller's counts such as ``prunable``), ``density`` and the caller's ``meta``.

The JSON file is written last (both files via a temporary name and an atomic rename), so a folder
with a readable JSON file holds matching weights. :func:`load_compact` checks every tensor's
shape and dtype against the shapes the JSON implies and every index against its bound, so a
truncated or edited file fails with a message naming the key instead of a silent gather clamp.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import numpy as st_numpy

from jaxprune.surgery import _dims

FORMAT = 'jaxprune-compact-llama'
VERSION = 1
WEIGHTS_FILE = 'model.safetensors'
META_FILE = 'jaxprune_compact.json'
_INDEX_KEYS = ('in_idx', 'v_idx', 'o_idx', 'out_idx')
_HOW = ('written by jaxprune.surgery.save_compact (a `jaxprune train` run with prune.method=atp '
        'writes one to <run_dir>/pruned)')


def _config_dict(config: Any) -> dict[str, Any]:
    out = dataclasses.asdict(config)
    if out.get('rope_scaling') is not None:  # stored as sorted items; JSON wants a dict
        out['rope_scaling'] = dict(config.rope_scaling)
    return out


def _config_from(d: dict[str, Any], where: pathlib.Path) -> Any:
    from jaxprune import models

    fields = {f.name for f in dataclasses.fields(models.LlamaConfig) if f.init}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise ValueError(f'{where}: config has unknown LlamaConfig fields {unknown}; the folder '
                         'was written by a newer jaxprune (upgrade) or edited by hand')
    return models.LlamaConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def layer_summary(compact_params: Any, config: Any) -> list[dict[str, int]]:
    """Kept sizes per layer of a :func:`~jaxprune.surgery._dims.compact` pytree.

    Returns:
      one dict per layer: ``attn_in``, ``kv_groups``, ``v_cols``, ``ctx`` (o_proj rows),
      ``attn_out``, ``mlp_in``, ``mlp`` (neurons), ``mlp_out`` and ``params`` (its projection
      parameters).
    """
    out = []
    for layer in compact_params['layers']:
        a, m = layer['attn'], layer['mlp']
        row = {
            'attn_in': int(a['in_idx'].shape[0]),
            'kv_groups': int(a['k'].shape[1]) // config.head_dim,
            'v_cols': int(a['v_idx'].shape[0]), 'ctx': int(a['o_idx'].shape[0]),
            'attn_out': int(a['out_idx'].shape[0]), 'mlp_in': int(m['in_idx'].shape[0]),
            'mlp': int(m['gate'].shape[1]), 'mlp_out': int(m['out_idx'].shape[0]),
        }
        row['params'] = sum(int(np.prod(a[n].shape)) for n in ('q', 'k', 'v', 'o')) + sum(
            int(np.prod(m[n].shape)) for n in ('gate', 'up', 'down'))
        out.append(row)
    return out


def _expected(config: Any, layers: list[dict[str, int]]) -> dict[str, tuple[tuple[int, ...], Any]]:
    """``{flat key: (shape, bound)}``; ``bound`` is the index range for int32 leaves, else None."""
    width, hd, g = config.hidden_size, config.head_dim, config.q_per_kv
    out: dict[str, tuple[tuple[int, ...], Any]] = {
        'embed': ((config.vocab_size, width), None), 'norm': ((width,), None)}
    if not config.tie_word_embeddings:
        out['lm_head'] = ((width, config.vocab_size), None)
    for i, s in enumerate(layers):
        groups = s['kv_groups']
        p = f'layers.{i}'
        out |= {
            f'{p}.attn_norm': ((width,), None), f'{p}.mlp_norm': ((width,), None),
            f'{p}.attn.in_idx': ((s['attn_in'],), width),
            f'{p}.attn.q': ((s['attn_in'], groups * g * hd), None),
            f'{p}.attn.k': ((s['attn_in'], groups * hd), None),
            f'{p}.attn.v': ((s['attn_in'], s['v_cols']), None),
            f'{p}.attn.v_idx': ((s['v_cols'],), groups * hd),
            f'{p}.attn.o_idx': ((s['ctx'],), groups * g * hd),
            f'{p}.attn.o': ((s['ctx'], s['attn_out']), None),
            f'{p}.attn.out_idx': ((s['attn_out'],), width),
            f'{p}.mlp.in_idx': ((s['mlp_in'],), width),
            f'{p}.mlp.gate': ((s['mlp_in'], s['mlp']), None),
            f'{p}.mlp.up': ((s['mlp_in'], s['mlp']), None),
            f'{p}.mlp.down': ((s['mlp'], s['mlp_out']), None),
            f'{p}.mlp.out_idx': ((s['mlp_out'],), width),
        }
    return out


def _flatten(compact_params: Any) -> dict[str, np.ndarray]:
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(compact_params)[0]:
        key = '.'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)
        x = np.asarray(leaf)
        flat[key] = x.astype(np.int32) if key.rsplit('.', 1)[-1] in _INDEX_KEYS else x
    return flat


def _unflatten(flat: dict[str, np.ndarray], config: Any) -> dict[str, Any]:
    def block(i, name, keys):
        return {k: jnp.asarray(flat[f'layers.{i}.{name}.{k}']) for k in keys}

    layers = tuple({
        'attn_norm': jnp.asarray(flat[f'layers.{i}.attn_norm']),
        'mlp_norm': jnp.asarray(flat[f'layers.{i}.mlp_norm']),
        'attn': block(i, 'attn', ('in_idx', 'q', 'k', 'v', 'v_idx', 'o_idx', 'o', 'out_idx')),
        'mlp': block(i, 'mlp', ('in_idx', 'gate', 'up', 'down', 'out_idx')),
    } for i in range(config.num_layers))
    return {
        'embed': jnp.asarray(flat['embed']), 'norm': jnp.asarray(flat['norm']),
        'lm_head': None if config.tie_word_embeddings else jnp.asarray(flat['lm_head']),
        'layers': layers,
    }


def _check(flat: dict[str, np.ndarray], expected: dict[str, Any], where: pathlib.Path) -> None:
    missing = sorted(set(expected) - set(flat))
    extra = sorted(set(flat) - set(expected))
    if missing or extra:
        raise ValueError(f'{where}: tensors do not match {META_FILE}: missing {missing[:8]}, '
                         f'unexpected {extra[:8]}; re-export the model with save_compact')
    for key, (shape, bound) in expected.items():
        x = flat[key]
        if tuple(x.shape) != shape:
            raise ValueError(f'{where}: tensor {key!r} has shape {tuple(x.shape)}, expected '
                             f'{shape} from {META_FILE}; the files do not belong together '
                             '(re-export the model with save_compact)')
        if bound is None:
            if not jnp.issubdtype(x.dtype, jnp.floating):
                raise ValueError(f'{where}: tensor {key!r} has dtype {x.dtype}; expected floats')
        elif x.dtype != np.int32 or (x.size and (x.min() < 0 or x.max() >= bound)):
            raise ValueError(f'{where}: index tensor {key!r} must be int32 in [0, {bound}); '
                             f'found {x.dtype} in [{x.min() if x.size else None}, '
                             f'{x.max() if x.size else None}]')


def _atomic_write(path: pathlib.Path, write) -> None:
    tmp = path.with_name(path.name + '.tmp')
    write(tmp)
    os.replace(tmp, path)


def save_compact(
    path: str | pathlib.Path,
    compact_params: Any,
    config: Any,
    meta: dict[str, Any] | None = None,
) -> pathlib.Path:
    """Write a compact (dim-sliced) Llama as ``model.safetensors`` + ``jaxprune_compact.json``.

    Args:
      path: output folder (created; files in it are replaced).
      compact_params: a :func:`jaxprune.surgery._dims.compact` pytree (e.g. from
        ``jaxprune.methods.atp_export``).
      config: the ``LlamaConfig`` the compact params were cut with (the ``config`` that
        ``compact_forward`` takes).
      meta: JSON-serialisable extras stored under ``meta``; ``meta['counts']`` (e.g.
        ``atp_export``'s ``prunable``/``kept``/``kept_by_density``) is merged into the file's
        ``counts`` and ``density = kept / prunable`` is recorded when ``prunable`` is given.

    Returns:
      the folder.

    Raises:
      ValueError: ``meta`` is not JSON-serialisable, or ``meta['counts']['kept']`` differs from
        the stored projection parameter count.
    """
    path = pathlib.Path(path)
    meta = dict(meta or {})
    flat = _flatten(compact_params)
    layers = layer_summary(compact_params, config)
    _check(flat, _expected(config, layers), path)  # the config must describe the params
    counts = {**meta.get('counts', {}), 'kept': _dims.projection_param_count(compact_params),
              'total': _dims.param_count(compact_params)}
    given = meta.get('counts', {}).get('kept')
    if given is not None and int(given) != counts['kept']:
        raise ValueError(f"meta['counts']['kept']={given} but the compact params hold "
                         f"{counts['kept']} projection parameters; pass the counts of this export")
    record = {'format': FORMAT, 'version': VERSION, 'config': _config_dict(config),
              'layers': layers, 'counts': counts,
              'density': counts['kept'] / counts['prunable'] if counts.get('prunable') else None,
              'meta': meta}
    try:
        text = json.dumps(record, indent=2, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f'{meta=} must be JSON-serialisable (convert arrays with int()/float()): '
                         f'{e}') from e
    path.mkdir(parents=True, exist_ok=True)
    _atomic_write(path / WEIGHTS_FILE, lambda p: st_numpy.save_file(
        flat, str(p), metadata={'format': FORMAT, 'version': str(VERSION)}))
    _atomic_write(path / META_FILE, lambda p: p.write_text(text))
    return path


def load_compact(path: str | pathlib.Path) -> tuple[dict[str, Any], Any, dict[str, Any]]:
    """Read a folder written by :func:`save_compact`.

    Args:
      path: the folder.

    Returns:
      ``(compact_params, config, record)``: run with ``jaxprune.surgery.compact_forward(
      compact_params, ids, config=config)``; ``record`` is the JSON file without ``config``
      (``format``, ``version``, ``layers``, ``counts``, ``density``, ``meta``).

    Raises:
      FileNotFoundError: the folder or one of its two files is missing.
      ValueError: an unknown format or version, unreadable JSON/safetensors, or a tensor whose
        name, shape, dtype or index range does not match the JSON file.
    """
    path = pathlib.Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f'compact model folder {str(path)!r} does not exist; expected a '
                                f'folder {_HOW}')
    meta_file, w_file = path / META_FILE, path / WEIGHTS_FILE
    for f in (meta_file, w_file):
        if not f.is_file():
            raise FileNotFoundError(f'{str(f)!r} not found; expected a folder {_HOW}')
    try:
        record = json.loads(meta_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f'{meta_file} is not valid JSON ({e}); re-export the model') from e
    if not isinstance(record, dict) or record.get('format') != FORMAT:
        fmt = record.get('format') if isinstance(record, dict) else None
        raise ValueError(f'{meta_file}: format={fmt!r}; expected {FORMAT!r} ({_HOW})')
    if record.get('version') != VERSION:
        raise ValueError(f"{meta_file}: version={record.get('version')!r}; this jaxprune reads "
                         f'version {VERSION} (re-export the model or use a matching jaxprune)')
    config = _config_from(record['config'], meta_file)
    if len(record.get('layers', ())) != config.num_layers:
        raise ValueError(f"{meta_file}: {len(record.get('layers', ()))} layer entries but "
                         f'num_layers={config.num_layers}')
    try:
        flat = st_numpy.load_file(str(w_file))
    except Exception as e:  # safetensors raises its own error types for corrupt headers/data
        raise ValueError(f'{w_file} is unreadable ({type(e).__name__}: {e}); re-export the '
                         'model with save_compact') from e
    _check(flat, _expected(config, record['layers']), w_file)
    record = {k: v for k, v in record.items() if k != 'config'}
    return _unflatten(flat, config), config, record
