"""AST 2:4 vs one-shot 2:4 baselines vs dense fine-tuning: held-out perplexity, flip rate, bytes,
CPU decode latency. Prints a table and writes JSON (not a timed test).

    python bench/ast.py --model smollm2-135m --steps 24      # SmolLM2-135M on Shakespeare
    python bench/ast.py --model tiny --steps 12              # tiny random Llama, smoke check

Rows (trained rows share the token budget and the batch order):
  dense fine-tune | magnitude 2:4 | Wanda 2:4 | SparseGPT 2:4 (sequential) | AST 2:4
  | AST 2:4 boosted
Sparse rows are evaluated through the compressed ``Sparse24`` model (``sparse24_matmul``, XLA path);
their masked-dense perplexity is recorded as a check. Decode latency: greedy generation without a
KV cache (each token re-runs the whole buffer), batch 1, XLA reference path on CPU.
"""

from __future__ import annotations

import os
import sys

# This file is named like the stdlib ``ast`` module: drop its folder from sys.path before any
# import that pulls in ``inspect`` (which imports ``ast``).
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or '.') != _HERE]

import argparse
import copy
import json
import pathlib
import platform
import time

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('HF_DATASETS_OFFLINE', '1')

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprune import config, data, train
from jaxprune.masks import _nm
from jaxprune.methods import _ast_infer, _ast_train, _calibrate, _oneshot
from jaxprune.scores import _wanda


def log(*a):
    print(time.strftime('%H:%M:%S'), *a, file=sys.stderr, flush=True)


def build(args):
    name = 'tiny-llama' if args.model == 'tiny' else args.model
    mcfg = config.ModelCfg(name_or_path=name, task='causal_lm')
    model, arch, tok = train.build_model(mcfg, config.LoraCfg())
    return model, arch, tok


def take(it, k):
    return [next(it) for _ in range(k)]


def train_run(model, method, batches, args):
    graphdef, trainable, rest = nnx.split(model, nnx.Param, ...)
    tcfg = config.TrainCfg(steps=len(batches), learning_rate=args.lr, warmup_steps=args.warmup,
                           final_lr_ratio=0.1)
    tx = tcfg.build_optimizer(*method.transforms(trainable))
    state = train.init_state(trainable, tx, seed=0)
    step = train.make_train_step(graphdef, tx, task='causal_lm', method=method)
    t0 = time.perf_counter()
    losses = []
    for i, b in enumerate(batches):
        state, m = step(state, rest, {k: jnp.asarray(v) for k, v in b.items()})
        method.on_step_end(i + 1, train.LoopState(graphdef, state, rest))
        losses.append(float(m['loss']))
        if i == 0:
            t1 = time.perf_counter()
        log(f'  step {i + 1}/{len(batches)} loss={losses[-1]:.4f}')
    secs = time.perf_counter() - t1 if len(batches) > 1 else float('nan')
    return graphdef, state, rest, {'train_losses': losses,
                                   's_per_step': secs / max(len(batches) - 1, 1),
                                   'compile_and_first_step_s': t1 - t0}


def measure(model, eval_batches, prompt, args):
    ev = _ast_infer.eval_perplexity(model, eval_batches)
    _, dt = _ast_infer.generate(model, prompt, max_new_tokens=args.decode_tokens, timing=True)
    return ev, dt


def sparse_row(name, model, masks, eval_batches, prompt, args, extra=None):
    """Masked-dense check + compressed eval/latency/bytes for a model whose kernels are dense."""
    masked_ppl = None
    if args.check_masked:
        masked = copy.deepcopy(model)
        params = nnx.state(masked, nnx.Param)
        nnx.update(masked, _nm.apply_masks(params, _calibrate.masks_tree(params, masks)))
        masked_ppl = _ast_infer.eval_perplexity(masked, eval_batches)['perplexity']
        del masked
    comp = copy.deepcopy(model)
    _ast_infer.compress_model(comp, masks, implementation='xla')
    for k, mk in masks.items():
        if not bool(_nm.is_nm(mk, n=2, m=4)):
            raise RuntimeError(f'{name}: {k} not exactly 2:4')
    ev, dt = measure(comp, eval_batches, prompt, args)
    row = {'method': name, 'perplexity': ev['perplexity'], 'masked_dense_perplexity': masked_ppl,
           'weight_bytes': _ast_infer.weight_bytes(comp)['total'],
           'decode_s_per_token': dt, **(extra or {})}
    log(f'{name}: ppl={ev["perplexity"]:.3f} (masked dense {masked_ppl})')
    return row


ROWS = ('dense', 'ft', 'magnitude', 'wanda', 'sparsegpt', 'ast', 'ast_boosted')


def finish(rows):
    dense_ft = [r['perplexity'] for r in rows if r['method'] == 'dense fine-tune']
    dense_bytes = [r['weight_bytes'] for r in rows if r['method'].startswith('dense')]
    for r in rows:
        r['ppl_ratio_to_dense_ft'] = r['perplexity'] / dense_ft[0] if dense_ft else None
        r['bytes_ratio_to_dense'] = r['weight_bytes'] / dense_bytes[0] if dense_bytes else None
    one_shot = [r['perplexity'] for r in rows if 'one-shot' in r['method']]
    ast = [r['perplexity'] for r in rows if r['method'] == 'AST 2:4']
    return bool(ast and one_shot and ast[0] < min(one_shot))


def table(result, out):
    rows = result['rows']
    hdr = f'{"method":26s} {"ppl":>9s} {"/dense":>7s} {"flip":>7s} {"bytes":>12s} {"/dense":>7s}' \
          f' {"ms/tok":>8s}'
    print(hdr)
    for r in rows:
        flip = r.get('flip_rate_end')
        ratio = r.get('ppl_ratio_to_dense_ft')
        br = r.get('bytes_ratio_to_dense')
        print(f'{r["method"]:26s} {r["perplexity"]:9.3f} '
              f'{"-" if ratio is None else f"{ratio:.3f}":>7s} '
              f'{"-" if flip is None else f"{flip:.4f}":>7s} {r["weight_bytes"]:12d} '
              f'{"-" if br is None else f"{br:.3f}":>7s} {1e3 * r["decode_s_per_token"]:8.1f}')
    print(f'wrote {out}')


def merge(args):
    parts = [json.loads(pathlib.Path(f).read_text()) for f in args.merge]
    order = {m: i for i, m in enumerate(
        ['dense (no fine-tune)', 'dense fine-tune', 'magnitude 2:4 one-shot',
         'Wanda 2:4 one-shot', 'SparseGPT 2:4 one-shot', 'AST 2:4', 'AST 2:4 boosted'])}
    rows = sorted([r for p in parts for r in p['rows']], key=lambda r: order[r['method']])
    result = {**parts[0], 'rows': rows, 'parts': [p['command'] for p in parts],
              'wall_s': max(p['wall_s'] for p in parts)}
    result['done_criterion_ast_beats_all_one_shot'] = finish(rows)
    out = pathlib.Path(args.out)
    out.write_text(json.dumps(result, indent=2, default=float))
    table(result, out)
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--model', default='smollm2-135m', help="'smollm2-135m' or 'tiny'")
    p.add_argument('--steps', type=int, default=24)
    p.add_argument('--batch', type=int, default=4)
    p.add_argument('--seq', type=int, default=128)
    p.add_argument('--lr', type=float, default=1e-4)
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--eval-batches', type=int, default=4, help='held-out batches of 8 x seq')
    p.add_argument('--calib', type=int, default=32, help='calibration sequences (of --seq)')
    p.add_argument('--update-every', type=int, default=10)
    p.add_argument('--decode-tokens', type=int, default=8)
    p.add_argument('--prompt-len', type=int, default=32)
    p.add_argument('--out', default=None)
    p.add_argument('--rows', default=','.join(ROWS), help=f'subset of {ROWS}')
    p.add_argument('--check-masked', action='store_true',
                   help='also evaluate the masked dense model of every sparse row')
    p.add_argument('--merge', nargs='+', default=None,
                   help='merge JSON files of runs over disjoint --rows into --out')
    args = p.parse_args(argv)
    if args.merge:
        return merge(args)
    rows_wanted = set(args.rows.split(','))
    if rows_wanted - set(ROWS):
        raise ValueError(f'--rows={args.rows!r}: unknown {sorted(rows_wanted - set(ROWS))}')
    tiny = args.model == 'tiny'
    out = pathlib.Path(args.out or f'bench/results/ast_{"tiny" if tiny else "smollm2"}.json')
    ds = train.load_splits(config.DataCfg(dataset='tiny-text' if tiny else 'shakespeare'))
    model0, _arch, tok = build(args)
    train_batches = take(data.lm_batches(ds['train'], tok, batch_size=args.batch,
                                         seq_len=args.seq, seed=0), args.steps)
    eval_batches = take(data.lm_batches(ds['validation'], tok, batch_size=8, seq_len=args.seq,
                                        seed=0), args.eval_batches)
    calib = list(_calibrate.calibration_batches(ds['train'], tok, num_sequences=args.calib,
                                                seq_len=args.seq, batch_size=8, seed=1))
    prompt = np.asarray(eval_batches[0]['input_ids'][:1, :args.prompt_len])
    rows = []
    t_all = time.perf_counter()

    dense_bytes = _ast_infer.weight_bytes(model0)['total']
    if 'dense' in rows_wanted:
        log('dense (pretrained)')
        ev, dt = measure(model0, eval_batches, prompt, args)
        rows.append({'method': 'dense (no fine-tune)', 'perplexity': ev['perplexity'],
                     'weight_bytes': dense_bytes, 'decode_s_per_token': dt})

    if 'ft' in rows_wanted:
        log('dense fine-tune')
        gd, st, rest, info = train_run(copy.deepcopy(model0), train.NoMethod(), train_batches,
                                       args)
        ft = nnx.merge(gd, st.trainable, rest)
        ev, dt = measure(ft, eval_batches, prompt, args)
        rows.append({'method': 'dense fine-tune', 'perplexity': ev['perplexity'],
                     'weight_bytes': dense_bytes, 'decode_s_per_token': dt, **info})
        del ft, st

    params0 = nnx.state(model0, nnx.Param)
    if 'magnitude' in rows_wanted:
        log('magnitude 2:4')
        _, mmask = _oneshot.magnitude_prune(params0)
        rows.append(sparse_row('magnitude 2:4 one-shot', model0, _ast_infer.mask_dict(mmask),
                               eval_batches, prompt, args))

    log('Wanda calibration')
    norms = _calibrate.collect_input_norms(copy.deepcopy(model0), calib)
    wmask = _nm.nm_masks(_wanda.wanda_scores(params0, act_norms=norms))
    if 'wanda' in rows_wanted:
        rows.append(sparse_row('Wanda 2:4 one-shot', model0, _ast_infer.mask_dict(wmask),
                               eval_batches, prompt, args))

    if 'sparsegpt' in rows_wanted:
        log('SparseGPT 2:4 (sequential)')
        t0 = time.perf_counter()
        sg_model, sg_masks = _calibrate.sparsegpt_sequential(copy.deepcopy(model0), calib)
        rows.append(sparse_row('SparseGPT 2:4 one-shot', sg_model, sg_masks, eval_batches,
                               prompt, args, {'prune_s': time.perf_counter() - t0}))
        del sg_model

    for boosted in (False, True):
        if ('ast_boosted' if boosted else 'ast') not in rows_wanted:
            continue
        name = 'AST 2:4 boosted' if boosted else 'AST 2:4'
        log(name)
        cfg = _ast_train.AstCfg(method='ast', update_every=args.update_every,
                                init_score='wanda', slorb=boosted)
        method = _ast_train.AstMethod(cfg, act_norms=norms, steps=args.steps)
        m = copy.deepcopy(model0)
        if boosted:
            _ast_train.add_slorb(m, _ast_infer.mask_dict(wmask), k=cfg.slorb_k)
        gd, st, rest, info = train_run(m, method, train_batches, args)
        masks = _ast_infer.mask_dict(_ast_train.final_masks(st.opt_state))
        trained = nnx.merge(gd, st.trainable, rest)
        flips = method.flip_history
        rows.append(sparse_row(name, trained, masks, eval_batches, prompt, args, {
            'flip_rate_end': flips[-1][1] if flips else None, 'flip_history': flips, **info}))
        del trained, st

    done = finish(rows)
    result = {
        'benchmark': 'ast', 'model': args.model,
        'dataset': 'tiny-text' if tiny else 'shakespeare',
        'command': 'python bench/ast.py ' + ' '.join(argv if argv is not None else sys.argv[1:]),
        'budget': {'train_steps': args.steps, 'batch_size': args.batch, 'seq_len': args.seq,
                   'train_tokens': args.steps * args.batch * args.seq,
                   'eval_tokens': int(sum(np.sum(b['labels'] >= 0) for b in eval_batches)),
                   'calibration_sequences': len(calib) * 8, 'lr': args.lr,
                   'warmup_steps': args.warmup, 'mask_update_every': args.update_every},
        'done_criterion_ast_beats_all_one_shot': done,
        'dense_weight_bytes': dense_bytes,
        'device': f'{jax.devices()[0].device_kind} ({platform.processor() or platform.machine()},'
                  f' {os.cpu_count()} cores, shared)',
        'jax': jax.__version__, 'dtype': 'float32', 'wall_s': time.perf_counter() - t_all,
        'rows': rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=float))
    table(result, out)
    return result


if __name__ == '__main__':
    main()
