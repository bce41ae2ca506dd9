"""APT salience: activation-gradient outer products per structure, plus the outlier term.

Scores are a flat dict keyed like the structures (``jaxprune.models.structures``)::

    {('heads', l): f32[G_l],     # one entry per KV group (its query heads) of layer l
     ('mlp', l): f32[F_l],       # one entry per FFN intermediate neuron of layer l
     ('hidden', None): f32[D]}   # one entry per residual-stream dimension (shared by all layers)

The same keys index the keep vectors of ``jaxprune.masks._budget``, the soft masks of
``jaxprune.transforms._apt_masks`` and the ``keep`` argument of ``jaxprune.surgery.prune``.
Structures are duck-typed: anything with ``kind``, ``layer``, ``size``, ``params_per_unit`` and
``slices`` (each with ``path``, ``axis``, ``width``) works.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

# Which tap site carries the channels of each structure kind (see the models' taps contract).
SITES = {'heads': 'attn_ctx', 'mlp': 'mlp', 'hidden': 'resid'}
# The structure scores APT's masks can rank by: apt_salience (the paper) or fisher_from_taps.
SALIENCE = ('apt', 'fisher')


def structure_key(structure: Any) -> tuple[str, int | None]:
    """The ``(kind, layer)`` key that indexes scores, masks and keep vectors of a structure."""
    return (structure.kind, structure.layer)


def channel_salience(act_abs_sum: jax.Array, tap_grad: jax.Array) -> jax.Array:
    r"""Per-channel APT salience from summed activations and the tap gradient.

    .. math::
        S_c = \Big(\sum_{b,t} |H_{b,t,c}|\Big)\Big(\sum_{b,t} |\partial L/\partial H_{b,t,c}|\Big)

    Args:
      act_abs_sum: ``f32[C]``, :math:`\sum_{b,t} |H|` as returned by the model's ``acts``.
      tap_grad: ``f32[..., C]``, gradient of the loss with respect to the zero tap at the site.

    Returns:
      ``f32[C]`` salience per channel.

    References:
      Zhao, Hajishirzi, Cao, *APT: Adaptive Pruning and Tuning Pretrained Language Models for
      Efficient Training and Inference*, ICML 2024, Eq. 3 (the outer-product approximation of
      :math:`\sum |H \odot \nabla_H L|` that needs only two reductions per channel).
    """
    grad_abs_sum = jnp.abs(tap_grad).reshape(-1, tap_grad.shape[-1]).sum(0)
    return act_abs_sum.astype(jnp.float32) * grad_abs_sum.astype(jnp.float32)


def salience_from_taps(
    acts: Sequence[Mapping[str, jax.Array]],
    tap_grads: Sequence[Mapping[str, jax.Array]],
    structures: Sequence[Any],
) -> dict[tuple[str, int | None], jax.Array]:
    r"""APT salience of every structure from one forward/backward pass with taps.

    For a unit that owns channels :math:`C_u` of its site the score is
    :math:`\sum_{c \in C_u} S_c` (:func:`channel_salience`): a head group sums the
    ``q_per_kv * head_dim`` channels of the ``o_proj`` input (``'attn_ctx'``), a neuron is one
    channel of the ``down_proj`` input (``'mlp'``), and a hidden dimension sums its residual-tap
    salience over all layers (``'resid'``).

    Args:
      acts: per-layer dicts ``{site: f32[C]}`` (per-channel :math:`\sum |H|`) from
        ``model(..., taps=zeros)``.
      tap_grads: per-layer dicts ``{site: f32[B, T, C]}`` from ``jax.grad`` with respect to taps.
      structures: the model's structures; units of a structure own contiguous equal channel
        blocks of the site (``C % size == 0``).

    Returns:
      Dict ``{(kind, layer): f32[size]}`` with one entry per structure.

    Raises:
      ValueError: for an unknown structure kind or a site whose width is not a multiple of the
        structure size.

    References:
      Zhao et al., ICML 2024, Sec. 4.1 "Outlier-aware salience scoring", Eq. 3.
    """
    scores = {}
    hidden = None
    for structure in structures:
        kind, layer = structure_key(structure)
        if kind not in SITES:
            raise ValueError(f'{kind=} has no APT tap site; expected one of {sorted(SITES)}')
        site = SITES[kind]
        if kind == 'hidden':
            if hidden is None:
                hidden = sum(
                    channel_salience(a[site], g[site]) for a, g in zip(acts, tap_grads, strict=True)
                )
            per_channel = hidden
        else:
            per_channel = channel_salience(acts[layer][site], tap_grads[layer][site])
        scores[(kind, layer)] = _sum_blocks(per_channel, structure.size, f'{kind} {layer=}')
    return scores


def _sum_blocks(values: jax.Array, size: int, what: str) -> jax.Array:
    if values.shape[-1] % size:
        raise ValueError(
            f'site width {values.shape[-1]} of {what} is not a multiple of {size=}; check that the '
            'taps come from the same config as the structures'
        )
    return values.reshape(*values.shape[:-1], size, -1).sum(-1)


def fisher_from_taps(
    tap_grads: Mapping[str, Any],
    structures: Sequence[Any],
) -> dict[tuple[str, int | None], jax.Array]:
    r"""Fisher salience of every structure from the per-example mask taps of one backward pass.

    With :math:`m_u` a mask on unit :math:`u` and :math:`L_b` the loss of example :math:`b`,

    .. math:: F_u = \sum_b \Big(\frac{\partial L_b}{\partial m_u}\Big)^2,
        \qquad \frac{\partial L_b}{\partial m_u} = \sum_{t} \sum_{c \in C_u}
        H_{b,t,c}\,\frac{\partial L_b}{\partial H_{b,t,c}},

    the diagonal of the empirical Fisher information of the masks: removing a set of units
    raises the loss by about :math:`\tfrac12 \sum_u F_u` (second order, at a minimum). Unlike
    the APT score (:func:`channel_salience`, which multiplies the sums of :math:`|H|` and
    :math:`|\partial L/\partial H|` over the whole batch) the product is taken per token and
    the channels of a unit are summed *before* squaring, so activations and gradients that cancel
    do not count. A hidden dimension's gradient is that of its mask itself (shared by the
    embeddings, every sublayer output and every norm), taken per example.

    Args:
      tap_grads: gradients of the taps built by ``jaxprune.methods._apt.fisher_taps``:
        ``{'layers': ({'attn_ctx_mask': f32[B, 1, C], 'mlp_mask': f32[B, 1, F]}, ...),
        'hidden_mask': f32[B, 1, D]}``. With a batch-mean loss they are
        :math:`\partial L_b / \partial m / B`, a common factor that does not change the ranking.
      structures: the model's structures.

    Returns:
      Dict ``{(kind, layer): f32[size]}``.

    Raises:
      ValueError: for an unknown structure kind or a missing mask tap.

    References:
      Kwon, Kim, Mahoney, Hassoun, Keutzer, Gholami, *A Fast Post-Training Pruning Framework
      for Transformers*, NeurIPS 2022, Sec. 4.1 (Fisher-based mask search).
    """
    def per_example(tree, name, where):
        if name not in tree:
            raise ValueError(
                f'no {name!r} tap gradient {where}; build the taps with '
                'jaxprune.methods._apt.fisher_taps(config, batch, seq)'
            )
        g = tree[name]
        return g.reshape(g.shape[0], g.shape[-1]).astype(jnp.float32)

    scores = {}
    for structure in structures:
        kind, layer = structure_key(structure)
        if kind not in SITES:
            raise ValueError(f'{kind=} has no APT tap site; expected one of {sorted(SITES)}')
        if kind == 'hidden':
            g = per_example(tap_grads, 'hidden_mask', 'at the top level')
        else:
            g = per_example(tap_grads['layers'][layer], f'{SITES[kind]}_mask', f'in {layer=}')
        per_unit = _sum_blocks(g, structure.size, f'{kind} {layer=}')  # [B, size]
        scores[(kind, layer)] = jnp.sum(per_unit**2, axis=0)
    return scores


def excess_kurtosis(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    r"""Fisher (excess) kurtosis :math:`E[(x-\mu)^4] / \sigma^4 - 3` along ``axis``."""
    x = x.astype(jnp.float32)
    centered = x - x.mean(axis, keepdims=True)
    var = jnp.mean(centered**2, axis)
    return jnp.mean(centered**4, axis) / jnp.maximum(var**2, eps) - 3.0


def outlier_scores(
    params: Any,
    acts: Sequence[Mapping[str, jax.Array]],
    structures: Sequence[Any],
    *,
    consumers: Sequence[str] = ('o_proj', 'down_proj', 'out', 'down'),
) -> dict[tuple[str, int | None], jax.Array]:
    r"""Outlier term of APT's decoder salience: :math:`\sqrt{\max(\mathrm{Kurt}(O_u), 0)}`.

    For a head group or neuron :math:`u` let :math:`W` be the kernel ``(K, N)`` that consumes the
    unit's channels (``o_proj`` for heads, ``down_proj`` for neurons: the slice of ``u`` along
    axis 0 of a kernel whose module name is in ``consumers``) and :math:`a_k = \sum_{b,t}|H_k|`
    the activation of input channel :math:`k`. The activation-weighted weights are
    :math:`O_{k,n} = |W_{k,n}|\,a_k` for :math:`k \in C_u`, and :math:`\mathrm{Kurt}(O_u)` is the
    excess kurtosis over all :math:`|C_u| \cdot N` entries. Units whose output weights carry
    outlier features (a few huge entries) get a bonus, so they are pruned last.

    Deliberate deviations: the reference code computes the kurtosis of the activation-weighted
    weights too, but over whole modules' outputs; we define it per unit on the consumer rows so it
    needs only the acts we already have. Hidden dimensions get no outlier term (zeros): they are
    shared by every matrix and the paper applies the term to heads and neurons. For a neuron
    (one channel) :math:`a_k` is a constant factor and the kurtosis reduces to that of its row.

    Args:
      params: parameter pytree (pure dict) holding the consumer kernels at the slices' paths.
      acts: per-layer ``{site: f32[C]}`` activations (:func:`salience_from_taps`).
      structures: the model's structures.
      consumers: module names whose axis-0 slices define the consumer rows (Llama ``o_proj`` /
        ``down_proj``, BERT ``out`` / ``down``).

    Returns:
      ``{(kind, layer): f32[size]}`` outlier bonus for every structure (zeros where undefined).

    Raises:
      ValueError: if a head or neuron structure has no consumer slice.

    References:
      Zhao et al., ICML 2024, Sec. 4.1, Eq. 4 (kurtosis-based outlier-aware salience for LLMs).
    """
    out = {}
    for structure in structures:
        key = structure_key(structure)
        if structure.kind == 'hidden':
            out[key] = jnp.zeros((structure.size,), jnp.float32)
            continue
        slc = _consumer_slice(structure, consumers)
        kernel = jnp.abs(get_path(params, slc.path).astype(jnp.float32))
        act = acts[structure.layer][SITES[structure.kind]].astype(jnp.float32)
        weighted = kernel * act[:, None]
        per_unit = weighted.reshape(structure.size, -1)
        out[key] = jnp.sqrt(jnp.maximum(excess_kurtosis(per_unit), 0.0))
    return out


def _consumer_slice(structure: Any, consumers: Sequence[str]) -> Any:
    for slc in structure.slices:
        if slc.axis == 0 and slc.path[-1] == 'kernel' and any(c in slc.path for c in consumers):
            return slc
    raise ValueError(
        f'structure {structure_key(structure)} has no axis-0 kernel slice in {consumers=}; '
        'pass the module names that consume its channels'
    )


def get_path(tree: Any, path: Sequence[Any]) -> Any:
    """Follow a key path (dict keys and sequence indices) into a nested pytree."""
    node = tree
    for key in path:
        node = node[key]
    return node


def apt_salience(
    acts: Sequence[Mapping[str, jax.Array]],
    tap_grads: Sequence[Mapping[str, jax.Array]],
    structures: Sequence[Any],
    *,
    params: Any = None,
    outlier: bool = False,
) -> dict[tuple[str, int | None], jax.Array]:
    r"""APT salience :math:`S_u` (+ the decoder outlier term when ``outlier``).

    Args:
      acts: see :func:`salience_from_taps`.
      tap_grads: see :func:`salience_from_taps`.
      structures: the model's structures.
      params: parameters (needed only when ``outlier``).
      outlier: add :func:`outlier_scores` (APT uses it for decoder-only LLMs).

    Returns:
      ``{(kind, layer): f32[size]}``.

    Raises:
      ValueError: if ``outlier`` is set without ``params``.
    """
    scores = salience_from_taps(acts, tap_grads, structures)
    if not outlier:
        return scores
    if params is None:
        raise ValueError(f'{outlier=} needs params=...; pass the model parameters')
    bonus = outlier_scores(params, acts, structures)
    return jax.tree.map(jnp.add, scores, bonus)


def salience_density(
    scores: Mapping[tuple[str, int | None], jax.Array], structures: Sequence[Any]
) -> dict[tuple[str, int | None], jax.Array]:
    r"""Salience per parameter: :math:`S_u / \mathrm{params\_per\_unit}` (APT Sec. 4.2).

    ``params_per_unit`` is measured on the unpruned shapes of the structure; the budget search
    (:func:`jaxprune.masks._budget.budget_keep`) counts kept parameters exactly instead.
    """
    return {
        structure_key(s): scores[structure_key(s)] / float(max(s.params_per_unit, 1))
        for s in structures
    }
