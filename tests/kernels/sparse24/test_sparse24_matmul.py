"""Every implementation against the reference; backward; api dispatch; jit/vmap/shard_map."""

import functools

import cases
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxprune.kernels.sparse24 import api, ops, pallas_gpu, pallas_tpu, reference, xla
from jaxprune.kernels.sparse24 import format as fmt


def _dense_ref(x, s):
    """Independent numpy f64 product, so the reference itself is checked too."""
    return np.asarray(x, np.float64) @ np.asarray(fmt.decompress(s), np.float64)


@pytest.mark.parametrize('dtype', cases.DTYPES)
@pytest.mark.parametrize('m,k,n,blocks', cases.CASES, ids=cases.CASE_IDS)
def test_matmul_reference_matches_numpy(m, k, n, blocks, dtype):
    del blocks
    s = cases.sparse(0, k, n, dtype)
    x = cases.make_x(0, (m,), k, dtype)
    cases.assert_close(reference.matmul_reference(x, s), _dense_ref(x, s), dtype)


@pytest.mark.parametrize('impl', ['xla', 'pallas_tpu_interpret'])
@pytest.mark.parametrize('dtype', cases.DTYPES)
@pytest.mark.parametrize('m,k,n,blocks', cases.CASES, ids=cases.CASE_IDS)
def test_sparse24_matmul_matches_reference(m, k, n, blocks, dtype, impl):
    s = cases.sparse(m, k, n, dtype)
    x = cases.make_x(m, (m,), k, dtype)
    if impl == 'xla':
        y = jax.jit(xla.matmul_xla)(x, s)
    else:
        y = pallas_tpu.sparse24_matmul_tpu(x, s, interpret=True, **blocks)
    assert y.shape == (m, n) and y.dtype == dtype
    assert not np.isnan(np.asarray(y, np.float32)).any()  # every output row was written
    cases.assert_close(y, reference.matmul_reference(x, s), dtype)


@pytest.mark.parametrize(
    'm,k,n,blocks', [(1, 8, 24, {}), (100, 520, 40, {'block_m': 32, 'block_n': 16, 'block_k': 128})]
)
def test_dense_pallas_kernel_matches_jnp(m, k, n, blocks):
    w = jnp.asarray(cases.make_24(0, k, n)) + 1.0  # dense weights
    x = cases.make_x(0, (m,), k)
    y = pallas_tpu.dense_matmul_tpu(x, w, interpret=True, **blocks)
    cases.assert_close(y, np.asarray(x, np.float64) @ np.asarray(w, np.float64), jnp.float32)


@pytest.mark.parametrize('m,k,n', [(3, 512, 128), (5, 768, 64)])  # 768: K tail via XLA
def test_pallas_gpu_interpret_matches_reference(m, k, n):
    dtype = jnp.bfloat16
    s = cases.sparse(m, k, n, dtype)
    x = cases.make_x(m, (m,), k, dtype)
    y = pallas_gpu.sparse24_matmul_gpu(x, s, interpret=True)
    assert y.shape == (m, n) and y.dtype == dtype
    cases.assert_close(y, reference.matmul_reference(x, s), dtype)


def test_dense_gpu_interpret_matches_jnp():
    x = cases.make_x(0, (3,), 512, jnp.bfloat16)
    w = jnp.asarray(cases.make_24(0, 512, 64, jnp.bfloat16)) + 1
    y = pallas_gpu.dense_matmul_gpu(x, w, interpret=True)
    ref = np.asarray(x, np.float32) @ np.asarray(w, np.float32)
    cases.assert_close(y, ref, jnp.bfloat16)


def test_pallas_gpu_lowers_to_mosaic_gpu_for_cuda():
    # Cross-platform lowering on CPU runs Mosaic GPU's layout inference and SMEM budget checks
    # (no PTX compile, no run): catches register-layout and shared-memory errors without a GPU.
    k, n, m = 1024, 128, 16
    s = cases.sparse(0, k, n, jnp.bfloat16)
    x = cases.make_x(0, (m,), k, jnp.bfloat16)
    for fn, args in [
        (pallas_gpu.sparse24_matmul_gpu, (x, s)),
        (pallas_gpu.dense_matmul_gpu, (x, fmt.decompress(s))),
    ]:
        lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=('cuda',))
        assert 'mosaic_gpu' in lowered.as_text()


@pytest.mark.parametrize('dtype', cases.DTYPES)
def test_pallas_tpu_lowers_for_tpu(dtype):
    # Cross-platform lowering on CPU checks the Pallas TPU block-shape rules and lowers the body to
    # Mosaic (not a libtpu compile, not a run). K=11008 leaves a ragged, masked last K block.
    k, n, m = 11008, 512, 3
    s = cases.sparse(0, k, n, dtype)
    x = cases.make_x(0, (m,), k, dtype)
    for fn, args in [
        (pallas_tpu.sparse24_matmul_tpu, (x, s)),
        (pallas_tpu.dense_matmul_tpu, (x, fmt.decompress(s))),
    ]:
        lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=('tpu',))
        assert 'tpu_custom_call' in lowered.as_text()


@pytest.mark.gpu
@pytest.mark.parametrize('m', [1, 16, 64])
def test_pallas_gpu_compiled_matches_reference(m):
    dtype = jnp.bfloat16
    s = cases.sparse(m, 4096, 1024, dtype)
    x = cases.make_x(m, (m,), 4096, dtype)
    y = pallas_gpu.sparse24_matmul_gpu(x, s)
    cases.assert_close(y, reference.matmul_reference(x, s), dtype)


def test_pallas_gpu_unsupported_raises_not_implemented():
    s = cases.sparse(0, 256, 64, jnp.float32)
    with pytest.raises(NotImplementedError, match='bf16/f16'):
        pallas_gpu.sparse24_matmul_gpu(cases.make_x(0, (2,), 256), s, interpret=True)
    s = cases.sparse(0, 512, 96, jnp.bfloat16)
    with pytest.raises(NotImplementedError, match='N % block_n=64 == 0'):
        pallas_gpu.sparse24_matmul_gpu(cases.make_x(0, (2,), 512, jnp.bfloat16), s, interpret=True)


def _loss(fn, x, values, meta, cot):
    return jnp.sum(fn(x, fmt.Sparse24(values, meta)).astype(jnp.float32) * cot)


@pytest.mark.parametrize('implementation', ['xla', 'pallas'])
@pytest.mark.parametrize('m,k,n', [(3, 8, 24), (17, 64, 40)])
def test_sparse24_matmul_grad_matches_reference(m, k, n, implementation):
    s = cases.sparse(1, k, n)
    x = cases.make_x(1, (m,), k)
    cot = jnp.asarray(np.random.default_rng(2).standard_normal((m, n)), jnp.float32)
    fn = functools.partial(api.sparse24_matmul, implementation=implementation)
    gx, gv = jax.grad(_loss, argnums=(1, 2))(fn, x, s.values, s.meta, cot)
    rx, rv = jax.grad(_loss, argnums=(1, 2))(reference.matmul_reference, x, s.values, s.meta, cot)
    cases.assert_close(gx, rx, jnp.float32)
    cases.assert_close(gv, rv, jnp.float32)
    # the identity dx = dy W^T, independently in numpy
    cases.assert_close(gx, np.asarray(cot) @ np.asarray(fmt.decompress(s)).T, jnp.float32)


def test_grad_values_only_at_kept_positions():
    # d/dW of x @ W is x^T dy everywhere; the compressed grad must be that matrix read at idx_j.
    s = cases.sparse(4, 16, 8)
    x = cases.make_x(4, (5,), 16)
    dy = jnp.ones((5, 8))
    gv = jax.grad(lambda v: jnp.sum(api.sparse24_matmul(x, fmt.Sparse24(v, s.meta))))(s.values)
    dense = np.asarray(x).T @ np.asarray(dy)  # [K, N]
    idx = fmt.unpack_meta(s.meta, 4)
    for j in range(2):
        rows = 4 * np.arange(4)[:, None] + np.asarray(idx[j])
        cases.assert_close(gv[j], np.take_along_axis(dense, rows, axis=0), jnp.float32)


@pytest.mark.parametrize('implementation', ['xla', 'pallas', None])
def test_api_jit_and_leading_batch_dims(implementation):
    s = cases.sparse(5, 16, 24)
    x = cases.make_x(5, (2, 3), 16)
    fn = jax.jit(functools.partial(api.sparse24_matmul, implementation=implementation))
    y = fn(x, s)
    assert y.shape == (2, 3, 24)
    cases.assert_close(y, reference.matmul_reference(x, s), jnp.float32)


@pytest.mark.parametrize('implementation', ['xla', 'pallas'])
def test_api_vmap(implementation):
    s = cases.sparse(6, 16, 24)
    x = cases.make_x(6, (4, 3), 16)
    fn = functools.partial(api.sparse24_matmul, implementation=implementation)
    y = jax.vmap(fn, in_axes=(0, None))(x, s)
    cases.assert_close(y, reference.matmul_reference(x, s), jnp.float32)


def test_api_large_m_uses_reference_and_k_mod_8_falls_back():
    s = cases.sparse(7, 12, 8)  # K % 8 != 0: kernel raises NotImplementedError -> reference
    x = cases.make_x(7, (3,), 12)
    with pytest.raises(NotImplementedError):
        pallas_tpu.sparse24_matmul_tpu(x, s, interpret=True)
    cases.assert_close(
        api.sparse24_matmul(x, s, implementation='pallas'),
        reference.matmul_reference(x, s),
        jnp.float32,
    )
    s = cases.sparse(7, 16, 8)
    x = cases.make_x(7, (65,), 16)  # M > max_kernel_m -> reference
    cases.assert_close(
        api.sparse24_matmul(x, s, implementation='pallas'),
        reference.matmul_reference(x, s),
        jnp.float32,
    )


def test_api_errors():
    s = cases.sparse(0, 16, 8)
    with pytest.raises(ValueError, match='implementation='):
        api.sparse24_matmul(jnp.ones((2, 16)), s, implementation='triton')
    with pytest.raises(ValueError, match='last axis must equal K=16'):
        api.sparse24_matmul(jnp.ones((2, 12)), s)
    with pytest.raises(ValueError, match='last axis must equal K=16'):
        reference.matmul_reference(jnp.ones((2, 12)), s)
    with pytest.raises(ValueError, match='block_k=12 must be a positive multiple of 8'):
        pallas_tpu.sparse24_matmul_tpu(jnp.ones((2, 16)), s, block_k=12, interpret=True)
    with pytest.raises(ValueError, match='must be'):
        pallas_gpu.sparse24_matmul_gpu(jnp.ones((2, 16)), s, block_k=100, interpret=True)


def test_ops_custom_vjp_accepts_any_forward():
    s = cases.sparse(8, 16, 8)
    x = cases.make_x(8, (3,), 16)
    y = ops.sparse24_matmul_op(x, s, reference.matmul_reference)
    cases.assert_close(y, xla.matmul_xla(x, s), jnp.float32)


@pytest.mark.parametrize('implementation', ['xla', 'pallas'])
def test_api_shard_map_n_sharded_on_8_devices(implementation):
    devices = jax.devices()
    if len(devices) < 8:
        pytest.skip('needs 8 (simulated) devices; tests/conftest.py sets XLA_FLAGS')
    mesh = jax.make_mesh((8,), ('n',), axis_types=(jax.sharding.AxisType.Auto,))
    k, n = 16, 64
    s = cases.sparse(9, k, n)
    x = cases.make_x(9, (3,), k)
    s_spec = fmt.Sparse24(P(None, None, 'n'), P(None, 'n'))
    fn = jax.shard_map(
        functools.partial(api.sparse24_matmul, implementation=implementation),
        mesh=mesh,
        in_specs=(P(), s_spec),
        out_specs=P(None, 'n'),
        check_vma=False,
    )
    y = jax.jit(fn)(x, s)
    assert y.shape == (3, n)
    cases.assert_close(y, reference.matmul_reference(x, s), jnp.float32)
