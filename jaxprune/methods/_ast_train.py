"""AST in the training loop: ``prune.method: ast`` (config + train ``Method``).

How the pieces of ``jaxprune.methods._ast`` map onto the loop's hook (``jaxprune.train._method``):

* **Optimizer state** (:func:`ast_train_transform`, inserted between gradient clipping and the
  loop's AdamW): ``AstTrainState.masks`` is a dict ``{'weights': N:M masks pytree, 'teacher':
  frozen dense params (or None), 'step': int32[]}``, so masks and teacher are checkpointed with
  the optimizer state and reach ``prepare``/``value_and_grad`` (the loop passes the ``masks``
  field to both). The transform adds the annealed decay of the pruned weights
  (``masked_weight_decay``, linear ramp 0 -> ``decay`` over ``decay_ramp`` of the steps) and
  stores the masks used by the step together with the flip rate of the last recompute.
* **Mask recompute** (``value_and_grad``): every ``update_every`` steps the masks are recomputed
  from the current (post-update) dense weights' score **before** the forward (magnitude, or with
  ``init_score: wanda`` the Wanda score with the fixed calibration norms), so the step
  trains with the masks that match its weights (the same timing as ``sparsify``: a recompute
  after update ``10k`` is used from forward ``10k + 1`` on). The new masks reach the transform as
  the extra argument ``new_masks=``.
* **Forward** (``prepare``): ``ast_forward_params`` (``W * M`` with a straight-through gradient
  to all of ``W``); ``model_masks=None``.
* **Distillation** (``value_and_grad`` + ``loss_extras``): the frozen dense teacher's logits are
  computed under ``stop_gradient`` and handed to ``loss_extras`` in the batch
  (``batch['teacher_logits']``), which adds ``kd_weight * T^2 KL(p_t^T || p_s^T)`` to the loop's
  cross-entropy (AST: ``CE + 0.5 KL``, ``T = 2``).
* **Flip rate**: ``on_step_end`` appends ``{'event': 'mask', 'flip_rate': ...}`` to the run's
  ``metrics.jsonl`` after every recompute (the loop logs a fixed set of train keys).
* **AST-Boosted** (``slorb: true``): ``prepare_model`` (run by the loop on the freshly built
  model, before it is split, the optimizer is initialised or a checkpoint is restored) adds the
  trainable SLoRB weights ``S`` (:func:`add_slorb`) to every sparse Linear, initialised from the
  run's initial masks (the same score as the transform's initial masks). ``S`` trains with the
  other params; the forward adds ``(P x) S``; the teacher has ``S = 0`` (the dense model).

Deviation: Wanda initial masks (``init_score: wanda``) re-load the model and run a calibration
pass over ``calib_sequences`` training windows inside ``transforms``.
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
import optax
from flax import nnx

from jaxprune import config as config_lib
from jaxprune import train as train_lib
from jaxprune.masks import _nm
from jaxprune.methods import _ast, _calibrate, _distill
from jaxprune.scores import _magnitude, _wanda
from jaxprune.train import _factory
from jaxprune.transforms import _decay, _sparsify

logger = logging.getLogger(__name__)

_INIT_SCORES = ('magnitude', 'wanda')


@config_lib.register_prune('ast')
@dataclasses.dataclass(frozen=True, kw_only=True)
class AstCfg(config_lib.PruneCfg):
    """AST: N:M adaptive masks, annealed decay, distillation from the dense model.

    ``target_density`` must equal ``n / m``. ``decay_ramp`` is the fraction of ``train.steps``
    over which the pruned-weight decay ramps linearly from 0 to ``decay``.
    """

    target_density: float = 0.5
    n: int = 2
    m: int = 4
    update_every: int = 10
    decay: float = 6e-5
    decay_ramp: float = 0.2
    init_score: str = 'magnitude'
    calib_sequences: int = 128
    distill: bool = True
    temperature: float = 2.0
    kd_weight: float = 0.5
    slorb: bool = False
    slorb_k: int = 16
    include: str = _nm.DEFAULT_INCLUDE
    export_dir: str | None = 'sparse24'  # relative to run_dir; null = no 2:4 export at the end

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.n < self.m:
            raise ValueError(f'prune.n={self.n}, prune.m={self.m}: need 0 < n < m; e.g. 2 and 4')
        if abs(self.target_density - self.n / self.m) > 1e-9:
            nm = self.n / self.m
            raise ValueError(f'prune.target_density={self.target_density} must equal n/m={nm} '
                             f'for AST; set prune.target_density={nm}')
        if self.update_every < 1:
            raise ValueError(f'prune.update_every={self.update_every} must be >= 1; AST uses 10')
        if self.decay < 0 or not 0 <= self.decay_ramp <= 1:
            raise ValueError(f'prune.decay={self.decay} must be >= 0 and prune.decay_ramp='
                             f'{self.decay_ramp} in [0, 1]; AST uses 6e-5 and 0.2')
        if self.init_score not in _INIT_SCORES:
            raise ValueError(f'prune.init_score={self.init_score!r} must be one of {_INIT_SCORES}')
        if self.calib_sequences < 1 or self.temperature <= 0 or self.kd_weight < 0:
            raise ValueError(f'prune.calib_sequences={self.calib_sequences} must be >= 1, '
                             f'prune.temperature={self.temperature} > 0, prune.kd_weight='
                             f'{self.kd_weight} >= 0')
        if self.slorb_k < 1:
            raise ValueError(f'prune.slorb_k={self.slorb_k} must be >= 1; AST uses 16')


class AstTrainState(NamedTuple):
    """State of :func:`ast_train_transform`.

    Attributes:
      masks: ``{'weights': masks pytree (bool (K, N) / None), 'teacher': frozen dense params
        (trainable-shaped, SLoRB zeroed) or None, 'step': int32[] updates so far}``.
      decay_state: state of ``masked_weight_decay``.
      flip_rate: f32[] fraction of sparse mask entries changed by the most recent recompute.
    """

    masks: dict[str, Any]
    decay_state: optax.OptState
    flip_rate: jax.Array


def _is_slorb(path) -> bool:
    return _nm.path_str(path).endswith('slorb')


def ast_train_transform(
    *,
    n: int = 2,
    m: int = 4,
    update_every: int = 10,
    decay: float = 6e-5,
    decay_ramp_steps: int = 0,
    include: str = _nm.DEFAULT_INCLUDE,
    init_score_fn: Any = None,
    keep_teacher: bool = True,
) -> optax.GradientTransformationExtraArgs:
    r"""AST's mask owner for the training loop: annealed decay + masks/teacher in the state.

    .. math::
        g \leftarrow g + \lambda(t)\,(1 - M) \odot W,\qquad
        \lambda(t) = \lambda \min(1, t / T_{\text{ramp}})

    ``update(g, state, params, new_masks=None)``: ``new_masks`` are the masks the step's forward
    used (recomputed by the method every ``update_every`` steps); they become the state's masks
    and the flip rate is updated on recompute steps. Chain it before AdamW.

    Args:
      n: kept per group of ``m`` along K.
      m: group size.
      update_every: mask recompute period (only used to know when the flip rate changes).
      decay: final pruned-weight decay :math:`\lambda` (AST: 6e-5).
      decay_ramp_steps: steps of the linear ramp of :math:`\lambda` (AST: ~20% of training).
      include: leaf-path regex of the sparse kernels.
      init_score_fn: scores of the initial masks (default magnitude; Wanda via
        ``functools.partial(wanda_scores, act_norms=...)``).
      keep_teacher: keep a frozen copy of the initial params (SLoRB leaves zeroed) as teacher.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state :class:`AstTrainState`.

    References:
      Huang et al., *Pruning Large Language Models with Semi-Structural Adaptive Sparse
      Training*, AAAI 2025, Sec. 3.
    """
    decay_tx = _decay.masked_weight_decay(decay, ramp_steps=decay_ramp_steps or None)
    score_fn = init_score_fn or _magnitude.magnitude_scores
    mask_fn = functools.partial(_nm.nm_masks, n=n, m=m, include=include)

    def init_fn(params):
        weights = mask_fn(score_fn(params))
        teacher = None
        if keep_teacher:
            teacher = jax.tree_util.tree_map_with_path(
                lambda p, x: jnp.zeros_like(x) if _is_slorb(p) else jnp.copy(x), params)
        return AstTrainState(
            masks={'weights': weights, 'teacher': teacher, 'step': jnp.zeros((), jnp.int32)},
            decay_state=decay_tx.init(params), flip_rate=jnp.zeros((), jnp.float32))

    def update_fn(updates, state, params=None, *, new_masks=None, **extra):
        del extra
        if params is None:
            raise ValueError('ast_train_transform.update needs params= (the decay reads W)')
        old = state.masks['weights']
        used = old if new_masks is None else new_masks
        updates, decay_state = decay_tx.update(updates, state.decay_state, params, masks=used)
        step = state.masks['step']
        recomputed = (step > 0) & (step % update_every == 0)
        flip = jnp.where(recomputed, _sparsify._flip_rate(old, used), state.flip_rate)
        masks = {**state.masks, 'weights': used, 'step': optax.safe_increment(step)}
        return updates, AstTrainState(masks, decay_state, flip)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def add_slorb(model: nnx.Module, masks: dict[str, jax.Array] | Any, *, k: int = 16,
              include: str = _nm.DEFAULT_INCLUDE) -> list[str]:
    """Adds trainable SLoRB weights ``S`` (:func:`~jaxprune.methods._ast.slorb_init`) to the
    model's sparse Linears, in place (AST-Boosted).

    Args:
      model: an NNX model.
      masks: ``{kernel path: bool[K, N]}`` or a masks pytree over ``nnx.state(model, nnx.Param)``
        (the initial masks; ``S`` starts as the block mean of the pruned weights).
      k: SLoRB block size along K.
      include: leaf-path regex of the sparse kernels.

    Returns:
      The kernel paths that received a bypass.
    """
    if not isinstance(masks, dict) or not all(isinstance(v, jax.Array) for v in masks.values()):
        flat = jax.tree_util.tree_flatten_with_path(masks, is_leaf=lambda x: x is None)[0]
        masks = {_nm.path_str(p): v for p, v in flat if v is not None}
    done = []
    for key, lin in _calibrate._linears(model, include):
        if key not in masks:
            continue
        s = _ast.slorb_init(lin.kernel[...], masks[key], k=k)
        axes = lin.kernel.get_metadata().get('out_sharding') or (None, None)
        lin.slorb = nnx.Param(s, out_sharding=(None, axes[1]), eager_sharding=False)
        lin.slorb_k = k
        done.append(key)
    return done


def _has_slorb(params: Any) -> bool:
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return any(_is_slorb(p) for p, _ in flat)


class AstMethod:
    """The train ``Method`` of AST (see the module docstring)."""

    def __init__(self, cfg: AstCfg, *, run_cfg: config_lib.RunCfg | None = None,
                 act_norms: dict[str, jax.Array] | None = None, steps: int | None = None):
        self.cfg = cfg
        self.run_cfg = run_cfg
        self.act_norms = act_norms
        if steps is None:
            steps = run_cfg.train.steps if run_cfg is not None else 100
        self.steps = steps
        self.flip_history: list[tuple[int, float]] = []

    # -- model ---------------------------------------------------------------------------------
    def initial_masks(self, params: Any) -> Any:
        """The N:M masks the run starts from (what the transform's ``init`` computes)."""
        cfg = self.cfg
        return _nm.nm_masks(self.init_score_fn()(params), n=cfg.n, m=cfg.m, include=cfg.include)

    def prepare_model(self, model: nnx.Module) -> nnx.Module:
        """AST-Boosted: adds SLoRB ``S`` to the sparse Linears when ``prune.slorb`` (in place).

        ``S`` starts as the block mean of the weights pruned by :meth:`initial_masks`, scored on
        the params cast to ``model.param_dtype`` as the loop's optimizer init sees them. A model
        that already has SLoRB weights is returned unchanged.

        Raises:
          ValueError: ``prune.slorb_k`` does not divide the input size K of a sparse kernel.
        """
        cfg = self.cfg
        params = nnx.state(model, nnx.Param)
        if not cfg.slorb or _has_slorb(params):
            return model
        if self.run_cfg is not None:
            p_dtype = _factory.dtype(self.run_cfg.model.param_dtype)
            params = jax.tree.map(
                lambda x: x.astype(p_dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                params)
        masks = self.initial_masks(params)
        flat = jax.tree_util.tree_flatten_with_path(masks, is_leaf=lambda x: x is None)[0]
        sizes = {_nm.path_str(p): int(mk.shape[0]) for p, mk in flat if mk is not None}
        bad = {p: size for p, size in sizes.items() if size % cfg.slorb_k}
        if bad:
            g = math.gcd(*sizes.values())
            fit = max(d for d in range(1, 17) if g % d == 0)
            path, size = next(iter(bad.items()))
            raise ValueError(
                f'prune.slorb_k={cfg.slorb_k} must divide the input size K of every sparse kernel '
                f'but {path} has K={size} ({len(bad)} kernels affected); set prune.slorb_k to a '
                f'divisor of {g}, e.g. prune.slorb_k={fit}')
        add_slorb(model, masks, k=cfg.slorb_k, include=cfg.include)
        return model

    # -- optimizer -----------------------------------------------------------------------------
    def init_score_fn(self):
        """The mask score: magnitude, or Wanda with the calibration norms (computed once).

        The same score is used for the initial masks **and** every recompute. Recomputing by
        plain magnitude after a Wanda initial mask swaps in magnitude 2:4 masks at the first
        recompute, which on SmolLM2-135M is catastrophic (one-shot magnitude 2:4 perplexity
        ~1700 vs Wanda ~190; measured: loss 5.8 -> 13.5 at the first recompute).
        """
        if self.cfg.init_score == 'magnitude':
            return _magnitude.magnitude_scores
        if self.act_norms is None:
            self.act_norms = self._calibrate()
        return functools.partial(_wanda.wanda_scores, act_norms=self.act_norms,
                                 include=self.cfg.include)

    def _calibrate(self) -> dict[str, jax.Array]:
        if self.run_cfg is None:
            raise ValueError('prune.init_score=wanda needs run_cfg (model and data) or act_norms=')
        rc = self.run_cfg
        model, _, tokenizer = train_lib.build_model(rc.model, rc.lora)
        splits = train_lib.load_splits(rc.data)
        bs = min(8, self.cfg.calib_sequences)
        batches = _calibrate.calibration_batches(
            splits['train'], tokenizer, num_sequences=self.cfg.calib_sequences,
            seq_len=rc.data.seq_len, batch_size=bs, seed=rc.data.seed + 1)
        return _calibrate.collect_input_norms(model, batches, include=self.cfg.include)

    def transforms(self, trainable: Any) -> tuple[optax.GradientTransformation, ...]:
        if self.cfg.slorb and not _has_slorb(trainable):
            raise ValueError(
                'prune.slorb=true but the trainable params hold no SLoRB weights: build the '
                'model through jaxprune.train.setup (it calls AstMethod.prepare_model) or call '
                'method.prepare_model(model) before nnx.split, and train all params '
                '(lora.enabled=false or train.full_finetune=true); or set prune.slorb=false')
        cfg = self.cfg
        return (ast_train_transform(
            n=cfg.n, m=cfg.m, update_every=cfg.update_every, decay=cfg.decay,
            decay_ramp_steps=round(cfg.decay_ramp * self.steps), include=cfg.include,
            init_score_fn=self.init_score_fn(), keep_teacher=cfg.distill),)

    # -- forward / loss ------------------------------------------------------------------------
    def prepare(self, trainable, rest, masks):
        return _ast.ast_forward_params(trainable, masks['weights']), rest, None

    def recompute(self, trainable: Any, masks: dict[str, Any]) -> Any:
        """The masks for this step: N:M of the current weights' score (magnitude, or Wanda with
        the fixed calibration norms) on recompute steps, else the state's masks."""
        cfg = self.cfg
        step = masks['step']

        score_fn = self.init_score_fn()

        def fresh():
            return _nm.nm_masks(score_fn(trainable), n=cfg.n, m=cfg.m, include=cfg.include)

        return jax.lax.cond((step > 0) & (step % cfg.update_every == 0), fresh,
                            lambda: masks['weights'])

    def value_and_grad(self, fn, trainable, rest, batch, masks, rng, *, graphdef):
        weights = self.recompute(trainable, masks)
        masks = {**masks, 'weights': weights}
        if self.cfg.distill:
            teacher = nnx.merge(graphdef, masks['teacher'], rest)
            t_logits = jax.lax.stop_gradient(_forward(teacher, batch))
            batch = {**batch, 'teacher_logits': t_logits}
        (loss, aux), grads = jax.value_and_grad(fn, has_aux=True)(
            trainable, rest, batch, masks, rng)
        return (loss, aux), grads, {'new_masks': weights}

    def loss_extras(self, trainable, out, batch):
        del trainable
        if 'teacher_logits' not in batch:
            return jnp.zeros((), jnp.float32), {}
        valid = batch['labels'] >= 0
        if 'attention_mask' in batch and out.ndim == 3:
            valid = valid & (batch['attention_mask'] > 0)
        kd = _distill.kl_distill(out, batch['teacher_logits'], temperature=self.cfg.temperature,
                                 mask=valid)
        return self.cfg.kd_weight * kd, {'kd': kd}

    # -- host side -----------------------------------------------------------------------------
    def on_step_end(self, step: int, state: train_lib.LoopState) -> train_lib.LoopState:
        every = self.cfg.update_every
        if step > 1 and (step - 1) % every == 0:
            flip = float(optax.tree.get(state.state.opt_state, 'flip_rate'))
            self.flip_history.append((step, flip))
            if self.run_cfg is not None:
                path = pathlib.Path(self.run_cfg.run_dir) / 'metrics.jsonl'
                if path.parent.is_dir():
                    rec = {'event': 'mask', 'step': int(step), 'time': time.time(),
                           'flip_rate': flip}
                    with path.open('a') as f:
                        f.write(json.dumps(rec) + '\n')
        if (self.run_cfg is not None and step == self.run_cfg.train.steps and self.cfg.export_dir
                and (self.cfg.n, self.cfg.m) == (2, 4)):
            self.export(state, pathlib.Path(self.run_cfg.run_dir) / self.cfg.export_dir)
        return state

    def export(self, state: train_lib.LoopState, path: str | pathlib.Path) -> pathlib.Path:
        """Writes the trained model with its final 2:4 masks in the compressed 2:4 layout.

        The folder is ``jaxprune.methods.export_sparse24``'s (HF ``config.json`` +
        ``model.safetensors`` with every masked kernel as 2:4 values + bitmask, SLoRB weights
        beside); ``jaxprune.methods.load_sparse24`` loads it into ``Sparse24`` kernels whose
        logits equal the masked dense model's. In a multi-process run every process must call
        it (the sharded weights are gathered); process 0 writes.
        """
        from jaxprune.methods import _ast_infer

        trainable, rest = state.state.trainable, state.rest
        weights = final_masks(state.state.opt_state)
        if jax.process_count() > 1:  # a collective: every process gathers, process 0 writes
            from jax.experimental import multihost_utils

            trainable, rest, weights = multihost_utils.process_allgather(
                (trainable, rest, weights), tiled=True)
            if jax.process_index() != 0:
                return pathlib.Path(path)
        model = nnx.merge(state.graphdef, trainable, rest)
        masks = _ast_infer.mask_dict(weights)
        out = _ast_infer.export_sparse24(model, model.config, masks, path)
        logger.info('exported the 2:4 model to %s', out)
        return out


def _forward(model, batch):
    if 'attention_mask' in batch:
        return model(batch['input_ids'], batch['attention_mask'])
    return model(batch['input_ids'])


@train_lib.register_method('ast')
def build_ast(cfg: AstCfg, *, run_cfg: config_lib.RunCfg | None = None) -> AstMethod:
    """Builds the AST train ``Method`` for ``prune.method: ast``."""
    return AstMethod(cfg, run_cfg=run_cfg)


def final_masks(opt_state: optax.OptState) -> Any:
    """The N:M masks pytree of an AST run (``optax.tree.get(opt_state, 'masks')['weights']``)."""
    return optax.tree.get(opt_state, 'masks')['weights']

