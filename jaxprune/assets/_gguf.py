"""Convert a llama-architecture GGUF file into a Hugging Face style folder.

The folder holds ``model.safetensors`` (HF key names, ``(out, in)`` orientation), ``config.json``
(``model_type: llama``) and, when the GGUF metadata carries a byte-level BPE vocabulary, a fast
tokenizer (``tokenizer.json`` + ``tokenizer_config.json`` + ``special_tokens_map.json``) that
``transformers.AutoTokenizer.from_pretrained`` loads offline.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import re
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# GGUF tensor name -> HF llama key. `{i}` is the block index.
_KEY_TABLE: tuple[tuple[str, str], ...] = (
    (r'token_embd\.weight', 'model.embed_tokens.weight'),
    (r'output_norm\.weight', 'model.norm.weight'),
    (r'output\.weight', 'lm_head.weight'),
    (r'blk\.(\d+)\.attn_q\.weight', 'model.layers.{i}.self_attn.q_proj.weight'),
    (r'blk\.(\d+)\.attn_k\.weight', 'model.layers.{i}.self_attn.k_proj.weight'),
    (r'blk\.(\d+)\.attn_v\.weight', 'model.layers.{i}.self_attn.v_proj.weight'),
    (r'blk\.(\d+)\.attn_output\.weight', 'model.layers.{i}.self_attn.o_proj.weight'),
    (r'blk\.(\d+)\.ffn_gate\.weight', 'model.layers.{i}.mlp.gate_proj.weight'),
    (r'blk\.(\d+)\.ffn_up\.weight', 'model.layers.{i}.mlp.up_proj.weight'),
    (r'blk\.(\d+)\.ffn_down\.weight', 'model.layers.{i}.mlp.down_proj.weight'),
    (r'blk\.(\d+)\.attn_norm\.weight', 'model.layers.{i}.input_layernorm.weight'),
    (r'blk\.(\d+)\.ffn_norm\.weight', 'model.layers.{i}.post_attention_layernorm.weight'),
)
_IGNORED = (r'rope_freqs\.weight', r'blk\.\d+\.attn_rot_embd')

# Pre-tokenizer regexes for byte-level BPE vocabularies, keyed by `tokenizer.ggml.pre`.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r'|\s*[\r\n]+|\s+(?!\S)|\s+'
)


def hf_key(gguf_name: str) -> str | None:
    """Maps a GGUF tensor name to its HF llama key (``None`` for tensors HF does not store)."""
    for pattern, key in _KEY_TABLE:
        if m := re.fullmatch(pattern, gguf_name):
            return key.format(i=m.group(1)) if m.groups() else key
    if any(re.fullmatch(p, gguf_name) for p in _IGNORED):
        return None
    raise ValueError(
        f'{gguf_name=} has no HF llama mapping; only llama-architecture GGUF files are supported'
    )


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undoes llama.cpp's rotary row permutation of a Q or K projection.

    llama.cpp's converter interleaves the two rotary halves of every head
    (``w.reshape(n_head, 2, d//2, in).swapaxes(1, 2)``); this is its inverse.

    Args:
      w: ``[n_head * head_dim, in]`` weight in HF ``(out, in)`` orientation.
      n_head: query heads for Q, key/value heads for K.
    """
    if w.shape[0] % n_head or (w.shape[0] // n_head) % 2:
        raise ValueError(f'{w.shape=} rows must split into {n_head=} heads of even head_dim')
    d = w.shape[0] // n_head
    return w.reshape(n_head, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _metadata(reader: Any) -> dict:
    arch = _field(reader, 'general.architecture')
    if arch != 'llama':
        raise ValueError(f'{arch=} is not supported; gguf_to_hf converts llama GGUF files only')

    def g(key: str, default: Any = None) -> Any:
        return _field(reader, f'llama.{key}', default)

    n_head = int(g('attention.head_count'))
    hidden = int(g('embedding_length'))
    return {
        'hidden_size': hidden,
        'intermediate_size': int(g('feed_forward_length')),
        'num_hidden_layers': int(g('block_count')),
        'num_attention_heads': n_head,
        'num_key_value_heads': int(g('attention.head_count_kv', n_head)),
        'head_dim': int(g('attention.key_length', g('rope.dimension_count', hidden // n_head))),
        'rms_norm_eps': float(np.float32(g('attention.layer_norm_rms_epsilon', 1e-5))),
        'rope_theta': float(g('rope.freq_base', 10000.0)),
        'max_position_embeddings': int(g('context_length', 2048)),
    }


def gguf_to_hf(
    gguf_path: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str = 'float32'
) -> pathlib.Path:
    """Converts a llama GGUF file into an HF folder (safetensors + config + tokenizer).

    Every tensor is dequantised with ``gguf.quants.dequantize`` (exact for the stored values),
    renamed by a regex table, and Q/K rows are un-permuted (see :func:`unpermute_qk`).
    A missing ``output.weight`` means tied embeddings (``tie_word_embeddings: true``).

    Args:
      gguf_path: a ``.gguf`` file with ``general.architecture == 'llama'``.
      out_dir: folder to write (created; existing files with the same names are overwritten).
        Callers that need atomicity write into a temporary folder and rename it.
      dtype: ``'float32'`` or ``'bfloat16'`` for the stored weights.

    Returns:
      ``out_dir`` as a path.

    Raises:
      FileNotFoundError: ``gguf_path`` does not exist.
      ValueError: non-llama architecture, unknown tensor name or unsupported ``dtype``.
    """
    import gguf  # lazy: heavy, only needed here
    import safetensors.numpy

    gguf_path = pathlib.Path(gguf_path)
    if not gguf_path.is_file():
        raise FileNotFoundError(f'{gguf_path=} does not exist; pass the path of a .gguf file')
    if dtype not in ('float32', 'bfloat16'):
        raise ValueError(f"{dtype=} is not supported; pass 'float32' or 'bfloat16'")
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    reader = gguf.GGUFReader(gguf_path)
    meta = _metadata(reader)
    np_dtype = np.float32 if dtype == 'float32' else _bf16()

    tensors = {}
    for t in reader.tensors:
        key = hf_key(t.name)
        if key is None:
            continue
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
        # GGUF lists dims innermost first; numpy data is already (out, in) = HF orientation.
        w = w.reshape([int(d) for d in reversed(t.shape)] if len(t.shape) > 1 else -1)
        if key.endswith('q_proj.weight'):
            w = unpermute_qk(w, meta['num_attention_heads'])
        elif key.endswith('k_proj.weight'):
            w = unpermute_qk(w, meta['num_key_value_heads'])
        tensors[key] = np.ascontiguousarray(w.astype(np_dtype))
    vocab_size = tensors['model.embed_tokens.weight'].shape[0]
    tied = 'lm_head.weight' not in tensors
    safetensors.numpy.save_file(tensors, out_dir / 'model.safetensors', metadata={'format': 'pt'})

    special = {
        f'{k}_token_id': int(v)
        for k, gk in (('bos', 'bos'), ('eos', 'eos'), ('pad', 'padding'))
        if (v := _field(reader, f'tokenizer.ggml.{gk}_token_id')) is not None
    }
    config = {
        'architectures': ['LlamaForCausalLM'],
        'model_type': 'llama',
        **meta,
        'rope_parameters': {'rope_type': 'default', 'rope_theta': meta['rope_theta']},
        'vocab_size': int(_field(reader, 'llama.vocab_size', vocab_size)),
        'tie_word_embeddings': tied,
        'hidden_act': 'silu',
        'attention_bias': False,
        'mlp_bias': False,
        'attention_dropout': 0.0,
        'initializer_range': 0.02,
        'pretraining_tp': 1,
        'use_cache': True,
        'dtype': dtype,
        **special,
        'jaxprune_source': {'gguf': gguf_path.name, 'name': _field(reader, 'general.name')},
    }
    (out_dir / 'config.json').write_text(json.dumps(config, indent=2) + '\n')
    try:
        write_tokenizer(reader, out_dir)
    except NotImplementedError as e:
        log.warning('%s: weights converted without a tokenizer: %s', gguf_path.name, e)
    return out_dir


def _bf16() -> Any:
    import ml_dtypes

    return ml_dtypes.bfloat16


def write_tokenizer(reader: Any, out_dir: pathlib.Path) -> None:
    """Builds a fast byte-level BPE tokenizer from GGUF metadata and saves it to ``out_dir``.

    Token type 3 (control) becomes a special added token, type 4 (user defined) a normal added
    token. ``tokenizer.ggml.pre`` selects the pre-tokenizer: ``smollm`` splits digits
    individually before GPT-2 byte-level splitting; ``gpt2`` and unknown values use GPT-2's;
    ``llama-bpe`` uses the Llama-3 regex.

    Raises:
      NotImplementedError: the vocabulary is not byte-level BPE (``tokenizer.ggml.model`` other
        than ``gpt2``), e.g. SentencePiece llama vocabularies.
    """
    import tokenizers
    import transformers
    from tokenizers import decoders, models, pre_tokenizers, processors

    kind = _field(reader, 'tokenizer.ggml.model')
    if kind != 'gpt2':
        raise NotImplementedError(f'tokenizer.ggml.model={kind!r}; only byte-level BPE (gpt2)')
    tokens = _field(reader, 'tokenizer.ggml.tokens')
    types = _field(reader, 'tokenizer.ggml.token_type') or [1] * len(tokens)
    merges = [tuple(m.split(' ', 1)) for m in _field(reader, 'tokenizer.ggml.merges', [])]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    pre = _field(reader, 'tokenizer.ggml.pre', 'gpt2')
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == 'smollm':
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    elif pre in ('llama-bpe', 'llama3'):
        split = pre_tokenizers.Split(tokenizers.Regex(_LLAMA3_SPLIT), behavior='isolated')
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    else:
        if pre != 'gpt2':
            log.warning('tokenizer.ggml.pre=%r unknown; using the GPT-2 byte-level split', pre)
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    added = [
        tokenizers.AddedToken(t, special=ty == 3, normalized=False)
        for t, ty in zip(tokens, types, strict=True)
        if ty in (3, 4)
    ]
    tok.add_tokens(added)

    def name(key: str) -> str | None:
        i = _field(reader, f'tokenizer.ggml.{key}_token_id')
        return None if i is None else tokens[int(i)]

    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=name('bos'),
        eos_token=name('eos'),
        unk_token=name('unknown'),
        pad_token=name('padding'),
        additional_special_tokens=[t.content for t in added if t.special],
        model_max_length=int(_field(reader, 'llama.context_length', 2048)),
        add_bos_token=bool(_field(reader, 'tokenizer.ggml.add_bos_token', False)),
        clean_up_tokenization_spaces=False,
    )
    if template := _field(reader, 'tokenizer.chat_template'):
        fast.chat_template = template
    fast.save_pretrained(out_dir)
    special_map = {
        k: v
        for k in ('bos_token', 'eos_token', 'unk_token', 'pad_token')
        if (v := getattr(fast, k)) is not None
    }
    special_map['additional_special_tokens'] = [t.content for t in added if t.special]
    (out_dir / 'special_tokens_map.json').write_text(json.dumps(special_map, indent=2) + '\n')
