"""jaxprune: make language models smaller while fine-tuning them (APT, ATP, AST) in JAX.

Curated re-exports (optax style); subpackages hold the full public API:
``models`` (NNX Llama / BERT / RoBERTa and HF import-export), ``lora``, ``masks``, ``scores``,
``transforms`` (optax), ``schedules``, ``methods`` (recipes and baselines), ``surgery``,
``kernels.sparse24`` (2:4 compressed matmul), ``assets`` and ``data`` (offline models and
datasets), ``train``, ``checkpoint``, ``sharding``.
"""

from jaxprune import assets as assets
from jaxprune import checkpoint as checkpoint
from jaxprune import data as data
from jaxprune import kernels as kernels
from jaxprune import lora as lora
from jaxprune import masks as masks
from jaxprune import methods as methods
from jaxprune import models as models
from jaxprune import schedules as schedules
from jaxprune import scores as scores
from jaxprune import sharding as sharding
from jaxprune import surgery as surgery
from jaxprune import transforms as transforms
from jaxprune.assets import fetch as fetch
from jaxprune.assets import resolve_model as resolve_model
from jaxprune.data import load_dataset as load_dataset
from jaxprune.kernels.sparse24 import Sparse24 as Sparse24
from jaxprune.kernels.sparse24 import sparse24_matmul as sparse24_matmul
from jaxprune.lora import LoraSpec as LoraSpec
from jaxprune.methods import apt as apt
from jaxprune.methods import ast as ast
from jaxprune.models import BertConfig as BertConfig
from jaxprune.models import BertForSequenceClassification as BertForSequenceClassification
from jaxprune.models import Llama as Llama
from jaxprune.models import LlamaConfig as LlamaConfig
from jaxprune.models import load_pretrained as load_pretrained
from jaxprune.models import save_pretrained as save_pretrained
from jaxprune.transforms import group_lasso as group_lasso
from jaxprune.transforms import sparsify as sparsify

__version__ = '0.1.0'
