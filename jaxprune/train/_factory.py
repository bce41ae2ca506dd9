"""Model and tokenizer factory for the training loop.

``model.name_or_path`` is resolved as:

* ``tiny-bert`` / ``tiny-llama``: the architectures' ``tiny()`` presets with a fixed init seed and a
  byte-level tokenizer (256 bytes + 4 specials), for tests and smoke runs; nothing is downloaded.
* anything else: ``jaxprune.assets.resolve_model`` (asset name, local HF folder, ``.gguf``), then
  ``jaxprune.models.load_pretrained`` and the folder's tokenizer.
"""

from __future__ import annotations

import functools
from typing import Any

import jax.numpy as jnp
from flax import nnx

TINY_MODELS = ('tiny-bert', 'tiny-llama')
TINY_VOCAB = 264  # 4 specials + 256 byte symbols, rounded up to a multiple of 8
_SPECIALS = ('[PAD]', '[UNK]', '[CLS]', '[SEP]')
_INIT_SEED = 0


@functools.cache
def tiny_tokenizer():
    """A byte-level HF fast tokenizer with ``[PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3`` (eos = SEP)."""
    import tokenizers
    import transformers
    from tokenizers import decoders, pre_tokenizers

    vocab = {s: i for i, s in enumerate(_SPECIALS)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[], unk_token='[UNK]'))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token='[PAD]', unk_token='[UNK]', cls_token='[CLS]',
        sep_token='[SEP]', eos_token='[SEP]', bos_token='[CLS]')


def dtype(name: str):
    """The jnp dtype named by a config string."""
    return {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}[name]


def build_model(model_cfg: Any, lora_cfg: Any) -> tuple[nnx.Module, Any, Any]:
    """Builds ``(model, arch_config, tokenizer)`` for a ``ModelCfg`` and a ``LoraCfg``.

    Raises:
      ValueError: the task does not match the architecture.
      FileNotFoundError: the model cannot be resolved.
    """
    from jaxprune import models

    spec = lora_cfg.build()
    rngs = nnx.Rngs(_INIT_SEED)
    name = model_cfg.name_or_path
    param_dtype = dtype(model_cfg.dtype)  # trained leaves are cast to param_dtype by the loop
    if name in TINY_MODELS:
        if name == 'tiny-bert':
            _check_task(model_cfg, 'classification')
            arch = models.BertConfig.tiny(vocab_size=TINY_VOCAB, num_labels=model_cfg.num_labels,
                                          pooling=model_cfg.pooling)
            model = models.BertForSequenceClassification(
                arch, lora=spec, param_dtype=param_dtype, rngs=rngs)
        else:
            _check_task(model_cfg, 'causal_lm')
            arch = models.LlamaConfig.tiny(vocab_size=TINY_VOCAB)
            model = models.Llama(arch, lora=spec, param_dtype=param_dtype, rngs=rngs)
        return model, arch, tiny_tokenizer()

    from jaxprune import assets

    path = assets.resolve_model(name)
    classify = model_cfg.task == 'classification'
    model, arch = models.load_pretrained(
        path, dtype=param_dtype, num_labels=model_cfg.num_labels if classify else None,
        pooling=model_cfg.pooling if classify else None, lora=spec, rngs=rngs)
    is_lm = isinstance(arch, models.LlamaConfig)
    _check_task(model_cfg, 'causal_lm' if is_lm else 'classification')
    return model, arch, load_tokenizer(path)


def load_tokenizer(path):
    """The HF tokenizer stored next to a model (folder, or the folder holding a ``.gguf``)."""
    import pathlib

    import transformers

    path = pathlib.Path(path)
    folder = path if path.is_dir() else path.parent
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _check_task(model_cfg, expected: str) -> None:
    if model_cfg.task != expected:
        raise ValueError(
            f'model.task={model_cfg.task!r} does not fit model.name_or_path='
            f'{model_cfg.name_or_path!r}; set model.task={expected}')
