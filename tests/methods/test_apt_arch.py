"""APT's host-side helpers: keep vectors in checkpoint metadata, shape checks, settings."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import config
from jaxprune.methods import _apt_arch
from jaxprune.models import _structures


def _structs(sizes):
    return tuple(_structures.Structure(kind, layer, size, 1, ())
                 for (kind, layer), size in sizes.items())


@pytest.mark.parametrize('seed', [0, 1])
def test_keep_encoding_round_trips_through_json(seed):
    # Sizes that are not multiples of 8 exercise the packbits padding; all-kept and all-pruned
    # vectors are the edge cases of a real run (an untouched layer, a fully cut one).
    sizes = {('heads', 0): 12, ('heads', 1): 3, ('mlp', 0): 1536, ('mlp', 1): 29,
             ('hidden', None): 384, ('rank', 2): 1}
    rng = np.random.default_rng(seed)
    keep = {k: rng.random(n) < 0.4 for k, n in sizes.items()}
    keep[('heads', 1)] = np.ones(3, bool)
    keep[('rank', 2)] = np.zeros(1, bool)
    encoded = json.loads(json.dumps(_apt_arch.encode_keep(keep)))
    decoded = _apt_arch.decode_keep(encoded, _structs(sizes))
    assert decoded.keys() == keep.keys()
    for k, v in keep.items():
        assert decoded[k].dtype == bool and decoded[k].shape == v.shape
        np.testing.assert_array_equal(decoded[k], v)


def test_decode_keep_needs_every_structure():
    encoded = _apt_arch.encode_keep({('heads', 0): np.ones(4, bool)})
    with pytest.raises(KeyError, match='mlp/0'):
        _apt_arch.decode_keep(encoded, _structs({('heads', 0): 4, ('mlp', 0): 8}))


def test_same_shapes_compares_structure_and_leaf_shapes():
    a = {'x': jnp.zeros((2, 3)), 'y': [jnp.zeros(4)]}
    assert _apt_arch.same_shapes(a, {'x': jnp.ones((2, 3)), 'y': [jnp.ones(4, jnp.int32)]})
    assert not _apt_arch.same_shapes(a, {'x': jnp.zeros((2, 2)), 'y': [jnp.zeros(4)]})
    assert not _apt_arch.same_shapes(a, {'x': jnp.zeros((2, 3)), 'z': [jnp.zeros(4)]})


def test_setting_reads_dotted_fields():
    cfg = config.load_config(None, overrides=['train.steps=7', 'lora.rank=4'])
    assert _apt_arch.setting(cfg, 'train.steps') == 7
    assert _apt_arch.setting(cfg, 'lora.rank') == 4
