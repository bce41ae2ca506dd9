"""Benchmark: domain adaptation with structured pruning -- dense LoRA vs two-stage vs ATP.

Task: adapt a causal LM to a domain (SmolLM2-135M on Shakespeare by default) while removing a share
of the prunable parameters (the q/k/v/o/gate/up/down kernels; ``--density`` is the fraction KEPT,
default 0.6 = 40 % removed). Three methods, the same LoRA token budget (``--steps`` x batch x
seq_len, identical LoRA batches from the same stream):

* ``dense LoRA``: LoRA fine-tuning, nothing pruned (the reference for relative performance);
* ``two-stage``: one-shot structured pruning (GQA groups + FFN neurons) by first-order Taylor
  ``|W * dL/dW|`` (LLM-Pruner style; ``--criterion magnitude`` for ``|W|``) on calibration batches
  from the held-out documents, global ranking by score per parameter at the exact budget
  (``jaxprune.masks._budget.budget_keep``), surgery, then LoRA with the trainer's step;
* ``ATP``: ``jaxprune.methods._atp_train.run_atp`` (generator steps on the held-out documents,
  LoRA-aware LoRA + group lasso, frozen exact-budget masks, export by surgery + dim slicing).

Columns: held-out perplexity (validation split, first ``--eval-batches`` batches), relative
performance (dense ppl / method ppl), parameters kept (projection params of the exported model /
prunable), inference latency ratio to dense (jitted forward, batch 1 and 8 x seq_len, median of
``--reps``), fine-tuning wall time (step loop incl. compilation; two-stage adds scoring, ATP
includes its generator steps). Prints a table and writes JSON (``bench/results/atp_<model>.json``).

  python bench/atp.py --model tiny --steps 20          # smoke run, ~2 min on CPU
  python bench/atp.py --steps 30 --eval-batches 8     # SmolLM2-135M (shared 2-core CPU: ~40 min)
"""

from __future__ import annotations

import os
import sys

# Other benchmarks live next to this file (bench/ast.py would shadow the stdlib ``ast`` module
# that numpy imports), so drop the script directory from the import path.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse
import datetime
import json
import pathlib
import platform
import tempfile
import time

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('HF_DATASETS_OFFLINE', '1')

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprune import config, data, lora, models, surgery, train
from jaxprune.masks import _budget, _density
from jaxprune.methods import _atp_train
from jaxprune.surgery import _dims

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = {'smollm2': 'configs/atp_smollm2_shakespeare.yaml', 'tiny': 'configs/atp_tiny.yaml'}


def _run_cfg(args) -> config.RunCfg:
    s = args.steps
    overrides = [
        f'run_dir={args.run_dir}', f'train.steps={s}', f'train.warmup_steps={max(1, s // 10)}',
        f'prune.lasso_every={max(1, s // 10)}', f'prune.target_density={args.density}',
        'checkpoint.resume=false', *args.set,
    ]
    return config.load_config(ROOT / CONFIGS[args.model], overrides)


def _lora_finetune(model, cfg, stream, steps):
    """LoRA with the trainer's optimizer and jitted step (``NoMethod``); returns (model, secs)."""
    graphdef, trainable, rest = nnx.split(model, lora.trainable_filter(), ...)
    tx = cfg.train.build_optimizer()
    state = train.init_state(trainable, tx, seed=cfg.train.seed)
    step_fn = train.make_train_step(graphdef, tx, task='causal_lm', method=train.NoMethod())
    t0 = time.perf_counter()
    for i in range(steps):
        batch = {k: jnp.asarray(v) for k, v in next(stream).items()}
        state, m = step_fn(state, rest, batch)
        if (i + 1) % cfg.train.log_every == 0:
            print(f'  step {i + 1} loss {float(m["loss"]):.4f}', file=sys.stderr, flush=True)
    jax.block_until_ready(state.trainable)
    return nnx.merge(graphdef, state.trainable, rest), time.perf_counter() - t0


def _merged_plain(model):
    """A LoRA-free copy of ``model`` with the adapters folded into the kernels."""
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    scale = _atp_train._lora_scale(model)
    if scale is not None:
        params = lora.merge_lora(params, scale=scale)
    return surgery.rebuild_model(model, model.config, params)


def _model_apply(model):
    graphdef, state = nnx.split(model)

    def apply(b):
        return nnx.merge(graphdef, state)(b['input_ids'])

    return apply


def _taylor_keep(model, batches, density, criterion):
    """LLM-Pruner-style one-shot structured scores and the exact-budget keep vectors."""
    arch = model.config
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    structs = tuple(s for s in models.structures(arch) if s.kind != 'hidden')
    pure = nnx.to_pure_dict(params)

    def loss(p, b):
        logits = nnx.merge(graphdef, p, rest)(b['input_ids'])
        sums = train.loss_sums(logits, b['labels'], task='causal_lm')
        return sums['loss_sum'] / jnp.maximum(sums['count'], 1.0)

    if criterion == 'taylor':
        grad = jax.jit(jax.grad(loss))
        total = None
        for b in batches:
            g = nnx.to_pure_dict(grad(params, {k: jnp.asarray(v) for k, v in b.items()}))
            total = g if total is None else jax.tree.map(jnp.add, total, g)
        saliency = jax.tree.map(lambda w, g: jnp.abs(w * g), pure, total)
    else:
        saliency = jax.tree.map(jnp.abs, pure)

    def get(tree, path):
        for p in path:
            tree = tree[p]
        return tree

    scores = {}
    for s in structs:
        acc = jnp.zeros((s.size,), jnp.float32)
        for slc in s.slices:
            x = jnp.moveaxis(get(saliency, slc.path), slc.axis, 0)
            acc = acc + x.reshape(s.size, -1).sum(axis=1)
        dens = acc / s.params_per_unit
        # Surgery keeps one (zeroed) unit of a structure pruned to nothing, and those parameters
        # still count: reserve each structure's best unit so the budget below is exact.
        scores[(s.kind, s.layer)] = dens.at[jnp.argmax(dens)].set(jnp.inf)
    keep = _budget.budget_keep(scores, structs, _budget.param_shapes(pure), density)
    return {k: np.asarray(v) for k, v in keep.items()}


def _latencies(fns, batch_sizes, seq, reps, vocab):
    """Median forward seconds per (name, batch); models interleaved rep by rep (shared CPU)."""
    rng = np.random.default_rng(0)
    ids = {b: jnp.asarray(rng.integers(0, vocab, (b, seq)), jnp.int32) for b in batch_sizes}
    jitted = {name: jax.jit(fn) for name, (fn, _) in fns.items()}
    for name, (_, params) in fns.items():
        for b in batch_sizes:
            jax.block_until_ready(jitted[name](params, ids[b]))  # compile + warm up
    times = {(name, b): [] for name in fns for b in batch_sizes}
    for _ in range(reps):
        for name, (_, params) in fns.items():
            for b in batch_sizes:
                t0 = time.perf_counter()
                jax.block_until_ready(jitted[name](params, ids[b]))
                times[(name, b)].append(time.perf_counter() - t0)
    return {name: {b: float(np.median(times[(name, b)])) for b in batch_sizes} for name in fns}


def _llama_latency_fn(model):
    graphdef, state = nnx.split(model)

    def fn(s, ids):
        return nnx.merge(graphdef, s)(ids)

    return fn, state


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--model', choices=tuple(CONFIGS), default='smollm2')
    p.add_argument('--steps', type=int, default=100, help='LoRA steps per method')
    p.add_argument('--density', type=float, default=0.6, help='fraction of prunable params KEPT')
    p.add_argument('--eval-batches', type=int, default=16)
    p.add_argument('--calib-batches', type=int, default=4)
    p.add_argument('--criterion', choices=('taylor', 'magnitude'), default='taylor')
    p.add_argument('--reps', type=int, default=7)
    p.add_argument('--run-dir', default=None,
                   help='ATP run directory (default: a fresh temp dir; must not hold checkpoints)')
    p.add_argument('--out', default=None)
    p.add_argument('--set', nargs='*', default=[], metavar='KEY=VALUE',
                   help='extra config overrides, e.g. prune.bias=3.0 prune.generator_lr=0.03')
    args = p.parse_args(argv)
    args.run_dir = args.run_dir or tempfile.mkdtemp(prefix='jaxprune_bench_atp_')
    cfg = _run_cfg(args)
    dcfg = cfg.data
    print(f'config {CONFIGS[args.model]} steps={args.steps} density={args.density}',
          file=sys.stderr, flush=True)

    splits = train.load_splits(dcfg)
    lora_split, gen_split = _atp_train.split_holdout(splits['train'], cfg.prune.holdout_fraction)
    _, arch, tokenizer = train.build_model(cfg.model, cfg.lora)
    eval_b = train.eval_batches(splits['validation'], tokenizer, dcfg, task='causal_lm')
    eval_b = eval_b[:args.eval_batches]
    dims = _density.layer_dims(arch)
    prunable = _density.prunable_params(dims)

    def stream(split, seed):
        return data.lm_batches(split, tokenizer, batch_size=dcfg.batch_size,
                               seq_len=dcfg.seq_len, seed=seed)

    step_tokens = dcfg.batch_size * dcfg.seq_len
    rows = {}

    out = pathlib.Path(args.out or ROOT / 'bench' / 'results' / f'atp_{args.model}.json')
    partial = out.with_suffix('.partial.json')
    lat_fns = {}

    def checkpoint_rows():  # a slow shared machine may not finish: keep what is measured
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps({'steps': args.steps, 'rows': rows}, indent=1, default=str))

    # ATP first (the method under test), then the baselines.
    run = _atp_train.run_atp(cfg, progress=False, max_eval_batches=args.eval_batches)
    rec = run.record
    rows['ATP'] = {'eval': rec['eval_export'], 'kept': rec['params']['kept'],
                   'train_s': rec['control_s'] + rec['freeze_s'], 'tokens': rec['tokens']['lora'],
                   'generator_tokens': rec['tokens']['generator'],
                   'prior_tokens': rec['tokens'].get('prior', 0), 'atp': rec}
    print(f"ATP ppl {rows['ATP']['eval']['perplexity']:.3f}", file=sys.stderr, flush=True)
    checkpoint_rows()

    def compact_fn(c, ids):
        return _dims.compact_forward(c, ids, config=run.compact_config)

    lat_fns['ATP'] = (compact_fn, run.compact)

    # Two-stage: one-shot structured prune, then LoRA.
    model, _, _ = train.build_model(cfg.model, cfg.lora)
    t0 = time.perf_counter()
    calib = data.lm_batches(gen_split, tokenizer, batch_size=dcfg.batch_size,
                            seq_len=dcfg.seq_len, seed=dcfg.seed + 1)
    calib = [next(calib) for _ in range(args.calib_batches)]
    keep = _taylor_keep(model, calib, args.density, args.criterion)
    model, new_cfg = surgery.prune_model(model, keep)
    score_s = time.perf_counter() - t0
    model, secs = _lora_finetune(model, cfg, stream(lora_split, dcfg.seed), args.steps)
    kept = _density.prunable_params(_density.layer_dims(new_cfg))
    rows['two-stage'] = {
        'eval': _atp_train.evaluate_lm(_model_apply(model), eval_b), 'kept': kept,
        'train_s': secs + score_s, 'score_s': score_s, 'tokens': args.steps * step_tokens,
        'calibration_tokens': args.calib_batches * step_tokens, 'criterion': args.criterion}
    lat_fns['two-stage'] = _llama_latency_fn(_merged_plain(model))
    print(f"two-stage ppl {rows['two-stage']['eval']['perplexity']:.3f}", file=sys.stderr,
          flush=True)
    checkpoint_rows()
    del model

    # Dense LoRA (the reference), and the pretrained model for context.
    base, _, _ = train.build_model(cfg.model, cfg.lora)
    lat_fns['dense LoRA'] = _llama_latency_fn(_merged_plain(base))
    model, secs = _lora_finetune(base, cfg, stream(lora_split, dcfg.seed), args.steps)
    rows['dense LoRA'] = {'eval': _atp_train.evaluate_lm(_model_apply(model), eval_b),
                          'kept': prunable, 'train_s': secs, 'tokens': args.steps * step_tokens}
    print(f"dense LoRA ppl {rows['dense LoRA']['eval']['perplexity']:.3f}", file=sys.stderr,
          flush=True)
    checkpoint_rows()
    del model, base
    base, _, _ = train.build_model(cfg.model, cfg.lora)
    rows['pretrained'] = {'eval': _atp_train.evaluate_lm(_model_apply(base), eval_b),
                          'kept': prunable, 'train_s': 0.0, 'tokens': 0}
    checkpoint_rows()
    del base
    lat = _latencies(lat_fns, (1, 8), dcfg.seq_len, args.reps, arch.vocab_size)
    lat['pretrained'] = lat['dense LoRA']

    dense_ppl = rows['dense LoRA']['eval']['perplexity']
    table = []
    for name, r in rows.items():
        ppl = r['eval']['perplexity']
        table.append({
            'method': name, 'perplexity': ppl, 'relative_performance': dense_ppl / ppl,
            'params_kept': r['kept'] / prunable,
            'latency_ratio_b1': lat[name][1] / lat['dense LoRA'][1],
            'latency_ratio_b8': lat[name][8] / lat['dense LoRA'][8],
            'latency_s_b1': lat[name][1], 'latency_s_b8': lat[name][8],
            'finetune_s': r['train_s'],
        })
    header = (f"{'method':<12}{'ppl':>10}{'rel.perf':>10}{'kept':>8}{'lat b1':>9}{'lat b8':>9}"
              f"{'tune s':>9}")
    print(header)
    for t in table:
        print(f"{t['method']:<12}{t['perplexity']:>10.3f}{t['relative_performance']:>10.3f}"
              f"{t['params_kept']:>8.3f}{t['latency_ratio_b1']:>9.3f}{t['latency_ratio_b8']:>9.3f}"
              f"{t['finetune_s']:>9.1f}")
    result = {
        'benchmark': 'atp', 'model': cfg.model.name_or_path, 'dataset': dcfg.dataset,
        'command': 'python bench/atp.py ' + ' '.join(argv if argv is not None else sys.argv[1:]),
        'date_utc': datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds'),
        'machine': {'platform': platform.platform(), 'processor': platform.processor(),
                    'cpu_count': os.cpu_count(), 'jax_device': str(jax.devices()[0]),
                    'jax': jax.__version__, 'note': 'CPU shared with other jobs; timings noisy'},
        'budget': {'lora_steps': args.steps, 'batch_size': dcfg.batch_size,
                   'seq_len': dcfg.seq_len, 'lora_tokens_per_method': args.steps * step_tokens,
                   'atp_generator_tokens': rows['ATP']['generator_tokens'],
                   'atp_prior_tokens': rows['ATP']['prior_tokens'],
                   'two_stage_calibration_tokens': rows['two-stage']['calibration_tokens'],
                   'eval_tokens': rows['ATP']['eval']['count'],
                   'target_density_kept': args.density, 'prunable_params': prunable},
        'table': table, 'details': rows, 'config': cfg.to_dict(),
    }
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f'wrote {out}', file=sys.stderr)
    return result


if __name__ == '__main__':
    main()
