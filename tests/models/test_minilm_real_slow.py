"""Real all-MiniLM-L6-v2 weights: mean-pooled sentence embeddings behave as published."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune.models import _hf


@pytest.mark.slow
def test_minilm_sentence_similarity():
    """cos("A man is eating food.", "A man is eating a piece of bread.") ~ 0.75 (+-0.05)."""
    assets = pytest.importorskip('jaxprune.assets')
    transformers = pytest.importorskip('transformers')
    try:
        folder = assets.fetch('minilm-l6')
    except Exception as e:  # noqa: BLE001 - any fetch failure means the asset is unavailable
        pytest.skip(f'minilm-l6 asset unavailable: {e}')
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    model, config = _hf.load_pretrained(folder)
    assert config.hidden_size == 384 and config.num_layers == 6
    sents = [
        'A man is eating food.',
        'A man is eating a piece of bread.',
        'A man is riding a horse.',
    ]
    batch = tok(sents, padding=True, return_tensors='np')
    emb = np.asarray(
        model.encode(jnp.asarray(batch['input_ids']), jnp.asarray(batch['attention_mask']))
    )
    emb = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
    cos = emb @ emb.T
    assert abs(cos[0, 1] - 0.75) <= 0.05, cos
    assert cos[0, 2] < cos[0, 1]  # an unrelated sentence is further away
