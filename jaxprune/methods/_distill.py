"""Knowledge-distillation losses: token-level KL (AST) and layer-wise hidden-state MSE (APT).

All losses are means over *valid* positions. Validity comes from an explicit ``mask`` (1 = use)
and/or, for the cross-entropy, ``labels != ignore_index``. Logits may be ``[..., V]`` for any
leading shape (``[B, T, V]`` for causal LMs, ``[B, C]`` for classification); the caller aligns
logits and labels (for causal LMs shift by one before calling).
"""

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp


def _valid(shape, mask, labels=None, ignore_index=None) -> jax.Array:
    valid = jnp.ones(shape, jnp.float32)
    if mask is not None:
        valid = valid * jnp.asarray(mask, jnp.float32)
    if labels is not None and ignore_index is not None:
        valid = valid * (jnp.asarray(labels) != ignore_index)
    return valid


def _masked_mean(x: jax.Array, valid: jax.Array) -> jax.Array:
    return jnp.sum(x * valid) / jnp.maximum(jnp.sum(valid), 1.0)


def kl_per_token(student_logits: jax.typing.ArrayLike, teacher_logits: jax.typing.ArrayLike, *,
                 temperature: float = 2.0) -> jax.Array:
    r"""Temperature-scaled forward KL of the teacher from the student at every position.

    .. math::
        \ell = T^2\,\mathrm{KL}\big(\mathrm{softmax}(z_t/T)\,\|\,\mathrm{softmax}(z_s/T)\big)
             = T^2 \sum_v p_{t,v}\,(\log p_{t,v} - \log p_{s,v})

    The :math:`T^2` factor keeps the gradient scale independent of :math:`T` (Hinton et al.).
    Computed in f32; positions where the teacher puts zero mass contribute 0.

    Args:
      student_logits: ``[..., V]``.
      teacher_logits: ``[..., V]`` (treated as constants: wrap in ``jax.lax.stop_gradient``
        yourself if the teacher shares parameters with the student).
      temperature: :math:`T > 0`.

    Returns:
      ``f32[...]``.

    Raises:
      ValueError: if ``temperature <= 0`` or shapes differ.

    References:
      Hinton, Vinyals, Dean, *Distilling the Knowledge in a Neural Network*, 2015, Sec. 2.
    """
    if not isinstance(temperature, jax.Array) and temperature <= 0:
        raise ValueError(f'{temperature=} must be > 0; AST uses 2.0')
    s = jnp.asarray(student_logits, jnp.float32)
    t = jnp.asarray(teacher_logits, jnp.float32)
    if s.shape != t.shape:
        raise ValueError(f'{s.shape=} != {t.shape=}; student and teacher must share the vocab')
    log_ps = jax.nn.log_softmax(s / temperature, axis=-1)
    log_pt = jax.nn.log_softmax(t / temperature, axis=-1)
    pt = jnp.exp(log_pt)
    kl = jnp.sum(jnp.where(pt > 0, pt * (log_pt - log_ps), 0.0), axis=-1)
    return kl * temperature**2


def kl_distill(student_logits: jax.typing.ArrayLike, teacher_logits: jax.typing.ArrayLike, *,
               temperature: float = 2.0, mask: jax.typing.ArrayLike | None = None) -> jax.Array:
    """Mean of :func:`kl_per_token` over valid positions (``mask`` 1 = use; ``None`` = all)."""
    kl = kl_per_token(student_logits, teacher_logits, temperature=temperature)
    return _masked_mean(kl, _valid(kl.shape, mask))


def cross_entropy(logits: jax.typing.ArrayLike, labels: jax.typing.ArrayLike, *,
                  mask: jax.typing.ArrayLike | None = None, ignore_index: int = -100
                  ) -> jax.Array:
    """Mean token cross-entropy over positions with ``labels != ignore_index`` and ``mask``."""
    logits = jnp.asarray(logits, jnp.float32)
    labels = jnp.asarray(labels)
    valid = _valid(labels.shape, mask, labels, ignore_index)
    safe = jnp.where(labels == ignore_index, 0, labels)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
    return _masked_mean(nll, valid)


def ast_loss(student_logits: jax.typing.ArrayLike, teacher_logits: jax.typing.ArrayLike,
             labels: jax.typing.ArrayLike, *, temperature: float = 2.0, ce_weight: float = 1.0,
             kd_weight: float = 0.5, mask: jax.typing.ArrayLike | None = None,
             ignore_index: int = -100) -> tuple[jax.Array, dict[str, jax.Array]]:
    r"""AST's training loss: task cross-entropy plus token-level distillation from the dense model.

    .. math::
        L = \alpha\,\mathrm{CE}(z_s, y) + \beta\,T^2\,\mathrm{KL}(p_t^{T} \| p_s^{T}),
        \qquad \alpha = 1,\ \beta = 0.5,\ T = 2

    Both terms average over the same valid positions (``mask`` and ``labels != ignore_index``),
    so padding and ignored labels contribute to neither.

    Args:
      student_logits: ``[..., V]`` logits of the sparse student.
      teacher_logits: ``[..., V]`` logits of the dense teacher (constants).
      labels: ``int[...]`` targets aligned with the logits.
      temperature: KD temperature :math:`T`.
      ce_weight: :math:`\alpha`.
      kd_weight: :math:`\beta`.
      mask: optional ``[...]`` 0/1 validity mask (e.g. the attention mask).
      ignore_index: label value excluded from both terms.

    Returns:
      ``(loss, {'ce': ..., 'kd': ...})`` (scalars, f32).

    References:
      Huang et al., *Pruning Large Language Models with Semi-Structural Adaptive Sparse
      Training*, AAAI 2025, Sec. 3 (knowledge distillation from the dense model with KL on the
      output logits). The weights and temperature are explicit arguments; the defaults
      (``CE + 0.5 * KL``, ``T = 2``) are this project's and should be checked against the
      paper's hyper-parameter table for a faithful reproduction.
    """
    labels = jnp.asarray(labels)
    valid = _valid(labels.shape, mask, labels, ignore_index)
    ce = cross_entropy(student_logits, labels, mask=valid, ignore_index=ignore_index)
    kd = kl_distill(student_logits, teacher_logits, temperature=temperature, mask=valid)
    return ce_weight * ce + kd_weight * kd, {'ce': ce, 'kd': kd}


def hidden_mse(student_hiddens: Sequence[jax.typing.ArrayLike],
               teacher_hiddens: Sequence[jax.typing.ArrayLike],
               proj_params: Sequence[Any] | None = None, *,
               mask: jax.typing.ArrayLike | None = None) -> jax.Array:
    r"""Layer-wise hidden-state distillation: mean over layer pairs of the masked token MSE.

    .. math::
        L = \frac{1}{L}\sum_{l} \frac{1}{|\mathcal V|\,D_t}
            \sum_{p \in \mathcal V} \| h^s_{l,p} W_l - h^t_{l,p} \|^2

    where :math:`W_l` is a learned ``[D_s, D_t]`` projection (identity when ``None``; needed once
    the student's hidden size is pruned).

    Args:
      student_hiddens: sequence of ``[..., D_s]`` hidden states (already paired with the teacher
        layers, e.g. every teacher layer mapped to its student layer).
      teacher_hiddens: sequence of ``[..., D_t]`` teacher hidden states, same length.
      proj_params: optional sequence of ``[D_s, D_t]`` matrices or ``None`` entries, or a
        ``dict`` with ``'kernel'`` (and optional ``'bias'``) per layer.
      mask: optional ``[...]`` 0/1 validity mask shared by all layers.

    Returns:
      ``f32`` scalar.

    Raises:
      ValueError: on length or width mismatches.

    References:
      Zhao, Hajishirzi, Cao, *APT: Adaptive Pruning and Tuning Pretrained Language Models for
      Efficient Training and Inference*, ICML 2024, Sec. 4.3 (self-distillation with a layer
      mapping and a learned projection).
    """
    if len(student_hiddens) != len(teacher_hiddens) or not student_hiddens:
        raise ValueError(f'{len(student_hiddens)=} and {len(teacher_hiddens)=} must be equal > 0')
    if proj_params is not None and len(proj_params) != len(student_hiddens):
        raise ValueError(f'{len(proj_params)=} must equal the number of layer pairs')
    total = jnp.zeros((), jnp.float32)
    for i, (hs, ht) in enumerate(zip(student_hiddens, teacher_hiddens, strict=True)):
        hs = jnp.asarray(hs, jnp.float32)
        ht = jnp.asarray(ht, jnp.float32)
        proj = None if proj_params is None else proj_params[i]
        if proj is not None:
            if isinstance(proj, dict):
                hs = hs @ jnp.asarray(proj['kernel'], jnp.float32) + jnp.asarray(
                    proj.get('bias', 0.0), jnp.float32)
            else:
                hs = hs @ jnp.asarray(proj, jnp.float32)
        if hs.shape != ht.shape:
            raise ValueError(f'layer {i}: projected student {hs.shape} != teacher {ht.shape}; '
                             'pass a [D_s, D_t] projection in proj_params')
        sq = jnp.mean(jnp.square(hs - ht), axis=-1)
        total = total + _masked_mean(sq, _valid(sq.shape, mask))
    return total / len(student_hiddens)
