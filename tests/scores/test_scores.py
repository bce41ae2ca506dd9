"""Magnitude and Wanda scores: references, K-axis broadcasting, activation norms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune.masks import _nm
from jaxprune.scores import _magnitude, _wanda


def _params():
    k = jax.random.split(jax.random.key(0), 3)
    return {'layers': {0: {'q': {'kernel': jax.random.normal(k[0], (8, 4))},
                           'norm': {'scale': jax.random.normal(k[1], (4,))}}},
            'lm_head': {'kernel': jax.random.normal(k[2], (4, 6))}}


def test_magnitude_scores_matches_reference():
    params = _params()
    s = _magnitude.magnitude_scores(params)
    for a, b in zip(jax.tree.leaves(s), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.abs(np.asarray(b)))


@pytest.mark.parametrize('key_form', ['dotted', 'tuple'])
def test_wanda_scores_matches_reference(key_form):
    params = _params()
    norms = np.linspace(0.5, 2.0, 8).astype(np.float32)
    key = 'layers.0.q.kernel' if key_form == 'dotted' else ('layers', 0, 'q', 'kernel')
    s = _wanda.wanda_scores(params, act_norms={key: norms})
    w = np.asarray(params['layers'][0]['q']['kernel'])
    # Norms index K (axis 0 of the (K, N) kernel): row k is scaled by ||X_k||.
    ref = np.abs(w) * norms[:, None]
    np.testing.assert_allclose(np.asarray(s['layers'][0]['q']['kernel']), ref, rtol=1e-6)
    assert s['lm_head']['kernel'] is None and s['layers'][0]['norm']['scale'] is None
    masks = _nm.nm_masks(s)
    assert masks['lm_head']['kernel'] is None


def test_wanda_scores_change_the_mask_along_k():
    # Same |W| in a group, different input norms: the rows with the larger input norm win.
    w = jnp.ones((4, 3))
    params = {'layers': {0: {'kernel': w}}}
    s = _wanda.wanda_scores(params, act_norms={'layers.0.kernel': jnp.array([1., 5., 2., 4.])})
    np.testing.assert_array_equal(np.asarray(_nm.nm_masks(s)['layers'][0]['kernel'])[:, 0],
                                  [False, True, False, True])


def test_wanda_scores_errors():
    params = _params()
    with pytest.raises(ValueError, match='layers.0.q.kernel'):
        _wanda.wanda_scores(params, act_norms={})
    with pytest.raises(ValueError, match=r'expected \(K,\)'):
        _wanda.wanda_scores(params, act_norms={'layers.0.q.kernel': jnp.ones(4)})
    assert _wanda.wanda_scores(params, act_norms={}, include=None)['lm_head']['kernel'] is None


def test_input_column_norms_matches_reference():
    x = np.asarray(jax.random.normal(jax.random.key(1), (2, 5, 8)))
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    got = _wanda.input_column_norms(x, mask=mask)
    ref = np.sqrt((x[mask.astype(bool)] ** 2).sum(0))
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5)
    # Sums of squares accumulate over batches.
    total = _wanda.input_sq_norms(x[:1]) + _wanda.input_sq_norms(x[1:])
    np.testing.assert_allclose(np.sqrt(np.asarray(total)),
                               np.asarray(_wanda.input_column_norms(x)), rtol=1e-5)
