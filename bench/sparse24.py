"""Benchmark the 2:4 sparse matmul against dense baselines on real-model shapes.

Shapes ``K x N`` are Llama-7B / Mistral-7B projections (4096x4096 attention, 4096x11008 /
11008x4096 Llama MLP, 4096x14336 / 14336x4096 Mistral MLP); ``M`` is tokens per call (1 = decode).

Implementations (``--impl``, comma separated):
  xla_dense      jnp.dot(x, w) on the dense weight (the speedup baseline)
  xla_sparse     shuffle-free sum_i x[:, i::4] @ D_i from the compressed weight
  reference      decompress + jnp.dot
  pallas_sparse  Pallas 2:4 kernel of the backend (TPU kernel; Mosaic GPU kernel on GPU)
  pallas_dense   identically blocked dense Pallas kernel of the backend (second baseline; on GPU
                 its K step is 256 so that two pipeline stages fit in SMEM, see pallas_gpu)

On CPU the Pallas kernels only run in interpret mode, which is not a speed measurement: they are
reported as n/a and not timed. GB/s counts the bytes the implementation must read (x, weight in
its stored form) and write (y) once.

Usage:
  python bench/sparse24.py --quick                 # small subset, writes bench/results/...
  python bench/sparse24.py --impl xla_dense,pallas_sparse,pallas_dense
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.kernels.sparse24 import format as fmt
from jaxprune.kernels.sparse24 import pallas_gpu, pallas_tpu, reference, xla

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (4096, 14336), (14336, 4096)]
MS = [1, 4, 16, 64, 256, 1024]
QUICK_SHAPES = [(4096, 4096), (4096, 11008)]
QUICK_MS = [1, 16, 64]
IMPLS = ['xla_dense', 'xla_sparse', 'reference', 'pallas_sparse', 'pallas_dense']
PALLAS = ('pallas_sparse', 'pallas_dense')


def _weights(k: int, n: int, dtype) -> tuple[jax.Array, fmt.Sparse24]:
    """A random 2:4 weight (top-2 |w| per group of four rows) and its compressed form."""
    w = jax.random.normal(jax.random.key(0), (k, n), jnp.float32)
    g = jnp.abs(w).reshape(k // 4, 4, n)
    mask = (jnp.argsort(jnp.argsort(-g, axis=1), axis=1) < 2).reshape(k, n)
    w = jnp.where(mask, w, 0).astype(dtype)
    return w, fmt.from_mask(w, mask)


def _fn(impl: str, backend: str):
    if impl == 'xla_dense':
        return lambda x, w, s: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)
    if impl == 'xla_sparse':
        return lambda x, w, s: xla.matmul_xla(x, s)
    if impl == 'reference':
        return lambda x, w, s: reference.matmul_reference(x, s)
    if impl == 'pallas_sparse':
        kernel = (
            pallas_gpu.sparse24_matmul_gpu if backend == 'gpu' else pallas_tpu.sparse24_matmul_tpu
        )
        return lambda x, w, s: kernel(x, s)
    if impl == 'pallas_dense':
        kernel = pallas_gpu.dense_matmul_gpu if backend == 'gpu' else pallas_tpu.dense_matmul_tpu
        return lambda x, w, s: kernel(x, w)
    raise ValueError(f'{impl=} must be one of {IMPLS}')


def _time(fn, *args, iters: int) -> float:
    """Median seconds per call of a jitted fn (after one compile+warm-up call)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _bytes(impl: str, m: int, k: int, n: int, itemsize: int, s: fmt.Sparse24) -> int:
    weight = k * n * itemsize if impl in ('xla_dense', 'pallas_dense') else s.nbytes
    return m * k * itemsize + weight + m * n * itemsize


def run(shapes, ms, impls, dtype, iters: int) -> list[dict]:
    backend = jax.default_backend()
    itemsize = jnp.dtype(dtype).itemsize
    rows = []
    for k, n in shapes:
        w, s = _weights(k, n, dtype)
        for m in ms:
            x = jax.random.normal(jax.random.key(1), (m, k), jnp.float32).astype(dtype)
            times = {}
            for impl in impls:
                if impl in PALLAS and backend == 'cpu':
                    times[impl] = None  # interpret mode only: not a speed measurement
                    continue
                try:
                    times[impl] = _time(jax.jit(_fn(impl, backend)), x, w, s, iters=iters)
                except NotImplementedError as e:
                    print(f'  {impl} K={k} N={n} M={m}: not implemented ({e})', file=sys.stderr)
                    times[impl] = None
                except Exception as e:  # an unverified compiled kernel must not kill the run
                    if impl not in PALLAS:
                        raise
                    print(f'  {impl} K={k} N={n} M={m}: failed ({e!r:.300})', file=sys.stderr)
                    times[impl] = None
            for impl in impls:
                t = times[impl]
                base, pdense = times.get('xla_dense'), times.get('pallas_dense')
                rows.append(
                    {
                        'impl': impl,
                        'M': m,
                        'K': k,
                        'N': n,
                        'dtype': jnp.dtype(dtype).name,
                        'time_us': None if t is None else t * 1e6,
                        'gbps': None if t is None else _bytes(impl, m, k, n, itemsize, s) / t / 1e9,
                        'speedup_vs_xla_dense': None if t is None or base is None else base / t,
                        'speedup_vs_pallas_dense': None
                        if t is None or pdense is None
                        else pdense / t,
                        'note': 'interpret mode: n/a'
                        if impl in PALLAS and backend == 'cpu'
                        else '',
                    }
                )
            print(_format_rows(rows[-len(impls) :]), flush=True)
    return rows


def _f(v, spec: str) -> str:
    width = int(spec.split('.')[0])
    return f'{"n/a":>{width}}' if v is None else format(v, spec)


def _format_rows(rows: list[dict]) -> str:
    return '\n'.join(
        f'{r["K"]:>6} {r["N"]:>6} {r["M"]:>5} {r["impl"]:>14} {_f(r["time_us"], "12.1f")} '
        f'{_f(r["gbps"], "8.2f")} {_f(r["speedup_vs_xla_dense"], "8.2f")} '
        f'{_f(r["speedup_vs_pallas_dense"], "8.2f")}'
        for r in rows
    )


HEADER = (
    f'{"K":>6} {"N":>6} {"M":>5} {"impl":>14} {"time_us":>12} {"GB/s":>8} {"xdense":>8} '
    f'{"pdense":>8}   (xdense/pdense = speedup vs XLA dense / dense Pallas)'
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true', help=f'{QUICK_SHAPES} x M={QUICK_MS}')
    parser.add_argument('--impl', default=','.join(IMPLS), help=f'comma list of {IMPLS}')
    parser.add_argument('--dtype', default='bfloat16', choices=['bfloat16', 'float32'])
    parser.add_argument('--iters', type=int, default=10)
    parser.add_argument('--out', default=None, help='JSON path (default bench/results/...)')
    args = parser.parse_args(argv)
    impls = args.impl.split(',')
    for impl in impls:
        if impl not in IMPLS:
            parser.error(f'{impl=} must be one of {IMPLS}')
    shapes, ms = (QUICK_SHAPES, QUICK_MS) if args.quick else (SHAPES, MS)
    device = jax.devices()[0]
    print(f'device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}')
    print(HEADER)
    rows = run(shapes, ms, impls, jnp.dtype(args.dtype), args.iters)
    kind = device.device_kind.replace(' ', '_').lower()
    out = pathlib.Path(
        args.out or pathlib.Path(__file__).parent / 'results' / f'sparse24_{kind}.json'
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        'device_kind': device.device_kind,
        'platform': jax.default_backend(),
        'num_devices': jax.device_count(),
        'gpu_measured': jax.default_backend() == 'gpu',
        'jax_version': jax.__version__,
        'python': platform.python_version(),
        'command': ' '.join([sys.executable, *sys.argv]),
        'date_utc': datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds'),
        'iters': args.iters,
        'notes': (
            'CPU: Pallas kernels run only in interpret mode, which is not a speed measurement; '
            'their rows are n/a. No GPU or TPU was available for this run.'
            if jax.default_backend() == 'cpu'
            else ''
        ),
        'rows': rows,
    }
    out.write_text(json.dumps(record, indent=1) + '\n')
    print(f'wrote {out}')


if __name__ == '__main__':
    main()
