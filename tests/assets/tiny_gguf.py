"""Tiny llama GGUF files written with gguf.GGUFWriter, as llama.cpp would lay them out."""

import gguf
import numpy as np

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
