"""The compressed 2:4 format along the contraction axis, and its exact checks.

Layout, for a kernel ``W[K, N]`` (Flax ``(in, out)``) that is 2:4 sparse along ``K`` (axis 0):

* ``values``: ``[2, K/4, N]``, same dtype as ``W``. Plane ``j`` holds the ``j``-th kept element of
  each group of four rows (``g = k // 4``), in ascending position.
* ``meta``: ``uint8[ceil(K/8), N]``. One 4-bit nibble per group, ``idx0 | idx1 << 2`` with
  ``idx0 < idx1`` (the NVIDIA / HF compressed-tensors nibble); two nibbles per byte along the group
  axis: group ``2r`` in the low nibble of row ``r``, group ``2r + 1`` in the high nibble. When
  ``K/4`` is odd the last high nibble is padding (``0``).

Bytes: ``K*N*itemsize + K*N/8``, i.e. ``9/16 = 56.25 %`` of dense bf16 when ``K % 8 == 0``.

A group with fewer than two survivors stores explicit zeros at deterministic positions: the kept
set is the non-zero positions padded with the lowest unused positions, then sorted.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, UInt8

GROUP = 4
KEEP = 2


class Sparse24(NamedTuple):
    """A 2:4-sparse kernel ``W[K, N]``, compressed along ``K``. A pytree (NamedTuple).

    Attributes:
      values: ``[2, K/4, N]`` kept elements, two planes in ascending position.
      meta: ``uint8[ceil(K/8), N]`` packed nibbles ``idx0 | idx1 << 2``, two groups per byte.
    """

    values: Float[Array, '2 G N']
    meta: UInt8[Array, 'G2 N']

    @property
    def shape(self) -> tuple[int, int]:
        """The dense shape ``(K, N)``."""
        return (self.values.shape[-2] * GROUP, self.values.shape[-1])

    @property
    def dtype(self) -> jnp.dtype:
        return self.values.dtype

    @property
    def nbytes(self) -> int:
        """Bytes of the compressed arrays (values + meta)."""
        return int(self.values.nbytes) + int(self.meta.nbytes)


def _is_traced(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def _check_dense(w, name: str = 'w') -> None:
    if np.ndim(w) != 2:
        raise ValueError(
            f'{name}.shape={np.shape(w)} must be 2-D (K, N), sparse along axis 0 (K, the '
            'contraction axis); reshape or transpose to (in_features, out_features) first'
        )
    if not jnp.issubdtype(jnp.result_type(w), jnp.floating):
        raise ValueError(f'{name}.dtype={jnp.result_type(w)} must be floating (f32, bf16, f16)')
    k = np.shape(w)[0]
    if k % GROUP:
        raise ValueError(
            f'{name}.shape={np.shape(w)}: K={k} (axis 0) must be a multiple of {GROUP} for 2:4 '
            f'groups; pad axis 0 with zeros to {-(-k // GROUP) * GROUP}'
        )


def _check_sparse(s: Sparse24) -> None:
    if not isinstance(s, Sparse24):
        raise TypeError(f'{type(s)=} must be Sparse24; build one with compress(w)')
    v, m = s.values, s.meta
    if np.ndim(v) != 3 or np.shape(v)[0] != KEEP:
        raise ValueError(f'{s.values.shape=} must be (2, K/4, N)')
    if not jnp.issubdtype(v.dtype, jnp.floating):
        raise ValueError(f'{s.values.dtype=} must be floating')
    g, n = np.shape(v)[1:]
    if m.dtype != jnp.uint8 or np.shape(m) != (-(-g // 2), n):
        raise ValueError(
            f'{s.meta.shape=}, {s.meta.dtype=} must be uint8 ({-(-g // 2)}, {n}) for '
            f'{s.values.shape=} (two nibbles per byte along the group axis)'
        )


def _first_bad_group(counts: np.ndarray) -> str:
    g, n = np.argwhere(counts > KEEP)[0]
    return f'rows {GROUP * g}..{GROUP * g + 3}, column {n} ({int(counts[g, n])} non-zeros)'


def _select(keep: Bool[Array, 'G 4 N']) -> tuple[jax.Array, jax.Array]:
    """Positions (idx0 < idx1) of the kept pair: kept positions first, padded with lowest unused."""
    pos = jnp.arange(GROUP, dtype=jnp.int32)[None, :, None]
    key = jnp.where(keep, pos, pos + GROUP)  # kept positions sort first, then by position
    first_two = jnp.argsort(key, axis=1, stable=True)[:, :KEEP]
    idx = jnp.sort(first_two, axis=1).astype(jnp.int32)
    return idx[:, 0], idx[:, 1]


def pack_meta(idx0: jax.Array, idx1: jax.Array) -> UInt8[Array, 'G2 N']:
    """Packs per-group indices ``[G, N]`` into ``uint8[ceil(G/2), N]`` nibbles."""
    nib = (idx0 | (idx1 << 2)).astype(jnp.uint8)
    if nib.shape[0] % 2:
        nib = jnp.concatenate([nib, jnp.zeros((1, nib.shape[1]), jnp.uint8)])
    return nib[0::2] | (nib[1::2] << 4)


def unpack_meta(meta: UInt8[Array, 'G2 N'], groups: int) -> tuple[jax.Array, jax.Array]:
    """Inverse of :func:`pack_meta`: ``(idx0, idx1)`` as ``int32[groups, N]``."""
    m = meta.astype(jnp.int32)
    nib = jnp.stack([m & 15, m >> 4], axis=1).reshape(-1, m.shape[-1])[:groups]
    return nib & 3, (nib >> 2) & 3


def _compress_kept(w: jax.Array, keep: jax.Array) -> Sparse24:
    k, n = w.shape
    wg = w.reshape(k // GROUP, GROUP, n)
    idx0, idx1 = _select(keep.reshape(wg.shape))
    wg = jnp.where(keep.reshape(wg.shape), wg, jnp.zeros((), w.dtype))
    v0 = jnp.take_along_axis(wg, idx0[:, None], axis=1)[:, 0]
    v1 = jnp.take_along_axis(wg, idx1[:, None], axis=1)[:, 0]
    return Sparse24(jnp.stack([v0, v1]), pack_meta(idx0, idx1))


def compress(w: Float[Array, 'K N']) -> Sparse24:
    """Compresses a 2:4-sparse (along axis 0) kernel exactly.

    Args:
      w: ``[K, N]`` floating kernel with at most two non-zeros in every group of four rows
        ``4g .. 4g+3`` of each column.

    Returns:
      ``Sparse24``; ``decompress(compress(w)) == w`` exactly.

    Raises:
      ValueError: ``w`` not 2-D or not floating, ``K % 4 != 0`` (pad it), or a group with more
        than two non-zeros (named by rows and column). Under ``jit`` the data check cannot run:
        extra non-zeros are dropped, keeping the first two by position; check with
        :func:`is_24` outside ``jit``.

    Example:
      Column 0 keeps rows 0 and 2; column 1 has one non-zero (row 1), padded with row 0:

      >>> import jax.numpy as jnp
      >>> w = jnp.array([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0], [0.0, 0.0]])
      >>> s = compress(w)
      >>> s.values[:, 0]  # [plane, column] of group 0: the kept pair in ascending position
      Array([[1., 0.],
             [3., 2.]], dtype=float32)
      >>> s.meta  # idx0 | idx1 << 2 per column: (0, 2) -> 8, (0, 1) -> 4
      Array([[8, 4]], dtype=uint8)
      >>> compress(jnp.ones((4, 1)))
      Traceback (most recent call last):
      ...
      ValueError: w (shape (4, 1)) is not 2:4 sparse along axis 0: rows 0..3, column 0 ...
    """
    _check_dense(w)
    w = jnp.asarray(w)
    keep = w != 0
    if not _is_traced(w):
        counts = np.asarray(keep.reshape(-1, GROUP, w.shape[1]).sum(axis=1))
        if (counts > KEEP).any():
            raise ValueError(
                f'w (shape {w.shape}) is not 2:4 sparse along axis 0: {_first_bad_group(counts)}; '
                'use from_mask(w, mask) with a 2:4 mask (e.g. top-2 magnitude per group)'
            )
    return _compress_kept(w, keep)


def from_mask(w: Float[Array, 'K N'], mask: Bool[Array, 'K N']) -> Sparse24:
    """Compresses ``w * mask`` for a 2:4 ``mask`` (any dense ``w``).

    Args:
      w: ``[K, N]`` floating dense kernel.
      mask: ``[K, N]`` boolean (or 0/1) mask with at most two ``True`` per group of four rows.

    Returns:
      ``Sparse24`` with ``decompress(...) == where(mask, w, 0)`` exactly.

    Raises:
      ValueError: shape/dtype problems as in :func:`compress`, ``mask.shape != w.shape``, or a
        group with more than two kept entries (checked outside ``jit`` only).
    """
    _check_dense(w)
    if np.shape(mask) != np.shape(w):
        raise ValueError(f'{np.shape(mask)=} must equal {np.shape(w)=}')
    w = jnp.asarray(w)
    keep = jnp.asarray(mask).astype(bool)
    if not _is_traced(keep):
        counts = np.asarray(keep.reshape(-1, GROUP, w.shape[1]).sum(axis=1))
        if (counts > KEEP).any():
            raise ValueError(f'mask is not 2:4 along axis 0: {_first_bad_group(counts)}')
    return _compress_kept(w, keep)


def planes(s: Sparse24) -> Float[Array, '4 G N']:
    """The four shuffle-free planes ``D_i[g, n]`` = kept value at position ``i`` of group g, else 0.

    Only elementwise selects on the value planes; the weight is never reordered.
    """
    _check_sparse(s)
    idx0, idx1 = unpack_meta(s.meta, s.values.shape[1])
    v0, v1 = s.values[0], s.values[1]
    zero = jnp.zeros((), s.values.dtype)
    return jnp.stack([jnp.where(idx0 == i, v0, jnp.where(idx1 == i, v1, zero)) for i in range(4)])


def decompress(s: Sparse24) -> Float[Array, 'K N']:
    """Dense ``[K, N]`` kernel from a :class:`Sparse24` (exact).

    Raises:
      TypeError: ``s`` is not a ``Sparse24``.
      ValueError: ``values``/``meta`` shapes or dtypes inconsistent with the format.

    Example:
      >>> w = jnp.array([[0.0], [5.0], [0.0], [7.0]])
      >>> decompress(compress(w)).ravel().tolist()
      [0.0, 5.0, 0.0, 7.0]
    """
    d = planes(s)  # [4, G, N]
    return jnp.moveaxis(d, 0, 1).reshape(s.shape)


def is_24(w: Float[Array, 'K N']) -> jax.Array:
    """``True`` iff every group of four rows (axis 0) of every column has at most two non-zeros.

    Raises:
      ValueError: ``w`` not 2-D, not floating, or ``K % 4 != 0``.
    """
    _check_dense(w)
    w = jnp.asarray(w)
    return jnp.all((w != 0).reshape(-1, GROUP, w.shape[1]).sum(axis=1) <= KEEP)
