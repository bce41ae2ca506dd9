"""Wanda scores: ``|W| * ||X_k||_2`` with input-activation column norms from a calibration pass.

The activation statistics are a flat mapping from a kernel's dotted path (``'layers.0.mlp.up_proj
.kernel'``, see ``jaxprune.masks._nm.path_str``) or its key tuple to the ``[K]`` vector of input
column norms of that linear layer. Collect them with :func:`input_column_norms` (one batch) or
accumulate :func:`input_sq_norms` over batches and take the square root.
"""

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxprune.masks import _nm


def input_sq_norms(x: jax.typing.ArrayLike, *, mask: jax.typing.ArrayLike | None = None
                   ) -> jax.Array:
    r"""Per-input-channel sum of squares :math:`\sum_t X_{t,k}^2` over all leading axes.

    Sums over batches add up, so accumulate this over the calibration set and call ``jnp.sqrt``.

    Args:
      x: activations ``[..., K]`` entering a linear layer.
      mask: optional ``[...]`` 0/1 token mask (padding = 0).

    Returns:
      ``f32[K]``.
    """
    x = jnp.asarray(x, jnp.float32)
    sq = jnp.square(x)
    if mask is not None:
        sq = sq * jnp.asarray(mask, jnp.float32)[..., None]
    return sq.reshape(-1, x.shape[-1]).sum(0)


def input_column_norms(x: jax.typing.ArrayLike, *, mask: jax.typing.ArrayLike | None = None
                       ) -> jax.Array:
    r"""Wanda's :math:`\|X_k\|_2` over all tokens: ``sqrt(input_sq_norms(x))``, ``f32[K]``."""
    return jnp.sqrt(input_sq_norms(x, mask=mask))


def _lookup(act_norms: Mapping, path: tuple, p: str):
    if p in act_norms:
        return act_norms[p]
    keys = tuple(getattr(k, 'key', getattr(k, 'idx', getattr(k, 'name', k))) for k in path)
    if keys and keys[-1] == 'value':
        keys = keys[:-1]
    return act_norms.get(keys)


def wanda_scores(params: Any, *, act_norms: Mapping[Any, jax.typing.ArrayLike],
                 include: str | None = _nm.DEFAULT_INCLUDE) -> Any:
    r"""Wanda importance :math:`S_{kn} = |W_{kn}| \cdot \|X_k\|_2` for ``(K, N)`` kernels.

    The input norm indexes the contraction axis K (axis 0 of a Flax kernel), so it broadcasts as
    ``act_norms[path][:, None]``; with N:M groups along K this compares weights that multiply
    *different* inputs of the same output, as in Wanda's N:M variant.

    Args:
      params: parameter pytree of ``(K, N)`` kernels.
      act_norms: mapping from a kernel's dotted path (or key tuple) to its ``[K]`` input column
        norms.
      include: leaf-path regex of the kernels that *must* have norms (default: every kernel under
        ``layers``); ``None`` to require none. Kernels without norms that do not match get
        ``None`` scores (treated as dense by ``nm_masks``).

    Returns:
      Scores pytree: ``f32`` scores for kernels with norms, ``None`` for every other leaf.

    Raises:
      ValueError: if a matching kernel has no norms, or its norms are not ``[K]``.

    References:
      Sun, Liu, Bair, Kolter, *A Simple and Effective Pruning Approach for Large Language
      Models*, ICLR 2024, Eq. 1 (here transposed: Wanda's ``W[out, in]`` is our ``W[K, N].T``).
    """
    pattern = re.compile(include) if include is not None else None

    def one(path, w):
        p = _nm.path_str(path)
        norms = _lookup(act_norms, path, p)
        if norms is None:
            if pattern is not None and jnp.ndim(w) == 2 and pattern.search(p):
                raise ValueError(
                    f'wanda_scores: no act_norms for kernel {p!r}; collect input_column_norms for '
                    'it in the calibration pass or narrow include=')
            return None
        norms = jnp.asarray(norms, jnp.float32)
        if jnp.ndim(w) != 2 or norms.shape != (w.shape[0],):
            raise ValueError(
                f'act_norms[{p!r}] has shape {norms.shape}; expected (K,) = ({w.shape[0]},) for '
                f'kernel shape {w.shape}')
        return jnp.abs(w.astype(jnp.float32)) * norms[:, None]

    return jax.tree_util.tree_map_with_path(one, params)
