"""APT budget search: exact counts vs explicit formulas, brute force over prefixes, eligibility."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune.masks import _budget
from jaxprune.models import _structures as structures_lib

Slice = structures_lib.Slice
Structure = structures_lib.Structure


def toy(layers=2, groups=2, qpk=2, hd=2, ffn=3, d=4, vocab=5):
    """Llama-shaped shapes + structures (stand-in for jaxprune.models.structures)."""
    shapes = {('embed', 'embedding'): (vocab, d), ('norm', 'scale'): (d,)}
    structs, hidden = [], []
    for ly in range(layers):
        p = ('layers', ly)
        h = groups * qpk * hd
        s = {
            'attn_norm': ((d,), 0),
            'mlp_norm': ((d,), 0),
            'q': ((d, h), 0),
            'k': ((d, groups * hd), 0),
            'v': ((d, groups * hd), 0),
            'o': ((h, d), 1),
            'gate': ((d, ffn), 0),
            'up': ((d, ffn), 0),
            'down': ((ffn, d), 1),
        }
        for name, (shape, hidden_axis) in s.items():
            shapes[p + (name,)] = shape
            hidden.append(Slice(p + (name,), hidden_axis, 1))
        heads = (
            Slice(p + ('q',), 1, qpk * hd),
            Slice(p + ('k',), 1, hd),
            Slice(p + ('v',), 1, hd),
            Slice(p + ('o',), 0, qpk * hd),
        )
        mlp = (Slice(p + ('gate',), 1, 1), Slice(p + ('up',), 1, 1), Slice(p + ('down',), 0, 1))
        structs.append(Structure('heads', ly, groups, d * (2 * qpk * hd + 2 * hd), heads))
        structs.append(Structure('mlp', ly, ffn, 3 * d, mlp))
    hidden += [Slice(('embed', 'embedding'), 1, 1), Slice(('norm', 'scale'), 0, 1)]
    structs.append(Structure('hidden', None, d, 0, tuple(hidden)))
    return tuple(structs), shapes


def explicit_count(kept, layers=2, qpk=2, hd=2, vocab=5):
    """Hand-written kept-parameter count of the toy model (the reference)."""
    d = kept[('hidden', None)]
    total = vocab * d + d
    for ly in range(layers):
        g, f = kept[('heads', ly)], kept[('mlp', ly)]
        total += 2 * d + d * g * qpk * hd + 2 * d * g * hd + g * qpk * hd * d + 3 * d * f
    return total


def test_kept_param_count_matches_explicit_formula():
    structs, shapes = toy()
    sizes = {(s.kind, s.layer): s.size for s in structs}
    rng = np.random.default_rng(0)
    for _ in range(20):
        keep = {k: jnp.asarray(rng.random(n) < 0.5) for k, n in sizes.items()}
        kept = {k: int(v.sum()) for k, v in keep.items()}
        assert int(_budget.kept_param_count(keep, structs, shapes)) == explicit_count(kept)
    full = {k: n for k, n in sizes.items()}
    assert _budget.total_prunable_params(structs, shapes) == explicit_count(full)


def _random_scores(structs, seed):
    rng = np.random.default_rng(seed)
    return {(s.kind, s.layer): jnp.asarray(rng.random(s.size), jnp.float32) for s in structs}


def brute_force(scores, structs, shapes, density, order=None):
    """Try every prefix length of the global descending ranking (or of ``order``); keep the
    largest prefix that fits."""
    keys = [(s.kind, s.layer) for s in structs]
    flat = np.concatenate([np.asarray(scores[k]) for k in keys])
    if order is None:
        order = np.argsort(-flat, kind='stable')
    budget = density * _budget.total_prunable_params(structs, shapes)
    best = np.zeros(flat.size, bool)
    for k in range(flat.size + 1):
        sel = np.zeros(flat.size, bool)
        sel[order[:k]] = True
        keep, start = {}, 0
        for s in structs:
            keep[(s.kind, s.layer)] = sel[start : start + s.size]
            start += s.size
        kept = {key: int(v.sum()) for key, v in keep.items()}
        if explicit_count(kept) <= budget:
            best = sel
    return best


@pytest.mark.parametrize('density', [0.0, 0.2, 0.4, 0.7, 0.95, 1.0])
@pytest.mark.parametrize('use_jit', [False, True])
def test_budget_keep_matches_reference(density, use_jit):
    structs, shapes = toy()
    for seed in range(3):
        scores = _random_scores(structs, seed)
        fn = lambda sc, rho: _budget.budget_keep(sc, structs, shapes, rho)
        if use_jit:
            fn = jax.jit(fn)
        keep = fn(scores, jnp.float32(density))
        got = np.concatenate([np.asarray(keep[(s.kind, s.layer)]) for s in structs])
        np.testing.assert_array_equal(got, brute_force(scores, structs, shapes, density))


@pytest.mark.parametrize('density', [0.1, 0.3, 0.5, 0.8])
def test_budget_keep_min_keep_matches_reference(density):
    # Reference: the floor units (the m densest of each named structure) come first, in score
    # order, then every other unit in score order; the largest fitting prefix is kept.
    structs, shapes = toy()  # brute_force counts with explicit_count, i.e. this toy's shapes
    min_keep = {('heads', 0): 1, ('heads', 1): 2, ('mlp', 1): 2, ('hidden', None): 2}
    keys = [(s.kind, s.layer) for s in structs]
    for seed in range(3):
        scores = _random_scores(structs, seed)
        # Make floor candidates unattractive so the floors change the outcome.
        scores[('heads', 1)] = scores[('heads', 1)] * 1e-3
        flat = np.concatenate([np.asarray(scores[k]) for k in keys])
        floor, start = np.zeros(flat.size, bool), 0
        for k, s in zip(keys, structs):
            seg = np.asarray(scores[k])
            floor[start + np.argsort(-seg, kind='stable')[: min_keep.get(k, 0)]] = True
            start += s.size
        by_score = np.argsort(-flat, kind='stable')
        order = np.concatenate([by_score[floor[by_score]], by_score[~floor[by_score]]])
        want = brute_force(scores, structs, shapes, density, order=order)
        keep = jax.jit(lambda sc, rho: _budget.budget_keep(
            sc, structs, shapes, rho, min_keep=min_keep))(scores, jnp.float32(density))
        got = np.concatenate([np.asarray(keep[k]) for k in keys])
        np.testing.assert_array_equal(got, want)
        floors = {k: min_keep.get(k, 0) for k in keys}
        if explicit_count(floors) <= density * _budget.total_prunable_params(structs, shapes):
            for k, m in min_keep.items():  # the floors fit, so every one of them is met
                assert int(keep[k].sum()) >= m, (k, density)


def test_budget_keep_min_keep_respects_eligibility_and_names():
    structs, shapes = toy()
    scores = _random_scores(structs, 3)
    # The densest head of layer 1 is dead: the floor takes the next eligible one, never the dead.
    scores[('heads', 1)] = jnp.array([5.0, 1e-6])
    eligible = {('heads', 1): jnp.array([False, True])}
    keep = _budget.budget_keep(scores, structs, shapes, 0.3, eligible=eligible,
                               min_keep={('heads', 1): 1})
    assert keep[('heads', 1)].tolist() == [False, True]
    with pytest.raises(ValueError, match=r"min_keep names \[\('heads', 7\)\]"):
        _budget.budget_keep(scores, structs, shapes, 0.5, min_keep={('heads', 7): 1})


def test_budget_keep_fits_and_is_maximal():
    # Invariant: the kept count fits the budget and one more unit in ranking order would not.
    structs, shapes = toy(layers=3, groups=3, ffn=5, d=6)
    total = _budget.total_prunable_params(structs, shapes)
    scores = _random_scores(structs, 7)
    keys = [(s.kind, s.layer) for s in structs]
    flat = np.concatenate([np.asarray(scores[k]) for k in keys])
    for density in np.linspace(0.05, 0.95, 10):
        keep = _budget.budget_keep(scores, structs, shapes, density)
        count = int(_budget.kept_param_count(keep, structs, shapes))
        assert count <= density * total
        sel = np.concatenate([np.asarray(keep[k]) for k in keys])
        rest = np.flatnonzero(~sel)
        if rest.size:
            nxt = rest[np.argmax(flat[rest])]
            sel[nxt] = True
            bigger, start = {}, 0
            for s in structs:
                bigger[(s.kind, s.layer)] = jnp.asarray(sel[start : start + s.size])
                start += s.size
            assert int(_budget.kept_param_count(bigger, structs, shapes)) > density * total


def test_budget_keep_never_keeps_ineligible():
    structs, shapes = toy()
    scores = _random_scores(structs, 1)
    eligible = {('mlp', 0): jnp.array([False, True, True]), ('heads', 1): jnp.array([True, False])}
    # Make the ineligible units the most salient: they must still be dropped.
    scores[('mlp', 0)] = scores[('mlp', 0)].at[0].set(100.0)
    scores[('heads', 1)] = scores[('heads', 1)].at[1].set(100.0)
    keep = _budget.budget_keep(scores, structs, shapes, 1.0, eligible=eligible)
    assert not bool(keep[('mlp', 0)][0]) and not bool(keep[('heads', 1)][1])
    # Everything eligible fits at density 1.
    assert all(bool(keep[k].all()) for k in keep if k not in eligible)


def test_budget_keep_nan_scores_go_last():
    structs, shapes = toy()
    scores = _random_scores(structs, 2)
    scores[('mlp', 1)] = jnp.full((3,), jnp.nan)
    keep = _budget.budget_keep(scores, structs, shapes, 0.6)
    assert not bool(keep[('mlp', 1)].any())


def test_count_plan_rejects_bad_shapes():
    structs, shapes = toy()
    shapes = dict(shapes)
    shapes[('layers', 0, 'q')] = (4, 7)
    with pytest.raises(ValueError, match='expects size\\*width'):
        _budget.total_prunable_params(structs, shapes)
    with pytest.raises(ValueError, match='not in the params'):
        _budget.total_prunable_params(structs, {})


def test_param_shapes_reads_nested_pytrees():
    leaf = jax.ShapeDtypeStruct((4,), jnp.float32)
    params = {'a': {'b': jnp.zeros((2, 3))}, 'layers': {0: {'w': leaf}}}
    assert _budget.param_shapes(params) == {('a', 'b'): (2, 3), ('layers', 0, 'w'): (4,)}


def test_lora_factors_not_counted_by_default():
    structs, shapes = toy()
    shapes = dict(shapes)
    shapes[('layers', 0, 'q', 'lora_a')] = (4, 2)
    extra = Slice(('layers', 0, 'q', 'lora_a'), 0, 1)
    structs = structs[:-1] + (
        dataclasses.replace(structs[-1], slices=structs[-1].slices + (extra,)),
    )
    base = _budget.total_prunable_params(structs, shapes)
    assert _budget.total_prunable_params(structs, shapes, count_lora=True) == base + 8
    keep = {('hidden', None): jnp.array([True, False, True, False])}
    with_lora = _budget.kept_param_count(keep, structs, shapes, count_lora=True)
    assert int(with_lora) == int(_budget.kept_param_count(keep, structs, shapes)) + 4
