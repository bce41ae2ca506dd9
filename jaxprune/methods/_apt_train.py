"""APT in the training loop: ``prune.method: apt`` (train Method, compaction, distillation).

What one run does (``jaxprune train configs/apt_minilm_rotten_tomatoes.yaml``):

* every step, inside one jitted function: zero taps at every layer, one ``value_and_grad`` over
  ``(trainable, taps)`` of :math:`\\mu L_\\mathrm{distill} + (1-\\mu) L_\\mathrm{task}`, giving the
  LoRA gradients and APT salience together; ``tx.update(..., salience=...)`` moves the soft masks
  (``transforms._apt_masks``), and the LoRA rank salience EMA is updated from the same gradients;
* at each pruning step (outside jit, :meth:`AptMethod.on_step_end`): masks are already hard;
  heads, neurons and hidden dims are removed physically from params, Adam moments, mask state,
  salience EMAs and the teacher snapshot (``jaxprune.surgery``), LoRA ranks grow for the most
  salient half of the adapters (``jaxprune.lora._grow``), the teacher snapshot is refreshed and
  the loop re-jits (``num_pruning_steps`` recompiles, plus none otherwise). The masked and the
  compacted model are compared on a probe batch and the max |diff| is logged. With
  ``prune.compact_every=k`` only every k-th pruning step, the last, and any step whose LoRA
  growth doubles the adapters' physical rank (it re-jits anyway) compact; the others harden the
  masks and grow ranks at unchanged shapes (no re-jit; the growth counts the adapters' live dims,
  as a compacting step would), the dead units staying masked until the next compaction removes
  everything dead so far.

State. Everything the jitted step needs lives in the optimizer state under the single field
``masks`` (``{'units', 'rank', 'teacher', 'mu'}`` plus ``'hidden_proj'``/``'hidden_proj_opt'``
when the hidden distillation is on, ``'teacher_rank'``/``'teacher_rest'`` for the dense
teacher), so the loop's ``prepare``/``value_and_grad``
hooks (which receive ``masks``) see the LoRA rank masks, the teacher snapshot and ``mu``, and all
of it is checkpointed with the optimizer state.

Resumption. Every checkpoint's ``meta['method']`` (:meth:`AptMethod.checkpoint_meta`) records the
surgeries done so far (pruning count, keep vectors as packed bits, LoRA bucket after the step),
the growth budget's reference and the settings that decide shapes (``RESUME_FIELDS``). On resume
:meth:`AptMethod.restore` replays those surgeries on the frozen backbone rebuilt from
``model.name_or_path`` (gathers, so bit-exact), rebuilds the model at the pruned shapes and hands
the loop an abstract trainable of those shapes; params, Adam moments, masks, EMAs and the teacher
then come from the checkpoint. A changed shape-deciding setting is an error naming the field.

Deliberate deviations from the paper / reference code:

* Self-distillation: :math:`L_\\mathrm{distill}` = logit KL + ``hidden_weight`` x the layer-wise
  hidden MSE (every block's output, ``output_hidden_states=True``) through one trainable
  ``[D, D]`` projection per layer (identity init, own Adam on the run's schedule, kept in the
  ``masks`` state as ``hidden_proj`` and sliced when hidden dims are pruned). Layer ``l`` of the
  student is paired with layer ``l`` of the teacher (structured pruning removes no layers), not
  by the reference code's dynamic layer matching. For causal LMs the hidden term is off unless
  ``hidden_weight`` is set: their residual streams carry massive activations (mean square ~5e3
  on SmolLM2-135M), so the raw MSE swamps the task loss (measured: gradient norm 15x).
* The teacher (``prune.teacher``): ``snapshot`` = the current (compacted) frozen backbone
  without masks plus a snapshot of the trainable parameters, taken by default at the last
  pruning step (``prune.teacher_refresh=pruning``, see the ``methods._apt`` module docstring) or,
  as in the paper, whenever the validation metric improves (``teacher_refresh=eval``, with
  ``train.eval_every``; the loop's ``on_eval`` hook; the snapshot is then pruned and rank-resized
  with the student at pruning steps, its not-yet-active LoRA ranks zeroed so growth leaves its
  function alone); ``dense`` = the unpruned frozen backbone plus the
  trainable parameters as of the window start, fixed for the run (not refreshed on eval
  improvement as in the paper: after surgery the student cannot be copied into it). The dense
  backbone lives in the ``masks`` state as ``teacher_rest`` (checkpointed; laid out on a mesh
  like the frozen backbone, ``sharding.opt_state_shardings(..., rest_shardings=)``).
* The density budget counts encoder/decoder block parameters (embeddings and the LM head are left
  out, ``count_embeddings=False``), so ``target_density`` is the fraction of block parameters.
* The soft-mask step defaults to ``1 / (steps between pruning steps)`` so a mask can travel from 1
  to 0 between two pruning steps (the paper's 0.01 assumes thousands of steps).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import pathlib
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxprune import config as config_lib
from jaxprune import train as train_lib
from jaxprune.lora import _grow
from jaxprune.masks import _budget, _structured
from jaxprune.methods import _apt, _apt_arch, _apt_cfg
from jaxprune.schedules import _apt as apt_schedules
from jaxprune.scores import _apt as apt_scores
from jaxprune.transforms import _apt_masks, _average

logger = logging.getLogger(__name__)

AptCfg = _apt_cfg.AptCfg

Key = tuple[str, int | None]
# Settings that decide when and how much is pruned and how the LoRA bucket grows, i.e. the shapes
# of the state at a given step: a resumed run must use the checkpoint's values.
RESUME_FIELDS = (
    'model.name_or_path', 'train.steps', 'lora.rank', 'lora.targets', 'prune.target_density',
    'prune.num_pruning_steps', 'prune.prune_start_fraction', 'prune.prune_end_fraction',
    'prune.init_rank', 'prune.max_rank', 'prune.tuning_growth', 'prune.compaction',
    'prune.compact_every',
    'prune.count_embeddings', 'prune.distill', 'prune.hidden_weight', 'prune.teacher',
    'prune.min_keep_fraction',
)
TEACHER_KEYS = ('teacher', 'teacher_rank', 'teacher_rest')


class AptTrainState(NamedTuple):
    """Optimizer-state piece of :class:`AptMethod` (the chain's ``masks`` owner).

    Attributes:
      prune_count: ``i32[]`` updates applied (pruning steps compare against it).
      masks: ``{'units': {(kind, layer): f32[size]}, 'rank': {module_path: f32[R]},
        'teacher': trainable-shaped snapshot, 'mu': f32[]}``; plus ``'hidden_proj'`` and
        ``'hidden_proj_opt'`` (layer-wise distillation) and, for the dense teacher,
        ``'teacher_rank'`` (its LoRA rank masks) and ``'teacher_rest'`` (its frozen backbone).
      alive: ``{(kind, layer): bool[size]}`` units not yet hard-pruned.
      salience_ema: ``{(kind, layer): f32[size]}`` EMA of the APT salience.
      rank_ema: ``{module_path: f32[R]}`` EMA of the LoRA rank salience.
    """

    prune_count: jax.Array
    masks: dict[str, Any]
    alive: dict[Key, jax.Array]
    salience_ema: dict[Key, jax.Array]
    rank_ema: dict[tuple[Any, ...], jax.Array]


def _proj_adam_init(proj: Any) -> dict[str, Any]:
    """Adam state of the distillation projections under neutral names.

    Optax's own state names (``mu``, ``nu``, ``count``) would make ``optax.tree.get`` lookups
    of the run's AdamW state ambiguous, so the moments are stored as ``m``/``v``/``step``.
    """
    zeros = jax.tree.map(jnp.zeros_like, proj)
    return {'step': jnp.zeros((), jnp.int32), 'm': zeros, 'v': jax.tree.map(jnp.copy, zeros)}


def _proj_adam_step(train_cfg: Any, grads: Any, proj: Any, state: dict[str, Any]
                    ) -> tuple[Any, dict[str, Any]]:
    """One Adam step of the projections on the run's learning-rate schedule (no decay)."""
    adam = optax.scale_by_adam(b1=train_cfg.b1, b2=train_cfg.b2)
    st = optax.ScaleByAdamState(count=state['step'], mu=state['m'], nu=state['v'])
    direction, st = adam.update(grads, st)
    lr = train_cfg.build_schedule()(state['step'])
    proj = jax.tree.map(lambda p, d: p - lr * d, proj, direction)
    return proj, {'step': st.count, 'm': st.mu, 'v': st.nu}


def _pure(tree: Any) -> Any:
    return nnx.to_pure_dict(tree) if isinstance(tree, nnx.State) else tree


class AptMethod:
    """The APT ``train.Method`` (see the module docstring).

    Host-side fields change only at pruning steps (outside jit): the current architecture,
    structures and the ``apt_masks`` transform the optimizer delegates to. The loop re-jits after
    each compaction because the graphdef changes, and the re-trace picks up the new transform.
    """

    def __init__(self, cfg: AptCfg, *, run_cfg: config_lib.RunCfg):
        from jaxprune import models

        self.cfg, self.run_cfg = cfg, run_cfg
        self.task = run_cfg.model.task
        self.arch = self.initial_arch = _apt_arch.arch_config(run_cfg)
        self.lora = run_cfg.lora.build()
        self.outlier = (cfg.outlier if cfg.outlier is not None
                        else self.task == 'causal_lm' and cfg.salience == 'apt')
        self.steps = apt_schedules.pruning_steps(
            run_cfg.train.steps,
            num_pruning_steps=cfg.num_pruning_steps,
            start_fraction=cfg.prune_start_fraction,
            end_fraction=cfg.prune_end_fraction,
        )
        interval = max(1, min(b - a for a, b in zip((0,) + self.steps, self.steps)))
        self.step_size = cfg.mask_step_size or 1.0 / interval
        self.init_rank = min(cfg.init_rank or run_cfg.lora.rank, run_cfg.lora.rank)
        self.mu = apt_schedules.distill_weight(self.steps, final=cfg.distill_weight)
        # Layer-wise distillation: one [D, D] projection per layer (identity init), trained by its
        # own Adam on the run's learning-rate schedule; it lives in the ``masks`` state.
        self.hidden_weight = (cfg.hidden_weight if cfg.hidden_weight is not None
                              else 0.0 if self.task == 'causal_lm' else 1.0)
        self.hidden = cfg.distill and self.hidden_weight > 0
        # The dense teacher (prune.teacher=dense): its graphdef and frozen backbone are taken
        # from the unpruned model in ``prepare_model``; its trainable params follow the student
        # until the pruning window opens (``distill_start``) and are frozen from then on.
        self.dense_teacher = cfg.distill and cfg.teacher == 'dense'
        # prune.teacher_refresh=eval: the snapshot follows the best validation metric so far.
        self.eval_refresh = cfg.distill and cfg.teacher_refresh == 'eval'
        if self.eval_refresh and not run_cfg.train.eval_every:
            raise ValueError(
                'prune.teacher_refresh=eval refreshes the teacher when the validation metric '
                'improves, but train.eval_every=0 never evaluates during training; set '
                'train.eval_every (e.g. 50) or prune.teacher_refresh=pruning')
        self.best_eval: float | None = None  # the best validation score so far (eval refresh)
        self.distill_begin = apt_schedules.distill_start(self.steps)
        self.teacher_graphdef = None
        self._teacher_trainable = self._teacher_rest = None  # abstract
        self._teacher_rest_values = None  # the unpruned backbone, until copied into the state
        self.min_keep = None
        if cfg.min_keep_fraction:  # absolute counts of the unpruned model, fixed for the run
            self.min_keep = {
                apt_scores.structure_key(s): math.ceil(cfg.min_keep_fraction * s.size)
                for s in models.structures(self.arch)
            }
        self._set_arch(self.arch, rank=run_cfg.lora.rank)
        self.budget_base = _budget.total_prunable_params(self.budget_structures, self.shapes)
        self.initial_params = models.param_count(self.arch)
        self.pruned_at: list[int] = []
        self.surgeries: list[dict[str, Any]] = []  # JSON records, see checkpoint_meta
        self.recompiles = 0
        self.init_tuning: int | None = None
        self.events: list[dict[str, Any]] = []

    # ---- host-side structure bookkeeping --------------------------------------------------

    def _set_arch(self, arch: Any, *, rank: int) -> None:
        from jaxprune.lora import _spec
        from jaxprune.models import _structures

        lora = None
        if self.lora is not None:
            lora = _spec.LoraSpec(rank=rank, alpha=self.lora.alpha, targets=self.lora.targets)
        self.arch = arch
        self.bucket = rank
        self.structures = _structures.structures(arch, lora=lora)
        abstract = _structures.abstract_params(arch, lora=lora)
        self.shapes = _budget.param_shapes(nnx.to_pure_dict(abstract))
        self.budget_structures = _apt_arch.budget_structures(
            self.structures, self.shapes, count_embeddings=self.cfg.count_embeddings
        )
        self.inner = _apt_masks.apt_masks(
            self.budget_structures,
            self.shapes,
            density_schedule=apt_schedules.stepwise_density(self.cfg.target_density, self.steps),
            pruning_steps=self.steps,
            beta=self.cfg.beta,
            step_size=self.step_size,
            budget_base=getattr(self, 'budget_base', None),
            min_keep=self.min_keep,
        )

    # ---- Method hooks --------------------------------------------------------------------

    def prepare_model(self, model: nnx.Module) -> nnx.Module:
        """Keeps the unpruned model's graphdef and frozen backbone for ``prune.teacher=dense``."""
        from jaxprune import sharding
        from jaxprune.train import _factory, _loop

        if not self.dense_teacher:
            return model
        graphdef, trainable, rest = nnx.split(model, _loop.trainable_filter(self.run_cfg), ...)
        dtype = _factory.dtype(self.run_cfg.model.param_dtype)
        self.teacher_graphdef = graphdef
        self._teacher_trainable = jax.tree.map(  # the loop's param_dtype, as the trainable
            lambda x: jax.ShapeDtypeStruct(
                x.shape, dtype if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype),
            trainable)
        self._teacher_rest = sharding.abstract_like(rest)
        self._teacher_rest_values = rest
        return model

    def _initial_ranks(self, params: Any) -> dict[tuple[Any, ...], jax.Array]:
        """LoRA rank masks at the start: the first ``init_rank`` rows of every adapter's bucket."""
        return {
            p: (jnp.arange(ab['lora_a'].shape[-1]) < self.init_rank).astype(jnp.float32)
            for p, ab in _grow.adapters(_pure(params)).items()
        }

    def _dense_teacher_init(self, params: Any, ranks: dict) -> dict[str, Any]:
        if self.teacher_graphdef is None:
            raise ValueError(
                'prune.teacher=dense needs the unpruned model: build the run with '
                'jaxprune.train (its setup calls AptMethod.prepare_model before the split)')
        zeros = lambda x: jnp.zeros(x.shape, x.dtype)
        if _apt_arch.same_shapes(params, self._teacher_trainable):  # fresh run: the student
            teacher, t_ranks = jax.tree.map(jnp.copy, params), dict(ranks)
        else:  # a restore target at pruned shapes: the checkpoint fills the values in
            teacher = jax.tree.map(zeros, self._teacher_trainable)
            t_ranks = self._initial_ranks(self._teacher_trainable)
        return {'teacher': teacher, 'teacher_rank': t_ranks,
                'teacher_rest': jax.tree.map(zeros, self._teacher_rest)}

    def transforms(self, trainable: Any) -> tuple[optax.GradientTransformation, ...]:
        del trainable
        return (self.transform(),)

    def transform(self) -> optax.GradientTransformationExtraArgs:
        """The ``masks`` owner: delegates to the current ``apt_masks`` and tracks LoRA ranks."""
        beta = self.cfg.beta

        def init_fn(params):
            inner = self.inner.init(params)
            ranks = self._initial_ranks(params)
            masks = {'units': inner.masks, 'rank': ranks, 'mu': jnp.zeros((), jnp.float32)}
            masks.update(self._dense_teacher_init(params, ranks) if self.dense_teacher
                         else {'teacher': jax.tree.map(jnp.copy, params)})
            if self.hidden:
                d, n = self.arch.hidden_size, self.arch.num_layers
                # [student D, teacher D]: a dense teacher keeps the unpruned hidden size.
                d_t = self.initial_arch.hidden_size if self.dense_teacher else d
                proj = {'kernel': jnp.stack([  # one stacked [L, D, D_t] kernel
                    p['kernel'] for p in _apt.init_projections(n, d, teacher_size=d_t)])}
                masks['hidden_proj'] = proj
                masks['hidden_proj_opt'] = _proj_adam_init(proj)
            ema = {p: jnp.zeros_like(m) for p, m in ranks.items()}
            return AptTrainState(inner.count, masks, inner.alive, inner.salience_ema, ema)

        def update_fn(updates, state, params=None, *, salience=None, proj_grads=None, **extra):
            del extra
            inner = _apt_masks.AptMaskState(
                state.prune_count, state.masks['units'], state.alive, state.salience_ema
            )
            _, inner = self.inner.update(updates, inner, params, salience=salience)
            rank_ema = state.rank_ema
            if rank_ema and params is not None:
                new = _grow.rank_salience(_pure(params), _pure(updates))
                first = state.prune_count == 0
                rank_ema = {
                    p: jnp.where(first, new[p], beta * rank_ema[p] + (1 - beta) * new[p])
                    for p in rank_ema
                }
            mu = self.mu(inner.count) if self.cfg.distill else jnp.zeros((), jnp.float32)
            masks = {**state.masks, 'units': inner.masks, 'mu': jnp.asarray(mu, jnp.float32)}
            if self.dense_teacher and params is not None and _apt_arch.same_shapes(
                    params, masks['teacher']):  # trace time: false once surgery changed shapes
                # The teacher follows the student until the pruning window opens.
                take = state.prune_count < self.distill_begin
                masks['teacher'], masks['teacher_rank'] = jax.tree.map(
                    lambda x, t: jnp.where(take, x, t),
                    (params, state.masks['rank']), (masks['teacher'], masks['teacher_rank']))
            if proj_grads is not None and 'hidden_proj' in masks:
                masks['hidden_proj'], masks['hidden_proj_opt'] = _proj_adam_step(
                    self.run_cfg.train, proj_grads, masks['hidden_proj'],
                    masks['hidden_proj_opt'])
            new_state = AptTrainState(inner.count, masks, inner.alive, inner.salience_ema, rank_ema)
            return updates, new_state

        return optax.GradientTransformationExtraArgs(init_fn, update_fn)

    def model_masks(self, masks: dict[str, Any]) -> dict[str, Any]:
        """Optimizer-state ``masks`` -> the model's ``masks=`` layout (units + LoRA ranks)."""
        return _structured.to_model_masks(
            masks['units'],
            num_layers=self.arch.num_layers,
            q_per_kv=self.arch.q_per_kv,
            lora_masks=masks['rank'] or None,
        )

    def prepare(self, trainable, rest, masks):
        return trainable, rest, self.model_masks(masks)

    def loss_extras(self, trainable, out, batch):
        del trainable, out, batch
        return jnp.zeros((), jnp.float32), {}

    def value_and_grad(self, fn, trainable, rest, batch, masks, rng, *, graphdef):
        """Loss, gradients and APT salience from one backward pass (taps), plus distillation."""
        from jaxprune.train import _step

        del rng
        model_masks = self.model_masks(masks)
        if self.dense_teacher:
            t_graphdef, t_rest = self.teacher_graphdef, masks['teacher_rest']
            teacher_masks = self.model_masks({'units': {}, 'rank': masks['teacher_rank']})
        else:
            t_graphdef, t_rest = graphdef, rest
            teacher_masks = self.model_masks({'units': {}, 'rank': masks['rank']})
        ids, am, labels = batch['input_ids'], batch.get('attention_mask'), batch['labels']
        taps = _apt.salience_taps(self.arch, *ids.shape, salience=self.cfg.salience)
        mu = masks['mu']

        def call(model, **kw):
            return model(ids, **kw) if am is None else model(ids, am, **kw)

        def teacher_out():
            teacher = nnx.merge(t_graphdef, masks['teacher'], t_rest)
            out = call(teacher, masks=teacher_masks, output_hidden_states=self.hidden)
            return jax.lax.stop_gradient(out)

        def loss_fn(params, taps):
            tr, proj = params
            model = nnx.merge(graphdef, tr, rest)
            step_masks, layer_taps = _apt.tapped_masks(model_masks, taps)
            res = call(model, masks=step_masks, taps=layer_taps, output_hidden_states=self.hidden)
            out, acts = res[:2]
            sums = _step.loss_sums(out, labels, task=self.task)
            ce = sums['loss_sum'] / jnp.maximum(sums['count'], 1.0)
            aux = {**sums, 'ce': ce, 'mu': mu}
            loss = ce
            if self.cfg.distill:
                shapes = jax.eval_shape(teacher_out)
                t_res = jax.lax.cond(
                    mu > 0, teacher_out,
                    lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes),
                )
                t_out = t_res[0] if self.hidden else t_res
                valid = (labels >= 0).astype(jnp.float32)
                hidden_kw = {}
                if self.hidden:
                    hidden_kw = {
                        'student_hiddens': res[2],
                        'teacher_hiddens': t_res[1],
                        'projections': [{'kernel': k} for k in proj['kernel']],
                        'hidden_mask': am,
                        'hidden_weight': self.hidden_weight,
                    }
                loss, parts = _apt.apt_loss(
                    ce, out, t_out, mu=mu, temperature=self.cfg.temperature, mask=valid,
                    **hidden_kw,
                )
                on = (mu > 0).astype(jnp.float32)  # at mu == 0 the teacher is not run
                aux['kl'] = on * parts['kl']
                if self.hidden:
                    aux['hidden_mse'] = on * parts['hidden']
            return loss, (acts, aux)

        outlier_params = None
        if self.outlier:
            outlier_params = nnx.to_pure_dict(
                nnx.state(nnx.merge(graphdef, trainable, rest), nnx.Param)
            )
        proj = masks.get('hidden_proj') if self.hidden else None
        loss, (grads, proj_grads), salience, aux = _apt.value_grads_and_salience(
            loss_fn, (trainable, proj), taps, self.budget_structures,
            outlier_params=outlier_params, salience=self.cfg.salience,
        )
        extra = {'salience': salience}
        if proj is not None:
            extra['proj_grads'] = proj_grads
        return (loss, aux), grads, extra

    def on_step_end(self, step: int, state: train_lib.LoopState) -> train_lib.LoopState:
        """At a pruning step: compaction, rank growth, teacher refresh; then the loop re-jits."""
        opt_state = state.state.opt_state
        if self._teacher_rest_values is not None:
            state = self._fill_teacher_rest(state)
        count = int(optax.tree.get(opt_state, 'prune_count'))
        if count in self.steps and count not in self.pruned_at:
            self.pruned_at.append(count)
            state = self.pruning_step(count, state, step=step)
        if step == self.run_cfg.train.steps and self.cfg.export_dir:
            self.export(state, pathlib.Path(self.run_cfg.run_dir) / self.cfg.export_dir)
        return state

    def on_eval(
        self, step: int, metrics: dict[str, float], state: train_lib.LoopState
    ) -> train_lib.LoopState:
        """``prune.teacher_refresh=eval``: the snapshot teacher takes the student's trainable
        params when the validation metric (accuracy; minus the loss for causal LMs) beats the
        best so far, as in the paper. Shapes are unchanged, so the loop does not re-jit."""
        if not self.eval_refresh:
            return state
        score = float(metrics['accuracy'] if self.task == 'classification' else -metrics['loss'])
        if self.best_eval is not None and score <= self.best_eval:
            return state
        previous, self.best_eval = self.best_eval, score
        ts = state.state
        masks = optax.tree.get(ts.opt_state, 'masks')
        teacher = jax.tree.map(jnp.copy, ts.trainable)
        opt_state = optax.tree.set(ts.opt_state, masks={**masks, 'teacher': teacher})
        self._write_event({'event': 'teacher_refresh', 'step': int(step), 'score': score,
                           'previous': previous})
        logger.info('APT teacher refreshed at step %d (validation score %.4f, was %s)',
                    step, score, previous)
        return train_lib.LoopState(state.graphdef, ts._replace(opt_state=opt_state), state.rest)

    def _fill_teacher_rest(self, state: train_lib.LoopState) -> train_lib.LoopState:
        """Copies the unpruned backbone into the state's ``teacher_rest`` (once per process).

        Done after the first step rather than in ``init`` so that the backbone is an argument of
        the jitted step, not a constant captured by it; the teacher is not run before the
        pruning window opens (``mu == 0``). A resumed run overwrites the checkpoint's copy with
        the same values, rebuilt from ``model.name_or_path``.
        """
        opt_state = state.state.opt_state
        masks = optax.tree.get(opt_state, 'masks')
        rest = jax.tree.map(lambda x, old: jax.device_put(jnp.array(x, copy=True), old.sharding),
                            self._teacher_rest_values, masks['teacher_rest'])
        self._teacher_rest_values = None
        opt_state = optax.tree.set(opt_state, masks={**masks, 'teacher_rest': rest})
        return train_lib.LoopState(
            state.graphdef, state.state._replace(opt_state=opt_state), state.rest)

    # ---- resumption (outside jit) --------------------------------------------------------

    def _arch_summary(self) -> dict[str, Any]:
        layers = range(self.arch.num_layers)
        return {
            'hidden_size': int(self.arch.hidden_size),
            'layer_heads': [int(self.arch.heads(i)) for i in layers],
            'layer_mlp': [int(self.arch.mlp(i)) for i in layers],
            'lora_bucket': int(self.bucket),
        }

    def checkpoint_meta(self) -> dict[str, Any]:
        """Host-side state for ``meta['method']``: surgeries so far, growth reference, settings.

        ``surgeries`` lists one record per pruning step: ``count``, ``keep`` (the keep vectors
        of that step in the then-current unit layout, packed bits; None without compaction) and
        ``bucket`` (the LoRA bucket after the step). ``arch`` is the resulting shape summary,
        checked after the replay. ``best_eval`` is the best validation score so far
        (``prune.teacher_refresh=eval``).
        """
        return {
            'settings': {f: _apt_arch.setting(self.run_cfg, f) for f in RESUME_FIELDS},
            'surgeries': [dict(r) for r in self.surgeries],
            'init_tuning': self.init_tuning,
            'recompiles': self.recompiles,
            'arch': self._arch_summary(),
            'best_eval': self.best_eval,
        }

    def _reset(self) -> None:
        self._set_arch(self.initial_arch, rank=self.run_cfg.lora.rank)
        self.pruned_at, self.surgeries, self.events = [], [], []
        self.recompiles, self.init_tuning, self.best_eval = 0, None, None

    def _check_settings(self, saved: dict[str, Any]) -> None:
        changed = [f for f in RESUME_FIELDS
                   if f in saved and saved[f] != _apt_arch.setting(self.run_cfg, f)]
        if changed:
            now = ', '.join(f'{f}={_apt_arch.setting(self.run_cfg, f)!r}' for f in changed)
            was = ' '.join(f'{f}={saved[f]}' for f in changed)
            raise ValueError(
                f'{now} differ from the checkpoint APT is resuming from; these settings decide '
                f'when and how much the model was compacted. Resume with {was} or start a fresh '
                'run_dir'
            )

    def restore(
        self, meta: dict[str, Any] | None, state: train_lib.LoopState
    ) -> train_lib.LoopState:
        """Rebuilds the compacted model recorded in ``meta`` from the freshly built ``state``.

        Resets the host-side state, replays the recorded surgeries on the frozen backbone
        (``state.rest``) and returns the model at the pruned shapes with an abstract trainable
        (the loop restores its values, the optimizer state, masks and teacher included).

        Raises:
          ValueError: a setting in ``RESUME_FIELDS`` differs from the checkpoint's, or the
            replayed shapes do not match the recorded ones.
        """
        from jaxprune import surgery
        from jaxprune.surgery import _prune
        from jaxprune.train import _loop

        self._reset()
        if not meta:  # a checkpoint without APT meta: unpruned shapes
            return state
        self._check_settings(meta.get('settings', {}))
        frozen = nnx.to_pure_dict(state.rest)
        for rec in meta['surgeries']:
            arch = self.arch
            if rec['keep'] is not None:
                keep = _apt_arch.decode_keep(rec['keep'], self.structures)
                frozen = _apt_arch.prune_tree(frozen, keep, self.structures)
                arch = surgery.pruned_config(self.arch, keep, self.structures)
            if rec['keep'] is not None or rec['bucket'] != self.bucket:
                self._set_arch(arch, rank=rec['bucket'])
        self.surgeries = [dict(r) for r in meta['surgeries']]
        self.pruned_at = [r['count'] for r in self.surgeries]
        self.init_tuning, self.recompiles = meta['init_tuning'], meta['recompiles']
        self.best_eval = meta.get('best_eval')  # absent in checkpoints of older versions
        if self._arch_summary() != meta['arch']:
            raise ValueError(
                f'replaying the recorded APT surgeries gives {self._arch_summary()}, but the '
                f"checkpoint records {meta['arch']}; was model.name_or_path changed? Resume with "
                'the original model or start a fresh run_dir'
            )
        if not self.surgeries:
            return state
        model = nnx.merge(state.graphdef, state.state.trainable, state.rest)
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        spec = _prune._lora_spec_from_params(params)
        if spec is not None:
            spec = dataclasses.replace(spec, rank=self.bucket)
        new = _apt_arch.abstract_model(model, self.arch, spec, jax.tree.leaves(params)[0].dtype)
        graphdef, trainable, rest = nnx.split(new, _loop.trainable_filter(self.run_cfg), ...)
        nnx.replace_by_pure_dict(rest, frozen)
        trainable = jax.tree.map(  # the loop's param_dtype, as after a live pruning step
            lambda x, t: jax.ShapeDtypeStruct(x.shape, t.dtype), trainable, state.state.trainable
        )
        return train_lib.LoopState(graphdef, state.state._replace(trainable=trainable), rest)

    # ---- pruning step (outside jit) ------------------------------------------------------

    def compacts(self, count: int) -> bool:
        """Whether the schedule compacts physically at the pruning step at update ``count``.

        With ``prune.compaction``: every ``prune.compact_every``-th pruning step and the last one
        (so the final model is always compacted); the others only harden the masks, unless their
        LoRA growth resizes the adapters (:meth:`pruning_step` compacts those too).
        """
        if not self.cfg.compaction:
            return False
        if count not in self.steps:  # a pruning step called by hand
            return True
        i = self.steps.index(count)
        return (i + 1) % self.cfg.compact_every == 0 or i == len(self.steps) - 1

    def _probe(self) -> dict[str, jax.Array]:
        rng = np.random.default_rng(0)
        ids = rng.integers(1, self.arch.vocab_size, size=(2, 16)).astype(np.int32)
        batch = {'input_ids': jnp.asarray(ids)}
        if self.task == 'classification':
            batch['attention_mask'] = jnp.ones_like(batch['input_ids'])
        return batch

    def _logits(self, model, masks) -> np.ndarray:
        graphdef, st = nnx.split(model)
        mm = self.model_masks({'units': masks['units'], 'rank': masks['rank']})
        return np.asarray(_probe_forward(st, mm, self._probe(), graphdef=graphdef))

    def pruning_step(
        self, count: int, state: train_lib.LoopState, *, step: int | None = None
    ) -> train_lib.LoopState:
        """Binarized masks -> surgery on params/opt state -> rank growth -> teacher refresh."""
        from jaxprune import surgery
        from jaxprune.train import _loop

        t0 = time.perf_counter()
        ts = state.state
        opt_state = ts.opt_state
        masks = dict(optax.tree.get(opt_state, 'masks'))
        keep = {k: np.asarray(v) > 0 for k, v in masks['units'].items()}
        model = nnx.merge(state.graphdef, ts.trainable, state.rest)
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        growth = None
        if masks['rank']:
            # The tuning budget counts the adapters' live dims: their shapes as the surgery
            # leaves them (abstract, nothing is computed), whether or not this step compacts.
            live = jax.eval_shape(
                lambda p: surgery.prune(None, p, keep, structures=self.structures)[1], params)
            growth = self._growth_plan(count, live, masks['rank'])
        # A step whose LoRA bucket grows re-jits anyway, so it compacts as well.
        compact = self.compacts(count) or (
            self.cfg.compaction and growth is not None and growth[1] != self.bucket)
        # The teacher stays out of the surgery and the rank growth: a dense teacher keeps its
        # shapes, a snapshot teacher is taken afresh below. A snapshot refreshed on eval
        # (teacher_refresh=eval) goes through both with the student instead: pruned like the
        # params and rank-resized like the Adam moments, so its function on the compacted
        # backbone is its masked function before.
        held = {k: masks.pop(k) for k in TEACHER_KEYS
                if k in masks and not (self.eval_refresh and k == 'teacher')}
        if self.eval_refresh:  # ranks the growth switches on must not change the teacher
            masks['teacher'] = _grow.zero_inactive_ranks(masks['teacher'], masks['rank'])
        opt_state = optax.tree.set(opt_state, masks=masks)
        before = self._logits(model, masks) if self.cfg.check_compaction else None
        arch = self.arch
        if compact:
            arch = surgery.pruned_config(self.arch, keep, self.structures)
            # One jitted gather program per tree instead of one eager compile per leaf shape.
            params = jax.jit(
                lambda p: surgery.prune(None, p, keep, structures=self.structures)[1]
            )(params)
            opt_state = jax.jit(
                lambda o: surgery.prune_units(
                    surgery.prune_like(o, keep, self.structures, self.shapes),
                    keep,
                    self.structures,
                )
            )(opt_state)
        masks = optax.tree.get(opt_state, 'masks')
        if compact and 'hidden_proj' in masks:
            hk = keep[('hidden', None)]
            both = not self.dense_teacher  # a dense teacher keeps every hidden dim
            masks = {**masks, **{k: _apt.prune_projections(masks[k], hk, teacher_side=both)
                                 for k in ('hidden_proj', 'hidden_proj_opt')}}
        ranks, rank_ema = masks['rank'], optax.tree.get(opt_state, 'rank_ema')
        bucket = self.bucket
        if growth is not None:
            params, opt_state, ranks, rank_ema, bucket = self._grow(
                count, params, opt_state, ranks, rank_ema, *growth
            )
        if compact or bucket != self.bucket:
            model = _apt_arch.rebuild_model(model, arch, params)
        else:
            pstate = nnx.state(model, nnx.Param)
            nnx.replace_by_pure_dict(pstate, params)
            nnx.update(model, pstate)
        graphdef, trainable, rest = nnx.split(model, _loop.trainable_filter(self.run_cfg), ...)
        dtypes = jax.tree.map(lambda x: x.dtype, ts.trainable)
        trainable = jax.tree.map(lambda x, d: x.astype(d), trainable, dtypes)
        new_masks = {**masks, 'rank': ranks}
        if self.dense_teacher:
            new_masks.update(held)
        elif self.eval_refresh:  # resized by _grow together with the Adam moments
            new_masks['teacher'] = optax.tree.get(opt_state, 'masks')['teacher']
        else:
            new_masks['teacher'] = jax.tree.map(jnp.copy, trainable)
        opt_state = optax.tree.set(opt_state, masks=new_masks, rank_ema=rank_ema)
        self.surgeries.append({
            'count': int(count),
            'keep': _apt_arch.encode_keep(keep) if compact else None,
            'bucket': int(bucket),
        })
        if compact or bucket != self.bucket:
            self._set_arch(arch, rank=bucket)
            self.recompiles += 1
        else:  # shapes unchanged: keep the graphdef so the loop does not re-jit
            graphdef = state.graphdef
        diff = None
        if before is not None:
            diff = float(np.max(np.abs(self._logits(model, new_masks) - before)))
        new_state = train_lib.LoopState(
            graphdef, ts._replace(trainable=trainable, opt_state=opt_state), rest
        )
        self._log(count if step is None else step, count, new_masks, opt_state, params,
                  diff=diff, compacted=compact,
                  seconds=time.perf_counter() - t0)
        return new_state

    def _growth_plan(self, count, live, ranks) -> tuple[float, int]:
        """``(factor, bucket)``: the common LoRA growth factor towards the tuning budget, and the
        adapters' physical rank after the growth (doubled when the current one is too small).

        ``live``: the params' shapes with the pruned units removed; the budget and the factor count
        these adapter dims, so a step that only masks grows as a compacting one would.
        """
        current = _grow.tuning_params(live, ranks)
        if self.init_tuning is None:
            self.init_tuning = current
        target = apt_schedules.tuning_growth(
            self.init_tuning, self.steps, factor=self.cfg.tuning_growth
        )(count)
        factor = _grow.growth_factor(live, ranks, float(target))
        top = max(int(np.sum(np.asarray(m) > 0)) for m in ranks.values())
        wanted = min(math.ceil(top * factor), self.cfg.max_rank)
        if wanted <= self.bucket:
            return factor, self.bucket
        return factor, min(max(2 * self.bucket, wanted), self.cfg.max_rank)

    def _grow(self, count, params, opt_state, ranks, rank_ema, factor, new_bucket):
        """Grow LoRA ranks by ``factor`` at physical rank ``new_bucket`` (``_growth_plan``)."""
        key = jax.random.fold_in(jax.random.key(self.run_cfg.train.seed), count)
        bucket = self.bucket
        # With train.param_ema, what the average in the optimizer state sees of the params:
        # resized like Adam's moments. The growth's edit relative to it is applied to the average.
        averaging = self.run_cfg.train.param_ema > 0
        seen = params
        if new_bucket != bucket:
            if averaging:
                seen = _grow.resize_ranks_like(params, ranks, new_bucket)
            opt_state = _grow.resize_ranks_like(opt_state, ranks, new_bucket)
            params, new_ranks = _grow.resize_ranks(params, ranks, new_bucket, key=key,
                                                   rescale=False)
            rank_ema = {p: _grow.move_active(rank_ema[p], ranks[p], axis=0, bucket=new_bucket)
                        for p in ranks}
            ranks, bucket = new_ranks, new_bucket
        params, ranks = _grow.grow_ranks(
            params, ranks, rank_ema, key=key, factor=factor,
            max_rank=min(self.cfg.max_rank, bucket),
        )
        if averaging:
            opt_state = _average.shift_average(opt_state, params, seen)
        return params, opt_state, ranks, rank_ema, bucket

    def _log(self, step, count, masks, opt_state, params, *, diff, compacted, seconds) -> None:
        from jaxprune import models

        units = masks['units']
        alive = optax.tree.get(opt_state, 'alive')
        keep = {k: np.asarray(alive[k]) & (np.asarray(units[k]) > 0) for k in units}
        kept = int(_budget.kept_param_count(keep, self.budget_structures, self.shapes))
        layers = range(self.arch.num_layers)
        ranks = [[] for _ in layers]
        for p, m in sorted(masks['rank'].items(), key=str):
            ranks[p[1]].append(int(np.sum(np.asarray(m) > 0)))
        rec = {
            'event': 'prune',
            'step': int(step),
            'time': time.time(),
            'prune_count': int(count),
            'density': kept / self.budget_base,
            'target_density': float(
                apt_schedules.stepwise_density(self.cfg.target_density, self.steps)(count)
            ),
            'kept_heads': [int(keep[('heads', i)].sum()) * self.arch.q_per_kv for i in layers],
            'kept_mlp': [int(keep[('mlp', i)].sum()) for i in layers],
            'hidden': int(keep[('hidden', None)].sum()),
            'lora_ranks': ranks,
            'lora_bucket': self.bucket,
            'params': int(sum(np.size(x) for x in jax.tree.leaves(params))),
            'backbone_params': models.param_count(self.arch),
            'mu': float(self.mu(count)) if self.cfg.distill else 0.0,
            'compacted': bool(compacted),
            'compaction_max_abs_diff': diff,
            'recompiles': self.recompiles,
            'seconds': seconds,
        }
        self.events.append(rec)
        self._write_event(rec)
        logger.info(
            'APT pruning step %d (count %d): density %.3f (target %.3f), heads %s, mlp %s, '
            'hidden %d, |masked - compacted| = %s, %.1fs',
            step, count, rec['density'], rec['target_density'], rec['kept_heads'],
            rec['kept_mlp'], rec['hidden'], diff, seconds,
        )

    def _write_event(self, rec: dict[str, Any]) -> None:
        """Appends ``rec`` to ``run_dir/metrics.jsonl`` (process 0 only, as the loop's logger)."""
        if jax.process_index() != 0:
            return
        path = pathlib.Path(self.run_cfg.run_dir) / 'metrics.jsonl'
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open('a') as f:
            f.write(json.dumps(rec) + '\n')

    def final_model(self, state: train_lib.LoopState) -> tuple[nnx.Module, Any, dict]:
        """The trained model compacted to its hard masks, and its rank masks (for export)."""
        from jaxprune import surgery

        masks = optax.tree.get(state.state.opt_state, 'masks')
        alive = optax.tree.get(state.state.opt_state, 'alive')
        model = nnx.merge(state.graphdef, state.state.trainable, state.rest)
        keep = {k: np.asarray(alive[k]) & (np.asarray(v) > 0) for k, v in masks['units'].items()}
        if all(k.all() for k in keep.values()):
            return model, self.arch, masks['rank']
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        arch, params = surgery.prune(self.arch, params, keep, structures=self.structures)
        return _apt_arch.rebuild_model(model, arch, params), arch, masks['rank']

    def export(self, state: train_lib.LoopState, path: pathlib.Path) -> dict[str, Any]:
        """Writes the final pruned model (see ``methods._apt_export.save_pruned``)."""
        from jaxprune.methods import _apt_export

        model, arch, ranks = self.final_model(state)
        info = _apt_export.save_pruned(model, arch, path, rank_masks=ranks)
        logger.info('APT: exported the pruned model to %s (HF folder: %s)', path, info['hf'])
        return info


@functools.partial(jax.jit, static_argnames='graphdef')
def _probe_forward(st: Any, mm: Any, b: dict[str, jax.Array], *, graphdef: nnx.GraphDef):
    """Masked forward of the compaction check, compiled once per architecture.

    The graphdef is static (hashable, equal across splits of the same structure), so the model
    before a pruning step reuses the compiled forward of the previous step's compacted model.
    """
    m = nnx.merge(graphdef, st)
    if 'attention_mask' in b:
        return m(b['input_ids'], b['attention_mask'], masks=mm)
    return m(b['input_ids'], masks=mm)


@train_lib.register_method('apt')
def build_apt(cfg: AptCfg, *, run_cfg: config_lib.RunCfg) -> AptMethod:
    """``prune.method: apt`` -> :class:`AptMethod`."""
    return AptMethod(cfg, run_cfg=run_cfg)
