"""The spec and the always-working fallback: decompress, then one dense dot."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxprune.kernels.sparse24 import format as fmt


def matmul_reference(x: Float[Array, '... K'], s: fmt.Sparse24) -> Float[Array, '... N']:
    """``x @ decompress(s)`` in plain ``jnp`` (f32 accumulation, HIGHEST precision).

    Args:
      x: ``[..., K]`` activations.
      s: compressed ``W[K, N]``.

    Returns:
      ``[..., N]`` in ``result_type(x, s.values)``.

    Raises:
      ValueError: ``x.shape[-1] != K``.
    """
    k, _ = s.shape
    if x.shape[-1] != k:
        raise ValueError(f'{x.shape=}: last axis must equal K={k} of the sparse kernel {s.shape=}')
    out_dtype = jnp.result_type(x.dtype, s.values.dtype)
    y = jnp.matmul(
        x,
        fmt.decompress(s),
        precision=jax.lax.Precision.HIGHEST,
        preferred_element_type=jnp.float32,
    )
    return y.astype(out_dtype)
