"""Optax transformations: the mask owner, the decay of pruned weights, the proximal regulariser
and parameter averaging.

Design (optax style): one factory per mechanism returning ``GradientTransformationExtraArgs``,
with a ``<Name>State`` NamedTuple. Exactly one transform in a chain owns a field named ``masks``
(``sparsify`` for AST, ``apt_masks`` for APT), so ``optax.tree.get(state, 'masks')`` finds it;
the owner forwards ``masks=`` to the transforms it wraps. Activation statistics (APT salience)
arrive as extra args of ``update``.
"""

from jaxprune.transforms._apt_masks import AptMaskState as AptMaskState
from jaxprune.transforms._apt_masks import apt_masks as apt_masks
from jaxprune.transforms._average import ParamEmaState as ParamEmaState
from jaxprune.transforms._average import averaged_params as averaged_params
from jaxprune.transforms._average import param_ema as param_ema
from jaxprune.transforms._average import shift_average as shift_average
from jaxprune.transforms._decay import MaskedWeightDecayState as MaskedWeightDecayState
from jaxprune.transforms._decay import masked_weight_decay as masked_weight_decay
from jaxprune.transforms._group_lasso import GroupLassoState as GroupLassoState
from jaxprune.transforms._group_lasso import group_lasso as group_lasso
from jaxprune.transforms._group_lasso import lora_shares_fn as lora_shares_fn
from jaxprune.transforms._group_lasso import prox_group as prox_group
from jaxprune.transforms._sparsify import SparsifyState as SparsifyState
from jaxprune.transforms._sparsify import sparsify as sparsify
