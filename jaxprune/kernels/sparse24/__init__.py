"""2:4 sparse matmul along the contraction axis (K) of a Flax ``(K, N)`` kernel.

Design: one compressed format (``format.Sparse24``: two value planes + packed nibbles, 56.25 % of
dense bf16), one spec (``reference.matmul_reference`` = decompress then dot), and the shuffle-free
identity ``x W = sum_i x[:, i::4] D_i`` shared by every fast path: plain XLA (``xla``), Pallas TPU
(``pallas_tpu``) and Mosaic GPU (``pallas_gpu``). ``ops`` wires one ``custom_vjp`` around any
forward; ``api.sparse24_matmul`` dispatches and falls back to the reference on
``NotImplementedError``.
"""

from jaxprune.kernels.sparse24.api import sparse24_matmul
from jaxprune.kernels.sparse24.format import Sparse24, compress, decompress, from_mask, is_24
from jaxprune.kernels.sparse24.reference import matmul_reference

__all__ = [
    'Sparse24',
    'compress',
    'decompress',
    'from_mask',
    'is_24',
    'matmul_reference',
    'sparse24_matmul',
]
