"""One-shot N:M baselines: magnitude, Wanda and SparseGPT, as pure functions of params and data.

Every function returns ``(pruned_params, masks)`` with the masks convention of
``jaxprune.masks._nm`` (``bool`` for sparse kernels, ``None`` elsewhere) and groups along K
(axis 0 of a ``(K, N)`` kernel). Calibration statistics are flat mappings keyed by the kernel's
dotted path (``'layers.0.mlp.up_proj.kernel'``):

* Wanda: ``act_norms[path] = f32[K]`` input column norms
  (``jaxprune.scores._wanda.input_column_norms``);
* SparseGPT: ``hessians[path] = f32[K, K]``, :math:`X^\\top X` of the layer inputs
  (:func:`input_hessian`, summed over calibration batches; any positive scale gives the same
  result).

Collecting inputs layer by layer (each layer calibrated on the outputs of the already-pruned
previous layers, as SparseGPT and Wanda do) is the caller's job; these functions are the
per-kernel math.
"""

import functools
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxprune.masks import _nm
from jaxprune.scores import _wanda


def magnitude_prune(params: Any, *, n: int = 2, m: int = 4,
                    include: str = _nm.DEFAULT_INCLUDE) -> tuple[Any, Any]:
    """One-shot magnitude N:M pruning: keep the ``n`` largest ``|W|`` per ``m`` along K.

    Args:
      params: parameter pytree of ``(K, N)`` kernels.
      n: kept per group.
      m: group size.
      include: leaf-path regex of the sparse kernels.

    Returns:
      ``(pruned_params, masks)``.

    References:
      Zhou et al., *Learning N:M Fine-grained Structured Sparse Neural Networks From Scratch*,
      ICLR 2021 (magnitude N:M).
    """
    masks = _nm.nm_masks_for(params, n=n, m=m, include=include)
    return _nm.apply_masks(params, masks), masks


def wanda_prune(params: Any, act_norms: Mapping[Any, jax.typing.ArrayLike], *, n: int = 2,
                m: int = 4, include: str = _nm.DEFAULT_INCLUDE) -> tuple[Any, Any]:
    r"""One-shot Wanda N:M pruning with scores :math:`|W_{kn}|\,\|X_k\|_2`, groups along K.

    Args:
      params: parameter pytree of ``(K, N)`` kernels.
      act_norms: ``path -> f32[K]`` input column norms of every included kernel.
      n: kept per group.
      m: group size.
      include: leaf-path regex of the sparse kernels (each must have norms).

    Returns:
      ``(pruned_params, masks)``.

    Raises:
      ValueError: if an included kernel has no norms.

    References:
      Sun et al., *A Simple and Effective Pruning Approach for Large Language Models*,
      ICLR 2024, Eq. 1 and Sec. 3 (N:M variant).
    """
    scores = _wanda.wanda_scores(params, act_norms=act_norms, include=include)
    masks = _nm.nm_masks(scores, n=n, m=m, include=include)
    return _nm.apply_masks(params, masks), masks


def input_hessian(x: jax.typing.ArrayLike, *, mask: jax.typing.ArrayLike | None = None
                  ) -> jax.Array:
    r"""The layer-input Gram matrix :math:`H = \sum_t x_t x_t^\top` (``f32[K, K]``).

    Add it up over calibration batches. SparseGPT's ``2/n`` scaling is omitted: the algorithm is
    invariant to a positive scale of ``H`` (the damping is relative to ``mean(diag H)``).

    Args:
      x: ``[..., K]`` inputs of the linear layer.
      mask: optional ``[...]`` 0/1 token mask (padding = 0).
    """
    x = jnp.asarray(x, jnp.float32)
    if mask is not None:
        x = x * jnp.asarray(mask, jnp.float32)[..., None]
    x = x.reshape(-1, x.shape[-1])
    return x.T @ x


@functools.partial(jax.jit, static_argnames=('n', 'm', 'blocksize'))
def _sparsegpt(w, hessian, percdamp, *, n, m, blocksize):
    k_dim, n_dim = w.shape
    w = w.astype(jnp.float32)
    h = hessian.astype(jnp.float32)
    diag = jnp.diagonal(h)
    dead = diag == 0
    h = h + jnp.diag(jnp.where(dead, 1.0, 0.0))
    w = jnp.where(dead[:, None], 0.0, w)
    h = h + percdamp * jnp.mean(jnp.diagonal(h)) * jnp.eye(k_dim, dtype=jnp.float32)
    chol = jnp.linalg.cholesky(h)
    hinv = jax.scipy.linalg.cho_solve((chol, True), jnp.eye(k_dim, dtype=jnp.float32))
    u = jnp.linalg.cholesky(hinv).T  # upper: hinv = u.T @ u; u[i, j] == 0 for j < i
    keep = jnp.zeros((k_dim, n_dim), bool)

    for i1 in range(0, k_dim, blocksize):
        i2 = min(i1 + blocksize, k_dim)
        count = i2 - i1
        u1 = u[i1:i2, i1:i2]
        d1 = jnp.diagonal(u1)

        def group(g, carry, u1=u1, d1=d1):
            w1, q1, err1, keep1 = carry
            i0 = g * m
            blk = jax.lax.dynamic_slice_in_dim(w1, i0, m, axis=0)
            d = jax.lax.dynamic_slice_in_dim(d1, i0, m)
            kg = _nm.nm_mask(jnp.square(blk) / jnp.square(d)[:, None], n=n, m=m, axis=0)
            for j in range(m):  # OBS update row by row inside the group
                i = i0 + j
                row = w1[i]
                q = jnp.where(kg[j], row, 0.0)
                err = (row - q) / u1[i, i]
                w1 = w1 - u1[i][:, None] * err[None, :]
                q1 = q1.at[i].set(q)
                err1 = err1.at[i].set(err)
            keep1 = jax.lax.dynamic_update_slice_in_dim(keep1, kg, i0, axis=0)
            return w1, q1, err1, keep1

        zeros = jnp.zeros((count, n_dim), jnp.float32)
        init = (w[i1:i2], zeros, zeros, jnp.zeros((count, n_dim), bool))
        _, q1, err1, keep1 = jax.lax.fori_loop(0, count // m, group, init)
        w = w.at[i1:i2].set(q1)
        if i2 < k_dim:
            w = w.at[i2:].add(-(u[i1:i2, i2:].T @ err1))
        keep = keep.at[i1:i2].set(keep1)
    return w, keep


def sparsegpt_prune(w: jax.typing.ArrayLike, hessian: jax.typing.ArrayLike, *, n: int = 2,
                    m: int = 4, blocksize: int = 128, percdamp: float = 0.01
                    ) -> tuple[jax.Array, jax.Array]:
    r"""SparseGPT N:M pruning of one ``(K, N)`` kernel with OBS weight reconstruction.

    Minimises :math:`\|X W - X \hat W\|_F^2` greedily along K. With the damped Hessian
    :math:`H = X^\top X + \delta I`,
    :math:`\delta = \text{percdamp}\cdot\overline{\operatorname{diag} H}`
    and :math:`U` the upper Cholesky factor of :math:`H^{-1}` (:math:`H^{-1} = U^\top U`),
    rows of ``W`` are processed in blocks of ``blocksize``; at the start of each group of ``m`` rows
    the ``n`` entries per column with the largest :math:`w^2 / U_{ii}^2` are kept, and each row's
    pruning error :math:`e_i = (w_i - q_i) / U_{ii}` is propagated to the not yet processed rows,
    :math:`W_{j,:} \mathrel{-}= U_{ij} e_i` (:math:`j > i`); lazily across blocks.

    Rows of our ``(K, N)`` kernel are the *columns* of the torch reference's ``(out, in)``
    weight: the same algorithm on the transposed layout (groups and error propagation along K).

    Args:
      w: kernel ``(K, N)``.
      hessian: ``(K, K)`` Gram matrix of the layer inputs (:func:`input_hessian`).
      n: kept per group of ``m`` along K.
      m: group size.
      blocksize: rows per lazy-update block (a multiple of ``m``).
      percdamp: relative diagonal damping.

    Returns:
      ``(w_pruned, mask)``: the reconstructed kernel (``w.dtype``, exact zeros where pruned,
      exactly ``n`` non-zeros allowed per group) and the ``bool`` keep mask.

    Raises:
      ValueError: on shape mismatch, ``K % m != 0``, ``blocksize % m != 0`` or invalid ``n, m``.

    References:
      Frantar, Alistarh, *SparseGPT: Massive Language Models Can Be Accurately Pruned in
      One-Shot*, ICML 2023, Algorithm 1 and Sec. 3.4 (N:M, selection by
      :math:`w^2/[H^{-1}]_{ii}^2` per group of ``m``). Dead inputs (``H_ii = 0``) are handled as
      in the reference code (their weights set to 0, ``H_ii = 1``).
    """
    w = jnp.asarray(w)
    hessian = jnp.asarray(hessian)
    if w.ndim != 2 or hessian.shape != (w.shape[0], w.shape[0]):
        raise ValueError(f'{w.shape=} must be (K, N) and {hessian.shape=} must be (K, K)')
    _nm._check_nm(n, m)
    if w.shape[0] % m:
        raise ValueError(f'{w.shape=}: K={w.shape[0]} not divisible by {m=}; pad K')
    if blocksize < m or blocksize % m:
        raise ValueError(f'{blocksize=} must be a positive multiple of {m=}; e.g. 128')
    if percdamp < 0:
        raise ValueError(f'{percdamp=} must be >= 0; e.g. 0.01')
    wp, keep = _sparsegpt(w, hessian, jnp.float32(percdamp), n=n, m=m, blocksize=blocksize)
    return wp.astype(w.dtype), keep


def sparsegpt_prune_params(params: Any, hessians: Mapping[Any, jax.typing.ArrayLike], *,
                           n: int = 2, m: int = 4, blocksize: int = 128, percdamp: float = 0.01,
                           include: str = _nm.DEFAULT_INCLUDE) -> tuple[Any, Any]:
    """:func:`sparsegpt_prune` for every included kernel of a params pytree.

    Args:
      params: parameter pytree.
      hessians: ``path -> f32[K, K]`` for every included kernel.
      n: kept per group.
      m: group size.
      blocksize: lazy-update block size.
      percdamp: relative damping.
      include: leaf-path regex of the sparse kernels.

    Returns:
      ``(pruned_params, masks)``.

    Raises:
      ValueError: if an included kernel has no Hessian.
    """
    pattern = re.compile(include)
    results = {}

    def one(path, w):
        p = _nm.path_str(path)
        if jnp.ndim(w) != 2 or not pattern.search(p):
            return None
        h = _wanda._lookup(hessians, path, p)
        if h is None:
            raise ValueError(f'sparsegpt_prune_params: no hessian for kernel {p!r}; collect '
                             'input_hessian for it or narrow include=')
        results[p] = sparsegpt_prune(w, h, n=n, m=m, blocksize=blocksize, percdamp=percdamp)
        return results[p][1]

    masks = jax.tree_util.tree_map_with_path(one, params)

    def pruned(path, w):
        p = _nm.path_str(path)
        return results[p][0] if p in results else w

    return jax.tree_util.tree_map_with_path(pruned, params), masks
