"""``prune.method: apt`` settings: :class:`AptCfg` (the ``prune`` section of a run config).

Importing this module registers the section with the config loader; the train ``Method`` that
consumes it is :class:`jaxprune.methods._apt_train.AptMethod`.
"""

from __future__ import annotations

import dataclasses

from jaxprune import config as config_lib
from jaxprune.schedules import _apt as apt_schedules
from jaxprune.scores import _apt as apt_scores

SALIENCE = apt_scores.SALIENCE
TEACHERS = ('snapshot', 'dense')
TEACHER_REFRESH = ('pruning', 'eval')


@config_lib.register_prune('apt')
@dataclasses.dataclass(frozen=True, kw_only=True)
class AptCfg(config_lib.PruneCfg):
    """APT: adaptive structured pruning + adaptive LoRA ranks + self-distillation.

    ``target_density`` is the final fraction of block parameters (APT: 0.4 for encoders, 0.7 for
    decoders). LoRA adapters are allocated at ``lora.rank`` (the physical bucket); ``init_rank``
    of them are active at the start and grow up to ``max_rank`` (the bucket doubles when needed).
    """

    method: str = 'apt'
    target_density: float = apt_schedules.DEFAULT_ENCODER_DENSITY
    num_pruning_steps: int = 10
    prune_start_fraction: float = 0.0
    prune_end_fraction: float = 0.7
    beta: float = 0.85  # salience EMA decay (masks and LoRA ranks)
    mask_step_size: float = 0.0  # 0 = 1 / (steps between pruning steps)
    init_rank: int = 0  # 0 = lora.rank
    max_rank: int = 64
    tuning_growth: float = 4.0  # LoRA parameters grow to this multiple over the pruning window
    distill: bool = True
    temperature: float = 2.0
    distill_weight: float = 1.0  # final mu
    # Weight of the layer-wise hidden MSE in L_distill (0 = logit KL only). None = 1.0 for
    # encoders, 0 for causal LMs: a LLaMA-family residual stream carries massive activations
    # (SmolLM2's mean square is ~5e3), so the raw MSE would swamp the task loss.
    hidden_weight: float | None = None
    # The self-distillation teacher. 'snapshot': the current (compacted) frozen backbone with the
    # student's trainable params as of the last pruning step (APT's shared backbone; after the
    # last pruning step it equals the student). 'dense': the unpruned backbone with the
    # student's trainable params as of the start of the pruning window, kept for the whole run
    # (one more copy of the frozen backbone in the optimizer state).
    teacher: str = 'snapshot'
    # When the snapshot teacher takes the student's trainable params. 'pruning': at every
    # pruning step (after the step it equals the student). 'eval': whenever the validation
    # metric improves (the paper; needs train.eval_every > 0), the snapshot being pruned and
    # rank-resized with the student at pruning steps in between.
    teacher_refresh: str = 'pruning'
    compaction: bool = True
    # Compact physically at every k-th pruning step, always at the last, and at any step whose
    # LoRA growth resizes the adapters (that re-jits anyway); the steps in between only harden
    # the masks, so the model keeps its shapes and the train step is not re-compiled (pruned
    # units stay masked until the next compaction). 1 = every pruning step.
    compact_every: int = 1
    count_embeddings: bool = False
    # Structure score the masks rank by. 'apt': the paper's sum|H| * sum|dL/dH| per channel
    # (+ the outlier term). 'fisher' (not in the paper): the per-example mask Fisher
    # sum_b (sum_t H . dL/dH)^2 of Kwon et al. 2022 (scores.fisher_from_taps).
    salience: str = 'apt'
    outlier: bool | None = None  # kurtosis outlier term (APT salience); None = on for causal LMs
    check_compaction: bool = True  # log max |masked - compacted| logits at each pruning step
    export_dir: str | None = 'pruned'  # relative to run_dir; null = no export at the end
    # Per-structure floor (not in the paper): every layer keeps at least this fraction of its
    # original heads and neurons, and the hidden size this fraction of its width. 0 = APT's pure
    # global ranking, which may leave a layer with a single head.
    min_keep_fraction: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if self.num_pruning_steps < 1:
            raise ValueError(f'prune.num_pruning_steps={self.num_pruning_steps} must be >= 1')
        if not 0 <= self.prune_start_fraction < self.prune_end_fraction <= 1:
            raise ValueError(
                f'need 0 <= prune.prune_start_fraction={self.prune_start_fraction} < '
                f'prune.prune_end_fraction={self.prune_end_fraction} <= 1'
            )
        if not 0 <= self.beta < 1:
            raise ValueError(f'prune.beta={self.beta} must be in [0, 1); APT uses 0.85')
        if self.mask_step_size < 0 or self.init_rank < 0 or self.max_rank < 1:
            raise ValueError(
                f'prune.mask_step_size={self.mask_step_size}, prune.init_rank={self.init_rank} '
                f'must be >= 0 and prune.max_rank={self.max_rank} >= 1'
            )
        if self.temperature <= 0 or not 0 <= self.distill_weight <= 1:
            raise ValueError(
                f'prune.temperature={self.temperature} must be > 0 and '
                f'prune.distill_weight={self.distill_weight} in [0, 1]'
            )
        if self.compact_every < 1:
            raise ValueError(
                f'prune.compact_every={self.compact_every} must be >= 1 (1 = compact at every '
                'pruning step; k = at every k-th and the last; prune.compaction=false = never)')
        if self.tuning_growth < 1:
            raise ValueError(f'prune.tuning_growth={self.tuning_growth} must be >= 1')
        if self.salience not in SALIENCE:
            raise ValueError(f'prune.salience={self.salience!r} must be one of {SALIENCE}')
        if self.salience == 'fisher' and self.outlier:
            raise ValueError(
                'prune.outlier=true adds the kurtosis term to the APT salience; with '
                'prune.salience=fisher set prune.outlier=false (or leave it null)')
        if self.teacher not in TEACHERS:
            raise ValueError(f'prune.teacher={self.teacher!r} must be one of {TEACHERS}')
        if self.teacher_refresh not in TEACHER_REFRESH:
            raise ValueError(
                f'prune.teacher_refresh={self.teacher_refresh!r} must be one of {TEACHER_REFRESH}')
        if self.teacher_refresh == 'eval' and self.teacher != 'snapshot':
            raise ValueError(
                f'prune.teacher_refresh=eval refreshes the snapshot teacher, but '
                f'prune.teacher={self.teacher!r} (the dense teacher is fixed at the window '
                'start); use prune.teacher=snapshot or prune.teacher_refresh=pruning')
        if not 0 <= self.min_keep_fraction <= 1:
            raise ValueError(
                f'prune.min_keep_fraction={self.min_keep_fraction} must be in [0, 1] '
                '(0 = no floor; 0.25 = every layer keeps at least a quarter of its heads/neurons)')
        if self.hidden_weight is not None and self.hidden_weight < 0:
            raise ValueError(
                f'prune.hidden_weight={self.hidden_weight} must be >= 0 (0 = logit KL only)')
