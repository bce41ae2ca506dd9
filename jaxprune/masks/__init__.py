"""Masks: pure functions that build, convert and count masks.

Design: a mask is a pytree of arrays (1/True = keep). Weight masks (AST's N:M, ``_nm``) have the
structure of the params with ``None`` for dense leaves and group along the contraction axis K
(axis 0 of a ``(K, N)`` kernel). Structured masks (APT, ATP) act on activations and follow the
model's ``masks=`` layout; ``_structured`` converts between the unit layout keyed like
``models.structures`` and that layout, ``_budget`` fits units to a parameter budget exactly, and
``_density`` counts kept parameters of ATP's dimension-independent masks differentiably.
"""

from jaxprune.masks._budget import budget_keep as budget_keep
from jaxprune.masks._budget import kept_param_count as kept_param_count
from jaxprune.masks._budget import param_shapes as param_shapes
from jaxprune.masks._budget import total_prunable_params as total_prunable_params
from jaxprune.masks._density import GROUP_NAMES as GROUP_NAMES
from jaxprune.masks._density import LayerDims as LayerDims
from jaxprune.masks._density import density as density
from jaxprune.masks._density import kept_count as kept_count
from jaxprune.masks._density import kept_params as kept_params
from jaxprune.masks._density import layer_dims as layer_dims
from jaxprune.masks._density import linear_keep as linear_keep
from jaxprune.masks._density import log_ratio as log_ratio
from jaxprune.masks._density import prunable_params as prunable_params
from jaxprune.masks._gumbel import deterministic_masks as deterministic_masks
from jaxprune.masks._gumbel import gumbel_sigmoid as gumbel_sigmoid
from jaxprune.masks._gumbel import logistic_noise as logistic_noise
from jaxprune.masks._gumbel import sample_masks as sample_masks
from jaxprune.masks._gumbel import straight_through as straight_through
from jaxprune.masks._nm import DEFAULT_INCLUDE as DEFAULT_INCLUDE
from jaxprune.masks._nm import apply_masks as apply_masks
from jaxprune.masks._nm import is_nm as is_nm
from jaxprune.masks._nm import mask_density as mask_density
from jaxprune.masks._nm import nm_mask as nm_mask
from jaxprune.masks._nm import nm_masks as nm_masks
from jaxprune.masks._nm import nm_masks_for as nm_masks_for
from jaxprune.masks._nm import path_str as path_str
from jaxprune.masks._nm import ste_apply as ste_apply
from jaxprune.masks._structured import binarize as binarize
from jaxprune.masks._structured import keep_from_masks as keep_from_masks
from jaxprune.masks._structured import ones_like_structures as ones_like_structures
from jaxprune.masks._structured import to_model_masks as to_model_masks
