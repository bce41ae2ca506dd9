"""The training loop: build, (resume), step, log, evaluate, checkpoint.

Resumption is exact: a checkpoint holds the ``TrainState`` (trained params, optimizer state, step,
RNG, skipped count), the data position and the method's host-side state
(``Method.checkpoint_meta``); the train stream restarts at that position, so a run that is killed
and restarted ends with the same parameters and metrics as an uninterrupted one. The frozen part
of the model (``rest``) is rebuilt from ``model.name_or_path`` on restart; a method that changed
shapes (APT's compaction) rebuilds the model at the checkpoint's shapes from its meta
(``Method.restore``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxprune import checkpoint, distributed, transforms
from jaxprune import config as config_lib
from jaxprune.train import _data, _factory, _method, _metrics, _step

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Setup:
    """Everything built from a config before the first step (reused by ``evaluate``)."""

    cfg: config_lib.RunCfg
    graphdef: nnx.GraphDef
    rest: Any
    state: _step.TrainState
    tx: Any
    method: _method.Method
    tokenizer: Any
    splits: Any
    mesh: jax.sharding.Mesh
    state_sharding: Any
    rest_sharding: Any
    arch: Any
    eval_cache: dict[str, Any] = dataclasses.field(default_factory=dict)


def trainable_filter(cfg: config_lib.RunCfg):
    """What trains: LoRA factors (+ ``lora.head_modules`` for classification) if LoRA, else all."""
    if cfg.lora.enabled and not cfg.train.full_finetune:
        from jaxprune import lora

        return lora.trainable_filter(classifier=cfg.model.task == 'classification',
                                     head_names=cfg.lora.head_modules)
    return nnx.Param


def _replicated(mesh):
    return NamedSharding(mesh, PartitionSpec())


def _shardings(tx, trainable, rest, mesh) -> tuple[_step.TrainState, Any]:
    """``(TrainState of shardings, rest shardings)`` for (possibly abstract) trainable/rest."""
    from jaxprune import sharding

    p_sh = sharding.param_shardings(trainable, mesh)
    r_sh = sharding.param_shardings(rest, mesh)
    o_sh = sharding.opt_state_shardings(jax.eval_shape(tx.init, trainable), p_sh,
                                        rest_shardings=r_sh)
    rep = _replicated(mesh)
    return _step.TrainState(step=rep, trainable=p_sh, opt_state=o_sh, rng=rep, skipped=rep), r_sh


def setup(cfg: config_lib.RunCfg, *, mesh: jax.sharding.Mesh | None = None) -> Setup:
    """Builds model, optimizer, sharded initial state and data splits for ``cfg``."""
    from jaxprune import sharding

    model, arch, tokenizer = _factory.build_model(cfg.model, cfg.lora)
    method = _method.build_method(cfg.prune, run_cfg=cfg)
    model = _method.prepare_model_fn(method)(model)  # before split: a restore target sees it
    graphdef, trainable, rest = nnx.split(model, trainable_filter(cfg), ...)
    p_dtype = _factory.dtype(cfg.model.param_dtype)
    trainable = jax.tree.map(
        lambda x: x.astype(p_dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, trainable)
    tx = cfg.train.build_optimizer(*method.transforms(trainable))
    if mesh is None:
        shape = cfg.mesh.shape(jax.device_count())
        mesh = sharding.make_mesh(shape, devices=jax.devices()[:math.prod(shape.values())])
    state_sh, r_sh = _shardings(tx, trainable, rest, mesh)
    p_sh = state_sh.trainable
    trainable = sharding.shard_like(trainable, p_sh)
    rest = sharding.shard_like(rest, r_sh)
    init = jax.jit(lambda t: _step.init_state(t, tx, seed=cfg.train.seed), out_shardings=state_sh)
    state = init(trainable)
    splits = _data.load_splits(cfg.data)
    return Setup(cfg=cfg, graphdef=graphdef, rest=rest, state=state, tx=tx, method=method,
                 tokenizer=tokenizer, splits=splits, mesh=mesh, state_sharding=state_sh,
                 rest_sharding=r_sh, arch=arch)


def _batch_sharding(mesh, batch_size):
    from jaxprune import sharding

    return sharding.batch_sharding(mesh, batch_size=batch_size)


# Step metrics the train event reports under its own names or not at all.
_LOGGED_STEP_KEYS = frozenset({'loss', 'accuracy', 'grad_norm', 'count', 'nonfinite'})


def _place(batch: dict[str, np.ndarray], sh) -> dict[str, jax.Array]:
    """Puts a global host batch on the mesh; with several processes each feeds only its rows.

    Every process builds the same global batch (the data pipeline is deterministic given the
    seed), so slicing it by ``host_batch_slice`` is per-host data sharding without coordination.
    """
    if jax.process_count() == 1:
        return {k: jax.device_put(np.asarray(v), sh) for k, v in batch.items()}
    size = len(next(iter(batch.values())))
    lo, hi = distributed.host_batch_slice(size, sharding=sh)
    local = {k: np.asarray(v)[lo:hi] for k, v in batch.items()}
    return distributed.global_batch_from_host(local, sh.mesh, sh, global_batch_size=size)


def weights(state: _step.TrainState, tcfg: config_lib.TrainCfg) -> Any:
    """The trained params to evaluate or ship: the parameter average with ``train.param_ema``
    (bias-corrected; the live params before the first update), else the live params."""
    if not tcfg.param_ema:
        return state.trainable
    return transforms.averaged_params(state.trainable, state.opt_state)


def evaluate_state(s: Setup, *, split: str = 'validation') -> dict[str, float]:
    """Exact metrics of the current state over a whole split (padding rows ignored)."""
    cfg = s.cfg
    if split not in s.eval_cache:  # tokenize once per split
        s.eval_cache[split] = _data.eval_batches(
            s.splits[split], s.tokenizer, cfg.data, task=cfg.model.task)
    batches = s.eval_cache[split]
    sh = _batch_sharding(s.mesh, cfg.data.eval_batch_size)
    key = ('fn', s.graphdef)
    if key not in s.eval_cache:  # one jitted function per graphdef: no re-trace per eval
        s.eval_cache[key] = _step.make_eval_step(
            s.graphdef, task=cfg.model.task, method=s.method)
    fn = s.eval_cache[key]
    totals = {'loss_sum': 0.0, 'correct': 0.0, 'count': 0.0}
    trainable = weights(s.state, cfg.train)
    for b in batches:
        sums = fn(trainable, s.rest, s.state.opt_state, _place(b, sh))
        for k in totals:
            totals[k] += float(sums[k])
    return _step.summarize(totals, task=cfg.model.task)


def _tokens(batch: dict[str, np.ndarray]) -> int:
    if 'attention_mask' in batch:
        return int(np.sum(batch['attention_mask']))
    return int(np.size(batch['input_ids']))


def _checkpointer(cfg: config_lib.RunCfg):
    return checkpoint.Checkpointer(cfg.checkpoint_dir, max_to_keep=cfg.checkpoint.keep)


def _abstract(state):
    from jaxprune import sharding

    return sharding.abstract_like(state)


def _rate(n: int, seconds: float) -> float | None:
    return n / seconds if n else None  # None: the window held only the compile step


def _meta(s: Setup, step: int, data_position: int,
          pad_len: int | None = None) -> dict[str, Any]:
    return {'step': step, 'data_position': data_position, 'pad_len': pad_len,
            'skipped_nonfinite': int(s.state.skipped), 'config': s.cfg.to_dict(),
            'method': _method.checkpoint_meta_fn(s.method)()}


def _restore(s: Setup, ckpts, *, quarantine: bool = True) -> tuple[int, dict[str, Any]] | None:
    """Restores the newest valid checkpoint into ``s`` (in place); ``(step, meta)`` or None.

    The restore target comes from the step's own meta: the method's ``restore`` hook rebuilds the
    model at the checkpoint's shapes (a pruned model, say) from ``meta['method']``, starting from
    the freshly built state every time, so falling back past a corrupt step to an older one with
    other shapes works too.
    """
    from jaxprune import sharding

    initial = _method.LoopState(s.graphdef, s.state, s.rest)
    restore = _method.restore_fn(s.method)
    built = {}

    def target(meta):
        ls = restore(meta.get('method'), initial)
        state_sh, rest_sh = _shardings(s.tx, ls.state.trainable, ls.rest, s.mesh)
        abstract = jax.eval_shape(
            lambda t: _step.init_state(t, s.tx, seed=s.cfg.train.seed), ls.state.trainable)
        built.update(ls=ls, state_sh=state_sh, rest_sh=rest_sh)
        return sharding.abstract_like(abstract, state_sh)

    found = ckpts.restore_latest_valid(target=target, quarantine=quarantine)
    if found is None:
        return None
    step, s.state, meta = found
    ls = built['ls']
    if ls.rest is not initial.rest:
        s.rest = sharding.shard_like(ls.rest, built['rest_sh'])
    s.graphdef, s.state_sharding, s.rest_sharding = ls.graphdef, built['state_sh'], built['rest_sh']
    return step, meta


def _adopt(s: Setup, ls: _method.LoopState) -> bool:
    """Takes a method's ``on_step_end`` result into ``s``; True when the shapes changed.

    After surgery (a new graphdef) the smaller state is laid out again by the sharding rules on
    the run's mesh, as a fresh run at those shapes would be (a dim that no longer divides its
    mesh axis is replicated), instead of keeping whatever layout the gathers produced.
    """
    from jaxprune import sharding

    if ls.graphdef is s.graphdef:
        s.state, s.rest = ls.state, ls.rest
        return False
    state_sh, rest_sh = _shardings(s.tx, ls.state.trainable, ls.rest, s.mesh)
    s.state = sharding.shard_like(ls.state, state_sh)
    s.rest = sharding.shard_like(ls.rest, rest_sh)
    s.graphdef, s.state_sharding, s.rest_sharding = ls.graphdef, state_sh, rest_sh
    return True


def train(cfg: config_lib.RunCfg, *, progress: bool | None = None,
          mesh: jax.sharding.Mesh | None = None) -> dict[str, Any]:
    """Runs (or resumes) a training run and returns the final eval record.

    Writes ``run_dir/config.yaml``, ``run_dir/metrics.jsonl`` and checkpoints under
    ``cfg.checkpoint_dir`` (every ``checkpoint.every`` steps and at the end).

    Args:
      cfg: the run config.
      progress: show a rich progress bar (default: when stderr is a terminal).
      mesh: optional mesh overriding ``cfg.mesh``.

    Returns:
      The final ``eval`` event (``step``, ``loss``, ``accuracy`` [, ``perplexity``], ...).
    """
    driver = _method.driver_for(cfg.prune.method)
    if driver is not None:  # a method with its own loop (registered with register_driver)
        return driver(cfg, progress=progress)
    run_dir = pathlib.Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    s = setup(cfg, mesh=mesh)
    tcfg, task = cfg.train, cfg.model.task
    ckpts = _checkpointer(cfg)
    data_position = 0
    # Classification batches are padded to a length bucket, and every (architecture, length)
    # pair compiles the train step once. After the first shape change (surgery) a method may
    # change shapes again within a few steps (APT: every ~12 steps), where a compile per bucket
    # costs far more than the padding saves, so from then on batches are padded to max_len: one
    # compile per architecture. Stored in the checkpoint so a resumed run pads as the original.
    pad_len = None
    if not cfg.checkpoint.resume and ckpts.latest_step() is not None:
        ckpts.close()
        raise ValueError(
            f'checkpoint.resume=false but {str(cfg.checkpoint_dir)!r} holds checkpoints; '
            'pass checkpoint.resume=true or a fresh run_dir')
    if cfg.checkpoint.resume:
        try:
            found = _restore(s, ckpts)
        except checkpoint.StateMismatchError as e:
            ckpts.close()
            raise checkpoint.StateMismatchError(
                f'{e}\nThe checkpoints in {str(cfg.checkpoint_dir)!r} were written with other '
                'model / lora / prune / train.param_ema settings than this config (they shape '
                'the state). Resume with the settings of the saved run, or use a fresh run_dir; '
                'the checkpoints are left as they are.') from None
        if found is not None:
            _, meta = found
            data_position = int(meta['data_position'])
            pad_len = meta.get('pad_len')
            logger.info('resumed from step %d (data position %d)', meta['step'], data_position)
    if jax.process_index() == 0:  # one writer per run directory; after a resume is accepted, so
        config_lib.save_config(cfg, run_dir / 'config.yaml')  # a refused one keeps the saved run's
    start = int(s.state.step)
    log = _metrics.MetricsLogger(run_dir, total_steps=tcfg.steps, start_step=start,
                                 progress=progress)
    if start:
        log.log('resume', start, data_position=data_position)
    schedule = tcfg.build_schedule()
    stream = _data.train_batches(s.splits['train'], s.tokenizer, cfg.data, task=task,
                                 start=data_position)
    b_sh = _batch_sharding(s.mesh, cfg.data.batch_size)

    def compile_step():
        return _step.make_train_step(s.graphdef, s.tx, task=task, method=s.method)

    step_fn = compile_step()
    window: list[dict[str, jax.Array]] = []
    w_tokens = w_examples = 0
    w_start = time.perf_counter()
    last = None
    try:
        for step in range(start, tcfg.steps):
            batch = next(stream)
            if pad_len is not None:
                batch = _data.pad_train_batch(batch, s.tokenizer, pad_len)
            data_position += 1
            s.state, m = step_fn(s.state, s.rest, _place(batch, b_sh))
            window.append(m)
            w_tokens += _tokens(batch)
            w_examples += len(batch['input_ids'])
            done = step + 1
            if done == tcfg.steps and tcfg.param_ema:  # finish on the average (export, checkpoint)
                s.state = s.state._replace(trainable=weights(s.state, tcfg))
            loop_state = s.method.on_step_end(done, _method.LoopState(s.graphdef, s.state, s.rest))
            if _adopt(s, loop_state):  # surgery changed shapes: re-sharded, so re-jit
                step_fn = compile_step()
                if pad_len is None and task == 'classification':
                    pad_len = cfg.data.max_len
                    logger.info('shapes changed at step %d: batches are padded to data.max_len='
                                '%d from here on (one compile per architecture, not per length '
                                'bucket)', done, pad_len)
            if done == start + 1:  # the first step includes compilation; keep it out of rates
                jax.block_until_ready(m['loss'])
                log.log('compile', done, seconds=time.perf_counter() - w_start)
                w_tokens = w_examples = 0
                w_start = time.perf_counter()
            if window and (done % tcfg.log_every == 0 or done == tcfg.steps):
                host = jax.device_get(window)
                dt = max(time.perf_counter() - w_start, 1e-9)
                loss = float(np.mean([h['loss'] for h in host]))
                rec = log.log(
                    'train', done, loss=loss,
                    accuracy=float(np.mean([h['accuracy'] for h in host])),
                    grad_norm=float(np.mean([h['grad_norm'] for h in host])),
                    lr=float(schedule(done - 1)),
                    tokens_per_s=_rate(w_tokens, dt), examples_per_s=_rate(w_examples, dt),
                    skipped_nonfinite=int(s.state.skipped),
                    # Method terms from loss_extras (e.g. 'ce', 'kd', 'mu'), window means.
                    **{k: float(np.mean([h[k] for h in host])) for k in host[-1]
                       if k not in _LOGGED_STEP_KEYS and np.ndim(host[-1][k]) == 0})
                log.advance(done, loss=loss, tokens_per_s=rec['tokens_per_s'])
                window, w_tokens, w_examples = [], 0, 0
                w_start = time.perf_counter()
            else:
                log.advance(done)
            paused = time.perf_counter()  # eval and checkpoints stay out of throughput
            if tcfg.eval_every and done % tcfg.eval_every == 0 and done != tcfg.steps:
                metrics = evaluate_state(s)
                log.log('eval', done, **metrics)
                after = _method.on_eval_fn(s.method)(
                    done, metrics, _method.LoopState(s.graphdef, s.state, s.rest))
                if _adopt(s, after):
                    raise RuntimeError(f'{type(s.method).__name__}.on_eval changed the model '
                                       'graph; only on_step_end may change shapes')
            every = cfg.checkpoint.every
            if (every and done % every == 0) or done == tcfg.steps:
                ckpts.save(done, s.state, _meta(s, done, data_position, pad_len))
            w_start += time.perf_counter() - paused
        last = log.log('eval', int(s.state.step), **evaluate_state(s),
                       skipped_nonfinite=int(s.state.skipped))
    finally:
        log.close()
        ckpts.close()
    return last


def evaluate(cfg: config_lib.RunCfg, *, split: str = 'validation') -> dict[str, Any]:
    """Evaluates the latest checkpoint of ``cfg`` (or the untrained model when there is none)."""
    s = setup(cfg)
    ckpts = _checkpointer(cfg)
    step = 0
    try:
        found = _restore(s, ckpts, quarantine=False)
        if found is not None:
            step = found[0]
    finally:
        ckpts.close()
    return {'step': step, 'split': split, **evaluate_state(s, split=split)}
