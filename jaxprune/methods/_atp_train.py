"""ATP end to end: the alternating two-optimizer driver, budget projection and export.

ATP (Lu et al., 2024) trains two things with two optimizers on every step of a *control phase*:

1. the pruning-decision generator (``jaxprune.scores._atp_generator``), LLM frozen, on batches
   from a held-out slice of the domain training set
   (:func:`jaxprune.methods._atp.generator_step`);
2. the LoRA factors, generator frozen, in LoRA-aware mode with a mask sampled from the generator,
   followed by the proximal group lasso on the LoRA groups of pruned channels
   (:func:`jaxprune.methods._atp.llm_step` with ``chain(clip, adamw, group_lasso)``).

This does not fit the trainer's single optax chain, so :func:`train_atp` is a dedicated driver
built from the trainer's pieces (model factory, data splits, eval batches, ``loss_sums``,
``MetricsLogger``, ``Checkpointer``); like the generic loop it checkpoints its whole carry
(both optimizers, PRNG key, frozen masks, both data-stream positions) and resumes exactly.
After the control phase the masks are frozen to :func:`project_masks` (the generator's ranking
cut at exactly the parameter budget), and LoRA keeps training with the group lasso until the
pruned groups are ~0. Export (:func:`atp_export`) merges LoRA into the weights (``W + s A B``),
removes whole GQA groups and FFN neurons through ``jaxprune.surgery.prune`` and the remaining
per-layer dims through ``jaxprune.surgery._dims``, so the exported model holds exactly
``kept_count(masks)`` projection parameters; the run saves it to ``run_dir/pruned`` with
``jaxprune.surgery.save_compact`` (``load_compact`` reads it back).

The CLI path: :func:`train_atp` is registered as the trainer *driver* of ``prune.method: atp``,
so ``jaxprune train configs/atp_tiny.yaml`` runs it; building the single-chain train ``Method``
for ATP raises a ``ValueError`` that says so (it cannot alternate optimizers).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import pathlib
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxprune import config as config_lib
from jaxprune.masks import _density, _gumbel
from jaxprune.methods import _atp, _atp_cfg
from jaxprune.scores import _atp_generator
from jaxprune.transforms import _group_lasso

logger = logging.getLogger(__name__)


AtpCfg = _atp_cfg.AtpCfg


def _atp_method_builder(prune_cfg, *, run_cfg=None):
    del run_cfg
    raise ValueError(
        f'prune.method={prune_cfg.method!r} alternates two optimizers (generator and LoRA) and '
        'cannot run in the single-chain trainer; call jaxprune.methods.train_atp(cfg) (the CLI '
        'dispatches `jaxprune train` to it for prune.method=atp)')


def _register_train_method():
    from jaxprune import train

    train.register_method('atp')(_atp_method_builder)


_register_train_method()


# ---------------------------------------------------------------------------------------------
# Budget projection.


def _kept(masks: Any, dims: Sequence[_density.LayerDims], count: Callable | None = None) -> int:
    """Exact kept projection params of hard masks: int32 per layer, summed with Python ints."""
    count = count or functools.partial(_density.kept_count, dims=dims, per_layer=True)
    return sum(int(c) for c in np.asarray(count(masks)))


def project_masks(
    logits: Any, dims: Sequence[_density.LayerDims], *, target_density: float,
    bias: float = _gumbel.DEFAULT_BIAS,
) -> Any:
    r"""Hard masks from generator logits that keep exactly the parameter budget (outside jit).

    All units of all groups are ranked by ``logit + bias`` (descending, stable); the masks keep
    the longest prefix :math:`k^*` of that ranking whose exact kept count fits:

    .. math:: k^* = \max\{k : N(k) \le p \cdot N_{prunable}\}

    with :math:`N` = ``jaxprune.masks._density.kept_count`` (exact integers; monotone in the
    prefix, so a binary search finds it). Hence ``density <= target_density < density(k* + 1)``:
    the removed share is ``1 - target_density`` up to the marginal cost of a single unit. With a
    generator trained to the target, this is its deterministic mask ``1[l + bias >= 0]`` with a
    global bias correction.

    Args:
      logits: generator logits in the masks layout (``generator_apply(gen_params)``).
      dims: per-layer dims.
      target_density: fraction of prunable parameters to keep, in ``(0, 1]``.
      bias: the Gumbel-sigmoid bias (only shifts all logits; kept for the documented ranking).

    Returns:
      ``{'layers': ({group: f32[size] in {0, 1}}, ...)}``.

    Raises:
      ValueError: ``target_density`` outside ``(0, 1]``.

    References:
      Lu et al., 2024 (ATP), arXiv:2412.14426. Deviation: ATP exports ``1[l + bias >= 0]``, whose
      density only approaches the target; the projection makes the budget exact.
    """
    if not 0 < target_density <= 1:
        raise ValueError(f'{target_density=} must be in (0, 1] (fraction of prunable params kept)')
    leaves, treedef = jax.tree.flatten(logits)
    flat = np.concatenate([np.asarray(x, np.float64).ravel() + bias for x in leaves])
    order = np.argsort(-flat, kind='stable')
    budget = target_density * float(_density.prunable_params(dims))

    def masks_of(k):
        keep = np.zeros(flat.size, np.float32)
        keep[order[:k]] = 1.0
        out, start = [], 0
        for x in leaves:
            out.append(jnp.asarray(keep[start:start + x.size].reshape(np.shape(x))))
            start += x.size
        return jax.tree.unflatten(treedef, out)

    count = jax.jit(functools.partial(_density.kept_count, dims=dims, per_layer=True))

    def kept(k):
        return _kept(masks_of(k), dims, count)

    lo, hi = 0, flat.size  # kept(lo) <= budget; find the largest such k
    if kept(hi) <= budget:
        return masks_of(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if kept(mid) <= budget else (lo, mid)
    return masks_of(lo)


# ---------------------------------------------------------------------------------------------
# Export.


def _lora_scale(model: nnx.Module) -> float | None:
    scales = {node.lora_scale for _, node in nnx.iter_graph(model)
              if getattr(node, 'lora_a', None) is not None and hasattr(node, 'lora_scale')}
    if len(scales) > 1:
        raise ValueError(f'adapters have different scales {sorted(scales)}; merge them one by one')
    return scales.pop() if scales else None


def atp_export(model: nnx.Module, masks: Any) -> tuple[dict[str, Any], Any, dict[str, int]]:
    """Physically remove everything hard ATP masks prune (outside jit).

    Steps: merge LoRA into the kernels (evaluation semantics ``((W + s A B) x) * m``); remove
    whole GQA groups and FFN neurons with ``jaxprune.surgery.prune`` (keep vectors from
    :func:`jaxprune.methods._atp.atp_surgery_keep`); slice the remaining per-layer dims
    (``attn_in/out``, ``mlp_in/out``, value-head dims) with ``jaxprune.surgery._dims.compact``.

    Args:
      model: the trained ``Llama`` (with or without LoRA).
      masks: hard ``{0, 1}`` masks in the models layout for ``model.config``.

    Returns:
      ``(compact_params, config, counts)``: run with ``jaxprune.surgery.compact_forward(
      compact_params, ids, config=config)``, save with ``jaxprune.surgery.save_compact(path,
      compact_params, config, {'counts': counts})``; ``counts`` holds ``prunable`` (original
      projection params), ``kept`` (projection params stored), ``kept_by_density`` (the exact
      integer ``jaxprune.masks._density.kept_count``) and ``total`` (all stored float params).

    Raises:
      RuntimeError: the stored count differs from the density module's count (a bug).
    """
    from jaxprune import lora, surgery
    from jaxprune.surgery import _dims

    config = model.config
    dims = _density.layer_dims(config)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    scale = _lora_scale(model)
    if scale is not None:
        params = lora.merge_lora(params, scale=scale)
    keep, residual = _atp.atp_surgery_keep(masks, dims)
    new_config, pruned = surgery.prune(config, params, keep)
    compact = _dims.compact(new_config, pruned, residual)
    counts = {
        'prunable': int(_density.prunable_params(dims)),
        'kept': _dims.projection_param_count(compact),
        'kept_by_density': _kept(masks, dims),
        'total': _dims.param_count(compact),
    }
    if counts['kept'] != counts['kept_by_density']:
        raise RuntimeError(f'exported projection params {counts} differ from the density count')
    return compact, new_config, counts


# ---------------------------------------------------------------------------------------------
# Evaluation (the trainer's exact sums over padded eval batches).


def evaluate_lm(apply_fn: Callable[[dict[str, jax.Array]], jax.Array],
                batches: Iterable[dict[str, np.ndarray]]) -> dict[str, float]:
    """Exact causal-LM metrics of ``apply_fn(batch) -> logits`` over eval batches.

    ``apply_fn`` should be jitted; padding labels (``-1``) are ignored
    (``jaxprune.train.loss_sums``). Returns ``loss``, ``accuracy``, ``count``, ``perplexity``.
    """
    from jaxprune import train

    @jax.jit
    def sums(b):
        return train.loss_sums(apply_fn(b), b['labels'], task='causal_lm')

    totals = {'loss_sum': 0.0, 'correct': 0.0, 'count': 0.0}
    for b in batches:
        s = sums({k: jnp.asarray(v) for k, v in b.items()})
        for k in totals:
            totals[k] += float(s[k])
    return train.summarize(totals, task='causal_lm')


def split_holdout(train_split: Any, fraction: float) -> tuple[Any, Any]:
    """``(lora_split, generator_split)``: the last ``ceil(fraction * n)`` documents held out."""
    n = len(train_split)
    if n < 2:
        raise ValueError(f'the train split has {n} document(s); ATP needs >= 2 (one held out)')
    k = min(n - 1, max(1, math.ceil(fraction * n)))
    return train_split.select(range(n - k)), train_split.select(range(n - k, n))


def pruned_lora_norm(trainable: Any, masks: Any, dims: Sequence[_density.LayerDims]) -> float:
    """Largest L2 norm of a LoRA group (row of A / column of B) that feeds a pruned channel."""
    shares = _group_lasso.lora_shares_fn(dims)(masks, trainable)
    norms = []

    def one(share, p):
        if share is None:
            return
        axes = tuple(i for i, s in enumerate(share.shape) if s == 1)
        n = jnp.sqrt(jnp.sum(jnp.square(p.astype(jnp.float32)), axis=axes, keepdims=True))
        norms.append(jnp.max(jnp.where(share > 0, n, 0.0)))

    jax.tree.map(one, shares, trainable, is_leaf=lambda x: x is None)
    return float(max(norms)) if norms else 0.0


# ---------------------------------------------------------------------------------------------
# The driver.


@dataclasses.dataclass
class AtpRun:
    """What :func:`run_atp` produced: the trained model, masks, export and the final record."""

    model: nnx.Module
    gen_params: Any
    masks: Any
    compact: dict[str, Any]
    compact_config: Any
    record: dict[str, Any]  # record['export_path']: the saved compact model (save_compact)
    tokenizer: Any
    splits: Any


def _lr_schedule(tcfg: Any, steps: int) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        0.0, tcfg.learning_rate, min(tcfg.warmup_steps, steps), steps,
        end_value=tcfg.learning_rate * tcfg.final_lr_ratio)


def lora_tx(run_cfg: config_lib.RunCfg, dims: Sequence[_density.LayerDims]
            ) -> optax.GradientTransformationExtraArgs:
    """``chain(clip, adamw(schedule), group_lasso)`` for the LoRA step (trainer's LR schedule)."""
    tcfg, pcfg = run_cfg.train, run_cfg.prune
    lr = _lr_schedule(tcfg, tcfg.steps)
    parts = [optax.clip_by_global_norm(tcfg.grad_clip)] if tcfg.grad_clip > 0 else []
    parts += [
        optax.adamw(lr, b1=tcfg.b1, b2=tcfg.b2, weight_decay=tcfg.weight_decay),
        _group_lasso.group_lasso(_group_lasso.lora_shares_fn(dims),
                                 strength=pcfg.lasso_schedule(), learning_rate=lr),
    ]
    return optax.chain(*parts)


# Config fields a resumed run may change: where things are written and how often it logs.
_RESUME_FREE = ('run_dir', 'checkpoint.', 'train.log_every')


def _config_changes(saved: dict[str, Any], run_cfg: config_lib.RunCfg) -> list[str]:
    """``'key: saved -> now'`` for every config field that differs from a checkpoint's."""
    def flat(d, prefix=''):
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out |= flat(v, f'{prefix}{k}.')
            else:
                out[f'{prefix}{k}'] = v
        return out

    old = flat(saved)
    new = flat(json.loads(json.dumps(run_cfg.to_dict())))  # JSON round trip: tuples -> lists
    return [f'{k}: {old.get(k)!r} -> {new.get(k)!r}' for k in sorted(old.keys() | new.keys())
            if not k.startswith(_RESUME_FREE) and old.get(k) != new.get(k)]


def run_atp(run_cfg: config_lib.RunCfg, *, progress: bool | None = None,
            max_eval_batches: int | None = None) -> AtpRun:
    """Train ATP per ``run_cfg`` (``prune.method: atp``), export, evaluate; see :func:`train_atp`.

    Args:
      run_cfg: the run config; needs ``model.task: causal_lm``, a Llama model and LoRA enabled.
      progress: rich progress bar (default: when stderr is a terminal).
      max_eval_batches: evaluate on the first this many validation batches only (None = all).

    Returns:
      an :class:`AtpRun`.

    Raises:
      ValueError: wrong method, task, architecture, LoRA disabled or ``train.param_ema`` set;
        more than one process
        (the LLM, LoRA and optimizer state are sharded over ``run_cfg.mesh`` within one
        process; the generator is replicated); checkpoints present with
        ``checkpoint.resume=false``, or written with another config (all fields but
        ``run_dir``, ``checkpoint.*`` and ``train.log_every``: schedules depend on them).
    """
    from jaxprune import checkpoint, data, lora, models, sharding, surgery, train
    from jaxprune.train import _loop as train_loop

    pcfg, tcfg, dcfg = run_cfg.prune, run_cfg.train, run_cfg.data
    if not isinstance(pcfg, AtpCfg):
        raise TypeError(f'prune.method={pcfg.method!r}; train_atp needs prune.method=atp')
    if run_cfg.model.task != 'causal_lm':
        raise ValueError(f'model.task={run_cfg.model.task!r}; ATP here supports causal_lm')
    if tcfg.param_ema:
        raise ValueError(f'train.param_ema={tcfg.param_ema}: the ATP driver does not average '
                         'parameters (its masks are generated from the live LoRA weights); set '
                         'train.param_ema=0')
    if not run_cfg.lora.enabled:
        raise ValueError('lora.enabled=false; ATP trains LoRA adapters: set lora.enabled=true '
                         "(targets e.g. '.*\\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj"
                         "|down_proj)')")
    t_start = time.perf_counter()
    ckpt_dir = run_cfg.checkpoint_dir  # pathlib.Path, or epath.Path for gs://
    if (not run_cfg.checkpoint.resume and ckpt_dir.is_dir()
            and any(p.name.isdigit() for p in ckpt_dir.iterdir())):
        raise ValueError(
            f'checkpoint.resume=false but {str(ckpt_dir)!r} holds checkpoints; pass '
            'checkpoint.resume=true (continue that run) or a fresh run_dir')
    run_dir = pathlib.Path(run_cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_lib.save_config(run_cfg, run_dir / 'config.yaml')
    model, arch, tokenizer = train.build_model(run_cfg.model, run_cfg.lora)
    if not isinstance(arch, models.LlamaConfig):
        raise TypeError(f'model.name_or_path={run_cfg.model.name_or_path!r} is not a Llama; '
                         'ATP masks here are defined for Llama-family decoders')
    dims = _density.layer_dims(arch)
    graphdef, trainable, frozen = nnx.split(model, lora.trainable_filter(), ...)
    loss_fn = _atp.causal_lm_loss(graphdef)
    if jax.process_count() > 1:
        raise ValueError(
            f'prune.method=atp runs in one process (jax.process_count()={jax.process_count()}); '
            'its export and evaluation gather on the host. Use one process with a multi-device '
            'mesh (mesh.data / mesh.fsdp / mesh.tensor), or the generic trainer methods')
    mesh_shape = run_cfg.mesh.shape(jax.device_count())
    mesh = sharding.make_mesh(mesh_shape,
                              devices=jax.devices()[:math.prod(mesh_shape.values())])
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    p_sh = sharding.param_shardings(trainable, mesh)
    trainable = sharding.shard_like(trainable, p_sh)
    frozen = sharding.shard_like(frozen, sharding.param_shardings(frozen, mesh))

    splits = train.load_splits(dcfg)
    lora_split, gen_split = split_holdout(splits['train'], pcfg.holdout_fraction)
    gen_bs = pcfg.gen_batch_size or dcfg.batch_size
    # Small carry pieces are replicated on the mesh (committed), so a restored checkpoint, whose
    # arrays take the target's shardings, mixes with the sharded LLM state in one jit.
    key, gkey = jax.random.split(jax.device_put(jax.random.key(tcfg.seed), replicated))
    gen_params = jax.device_put(_atp_generator.generator_init(
        gkey, _atp_generator.mask_groups(arch), width=pcfg.generator_width,
        num_layers=pcfg.generator_layers), replicated)  # small: every device holds it
    gen_tx = optax.adamw(pcfg.generator_lr)
    gen_opt = jax.device_put(gen_tx.init(gen_params), replicated)
    tx = lora_tx(run_cfg, dims)
    opt_state = jax.jit(tx.init, out_shardings=sharding.opt_state_shardings(
        jax.eval_shape(tx.init, trainable), p_sh))(trainable)
    lora_sh = sharding.batch_sharding(mesh, batch_size=dcfg.batch_size)
    gen_sh = sharding.batch_sharding(mesh, batch_size=gen_bs)
    sample_kw = {'temperature': pcfg.temperature, 'bias': pcfg.bias}
    gen_step = jax.jit(functools.partial(
        _atp.generator_step, loss_fn=loss_fn, tx=gen_tx, dims=dims,
        target_density=pcfg.target_density, reg_weight=pcfg.reg_weight, **sample_kw))
    sample = jax.jit(functools.partial(_atp.sample_step_masks, **sample_kw))
    llm_step = jax.jit(functools.partial(_atp.llm_step, loss_fn=loss_fn, tx=tx))

    def freeze():  # end of the control phase: the generator's ranking cut at the exact budget
        return jax.device_put(project_masks(_atp_generator.generator_apply(gen_params), dims,
                                            target_density=pcfg.target_density, bias=pcfg.bias),
                              replicated)

    control = pcfg.control_steps(tcfg.steps)
    # Everything the loop carries. Before the freeze `masks` holds a same-shaped placeholder, so
    # every checkpoint has one structure (meta['frozen'] says which it is).
    placeholder = jax.device_put(jax.tree.map(lambda x: jnp.ones(x.shape, jnp.float32),
                                              _atp_generator.generator_apply(gen_params)),
                                 replicated)
    carry = {'gen_params': gen_params, 'gen_opt': gen_opt, 'trainable': trainable,
             'opt_state': opt_state, 'masks': placeholder, 'key': key}
    masks = None
    start, train_s = 0, 0.0
    positions = {'lora': 0, 'generator': 0}  # batches consumed per stream (data.lm_batches start)
    tokens = {'lora': 0, 'generator': 0}
    timing = {'control_s': 0.0, 'freeze_s': 0.0}
    ckpts = checkpoint.Checkpointer(run_cfg.checkpoint_dir, max_to_keep=run_cfg.checkpoint.keep)
    try:
        if run_cfg.checkpoint.resume:
            found = ckpts.restore_latest_valid(target=carry)
            if found is not None:
                start, carry, meta = found
                gen_params, gen_opt, trainable, opt_state, key = (
                    carry[k] for k in ('gen_params', 'gen_opt', 'trainable', 'opt_state', 'key'))
                masks = carry['masks'] if meta['frozen'] else None
                positions, tokens = meta['positions'], meta['tokens']
                timing, train_s = meta['timing'], meta['train_s']
                changed = _config_changes(meta.get('config', {}), run_cfg)
                if changed:
                    raise ValueError(
                        f'checkpoint step {start} in {str(ckpt_dir)!r} was written with another '
                        f'config ({"; ".join(changed)}); resume with the same config, or use a '
                        'fresh run_dir')
                logger.info('ATP resumed from step %d (data positions %s)', start, positions)
    except BaseException:
        ckpts.close()
        raise
    log = train.MetricsLogger(run_dir, total_steps=tcfg.steps, start_step=start,
                              progress=progress)
    if not start and pcfg.prior_batches:  # a resumed run restored its generator
        t0 = time.perf_counter()
        calib = data.lm_batches(gen_split, tokenizer, batch_size=gen_bs, seq_len=dcfg.seq_len,
                                seed=dcfg.seed + 2)
        prior = _atp.taylor_prior(
            trainable, frozen, [next(calib) for _ in range(pcfg.prior_batches)],
            loss_fn=loss_fn, dims=dims, groups=_atp_generator.mask_groups(arch),
            target_density=pcfg.target_density, criterion=pcfg.prior_criterion,
            cut_groups=pcfg.prior_groups, sharpness=pcfg.prior_sharpness)
        gen_params = _atp.warm_start_generator(gen_params, prior, bias=pcfg.bias)
        tokens['prior'] = pcfg.prior_batches * gen_bs * dcfg.seq_len
        timing['prior_s'] = time.perf_counter() - t0
        log.log('prior', 0, batches=pcfg.prior_batches, seconds=timing['prior_s'],
                density=_kept(_gumbel.deterministic_masks(prior, bias=0.0), dims)
                / _density.prunable_params(dims))
    if start:
        log.log('resume', start, data_position=positions['lora'],
                generator_data_position=positions['generator'], frozen=masks is not None)
    lora_stream = data.lm_batches(lora_split, tokenizer, batch_size=dcfg.batch_size,
                                  seq_len=dcfg.seq_len, seed=dcfg.seed, start=positions['lora'])
    gen_stream = data.lm_batches(gen_split, tokenizer, batch_size=gen_bs, seq_len=dcfg.seq_len,
                                 seed=dcfg.seed + 1, start=positions['generator'])

    def save(done):
        state = {'gen_params': gen_params, 'gen_opt': gen_opt, 'trainable': trainable,
                 'opt_state': opt_state, 'masks': placeholder if masks is None else masks,
                 'key': key}
        ckpts.save(done, state, {
            'step': done, 'frozen': masks is not None, 'positions': positions, 'tokens': tokens,
            'timing': timing, 'train_s': train_s + time.perf_counter() - t_start,
            'config': run_cfg.to_dict()})

    window: list[dict[str, Any]] = []
    try:
        if masks is None and start >= control:  # control == 0 (or a run already past it)
            masks = freeze()
        for step in range(start, tcfg.steps):
            t0 = time.perf_counter()
            batch = train_loop._place(next(lora_stream), lora_sh)
            positions['lora'] += 1
            m: dict[str, Any] = {}
            key, k_gen, k_mask = jax.random.split(key, 3)
            if step < control:
                gb = train_loop._place(next(gen_stream), gen_sh)
                positions['generator'] += 1
                gen_params, gen_opt, gm = gen_step(gen_params, gen_opt, trainable, frozen, gb,
                                                   k_gen)
                tokens['generator'] += int(gb['input_ids'].size)
                step_masks = sample(gen_params, k_mask)
                m.update({'gen_loss': gm['loss'], 'gen_task_loss': gm['task_loss'],
                          'sampled_density': gm['density']})
            else:
                step_masks = masks
            trainable, opt_state, lm = llm_step(trainable, opt_state, frozen, step_masks, batch)
            tokens['lora'] += int(batch['input_ids'].size)
            m['loss'] = lm['loss']
            window.append(m)
            jax.block_until_ready(lm['loss'])
            timing['control_s' if step < control else 'freeze_s'] += time.perf_counter() - t0
            done = step + 1
            if done % tcfg.log_every == 0 or done == tcfg.steps:
                host = jax.device_get(window)
                rec = {k: float(np.mean([h[k] for h in host if k in h]))
                       for k in {k for h in host for k in h}}
                if not math.isfinite(rec['loss']):
                    raise FloatingPointError(f'non-finite LoRA loss at step {done}: {rec}')
                rec['phase'] = 'control' if step < control else 'frozen'
                if masks is not None:
                    rec['pruned_lora_norm'] = pruned_lora_norm(trainable, masks, dims)
                log.log('train', done, **rec)
                log.advance(done, loss=rec['loss'])
                window = []
            else:
                log.advance(done)
            if done == control:
                masks = freeze()
            every = run_cfg.checkpoint.every
            if (every and done % every == 0) or done in (control, tcfg.steps):
                save(done)
        if masks is None:
            masks = freeze()
        train_s += time.perf_counter() - t_start
        model = nnx.merge(graphdef, trainable, frozen)
        compact, new_config, counts = atp_export(model, masks)
        export_path = surgery.save_compact(run_dir / 'pruned', compact, new_config, meta={
            'method': 'atp', 'model': str(run_cfg.model.name_or_path), 'steps': tcfg.steps,
            'target_density': pcfg.target_density, 'counts': counts})
        batches = train.eval_batches(splits['validation'], tokenizer, dcfg, task='causal_lm')
        batches = batches[:max_eval_batches] if max_eval_batches else batches

        def masked(lora_aware):
            def apply(b):
                return nnx.merge(graphdef, trainable, frozen)(
                    b['input_ids'], masks=masks, lora_aware=lora_aware)
            return apply

        ev_masked = evaluate_lm(masked(False), batches)
        ev_aware = evaluate_lm(masked(True), batches)
        ev_export = evaluate_lm(
            lambda b: _compact_apply(compact, b['input_ids'], new_config), batches)
        record = {
            'method': 'atp', 'steps': tcfg.steps, 'control_steps': control,
            'target_density': pcfg.target_density,
            'density': counts['kept_by_density'] / counts['prunable'],  # exact integers
            'pruned_lora_norm': pruned_lora_norm(trainable, masks, dims),
            'params': counts, 'export_path': str(export_path), 'tokens': tokens,
            'train_s': train_s, **timing,
            'eval_masked': ev_masked, 'eval_lora_aware': ev_aware, 'eval_export': ev_export,
            'eval_tokens': ev_export['count'],
        }
        log.log('eval', tcfg.steps, **{f'export_{k}': v for k, v in ev_export.items()},
                masked_perplexity=ev_masked['perplexity'],
                lora_aware_perplexity=ev_aware['perplexity'], density=record['density'])
    finally:
        log.close()
        ckpts.close()
    model = nnx.merge(graphdef, trainable, frozen)
    return AtpRun(model=model, gen_params=gen_params, masks=masks, compact=compact,
                  compact_config=new_config, record=record, tokenizer=tokenizer, splits=splits)


def _compact_apply(compact: Any, ids: jax.Array, config: Any) -> jax.Array:
    from jaxprune.surgery import _dims

    return _dims.compact_forward(compact, ids, config=config)


def train_atp(run_cfg: config_lib.RunCfg, *, progress: bool | None = None,
              max_eval_batches: int | None = None) -> dict[str, Any]:
    """Run ATP end to end and return the final record (JSON-safe).

    Per step ``t < control_fraction * train.steps``: a generator step on a held-out batch (LLM
    frozen), then a LoRA-aware LoRA step with a freshly sampled mask followed by the group-lasso
    prox. Then the masks are frozen to :func:`project_masks` (exactly ``prune.target_density``
    of the prunable parameters kept) and LoRA trains on with the frozen masks while the lasso
    strength keeps growing. Finally :func:`atp_export` removes the pruned structures physically.

    Writes ``run_dir/config.yaml``, ``run_dir/metrics.jsonl`` (train events every
    ``train.log_every`` steps with ``loss``, ``gen_loss``, ``sampled_density``,
    ``pruned_lora_norm``), checkpoints under ``cfg.checkpoint_dir`` and the pruned model to
    ``run_dir/pruned`` (``jaxprune.surgery.save_compact``: ``model.safetensors`` +
    ``jaxprune_compact.json``; read it back with ``jaxprune.surgery.load_compact`` and run it
    with ``jaxprune.surgery.compact_forward``).

    **Checkpoints and resume.** A checkpoint holds everything the loop carries: generator params
    and AdamW state, the LoRA factors and their optimizer state (group-lasso state included),
    the frozen masks once the control phase is over (a placeholder before; ``meta['frozen']``
    tells), the PRNG key, and in its JSON meta the step, the positions of both data streams
    (LoRA and generator batches consumed, fed back as ``data.lm_batches(start=...)`` as in the
    generic trainer loop), token counts and timings. It is written every ``checkpoint.every``
    steps (if > 0), at the freeze (the end of the control phase) and at the end. With
    ``checkpoint.resume: true`` (the default) a restarted run restores the latest readable
    checkpoint (``Checkpointer.restore_latest_valid``) and continues; it ends with the same
    LoRA factors, masks and metrics as an uninterrupted run (tested bit-exact on CPU). With
    ``checkpoint.resume: false`` a run directory that holds checkpoints is refused, and so is
    resuming with a changed config (``train.steps`` and the ``prune`` fields shape the
    schedules).

    Args:
      run_cfg: a ``RunCfg`` with ``prune.method: atp`` (see :class:`AtpCfg`).
      progress: rich progress bar (default: when stderr is a terminal).
      max_eval_batches: cap on validation batches (None = the whole split).

    Returns:
      ``{'density', 'params': {'prunable', 'kept', 'kept_by_density', 'total'},
      'export_path', 'eval_masked', 'eval_lora_aware', 'eval_export', 'tokens', 'train_s',
      ...}``; ``eval_export`` is the exported (physically pruned) model's validation metrics
      and ``export_path`` the folder holding it.

    References:
      Lu et al., 2024, *All-in-One Tuning and Structural Pruning for Domain-Specific LLMs*,
      arXiv:2412.14426 (Algorithm 1: alternating generator / LoRA updates, control phase,
      group-lasso on pruned LoRA groups). Deviations: the budget is met exactly by
      :func:`project_masks` at the freeze; generator batches come from held-out *training*
      documents.
    """
    return run_atp(run_cfg, progress=progress, max_eval_batches=max_eval_batches).record


def _register_driver():
    # ATP alternates two optimizers, so `jaxprune train` hands the whole run to `train_atp`.
    from jaxprune import train

    def driver(cfg, *, progress=None):
        return train_atp(cfg, progress=progress)

    train.register_driver('atp')(driver)


_register_driver()
