"""Pallas TPU-style 2:4 matmul (shuffle-free), plus an identically blocked dense kernel.

Blocking: grid ``(cdiv(M, bm), N / bn, cdiv(K, bk))``, K innermost ('arbitrary'), f32
accumulator in VMEM scratch. Each K block of ``bk`` rows is ``bk/8`` meta bytes, i.e. ``bk/8``
*even* groups (low nibbles) and ``bk/8`` *odd* groups (high nibbles). Rather than interleaving the
two nibble rows in-kernel (a sublane shuffle), the wrapper views ``values[2, K/4, N]`` as
``[2, K/8, 2N]`` (free reshape: even groups are columns ``[0, N)``, odd groups ``[N, 2N)`` of the
same row) and reads them through two BlockSpecs (column block ``j`` and ``j + N/bn``); the
activation is de-interleaved once into eight planes ``xq[4p + i] = x[:, 8r + 4p + i]``. The body is
then eight elementwise selects and eight dots of ``[bm, bk/8] @ [bk/8, bn]``.

Ragged shapes: M uses a ``pl.cdiv`` grid (out-of-bounds rows of a block are never stored); a ragged
last K block is masked with ``where`` on both operands, so whatever the padded region holds (NaN
included) cannot leak into the sum. N must be tiled exactly (the odd-group offset is ``N/bn``
blocks), so ``bn`` is the largest divisor of N that is <= ``block_n`` (a multiple of 128 when
compiled; otherwise ``NotImplementedError`` and the caller falls back).

Verified here: interpret mode on CPU against the reference, and cross-platform lowering for TPU
(``lower(lowering_platforms=('tpu',))``: Pallas TPU block-shape rules and Mosaic lowering of the
body) for the benchmark shapes (tests/kernels/sparse24). Not verified: a Mosaic compile by libtpu
or a run on a TPU (none in this project's sessions); speed unmeasured.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jaxtyping import Array, Float

from jaxprune.kernels.sparse24 import format as fmt


def _round_up(a: int, b: int) -> int:
    return -(-a // b) * b


def _block_m(m: int, block_m: int | None, dtype) -> int:
    # sublane tile: 8 rows for 32-bit, 16 for 16-bit operands
    return (
        block_m if block_m is not None else min(_round_up(m, 32 // jnp.dtype(dtype).itemsize), 256)
    )


def _mask_k(k_rows: int, bk: int, axis: int, shape: tuple[int, int]):
    """Boolean mask of in-bounds K positions of the current K block (``None`` when not ragged)."""
    if k_rows % bk == 0:
        return None
    pos = pl.program_id(2) * bk + jax.lax.broadcasted_iota(jnp.int32, shape, axis)
    return pos < k_rows


def sparse24_kernel(xq_ref, ve_ref, vo_ref, meta_ref, o_ref, acc_ref, *, rows8: int, bk8: int):
    """One (M, N, K) block: ``acc += sum_{p, i} xq[4p+i] @ D_{p,i}``; store on the last K block.

    Refs: ``xq [8, bm, bk8]``, ``ve``/``vo [2, bk8, bn]`` (even/odd groups), ``meta u8[bk8, bn]``,
    ``o [bm, bn]``, ``acc f32[bm, bn]``.
    """

    @pl.when(pl.program_id(2) == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    meta = meta_ref[...].astype(jnp.int32)
    bm, bn = acc_ref.shape
    kmask_w = _mask_k(rows8, bk8, 0, (bk8, bn))
    kmask_x = _mask_k(rows8, bk8, 1, (bm, bk8))
    acc = acc_ref[...]
    for p, v_ref in enumerate((ve_ref, vo_ref)):
        nib = (meta >> (4 * p)) & 15
        idx0, idx1 = nib & 3, nib >> 2
        v0, v1 = v_ref[0], v_ref[1]
        zero = jnp.zeros((), v0.dtype)
        for i in range(fmt.GROUP):
            d = jnp.where(idx0 == i, v0, jnp.where(idx1 == i, v1, zero))
            xi = xq_ref[fmt.GROUP * p + i]
            if kmask_w is not None:
                d = jnp.where(kmask_w, d, zero)
                xi = jnp.where(kmask_x, xi, jnp.zeros((), xi.dtype))
            acc += jnp.dot(xi, d, preferred_element_type=jnp.float32)
    acc_ref[...] = acc

    @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
    def _store():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def _block_n(n: int, block_n: int, interpret: bool) -> int:
    """Largest divisor of N that is <= block_n (a multiple of 128 unless interpreting)."""
    step = 1 if interpret else 128
    for b in range(min(block_n, n) // step * step, 0, -step):
        if n % b == 0:
            return b
    raise NotImplementedError(f'N={n} has no divisor <= {block_n=} that is a multiple of {step}')


def deinterleave8(x: Float[Array, 'M K']) -> Float[Array, '8 M R']:
    """``xq[4p + i] = x[:, 8r + 4p + i]`` (activation only; the weight is never reordered)."""
    m, k = x.shape
    return jnp.moveaxis(x.reshape(m, k // 8, 8), 2, 0)


def _validate(x, s: fmt.Sparse24, block_n: int, block_k: int, block_m: int | None) -> None:
    fmt._check_sparse(s)
    k, _ = s.shape
    if x.ndim != 2 or x.shape[1] != k:
        raise ValueError(f'{x.shape=} must be (M, K={k}) for {s.shape=}')
    if k % 8:
        raise NotImplementedError(f'K={k} % 8 != 0: kernel needs whole meta bytes; use reference')
    if block_k % 8 or block_k <= 0 or block_n <= 0 or (block_m is not None and block_m <= 0):
        raise ValueError(f'{block_k=} must be a positive multiple of 8; {block_n=}, {block_m=} > 0')


@functools.partial(jax.jit, static_argnames=('block_m', 'block_n', 'block_k', 'interpret'))
def sparse24_matmul_tpu(
    x: Float[Array, 'M K'],
    s: fmt.Sparse24,
    *,
    block_m: int | None = None,
    block_n: int = 512,
    block_k: int = 1024,
    interpret: bool = False,
) -> Float[Array, 'M N']:
    """Pallas TPU shuffle-free 2:4 matmul ``x @ decompress(s)``.

    Args:
      x: ``[M, K]`` activations.
      s: compressed ``W[K, N]`` with ``K % 8 == 0``.
      block_m: rows per block (default ``min(round_up(M, 8 or 16 by dtype), 256)``).
      block_n: output columns per block; the largest divisor of ``N`` not above it is used.
      block_k: contraction rows per block, a multiple of 8 (clipped to ``K``).
      interpret: run the Pallas interpreter (CPU).

    Returns:
      ``[M, N]`` in ``result_type(x, s.values)``.

    Raises:
      ValueError: shape mismatch or bad block sizes.
      NotImplementedError: ``K % 8 != 0``, or (compiled) no multiple-of-128 divisor of N
        ``<= block_n`` (callers fall back to the reference).
    """
    _validate(x, s, block_n, block_k, block_m)
    m, k = x.shape
    n = s.shape[1]
    out_dtype = jnp.result_type(x.dtype, s.values.dtype)
    bm = _block_m(m, block_m, x.dtype)
    bn = _block_n(n, block_n, interpret)
    bk8 = min(block_k, k) // 8
    rows8 = k // 8
    xq = deinterleave8(x)
    v3 = s.values.reshape(2, rows8, 2 * n)  # free view: odd groups are columns N..2N-1
    n_blocks = n // bn
    grid = (pl.cdiv(m, bm), n_blocks, pl.cdiv(rows8, bk8))
    parity_spec = lambda p: pl.BlockSpec((2, bk8, bn), lambda i, j, kk: (0, kk, j + p * n_blocks))
    return pl.pallas_call(
        functools.partial(sparse24_kernel, rows8=rows8, bk8=bk8),
        grid=grid,
        in_specs=[
            pl.BlockSpec((8, bm, bk8), lambda i, j, kk: (0, i, kk)),
            parity_spec(0),
            parity_spec(1),
            pl.BlockSpec((bk8, bn), lambda i, j, kk: (kk, j)),
        ],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, kk: (i, j)),
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=('parallel', 'parallel', 'arbitrary')
        ),
        interpret=interpret,
    )(xq, v3, v3, s.meta)


def dense_kernel(x_ref, w_ref, o_ref, acc_ref, *, rows: int, bk: int):
    """Dense twin of :func:`sparse24_kernel`: same grid, same accumulator, same K masking."""

    @pl.when(pl.program_id(2) == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    x, w = x_ref[...], w_ref[...]
    kmask_w = _mask_k(rows, bk, 0, w.shape)
    if kmask_w is not None:
        w = jnp.where(kmask_w, w, jnp.zeros((), w.dtype))
        x = jnp.where(_mask_k(rows, bk, 1, x.shape), x, jnp.zeros((), x.dtype))
    acc_ref[...] += jnp.dot(x, w, preferred_element_type=jnp.float32)

    @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
    def _store():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=('block_m', 'block_n', 'block_k', 'interpret'))
def dense_matmul_tpu(
    x: Float[Array, 'M K'],
    w: Float[Array, 'K N'],
    *,
    block_m: int | None = None,
    block_n: int = 512,
    block_k: int = 1024,
    interpret: bool = False,
) -> Float[Array, 'M N']:
    """Identically blocked dense Pallas matmul ``x @ w`` (the benchmark baseline).

    Same grid ``(cdiv(M, bm), cdiv(N, bn), cdiv(K, bk))`` and f32 accumulator as
    :func:`sparse24_matmul_tpu`, reading the dense ``[bk, bn]`` weight tile instead.

    Raises:
      ValueError: shape mismatch or bad block sizes.
    """
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
        raise ValueError(f'{x.shape=} and {w.shape=} must be (M, K) and (K, N)')
    if block_k <= 0 or block_n <= 0 or (block_m is not None and block_m <= 0):
        raise ValueError(f'{block_m=}, {block_n=}, {block_k=} must be positive')
    m, k = x.shape
    n = w.shape[1]
    bm = _block_m(m, block_m, x.dtype)
    bn, bk = min(block_n, n), min(block_k, k)
    return pl.pallas_call(
        functools.partial(dense_kernel, rows=k, bk=bk),
        grid=(pl.cdiv(m, bm), pl.cdiv(n, bn), pl.cdiv(k, bk)),
        in_specs=[
            pl.BlockSpec((bm, bk), lambda i, j, kk: (i, kk)),
            pl.BlockSpec((bk, bn), lambda i, j, kk: (kk, j)),
        ],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, kk: (i, j)),
        out_shape=jax.ShapeDtypeStruct((m, n), jnp.result_type(x.dtype, w.dtype)),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=('parallel', 'parallel', 'arbitrary')
        ),
        interpret=interpret,
    )(x, w)
