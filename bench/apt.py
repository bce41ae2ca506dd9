"""APT benchmark: accuracy, size, fine-tuning cost and inference latency against dense fine-tuning.

Rows (same steps, data, batch size and seed for all; each training row runs in its own
subprocess so ``ru_maxrss`` is that row's peak host memory):

* ``dense``: full fine-tune of all-MiniLM-L6-v2 on Rotten Tomatoes.
* ``lora``: LoRA (q/k/v/out/up/down, rank 8) + classification head.
* ``lora+oneshot-salience`` / ``-fisher`` / ``-magnitude``: the two-stage baseline -- the
  trained LoRA model, one-shot structured pruning to the same 40 % block density (APT salience
  summed over 8 calibration batches, the per-example mask Fisher over 32, or unit L2 magnitude per
  parameter), surgery, no retraining. Computed in the LoRA subprocess (its wall time / memory
  include the LoRA training).
* ``apt``: ``prune.method=apt`` to 40 % block density (compaction during training, LoRA rank
  growth, self-distillation), then the exported pruned model; ``apt-paper``: the same with
  ``prune.salience=apt`` (the paper's salience, whatever the config ships); ``apt-compactK``:
  the shipped config with ``prune.compact_every=K`` (compact at every K-th pruning step and the
  last, masks in between: fewer re-compilations), to time it side by side with ``apt``.

Every final model is evaluated as a plain model (LoRA folded into the kernels, pruned units
removed) on the full validation split; latency is the median of jitted forwards at batch 32 and
batch 1 (``seq = max_len``). Ratios are to the dense row of the same run. This is a benchmark, not
a timed test: the CPU is shared, so the JSON records the load average next to each timing.

  python bench/apt.py [--steps 200] [--llama] [--out bench/results/apt_minilm_cpu.json]
"""

from __future__ import annotations

import sys

# bench/ holds scripts named like stdlib modules (ast.py): drop the script dir from the path.
sys.path[:] = [p for p in sys.path if p.rstrip('/').split('/')[-1] != 'bench']

import argparse
import json
import os
import pathlib
import platform
import resource
import subprocess
import tempfile
import time

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('HF_DATASETS_OFFLINE', '1')

ROOT = pathlib.Path(__file__).resolve().parent.parent
DENSITY = 0.4


def _is_apt(row: str) -> bool:
    """A MiniLM APT row: ``apt``, ``apt-paper`` or ``apt-compactK`` (K an integer)."""
    return row in ('apt', 'apt-paper') or (
        row.startswith('apt-compact') and row.removeprefix('apt-compact').isdigit())


def _overrides(args, row: str, run_dir: str) -> tuple[str, list[str]]:
    common = [
        f'run_dir={run_dir}', f'train.steps={args.steps}', f'data.max_len={args.max_len}',
        f'data.batch_size={args.batch_size}', 'data.eval_batch_size=64', 'train.eval_every=0',
        'checkpoint.every=0', 'train.log_every=20', f'train.seed={args.seed}',
        f'data.seed={args.seed}',
        f'train.warmup_steps={max(1, args.steps // 10)}',
        f'data.eval_max_examples={args.eval_examples}', *args.set_all,
    ]
    if row == 'dense':
        return 'configs/minilm_rotten_tomatoes_lora.yaml', common + [
            'lora.enabled=false', 'train.learning_rate=1e-4']
    if row == 'lora':
        return 'configs/minilm_rotten_tomatoes_lora.yaml', common
    if _is_apt(row):  # apt-paper: the same config with the paper's salience
        every = row.removeprefix('apt-compact') if row.startswith('apt-compact') else None
        return 'configs/apt_minilm_rotten_tomatoes.yaml', common + [
            f'prune.target_density={DENSITY}', f'prune.num_pruning_steps={args.pruning_steps}',
            'prune.check_compaction=true', *args.set,
            *(['prune.salience=apt'] if row == 'apt-paper' else []),
            *([f'prune.compact_every={every}'] if every else [])]
    llama = [f'run_dir={run_dir}', f'train.steps={args.llama_steps}', 'train.eval_every=0',
             'checkpoint.every=0', f'train.warmup_steps={max(1, args.llama_steps // 10)}',
             f'train.seed={args.seed}', f'data.seed={args.seed}']
    if row == 'llama-lora':
        return 'configs/smollm2_shakespeare_lora.yaml', llama
    if row == 'llama-apt':
        # The MiniLM schedule lessons (prune in the second half, keep half of the task loss);
        # the LM head is pretrained here, so pruning may start earlier than for a new classifier.
        return 'configs/smollm2_shakespeare_lora.yaml', llama + [
            'prune.method=apt', 'prune.target_density=0.7',
            f'prune.num_pruning_steps={args.pruning_steps}', 'prune.prune_start_fraction=0.3',
            'prune.prune_end_fraction=0.8', 'prune.distill_weight=0.5',
            'prune.check_compaction=false', *args.llama_set]
    raise ValueError(f'{row=} is unknown')


# ---- inside a row subprocess ------------------------------------------------------------------


def _plain(model, rank_masks=None):
    from jaxprune.methods import _apt_export

    flat = _apt_export.merged_params(model, rank_masks)
    import jax.numpy as jnp

    return _apt_export._plain_model(model.config, flat, jnp.float32)


def _evaluate(model, cfg, tokenizer, splits, split: str = 'validation') -> dict:
    import jax
    import numpy as np
    from flax import nnx

    from jaxprune.train import _data, _step

    graphdef, state = nnx.split(model)
    task = cfg.model.task

    @jax.jit
    def fn(state, b):
        m = nnx.merge(graphdef, state)
        out = _step.forward(m, b, None)
        return _step.loss_sums(out, b['labels'], task=task)

    totals = {'loss_sum': 0.0, 'correct': 0.0, 'count': 0.0}
    for b in _data.eval_batches(splits[split], tokenizer, cfg.data, task=task):
        sums = fn(state, {k: np.asarray(v) for k, v in b.items()})
        for k in totals:
            totals[k] += float(sums[k])
    return _step.summarize(totals, task=task)


def _latency(model, cfg, *, batch: int, repeats: int) -> float:
    import jax
    import numpy as np
    from flax import nnx

    graphdef, state = nnx.split(model)
    t = cfg.data.max_len if cfg.model.task == 'classification' else cfg.data.seq_len
    ids = np.random.default_rng(0).integers(1, 1000, size=(batch, t)).astype(np.int32)
    am = np.ones_like(ids)

    @jax.jit
    def fwd(state, ids, am):
        m = nnx.merge(graphdef, state)
        return m(ids, am) if cfg.model.task == 'classification' else m(ids)

    for _ in range(2):
        jax.block_until_ready(fwd(state, ids, am))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fwd(state, ids, am))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _measure(name, model, cfg, tokenizer, splits, *, train_s, extra=None) -> dict:
    from jaxprune import models

    ev = _evaluate(model, cfg, tokenizer, splits)
    import jax

    params = int(sum(x.size for x in jax.tree.leaves(nnx_params(model))))
    return {
        'row': name,
        'eval': ev,
        'params': params,
        'block_params': int(models.prunable_param_count(model.config)),
        'train_seconds': train_s,
        # LM rows: batch 8 x seq_len 128 (batch 32 would take seconds per forward on this CPU)
        **({'latency_b32_s': _latency(model, cfg, batch=32, repeats=10)}
           if cfg.model.task == 'classification'
           else {'latency_b8_s': _latency(model, cfg, batch=8, repeats=10)}),
        'latency_b1_s': _latency(model, cfg, batch=1, repeats=30),
        'loadavg': os.getloadavg(),
        'config': {
            'layer_heads': [model.config.heads(i) for i in range(model.config.num_layers)],
            'layer_mlp': [model.config.mlp(i) for i in range(model.config.num_layers)],
            'hidden_size': model.config.hidden_size,
        },
        **(extra or {}),
    }


def nnx_params(model):
    from flax import nnx

    return nnx.state(model, nnx.Param)


def _trained_model(cfg):
    """The model at the final checkpoint of a finished run (as the loop's ``evaluate`` does)."""
    from flax import nnx

    from jaxprune.train import _loop

    s = _loop.setup(cfg)
    ck = _loop._checkpointer(cfg)
    try:
        found = ck.restore_latest_valid(target=_loop._abstract(s.state), quarantine=False)
    finally:
        ck.close()
    if found is None:
        raise FileNotFoundError(f'no checkpoint in {cfg.checkpoint_dir}')
    _, state, _ = found
    return nnx.merge(s.graphdef, state.trainable, s.rest), s


def _oneshot(model, cfg, s, *, scores: str, calib_batches: int | None = None):
    """Two-stage baseline: one-shot structured pruning of a trained model to ``DENSITY``."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jaxprune import methods, surgery
    from jaxprune.masks import _budget
    from jaxprune.methods import _apt, _apt_arch
    from jaxprune.models import _structures
    from jaxprune.scores import _apt as apt_scores
    from jaxprune.train import _data, _step

    plain = _plain(model)
    arch = plain.config
    structs = _structures.structures(arch)
    params = nnx.to_pure_dict(nnx.state(plain, nnx.Param))
    shapes = _budget.param_shapes(params)
    bstructs = methods.budget_structures(structs, shapes, count_embeddings=False)
    t0 = time.perf_counter()
    if calib_batches is None:  # Fisher is a per-example score: give it more examples
        calib_batches = {'salience': 8, 'fisher': 32}.get(scores, 0)
    if scores in ('salience', 'fisher'):
        graphdef, state = nnx.split(plain)
        task = cfg.model.task
        salience = 'fisher' if scores == 'fisher' else 'apt'

        @jax.jit
        def sal(state, b):
            shape = b['input_ids'].shape
            taps = _apt.salience_taps(arch, *shape, salience=salience)

            def loss_fn(st, taps):
                masks, layer_taps = _apt.tapped_masks(None, taps)
                out, acts = nnx.merge(graphdef, st)(
                    b['input_ids'], b['attention_mask'], masks=masks, taps=layer_taps)
                sums = _step.loss_sums(out, b['labels'], task=task)
                return sums['loss_sum'] / jnp.maximum(sums['count'], 1.0), (acts, None)

            return _apt.value_grads_and_salience(
                loss_fn, state, taps, bstructs, salience=salience)[2]

        stream = _data.train_batches(s.splits['train'], s.tokenizer, cfg.data, task=task)
        total = None
        for _ in range(calib_batches):
            b = {k: jnp.asarray(v) for k, v in next(stream).items()}
            sc = sal(state, b)
            total = sc if total is None else jax.tree.map(jnp.add, total, sc)
        dens = apt_scores.salience_density(total, bstructs)
    else:
        dens = {}
        for st in bstructs:
            acc = np.zeros(st.size)
            for sl in st.slices:
                w = np.asarray(apt_scores.get_path(params, sl.path), np.float64) ** 2
                w = np.moveaxis(w, sl.axis, 0).reshape(st.size, sl.width, -1)
                acc += w.sum(axis=(1, 2))
            dens[(st.kind, st.layer)] = jnp.asarray(np.sqrt(acc) / max(st.params_per_unit, 1))
    keep = _budget.budget_keep(dens, bstructs, shapes, DENSITY)
    keep = {k: np.asarray(v) for k, v in keep.items()}
    density = (float(_budget.kept_param_count(keep, bstructs, shapes))
               / _budget.total_prunable_params(bstructs, shapes))
    new_arch, new_params = surgery.prune(arch, params, keep, structures=structs)
    pruned = _apt_arch.rebuild_model(plain, new_arch, new_params)  # no initializer run
    return pruned, {'density': density, 'scoring_seconds': time.perf_counter() - t0,
                    'calib_batches': calib_batches}


def run_row(args) -> None:
    import jaxprune.methods._apt_train  # noqa: F401  (registers prune.method=apt)
    from jaxprune import config, train
    from jaxprune.methods import _apt_export
    from jaxprune.train import _data, _factory

    path, over = _overrides(args, args.row, args.run_dir)
    cfg = config.load_config(ROOT / path, over)
    t0 = time.perf_counter()
    train.train(cfg, progress=False)
    train_s = time.perf_counter() - t0
    rows = []
    if _is_apt(args.row) or args.row == 'llama-apt':
        model, _ = _apt_export.load_pruned(pathlib.Path(cfg.run_dir) / 'pruned')
        from jaxprune import assets

        tok = _factory.load_tokenizer(assets.resolve_model(cfg.model.name_or_path))
        splits = _data.load_splits(cfg.data)
        events = [json.loads(line) for line in
                  (pathlib.Path(cfg.run_dir) / 'metrics.jsonl').read_text().splitlines()]
        prune_events = [e for e in events if e.get('event') == 'prune']
        rows.append(_measure(args.row, model, cfg, tok, splits, train_s=train_s,
                             extra={'prune_events': prune_events}))
    else:
        model, s = _trained_model(cfg)
        rows.append(_measure(args.row, _plain(model), cfg, s.tokenizer, s.splits, train_s=train_s))
        if args.row == 'lora':
            for scores in ('salience', 'fisher', 'magnitude'):
                pruned, info = _oneshot(model, cfg, s, scores=scores)
                # kept on disk so ``--remeasure`` can time every final model side by side
                _apt_export.save_pruned(pruned, pruned.config,
                                        pathlib.Path(cfg.run_dir) / f'oneshot-{scores}', hf=False)
                rows.append(_measure(f'lora+oneshot-{scores}', pruned, cfg, s.tokenizer, s.splits,
                                     train_s=train_s + info['scoring_seconds'], extra=info))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    for r in rows:
        r['peak_rss_bytes'] = rss
    pathlib.Path(args.row_out).write_text(json.dumps(rows))


def remeasure(args) -> int:
    """Re-time the final models of a finished run side by side and rewrite ``--out``.

    Row subprocesses time their own model, minutes apart, on a shared CPU; here every final model
    (dense and LoRA from their checkpoints, the two-stage and APT models from their pruned
    folders) is loaded into one process and timed in interleaved rounds, so the ratios compare
    like with like. The in-row timings stay in the JSON as ``latency_*_inrow_s``.

    It also evaluates every final model on the **test** split, which no row and no choice of
    settings looked at (the rows report validation accuracy, on which settings were chosen).
    """
    import jax
    import numpy as np
    from flax import nnx

    import jaxprune.methods._apt_train  # noqa: F401  (registers prune.method=apt)
    from jaxprune import config
    from jaxprune.methods import _apt_export

    tmp = pathlib.Path(args.remeasure)
    result = json.loads(pathlib.Path(args.out).read_text())
    models, cfg, setup = {}, None, None
    for name in ('dense', 'lora'):
        if (tmp / name / 'config.yaml').exists():
            cfg = config.load_config(tmp / name / 'config.yaml')
            model, setup = _trained_model(cfg)
            models[name] = _plain(model)
    for name, folder in (('lora+oneshot-salience', 'lora/oneshot-salience'),
                         ('lora+oneshot-fisher', 'lora/oneshot-fisher'),
                         ('lora+oneshot-magnitude', 'lora/oneshot-magnitude'),
                         ('apt-paper', 'apt-paper/pruned'), ('apt', 'apt/pruned')):
        if (tmp / folder).exists():
            models[name] = _apt_export.load_pruned(tmp / folder)[0]
    for folder in sorted(tmp.glob('apt-compact*/pruned')):
        models[folder.parent.name] = _apt_export.load_pruned(folder)[0]
    if cfg is None or 'dense' not in models:
        raise FileNotFoundError(f'no dense run under {tmp}; pass the bench temp dir')
    rng = np.random.default_rng(0)
    inputs = {}
    for b in (32, 1):
        ids = rng.integers(1, 1000, size=(b, cfg.data.max_len)).astype(np.int32)
        inputs[b] = (ids, np.ones_like(ids))
    fns = {}
    for name, m in models.items():
        graphdef, state = nnx.split(m)
        fns[name] = (jax.jit(lambda st, ids, am, g=graphdef: nnx.merge(g, st)(ids, am)), state)
    for f, st in fns.values():
        for x in inputs.values():
            for _ in range(2):
                jax.block_until_ready(f(st, *x))
    times = {(n, b): [] for n in fns for b in inputs}
    for _ in range(args.reps):
        for n, (f, st) in fns.items():
            for b, x in inputs.items():
                t0 = time.perf_counter()
                jax.block_until_ready(f(st, *x))
                times[(n, b)].append(time.perf_counter() - t0)
    lat = {k: float(np.median(v)) for k, v in times.items()}
    dense = lat[('dense', 32)], lat[('dense', 1)]
    test = {name: _evaluate(m, cfg, setup.tokenizer, setup.splits, split='test')
            for name, m in models.items()}
    for r in result['rows']:
        if r['row'] in test:
            r['test_eval'] = test[r['row']]
            r['ratios']['test_accuracy'] = (test[r['row']]['accuracy']
                                            / test['dense']['accuracy'])
    for r in result['rows']:
        if r['row'] not in fns:
            continue
        for b in (32, 1):
            r.setdefault(f'latency_b{b}_inrow_s', r[f'latency_b{b}_s'])
            r[f'latency_b{b}_s'] = lat[(r['row'], b)]
        r['ratios']['latency_b32'] = r['latency_b32_s'] / dense[0]
        r['ratios']['latency_b1'] = r['latency_b1_s'] / dense[1]
    result['latency_method'] = (f'one process after training, models interleaved round by round, '
                                f'median of {args.reps} (python bench/apt.py --remeasure DIR)')
    result['latency_loadavg'] = os.getloadavg()
    result['table'] = _table([r for r in result['rows'] if not r['row'].startswith('llama')])
    print(result['table'])
    pathlib.Path(args.out).write_text(json.dumps(result, indent=2))
    print(f'wrote {args.out}')
    return 0


# ---- driver -------------------------------------------------------------------------------------


def _table(rows: list[dict]) -> str:
    head = (f"{'row':26s} {'val acc':>8s} {'acc/dense':>9s} {'params':>7s} {'block':>7s} "
            f"{'train t':>8s} {'peak mem':>8s} {'lat b32':>8s} {'lat b1':>8s} "
            f"{'speedup b32':>11s} {'speedup b1':>10s}")
    test = all('test_eval' in r for r in rows)
    head += f" {'test acc':>8s} {'test/dense':>10s}" if test else ''
    lines = [head, '-' * len(head)]
    for r in rows:
        x = r['ratios']
        lines.append(
            f"{r['row']:26s} {r['eval']['accuracy']:8.4f} {x['accuracy']:9.3f} "
            f"{x['params']:7.3f} {x['block_params']:7.3f} {x['train_seconds']:8.3f} "
            f"{x['peak_rss']:8.3f} {x['latency_b32']:8.3f} {x['latency_b1']:8.3f} "
            f"{1 / x['latency_b32']:11.2f} {1 / x['latency_b1']:10.2f}"
            + (f" {r['test_eval']['accuracy']:8.4f} {x['test_accuracy']:10.3f}" if test else ''))
    return '\n'.join(lines)


def _llama_table(rows: list[dict]) -> str | None:
    """SmolLM2 rows against the LoRA row: held-out perplexity, parameters, latency."""
    base = next((r for r in rows if r['row'] == 'llama-lora'), None)
    if base is None:
        return None
    head = (f"{'row':12s} {'val ppl':>8s} {'params':>11s} {'/ lora':>7s} {'block':>7s} "
            f"{'lat b8 s':>9s} {'/ lora':>7s} {'lat b1 s':>9s} {'/ lora':>7s} {'train s':>8s}")
    lines = [head, '-' * len(head)]
    for r in rows:
        if not r['row'].startswith('llama'):
            continue
        r['llama_ratios'] = {
            'params': r['params'] / base['params'],
            'block_params': r['block_params'] / base['block_params'],
            'latency_b8': r['latency_b8_s'] / base['latency_b8_s'],
            'latency_b1': r['latency_b1_s'] / base['latency_b1_s'],
        }
        x = r['llama_ratios']
        lines.append(
            f"{r['row']:12s} {r['eval']['perplexity']:8.2f} {r['params']:11,d} {x['params']:7.3f} "
            f"{x['block_params']:7.3f} {r['latency_b8_s']:9.4f} {x['latency_b8']:7.3f} "
            f"{r['latency_b1_s']:9.4f} {x['latency_b1']:7.3f} {r['train_seconds']:8.0f}")
    return '\n'.join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--steps', type=int, default=200)
    p.add_argument('--pruning-steps', type=int, default=10)
    p.add_argument('--seed', type=int, default=0, help='train.seed and data.seed of every row')
    p.add_argument('--max-len', type=int, default=64)
    p.add_argument('--batch-size', type=int, default=16)
    p.add_argument('--rows', default='dense,apt,lora')
    p.add_argument('--eval-examples', type=int, default=1281, help='validation examples')
    p.add_argument('--llama', action='store_true', help='add smollm2-135m rows (LoRA vs APT 0.7)')
    p.add_argument('--llama-steps', type=int, default=120)
    p.add_argument('--llama-set', nargs='*', default=[], metavar='KEY=VALUE',
                   help='extra config overrides for the llama-apt row')
    p.add_argument('--out', default=str(ROOT / 'bench/results/apt_minilm_cpu.json'))
    p.add_argument('--remeasure', metavar='DIR',
                   help='re-time the final models of a finished run (its temp dir) side by side')
    p.add_argument('--reps', type=int, default=15, help='timing rounds for --remeasure')
    p.add_argument('--set', nargs='*', default=[], metavar='KEY=VALUE',
                   help='extra config overrides for the apt row, '
                        'e.g. prune.prune_start_fraction=0.2')
    p.add_argument('--set-all', nargs='*', default=[], metavar='KEY=VALUE',
                   help='extra config overrides for every MiniLM row, e.g. train.param_ema=0.98')
    p.add_argument('--reuse', metavar='DIR',
                   help='take the rows not in --rows from a finished run (its temp dir)')
    p.add_argument('--row', help=argparse.SUPPRESS)
    p.add_argument('--run-dir', help=argparse.SUPPRESS)
    p.add_argument('--row-out', help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.row:
        run_row(args)
        return 0
    if args.remeasure:
        return remeasure(args)
    names = args.rows.split(',') + (['llama-lora', 'llama-apt'] if args.llama else [])
    tmp = pathlib.Path(tempfile.mkdtemp(prefix='jaxprune_bench_apt_'))
    print(f'[bench] temp dir (for --remeasure): {tmp}', flush=True)
    rows = []
    for name in names:
        out = tmp / f'{name}.json'
        cmd = [sys.executable, __file__, '--row', name, '--run-dir', str(tmp / name),
               '--row-out', str(out), '--steps', str(args.steps), '--max-len', str(args.max_len),
               '--batch-size', str(args.batch_size), '--pruning-steps', str(args.pruning_steps),
               '--llama-steps', str(args.llama_steps), '--eval-examples', str(args.eval_examples),
               '--seed', str(args.seed), '--set', *args.set, '--set-all', *args.set_all,
               '--llama-set', *args.llama_set]
        print(f'[bench] {name}: {" ".join(cmd)}', flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, cwd=ROOT, check=False).returncode
        print(f'[bench] {name} done in {time.perf_counter() - t0:.0f}s (rc={rc})', flush=True)
        if rc == 0:
            rows.extend(json.loads(out.read_text()))
            pathlib.Path(args.out + '.partial').write_text(json.dumps(rows, indent=2))
    if args.reuse:  # finished rows of an earlier run with the same budget (e.g. dense, lora)
        import shutil

        old = pathlib.Path(args.reuse)
        for f in sorted(old.glob('*.json')):
            if f.stem not in names:
                rows.extend(json.loads(f.read_text()))
                shutil.copytree(old / f.stem, tmp / f.stem)  # so --remeasure finds the models
                shutil.copy(f, tmp / f.name)
    order = {n: i for i, n in enumerate(['dense', 'lora', 'lora+oneshot-salience',
                                         'lora+oneshot-fisher', 'lora+oneshot-magnitude',
                                         'apt-paper', 'apt'])}
    rows.sort(key=lambda r: order.get(r['row'], 99))
    dense = next((r for r in rows if r['row'] == 'dense'), None)
    if dense is None and any(not r['row'].startswith('llama') for r in rows):
        # e.g. --rows apt on another seed: keep the measurements, the ratios need a dense row
        pathlib.Path(args.out).write_text(json.dumps({'rows': rows}, indent=2))
        for r in rows:
            print(f"{r['row']:26s} val acc {r['eval']['accuracy']:.4f}")
        print(f'no dense row (ratios skipped; --reuse a run that has one); wrote {args.out}')
        return 0
    for r in rows:
        if r['row'].startswith('llama'):  # compared with llama-lora in _llama_table
            continue
        r['ratios'] = {
            'accuracy': r['eval']['accuracy'] / dense['eval']['accuracy'],
            'params': r['params'] / dense['params'],
            'block_params': r['block_params'] / dense['block_params'],
            'train_seconds': r['train_seconds'] / dense['train_seconds'],
            'peak_rss': r['peak_rss_bytes'] / dense['peak_rss_bytes'],
            'latency_b32': r['latency_b32_s'] / dense['latency_b32_s'],
            'latency_b1': r['latency_b1_s'] / dense['latency_b1_s'],
        }
    table = _table([r for r in rows if not r['row'].startswith('llama')])
    print(table)
    llama_table = _llama_table(rows)
    if llama_table:
        print(llama_table)
    import jax

    result = {
        'benchmark': 'apt',
        'model': 'minilm-l6', 'dataset': 'rotten-tomatoes',
        'steps': args.steps, 'batch_size': args.batch_size, 'max_len': args.max_len,
        'pruning_steps': args.pruning_steps, 'target_density': DENSITY, 'seed': args.seed,
        'eval_examples': args.eval_examples,
        'density_counts': 'encoder-block parameters (embeddings excluded)',
        'device': f'{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores '
                  f'(shared with other jobs), jax {jax.__version__}',
        'command': 'python bench/apt.py ' + ' '.join(argv if argv is not None else sys.argv[1:]),
        'notes': ('ratios are to the dense row of this run; train wall time includes compilation '
                  'and the final eval; two-stage rows reuse the LoRA subprocess (time = LoRA + '
                  'scoring, memory = that process)'),
        'rows': rows,
        'table': table,
    }
    if llama_table:
        result['llama_table'] = llama_table
        result['llama_steps'] = args.llama_steps
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps(result, indent=2))
    print(f'wrote {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
