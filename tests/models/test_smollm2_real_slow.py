"""Real SmolLM2-135M weights (GGUF -> HF folder): the LM predicts ordinary English text."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune.models import _hf

TEXT = (
    'The quick brown fox jumps over the lazy dog. The city council met on Tuesday to discuss '
    'the new budget for schools, roads and public parks, and voted to approve the plan.'
)


@pytest.mark.slow
def test_smollm2_perplexity_is_low():
    """Next-token perplexity on plain English < 60 (a broken load gives hundreds or more)."""
    assets = pytest.importorskip('jaxprune.assets')
    transformers = pytest.importorskip('transformers')
    try:
        folder = assets.fetch('smollm2-135m')
    except Exception as e:  # noqa: BLE001 - any fetch failure means the asset is unavailable
        pytest.skip(f'smollm2-135m asset unavailable: {e}')
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    model, config = _hf.load_pretrained(folder)
    assert config.num_layers == 30 and config.tie_word_embeddings
    ids = jnp.asarray(tok(TEXT, return_tensors='np')['input_ids'])
    logits = model(ids)
    logp = jax.nn.log_softmax(logits[0, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.mean(jnp.take_along_axis(logp, ids[0, 1:, None], axis=-1))
    ppl = float(np.exp(nll))
    assert ppl < 60, ppl
