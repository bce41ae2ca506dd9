"""``custom_vjp`` wiring: any forward implementation, shuffle-free XLA backward.

Pallas calls whose kernels use ``program_id``/``pl.when`` cannot be differentiated by JAX, so the
forward implementation is opaque here and the backward is written out with the same shuffle-free
identity (megablox style):

.. math:: dx = dy\\, W^\\top = \\mathrm{interleave}_i(dy\\, D_i^\\top), \\qquad
          dV_j[g, n] = (x_{g, idx_j}^\\top dy)[g, n].

``meta`` is integer data and gets a ``float0`` cotangent. Gradients wrt ``values`` are the dense
``x^T dy`` read at the kept positions, i.e. exactly what ``jax.grad`` of the reference gives.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import numpy as np
from jaxtyping import Array, Float

from jaxprune.kernels.sparse24 import format as fmt
from jaxprune.kernels.sparse24 import xla

Forward = Callable[[jax.Array, fmt.Sparse24], jax.Array]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def sparse24_matmul_op(
    x: Float[Array, 'M K'], s: fmt.Sparse24, forward: Forward
) -> Float[Array, 'M N']:
    """``forward(x, s)`` (any implementation of ``x @ decompress(s)``) with a custom VJP.

    Args:
      x: ``[M, K]`` activations.
      s: compressed ``W[K, N]``.
      forward: a hashable callable ``(x, s) -> y`` (static; e.g. a ``functools.partial`` of a
        Pallas wrapper with its block sizes).

    Returns:
      ``[M, N]``; differentiable wrt ``x`` and ``s.values``.
    """
    return forward(x, s)


def _fwd(x, s, forward):
    return forward(x, s), (x, s)


def _bwd(forward, res, dy):
    del forward
    x, s = res
    dx = xla.matmul_xla_dx(dy, s, x.dtype)
    dvalues = xla.matmul_xla_dvalues(x, dy, s)
    dmeta = np.zeros(s.meta.shape, dtype=jax.dtypes.float0)
    return dx, fmt.Sparse24(dvalues, dmeta)


sparse24_matmul_op.defvjp(_fwd, _bwd)
