"""Type aliases and the logical-axis vocabulary shared by models, masks, sharding and surgery.

Every ``nnx.Param`` in a jaxprune model carries ``sharding`` metadata made of these names. The
same names drive three things: the sharding rules table (logical axis -> mesh axis), the masks
(a mask indexes one logical axis) and surgery (removing units removes slices along an axis).
"""

from typing import Any

import jax

Params = Any  # A pytree of arrays (the trainable or full parameter state).
Masks = Any  # A pytree of float/bool arrays, 1 = keep; see ``jaxprune.models`` for the layout.
Scores = Any  # A pytree of float arrays with the same structure as the masks they rank.
PRNGKey = jax.Array

# Logical axis names. ``heads``/``kv_heads`` name the *flattened* ``num_heads * head_dim`` axis of a
# 2-D projection kernel (kernels are always 2-D ``(K, N)`` so that LoRA and 2:4 sparsity along K
# treat every linear layer alike); ``head_dim`` is used where a 3-D view exists.
VOCAB = 'vocab'
EMBED = 'embed'
HEADS = 'heads'
KV_HEADS = 'kv_heads'
HEAD_DIM = 'head_dim'
MLP = 'mlp'
LAYERS = 'layers'
LORA_RANK = 'lora_rank'
LABELS = 'labels'
POSITION = 'position'

LOGICAL_AXES = (VOCAB, EMBED, HEADS, KV_HEADS, HEAD_DIM, MLP, LAYERS, LORA_RANK, LABELS, POSITION)
