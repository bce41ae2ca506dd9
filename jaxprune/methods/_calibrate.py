"""Calibration: input statistics of the linear layers for Wanda and SparseGPT.

Design: a ``Linear`` that carries an ``input_gram`` variable accumulates :math:`X^\\top X` of its
(masked) inputs during an ordinary forward (``jaxprune.models._layers``); this module attaches
those variables, runs the model functionally under ``jit`` (``nnx.split``/``merge``), reads them
back and detaches them. Every statistic is keyed by the dotted path of the kernel in
``nnx.state(model, nnx.Param)`` (``'layers.3.attn.q_proj.kernel'``), the key that
``wanda_scores`` and ``sparsegpt_prune_params`` look up.

* :func:`collect_input_grams` / :func:`collect_input_norms`: one pass over the calibration set
  (Wanda's :math:`\\|X_k\\|_2 = \\sqrt{(X^\\top X)_{kk}}`).
* :func:`sparsegpt_sequential`: SparseGPT's block-by-block procedure for Llama, where block
  ``l`` is calibrated on the outputs of the already pruned blocks ``< l`` (as in the reference
  ``llama.py``: all sublayers of a block see the inputs of the unpruned block).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprune.masks import _nm
from jaxprune.methods import _oneshot
from jaxprune.models import _layers


class InputGram(nnx.Variable):
    """``f32[K, K]`` running :math:`\\sum_t x_t x_t^\\top` of one Linear's inputs."""


def _linears(module: nnx.Module, include: str) -> list[tuple[str, _layers.Linear]]:
    pattern = re.compile(include)
    out = []
    for path, mod in nnx.iter_graph(module):
        if isinstance(mod, _layers.Linear):
            key = '.'.join(str(p) for p in path) + '.kernel'
            if pattern.search(key):
                out.append((key, mod))
    return out


def attach_grams(module: nnx.Module, *, include: str = _nm.DEFAULT_INCLUDE) -> list[str]:
    """Attaches a zero :class:`InputGram` to every matching Linear; returns their kernel paths."""
    found = _linears(module, include)
    if not found:
        raise ValueError(f'{include=} matches no Linear kernel; e.g. {_nm.DEFAULT_INCLUDE!r}')
    for _, lin in found:
        k = lin.in_features
        lin.input_gram = InputGram(jnp.zeros((k, k), jnp.float32))
    return [key for key, _ in found]


def detach_grams(module: nnx.Module) -> dict[str, jax.Array]:
    """Removes every :class:`InputGram` and returns ``{kernel path: gram}``."""
    out = {}
    for key, lin in _linears(module, '.'):
        gram = getattr(lin, 'input_gram', None)
        if gram is not None:
            out[key] = gram[...]
            del lin.input_gram
    return out


def _ids(batch: Any) -> jax.Array:
    return jnp.asarray(batch['input_ids'] if isinstance(batch, dict) else batch)


def collect_input_grams(
    model: nnx.Module, batches: Iterable[Any], *, include: str = _nm.DEFAULT_INCLUDE
) -> dict[str, jax.Array]:
    r"""Gram matrices :math:`H = \sum_t x_t x_t^\top` of the inputs of every matching kernel.

    Args:
      model: an NNX model called as ``model(input_ids)`` (Llama, or BERT without padding).
      batches: iterable of ``int32[B, T]`` token ids or dicts with ``input_ids`` (packed LM
        windows: no padding, so every token counts).
      include: leaf-path regex of the kernels (default: every kernel under ``layers``).

    Returns:
      ``{'layers.0.attn.q_proj.kernel': f32[K, K], ...}`` summed over all tokens (SparseGPT's
      ``2/n`` factor is omitted: its algorithm is scale-invariant).

    Raises:
      ValueError: if ``include`` matches no kernel or ``batches`` is empty.
    """
    attach_grams(model, include=include)
    try:
        graphdef, grams, rest = nnx.split(model, InputGram, ...)

        @jax.jit
        def step(grams, rest, ids):
            m = nnx.merge(graphdef, grams, rest)
            m(ids)
            return nnx.state(m, InputGram)

        count = 0
        for batch in batches:
            grams = step(grams, rest, _ids(batch))
            count += 1
        if not count:
            raise ValueError('batches is empty; pass at least one calibration batch')
        nnx.update(model, grams)
    finally:
        out = detach_grams(model)
    return out


def norms_from_grams(grams: dict[str, jax.Array]) -> dict[str, jax.Array]:
    r"""Wanda's input column norms :math:`\|X_k\|_2 = \sqrt{H_{kk}}` from Gram matrices."""
    return {k: jnp.sqrt(jnp.maximum(jnp.diagonal(h), 0.0)) for k, h in grams.items()}


def collect_input_norms(
    model: nnx.Module, batches: Iterable[Any], *, include: str = _nm.DEFAULT_INCLUDE
) -> dict[str, jax.Array]:
    """Wanda calibration: ``{kernel path: f32[K]}`` input column norms over all tokens.

    Computed from the diagonal of :func:`collect_input_grams` (one calibration pass).

    References:
      Sun et al., *A Simple and Effective Pruning Approach for Large Language Models*, ICLR 2024,
      Sec. 3 (128 calibration sequences).
    """
    return norms_from_grams(collect_input_grams(model, batches, include=include))


def _llama_aux(model: nnx.Module, t: int, bsz: int):
    cfg = model.config
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))[None]
    bias = jnp.where(causal, 0.0, jnp.finfo(jnp.float32).min)
    positions = jnp.broadcast_to(jnp.arange(t), (bsz, t))
    inv_freq = _layers.rope_inv_freq(cfg.head_dim, theta=cfg.rope_theta,
                                     scaling=cfg.rope_scaling_dict)
    return positions, bias, inv_freq


def sparsegpt_sequential(
    model: nnx.Module,
    batches: Iterable[Any],
    *,
    n: int = 2,
    m: int = 4,
    blocksize: int = 128,
    percdamp: float = 0.01,
    include: str = _nm.DEFAULT_INCLUDE,
) -> tuple[nnx.Module, dict[str, jax.Array]]:
    r"""SparseGPT N:M pruning of a Llama model, block by block on propagated activations.

    For each decoder block :math:`l`: the block inputs (outputs of the already pruned blocks
    :math:`< l`) are run through the *dense* block once to accumulate the Gram matrix
    :math:`H = X^\top X` of every matching Linear's inputs; each kernel is pruned with
    :func:`~jaxprune.methods._oneshot.sparsegpt_prune` (OBS reconstruction); then the block
    inputs are propagated through the *pruned* block for block :math:`l + 1`.

    Args:
      model: a ``jaxprune.models.Llama`` (modified in place: kernels replaced by the pruned ones).
      batches: calibration token ids ``int32[B, T]`` (or dicts with ``input_ids``), no padding.
      n: kept per group of ``m`` along K.
      m: group size.
      blocksize: SparseGPT lazy-update block.
      percdamp: relative damping of :math:`H`.
      include: leaf-path regex of the sparse kernels.

    Returns:
      ``(model, masks)`` with ``masks = {kernel path: bool[K, N]}``.

    Raises:
      ValueError: if the model has no ``layers`` of Llama blocks, or ``batches`` is empty.

    References:
      Frantar, Alistarh, *SparseGPT*, ICML 2023, Sec. 3 and the reference ``llama.py``
      (sequential over blocks; sublayers of a block calibrated on the unpruned block's inputs).
    """
    from jaxprune.models import _llama

    if not isinstance(model, _llama.Llama):
        got = type(model).__name__
        raise ValueError(f'sparsegpt_sequential needs a Llama model, got {got}; '  # noqa: TRY004
                         'use collect_input_grams + sparsegpt_prune_params for others')
    xs = [jnp.asarray(_ids(b)) for b in batches]
    if not xs:
        raise ValueError('batches is empty; pass at least one calibration batch')
    emb_def, emb_state = nnx.split(model.embed)
    embed = jax.jit(lambda s, ids: nnx.merge(emb_def, s)(ids))
    hs = [embed(emb_state, ids) for ids in xs]
    bsz, t = xs[0].shape
    positions, bias, inv_freq = _llama_aux(model, t, bsz)
    masks: dict[str, jax.Array] = {}
    for li, block in enumerate(model.layers):
        prefix = f'layers.{li}.'
        sub = [(key, lin) for key, lin in _linears(block, '.')
               if re.search(include, prefix + key)]
        for _, lin in sub:
            lin.input_gram = InputGram(jnp.zeros((lin.in_features,) * 2, jnp.float32))
        gdef, grams, rest = nnx.split(block, InputGram, ...)

        @jax.jit
        def gram_step(grams, rest, h, gdef=gdef):
            b = nnx.merge(gdef, grams, rest)
            b(h, positions, bias, inv_freq, None, None, None, None, False)
            return nnx.state(b, InputGram)

        for h in hs:
            grams = gram_step(grams, rest, h)
        nnx.update(block, grams)
        for key, lin in sub:
            h_mat = lin.input_gram[...]
            del lin.input_gram
            w, keep = _oneshot.sparsegpt_prune(lin.kernel[...], h_mat, n=n, m=m,
                                               blocksize=blocksize, percdamp=percdamp)
            lin.kernel[...] = w
            masks[prefix + key] = keep
        bdef, bstate = nnx.split(block)
        fwd = jax.jit(lambda s, h, bdef=bdef: nnx.merge(bdef, s)(
            h, positions, bias, inv_freq, None, None, None, None, False)[0])
        hs = [fwd(bstate, h) for h in hs]
    return model, masks


def masks_tree(params: Any, masks: dict[str, jax.Array]) -> Any:
    """``{path: mask}`` as a masks pytree shaped like ``params`` (``None`` for other leaves)."""
    def one(path, leaf):
        del leaf
        return masks.get(_nm.path_str(path))

    return jax.tree_util.tree_map_with_path(one, params)


def calibration_batches(
    split: Any, tokenizer: Any, *, num_sequences: int, seq_len: int, batch_size: int = 8,
    seed: int = 0
) -> Iterator[np.ndarray]:
    """``num_sequences`` packed windows of ``seq_len`` tokens from ``split`` (``int32[B, T]``).

    The last batch is dropped if it would be partial, so ``num_sequences`` is rounded down to a
    multiple of ``batch_size`` (static shapes: one compilation).
    """
    from jaxprune import data

    if num_sequences < batch_size:
        raise ValueError(f'{num_sequences=} must be >= {batch_size=}')
    it = data.lm_batches(split, tokenizer, batch_size=batch_size, seq_len=seq_len, seed=seed)
    for _ in range(num_sequences // batch_size):
        yield np.asarray(next(it)['input_ids'], np.int32)
