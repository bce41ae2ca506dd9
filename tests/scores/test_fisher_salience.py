"""Fisher salience: plain loops on given tap gradients, and mask taps vs per-example mask grads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxprune.models import _bert, _llama
from jaxprune.models import _structures as structures_lib
from jaxprune.scores import _apt

Slice = structures_lib.Slice
Structure = structures_lib.Structure

G, QPK, HD, F, D, L, B = 2, 2, 3, 5, 4, 2, 3


def _toy_structures():
    out = []
    for layer in range(L):
        out.append(Structure('heads', layer, G, 7, ()))
        out.append(Structure('mlp', layer, F, 3, ()))
    out.append(Structure('hidden', None, D, 11, ()))
    return tuple(out)


def _mask_grads(key):
    sizes = {'attn_ctx': G * QPK * HD, 'mlp': F}
    layers = []
    for layer in range(L):
        keys = jax.random.split(jax.random.fold_in(key, layer), len(sizes))
        layers.append({f'{site}_mask': jax.random.normal(k, (B, 1, c))
                       for k, (site, c) in zip(keys, sizes.items(), strict=True)})
    return {'layers': tuple(layers),
            'hidden_mask': jax.random.normal(jax.random.fold_in(key, 99), (B, 1, D))}


def test_fisher_from_taps_matches_reference():
    grads = _mask_grads(jax.random.key(0))
    got = _apt.fisher_from_taps(grads, _toy_structures())
    g = jax.tree.map(lambda x: np.asarray(x, np.float64)[:, 0], grads)  # [B, C]
    for layer in range(L):
        gl = g['layers'][layer]
        want = np.zeros(G)
        for group in range(G):
            for b in range(B):
                per_example = sum(gl['attn_ctx_mask'][b, c]
                                  for c in range(group * QPK * HD, (group + 1) * QPK * HD))
                want[group] += per_example**2
        np.testing.assert_allclose(got[('heads', layer)], want, rtol=1e-5)
        want = [sum(gl['mlp_mask'][b, j] ** 2 for b in range(B)) for j in range(F)]
        np.testing.assert_allclose(got[('mlp', layer)], want, rtol=1e-5)
    want = [sum(g['hidden_mask'][b, j] ** 2 for b in range(B)) for j in range(D)]
    np.testing.assert_allclose(got[('hidden', None)], want, rtol=1e-5)


def test_fisher_from_taps_errors():
    grads = _mask_grads(jax.random.key(1))
    with pytest.raises(ValueError, match='fisher_taps'):
        _apt.fisher_from_taps({'layers': grads['layers']}, _toy_structures())
    with pytest.raises(ValueError, match='fisher_taps'):
        _apt.fisher_from_taps({**grads, 'layers': ({},) * L}, _toy_structures())
    bad = (Structure('heads', 0, 5, 7, ()),)
    with pytest.raises(ValueError, match='not a multiple'):
        _apt.fisher_from_taps(grads, bad)


def _model_and_call(arch):
    if arch == 'llama':
        config = _llama.LlamaConfig.tiny()
        model = _llama.Llama(config, rngs=nnx.Rngs(0))

        def loss(model, ids, **kw):  # per-example next-token losses summed over the batch
            logits = model(ids, **kw)
            out = logits[0] if isinstance(logits, tuple) else logits
            lp = jax.nn.log_softmax(out[:, :-1].astype(jnp.float32))
            nll = -jnp.take_along_axis(lp, ids[:, 1:, None], -1)[..., 0]
            return nll.mean(-1).sum(), (logits[1] if isinstance(logits, tuple) else None)
    else:
        config = _bert.BertConfig.tiny()
        model = _bert.BertForSequenceClassification(config, rngs=nnx.Rngs(0))

        def loss(model, ids, **kw):
            res = model(ids, jnp.ones_like(ids), **kw)
            out = res[0] if isinstance(res, tuple) else res
            lp = jax.nn.log_softmax(out.astype(jnp.float32))
            return -lp[:, 0].sum(), (res[1] if isinstance(res, tuple) else None)
    return config, model, loss


@pytest.mark.parametrize('arch', ['llama', 'bert'])
def test_fisher_taps_give_per_example_mask_gradients(arch):
    """``fisher_taps`` gradients equal per-example gradients of the model's own masks.

    Reference: ``jax.vmap`` over examples of ``jax.grad`` of each example's loss with respect to
    all-ones ``heads`` / ``mlp`` / ``hidden`` masks (the model's mask path, not the taps).
    """
    from jaxprune.methods import _apt as apt_method

    config, model, loss = _model_and_call(arch)
    structs = structures_lib.structures(config)
    ids = jnp.asarray(np.random.default_rng(0).integers(1, 128, (B, 6)))

    def tapped_loss(taps):
        masks, layer_taps = apt_method.tapped_masks(None, taps)
        return loss(model, ids, masks=masks, taps=layer_taps)[0]

    tap_grads = jax.grad(tapped_loss)(apt_method.fisher_taps(config, *ids.shape))
    got = _apt.fisher_from_taps(tap_grads, structs)

    ones = {'hidden': jnp.ones(config.hidden_size), 'layers': tuple(
        {'heads': jnp.ones(config.heads(i)), 'mlp': jnp.ones(config.mlp(i))}
        for i in range(config.num_layers))}

    def example_loss(masks, ids_b):
        return loss(model, ids_b[None], masks=masks)[0]

    per_ex = jax.vmap(jax.grad(example_loss), in_axes=(None, 0))(ones, ids)
    for i, m in enumerate(per_ex['layers']):
        heads = np.asarray(m['heads'], np.float64).reshape(B, config.kv_heads(i), -1).sum(-1)
        np.testing.assert_allclose(got[('heads', i)], (heads**2).sum(0), rtol=2e-4, atol=1e-9)
        mlp = np.asarray(m['mlp'], np.float64)
        np.testing.assert_allclose(got[('mlp', i)], (mlp**2).sum(0), rtol=2e-4, atol=1e-9)
    hidden = np.asarray(per_ex['hidden'], np.float64)
    np.testing.assert_allclose(got[('hidden', None)], (hidden**2).sum(0), rtol=2e-4, atol=1e-9)
    assert all(float(v.sum()) > 0 for v in got.values())


def test_fisher_taps_leave_the_forward_unchanged():
    from jaxprune.methods import _apt as apt_method

    config, model, loss = _model_and_call('bert')
    ids = jnp.asarray(np.random.default_rng(1).integers(1, 128, (B, 6)))
    plain = loss(model, ids)[0]
    half = {'hidden': jnp.ones(config.hidden_size).at[3].set(0.5)}
    masks, layer_taps = apt_method.tapped_masks(half, apt_method.fisher_taps(config, *ids.shape))
    assert masks['hidden'].shape == (B, 1, config.hidden_size)
    np.testing.assert_allclose(loss(model, ids, masks=masks, taps=layer_taps)[0],
                               loss(model, ids, masks=half)[0], rtol=1e-6)
    masks, layer_taps = apt_method.tapped_masks(None, apt_method.fisher_taps(config, *ids.shape))
    np.testing.assert_allclose(loss(model, ids, masks=masks, taps=layer_taps)[0], plain,
                               rtol=1e-6)
    with pytest.raises(ValueError, match='unknown tap sites'):
        _llama.make_taps(config, 2, 3, mask_sites=('resid',))


def test_salience_taps_pair_each_score_with_its_taps():
    from jaxprune.methods import _apt as apt_method

    config = _llama.LlamaConfig.tiny()
    shapes = lambda t: jax.tree.map(lambda x: x.shape, t)
    assert shapes(apt_method.salience_taps(config, 3, 5)) == shapes(
        _llama.make_taps(config, 3, 5))
    assert shapes(apt_method.salience_taps(config, 3, 5, salience='fisher')) == shapes(
        apt_method.fisher_taps(config, 3, 5))
    with pytest.raises(ValueError, match='salience'):
        apt_method.salience_taps(config, 3, 5, salience='wanda')
