"""Llama-family causal LM (LLaMA-2/3, SmolLM2, Mistral without sliding window) in Flax NNX.

Masks and taps follow the layout documented in ``jaxprune.models``. Layers are an ``nnx.List`` so
that each layer can have its own head and FFN width after physical pruning.
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
from jaxprune.models import _layers

_ROPE_KEYS = (
    'rope_type',
    'factor',
    'low_freq_factor',
    'high_freq_factor',
    'original_max_position_embeddings',
)


def _freeze(d):
    if d is None:
        return None
    if isinstance(d, dict):
        return tuple(sorted(d.items()))
    return tuple(d)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig(_layers.PerLayerSizes):
    """Architecture of a Llama-family decoder.

    ``layer_heads``/``layer_mlp`` hold per-layer query-head and FFN widths after pruning (``None``
    = uniform ``num_heads``/``intermediate_size``). Query heads per layer are always a multiple of
    ``q_per_kv = num_heads // num_kv_heads`` (a KV group is pruned with its query heads).
    ``rope_scaling`` is stored as a sorted tuple of items (hashable); pass a dict.
    Mistral configs load as Llama; ``sliding_window`` is ignored (exact for sequences shorter
    than the window).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: Any = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    attention_bias: bool = False
    mlp_bias: bool = False
    layer_heads: tuple[int, ...] | None = None
    layer_mlp: tuple[int, ...] | None = None

    def __post_init__(self):
        object.__setattr__(self, 'rope_scaling', _freeze(self.rope_scaling))
        for name in ('layer_heads', 'layer_mlp'):
            v = getattr(self, name)
            if v is not None:
                object.__setattr__(self, name, tuple(int(x) for x in v))
        for name in (
            'vocab_size',
            'hidden_size',
            'intermediate_size',
            'num_layers',
            'num_heads',
            'num_kv_heads',
            'head_dim',
        ):
            if getattr(self, name) < 1:
                raise ValueError(f'{name}={getattr(self, name)} must be >= 1')
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f'{self.num_heads=} must be a multiple of {self.num_kv_heads=} (GQA groups)'
            )
        if self.head_dim % 2:
            raise ValueError(f'{self.head_dim=} must be even (RoPE)')
        if self.layer_heads is not None:
            if len(self.layer_heads) != self.num_layers:
                raise ValueError(
                    f'{self.layer_heads=} needs one entry per layer ({self.num_layers})'
                )
            if any(h < 1 or h % self.q_per_kv for h in self.layer_heads):
                raise ValueError(
                    f'{self.layer_heads=} entries must be positive multiples of {self.q_per_kv=}'
                )
        if self.layer_mlp is not None and (
            len(self.layer_mlp) != self.num_layers or any(f < 1 for f in self.layer_mlp)
        ):
            raise ValueError(
                f'{self.layer_mlp=} needs one positive entry per layer ({self.num_layers})'
            )
        _layers.rope_inv_freq(self.head_dim, theta=self.rope_theta, scaling=self.rope_scaling_dict)

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return None if self.rope_scaling is None else dict(self.rope_scaling)

    def kv_heads(self, layer: int) -> int:
        """KV heads in ``layer``."""
        return self.heads(layer) // self.q_per_kv

    @classmethod
    def tiny(cls, **overrides) -> LlamaConfig:
        """A 2-layer GQA model for tests (vocab 128, hidden 32, 4 heads / 2 KV heads)."""
        kw = {
            'vocab_size': 128,
            'hidden_size': 32,
            'intermediate_size': 64,
            'num_layers': 2,
            'num_heads': 4,
            'num_kv_heads': 2,
            'head_dim': 8,
            'rope_theta': 10000.0,
            'rms_norm_eps': 1e-5,
            'tie_word_embeddings': False,
            'max_position_embeddings': 128,
        }
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def smollm2_135m(cls) -> LlamaConfig:
        """SmolLM2-135M (30 layers, 9 heads / 3 KV heads, hidden 576, FFN 1536, tied head)."""
        return cls(
            vocab_size=49152,
            hidden_size=576,
            intermediate_size=1536,
            num_layers=30,
            num_heads=9,
            num_kv_heads=3,
            head_dim=64,
            rope_theta=100000.0,
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
            max_position_embeddings=8192,
        )

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> LlamaConfig:
        """Build from a Hugging Face ``config.json`` dict (llama / mistral model types)."""
        heads = d['num_attention_heads']
        rope = dict(d.get('rope_parameters') or {})
        theta = rope.pop('rope_theta', d.get('rope_theta', 10000.0))
        scaling = d.get('rope_scaling') or rope or None
        if scaling is not None:
            scaling = {k: v for k, v in scaling.items() if k in _ROPE_KEYS or k == 'type'}
            if 'type' in scaling:
                scaling.setdefault('rope_type', scaling.pop('type'))
            if scaling.get('rope_type', 'default') == 'default':
                scaling = None
        return cls(
            vocab_size=d['vocab_size'],
            hidden_size=d['hidden_size'],
            intermediate_size=d['intermediate_size'],
            num_layers=d['num_hidden_layers'],
            num_heads=heads,
            num_kv_heads=d.get('num_key_value_heads') or heads,
            head_dim=d.get('head_dim') or d['hidden_size'] // heads,
            rope_theta=float(theta),
            rope_scaling=scaling,
            rms_norm_eps=d.get('rms_norm_eps', 1e-6),
            tie_word_embeddings=bool(d.get('tie_word_embeddings', False)),
            max_position_embeddings=d.get('max_position_embeddings', 2048),
            attention_bias=bool(d.get('attention_bias', False)),
            mlp_bias=bool(d.get('mlp_bias', False)),
        )

    def to_hf(self) -> dict[str, Any]:
        """A Hugging Face ``LlamaConfig`` dict. Raises ``ValueError`` for non-uniform layers."""
        if not self.is_uniform:
            raise ValueError(
                f'per-layer sizes ({self.layer_heads=}, {self.layer_mlp=}) cannot be written as a '
                'Hugging Face LlamaConfig; export a uniform model or keep the jaxprune checkpoint'
            )
        rope = {'rope_type': 'default'} if self.rope_scaling is None else self.rope_scaling_dict
        rope = {**rope, 'rope_theta': self.rope_theta}
        return {
            'architectures': ['LlamaForCausalLM'],
            'model_type': 'llama',
            'vocab_size': self.vocab_size,
            'hidden_size': self.hidden_size,
            'intermediate_size': self.intermediate_size,
            'num_hidden_layers': self.num_layers,
            'num_attention_heads': self.num_heads,
            'num_key_value_heads': self.num_kv_heads,
            'head_dim': self.head_dim,
            'hidden_act': 'silu',
            'rope_theta': self.rope_theta,
            'rope_parameters': rope,
            'rms_norm_eps': self.rms_norm_eps,
            'tie_word_embeddings': self.tie_word_embeddings,
            'max_position_embeddings': self.max_position_embeddings,
            'attention_bias': self.attention_bias,
            'mlp_bias': self.mlp_bias,
        }


def _tap_acts(h: jax.Array, weights: jax.Array | None) -> jax.Array:
    """Per-channel sum over batch and tokens of |h| (padding tokens excluded)."""
    a = jnp.abs(h)
    if weights is not None:
        a = a * weights[..., None].astype(a.dtype)
    return jnp.sum(a.reshape(-1, a.shape[-1]), axis=0)


def _get(d, key):
    return None if d is None else d.get(key)


def tap_site(h: jax.Array, tap: Any, name: str, weights: jax.Array | None):
    """Applies the taps of site ``name`` to the activation ``h``; returns ``(h, sum|h|)``.

    ``tap[name + '_mask']`` (``[B, 1, C]`` zeros) scales ``h`` by ``1 + tap``: its gradient is the
    per-example gradient of a per-channel mask, ``sum_t H * dL/dH`` (the Fisher salience). Then
    ``tap[name]`` (``[B, T, C]`` zeros) is added: its gradient is ``dL/dH`` (the APT salience).
    Without an additive tap for this site the activations are ``None``.
    """
    if tap is None:
        return h, None
    if name + '_mask' in tap:
        h = h * (1 + tap[name + '_mask'].astype(h.dtype))
    if name not in tap:
        return h, None
    h = h + tap[name]
    return h, _tap_acts(h, weights)


def add_acts(a: jax.Array | None, b: jax.Array | None) -> jax.Array | None:
    """Sum of two optional per-channel activation sums (``None`` = no tap)."""
    return b if a is None else a if b is None else a + b


def project_heads(proj, ctx: jax.Array, m: Any, head_dim: int, *, rank_mask, lora_aware: bool):
    """The attention output projection under the ``heads``/``attn_ctx``/``attn_out`` masks.

    A head mask is expanded to its ``head_dim`` channels and combined with the per-channel
    ``attn_ctx`` mask, both acting on the projection's input.
    """
    in_mask = _get(m, 'attn_ctx')
    if _get(m, 'heads') is not None:
        head_mask = jnp.repeat(m['heads'], head_dim)
        in_mask = head_mask if in_mask is None else in_mask * head_mask
    return proj(ctx, in_mask=in_mask, out_mask=_get(m, 'attn_out'), rank_mask=rank_mask,
                lora_aware=lora_aware)


class Attention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, layer: int, *, lora, param_dtype, rngs: nnx.Rngs):
        d, hd = cfg.hidden_size, cfg.head_dim
        self.num_heads = cfg.heads(layer)
        self.num_kv_heads = cfg.kv_heads(layer)
        self.head_dim = hd
        base = f'layers.{layer}.attn'

        def lin(name, k, n, axes, bias):
            return _layers.Linear(
                k,
                n,
                use_bias=bias,
                axes=axes,
                param_dtype=param_dtype,
                rngs=rngs,
                **lora_spec.lora_kwargs(lora, f'{base}.{name}'),
            )

        b = cfg.attention_bias
        self.q_proj = lin('q_proj', d, self.num_heads * hd, (jpt.EMBED, jpt.HEADS), b)
        self.k_proj = lin('k_proj', d, self.num_kv_heads * hd, (jpt.EMBED, jpt.KV_HEADS), b)
        self.v_proj = lin('v_proj', d, self.num_kv_heads * hd, (jpt.EMBED, jpt.KV_HEADS), b)
        self.o_proj = lin('o_proj', self.num_heads * hd, d, (jpt.HEADS, jpt.EMBED), b)

    def __call__(self, x, positions, bias, inv_freq, m, tap, weights, lora_aware):
        bsz, t, _ = x.shape
        hd, h, kv = self.head_dim, self.num_heads, self.num_kv_heads
        rm = _get(m, 'lora') or {}
        kw = {'in_mask': _get(m, 'attn_in'), 'lora_aware': lora_aware}
        q = self.q_proj(x, rank_mask=rm.get('q_proj'), **kw).reshape(bsz, t, h, hd)
        k = self.k_proj(x, rank_mask=rm.get('k_proj'), **kw).reshape(bsz, t, kv, hd)
        v = self.v_proj(x, rank_mask=rm.get('v_proj'), **kw).reshape(bsz, t, kv, hd)
        q = _layers.apply_rope(q, positions, inv_freq)
        k = _layers.apply_rope(k, positions, inv_freq)
        q = q.reshape(bsz, t, kv, h // kv, hd)
        scores = jnp.einsum('btkgd,bskd->bkgts', q, k).astype(jnp.float32) / jnp.sqrt(hd)
        probs = jax.nn.softmax(scores + bias[:, None, None], axis=-1).astype(v.dtype)
        ctx = jnp.einsum('bkgts,bskd->btkgd', probs, v).reshape(bsz, t, h * hd)
        ctx, acts = tap_site(ctx, tap, 'attn_ctx', weights)
        out = project_heads(
            self.o_proj, ctx, m, hd, rank_mask=rm.get('o_proj'), lora_aware=lora_aware)
        return out, acts


class MLP(nnx.Module):
    def __init__(self, cfg: LlamaConfig, layer: int, *, lora, param_dtype, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.mlp(layer)
        base = f'layers.{layer}.mlp'

        def lin(name, k, n, axes):
            return _layers.Linear(
                k,
                n,
                use_bias=cfg.mlp_bias,
                axes=axes,
                param_dtype=param_dtype,
                rngs=rngs,
                **lora_spec.lora_kwargs(lora, f'{base}.{name}'),
            )

        self.gate_proj = lin('gate_proj', d, f, (jpt.EMBED, jpt.MLP))
        self.up_proj = lin('up_proj', d, f, (jpt.EMBED, jpt.MLP))
        self.down_proj = lin('down_proj', f, d, (jpt.MLP, jpt.EMBED))

    def __call__(self, x, m, tap, weights, lora_aware):
        rm = _get(m, 'lora') or {}
        kw = {'in_mask': _get(m, 'mlp_in'), 'lora_aware': lora_aware}
        g = self.gate_proj(x, rank_mask=rm.get('gate_proj'), **kw)
        u = self.up_proj(x, rank_mask=rm.get('up_proj'), **kw)
        hmid = jax.nn.silu(g) * u
        hmid, acts = tap_site(hmid, tap, 'mlp', weights)
        out = self.down_proj(
            hmid,
            in_mask=_get(m, 'mlp'),
            out_mask=_get(m, 'mlp_out'),
            rank_mask=rm.get('down_proj'),
            lora_aware=lora_aware,
        )
        return out, acts


class Block(nnx.Module):
    def __init__(self, cfg: LlamaConfig, layer: int, *, lora, param_dtype, rngs: nnx.Rngs):
        kw = {'param_dtype': param_dtype, 'rngs': rngs}
        self.attn_norm = _layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **kw)
        self.attn = Attention(cfg, layer, lora=lora, **kw)
        self.mlp_norm = _layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **kw)
        self.mlp = MLP(cfg, layer, lora=lora, **kw)

    def __call__(self, x, positions, bias, inv_freq, hidden, m, tap, weights, lora_aware):
        acts = {}
        a, acts_ctx = self.attn(
            self.attn_norm(x, hidden), positions, bias, inv_freq, m, tap, weights, lora_aware
        )
        a, resid_acts = tap_site(a, tap, 'resid', weights)
        if hidden is not None:
            a = a * hidden
        x = x + a
        f, acts_mlp = self.mlp(self.mlp_norm(x, hidden), m, tap, weights, lora_aware)
        f, acts_f = tap_site(f, tap, 'resid', weights)
        resid_acts = add_acts(resid_acts, acts_f)
        if hidden is not None:
            f = f * hidden
        x = x + f
        for name, v in (('attn_ctx', acts_ctx), ('mlp', acts_mlp), ('resid', resid_acts)):
            if v is not None:
                acts[name] = v
        return x, acts


class Llama(nnx.Module):
    """Causal LM: embed -> N x (RMSNorm, GQA attention with RoPE, RMSNorm, SwiGLU) -> head.

    Args:
      config: the architecture.
      lora: optional ``LoraSpec``; targeted linear layers get adapters at rank ``lora.rank``.
      param_dtype: parameter dtype (computation follows the parameter dtype).
      rngs: ``nnx.Rngs`` for initialisation.
    """

    def __init__(
        self,
        config: LlamaConfig,
        *,
        lora: lora_spec.LoraSpec | None = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.config = config
        kw = {'param_dtype': param_dtype, 'rngs': rngs}
        self.embed = _layers.Embed(config.vocab_size, config.hidden_size, **kw)
        self.layers = nnx.List(
            [Block(config, i, lora=lora, **kw) for i in range(config.num_layers)]
        )
        self.norm = _layers.RMSNorm(config.hidden_size, eps=config.rms_norm_eps, **kw)
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = _layers.Linear(
                config.hidden_size,
                config.vocab_size,
                use_bias=False,
                axes=(jpt.EMBED, jpt.VOCAB),
                **lora_spec.lora_kwargs(lora, 'lm_head'),
                **kw,
            )

    def __call__(
        self,
        input_ids: Int[Array, 'B T'],
        attention_mask: Int[Array, 'B T'] | None = None,
        *,
        masks: dict | None = None,
        taps: tuple | None = None,
        lora_aware: bool = False,
        output_hidden_states: bool = False,
    ) -> Float[Array, 'B T V'] | tuple:
        """Logits ``[B, T, V]``; with ``taps`` returns ``(logits, acts)``.

        With ``output_hidden_states`` the per-block outputs ``[B, T, D]`` (``num_layers``
        entries, before the final norm) come last: ``(logits, hiddens)`` or, with ``taps`` too,
        ``(logits, acts, hiddens)``.

        Args:
          input_ids: token ids.
          attention_mask: 1 for real tokens, 0 for padding keys (positions are ``arange(T)``
            as in Hugging Face's forward, so pad on the right).
          masks: structured masks, layout in ``jaxprune.models`` (``None`` = dense model).
          taps: per-layer dicts of zero arrays ``attn_ctx [B,T,H*hd]``, ``mlp [B,T,F]``,
            ``resid [B,T,D]`` added at those sites; ``jax.grad`` wrt taps is dL/dH. Optional
            ``attn_ctx_mask``/``mlp_mask [B,1,C]`` scale the site by ``1 + tap`` (per-example
            mask gradients). ``masks['hidden']`` may be per-example, ``[B, 1, D]``.
          lora_aware: LoRA adapters bypass the masks (ATP), see ``Linear``.
          output_hidden_states: also return every block's output (layer-wise distillation).
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
        causal = jnp.tril(jnp.ones((t, t), dtype=bool))[None]
        positions = jnp.broadcast_to(jnp.arange(t), (bsz, t))
        if attention_mask is None:
            allowed = causal
            weights = None
        else:
            weights = attention_mask.astype(jnp.int32)
            allowed = causal & (weights[:, None, :] > 0)
        bias = jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min)
        inv_freq = _layers.rope_inv_freq(
            cfg.head_dim, theta=cfg.rope_theta, scaling=cfg.rope_scaling_dict
        )
        x = self.embed(input_ids)
        if hidden is not None:
            x = x * hidden.astype(x.dtype)
        all_acts, outs = [], []
        for i, block in enumerate(self.layers):
            m = None if layer_masks is None else layer_masks[i]
            tap = None if taps is None else taps[i]
            x, acts = block(x, positions, bias, inv_freq, hidden, m, tap, weights, lora_aware)
            all_acts.append(acts)
            outs.append(x)
        x = self.norm(x, hidden)
        logits = (
            self.embed.attend(x) if self.lm_head is None else self.lm_head(x, lora_aware=lora_aware)
        )
        return outputs(logits, tuple(all_acts) if taps is not None else None,
                       tuple(outs) if output_hidden_states else None)


def outputs(logits: jax.Array, acts: tuple | None, hiddens: tuple | None) -> Any:
    """The models' return convention: ``logits``, then ``acts`` and ``hiddens`` when present."""
    extra = tuple(x for x in (acts, hiddens) if x is not None)
    return (logits, *extra) if extra else logits


def make_taps(
    config: LlamaConfig,
    batch: int,
    seq: int,
    *,
    sites=('attn_ctx', 'mlp', 'resid'),
    mask_sites=(),
    dtype=jnp.float32,
) -> tuple[dict[str, jax.Array], ...]:
    """Zero taps for every layer of a Llama/BERT-like ``config`` (see ``Llama.__call__``).

    ``sites`` get additive taps ``[batch, seq, C]`` (gradient: dL/dH); ``mask_sites`` get
    multiplicative per-example taps ``{site}_mask: [batch, 1, C]`` (gradient: the per-example
    gradient of a per-channel mask, see ``tap_site``; ``jaxprune.methods._apt.fisher_taps``
    adds the hidden dims').
    """
    unknown = (set(sites) - {'attn_ctx', 'mlp', 'resid'}) | (set(mask_sites) - {'attn_ctx', 'mlp'})
    if unknown:
        raise ValueError(
            f'unknown tap sites {sorted(unknown)}; sites: attn_ctx, mlp, resid; mask_sites: '
            "attn_ctx, mlp (a hidden dim's per-example mask is masks['hidden'] itself)")
    out = []
    for i in range(config.num_layers):
        sizes = {
            'attn_ctx': config.heads(i) * config.head_dim,
            'mlp': config.mlp(i),
            'resid': config.hidden_size,
        }
        taps = {s: jnp.zeros((batch, seq, sizes[s]), dtype) for s in sites}
        taps |= {f'{s}_mask': jnp.zeros((batch, 1, sizes[s]), dtype) for s in mask_sites}
        out.append(taps)
    return tuple(out)
