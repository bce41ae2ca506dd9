"""The shuffle-free 2:4 matmul in plain XLA ops (four ordinary dots).

With the activation de-interleaved, ``xg_i = x[:, i::4]``, and the four planes
``D_i[g, n] = W[4g + i, n]`` (built by elementwise selects on the value planes, never reordering the
weight), the product splits exactly into four dots over the group axis:

.. math:: y = x W = \\sum_{i=0}^{3} x_{g,i} D_i, \\qquad
          \\partial x_{g,i} = \\partial y\\, D_i^\\top .

The same identity gives the backward wrt ``x`` (the sparse axis is then non-contracting) and wrt
the kept values (``dV_j = select_j(sum_i [xg_i^T dy] at idx_j)``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxprune.kernels.sparse24 import format as fmt

_HIGHEST = jax.lax.Precision.HIGHEST


def deinterleave(x: Float[Array, 'M K']) -> Float[Array, '4 M G']:
    """``xg[i] = x[:, i::4]``."""
    m, k = x.shape
    return jnp.moveaxis(x.reshape(m, k // fmt.GROUP, fmt.GROUP), 2, 0)


def interleave(xg: Float[Array, '4 M G']) -> Float[Array, 'M K']:
    """Inverse of :func:`deinterleave`."""
    _, m, g = xg.shape
    return jnp.moveaxis(xg, 0, 2).reshape(m, g * fmt.GROUP)


def matmul_xla(x: Float[Array, 'M K'], s: fmt.Sparse24) -> Float[Array, 'M N']:
    """``x @ decompress(s)`` as ``sum_i xg_i @ D_i`` (f32 accumulation)."""
    out_dtype = jnp.result_type(x.dtype, s.values.dtype)
    d = fmt.planes(s)
    xg = deinterleave(x)
    y = sum(
        jnp.dot(xg[i], d[i], precision=_HIGHEST, preferred_element_type=jnp.float32)
        for i in range(fmt.GROUP)
    )
    return y.astype(out_dtype)


def matmul_xla_dx(dy: Float[Array, 'M N'], s: fmt.Sparse24, dtype) -> Float[Array, 'M K']:
    """``dy @ decompress(s).T`` as ``interleave_i(dy @ D_i^T)``."""
    d = fmt.planes(s)
    dxg = jnp.stack(
        [
            jnp.dot(dy, d[i].T, precision=_HIGHEST, preferred_element_type=jnp.float32)
            for i in range(fmt.GROUP)
        ]
    )
    return interleave(dxg).astype(dtype)


def matmul_xla_dvalues(
    x: Float[Array, 'M K'], dy: Float[Array, 'M N'], s: fmt.Sparse24
) -> Float[Array, '2 G N']:
    """Gradient wrt the kept values: the dense ``x^T dy`` read at the kept positions only."""
    xg = deinterleave(x)
    gi = [
        jnp.dot(xg[i].T, dy, precision=_HIGHEST, preferred_element_type=jnp.float32)
        for i in range(fmt.GROUP)
    ]
    zero = jnp.zeros((), jnp.float32)
    out = []
    for idx in fmt.unpack_meta(s.meta, s.values.shape[1]):
        sel = zero
        for i in range(fmt.GROUP):
            sel = jnp.where(idx == i, gi[i], sel)
        out.append(sel)
    return jnp.stack(out).astype(s.values.dtype)
