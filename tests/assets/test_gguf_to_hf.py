"""GGUF -> HF llama folder: tiny GGUF files written in the test (no network)."""

import json

import gguf
import numpy as np
import pytest
import safetensors.numpy
import tiny_gguf
import transformers
from tiny_gguf import HD, KV, LAYERS, QUANTISED, D, F, H, llama_cpp_permute, tiny_vocab

from jaxprune import assets
from jaxprune.assets import _gguf

write_tiny_gguf = tiny_gguf.write_tiny_gguf


@pytest.mark.parametrize('n_head', [1, 2, 4])
def test_unpermute_qk_matches_reference(n_head):
    w = np.random.default_rng(n_head).normal(size=(n_head * 8, 5))
    np.testing.assert_array_equal(_gguf.unpermute_qk(llama_cpp_permute(w, n_head), n_head), w)
    assert not np.array_equal(llama_cpp_permute(w, n_head), w)  # the permutation is not trivial


@pytest.mark.parametrize('tied', [True, False])
def test_gguf_to_hf_matches_reference(tmp_path, tied):
    ref = write_tiny_gguf(tmp_path / 'tiny.gguf', tied=tied)
    out = assets.gguf_to_hf(tmp_path / 'tiny.gguf', tmp_path / 'hf')
    got = safetensors.numpy.load_file(out / 'model.safetensors')
    assert sorted(got) == sorted(ref)
    for key, value in ref.items():
        assert got[key].dtype == np.float32 and got[key].shape == value.shape, key
        if key == QUANTISED:  # Q8_0: equal to gguf's own round trip, close to the original
            q = gguf.quants.quantize(value, gguf.GGMLQuantizationType.Q8_0)
            exact = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)
            np.testing.assert_array_equal(got[key], exact)
            np.testing.assert_allclose(got[key], value, atol=0.05)  # |w| < ~5, 8-bit blocks
        else:
            np.testing.assert_array_equal(got[key], value, err_msg=key)
    config = json.loads((out / 'config.json').read_text())
    expected = {'model_type': 'llama', 'architectures': ['LlamaForCausalLM'], 'hidden_size': D,
                'intermediate_size': F, 'num_hidden_layers': LAYERS, 'num_attention_heads': H,
                'num_key_value_heads': KV, 'head_dim': HD, 'rope_theta': 100000.0,
                'tie_word_embeddings': tied, 'vocab_size': len(tiny_vocab()[0]),
                'bos_token_id': 1, 'eos_token_id': 2, 'pad_token_id': 2}  # fmt: skip
    assert {k: config[k] for k in expected} == expected
    assert config['rms_norm_eps'] == pytest.approx(1e-5, rel=1e-6)
    hf = transformers.AutoConfig.from_pretrained(out)
    assert (hf.num_key_value_heads, hf.tie_word_embeddings) == (KV, tied)


def test_gguf_to_hf_bfloat16(tmp_path):
    ref = write_tiny_gguf(tmp_path / 'tiny.gguf')
    out = assets.gguf_to_hf(tmp_path / 'tiny.gguf', tmp_path / 'hf', dtype='bfloat16')
    got = safetensors.numpy.load_file(out / 'model.safetensors')
    key = 'model.norm.weight'
    assert got[key].dtype.name == 'bfloat16'
    np.testing.assert_allclose(got[key].astype(np.float32), ref[key], rtol=1e-2)  # bf16 eps 2^-8


@pytest.mark.parametrize(
    'text',
    ['the cat', ' the cat sat', 'In 2024, 12345 cats!', 'tab\tand\nnewline  ', 'Ça va? 日本語'],
)
def test_gguf_tokenizer_round_trip(tmp_path, text):
    write_tiny_gguf(tmp_path / 'tiny.gguf')
    out = assets.gguf_to_hf(tmp_path / 'tiny.gguf', tmp_path / 'hf')
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = tok(text)['input_ids']
    assert tok.decode(ids) == text
    assert tok.unk_token_id not in ids or tok.unk_token_id is None


def test_gguf_tokenizer_merges_digits_and_specials(tmp_path):
    write_tiny_gguf(tmp_path / 'tiny.gguf')
    out = assets.gguf_to_hf(tmp_path / 'tiny.gguf', tmp_path / 'hf')
    assert {'tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json'} <= {
        p.name for p in out.iterdir()
    }
    tok = transformers.AutoTokenizer.from_pretrained(out)
    tokens, _ = tiny_vocab()
    assert tok.convert_ids_to_tokens(tok(' the cat')['input_ids']) == ['Ġthe', 'Ġcat']
    assert tok.convert_ids_to_tokens(tok('x 123')['input_ids']) == ['x', 'Ġ', '1', '2', '3']
    ids = tok('a<|im_end|>b')['input_ids']
    assert ids == [tokens.index('a'), 2, tokens.index('b')]
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ('<|im_start|>', '<|im_end|>',
                                                             '<|im_end|>')  # fmt: skip
    assert len(tok) == len(tokens)
    assert tok('hi', return_tensors='np')['input_ids'].dtype.kind == 'i'


def test_gguf_to_hf_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match='gguf_path='):
        assets.gguf_to_hf(tmp_path / 'missing.gguf', tmp_path / 'o')
    write_tiny_gguf(tmp_path / 'tiny.gguf')
    with pytest.raises(ValueError, match="dtype='float16'"):
        assets.gguf_to_hf(tmp_path / 'tiny.gguf', tmp_path / 'o', dtype='float16')
    with pytest.raises(ValueError, match='no HF llama mapping'):
        _gguf.hf_key('blk.0.ffn_gate_exps.weight')
    write_tiny_gguf(tmp_path / 'gpt2.gguf', arch='gpt2')
    with pytest.raises(ValueError, match="arch='gpt2'"):
        assets.gguf_to_hf(tmp_path / 'gpt2.gguf', tmp_path / 'o2')
