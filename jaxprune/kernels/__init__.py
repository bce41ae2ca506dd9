"""Custom kernels.

``sparse24``: 2:4-sparse (along K) matmul with XLA, Pallas TPU and Mosaic GPU paths.
"""

from jaxprune.kernels import sparse24

__all__ = ['sparse24']
