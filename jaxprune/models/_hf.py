"""Hugging Face import/export through declarative key tables (no torch).

Each architecture has a table of ``Rule(hf, nnx, transpose)`` templates. ``{i}`` is a layer index;
other ``{name}`` fields take the alternatives listed in the rule. The same table drives loading
(NNX path -> HF key) and saving (NNX path -> HF key, transposing kernels back to ``(out, in)``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import re
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import numpy as st_numpy

from jaxprune.lora import _spec as lora_spec
from jaxprune.models import _bert, _layers, _llama

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Rule:
    """One HF key template <-> one NNX parameter path template.

    ``prefixed``: the HF key sits under the backbone prefix (``bert.``/``roberta.``) which may be
    absent (sentence-transformers folders). ``optional``: a missing tensor keeps its fresh init.
    """

    hf: str
    nnx: str
    transpose: bool = False
    alts: tuple[tuple[str, str], ...] = ()
    prefixed: bool = True
    optional: bool = False

    def _regex(self, template: str) -> re.Pattern:
        groups = dict(self.alts)
        out, pos = '', 0
        for m in re.finditer(r'\{(\w+)\}', template):
            out += re.escape(template[pos : m.start()])
            name = m.group(1)
            out += f'(?P<{name}>' + (r'\d+' if name == 'i' else groups[name]) + ')'
            pos = m.end()
        return re.compile(out + re.escape(template[pos:]))

    def match_nnx(self, path: str) -> dict[str, str] | None:
        m = self._regex(self.nnx).fullmatch(path)
        return None if m is None else m.groupdict()

    def hf_key(self, fields: dict[str, str]) -> str:
        return self.hf.format(**fields)


_W = (('w', 'weight|bias'),)


def _lin(hf: str, nnx_path: str, alts=(), **kw) -> tuple[Rule, Rule]:
    """A linear layer: ``weight`` -> ``kernel`` (transposed), ``bias`` -> ``bias``."""
    return (
        Rule(f'{hf}.weight', f'{nnx_path}.kernel', True, alts, **kw),
        Rule(f'{hf}.bias', f'{nnx_path}.bias', False, alts, **kw),
    )


def _norm(hf: str, nnx_path: str, alts=(), *, bias: bool = True, **kw) -> tuple[Rule, ...]:
    rules = (Rule(f'{hf}.weight', f'{nnx_path}.scale', False, alts, **kw),)
    if bias:
        rules += (Rule(f'{hf}.bias', f'{nnx_path}.bias', False, alts, **kw),)
    return rules


_ATTN = (('p', 'q_proj|k_proj|v_proj|o_proj'),)
_FFN = (('p', 'gate_proj|up_proj|down_proj'),)

LLAMA_RULES: tuple[Rule, ...] = (
    Rule('model.embed_tokens.weight', 'embed.embedding'),
    *_lin('model.layers.{i}.self_attn.{p}', 'layers.{i}.attn.{p}', _ATTN),
    *_lin('model.layers.{i}.mlp.{p}', 'layers.{i}.mlp.{p}', _FFN),
    *_norm('model.layers.{i}.input_layernorm', 'layers.{i}.attn_norm', bias=False),
    *_norm('model.layers.{i}.post_attention_layernorm', 'layers.{i}.mlp_norm', bias=False),
    *_norm('model.norm', 'norm', bias=False),
    Rule('lm_head.weight', 'lm_head.kernel', True),
)

_QKV = (('p', 'query|key|value'),)
_BERT_BODY: tuple[Rule, ...] = (
    Rule('embeddings.word_embeddings.weight', 'word_embed.embedding'),
    Rule('embeddings.position_embeddings.weight', 'pos_embed.embedding'),
    Rule('embeddings.token_type_embeddings.weight', 'type_embed.embedding'),
    *_norm('embeddings.LayerNorm', 'embed_norm'),
    *_lin('encoder.layer.{i}.attention.self.{p}', 'layers.{i}.attn.{p}', _QKV),
    *_lin('encoder.layer.{i}.attention.output.dense', 'layers.{i}.attn.out'),
    *_norm('encoder.layer.{i}.attention.output.LayerNorm', 'layers.{i}.attn_norm'),
    *_lin('encoder.layer.{i}.intermediate.dense', 'layers.{i}.mlp.up'),
    *_lin('encoder.layer.{i}.output.dense', 'layers.{i}.mlp.down'),
    *_norm('encoder.layer.{i}.output.LayerNorm', 'layers.{i}.mlp_norm'),
)
BERT_RULES: tuple[Rule, ...] = _BERT_BODY + (
    *_lin('pooler.dense', 'pooler', optional=True),
    *_lin('classifier', 'classifier', prefixed=False, optional=True),
)
ROBERTA_RULES: tuple[Rule, ...] = _BERT_BODY + (
    *_lin('classifier.dense', 'pooler', prefixed=False, optional=True),
    *_lin('classifier.out_proj', 'classifier', prefixed=False, optional=True),
)

ARCHITECTURES: dict[str, tuple[str, tuple[Rule, ...]]] = {
    # model_type: (backbone prefix for prefixed rules, rules)
    'llama': ('', LLAMA_RULES),
    'mistral': ('', LLAMA_RULES),
    'bert': ('bert.', BERT_RULES),
    'roberta': ('roberta.', ROBERTA_RULES),
}

# HF buffers that are not parameters.
_IGNORED = re.compile(r'.*(rotary_emb\.inv_freq|position_ids|masked_bias|attn\.bias)$')


def _flat(tree: Any) -> dict[str, Any]:
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out['.'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)] = leaf
    return out


def _unflat_set(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split('.')
    for p in parts[:-1]:
        node = node[int(p)] if (p.isdigit() and int(p) in node) else node[p]
    node[parts[-1]] = value


def _find_rule(rules, path: str) -> tuple[Rule, dict[str, str]]:
    for rule in rules:
        fields = rule.match_nnx(path)
        if fields is not None:
            return rule, fields
    raise ValueError(f'no Hugging Face rule for parameter {path=}; extend the table in _hf.py')


def _is_lora(path: str) -> bool:
    return path.endswith(('.lora_a', '.lora_b'))


class _Tensors:
    """Lazy reader over one or many safetensors files."""

    def __init__(self, folder: pathlib.Path):
        index = folder / 'model.safetensors.index.json'
        single = folder / 'model.safetensors'
        if index.exists():
            weight_map = json.loads(index.read_text())['weight_map']
            self.files = {k: folder / v for k, v in weight_map.items()}
        elif single.exists():
            self.files = {k: single for k in self._keys(single)}
        else:
            raise FileNotFoundError(
                f'no model.safetensors or model.safetensors.index.json in {folder=}; '
                'save the Hugging Face model with safe_serialization=True'
            )
        self._cache: dict[pathlib.Path, dict[str, np.ndarray]] = {}

    @staticmethod
    def _keys(file: pathlib.Path) -> list[str]:
        with open(file, 'rb') as f:
            n = int.from_bytes(f.read(8), 'little')
            header = json.loads(f.read(n))
        return [k for k in header if k != '__metadata__']

    def __contains__(self, key: str) -> bool:
        return key in self.files

    def __iter__(self):
        return iter(self.files)

    def __getitem__(self, key: str) -> np.ndarray:
        file = self.files[key]
        if file not in self._cache:
            self._cache[file] = _load_file(file)
        return self._cache[file][key]


def _load_file(file: pathlib.Path) -> dict[str, np.ndarray]:
    # safetensors.numpy decodes BF16 through ml_dtypes; no torch needed.
    return st_numpy.load_file(str(file))


def _build(config, *, lora, dtype, rngs):
    if isinstance(config, _llama.LlamaConfig):
        return _llama.Llama(config, lora=lora, param_dtype=dtype, rngs=rngs)
    return _bert.BertForSequenceClassification(config, lora=lora, param_dtype=dtype, rngs=rngs)


def load_pretrained(
    path: str | pathlib.Path,
    *,
    dtype: Any = jnp.float32,
    num_labels: int | None = None,
    pooling: str | None = None,
    lora: lora_spec.LoraSpec | None = None,
    rngs: nnx.Rngs | None = None,
) -> tuple[nnx.Module, Any]:
    """Load a Hugging Face model folder (or a ``.gguf`` file) into a jaxprune NNX model.

    Args:
      path: an HF folder with ``config.json`` and ``model.safetensors`` (or a sharded
        ``model.safetensors.index.json``), or a ``.gguf`` file (converted to such a folder with
        ``jaxprune.assets.gguf_to_hf`` in a temporary directory).
      dtype: parameter dtype.
      num_labels: classifier width for BERT/RoBERTa (default: from ``config.json``). A classifier
        missing from the checkpoint, or of a different width, is initialised fresh.
      pooling: BERT/RoBERTa head input, ``'cls'`` or ``'mean'`` (default ``'cls'``); see
        :class:`jaxprune.models.BertConfig`. Must be ``None`` for decoders.
      lora: optional ``LoraSpec``; adapters start at ``B = 0`` (the loaded function is unchanged).
      rngs: initialisation RNGs for parameters not in the checkpoint (default ``nnx.Rngs(0)``).

    Returns:
      ``(model, config)`` with ``config`` a ``LlamaConfig`` or ``BertConfig``.

    Raises:
      FileNotFoundError: missing folder, ``config.json`` or weights.
      ValueError: unknown ``model_type``, missing tensor, or a tensor of the wrong shape.
    """
    path = pathlib.Path(path)
    if path.suffix == '.gguf':
        if not path.exists():
            raise FileNotFoundError(f'{path=} does not exist')
        from jaxprune import assets

        out_dir = pathlib.Path(tempfile.mkdtemp(prefix='jaxprune_gguf_'))
        assets.gguf_to_hf(path, out_dir)
        path = out_dir
    if not path.is_dir():
        raise FileNotFoundError(
            f'{path=} is not a directory; pass a Hugging Face model folder or a .gguf file'
        )
    cfg_file = path / 'config.json'
    if not cfg_file.exists():
        raise FileNotFoundError(f'{cfg_file=} not found; the folder must hold config.json')
    hf_cfg = json.loads(cfg_file.read_text())
    model_type = hf_cfg.get('model_type')
    if model_type not in ARCHITECTURES:
        raise ValueError(f'{model_type=} is not supported; expected one of {list(ARCHITECTURES)}')
    prefix, rules = ARCHITECTURES[model_type]
    if model_type in _bert.MODEL_TYPES:
        config = _bert.BertConfig.from_hf(hf_cfg, num_labels=num_labels)
        if pooling is not None:
            config = dataclasses.replace(config, pooling=pooling)
    else:
        if pooling is not None:
            raise ValueError(f'{pooling=} applies to BERT/RoBERTa classifiers, not {model_type=}')
        config = _llama.LlamaConfig.from_hf(hf_cfg)
    tensors = _Tensors(path)
    model = _build(config, lora=lora, dtype=dtype, rngs=rngs or nnx.Rngs(0))
    state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    used = set()
    for name, leaf in _flat(state).items():
        if _is_lora(name):
            continue
        rule, fields = _find_rule(rules, name)
        key = rule.hf_key(fields)
        candidates = [prefix + key, key] if (rule.prefixed and prefix) else [key]
        found = next((c for c in candidates if c in tensors), None)
        if found is None:
            if rule.optional:
                log.info('%s not in checkpoint; keeping a fresh init for %s', key, name)
                continue
            raise ValueError(
                f'missing tensor {candidates[0]!r} (for {name}) in {path}; the '
                'checkpoint does not match config.json'
            )
        value = np.asarray(tensors[found])
        if rule.transpose:
            value = value.T
        if value.shape != tuple(leaf.shape):
            if rule.optional and name.startswith('classifier'):
                log.info(
                    '%s has shape %s, model wants %s; keeping a fresh classifier',
                    found,
                    value.shape,
                    leaf.shape,
                )
                continue
            expected = tuple(leaf.shape[::-1]) if rule.transpose else tuple(leaf.shape)
            found_shape = tuple(tensors[found].shape)
            raise ValueError(
                f'tensor {found!r}: {expected=} (HF layout) but found '
                f'{found_shape}; the checkpoint does not match config.json'
            )
        used.add(found)
        _unflat_set(state, name, jnp.asarray(value, dtype=dtype))
    unused = [k for k in tensors if k not in used and not _IGNORED.match(k)]
    if _tied(config) and any(k.endswith('lm_head.weight') for k in unused):
        unused = [k for k in unused if not k.endswith('lm_head.weight')]
    if unused:
        log.warning('ignored %d checkpoint tensors, e.g. %s', len(unused), unused[:5])
    nnx.update(model, state)
    return model, config


def _tied(config) -> bool:
    return bool(getattr(config, 'tie_word_embeddings', False))


def _merged_params(model: nnx.Module) -> dict[str, np.ndarray]:
    """Flat NNX params with every LoRA adapter folded into its kernel (masks not applied)."""
    state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    flat = _flat(state)
    for mpath, module in nnx.iter_modules(model):
        if isinstance(module, _layers.Linear) and module.lora_rank:
            name = '.'.join(str(p) for p in mpath)
            a, b = flat.pop(f'{name}.lora_a'), flat.pop(f'{name}.lora_b')
            k = flat[f'{name}.kernel']
            flat[f'{name}.kernel'] = k + module.lora_scale * (a @ b).astype(k.dtype)
    return {
        k: np.asarray(jnp.asarray(v, jnp.float32)) if v.dtype == jnp.bfloat16 else np.asarray(v)
        for k, v in flat.items()
    }


def save_pretrained(model: nnx.Module, config: Any, path: str | pathlib.Path) -> pathlib.Path:
    """Write ``config.json`` and ``model.safetensors`` that ``transformers`` can load.

    LoRA adapters are merged into the kernels (``W + s A B``). bfloat16 parameters are written as
    float32.

    Args:
      model: a ``Llama`` or ``BertForSequenceClassification``.
      config: its config (must have uniform per-layer sizes).
      path: output folder (created).

    Returns:
      The folder path.

    Raises:
      ValueError: per-layer sizes differ (not representable as an HF config).
    """
    hf_cfg = config.to_hf()
    prefix, rules = ARCHITECTURES[hf_cfg['model_type']]
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, value in _merged_params(model).items():
        rule, fields = _find_rule(rules, name)
        key = (prefix if rule.prefixed else '') + rule.hf_key(fields)
        tensors[key] = np.ascontiguousarray(value.T if rule.transpose else value)
    st_numpy.save_file(tensors, str(path / 'model.safetensors'), metadata={'format': 'pt'})
    (path / 'config.json').write_text(json.dumps(hf_cfg, indent=2))
    return path
