"""Format: exact round trips, byte count, golden nibbles, every error path."""

import cases
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune.kernels.sparse24 import format as fmt


@pytest.mark.parametrize('dtype', cases.DTYPES)
@pytest.mark.parametrize('k,n', [(8, 24), (12, 5), (512, 384)])
def test_compress_decompress_roundtrip_exact(k, n, dtype):
    w = jnp.asarray(cases.make_24(0, k, n, dtype))
    s = fmt.compress(w)
    assert s.values.shape == (2, k // 4, n) and s.values.dtype == dtype
    assert s.meta.shape == (-(-k // 8), n) and s.meta.dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(fmt.decompress(s)), np.asarray(w))


def test_compress_matches_reference_golden():
    # col 0: non-zeros at 0 and 2 -> (0, 2), nibble 0 | 2 << 2 = 8.
    # col 1: one non-zero at 1 -> padded with the lowest unused position -> (0, 1), nibble 4.
    w = jnp.array([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0], [0.0, 0.0]])
    s = fmt.compress(w)
    np.testing.assert_array_equal(s.values, [[[1.0, 0.0]], [[3.0, 2.0]]])
    np.testing.assert_array_equal(s.meta, [[8, 4]])
    # two groups share a byte: group 1 in the high nibble
    w2 = jnp.zeros((8, 1)).at[3, 0].set(1.0).at[7, 0].set(2.0).at[6, 0].set(5.0)
    s2 = fmt.compress(w2)  # group 0 -> (0, 3) = 12, group 1 -> (2, 3) = 14
    np.testing.assert_array_equal(s2.meta, [[12 | 14 << 4]])


def test_compress_indices_sorted_and_distinct():
    s = fmt.compress(jnp.asarray(cases.make_24(3, 64, 16)))
    idx0, idx1 = fmt.unpack_meta(s.meta, 16)
    assert bool(jnp.all(idx0 < idx1))


@pytest.mark.parametrize('dtype', cases.DTYPES)
def test_from_mask_roundtrip_exact(dtype):
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((16, 8)), dtype)
    # top-2 |w| per group of four rows
    order = jnp.argsort(-jnp.abs(w.reshape(4, 4, 8).astype(jnp.float32)), axis=1)
    mask = (jnp.argsort(order, axis=1) < 2).reshape(16, 8)
    s = fmt.from_mask(w, mask)
    np.testing.assert_array_equal(fmt.decompress(s), jnp.where(mask, w, 0))
    assert bool(fmt.is_24(fmt.decompress(s)))


def test_from_mask_under_jit_matches_eager():
    w = jnp.asarray(cases.make_24(1, 16, 8))
    mask = w != 0
    eager = fmt.from_mask(w, mask)
    jitted = jax.jit(fmt.from_mask)(w, mask)
    jax.tree.map(np.testing.assert_array_equal, eager, jitted)


def test_nbytes_is_56_25_percent_of_dense_bf16():
    k, n = 512, 384
    s = fmt.compress(jnp.asarray(cases.make_24(0, k, n, jnp.bfloat16)))
    dense = k * n * 2
    assert s.nbytes == dense * 9 // 16
    assert s.nbytes / dense == 0.5625


def test_is_24():
    w = jnp.asarray(cases.make_24(0, 8, 4))
    assert bool(fmt.is_24(w))
    assert not bool(fmt.is_24(w.at[0:3, 1].set(1.0)))


def test_sparse24_is_pytree():
    s = fmt.compress(jnp.asarray(cases.make_24(0, 8, 4)))
    leaves = jax.tree.leaves(s)
    assert len(leaves) == 2
    assert s.shape == (8, 4)


def test_error_k_not_multiple_of_4():
    with pytest.raises(ValueError, match=r'K=6.*pad axis 0 with zeros to 8'):
        fmt.compress(jnp.zeros((6, 3)))
    with pytest.raises(ValueError, match='K=6'):
        fmt.is_24(jnp.zeros((6, 3)))


def test_error_group_with_three_nonzeros_names_location():
    w = jnp.zeros((8, 3)).at[4:7, 2].set(1.0)
    with pytest.raises(ValueError, match=r'rows 4\.\.7, column 2 \(3 non-zeros\)'):
        fmt.compress(w)


def test_error_from_mask_not_24_and_shape():
    w = jnp.ones((8, 3))
    with pytest.raises(ValueError, match=r'mask is not 2:4.*rows 0\.\.3, column 0'):
        fmt.from_mask(w, jnp.ones((8, 3), bool))
    with pytest.raises(ValueError, match='must equal'):
        fmt.from_mask(w, jnp.ones((8, 2), bool))


@pytest.mark.parametrize(
    'w,match',
    [
        (jnp.zeros((8,)), 'must be 2-D'),
        (jnp.zeros((2, 8, 4)), 'must be 2-D'),
        (jnp.zeros((8, 4), jnp.int32), 'must be floating'),
    ],
)
def test_error_ndim_and_dtype(w, match):
    with pytest.raises(ValueError, match=match):
        fmt.compress(w)


def test_error_malformed_sparse24():
    s = fmt.compress(jnp.asarray(cases.make_24(0, 16, 4)))
    with pytest.raises(ValueError, match='must be uint8'):
        fmt.decompress(fmt.Sparse24(s.values, s.meta.astype(jnp.int32)))
    with pytest.raises(ValueError, match=r'must be \(2, K/4, N\)'):
        fmt.decompress(fmt.Sparse24(s.values[:1], s.meta))
    with pytest.raises(TypeError, match='must be Sparse24'):
        fmt.decompress((s.values, s.meta))
