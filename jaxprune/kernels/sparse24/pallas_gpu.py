"""Mosaic GPU (Hopper) shuffle-free 2:4 matmul.

JAX 0.10.2 ships two GPU Pallas backends: Triton (deprecated from JAX 0.11) and Mosaic GPU (its
successor, ``jax.experimental.pallas.mosaic_gpu``). This kernel targets Mosaic GPU, warpgroup
lowering semantics (SMEM swizzles and register layouts are inferred).

Hopper exposes no sparse tensor-core MMA through Pallas, so the gain is bandwidth: each K step TMA-
loads the compressed tiles (two value planes + one meta byte per two groups) into SMEM, decodes the
eight shuffle-free planes ``D_{p,i}`` in registers (elementwise selects on the nibbles), writes each
to a double-buffered SMEM tile and issues ``wgmma`` ``[64, bk/8] @ [bk/8, bn]`` against the
de-interleaved activation planes ``xq[4p + i] = x[:, 8r + 4p + i]`` (p = nibble parity,
i = position), decoding plane ``j + 1`` while the wgmma of plane ``j`` runs. Values are viewed as
``[2, K/8, 2N]`` (a free reshape of ``[2, K/4, N]``), so the even / odd groups of a meta byte row
are two column ranges of one row: no strided or interleaving access. ``M`` is padded to the
64-row wgmma tile in the wrapper (the activation is small in decode). Grid: one CTA per (64-row,
``bn``-column) output tile; K is a 2-stage ``emit_pipeline``. A ragged K tail (``K % block_k``,
e.g. 256 of K=11008) is added by XLA from the tail slices in f32, the kernel then emitting f32 so
the sum is rounded once.

Constraints (``NotImplementedError`` -> callers fall back to the reference): bf16/f16 operands,
``K >= block_k``, ``N % block_n == 0``. ``block_k`` must be a multiple of 512 (the decoded
``[bk/8, bn]`` tile must fill the 64-row WGMMA register layout).

Verification status (no GPU was available when this was written):
  * ``interpret=True`` runs this same kernel under the Mosaic GPU interpreter
    (``InterpretGPUParams``: simulated SMEM, TMA copies, barriers, wgmma) on CPU; tested against
    the reference.
  * Cross-platform lowering on CPU (``jit(...).trace(...).lower(lowering_platforms=('cuda',))``)
    passes Mosaic GPU layout inference and the SMEM budget for every benchmark shape (tested for
    one). That is not a PTX compile, nor a run: the compiled path has NOT been executed, and its
    speed is unmeasured. Compiled tests are ``@pytest.mark.gpu``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jaxtyping import Array, Float

from jaxprune.kernels.sparse24 import format as fmt
from jaxprune.kernels.sparse24 import pallas_tpu, xla

_WGMMA_M = 64
_STEPS = 2
_DENSE_STEPS = 2


def sparse24_gpu_kernel(xq_smem, v_smems, meta_smem, d_smem, acc_ref):
    """One K step: decode each of the eight planes into SMEM and ``wgmma`` it into the f32 acc.

    Refs: ``xq_smem [8, 64, bk8]``, ``v_smems`` = (plane0 even, plane1 even, plane0 odd,
    plane1 odd) each ``[bk8, bn]``, ``meta_smem u8[bk8, bn]``, ``d_smem [2, bk8, bn]`` (double
    buffer: plane ``j`` is decoded while the wgmma of plane ``j - 1`` runs).
    """
    meta = meta_smem[...].astype(jnp.int32)
    for p in range(2):
        nib = (meta >> (4 * p)) & 15
        idx0, idx1 = nib & 3, nib >> 2
        v0, v1 = v_smems[2 * p][...], v_smems[2 * p + 1][...]
        zero = jnp.zeros_like(v0)
        for i in range(fmt.GROUP):
            j = fmt.GROUP * p + i
            if j >= 2:
                plgpu.wgmma_wait(1)  # the wgmma that read d_smem[j % 2] (plane j - 2) is done
            d_smem[j % 2] = jnp.where(idx0 == i, v0, jnp.where(idx1 == i, v1, zero))
            plgpu.commit_smem()
            plgpu.wgmma(acc_ref, xq_smem.at[j], d_smem.at[j % 2])
    plgpu.wgmma_wait(0)


def _validate(x, s: fmt.Sparse24, block_n: int, block_k: int) -> None:
    fmt._check_sparse(s)
    k, n = s.shape
    if x.ndim != 2 or x.shape[1] != k:
        raise ValueError(f'{x.shape=} must be (M, K={k}) for {s.shape=}')
    if block_k % 512 or block_n % 64 or block_k <= 0 or block_n <= 0:
        # block_k / 8 meta rows must fill the 64-row WGMMA register layout of the decoded planes
        raise ValueError(f'{block_k=} and {block_n=} must be positive multiples of 512 and 64')
    if s.values.dtype not in (jnp.bfloat16, jnp.float16) or x.dtype != s.values.dtype:
        raise NotImplementedError(f'{x.dtype=}, {s.values.dtype=}: wgmma path needs bf16/f16')
    if k < block_k or n % block_n:
        raise NotImplementedError(f'{s.shape=} needs K >= {block_k=} and N % {block_n=} == 0')


@functools.partial(jax.jit, static_argnames=('block_m', 'block_n', 'block_k', 'interpret'))
def sparse24_matmul_gpu(
    x: Float[Array, 'M K'],
    s: fmt.Sparse24,
    *,
    block_m: int | None = None,
    block_n: int = 64,
    block_k: int = 512,
    interpret: bool = False,
) -> Float[Array, 'M N']:
    """Mosaic GPU shuffle-free 2:4 matmul ``x @ decompress(s)`` (see module docstring).

    Args:
      x: ``[M, K]`` bf16/f16 activations.
      s: compressed ``W[K, N]``, same dtype as ``x``.
      block_m: ignored (the wgmma tile is 64 rows; ``M`` is padded to it). Kept for a uniform API.
      block_n: output columns per CTA, a multiple of 64.
      block_k: contraction rows per pipeline step, a multiple of 512.
      interpret: run under the Mosaic GPU interpreter (CPU).

    Returns:
      ``[M, N]`` in ``x.dtype``.

    Raises:
      ValueError: shape mismatch or bad block sizes.
      NotImplementedError: dtype or divisibility not supported (callers use the reference).
    """
    del block_m
    _validate(x, s, block_n, block_k)
    m, k = x.shape
    n = s.shape[1]
    bm, bn, bk8 = _WGMMA_M, block_n, block_k // 8
    m_pad = -(-m // bm) * bm
    # The kernel covers whole K blocks of the full (unsliced) arrays; a ragged K tail (e.g. 256 of
    # K=11008) goes through XLA on the small tail slices. TMA would zero-fill an out-of-bounds
    # last block on hardware, but the interpreter rejects it and it is unverified, so no OOB reads.
    k_main = k // block_k * block_k
    # with a tail, the kernel emits f32 so the sum is rounded once (cancellation otherwise shows)
    o_dtype = x.dtype if k_main == k else jnp.float32
    # activation only: pad M to the wgmma tile, cut the K tail, de-interleave
    # -> [8, m_pad, k_main/8]
    xq = pallas_tpu.deinterleave8(jnp.pad(x[:, :k_main], ((0, m_pad - m), (0, 0))))
    v3 = s.values.reshape(2, k // 8, 2 * n)  # free view; odd groups are columns N..2N-1
    dtype = x.dtype
    x_spec = plgpu.BlockSpec((8, bm, bk8), lambda kk: (0, 0, kk))
    w_spec = plgpu.BlockSpec((bk8, bn), lambda kk: (kk, 0))
    meta_spec = plgpu.BlockSpec((bk8, bn), lambda kk: (kk, 0))

    def body(xq_gmem, v_gmem, meta_gmem, o_gmem, d_smem):
        mi, ni = jax.lax.axis_index('m'), jax.lax.axis_index('n')
        rows = pl.ds(mi * bm, bm)
        cols = pl.ds(ni * bn, bn)
        v_parts = [
            v_gmem.at[plane, :, pl.ds(parity * n + ni * bn, bn)]
            for parity in range(2)
            for plane in range(2)
        ]

        def scope(acc_ref):
            def step(_, xq_smem, v0e, v1e, v0o, v1o, meta_smem):
                sparse24_gpu_kernel(xq_smem, (v0e, v1e, v0o, v1o), meta_smem, d_smem, acc_ref)

            plgpu.emit_pipeline(
                step,
                grid=(k_main // block_k,),
                in_specs=[x_spec, w_spec, w_spec, w_spec, w_spec, meta_spec],
                max_concurrent_steps=_STEPS,
            )(xq_gmem.at[:, rows, :], *v_parts, meta_gmem.at[:, cols])
            return acc_ref[...]

        acc = pl.run_scoped(scope, plgpu.ACC((bm, bn), jnp.float32))

        # staged through SMEM allocated after the pipeline's buffers are released
        def store(o_smem):
            o_smem[...] = acc.astype(o_dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[rows, cols])
            plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(store, plgpu.SMEM((bm, bn), o_dtype))

    out = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((m_pad, n), o_dtype),
        grid=(m_pad // bm, n // bn),
        grid_names=('m', 'n'),
        scratch_types=[plgpu.SMEM((2, bk8, bn), dtype)],
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=_interpret_params() if interpret else None,
    )(xq, v3, s.meta)[:m]
    if k_main == k:
        return out
    f32 = jnp.float32  # bf16 products are exact in f32; round once at the end
    tail = fmt.Sparse24(s.values[:, k_main // 4 :].astype(f32), s.meta[k_main // 8 :])
    y_tail = xla.matmul_xla(x[:, k_main:].astype(f32), tail)
    return (out + y_tail).astype(dtype)


def _interpret_params():
    from jax._src.pallas.mosaic_gpu.interpret import params  # no public alias in JAX 0.10.2

    return params.InterpretGPUParams()


@functools.partial(jax.jit, static_argnames=('block_n', 'block_k', 'interpret'))
def dense_matmul_gpu(
    x: Float[Array, 'M K'],
    w: Float[Array, 'K N'],
    *,
    block_n: int = 64,
    block_k: int = 256,
    interpret: bool = False,
) -> Float[Array, 'M N']:
    """Identically blocked dense Mosaic GPU matmul ``x @ w`` (the benchmark baseline).

    Same CTA grid (64-row x ``block_n`` output tiles), 2-stage K pipeline and f32 wgmma
    accumulator as :func:`sparse24_matmul_gpu`, reading the dense ``[block_k, block_n]`` weight
    tile with one wgmma per step. Deliberate difference: ``block_k`` defaults to 256, not 512: at
    512 a dense stage is 128 KiB (x + w) and two stages exceed the 227 KiB of Hopper SMEM (checked
    by lowering), while a 2:4 stage at 512 is 108 KiB. Same verification status as the sparse
    kernel (interpret + cross-lowering, never run on a GPU).

    Raises:
      ValueError: shape mismatch or bad block sizes.
      NotImplementedError: dtype or divisibility not supported.
    """
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
        raise ValueError(f'{x.shape=} and {w.shape=} must be (M, K) and (K, N)')
    if block_k % 64 or block_n % 64 or block_k <= 0 or block_n <= 0:
        raise ValueError(f'{block_k=} and {block_n=} must be positive multiples of 64')
    if w.dtype not in (jnp.bfloat16, jnp.float16) or x.dtype != w.dtype:
        raise NotImplementedError(f'{x.dtype=}, {w.dtype=}: wgmma path needs bf16/f16')
    m, k = x.shape
    n = w.shape[1]
    if k % block_k or n % block_n:
        raise NotImplementedError(f'{w.shape=} must divide into {block_k=} x {block_n=} tiles')
    bm, bn = _WGMMA_M, block_n
    m_pad = -(-m // bm) * bm
    xp = jnp.pad(x, ((0, m_pad - m), (0, 0)))

    def body(x_gmem, w_gmem, o_gmem):
        mi, ni = jax.lax.axis_index('m'), jax.lax.axis_index('n')
        rows, cols = pl.ds(mi * bm, bm), pl.ds(ni * bn, bn)

        def scope(acc_ref):
            def step(_, x_smem, w_smem):
                plgpu.wgmma(acc_ref, x_smem, w_smem)
                plgpu.wgmma_wait(0)

            plgpu.emit_pipeline(
                step,
                grid=(k // block_k,),
                in_specs=[
                    plgpu.BlockSpec((bm, block_k), lambda kk: (0, kk)),
                    plgpu.BlockSpec((block_k, bn), lambda kk: (kk, 0)),
                ],
                max_concurrent_steps=_DENSE_STEPS,
            )(x_gmem.at[rows, :], w_gmem.at[:, cols])
            return acc_ref[...]

        acc = pl.run_scoped(scope, plgpu.ACC((bm, bn), jnp.float32))

        def store(o_smem):
            o_smem[...] = acc.astype(o_smem.dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[rows, cols])
            plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(store, plgpu.SMEM((bm, bn), x.dtype))

    return plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((m_pad, n), x.dtype),
        grid=(m_pad // bm, n // bn),
        grid_names=('m', 'n'),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=_interpret_params() if interpret else None,
    )(xp, w)[:m]
