"""Public entry point: ``sparse24_matmul`` dispatch (tokamax style)."""

from __future__ import annotations

import functools
import logging
from typing import Literal

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxprune.kernels.sparse24 import format as fmt
from jaxprune.kernels.sparse24 import ops, pallas_gpu, pallas_tpu, reference, xla

Implementation = Literal['pallas', 'xla'] | None
_IMPLEMENTATIONS = (None, 'pallas', 'xla')
_LOG = logging.getLogger(__name__)


def _pallas_forward(backend: str, interpret: bool, blocks: dict) -> ops.Forward:
    if backend == 'gpu' and not interpret:
        return functools.partial(pallas_gpu.sparse24_matmul_gpu, **blocks)
    if backend == 'tpu' or interpret:
        fn = pallas_gpu.sparse24_matmul_gpu if backend == 'gpu' else pallas_tpu.sparse24_matmul_tpu
        return functools.partial(fn, interpret=interpret, **blocks)
    raise NotImplementedError(f'no compiled Pallas 2:4 kernel for {backend=}; pass interpret=True')


def sparse24_matmul(
    x: Float[Array, '... K'],
    s: fmt.Sparse24,
    *,
    implementation: Implementation = None,
    interpret: bool | None = None,
    max_kernel_m: int = 64,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
) -> Float[Array, '... N']:
    """``x @ decompress(s)`` for a 2:4-sparse (along K) kernel, dispatched by implementation.

    The Pallas kernels read the compressed weight (56.25 % of dense bf16), which pays off for
    memory-bound products, i.e. small ``M`` (decode). Dispatch:

    * ``'xla'``: shuffle-free ``sum_i x[:, i::4] @ D_i`` in plain XLA.
    * ``'pallas'``: the Pallas kernel of the default backend (TPU kernel; Mosaic GPU kernel on GPU;
      on CPU the TPU kernel in interpret mode) when ``M <= max_kernel_m``, else the reference.
    * ``None``: ``'pallas'`` on TPU, ``'xla'`` elsewhere (the GPU kernel is not yet verified on
      hardware, so it is opt-in).

    A ``NotImplementedError`` from a kernel (unsupported shape, e.g. ``K % 8 != 0``) falls through
    to :func:`reference.matmul_reference`. All paths share one ``custom_vjp`` (grad wrt ``x`` and
    ``s.values``). Works under ``jit``, ``vmap`` and ``shard_map(check_vma=False)``.

    Args:
      x: ``[..., K]`` activations; leading axes are flattened into ``M``.
      s: compressed ``W[K, N]``.
      implementation: ``None``, ``'pallas'`` or ``'xla'``.
      interpret: run Pallas in interpret mode; default ``True`` on CPU, ``False`` elsewhere.
      max_kernel_m: largest ``M`` sent to the Pallas kernel.
      block_m: Pallas rows per block (default ``min(round_up(M, 8), 256)``).
      block_n: Pallas output columns per block (default 512).
      block_k: Pallas contraction rows per block, multiple of 8 (default 512).

    Returns:
      ``[..., N]`` in ``result_type(x, s.values)``.

    Raises:
      ValueError: unknown implementation, ``x.shape[-1] != K``, or a malformed ``s``.

    Example:
      >>> import jax.numpy as jnp
      >>> w = jnp.array([[1., 0.], [0., 2.], [3., 0.], [0., 0.]])
      >>> s = fmt.compress(w)
      >>> sparse24_matmul(jnp.ones((1, 4)), s, implementation='xla')
      Array([[4., 2.]], dtype=float32)
    """
    if implementation not in _IMPLEMENTATIONS:
        raise ValueError(f'{implementation=} must be one of {_IMPLEMENTATIONS}')
    fmt._check_sparse(s)
    k, n = s.shape
    if x.shape[-1] != k:
        raise ValueError(f'{x.shape=}: last axis must equal K={k} of the sparse kernel {s.shape=}')
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    backend = jax.default_backend()
    if implementation is None:
        implementation = 'pallas' if backend == 'tpu' else 'xla'
    if interpret is None:
        interpret = backend == 'cpu'
    blocks = {
        name: v
        for name, v in (('block_m', block_m), ('block_n', block_n), ('block_k', block_k))
        if v is not None
    }
    forward: ops.Forward = xla.matmul_xla
    if implementation == 'pallas':
        if m > max_kernel_m:
            forward = reference.matmul_reference
        else:
            try:
                forward = _pallas_forward(backend, interpret, blocks)
                jax.eval_shape(forward, x2, s)  # validation runs here, before any pallas_call
            except NotImplementedError as e:
                _LOG.info('sparse24_matmul: Pallas unavailable (%s); using the reference', e)
                forward = reference.matmul_reference
    y = ops.sparse24_matmul_op(x2, s, forward)
    return y.reshape(*lead, n).astype(jnp.result_type(x.dtype, s.values.dtype))
