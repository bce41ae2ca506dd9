"""Shared shapes, dtypes, tolerances and 2:4 weight generator for every sparse24 implementation."""

import jax.numpy as jnp
import numpy as np

from jaxprune.kernels.sparse24 import format as fmt

# (M, K, N, pallas block kwargs). Ragged M (1, 3, 17, 100); K, N smaller than or not multiples of
# the blocks; K=520 with block_k=128 leaves a ragged (masked) last K block.
CASES = [
    (1, 8, 24, {}),
    (3, 8, 24, {}),
    (17, 512, 384, {'block_n': 128, 'block_k': 256}),
    (100, 64, 40, {'block_m': 32, 'block_n': 16, 'block_k': 32}),
    (5, 520, 24, {'block_k': 128}),
]
CASE_IDS = [f'M{m}_K{k}_N{n}' for m, k, n, _ in CASES]

DTYPES = [jnp.float32, jnp.bfloat16]

# Stated tolerances: f32 accumulates in f32 on every path (differences are summation order only);
# bf16 outputs are rounded to bf16 on every path, so paths may differ by one bf16 ulp (2^-7 rel).
TOL = {
    jnp.dtype(jnp.float32): {'rtol': 1e-5, 'atol': 1e-4},
    jnp.dtype(jnp.bfloat16): {'rtol': 2**-7, 'atol': 1e-2},
}


def make_24(seed: int, k: int, n: int, dtype=jnp.float32) -> np.ndarray:
    """A random 2:4 (along K) kernel mixing groups with 0, 1 and 2 non-zeros."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k // 4, 4, n)).astype(np.float32)
    order = np.argsort(rng.random((k // 4, 4, n)), axis=1)
    keep_count = rng.choice([0, 1, 2, 2, 2], size=(k // 4, 1, n))
    mask = np.argsort(order, axis=1) < keep_count
    return np.asarray(jnp.asarray((w * mask).reshape(k, n), dtype))


def make_x(seed: int, lead: tuple[int, ...], k: int, dtype=jnp.float32) -> jnp.ndarray:
    return jnp.asarray(np.random.default_rng(seed + 1).standard_normal((*lead, k)), dtype)


def sparse(seed: int, k: int, n: int, dtype=jnp.float32) -> fmt.Sparse24:
    return fmt.compress(jnp.asarray(make_24(seed, k, n, dtype)))


def assert_close(actual, expected, dtype) -> None:
    np.testing.assert_allclose(
        np.asarray(actual, np.float32), np.asarray(expected, np.float32), **TOL[jnp.dtype(dtype)]
    )
