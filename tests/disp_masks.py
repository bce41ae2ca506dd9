"""Shared test helpers for ATP/DISP masks: random masks, a plain-numpy kept-parameter count and
a brute-force budget cut.

Importable from any test module as ``import disp_masks`` (pytest puts ``tests/``, the root
conftest's folder, on ``sys.path``).
"""

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.masks import _density


def random_masks(cfg, seed, keep=0.6, empty_layer=None):
    """Random {0, 1} DISP masks for ``cfg``; ``empty_layer`` loses all KV groups and neurons."""
    rng = np.random.default_rng(seed)
    layers = []
    for i, d in enumerate(_density.layer_dims(cfg)):
        m = {k: (rng.random(n) < keep).astype(np.float32) for k, n in d.group_sizes().items()}
        if i == empty_layer:  # a whole attention block (0 KV groups kept) and FFN pruned
            m['attn_ctx'][:] = 0
            m['mlp'][:] = 0
        layers.append({k: jnp.asarray(v) for k, v in m.items()})
    return {'layers': tuple(layers)}


def reference_kept(masks, dims):
    """Plain numpy: count surviving weights one matrix entry at a time (no density module)."""
    total = 0
    for m, d in zip(masks['layers'], dims, strict=True):
        m = {k: np.asarray(v) > 0.5 for k, v in m.items()}
        ctx = m['attn_ctx'].reshape(d.kv_heads, d.q_per_kv, d.head_dim)
        group = ctx.any(axis=(1, 2))
        q_out = np.repeat(group, d.q_per_kv * d.head_dim)
        k_out = np.repeat(group, d.head_dim)
        v_out = ctx.any(axis=1).reshape(-1)
        pairs = [(m['attn_in'], q_out), (m['attn_in'], k_out), (m['attn_in'], v_out),
                 (m['attn_ctx'], m['attn_out']), (m['mlp_in'], m['mlp']),
                 (m['mlp_in'], m['mlp']), (m['mlp'], m['mlp_out'])]
        total += sum(int(np.outer(a, b).sum()) for a, b in pairs)
    return total


def reference_projection(logits, dims, target, bias):
    """Linear scan over every prefix of the ranking by ``logit + bias`` with the numpy count:
    ``(masks of the longest prefix within target * prunable, masks of one unit more)``."""
    leaves, treedef = jax.tree.flatten(logits)
    flat = np.concatenate([np.asarray(x).ravel() + bias for x in leaves])
    order = np.argsort(-flat, kind='stable')
    budget = target * _density.prunable_params(dims)

    def masks_of(k):
        keep = np.zeros(flat.size, np.float32)
        keep[order[:k]] = 1
        parts = np.split(keep, np.cumsum([x.size for x in leaves])[:-1])
        return jax.tree.unflatten(treedef, [p.reshape(x.shape) for p, x in zip(parts, leaves)])

    best = max(k for k in range(flat.size + 1) if reference_kept(masks_of(k), dims) <= budget)
    return masks_of(best), masks_of(min(best + 1, flat.size))
