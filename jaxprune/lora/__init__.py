"""LoRA: adapters live inside ``models._layers.Linear`` at a maximum rank ``r``.

Design: LoRA factors are ``nnx.LoRAParam`` leaves (a subclass of ``nnx.Param``), so the usual NNX
filters select them for training (`trainable_filter`) and every params-shaped pytree (optimizer
state, masks, checkpoints) carries them. Effective ranks change through rank masks at runtime
(inside jit) and through physical rank resizing outside jit (`_grow`). `merge_lora` folds adapters
into kernels for export.
"""

from jaxprune.lora._grow import grow_ranks as grow_ranks
from jaxprune.lora._grow import growth_factor as growth_factor
from jaxprune.lora._grow import init_rank_masks as init_rank_masks
from jaxprune.lora._grow import rank_salience as rank_salience
from jaxprune.lora._grow import resize_model_ranks as resize_model_ranks
from jaxprune.lora._grow import resize_ranks as resize_ranks
from jaxprune.lora._grow import resize_ranks_like as resize_ranks_like
from jaxprune.lora._grow import tuning_params as tuning_params
from jaxprune.lora._grow import zero_inactive_ranks as zero_inactive_ranks
from jaxprune.lora._spec import DEFAULT_TARGETS as DEFAULT_TARGETS
from jaxprune.lora._spec import LoraSpec as LoraSpec
from jaxprune.lora._spec import lora_kwargs as lora_kwargs
from jaxprune.lora._spec import lora_param_count as lora_param_count
from jaxprune.lora._spec import merge_lora as merge_lora
from jaxprune.lora._spec import target_paths as target_paths
from jaxprune.lora._spec import trainable_filter as trainable_filter
