"""AST: Semi-Structural Adaptive Sparse Training (Huang et al., AAAI 2025) as an optax recipe.

The recipe is ``sparsify(chain(masked_weight_decay, adamw))``:

1. **Initial mask** (``init_score_fn``): magnitude ``|W|`` by default, or Wanda
   (``jaxprune.scores._wanda.wanda_scores`` with calibration norms), 2:4 along K (axis 0 of each
   ``(K, N)`` kernel under ``layers``).
2. **Adaptive masks**: weights stay dense; the forward uses :func:`ast_forward_params` (``W * M``
   with a straight-through gradient to all of ``W``); every ``update_every`` steps the mask is
   recomputed from the post-update weights' magnitude and the flip rate is recorded.
3. **Annealed decay** of the pruned weights, ``lambda`` ramping 0 -> ``decay`` over
   ``decay_ramp_steps`` (AST: the first ~20% of training), which stabilises the mask.
4. **Distillation** from the dense teacher: ``jaxprune.methods._distill.ast_loss`` (CE + KL).
5. **AST-Boosted** (optional): the SLoRB bypass :func:`slorb_init` / :func:`slorb_apply`, a
   ``+k^{-1}`` parameter branch that recovers part of the pruned weights' function.

The masks are found with ``optax.tree.get(opt_state, 'masks')``.
"""

import functools
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxprune.masks import _nm
from jaxprune.scores import _magnitude
from jaxprune.transforms import _decay, _sparsify


def ast(
    learning_rate: optax.ScalarOrSchedule,
    *,
    decay_ramp_steps: int,
    n: int = 2,
    m: int = 4,
    update_every: int = 10,
    decay: optax.ScalarOrSchedule = 6e-5,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    include: str = _nm.DEFAULT_INCLUDE,
    init_score_fn: Callable[[optax.Params], Any] | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""The AST optimizer: N:M adaptive masks + annealed decay of pruned weights + AdamW.

    .. math::
        \tilde W = W \odot M \ (\text{STE}),\quad
        g = \nabla_{\tilde W} L + \lambda(t)(1-M)\odot W,\quad
        W \leftarrow \mathrm{AdamW}(W, g),\quad
        M \leftarrow \mathrm{top}_{n:m}^{K}(|W|)\ \text{every}\ T\ \text{steps}

    Use with the STE forward::

        tx = ast(1e-4, decay_ramp_steps=total_steps // 5)
        state = tx.init(params)
        masks = optax.tree.get(state, 'masks')
        grads = jax.grad(lambda p: loss(ast_forward_params(p, masks)))(params)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)

    With ``optax.inject_hyperparams`` mark the structural arguments static:
    ``optax.inject_hyperparams(ast, static_args=('n', 'm', 'update_every'))``.

    Args:
      learning_rate: AdamW learning rate (float or schedule).
      decay_ramp_steps: steps of the linear ramp of the pruned-weight decay from 0 to ``decay``
        (AST: ~20% of the total steps); 0 for constant decay.
      n: kept weights per group of ``m`` along K.
      m: group size.
      update_every: mask recompute period in steps (AST: 10).
      decay: final pruned-weight decay :math:`\lambda` (AST: 6e-5), or a schedule (then pass
        ``decay_ramp_steps=0``).
      b1: AdamW :math:`\beta_1`.
      b2: AdamW :math:`\beta_2`.
      eps: AdamW epsilon.
      weight_decay: ordinary decoupled AdamW weight decay of all weights (default 0).
      include: leaf-path regex of the sparse kernels (default: every kernel under ``layers``).
      init_score_fn: score function of the initial mask, e.g.
        ``functools.partial(wanda_scores, act_norms=norms)``; default magnitude.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a
      :class:`~jaxprune.transforms._sparsify.SparsifyState` (fields ``masks``, ``flip_rate``).

    References:
      Huang, Hu, Jia, Chen, Wang, Zhu, *Pruning Large Language Models with Semi-Structural
      Adaptive Sparse Training*, AAAI 2025, Sec. 3 (adaptive mask learning, annealed decay of
      the masked weights; defaults T=10, lambda=6e-5). Deviations: masks are recomputed from
      weight magnitude (Wanda only for the initial mask, via ``init_score_fn``); any
      ``score_fn`` can be used through :func:`~jaxprune.transforms._sparsify.sparsify`. The
      decay term is added to the gradient before AdamW (see ``masked_weight_decay``).
    """
    if callable(decay):
        if decay_ramp_steps:
            raise ValueError(f'{decay_ramp_steps=} must be 0 when decay is a schedule')
        decay_tx = _decay.masked_weight_decay(decay)
    else:
        decay_tx = _decay.masked_weight_decay(decay, ramp_steps=decay_ramp_steps)
    inner = optax.chain(
        decay_tx,
        optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    return _sparsify.sparsify(
        inner,
        score_fn=_magnitude.magnitude_scores,
        mask_fn=functools.partial(_nm.nm_masks, n=n, m=m, include=include),
        update_every=update_every,
        init_score_fn=init_score_fn,
    )


def ast_forward_params(params: optax.Params, masks: Any) -> optax.Params:
    """Params for AST's forward pass: ``W * M`` with a straight-through gradient to dense ``W``.

    Alias of :func:`jaxprune.masks._nm.ste_apply`; ``masks`` is
    ``optax.tree.get(opt_state, 'masks')``.
    """
    return _nm.ste_apply(params, masks)


# ---------------------------------------------------------------------------------------------
# SLoRB (AST-Boosted): y = x (W * M) + (P x) S with P summing blocks of k input channels.


def _check_k(size: int, k: int, what: str) -> None:
    if not isinstance(k, int) or k < 1:
        raise ValueError(f'{k=} must be a positive int; AST uses 16')
    if size % k:
        raise ValueError(f'{what}: K={size} is not divisible by {k=}; choose k dividing K')


def slorb_init(w: jax.typing.ArrayLike, mask: jax.typing.ArrayLike, *, k: int = 16) -> jax.Array:
    r"""SLoRB bypass weights: the mean of the pruned weights in each block of ``k`` input rows.

    .. math::
        S_{b,n} = \frac{1}{k}\sum_{i = bk}^{bk + k - 1} W_{i,n}\,(1 - M_{i,n})

    This is the least-squares choice: with :math:`P \in \{0,1\}^{K/k \times K}` summing each
    block, :math:`P^\top S` (``repeat(S, k, axis=0)``) is the closest block-constant matrix to the
    pruned part :math:`W \odot (1 - M)` in Frobenius norm (the normal equations give
    :math:`P\,(W \odot (1-M) - P^\top S) = 0`), so the layer
    :math:`x (W \odot M) + (P x) S = x (W \odot M + P^\top S)` starts as the best
    block-constant correction of the pruned model towards the dense one. Kept positions count as
    zeros in the mean (the bypass adds to them as well). Extra parameters: :math:`NK/k` (+6.25%
    of the dense kernel for ``k = 16``).

    Args:
      w: dense kernel ``(K, N)``.
      mask: ``bool`` mask ``(K, N)`` (``True`` = kept).
      k: block size along K.

    Returns:
      ``S`` of shape ``(K // k, N)`` in ``w.dtype`` (computed in f32).

    Raises:
      ValueError: if ``K % k != 0`` or shapes differ.

    References:
      Huang et al., AAAI 2025, Sec. 3 "AST-Boosted" (SLoRB, initialised from the pruned weights;
      our ``(K, N)`` layout transposes the paper's ``(out, in)`` notation).
    """
    w = jnp.asarray(w)
    mask = jnp.asarray(mask, bool)
    if w.ndim != 2 or mask.shape != w.shape:
        raise ValueError(f'slorb_init: {w.shape=} and {mask.shape=} must be equal (K, N)')
    _check_k(w.shape[0], k, 'slorb_init')
    pruned = jnp.where(mask, 0.0, w.astype(jnp.float32))
    return pruned.reshape(w.shape[0] // k, k, w.shape[1]).mean(1).astype(w.dtype)


def slorb_apply(x: jax.typing.ArrayLike, s: jax.typing.ArrayLike, *, k: int = 16) -> jax.Array:
    r"""The SLoRB branch :math:`(P x) S`: sum ``x`` over blocks of ``k`` channels, then ``@ S``.

    Args:
      x: activations ``[..., K]``.
      s: bypass weights ``(K // k, N)``.
      k: block size.

    Returns:
      ``[..., N]``; add it to the sparse layer's output.

    Raises:
      ValueError: if ``K % k != 0`` or ``s`` has the wrong number of rows.
    """
    x = jnp.asarray(x)
    s = jnp.asarray(s)
    kdim = x.shape[-1]
    _check_k(kdim, k, 'slorb_apply')
    if s.ndim != 2 or s.shape[0] != kdim // k:
        raise ValueError(f'slorb_apply: {s.shape=} must be (K // k, N) = ({kdim // k}, N)')
    px = x.reshape(*x.shape[:-1], kdim // k, k).sum(-1)
    return px @ s


def slorb_dense(s: jax.typing.ArrayLike, *, k: int = 16) -> jax.Array:
    """The dense ``(K, N)`` matrix :math:`P^\\top S` of the bypass (``repeat(S, k, axis=0)``)."""
    return jnp.repeat(jnp.asarray(s), k, axis=0)


def slorb_init_tree(params: optax.Params, masks: Any, *, k: int = 16,
                    include: str | None = None) -> Any:
    """:func:`slorb_init` for every sparse kernel of a params pytree.

    Args:
      params: dense params.
      masks: masks pytree (``None`` = dense leaf, gets no bypass).
      k: block size.
      include: optional extra leaf-path regex restricting which sparse kernels get a bypass.

    Returns:
      A pytree shaped like ``masks`` with ``S`` arrays for sparse leaves and ``None`` elsewhere.
    """
    pattern = re.compile(include) if include is not None else None

    def one(path, mk, w):
        if mk is None or (pattern is not None and not pattern.search(_nm.path_str(path))):
            return None
        return slorb_init(w, mk, k=k)

    return jax.tree_util.tree_map_with_path(one, masks, params, is_leaf=lambda x: x is None)
