"""``prune.method: atp`` settings: :class:`AtpCfg` (the ``prune`` section of a run config).

Importing this module registers the section with the config loader; the driver that consumes it
is :func:`jaxprune.methods._atp_train.train_atp`.
"""

from __future__ import annotations

import dataclasses

import optax

from jaxprune import config as config_lib
from jaxprune.masks import _density, _gumbel


@config_lib.register_prune('atp')
@dataclasses.dataclass(frozen=True, kw_only=True)
class AtpCfg(config_lib.PruneCfg):
    """ATP hyperparameters (``prune.method: atp``).

    Attributes:
      target_density: fraction of the *prunable* parameters **kept** at the end, in ``(0, 1]``.
        Prunable = the seven projection kernels (q, k, v, o, gate, up, down) of every decoder
        layer, counted by ``jaxprune.masks._density`` (embeddings, norms, LM head and LoRA
        factors are not prunable). ``0.6`` removes 40 % of them.
      reg_weight: ``lambda`` of the generator loss ``L_task + lambda * R(P(m), p)``.
      temperature: Gumbel-sigmoid temperature ``tau``.
      bias: Gumbel-sigmoid logit bias (initial keep probability ``sigmoid(bias)``).
      control_fraction: fraction of ``train.steps`` in the control phase (generator + LoRA
        alternate); the remaining steps train LoRA with the frozen, projected masks.
      generator_lr: AdamW learning rate of the generator.
      generator_width: width of the generator's layer embeddings / encoder.
      generator_layers: encoder layers of the generator.
      lasso_init: group-lasso strength ``eta`` at step 0.
      lasso_growth: ``eta`` is multiplied by this factor every ``lasso_every`` steps
        (ATP's exponential ramp) ...
      lasso_every: ... steps, ...
      lasso_max: ... and capped here.
      holdout_fraction: share of the training documents held out for the generator steps
        (at least one document); LoRA never sees them.
      gen_batch_size: generator batch size (0 = ``data.batch_size``).
      prior_batches: warm-start the generator from a one-shot Taylor score on this many
        held-out batches (:func:`jaxprune.methods._atp.taylor_prior`): its head biases are set
        so the initial keep logits rank units by first-order importance per parameter, cut at
        the budget. ``0`` (default) is ATP's uninformed start (keep rate ``sigmoid(bias)`` for
        every unit). A deliberate deviation when > 0; see ``warm_start_generator``.
      prior_criterion: ``'weight'`` (element-wise ``sum |W * dL/dW|`` per unit, LLM-Pruner
        style) or ``'mask'`` (``|dL/dm|``); see ``taylor_prior``.
      prior_groups: the mask groups the prior may cut; the others start fully kept (the
        generator may still learn to cut them). Default: whole value/output channels
        (``attn_ctx``) and FFN neurons (``mlp``).
      prior_sharpness: logit per e-fold of the prior's score density (the prior's confidence;
        sharp, so sampled masks stay near the prior's cut).
    """

    target_density: float = 0.6
    reg_weight: float = 2.0
    temperature: float = _gumbel.DEFAULT_TEMPERATURE
    bias: float = _gumbel.DEFAULT_BIAS
    control_fraction: float = 0.5
    generator_lr: float = 1e-3
    generator_width: int = 64
    generator_layers: int = 2
    lasso_init: float = 0.1
    lasso_growth: float = 2.0
    lasso_every: int = 10
    lasso_max: float = 100.0
    holdout_fraction: float = 0.1
    gen_batch_size: int = 0
    prior_batches: int = 0
    prior_criterion: str = 'weight'
    prior_groups: tuple[str, ...] = ('attn_ctx', 'mlp')
    prior_sharpness: float = 10.0

    def __post_init__(self):
        super().__post_init__()
        checks = {
            'reg_weight': self.reg_weight >= 0, 'temperature': self.temperature > 0,
            'generator_lr': self.generator_lr > 0, 'generator_width': self.generator_width > 0,
            'generator_layers': self.generator_layers >= 0, 'lasso_init': self.lasso_init >= 0,
            'lasso_growth': self.lasso_growth >= 1, 'lasso_every': self.lasso_every >= 1,
            'lasso_max': self.lasso_max >= self.lasso_init,
            'gen_batch_size': self.gen_batch_size >= 0,
            'prior_batches': self.prior_batches >= 0, 'prior_sharpness': self.prior_sharpness > 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f'prune.{name}={getattr(self, name)!r} is out of range; see '
                                 'AtpCfg (e.g. reg_weight>=0, temperature>0, lasso_growth>=1)')
        if not 0 <= self.control_fraction <= 1:
            raise ValueError(f'prune.control_fraction={self.control_fraction} must be in [0, 1]')
        object.__setattr__(self, 'prior_groups', tuple(self.prior_groups))  # YAML gives lists
        if not self.prior_groups or not set(self.prior_groups) <= set(_density.GROUP_NAMES):
            raise ValueError(f'prune.prior_groups={list(self.prior_groups)} must be a non-empty '
                             f'subset of {list(_density.GROUP_NAMES)}')
        if self.prior_criterion not in ('weight', 'mask'):
            raise ValueError(f'prune.prior_criterion={self.prior_criterion!r} must be '
                             "'weight' or 'mask'")
        if not 0 < self.holdout_fraction < 1:
            raise ValueError(f'prune.holdout_fraction={self.holdout_fraction} must be in (0, 1)')

    def lasso_schedule(self) -> optax.Schedule:
        """``eta(t) = min(lasso_init * lasso_growth ** (t / lasso_every), lasso_max)``."""
        return optax.exponential_decay(
            self.lasso_init, self.lasso_every, self.lasso_growth, end_value=self.lasso_max)

    def control_steps(self, steps: int) -> int:
        return round(self.control_fraction * steps)
