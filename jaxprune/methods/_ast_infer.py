"""Sparse inference for AST: compressed 2:4 weights, evaluation, greedy generation, export.

Design: a trained AST model keeps dense kernels and masks in the optimizer state.
:func:`compress_model` turns every masked ``Linear`` into a compressed one (``Sparse24`` values and
metadata as non-trainable variables, kernel dropped); its forward then runs through
``jaxprune.kernels.sparse24.sparse24_matmul`` (dispatch: the XLA path on CPU/GPU, Pallas on TPU),
so evaluation and generation read only the compressed weights. :func:`export_sparse24` writes an
HF folder in the compressed-tensors ``sparse-24-bitmask`` layout (per sparse Linear
``<module>.compressed`` = kept values ``[N, K/2]`` in K order, ``<module>.bitmask`` = packed keep
bits ``uint8[N, ceil(K/8)]`` little-endian, ``<module>.shape`` = ``[N, K]``, HF ``(out, in)``
orientation, so 2:4 runs along ``in`` = our K) and :func:`load_sparse24` reads it back.
"""

from __future__ import annotations

import copy
import functools
import json
import pathlib
import tempfile
import time
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import numpy as st_numpy

from jaxprune.kernels import sparse24
from jaxprune.masks import _nm
from jaxprune.methods import _calibrate

FORMAT = 'sparse-24-bitmask'


class Sparse24Values(nnx.Variable):
    """``[2, K/4, N]`` kept values of a compressed kernel (not trained)."""


class Sparse24Meta(nnx.Variable):
    """``uint8[ceil(K/8), N]`` packed 2-bit positions of a compressed kernel."""


def mask_dict(masks: Any) -> dict[str, jax.Array]:
    """``{kernel path: bool[K, N]}`` from a masks pytree (``None`` leaves = dense) or a dict."""
    if isinstance(masks, dict) and masks and all(isinstance(k, str) and '.' in k for k in masks):
        return dict(masks)
    flat = jax.tree_util.tree_flatten_with_path(masks, is_leaf=lambda x: x is None)[0]
    return {_nm.path_str(p): v for p, v in flat if v is not None}


def compress_model(model: nnx.Module, masks: Any, *, implementation: str | None = None
                   ) -> list[str]:
    """Replaces every masked Linear kernel by its compressed 2:4 form, in place.

    The kept values are ``W * M`` (so a dense AST model with its masks becomes the masked model);
    a SLoRB bypass, if present, stays dense. Kernels must be exactly 2:4 along K under ``M``.

    Args:
      model: an NNX model with ``Linear`` layers.
      masks: masks pytree over ``nnx.state(model, nnx.Param)`` or ``{kernel path: mask}``.
      implementation: ``sparse24_matmul`` implementation (``None`` = dispatch default,
        ``'xla'``, ``'pallas'``).

    Returns:
      The kernel paths that were compressed.

    Raises:
      ValueError: a mask is not 2:4 along K, or a Linear carries LoRA.
    """
    md = mask_dict(masks)
    done = []
    for key, lin in _calibrate._linears(model, '.'):
        if key not in md:
            continue
        if lin.lora_rank:
            raise ValueError(f'{key}: merge LoRA into the kernel before compressing')
        s = sparse24.from_mask(lin.kernel[...], jnp.asarray(md[key], bool))
        lin.sparse24_values = Sparse24Values(s.values)
        lin.sparse24_meta = Sparse24Meta(s.meta)
        lin.sparse24_impl = implementation
        lin.kernel = None
        done.append(key)
    missing = set(md) - set(done)
    if missing:
        raise ValueError(f'masks name kernels the model lacks: {sorted(missing)[:3]}')
    return done


def weight_bytes(model: nnx.Module) -> dict[str, int]:
    """Bytes of the model's weights: ``total``, and ``sparse`` (compressed kernels only)."""
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    comp = jax.tree.leaves(nnx.state(model, Sparse24Values, Sparse24Meta))
    sparse = sum(int(x.nbytes) for x in comp)
    return {'total': sum(int(x.nbytes) for x in params) + sparse, 'sparse': sparse}


@functools.cache
def _loss_fn(graphdef):
    @jax.jit
    def fn(state, ids, labels):
        logits = nnx.merge(graphdef, state)(ids).astype(jnp.float32)
        valid = labels >= 0
        lp = jax.nn.log_softmax(logits, -1)
        nll = -jnp.take_along_axis(lp, jnp.where(valid, labels, 0)[..., None], -1)[..., 0]
        return jnp.sum(jnp.where(valid, nll, 0.0)), jnp.sum(valid)

    return fn


def eval_perplexity(model: nnx.Module, batches: Iterable[dict[str, Any]]) -> dict[str, float]:
    """Token-level perplexity of a causal LM over ``{'input_ids', 'labels'}`` batches (labels
    already shifted; negative labels ignored). Returns ``{'loss', 'perplexity', 'tokens'}``."""
    graphdef, state = nnx.split(model)
    fn = _loss_fn(graphdef)
    tot, cnt = 0.0, 0
    for b in batches:
        s, c = fn(state, jnp.asarray(b['input_ids']), jnp.asarray(b['labels']))
        tot += float(s)
        cnt += int(c)
    if not cnt:
        raise ValueError('no valid tokens in batches; pass non-empty eval batches')
    loss = tot / cnt
    return {'loss': loss, 'perplexity': float(np.exp(min(loss, 80.0))), 'tokens': cnt}


def generate(model: nnx.Module, prompt: jax.typing.ArrayLike, *, max_new_tokens: int,
             timing: bool = False) -> np.ndarray | tuple[np.ndarray, float]:
    """Greedy decoding (no KV cache: each token re-runs the fixed-length buffer, one compile).

    Args:
      model: a causal LM (dense or compressed).
      prompt: ``int32[B, P]`` prompt ids.
      max_new_tokens: tokens to generate.
      timing: also return the mean seconds per generated token (compile excluded: the first
        token is generated once before timing).

    Returns:
      ``int32[B, P + max_new_tokens]`` (and seconds per token with ``timing``).
    """
    prompt = np.asarray(prompt, np.int32)
    bsz, plen = prompt.shape
    total = plen + max_new_tokens
    buf = np.zeros((bsz, total), np.int32)
    buf[:, :plen] = prompt
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, buf, pos):
        logits = nnx.merge(graphdef, state)(buf)
        nxt = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, pos - 1, 1, False), -1)
        return jax.lax.dynamic_update_index_in_dim(buf, nxt.astype(buf.dtype), pos, 1)

    out = jnp.asarray(buf)
    if timing:
        jax.block_until_ready(step(state, out, jnp.int32(plen)))
    t0 = time.perf_counter()
    for pos in range(plen, total):
        out = step(state, out, jnp.int32(pos))
    out = np.asarray(jax.block_until_ready(out))
    dt = (time.perf_counter() - t0) / max(max_new_tokens, 1)
    return (out, dt) if timing else out


# ---------------------------------------------------------------------------------------------
# HF compressed-tensors-style export.


def _hf_keys(config: Any, paths: Iterable[str]) -> dict[str, str]:
    from jaxprune.models import _hf

    prefix, rules = _hf.ARCHITECTURES[config.to_hf()['model_type']]
    out = {}
    for p in paths:
        rule, fields = _hf._find_rule(rules, p)
        out[p] = (prefix if rule.prefixed else '') + rule.hf_key(fields)
    return out


def pack_bitmask(w_hf: np.ndarray, keep_hf: np.ndarray) -> dict[str, np.ndarray]:
    """compressed-tensors 2:4 bitmask triple of an HF ``(N, K)`` weight and keep mask."""
    # safetensors writes raw memory: every array must be C-contiguous (a transposed mask is not).
    w_hf = np.ascontiguousarray(w_hf)
    keep_hf = np.ascontiguousarray(keep_hf, bool)
    n, k = w_hf.shape
    if not np.all(keep_hf.reshape(n, k // 4, 4).sum(-1) == 2):
        raise ValueError('keep mask is not exactly 2:4 along K (the HF input axis)')
    return {'compressed': np.ascontiguousarray(w_hf[keep_hf].reshape(n, k // 2)),
            'bitmask': np.ascontiguousarray(np.packbits(keep_hf, axis=1, bitorder='little')),
            'shape': np.asarray([n, k], np.int64)}


def unpack_bitmask(compressed: np.ndarray, bitmask: np.ndarray, shape: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`pack_bitmask`: ``(w_hf, keep_hf)`` of shape ``(N, K)``."""
    n, k = (int(x) for x in shape)
    keep = np.unpackbits(bitmask, axis=1, count=k, bitorder='little').astype(bool)
    w = np.zeros((n, k), compressed.dtype)
    w[keep] = compressed.reshape(-1)
    return w, keep


def export_sparse24(model: nnx.Module, config: Any, masks: Any, path: str | pathlib.Path
                    ) -> pathlib.Path:
    """Writes an HF folder with every masked Linear in the 2:4 bitmask layout.

    Args:
      model: the dense-weight model (kernels are masked here; LoRA is merged by the dense export;
        SLoRB weights are written as ``<module>.slorb`` ``(K/k, N)`` with ``slorb_k`` in the
        config).
      config: its ``LlamaConfig``/``BertConfig``.
      masks: masks pytree or ``{kernel path: mask}`` (2:4 along K).
      path: output folder.

    Returns:
      The folder. ``config.json`` gets a ``quantization_config`` naming the format.
    """
    from jaxprune.models import _hf

    md = mask_dict(masks)
    path = pathlib.Path(path)
    plain = copy.deepcopy(model)  # the HF rule table knows no SLoRB: write it separately below
    for _, lin in _calibrate._linears(plain, '.'):
        if getattr(lin, 'slorb', None) is not None:
            del lin.slorb
            del lin.slorb_k
    _hf.save_pretrained(plain, config, path)
    del plain
    tensors = st_numpy.load_file(str(path / 'model.safetensors'))
    keys = _hf_keys(config, md)
    slorb_k = None
    for p, key in keys.items():
        w = tensors.pop(key)
        keep = np.asarray(md[p], bool).T
        module = key.removesuffix('.weight')
        for name, arr in pack_bitmask(np.where(keep, w, 0).astype(w.dtype), keep).items():
            tensors[f'{module}.{name}'] = arr
    for key, lin in _calibrate._linears(model, '.'):
        s = getattr(lin, 'slorb', None)
        if s is not None:
            module = _hf_keys(config, [key])[key].removesuffix('.weight')
            tensors[f'{module}.slorb'] = np.asarray(s[...], np.float32)
            slorb_k = int(lin.slorb_k)
    st_numpy.save_file(tensors, str(path / 'model.safetensors'), metadata={'format': 'pt'})
    cfg = json.loads((path / 'config.json').read_text())
    cfg['quantization_config'] = {
        'quant_method': 'compressed-tensors', 'format': FORMAT,
        'sparsity_config': {'format': FORMAT, 'sparsity_structure': '2:4', 'targets': ['Linear'],
                            'ignore': ['lm_head'], 'global_sparsity': 0.5},
        'jaxprune_slorb_k': slorb_k}
    (path / 'config.json').write_text(json.dumps(cfg, indent=2))
    return path


def load_sparse24(path: str | pathlib.Path, *, implementation: str | None = None,
                  dtype: Any = jnp.float32) -> tuple[nnx.Module, Any, dict[str, np.ndarray]]:
    """Loads an :func:`export_sparse24` folder as a compressed model.

    Returns:
      ``(model, config, masks)``: the model with compressed 2:4 Linears (and SLoRB bypasses),
      its config and ``{kernel path: bool[K, N]}``.

    Raises:
      FileNotFoundError: no ``config.json`` / ``model.safetensors``.
    """
    from jaxprune.models import _hf

    path = pathlib.Path(path)
    if not (path / 'config.json').is_file() or not (path / 'model.safetensors').is_file():
        raise FileNotFoundError(f'{str(path)!r} lacks config.json or model.safetensors; pass an '
                                'export_sparse24 folder')
    cfg = json.loads((path / 'config.json').read_text())
    qcfg = cfg.pop('quantization_config', {}) or {}
    tensors = st_numpy.load_file(str(path / 'model.safetensors'))
    hf_masks, slorbs = {}, {}
    for key in [k for k in tensors if k.endswith('.bitmask')]:
        module = key.removesuffix('.bitmask')
        w, keep = unpack_bitmask(tensors.pop(f'{module}.compressed'), tensors.pop(key),
                                 tensors.pop(f'{module}.shape'))
        tensors[f'{module}.weight'] = w
        hf_masks[f'{module}.weight'] = keep
    for key in [k for k in tensors if k.endswith('.slorb')]:
        slorbs[key.removesuffix('.slorb') + '.weight'] = tensors.pop(key)
    with tempfile.TemporaryDirectory() as tmp:
        st_numpy.save_file(tensors, str(pathlib.Path(tmp) / 'model.safetensors'))
        (pathlib.Path(tmp) / 'config.json').write_text(json.dumps(cfg))
        model, config = _hf.load_pretrained(tmp, dtype=dtype)
    paths = [key for key, _ in _calibrate._linears(model, '.')]
    keys = _hf_keys(config, paths)
    masks = {p: hf_masks[k].T for p, k in keys.items() if k in hf_masks}
    k_slorb = qcfg.get('jaxprune_slorb_k')
    for p, lin in _calibrate._linears(model, '.'):
        if keys[p] in slorbs:
            lin.slorb = nnx.Param(jnp.asarray(slorbs[keys[p]], dtype),
                                  out_sharding=(None, None), eager_sharding=False)
            lin.slorb_k = int(k_slorb)
    compress_model(model, masks, implementation=implementation)
    return model, config, masks


