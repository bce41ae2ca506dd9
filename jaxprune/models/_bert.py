"""BERT / RoBERTa encoder with a sequence-classification head, in Flax NNX.

Post-LN blocks: ``x = LN(x + Attn(x)); x = LN(x + FFN(x))``. The classification head is the same
computation for both types: ``classifier(tanh(pooler(x[:, 0])))`` (BERT's pooler + classifier;
RoBERTa's ``classifier.dense`` + ``classifier.out_proj`` map onto the same modules). With
``pooling='mean'`` the head reads the mean of the non-padding tokens instead of ``x[:, 0]`` (the
sentence embedding of sentence-transformers checkpoints such as all-MiniLM-L6-v2).
Masks and taps follow the layout documented in ``jaxprune.models``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from jaxprune import typing as jpt
from jaxprune.lora import _spec as lora_spec
from jaxprune.models import _layers, _llama

MODEL_TYPES = ('bert', 'roberta')
POOLINGS = ('cls', 'mean')


@dataclasses.dataclass(frozen=True, kw_only=True)
class BertConfig(_layers.PerLayerSizes):
    """Architecture of a BERT/RoBERTa sequence classifier.

    ``model_type='roberta'`` offsets position ids by ``pad_token_id + 1`` (padding tokens get
    position ``pad_token_id``). ``layer_heads``/``layer_mlp`` hold per-layer sizes after pruning.
    ``pooler_size`` is the pooler's output width; ``None`` resolves to ``hidden_size`` at
    construction, so ``dataclasses.replace(config, hidden_size=n)`` (hidden-dim pruning, which
    slices only the pooler's input) keeps the original pooler width. ``pooling`` is what the head
    reads: ``'cls'`` (the first token, as Hugging Face's ``*ForSequenceClassification``) or
    ``'mean'`` (the mean over the attention mask, as sentence-transformers).
    """

    model_type: str = 'bert'
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    head_dim: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    num_labels: int = 2
    layer_heads: tuple[int, ...] | None = None
    layer_mlp: tuple[int, ...] | None = None
    pooler_size: int | None = None
    pooling: str = 'cls'

    def __post_init__(self):
        if self.pooler_size is None:
            object.__setattr__(self, 'pooler_size', self.hidden_size)
        if self.pooling not in POOLINGS:
            raise ValueError(f'{self.pooling=} must be one of {POOLINGS}')
        for name in ('layer_heads', 'layer_mlp'):
            v = getattr(self, name)
            if v is not None:
                object.__setattr__(self, name, tuple(int(x) for x in v))
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f'{self.model_type=} must be one of {MODEL_TYPES}')
        for name in (
            'vocab_size',
            'hidden_size',
            'intermediate_size',
            'num_layers',
            'num_heads',
            'head_dim',
            'num_labels',
            'pooler_size',
        ):
            if getattr(self, name) < 1:
                raise ValueError(f'{name}={getattr(self, name)} must be >= 1')
        for name in ('layer_heads', 'layer_mlp'):
            v = getattr(self, name)
            if v is not None and (len(v) != self.num_layers or any(x < 1 for x in v)):
                raise ValueError(
                    f'{name}={v} needs one positive entry per layer ({self.num_layers})'
                )

    # Shared helpers with LlamaConfig (MHA: one query head per KV group).
    num_kv_heads = property(lambda self: self.num_heads)
    q_per_kv = property(lambda self: 1)

    def kv_heads(self, layer: int) -> int:
        return self.heads(layer)

    @classmethod
    def tiny(cls, **overrides) -> BertConfig:
        """A 2-layer encoder for tests (vocab 128, hidden 32, 4 heads, FFN 64, 2 labels)."""
        kw = {
            'vocab_size': 128,
            'hidden_size': 32,
            'intermediate_size': 64,
            'num_layers': 2,
            'num_heads': 4,
            'head_dim': 8,
            'max_position_embeddings': 64,
            'num_labels': 2,
        }
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def minilm_l6(cls, **overrides) -> BertConfig:
        """all-MiniLM-L6-v2 (6 layers, hidden 384, 12 heads, FFN 1536)."""
        kw = {
            'vocab_size': 30522,
            'hidden_size': 384,
            'intermediate_size': 1536,
            'num_layers': 6,
            'num_heads': 12,
            'head_dim': 32,
            'max_position_embeddings': 512,
        }
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def from_hf(cls, d: dict[str, Any], *, num_labels: int | None = None) -> BertConfig:
        """Build from a Hugging Face ``config.json`` dict (``model_type`` bert or roberta)."""
        mt = d.get('model_type', 'bert')
        if mt not in MODEL_TYPES:
            raise ValueError(f'model_type={mt!r} is not a BERT type; expected one of {MODEL_TYPES}')
        act = d.get('hidden_act', 'gelu')
        if act != 'gelu':
            raise ValueError(f'hidden_act={act!r} is not supported; only "gelu" (exact erf)')
        if num_labels is None:
            num_labels = d.get('num_labels') or len(d.get('id2label') or {}) or 2
        heads = d['num_attention_heads']
        return cls(
            model_type=mt,
            vocab_size=d['vocab_size'],
            hidden_size=d['hidden_size'],
            intermediate_size=d['intermediate_size'],
            num_layers=d['num_hidden_layers'],
            num_heads=heads,
            head_dim=d.get('head_dim') or d['hidden_size'] // heads,
            max_position_embeddings=d.get('max_position_embeddings', 512),
            type_vocab_size=d.get('type_vocab_size', 2),
            layer_norm_eps=d.get('layer_norm_eps', 1e-12),
            pad_token_id=d.get('pad_token_id')
            if d.get('pad_token_id') is not None
            else (1 if mt == 'roberta' else 0),
            num_labels=num_labels,
        )

    def to_hf(self) -> dict[str, Any]:
        """A Hugging Face config dict. Raises ``ValueError`` if HF cannot represent the shapes."""
        if not self.is_uniform:
            raise ValueError(
                f'per-layer sizes ({self.layer_heads=}, {self.layer_mlp=}) cannot be written as a '
                'Hugging Face config; export a uniform model or keep the jaxprune checkpoint'
            )
        if self.pooling != 'cls':
            raise ValueError(
                f'{self.pooling=}: Hugging Face *ForSequenceClassification reads the first token; '
                'keep the jaxprune checkpoint for a mean-pooling head'
            )
        if self.pooler_size != self.hidden_size:
            raise ValueError(
                f'{self.pooler_size=} != {self.hidden_size=}: Hugging Face BERT has a square '
                'pooler; keep the jaxprune checkpoint for hidden-pruned encoders'
            )
        if self.num_heads * self.head_dim != self.hidden_size:
            raise ValueError(
                f'{self.num_heads=} * {self.head_dim=} != {self.hidden_size=}: Hugging Face BERT '
                'derives head_dim from hidden_size; prune heads and hidden uniformly or keep the '
                'jaxprune checkpoint'
            )
        arch = (
            'RobertaForSequenceClassification'
            if self.model_type == 'roberta'
            else ('BertForSequenceClassification')
        )
        return {
            'architectures': [arch],
            'model_type': self.model_type,
            'vocab_size': self.vocab_size,
            'hidden_size': self.hidden_size,
            'intermediate_size': self.intermediate_size,
            'num_hidden_layers': self.num_layers,
            'num_attention_heads': self.num_heads,
            'hidden_act': 'gelu',
            'max_position_embeddings': self.max_position_embeddings,
            'type_vocab_size': self.type_vocab_size,
            'layer_norm_eps': self.layer_norm_eps,
            'pad_token_id': self.pad_token_id,
            'num_labels': self.num_labels,
            'id2label': {str(i): f'LABEL_{i}' for i in range(self.num_labels)},
            'label2id': {f'LABEL_{i}': i for i in range(self.num_labels)},
        }


_get = _llama._get


class Attention(nnx.Module):
    def __init__(self, cfg: BertConfig, layer: int, *, lora, param_dtype, rngs: nnx.Rngs):
        d, hd = cfg.hidden_size, cfg.head_dim
        self.num_heads = cfg.heads(layer)
        self.head_dim = hd
        base = f'layers.{layer}.attn'

        def lin(name, k, n, axes):
            return _layers.Linear(
                k,
                n,
                use_bias=True,
                axes=axes,
                param_dtype=param_dtype,
                rngs=rngs,
                **lora_spec.lora_kwargs(lora, f'{base}.{name}'),
            )

        hn = self.num_heads * hd
        self.query = lin('query', d, hn, (jpt.EMBED, jpt.HEADS))
        self.key = lin('key', d, hn, (jpt.EMBED, jpt.HEADS))
        self.value = lin('value', d, hn, (jpt.EMBED, jpt.HEADS))
        self.out = lin('out', hn, d, (jpt.HEADS, jpt.EMBED))

    def __call__(self, x, bias, m, tap, weights, lora_aware):
        bsz, t, _ = x.shape
        h, hd = self.num_heads, self.head_dim
        rm = _get(m, 'lora') or {}
        kw = {'in_mask': _get(m, 'attn_in'), 'lora_aware': lora_aware}
        q = self.query(x, rank_mask=rm.get('query'), **kw).reshape(bsz, t, h, hd)
        k = self.key(x, rank_mask=rm.get('key'), **kw).reshape(bsz, t, h, hd)
        v = self.value(x, rank_mask=rm.get('value'), **kw).reshape(bsz, t, h, hd)
        scores = jnp.einsum('bthd,bshd->bhts', q, k).astype(jnp.float32) / jnp.sqrt(hd)
        probs = jax.nn.softmax(scores + bias[:, None], axis=-1).astype(v.dtype)
        ctx = jnp.einsum('bhts,bshd->bthd', probs, v).reshape(bsz, t, h * hd)
        ctx, acts = _llama.tap_site(ctx, tap, 'attn_ctx', weights)
        out = _llama.project_heads(
            self.out, ctx, m, hd, rank_mask=rm.get('out'), lora_aware=lora_aware)
        return out, acts


class MLP(nnx.Module):
    def __init__(self, cfg: BertConfig, layer: int, *, lora, param_dtype, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.mlp(layer)
        base = f'layers.{layer}.mlp'
        kw = {'use_bias': True, 'param_dtype': param_dtype, 'rngs': rngs}
        self.up = _layers.Linear(
            d, f, axes=(jpt.EMBED, jpt.MLP), **kw, **lora_spec.lora_kwargs(lora, f'{base}.up')
        )
        self.down = _layers.Linear(
            f, d, axes=(jpt.MLP, jpt.EMBED), **kw, **lora_spec.lora_kwargs(lora, f'{base}.down')
        )

    def __call__(self, x, m, tap, weights, lora_aware):
        rm = _get(m, 'lora') or {}
        hmid = jax.nn.gelu(
            self.up(x, in_mask=_get(m, 'mlp_in'), rank_mask=rm.get('up'), lora_aware=lora_aware),
            approximate=False,
        )
        hmid, acts = _llama.tap_site(hmid, tap, 'mlp', weights)
        out = self.down(
            hmid,
            in_mask=_get(m, 'mlp'),
            out_mask=_get(m, 'mlp_out'),
            rank_mask=rm.get('down'),
            lora_aware=lora_aware,
        )
        return out, acts


class Block(nnx.Module):
    def __init__(self, cfg: BertConfig, layer: int, *, lora, param_dtype, rngs: nnx.Rngs):
        kw = {'param_dtype': param_dtype, 'rngs': rngs}
        self.attn = Attention(cfg, layer, lora=lora, **kw)
        self.attn_norm = _layers.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, **kw)
        self.mlp = MLP(cfg, layer, lora=lora, **kw)
        self.mlp_norm = _layers.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, **kw)

    def __call__(self, x, bias, hidden, m, tap, weights, lora_aware):
        a, acts_ctx = self.attn(x, bias, m, tap, weights, lora_aware)
        a, resid_acts = _llama.tap_site(a, tap, 'resid', weights)
        if hidden is not None:
            a = a * hidden
        x = self.attn_norm(x + a, hidden)
        f, acts_mlp = self.mlp(x, m, tap, weights, lora_aware)
        f, acts_f = _llama.tap_site(f, tap, 'resid', weights)
        resid_acts = _llama.add_acts(resid_acts, acts_f)
        if hidden is not None:
            f = f * hidden
        x = self.mlp_norm(x + f, hidden)
        acts = {
            k: v
            for k, v in (('attn_ctx', acts_ctx), ('mlp', acts_mlp), ('resid', resid_acts))
            if v is not None
        }
        return x, acts


def pool(x: Float[Array, 'B T D'], attention_mask: Int[Array, 'B T'] | None,
         pooling: str) -> Float[Array, 'B D']:
    """The head's input: the first token (``'cls'``) or the mean over the attention mask."""
    if pooling == 'cls':
        return x[:, 0]
    if attention_mask is None:
        return jnp.mean(x, axis=1)
    m = attention_mask.astype(x.dtype)[..., None]
    return jnp.sum(x * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1)


class BertForSequenceClassification(nnx.Module):
    """BERT/RoBERTa encoder + ``classifier(tanh(pooler(pool(h))))``, with ``pool`` the first
    token or the masked mean (``config.pooling``).

    Args:
      config: the architecture (``model_type`` picks BERT or RoBERTa position ids).
      lora: optional ``LoraSpec`` over module paths like ``layers.0.attn.query``.
      param_dtype: parameter dtype.
      rngs: ``nnx.Rngs``.
    """

    def __init__(
        self,
        config: BertConfig,
        *,
        lora: lora_spec.LoraSpec | None = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.config = config
        d = config.hidden_size
        kw = {'param_dtype': param_dtype, 'rngs': rngs}
        self.word_embed = _layers.Embed(config.vocab_size, d, **kw)
        self.pos_embed = _layers.Embed(
            config.max_position_embeddings, d, axes=(jpt.POSITION, jpt.EMBED), **kw
        )
        self.type_embed = _layers.Embed(config.type_vocab_size, d, axes=(None, jpt.EMBED), **kw)
        self.embed_norm = _layers.LayerNorm(d, eps=config.layer_norm_eps, **kw)
        self.layers = nnx.List(
            [Block(config, i, lora=lora, **kw) for i in range(config.num_layers)]
        )
        # The pooler's output axis is not the residual stream: hidden pruning slices its input only.
        self.pooler = _layers.Linear(
            d,
            config.pooler_size,
            use_bias=True,
            axes=(jpt.EMBED, None),
            **lora_spec.lora_kwargs(lora, 'pooler'),
            **kw,
        )
        self.classifier = _layers.Linear(
            config.pooler_size,
            config.num_labels,
            use_bias=True,
            axes=(None, jpt.LABELS),
            **lora_spec.lora_kwargs(lora, 'classifier'),
            **kw,
        )

    def hidden_states(
        self,
        input_ids: Int[Array, 'B T'],
        attention_mask: Int[Array, 'B T'] | None = None,
        *,
        masks: dict | None = None,
        taps: tuple | None = None,
        lora_aware: bool = False,
        output_hidden_states: bool = False,
    ) -> tuple[Float[Array, 'B T D'], tuple] | tuple[Float[Array, 'B T D'], tuple, tuple]:
        """Last-layer hidden states and per-layer tap activations (empty dicts without taps).

        With ``output_hidden_states`` a third element holds every block's output ``[B, T, D]``
        (``num_layers`` entries, the last equal to the first element).
        """
        cfg = self.config
        bsz, t = input_ids.shape
        hidden = _get(masks, 'hidden')
        layer_masks = _get(masks, 'layers')
        if layer_masks is not None and len(layer_masks) != len(self.layers):
            raise ValueError(
                f'masks["layers"] has {len(layer_masks)} entries; expected '
                f'{len(self.layers)} (one dict per layer)'
            )
        if taps is not None and len(taps) != len(self.layers):
            raise ValueError(f'taps has {len(taps)} entries; expected {len(self.layers)}')
        if cfg.model_type == 'roberta':
            not_pad = (input_ids != cfg.pad_token_id).astype(jnp.int32)
            positions = jnp.cumsum(not_pad, axis=-1) * not_pad + cfg.pad_token_id
        else:
            positions = jnp.broadcast_to(jnp.arange(t), (bsz, t))
        x = (
            self.word_embed(input_ids)
            + self.pos_embed(positions)
            + self.type_embed(jnp.zeros_like(input_ids))
        )
        x = self.embed_norm(x, hidden)
        if attention_mask is None:
            bias = jnp.zeros((1, 1, t), jnp.float32)
            weights = None
        else:
            weights = attention_mask.astype(jnp.int32)
            bias = jnp.where(weights[:, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min)
        all_acts, outs = [], []
        for i, block in enumerate(self.layers):
            m = None if layer_masks is None else layer_masks[i]
            tap = None if taps is None else taps[i]
            x, acts = block(x, bias, hidden, m, tap, weights, lora_aware)
            all_acts.append(acts)
            outs.append(x)
        if output_hidden_states:
            return x, tuple(all_acts), tuple(outs)
        return x, tuple(all_acts)

    def __call__(
        self,
        input_ids: Int[Array, 'B T'],
        attention_mask: Int[Array, 'B T'] | None = None,
        *,
        masks: dict | None = None,
        taps: tuple | None = None,
        lora_aware: bool = False,
        output_hidden_states: bool = False,
    ) -> Float[Array, 'B L'] | tuple:
        """Class logits ``[B, num_labels]``; with ``taps`` returns ``(logits, acts)``.

        Arguments and the ``output_hidden_states`` convention as in ``Llama.__call__``; token
        type ids are all zero.
        """
        x, acts, outs = self.hidden_states(
            input_ids, attention_mask, masks=masks, taps=taps, lora_aware=lora_aware,
            output_hidden_states=True,
        )
        pooled = jnp.tanh(self.pooler(pool(x, attention_mask, self.config.pooling),
                                      lora_aware=lora_aware))
        logits = self.classifier(pooled, lora_aware=lora_aware)
        return _llama.outputs(logits, acts if taps is not None else None,
                              outs if output_hidden_states else None)

    def encode(
        self,
        input_ids: Int[Array, 'B T'],
        attention_mask: Int[Array, 'B T'] | None = None,
        *,
        masks: dict | None = None,
    ) -> Float[Array, 'B D']:
        """Sentence embeddings: last hidden states mean-pooled over real tokens."""
        x, _ = self.hidden_states(input_ids, attention_mask, masks=masks)
        return pool(x, attention_mask, 'mean')
