"""ATP: all-in-one tuning and structural pruning (Lu et al., 2024) as pure step functions.

Training alternates two updates on every batch:

1. **generator step** (LLM frozen): sample hard masks from the generator with Gumbel-sigmoid +
   STE and minimise ``L_task(masked LLM) + lambda * R(density(m), target)`` w.r.t. the generator;
   the LLM runs in evaluation semantics ``((W + s B A) x) * m`` (``lora_aware=False``).
2. **LLM step** (generator frozen): LoRA step with a freshly sampled mask in LoRA-aware mode
   ``(W x) * m + s B A x`` (``lora_aware=True``), so the adapter learns to take over what the mask
   removes, followed by the proximal group lasso (``jaxprune.transforms._group_lasso``) inside
   the LLM optimizer chain, which drives the LoRA factors of pruned channels to zero.

After the *control phase* (a step count the training loop chooses; the loop, outside jit, picks
which jitted step to call) the masks are frozen to :func:`atp_export_masks` and only step 2
continues, with the fixed masks. Once the group lasso
has zeroed the pruned LoRA groups, ``(W x) * m + s B A x == ((W + s B A) x) * m`` on the kept
channels, so the model can be merged and pruned.

**Warm start (optional, a deliberate deviation).** ATP's generator starts uninformed (every
unit kept with probability ``sigmoid(bias)``); in the DISP space even mild random masks wreck a
small pretrained LLM, so the generator first learns from a broken model. :func:`taylor_prior`
scores every unit once by a first-order Taylor criterion on held-out batches and
:func:`warm_start_generator` writes those keep logits into the generator's head biases, so the
first sampled masks are already near a one-shot cut at the budget and the generator refines it.

**Final removal (surgery).** ``jaxprune.surgery.prune`` removes whole heads/KV groups
(``heads``), FFN neurons (``mlp``) and uniform hidden dims (``hidden``). ATP masks map onto it
through :func:`atp_surgery_keep`: ``keep[('mlp', l)] = masks['mlp']`` and a GQA group whose
``attn_ctx`` is entirely zero -> ``keep[('heads', l)]`` false; the remaining masks are returned
sliced to the smaller model (tested: pruned + residual masks == masked logits). The remaining
DISP dimensions (per-layer ``attn_in``/``mlp_in`` input and ``attn_out``/``mlp_out`` output index
sets, ragged value-head dims of ``attn_ctx``) no config can describe: ``jaxprune.surgery.compact``
slices them into a plain pytree of kernels + ``int32`` index arrays (DISP's selection matrices),
run by ``jaxprune.surgery.compact_forward`` and stored by ``jaxprune.surgery.save_compact``;
``jaxprune.methods.atp_export`` chains merge, surgery and this slicing.
:func:`atp_surgery_plan` returns the same keep-index sets as numpy arrays.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprune.masks import _density, _gumbel
from jaxprune.scores import _atp_generator
from jaxprune.transforms import _group_lasso

# loss_fn(trainable, frozen, masks, batch, *, lora_aware) -> (scalar loss)
LossFn = Callable[..., jax.Array]


def generator_loss(
    gen_params: Any,
    trainable: Any,
    frozen: Any,
    batch: Any,
    key: jax.Array,
    *,
    loss_fn: LossFn,
    dims: Sequence[_density.LayerDims],
    target_density: float,
    reg_weight: float,
    temperature: float = _gumbel.DEFAULT_TEMPERATURE,
    bias: float = _gumbel.DEFAULT_BIAS,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    r"""ATP generator objective :math:`L_{task}(m) + \lambda R(P(m), p)` with STE hard masks.

    Returns:
      ``(loss, aux)`` with ``aux = {'task_loss', 'density', 'reg'}``.
    """
    logits = _atp_generator.generator_apply(gen_params)
    masks = _gumbel.sample_masks(logits, key, temperature=temperature, bias=bias)
    task = loss_fn(trainable, frozen, masks, batch, lora_aware=False)
    dens = _density.density(masks, dims)
    reg = _density.log_ratio(dens, target_density)
    return task + reg_weight * reg, {'task_loss': task, 'density': dens, 'reg': reg}


def generator_step(
    gen_params: Any,
    gen_opt_state: optax.OptState,
    trainable: Any,
    frozen: Any,
    batch: Any,
    key: jax.Array,
    *,
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    dims: Sequence[_density.LayerDims],
    target_density: float,
    reg_weight: float = 1.0,
    temperature: float = _gumbel.DEFAULT_TEMPERATURE,
    bias: float = _gumbel.DEFAULT_BIAS,
) -> tuple[Any, optax.OptState, dict[str, jax.Array]]:
    r"""One generator update with the LLM frozen.

    .. math::
        \min_\theta\; L_{task}\big(W, m\big) + \lambda\, R\big(P(m), p\big), \quad
        m = \mathrm{STE}(\mathrm{GumbelSigmoid}(G_\theta)), \quad R(x, y) = \log\frac{\max(x,
        y)}{\min(x, y)}

    Args:
      gen_params: generator parameters (``jaxprune.scores._atp_generator``).
      gen_opt_state: ``tx`` state for ``gen_params``.
      trainable, frozen: the LLM parameters, passed through to ``loss_fn`` (not updated).
      batch: a data batch for ``loss_fn``.
      key: PRNG key for the Gumbel noise.
      loss_fn: ``loss_fn(trainable, frozen, masks, batch, *, lora_aware) -> scalar``, e.g.
        :func:`causal_lm_loss`.
      tx: the generator optimizer (ATP: AdamW).
      dims: per-layer dims (``jaxprune.masks._density.layer_dims(config)``).
      target_density: fraction ``p`` of prunable parameters to keep, in ``(0, 1]``.
      reg_weight: ``lambda``.
      temperature, bias: Gumbel-sigmoid parameters.

    Returns:
      ``(gen_params, gen_opt_state, metrics)``; metrics hold ``loss``, ``task_loss``,
      ``density`` (of the sampled hard mask) and ``reg``.

    Raises:
      ValueError: ``target_density`` outside ``(0, 1]``.

    References:
      Lu et al., 2024 (ATP), arXiv:2412.14426, generator objective L + lambda R(P(d), p).
    """
    if not 0.0 < target_density <= 1.0:
        raise ValueError(f'{target_density=} must be in (0, 1] (fraction of params kept)')
    (loss, aux), grads = jax.value_and_grad(generator_loss, has_aux=True)(
        gen_params, trainable, frozen, batch, key, loss_fn=loss_fn, dims=dims,
        target_density=target_density, reg_weight=reg_weight, temperature=temperature, bias=bias,
    )
    updates, gen_opt_state = tx.update(grads, gen_opt_state, gen_params)
    gen_params = optax.apply_updates(gen_params, updates)
    return gen_params, gen_opt_state, {'loss': loss, **aux}


def llm_step(
    trainable: Any,
    opt_state: optax.OptState,
    frozen: Any,
    masks: Any,
    batch: Any,
    *,
    loss_fn: LossFn,
    tx: optax.GradientTransformationExtraArgs,
) -> tuple[Any, optax.OptState, dict[str, jax.Array]]:
    """One LoRA update in LoRA-aware mode with given (sampled or frozen) masks.

    The masks are treated as constants (``stop_gradient``) and forwarded to ``tx`` as the extra
    arg ``masks=`` so a trailing ``group_lasso`` reads them.

    Args:
      trainable: the trained LLM parameters (LoRA factors).
      opt_state: ``tx`` state.
      frozen: the rest of the LLM parameters.
      masks: masks in the models layout; during the control phase a fresh
        ``sample_masks(generator_apply(gen_params), key)``, afterwards
        :func:`atp_export_masks`.
      batch: data batch.
      loss_fn: as in :func:`generator_step`; called with ``lora_aware=True``.
      tx: the LLM optimizer, e.g. ``optax.chain(optax.adamw(lr), group_lasso(...))``.

    Returns:
      ``(trainable, opt_state, {'loss': scalar})``.

    References:
      Lu et al., 2024 (ATP), arXiv:2412.14426 (LoRA-aware forward, group-lasso proximal update).
    """
    masks = jax.lax.stop_gradient(masks)

    def loss(t):
        return loss_fn(t, frozen, masks, batch, lora_aware=True)

    value, grads = jax.value_and_grad(loss)(trainable)
    tx = optax.with_extra_args_support(tx)
    updates, opt_state = tx.update(grads, opt_state, trainable, masks=masks)
    return optax.apply_updates(trainable, updates), opt_state, {'loss': value}


def atp_lora_tx(
    dims: Sequence[_density.LayerDims],
    *,
    learning_rate: optax.ScalarOrSchedule,
    strength: optax.ScalarOrSchedule,
    weight_decay: float = 0.0,
) -> optax.GradientTransformationExtraArgs:
    """The ATP LoRA optimizer recipe: ``chain(adamw, group_lasso)`` on a Llama LoRA params tree.

    Args:
      dims: per-layer dims of the model (``jaxprune.masks._density.layer_dims(config)``).
      learning_rate: AdamW learning rate; also the prox step size.
      strength: group-lasso ``eta(t)``; ATP ramps it up exponentially, e.g.
        ``optax.exponential_decay(1e-3, 100, 2.0, end_value=1.0)``.
      weight_decay: AdamW decoupled weight decay.

    Returns:
      a transformation whose ``update`` takes ``masks=`` (see :func:`llm_step`).
    """
    return optax.chain(
        optax.adamw(learning_rate, weight_decay=weight_decay),
        _group_lasso.group_lasso(
            _group_lasso.lora_shares_fn(dims), strength=strength, learning_rate=learning_rate
        ),
    )


def sample_step_masks(
    gen_params: Any,
    key: jax.Array,
    *,
    temperature: float = _gumbel.DEFAULT_TEMPERATURE,
    bias: float = _gumbel.DEFAULT_BIAS,
) -> Any:
    """Hard masks sampled from the generator (no gradient), for :func:`llm_step`."""
    logits = jax.lax.stop_gradient(_atp_generator.generator_apply(gen_params))
    return jax.lax.stop_gradient(
        _gumbel.sample_masks(logits, key, temperature=temperature, bias=bias)
    )


def atp_export_masks(gen_params: Any, *, bias: float = _gumbel.DEFAULT_BIAS) -> Any:
    """The generator's deterministic hard masks ``1[logit + bias >= 0]`` in the models layout.

    Returns:
      ``{'layers': ({'attn_in': f32[D], 'attn_ctx': f32[H*hd], 'attn_out': f32[D],
      'mlp_in': f32[D], 'mlp': f32[F], 'mlp_out': f32[D]}, ...)}`` with values in ``{0, 1}``;
      pass as ``model(..., masks=...)``.
    """
    return _gumbel.deterministic_masks(_atp_generator.generator_apply(gen_params), bias=bias)


def unit_weight_scores(params: Any, grads: Any, dims: Sequence[_density.LayerDims]) -> Any:
    r"""Element-wise first-order Taylor scores :math:`\sum |W \odot G|` per DISP unit.

    Every unit sums :math:`|W_{kn} G_{kn}|` over the weights it removes on its own (the same
    slices as ``MaskGroup.params_per_unit``): ``attn_in`` rows of q/k/v, ``attn_ctx`` a row of
    o plus its value column shared by the ``q_per_kv`` query heads of its KV group (amortised
    1/q_per_kv), ``attn_out`` a column of o, ``mlp_in`` rows of gate/up, ``mlp`` a column of
    gate/up and a row of down, ``mlp_out`` a column of down.

    Args:
      params: pure-dict params with ``['layers'][l]['attn'|'mlp'][proj]['kernel']`` ``(K, N)``.
      grads: the same structure (e.g. summed over calibration batches).
      dims: per-layer dims.

    Returns:
      ``{'layers': ({group: f32[size]}, ...)}`` in the masks layout (numpy float64 leaves).
    """
    out = []
    for layer, d in enumerate(dims):
        def s(block, proj, layer=layer):
            w = np.asarray(params['layers'][layer][block][proj]['kernel'], np.float64)
            g = np.asarray(grads['layers'][layer][block][proj]['kernel'], np.float64)
            return np.abs(w * g)

        q, k, v, o = (s('attn', p) for p in ('q_proj', 'k_proj', 'v_proj', 'o_proj'))
        gate, up, down = (s('mlp', p) for p in ('gate_proj', 'up_proj', 'down_proj'))
        v_share = v.sum(0).reshape(d.kv_heads, 1, d.head_dim) / d.q_per_kv
        v_share = np.broadcast_to(v_share, (d.kv_heads, d.q_per_kv, d.head_dim)).reshape(-1)
        out.append({
            'attn_in': q.sum(1) + k.sum(1) + v.sum(1),
            'attn_ctx': o.sum(1) + v_share,
            'attn_out': o.sum(0),
            'mlp_in': gate.sum(1) + up.sum(1),
            'mlp': gate.sum(0) + up.sum(0) + down.sum(1),
            'mlp_out': down.sum(0),
        })
    return {'layers': tuple(out)}


def taylor_prior(
    trainable: Any,
    frozen: Any,
    batches: Sequence[Any],
    *,
    loss_fn: LossFn,
    dims: Sequence[_density.LayerDims],
    groups: Sequence[_atp_generator.MaskGroup],
    target_density: float,
    criterion: str = 'weight',
    cut_groups: Sequence[str] | None = None,
    sharpness: float = 10.0,
    cap: float = 6.0,
) -> Any:
    r"""Keep logits from a one-shot first-order Taylor score of every DISP unit (outside jit).

    The LLM runs in evaluation semantics (``lora_aware=False``, all masks one). The importance
    :math:`I_u` of unit :math:`u`, from the gradients summed over the calibration batches, is

    * ``criterion='weight'`` (LLM-Pruner's element-wise first-order score):
      :math:`I_u = \sum_{w \in u} |w \cdot \sum_b \partial L_b / \partial w|` over the frozen
      kernel weights the unit removes (:func:`unit_weight_scores`);
    * ``criterion='mask'``: :math:`I_u = |\sum_b \partial L_b / \partial m_u|`, the first-order
      loss change of zeroing the unit's mask (cheaper, but signed terms cancel).

    Then, per parameter and relative to the budget cut,

    .. math::
        d_u = \frac{I_u}{n_u}, \qquad
        \ell_u = \mathrm{clip}\big(s\,(\log d_u - \log \theta),\; -c,\; c\big)

    where :math:`n_u` is the unit's marginal parameter count (``MaskGroup.params_per_unit``),
    units of groups outside ``cut_groups`` count as infinitely important (logit :math:`c`), and
    :math:`\theta` sits halfway (in log space) between the last unit kept and the first unit
    dropped by :func:`jaxprune.methods._atp_train.project_masks` ranking by :math:`d_u` at the
    exact ``target_density`` budget. So ``project_masks(prior)`` is that one-shot cut, and the
    Gumbel-sigmoid keep probability :math:`\sigma(\ell_u)` is near 1 for units far above the
    cut, near 0 far below it and 1/2 at the cut.

    Args:
      trainable, frozen: the LLM split as for ``loss_fn`` (for ``'weight'``, ``frozen`` holds
        the projection kernels, as with LoRA; adapters are assumed not yet trained).
      batches: calibration batches (held-out domain data).
      loss_fn: as in :func:`generator_step`; called with ``lora_aware=False``.
      dims: per-layer dims.
      groups: the generator's mask groups (``_atp_generator.mask_groups(config)``), for
        :math:`n_u` and the layout.
      target_density: fraction of prunable parameters kept, in ``(0, 1]``.
      criterion: ``'weight'`` or ``'mask'``.
      cut_groups: the group names the prior may cut (``None`` = all six). On SmolLM2 a cut of
        whole channels, ``('attn_ctx', 'mlp')``, is a far better start than one that also
        removes residual-stream input/output dims, which first-order scores misjudge.
      sharpness: :math:`s` (logit per e-fold of score density). Sampled masks follow the prior
        only when it is sharp: at :math:`s = 2` many units near the cut flip and the sampled
        density falls well below the target.
      cap: :math:`c`, the largest absolute logit.

    Returns:
      logits ``{'layers': ({group: f32[size]}, ...)}`` in the masks layout; the keep logit
      *including* the sampling bias (see :func:`warm_start_generator`).

    Raises:
      ValueError: no batches, an unknown criterion, or ``target_density`` outside ``(0, 1]``.
    """
    from flax import nnx

    from jaxprune.methods import _atp_train  # the budget projection lives with the driver

    if not batches:
        raise ValueError('taylor_prior needs at least one calibration batch (prune.prior_batches)')
    if criterion not in ('weight', 'mask'):
        raise ValueError(f"{criterion=} must be 'weight' or 'mask' (prune.prior_criterion)")
    names = {g.name for g in groups}
    cut = names if cut_groups is None else set(cut_groups)
    if not cut or not cut <= names:
        raise ValueError(f'cut_groups={cut_groups!r} must be a non-empty subset of '
                         f'{sorted(names)} (prune.prior_groups)')
    num_layers = len(dims)
    layout = [{} for _ in range(num_layers)]
    cost = [{} for _ in range(num_layers)]
    for g in groups:
        layout[g.layer][g.name] = jnp.ones((g.size,), jnp.float32)
        cost[g.layer][g.name] = g.params_per_unit
    ones = {'layers': tuple(layout)}

    def loss(masks, train_params, frozen_params, batch):
        return loss_fn(train_params, frozen_params, masks, batch, lora_aware=False)

    # Parameters are arguments, not closed-over constants (which XLA would embed and fold).
    grad = jax.jit(jax.grad(loss, argnums=0 if criterion == 'mask' else 2))
    total = None
    for b in batches:
        g = grad(ones, trainable, frozen, jax.tree.map(jnp.asarray, b))
        total = g if total is None else jax.tree.map(jnp.add, total, g)
    if criterion == 'mask':
        importance = jax.tree.map(lambda x: np.abs(np.asarray(x, np.float64)), total)
    else:
        def pure(x):
            return nnx.to_pure_dict(x) if isinstance(x, nnx.State) else x

        importance = unit_weight_scores(pure(frozen), pure(total), dims)
    log_density = {'layers': tuple(
        {n: (np.log(np.asarray(importance['layers'][layer][n], np.float64) / cost[layer][n]
                    + 1e-30) if n in cut else np.full(lm[n].shape, np.inf)) for n in lm}
        for layer, lm in enumerate(layout))}
    keep = _atp_train.project_masks(log_density, dims, target_density=target_density, bias=0.0)
    flat_ld = np.concatenate([x.ravel() for x in jax.tree.leaves(log_density)])
    flat_keep = np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(keep)]) > 0.5
    finite = np.isfinite(flat_ld)
    flat_ld, flat_keep = flat_ld[finite], flat_keep[finite]
    if not flat_ld.size:
        theta = 0.0
    elif flat_keep.all():
        theta = flat_ld.min() - cap / sharpness
    elif not flat_keep.any():
        theta = flat_ld.max() + cap / sharpness
    else:
        theta = 0.5 * (flat_ld[flat_keep].min() + flat_ld[~flat_keep].max())
    return jax.tree.map(
        lambda x: jnp.asarray(np.clip(sharpness * (x - theta), -cap, cap), jnp.float32),
        log_density)


def warm_start_generator(gen_params: Any, prior: Any, *, bias: float = _gumbel.DEFAULT_BIAS
                         ) -> Any:
    """Shift the generator's head biases so that ``generator_apply(params) + bias == prior``.

    The encoder, embeddings and head kernels are untouched (they keep learning from the
    generator loss); only the per-unit head biases absorb the prior, so at step 0 the sampled
    masks follow the prior (e.g. :func:`taylor_prior`) instead of ATP's uniform keep rate.

    Args:
      gen_params: generator parameters (``_atp_generator.generator_init``).
      prior: keep logits including the sampling bias, in the masks layout.
      bias: the Gumbel-sigmoid bias the run samples with.

    Returns:
      new generator parameters.

    References:
      Deviation from Lu et al., 2024 (ATP), arXiv:2412.14426, whose generator starts from a
      uniform keep prior: here the initial decision is a one-shot Taylor score (cf. AST's "good
      initial mask", and LLM-Pruner's first-order importance).
    """
    logits = _atp_generator.generator_apply(gen_params)
    heads = tuple(
        {name: {**head, 'bias': head['bias'] + prior['layers'][layer][name] - bias
                - logits['layers'][layer][name]}
         for name, head in layer_heads.items()}
        for layer, layer_heads in enumerate(gen_params['heads']))
    return {**gen_params, 'heads': heads}


def atp_surgery_plan(
    masks: Any, dims: Sequence[_density.LayerDims]
) -> tuple[dict[str, np.ndarray], ...]:
    """Kept index sets per layer implied by hard ATP masks (outside jit; numpy out).

    Returns:
      per layer ``{'attn_in', 'attn_out', 'mlp_in', 'mlp_out': int[kept D-dims],
      'kv_groups': int[kept KV groups], 'v_cols': int[kept v_proj columns],
      'o_rows': int[kept o_proj rows], 'mlp': int[kept neurons]}``.
    """
    def idx(v):
        return np.flatnonzero(np.asarray(v) > 0.5)

    plan = []
    for layer_masks, d in zip(masks['layers'], dims, strict=True):
        keep = _density.linear_keep(layer_masks, d)
        plan.append({
            'attn_in': idx(keep['q_proj'][0]),
            'attn_out': idx(keep['o_proj'][1]),
            'mlp_in': idx(keep['gate_proj'][0]),
            'mlp_out': idx(keep['down_proj'][1]),
            'kv_groups': idx(keep['k_proj'][1][:: d.head_dim]),
            'v_cols': idx(keep['v_proj'][1]),
            'o_rows': idx(keep['o_proj'][0]),
            'mlp': idx(keep['gate_proj'][1]),
        })
    return tuple(plan)


def atp_surgery_keep(
    masks: Any, dims: Sequence[_density.LayerDims]
) -> tuple[dict[tuple[str, int], np.ndarray], Any]:
    """The part of hard ATP masks that ``jaxprune.surgery`` can remove today, and the rest.

    Whole GQA groups whose ``attn_ctx`` is entirely zero map to ``('heads', l)`` and pruned FFN
    neurons to ``('mlp', l)``. The remaining DISP dims stay masks, sliced to the smaller model:
    ``prune_model(model, keep)`` then ``new_model(x, masks=residual)`` equals
    ``model(x, masks=masks)``. A layer with no kept group/neuron keeps unit 0 (surgery keeps one
    zeroed unit), and its residual mask is zero there.

    Args:
      masks: hard masks ``{'layers': (...)}`` (e.g. :func:`atp_export_masks`); outside jit.
      dims: per-layer dims of the model the masks belong to.

    Returns:
      ``(keep, residual)``: ``{('heads', l): bool[KV_l], ('mlp', l): bool[F_l]}`` for
      ``jaxprune.surgery.prune``/``prune_model`` and residual masks for the pruned model.
    """
    keep, residual = {}, []
    for layer, (m, d) in enumerate(zip(masks['layers'], dims, strict=True)):
        lora = m.get('lora')
        m = {k: np.asarray(v, np.float32) for k, v in m.items() if k != 'lora'}
        ctx = m.get('attn_ctx', np.ones(d.heads * d.head_dim, np.float32))
        ctx = ctx.reshape(d.kv_heads, d.q_per_kv * d.head_dim)
        heads = ctx.max(axis=1) > 0.5
        mlp = m.get('mlp', np.ones(d.mlp, np.float32)) > 0.5
        for name, k in (('heads', heads), ('mlp', mlp)):
            k = k.copy()
            if not k.any():
                k[0] = True
            keep[(name, layer)] = k
        out = dict(m)
        out['attn_ctx'] = ctx[keep[('heads', layer)]].reshape(-1)
        out['mlp'] = m.get('mlp', np.ones(d.mlp, np.float32))[keep[('mlp', layer)]]
        out = {k: jnp.asarray(v) for k, v in out.items()}
        if lora is not None:  # rank masks are unaffected by head/neuron removal
            out['lora'] = lora
        residual.append(out)
    return keep, {'layers': tuple(residual)}


def causal_lm_loss(graphdef: Any) -> LossFn:
    """A ``loss_fn`` for a ``jaxprune.models`` causal LM split as ``(graphdef, trainable,
    frozen)`` with ``nnx.split(model, trainable_filter, ...)``.

    The returned ``loss_fn(trainable, frozen, masks, batch, *, lora_aware)`` merges the model and
    returns the mean next-token cross-entropy of ``batch['input_ids']`` against
    ``batch['labels']`` (already aligned: position ``t`` predicts ``labels[t]``; entries ``< 0``
    are ignored).
    """
    from flax import nnx  # models are NNX; the rest of this module is not.

    def loss_fn(trainable, frozen, masks, batch, *, lora_aware):
        model = nnx.merge(graphdef, trainable, frozen)
        logits = model(batch['input_ids'], batch.get('attention_mask'), masks=masks,
                       lora_aware=lora_aware)
        labels = batch['labels']
        valid = labels >= 0
        ce = optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), jnp.where(valid, labels, 0)
        )
        return jnp.sum(ce * valid) / jnp.maximum(jnp.sum(valid), 1)

    return loss_fn
