"""Round trip against Hugging Face torch: HF -> jaxprune logits, jaxprune -> HF logits."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune.models import _hf

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

TOL = 1e-4  # float32 max abs logit difference


def _hf_llama(tied: bool, kv_heads: int, rope_scaling=None, bias=False):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        head_dim=8,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tied,
        max_position_embeddings=64,
        rope_theta=500.0,
        rope_scaling=rope_scaling,
        attention_bias=bias,
        mlp_bias=bias,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norm scales so that a mis-mapped norm fails
        for name, p in model.named_parameters():
            if 'norm' in name or name.endswith('bias'):
                p.add_(0.1 * torch.randn_like(p))
    return model


def _torch_logits(model, ids, mask=None):
    with torch.no_grad():
        kw = {} if mask is None else {'attention_mask': torch.tensor(mask)}
        return model(torch.tensor(ids), **kw).logits.numpy()


CASES = [
    pytest.param({'tied': False, 'kv_heads': 2}, id='gqa-untied'),
    pytest.param({'tied': True, 'kv_heads': 2}, id='gqa-tied'),
    pytest.param({'tied': False, 'kv_heads': 4}, id='mha'),
    pytest.param({'tied': True, 'kv_heads': 1, 'bias': True}, id='mqa-bias'),
    pytest.param(
        {'tied': False, 'kv_heads': 2, 'rope_scaling': {'rope_type': 'linear', 'factor': 2.0}},
        id='rope-linear',
    ),
    pytest.param(
        {
            'tied': False,
            'kv_heads': 2,
            'rope_scaling': {
                'rope_type': 'llama3',
                'factor': 8.0,
                'low_freq_factor': 1.0,
                'high_freq_factor': 4.0,
                'original_max_position_embeddings': 8,
            },
        },
        id='rope-llama3',
    ),
]


@pytest.mark.parametrize('case', CASES)
def test_llama_roundtrip_matches_torch(case, tmp_path):
    hf = _hf_llama(**case)
    hf.save_pretrained(tmp_path / 'hf')
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 96, size=(2, 12))
    mask = np.ones((2, 12), np.int64)
    mask[1, 9:] = 0  # right padding
    ref = _torch_logits(hf, ids, mask)

    model, config = _hf.load_pretrained(tmp_path / 'hf')
    assert config.tie_word_embeddings == case['tied']
    ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    valid = mask.astype(bool)
    np.testing.assert_allclose(ours[valid], ref[valid], atol=TOL, rtol=0)

    _hf.save_pretrained(model, config, tmp_path / 'out')
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / 'out').eval()
    again = _torch_logits(back, ids, mask)
    np.testing.assert_allclose(again[valid], ref[valid], atol=TOL, rtol=0)
