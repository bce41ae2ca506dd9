"""Flax NNX models (Llama-family causal LM, BERT/RoBERTa classifier) and their HF import/export.

Design: models never store masks. Structured masks and APT taps enter the forward explicitly,
``model(input_ids, attention_mask, *, masks=None, taps=None, lora_aware=False)``, so one set of
dense weights serves every method. Masks layout (every key optional; missing = keep all)::

    {'hidden': f32[D],                      # residual stream; norms use kept-dim statistics
     'layers': ({'heads': f32[H_l],         # per query head, on the o_proj input
                 'attn_ctx': f32[H_l*hd],   # per o_proj input channel
                 'mlp': f32[F_l],           # FFN neurons (down_proj input)
                 'attn_in', 'attn_out', 'mlp_in', 'mlp_out': f32[D],
                 'lora': {'q_proj': f32[r], ...}}, ...)}   # one dict per layer

Layers are an ``nnx.List`` (a tuple of per-layer dicts in masks), not stacked, because physical
pruning gives layers different shapes. Every parameter carries logical axis names
(``out_sharding``), from which ``structures`` derives which slices each prunable unit owns.
"""

from jaxprune.models._bert import BertConfig as BertConfig
from jaxprune.models._bert import BertForSequenceClassification as BertForSequenceClassification
from jaxprune.models._hf import ARCHITECTURES as ARCHITECTURES
from jaxprune.models._hf import load_pretrained as load_pretrained
from jaxprune.models._hf import save_pretrained as save_pretrained
from jaxprune.models._layers import Embed as Embed
from jaxprune.models._layers import LayerNorm as LayerNorm
from jaxprune.models._layers import Linear as Linear
from jaxprune.models._layers import RMSNorm as RMSNorm
from jaxprune.models._layers import apply_rope as apply_rope
from jaxprune.models._layers import rope_inv_freq as rope_inv_freq
from jaxprune.models._llama import Llama as Llama
from jaxprune.models._llama import LlamaConfig as LlamaConfig
from jaxprune.models._llama import make_taps as make_taps
from jaxprune.models._structures import Slice as Slice
from jaxprune.models._structures import Structure as Structure
from jaxprune.models._structures import abstract_params as abstract_params
from jaxprune.models._structures import param_count as param_count
from jaxprune.models._structures import prunable_param_count as prunable_param_count
from jaxprune.models._structures import structures as structures
