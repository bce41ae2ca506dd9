"""APT recipe: adaptive structured pruning + adaptive LoRA tuning + self-distillation.

The recipe is an ``optax.chain`` of public pieces (swap any of them)::

    apt_masks(structures, shapes, density_schedule=stepwise_density(...), pruning_steps=...)
    optax.adamw(learning_rate)                  # over the trainable (LoRA + projection) params

Training-loop integration (what ``jaxprune.train`` runs; pruning steps are outside jit):

1. Each step (inside one jitted function): zero taps ``make_taps(config, B, T)``; masks for the
   forward ``to_model_masks(state.masks, ...)`` plus LoRA rank masks; one
   ``jax.value_and_grad`` over ``(trainable params, taps)`` of
   ``loss = mu * L_distill + (1 - mu) * L_task`` (:func:`apt_loss`), giving the LoRA gradients
   and dL/dH at once (:func:`value_grads_and_salience`); then
   ``tx.update(grads, opt_state, params, salience=salience)``.
   LoRA rank salience (``lora._grow.rank_salience``) is EMA'd (0.85) from the same gradients.
2. When ``opt_state``'s count hits a pruning step (``schedules._apt.pruning_steps``; at most 10
   per run), outside jit: masks are already hard; :func:`after_pruning_step` removes dead units
   from params, optimizer state and mask state (``jaxprune.surgery``), LoRA ranks grow for the
   top half of adapters (``lora._grow.grow_ranks`` with ``growth_factor`` towards
   ``schedules._apt.tuning_growth``), the teacher's LoRA snapshot is refreshed
   (:func:`teacher_snapshot`), the transform is rebuilt for the new structures and the step
   function is re-jitted. Shapes change only there, so there are at most ``num_pruning_steps +
   1`` compilations (a rank-bucket resize adds one more when ranks outgrow the bucket).
3. After the last pruning step training continues (recovery) with ``mu`` held at its final value.

Self-distillation, two teachers (``prune.teacher``). ``'snapshot'``: the *same frozen backbone*
(shared, so no copy) with a snapshot of the student's LoRA factors taken at the last pruning
step, run without masks; it differs from the student only in the adapters and in what the
student's soft masks are removing, and equals the student right after each pruning step.
``'dense'``: the unpruned frozen backbone (one more copy, in the optimizer state) with the
student's trainable params as of the start of the pruning window, never pruned. The
distillation loss is the temperature KL of the logits plus the layer-wise hidden MSE through a
trainable ``[D_student, D_teacher]`` projection per layer pair (identity init), reusing
``jaxprune.methods._distill``.

Salience (``salience=`` of :func:`value_grads_and_salience`, ``prune.salience``): ``'apt'`` is
the paper's ``sum|H| * sum|dL/dH|`` per channel; ``'fisher'`` (not in the paper) is the
per-example mask Fisher ``sum_b (dL_b/dm_u)^2`` (Kwon et al., NeurIPS 2022), from the
multiplicative taps of :func:`fisher_taps` in the same backward pass. Everything downstream
(EMA, salience density, budget search, soft masks) is the same for both.

Deliberate deviations from the reference code: masks live in the optimizer state; by default
the teacher is refreshed at pruning steps rather than when the validation metric improves (the
training loop's ``prune.teacher_refresh=eval`` does the latter; the snapshot shares the pruned
backbone either way);
layer ``l`` of the student is paired with layer ``l`` of the teacher (the models return every
block's output with ``output_hidden_states=True``) instead of the dynamic layer matching.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprune.methods import _distill
from jaxprune.schedules import _apt as apt_schedules
from jaxprune.scores import _apt as apt_scores
from jaxprune.transforms import _apt_masks

Key = tuple[str, int | None]
SALIENCE = apt_scores.SALIENCE  # structure scores the masks rank by (value_grads_and_salience)


def apt(
    learning_rate: optax.ScalarOrSchedule,
    *,
    structures: Sequence[Any],
    shapes_or_params: Any,
    target_density: float,
    total_steps: int,
    num_pruning_steps: int = 10,
    end_fraction: float = 0.7,
    beta: float = 0.85,
    step_size: float = 0.01,
    weight_decay: float = 0.0,
    pruning_steps: Sequence[int] | None = None,
    budget_base: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    """The APT optimizer: ``chain(apt_masks, adamw)``.

    Args:
      learning_rate: AdamW learning rate (schedule allowed).
      structures: current structures (``jaxprune.models.structures(config, lora=...)``).
      shapes_or_params: the full params (or their shapes) of the same config.
      target_density: final fraction of prunable parameters (APT: 0.4 for encoders such as
        BERT/RoBERTa, 0.7 for decoders such as LLaMA).
      total_steps: optimizer steps of the run (for the default pruning cadence).
      num_pruning_steps: pruning steps (APT: 10).
      end_fraction: fraction of training at which the last pruning step happens.
      beta: salience EMA decay.
      step_size: soft-mask step per update.
      weight_decay: AdamW weight decay.
      pruning_steps: explicit pruning steps (overrides the cadence arguments). Keep them
        identical when rebuilding after a pruning step.
      budget_base: prunable parameter count of the *original* model
        (``jaxprune.masks._budget.total_prunable_params``); required when rebuilding after
        surgery so that ``target_density`` stays relative to the original model.

    Returns:
      ``optax.GradientTransformationExtraArgs``; ``update(..., salience=...)``.

    Example:
      The soft masks (one per structure, all 1 at the start) live in the optimizer state:

      >>> import optax
      >>> from flax import nnx
      >>> from jaxprune import models
      >>> config = models.LlamaConfig.tiny()
      >>> params = nnx.to_pure_dict(nnx.state(models.Llama(config, rngs=nnx.Rngs(0)), nnx.Param))
      >>> tx = apt(1e-3, structures=models.structures(config), shapes_or_params=params,
      ...          target_density=0.5, total_steps=100)
      >>> masks = optax.tree.get(tx.init(params), 'masks')
      >>> {key: mask.tolist() for key, mask in masks.items() if key[0] == 'heads'}
      {('heads', 0): [1.0, 1.0], ('heads', 1): [1.0, 1.0]}
      >>> masks[('mlp', 0)].shape, masks[('hidden', None)].shape
      ((64,), (32,))

      In training, ``params`` are the trainable ones (LoRA factors), ``update`` gets
      ``salience=`` from :func:`value_grads_and_salience`, and the loop runs
      :func:`after_pruning_step` at the pruning steps.

    References:
      Zhao, Hajishirzi, Cao, *APT: Adaptive Pruning and Tuning Pretrained Language Models for
      Efficient Training and Inference*, ICML 2024, Sec. 4 and Alg. 1.
    """
    if not 0.0 < target_density <= 1.0:
        raise ValueError(f'{target_density=} must be in (0, 1]; APT uses 0.4 (BERT) or 0.7 (LLaMA)')
    if pruning_steps is None:
        pruning_steps = apt_schedules.pruning_steps(
            total_steps, num_pruning_steps=num_pruning_steps, end_fraction=end_fraction
        )
    density = apt_schedules.stepwise_density(target_density, tuple(pruning_steps))
    return optax.chain(
        _apt_masks.apt_masks(
            structures,
            shapes_or_params,
            density_schedule=density,
            pruning_steps=pruning_steps,
            beta=beta,
            step_size=step_size,
            budget_base=budget_base,
        ),
        optax.adamw(learning_rate, weight_decay=weight_decay),
    )


def value_grads_and_salience(
    loss_fn: Callable[[Any, Any], tuple[jax.Array, tuple[Any, Any]]],
    params: Any,
    taps: Any,
    structures: Sequence[Any],
    *,
    outlier_params: Any = None,
    salience: str = 'apt',
) -> tuple[jax.Array, Any, dict[Key, jax.Array], Any]:
    """Loss, parameter gradients and structure salience from one forward/backward pass.

    Args:
      loss_fn: ``(params, taps) -> (loss, (acts, aux))`` where ``acts`` is what the model returns
        alongside its output when given ``taps``.
      params: the differentiated (trainable) params.
      taps: zero taps (``jaxprune.models._llama.make_taps``; :func:`fisher_taps` for
        ``salience='fisher'``, which ``loss_fn`` applies with :func:`tapped_masks`).
      structures: the model's structures.
      outlier_params: full params for the decoder outlier term (``None`` = no outlier term;
        APT salience only).
      salience: ``'apt'`` (the paper's score, ``scores.apt_salience``) or ``'fisher'`` (the
        per-example mask Fisher, ``scores.fisher_from_taps``).

    Returns:
      ``(loss, grads, salience, aux)``.
    """
    if salience not in SALIENCE:
        raise ValueError(f'{salience=} must be one of {SALIENCE}')
    if salience == 'fisher' and outlier_params is not None:
        raise ValueError('the outlier term adds to the APT salience only; '
                         "pass outlier_params=None with salience='fisher'")
    (loss, (acts, aux)), (grads, tap_grads) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True
    )(params, taps)
    if salience == 'fisher':
        return loss, grads, apt_scores.fisher_from_taps(tap_grads, structures), aux
    salience = apt_scores.apt_salience(
        acts,
        tap_grads,
        structures,
        params=outlier_params,
        outlier=outlier_params is not None,
    )
    return loss, grads, salience, aux


def salience_taps(config: Any, batch: int, seq: int, *, salience: str = 'apt',
                  dtype: Any = jnp.float32) -> Any:
    """Zero taps for :func:`value_grads_and_salience` with the same ``salience=``.

    ``'apt'``: the additive per-token taps of ``jaxprune.models.make_taps``; ``'fisher'``: the
    per-example mask taps of :func:`fisher_taps` (apply them with :func:`tapped_masks`).
    """
    if salience not in SALIENCE:
        raise ValueError(f'{salience=} must be one of {SALIENCE}')
    if salience == 'fisher':
        return fisher_taps(config, batch, seq, dtype)
    from jaxprune.models import _llama

    return _llama.make_taps(config, batch, seq, dtype=dtype)


def fisher_taps(config: Any, batch: int, seq: int, dtype: Any = jnp.float32) -> dict[str, Any]:
    """Zero per-example mask taps for ``salience='fisher'`` (:func:`value_grads_and_salience`).

    ``{'layers': ({'attn_ctx_mask': [B, 1, H*hd], 'mlp_mask': [B, 1, F]}, ...),
    'hidden_mask': [B, 1, D]}``. The layer taps scale the head / neuron channels by ``1 + tap``
    inside the model (``model(..., taps=taps['layers'])``); the hidden tap scales the hidden mask
    itself (:func:`tapped_masks`), so its gradient covers every place the mask enters.
    """
    from jaxprune.models import _llama

    return {
        'layers': _llama.make_taps(config, batch, seq, sites=(), mask_sites=('attn_ctx', 'mlp'),
                                   dtype=dtype),
        'hidden_mask': jnp.zeros((batch, 1, config.hidden_size), dtype),
    }


def tapped_masks(masks: Any, taps: Any) -> tuple[Any, Any]:
    """``(model_masks, layer_taps)`` for a forward with :func:`fisher_taps` (or plain) taps.

    With fisher taps the hidden mask becomes per example, ``masks['hidden'] * (1 + tap)``
    (``[B, 1, D]``; all ones when ``masks`` has none), and the layer taps are
    ``taps['layers']``; plain per-layer taps pass through unchanged.
    """
    if not isinstance(taps, Mapping):
        return masks, taps
    masks = dict(masks or {})
    hidden = masks.get('hidden')
    one = 1 + taps['hidden_mask']
    masks['hidden'] = one if hidden is None else hidden.astype(one.dtype) * one
    return masks, taps['layers']


def apt_loss(
    task_loss: jax.Array,
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    *,
    mu: jax.typing.ArrayLike,
    temperature: float = 2.0,
    student_hiddens: Sequence[jax.Array] | None = None,
    teacher_hiddens: Sequence[jax.Array] | None = None,
    projections: Sequence[Any] | None = None,
    mask: jax.Array | None = None,
    hidden_mask: jax.Array | None = None,
    hidden_weight: float = 1.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    r"""APT's self-distillation objective :math:`\mu L_\mathrm{dist} + (1 - \mu) L_\mathrm{task}`.

    :math:`L_\mathrm{distill} = \mathrm{KL}_T(\text{teacher} \| \text{student})` plus, when hidden
    states are given, ``hidden_weight`` times the layer-wise MSE through the trainable
    ``projections`` (``_distill.hidden_mse``). ``mu`` follows ``schedules._apt.distill_weight``.
    ``mask`` selects the positions of the logits (``[B]`` for classification), ``hidden_mask``
    the token positions of the hidden states (``[B, T]``, e.g. the attention mask; ``None`` =
    ``mask``).

    Returns:
      ``(loss, {'task', 'kl', 'hidden', 'distill'})``.

    References:
      Zhao et al., ICML 2024, Sec. 4.4 (Eq. 7, self-knowledge distillation).
    """
    teacher_logits = jax.lax.stop_gradient(teacher_logits)
    kl = _distill.kl_distill(student_logits, teacher_logits, temperature=temperature, mask=mask)
    hidden = jnp.zeros((), jnp.float32)
    if student_hiddens is not None:
        if teacher_hiddens is None:
            raise ValueError('student_hiddens needs teacher_hiddens=...; pass both or neither')
        teacher_hiddens = [jax.lax.stop_gradient(h) for h in teacher_hiddens]
        hidden = _distill.hidden_mse(
            student_hiddens, teacher_hiddens, projections,
            mask=mask if hidden_mask is None else hidden_mask,
        )
    distill = kl + hidden_weight * hidden
    loss = mu * distill + (1.0 - mu) * task_loss
    return loss, {'task': task_loss, 'kl': kl, 'hidden': hidden, 'distill': distill}


def init_projections(num_pairs: int, hidden_size: int, dtype: Any = jnp.float32, *,
                     teacher_size: int | None = None) -> list[dict]:
    """Identity-initialised ``[D, D_teacher]`` projections for the layer-wise distillation MSE.

    ``teacher_size`` (default ``hidden_size``) is the teacher's hidden size, larger than the
    student's for an unpruned teacher after hidden dims were pruned.
    """
    d_t = hidden_size if teacher_size is None else teacher_size
    return [{'kernel': jnp.eye(hidden_size, d_t, dtype=dtype)} for _ in range(num_pairs)]


def prune_projections(projections: Any, hidden_keep: Any, *, teacher_side: bool = True) -> Any:
    """Drop pruned hidden dims from the projections (after surgery).

    ``projections`` is any pytree whose leaves end in ``[..., D_student, D_teacher]`` (a list of
    ``{'kernel': [D, D]}``, a stacked ``[L, D, D]`` kernel, or Adam moments of either); leaves
    of other shapes (counts) are returned unchanged. The student side (axis -2) always loses the
    pruned dims; the teacher side (axis -1) too when ``teacher_side`` (a teacher that shares the
    pruned backbone), not for a teacher that keeps the unpruned one.
    """
    keep = np.asarray(hidden_keep, bool)
    idx = jnp.asarray(np.flatnonzero(keep))
    d = keep.shape[0]

    def fn(x):
        if jnp.ndim(x) >= 2 and x.shape[-2] == d and (x.shape[-1] == d or not teacher_side):
            x = jnp.take(x, idx, axis=-2)
            return jnp.take(x, idx, axis=-1) if teacher_side else x
        return x

    return jax.tree.map(fn, projections)


def teacher_snapshot(params: Any) -> Any:
    """A frozen copy of the LoRA factors in ``params`` (other leaves are dropped to ``None``).

    Combine with the (shared, frozen) backbone for the teacher forward:
    ``jax.tree.map(lambda s, b: b if s is None else s, snapshot, params, is_leaf=...)``; see
    :func:`teacher_params`.
    """

    def fn(path, x):
        name = getattr(path[-1], 'key', getattr(path[-1], 'name', None))
        return jnp.array(x, copy=True) if name in ('lora_a', 'lora_b') else None

    return jax.tree_util.tree_map_with_path(fn, params)


def teacher_params(params: Any, snapshot: Any) -> Any:
    """Student params with the LoRA factors replaced by ``snapshot`` (backbone shared)."""
    return jax.tree.map(
        lambda s, p: p if s is None else s, snapshot, params, is_leaf=lambda x: x is None
    )


def after_pruning_step(
    config: Any,
    params: Any,
    opt_state: Any,
    structures: Sequence[Any],
) -> tuple[Any, Any, Any, dict[Key, np.ndarray]]:
    """Outside jit: physically remove the units dropped at the pruning step just taken.

    Reads the hard masks from ``opt_state`` (``optax.tree.get(opt_state, 'masks')``), prunes
    ``params`` and every params-shaped subtree of ``opt_state`` (Adam moments), and the
    unit-layout mask state. Rebuild the transform (:func:`apt`) with
    ``jaxprune.models.structures(new_config, lora=...)`` afterwards and re-jit the step.

    Args:
      config: current model config.
      params: full pure-dict params.
      opt_state: state of :func:`apt` (or any chain containing ``apt_masks``).
      structures: structures of the current (unpruned) config.

    Returns:
      ``(new_config, new_params, new_opt_state, keep)``; prune further params-shaped pytrees
      (EMAs, a teacher snapshot) with ``surgery.prune_like(tree, keep, structures)``.
    """
    from jaxprune import surgery
    from jaxprune.masks import _budget

    masks = optax.tree.get(opt_state, 'masks')
    keep = {k: np.asarray(v) > 0 for k, v in masks.items()}
    shapes = _budget.param_shapes(params)
    new_config, new_params = surgery.prune(config, params, keep, structures=structures)
    new_state = surgery.prune_like(opt_state, keep, structures, shapes)
    new_state = surgery.prune_units(new_state, keep, structures)
    return new_config, new_params, new_state, keep
