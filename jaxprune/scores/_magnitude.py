"""Magnitude scores: ``|W|``, the default N:M criterion and AST's mask-recompute score."""

from typing import Any

import jax
import jax.numpy as jnp


def magnitude_scores(params: Any) -> Any:
    r"""Element-wise magnitude scores :math:`S_{kn} = |W_{kn}|` for every leaf.

    Args:
      params: parameter pytree (dict or ``nnx.State``).

    Returns:
      A pytree of the same structure and dtypes with ``|W|``. Leaves that are ``None`` stay
      ``None``.

    References:
      Han et al., *Learning both Weights and Connections for Efficient Neural Networks*,
      NeurIPS 2015; Huang et al., *Pruning Large Language Models with Semi-Structural Adaptive
      Sparse Training*, AAAI 2025, Sec. 3 (masks are recomputed from the dense weights'
      magnitude during training).
    """
    return jax.tree.map(jnp.abs, params)
