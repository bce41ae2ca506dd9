"""Round trip against Hugging Face torch for BERT and RoBERTa sequence classifiers."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune.models import _hf

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

TOL = 1e-4  # float32 max abs logit difference


def _hf_model(kind: str):
    torch.manual_seed(0)
    common = {
        'vocab_size': 96,
        'hidden_size': 32,
        'intermediate_size': 48,
        'num_hidden_layers': 2,
        'num_attention_heads': 4,
        'max_position_embeddings': 40,
        'num_labels': 3,
        'hidden_dropout_prob': 0.0,
        'attention_probs_dropout_prob': 0.0,
    }
    if kind == 'bert':
        cfg = transformers.BertConfig(**common)
        model = transformers.BertForSequenceClassification(cfg)
    else:
        cfg = transformers.RobertaConfig(pad_token_id=1, **common)
        model = transformers.RobertaForSequenceClassification(cfg)
    model.eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if 'LayerNorm' in name or name.endswith('bias'):
                p.add_(0.1 * torch.randn_like(p))
    return model


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


def _inputs(pad_id):
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 96, size=(3, 10))
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    ids[1, 7:] = pad_id
    return ids, mask


@pytest.mark.parametrize('kind', ['bert', 'roberta'])
def test_bert_roundtrip_matches_torch(kind, tmp_path):
    hf = _hf_model(kind)
    hf.save_pretrained(tmp_path / 'hf')
    ids, mask = _inputs(hf.config.pad_token_id)
    ref = _logits(hf, ids, mask)

    model, config = _hf.load_pretrained(tmp_path / 'hf')
    assert config.model_type == kind and config.num_labels == 3
    ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)

    _hf.save_pretrained(model, config, tmp_path / 'out')
    cls = (
        transformers.BertForSequenceClassification
        if kind == 'bert'
        else transformers.RobertaForSequenceClassification
    )
    back = cls.from_pretrained(tmp_path / 'out').eval()
    np.testing.assert_allclose(_logits(back, ids, mask), ref, atol=TOL, rtol=0)


def test_encoder_without_prefix_loads_and_encodes(tmp_path):
    """A sentence-transformers style folder: BertModel keys without 'bert.', no classifier."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=40,
    )
    hf = transformers.BertModel(cfg).eval()
    hf.save_pretrained(tmp_path / 'hf')
    ids, mask = _inputs(0)
    with torch.no_grad():
        h = hf(torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    ref = (h * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    model, config = _hf.load_pretrained(tmp_path / 'hf', num_labels=5)
    assert config.num_labels == 5
    ours = np.asarray(model.encode(jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)
    assert model(jnp.asarray(ids), jnp.asarray(mask)).shape == (3, 5)


def test_mean_pooling_head_matches_torch_reference(tmp_path):
    """pooling='mean': classifier(tanh(pooler(mean of the real tokens))), computed in torch."""
    hf = _hf_model('bert')
    hf.save_pretrained(tmp_path / 'hf')
    ids, mask = _inputs(0)
    with torch.no_grad():
        h = hf.bert(torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state
        m = torch.tensor(mask, dtype=h.dtype)[..., None]
        mean = (h * m).sum(1) / m.sum(1)
        ref = hf.classifier(torch.tanh(hf.bert.pooler.dense(mean))).numpy()
    model, config = _hf.load_pretrained(tmp_path / 'hf', pooling='mean')
    assert config.pooling == 'mean'
    ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)
    assert np.abs(ours - _logits(hf, ids, mask)).max() > 10 * TOL  # not the CLS head
    # Extra padding changes nothing.
    padded_ids = np.pad(ids, ((0, 0), (0, 4)))
    padded_mask = np.pad(mask, ((0, 0), (0, 4)))
    np.testing.assert_allclose(
        np.asarray(model(jnp.asarray(padded_ids), jnp.asarray(padded_mask))), ours,
        atol=1e-5, rtol=0)
    # Hugging Face's classifier reads the first token: no HF export of a mean-pooling head.
    with pytest.raises(ValueError, match='mean-pooling'):
        _hf.save_pretrained(model, config, tmp_path / 'out')
