"""GGUF -> HF llama folder: tiny GGUF files written in the test (no network)."""

import json

import gguf
import numpy as np
import pytest
import safetensors.numpy
import transformers

from jaxprune import assets
from jaxprune.assets import _gguf

D, F, H, KV, LAYERS = 64, 96, 4, 2, 2
HD = D // H


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute (the reference being undone)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape
    )


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable unicode table (openai/gpt-2 encoder.py)."""
    bs = list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1))
    bs += list(range(ord('®'), ord('ÿ') + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


MERGES = ['Ġ t', 'h e', 'Ġt he', 'c a', 'ca t', 'Ġ cat']
SPECIAL = ['<|endoftext|>', '<|im_start|>', '<|im_end|>']


def tiny_vocab() -> tuple[list[str], list[int]]:
    byte_tokens = sorted(set(bytes_to_unicode().values()))
    merged = [m.replace(' ', '') for m in MERGES]
    tokens = SPECIAL + byte_tokens + merged
    return tokens, [3] * len(SPECIAL) + [1] * (len(tokens) - len(SPECIAL))


def reference_weights(vocab: int, *, tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """HF-keyed float32 weights in (out, in) orientation."""
    rng = np.random.default_rng(seed)
    w = {'model.embed_tokens.weight': rng.normal(size=(vocab, D)),
         'model.norm.weight': rng.normal(size=D)}  # fmt: skip
    if not tied:
        w['lm_head.weight'] = rng.normal(size=(vocab, D))
    for i in range(LAYERS):
        p = f'model.layers.{i}.'
        w[p + 'self_attn.q_proj.weight'] = rng.normal(size=(H * HD, D))
        w[p + 'self_attn.k_proj.weight'] = rng.normal(size=(KV * HD, D))
        w[p + 'self_attn.v_proj.weight'] = rng.normal(size=(KV * HD, D))
        w[p + 'self_attn.o_proj.weight'] = rng.normal(size=(D, H * HD))
        w[p + 'mlp.gate_proj.weight'] = rng.normal(size=(F, D))
        w[p + 'mlp.up_proj.weight'] = rng.normal(size=(F, D))
        w[p + 'mlp.down_proj.weight'] = rng.normal(size=(D, F))
        w[p + 'input_layernorm.weight'] = rng.normal(size=D)
        w[p + 'post_attention_layernorm.weight'] = rng.normal(size=D)
    return {k: v.astype(np.float32) for k, v in w.items()}


GGUF_NAMES = {
    'model.embed_tokens.weight': 'token_embd.weight',
    'model.norm.weight': 'output_norm.weight',
    'lm_head.weight': 'output.weight',
    'self_attn.q_proj.weight': 'attn_q.weight',
    'self_attn.k_proj.weight': 'attn_k.weight',
    'self_attn.v_proj.weight': 'attn_v.weight',
    'self_attn.o_proj.weight': 'attn_output.weight',
    'mlp.gate_proj.weight': 'ffn_gate.weight',
    'mlp.up_proj.weight': 'ffn_up.weight',
    'mlp.down_proj.weight': 'ffn_down.weight',
    'input_layernorm.weight': 'attn_norm.weight',
    'post_attention_layernorm.weight': 'ffn_norm.weight',
}
QUANTISED = 'model.layers.1.mlp.down_proj.weight'  # stored as Q8_0


def write_tiny_gguf(path, *, tied: bool = True, arch: str = 'llama'):
    tokens, types = tiny_vocab()
    weights = reference_weights(len(tokens), tied=tied)
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(LAYERS)
    w.add_context_length(128)
    w.add_embedding_length(D)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_rope_freq_base(100000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(HD)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model('gpt2')
    w.add_tokenizer_pre('smollm')
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    for key, value in weights.items():
        if key.startswith('model.layers.'):
            i, rest = key.removeprefix('model.layers.').split('.', 1)
            name = f'blk.{i}.{GGUF_NAMES[rest]}'
        else:
            name = GGUF_NAMES[key]
        if key.endswith('q_proj.weight'):
            value = llama_cpp_permute(value, H)
        elif key.endswith('k_proj.weight'):
            value = llama_cpp_permute(value, KV)
        if key == QUANTISED:
            q = gguf.quants.quantize(value, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return weights


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
