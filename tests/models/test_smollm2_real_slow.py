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


def _smollm2():
    assets = pytest.importorskip('jaxprune.assets')
    transformers = pytest.importorskip('transformers')
    try:
        folder = assets.fetch('smollm2-135m')
    except Exception as e:  # noqa: BLE001 - any fetch failure means the asset is unavailable
        pytest.skip(f'smollm2-135m asset unavailable: {e}')
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    model, config = _hf.load_pretrained(folder)
    assert config.num_layers == 30 and config.tie_word_embeddings
    return tok, model


@pytest.mark.slow
def test_smollm2_perplexity_is_low():
    """Next-token perplexity on plain English < 60 (a broken load gives hundreds or more)."""
    tok, model = _smollm2()
    ids = jnp.asarray(tok(TEXT, return_tensors='np')['input_ids'])
    logits = model(ids)
    logp = jax.nn.log_softmax(logits[0, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.mean(jnp.take_along_axis(logp, ids[0, 1:, None], axis=-1))
    ppl = float(np.exp(nll))
    assert ppl < 60, ppl


@pytest.mark.slow
def test_smollm2_greedy_completes_paris():
    """The jaxprune Llama itself (not torch) completes the prompt with 'Paris'."""
    tok, model = _smollm2()
    prompt = tok('The capital of France is', return_tensors='np')['input_ids'].astype(np.int32)
    ids = prompt
    for _ in range(4):  # greedy, no cache: 4 tokens of a 135M model are cheap on CPU
        nxt = np.asarray(jnp.argmax(model(jnp.asarray(ids))[:, -1], axis=-1), np.int32)
        ids = np.concatenate([ids, nxt[:, None]], axis=1)
    assert 'Paris' in tok.decode(ids[0, prompt.shape[1]:]), tok.decode(ids[0])


@pytest.mark.slow
def test_smollm2_shakespeare_heldout_perplexity_in_tens():
    """Held-out Shakespeare (a test-split play), 4 windows of 256 tokens: ppl in the tens."""
    data = pytest.importorskip('jaxprune.data')
    tok, model = _smollm2()
    text = data.load_dataset('shakespeare')['test']['text'][0]
    ids = np.asarray(tok(text[:20_000], return_tensors='np')['input_ids'][0][: 4 * 256], np.int32)
    ids = jnp.asarray(ids.reshape(4, 256))
    logp = jax.nn.log_softmax(model(ids)[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))
    ppl = float(np.exp(nll))
    assert 10 < ppl < 100, ppl
