"""Methods: APT, ATP and AST as recipes over the public pieces, plus one-shot baselines.

Design (optax ``alias.py`` style): ``jaxprune.methods.ast(...)`` and ``apt(...)`` are
``optax.chain``s of public transforms, so any piece can be swapped. What cannot live in an optax
state (shape-changing surgery, rank growth, ATP's alternating generator step) is a pure function
here that the training loop calls outside ``jit``. Distillation losses are shared by all methods.

Importing this package registers the methods with the config loader and the trainer
(``prune.method: apt | ast | atp``): ``_apt_cfg``, ``_atp_cfg`` and ``_ast_train`` hold their
config subclasses; ``_apt_train``, ``_ast_train`` and ``_atp_train`` their train ``Method``s /
drivers and export helpers.
"""

from jaxprune.methods._apt import after_pruning_step as after_pruning_step
from jaxprune.methods._apt import apt as apt
from jaxprune.methods._apt import apt_loss as apt_loss
from jaxprune.methods._apt import init_projections as init_projections
from jaxprune.methods._apt import prune_projections as prune_projections
from jaxprune.methods._apt import teacher_params as teacher_params
from jaxprune.methods._apt import teacher_snapshot as teacher_snapshot
from jaxprune.methods._apt import value_grads_and_salience as value_grads_and_salience
from jaxprune.methods._apt_arch import budget_structures as budget_structures
from jaxprune.methods._apt_cfg import AptCfg as AptCfg
from jaxprune.methods._apt_export import load_pruned as load_pruned
from jaxprune.methods._apt_export import merged_params as merged_params
from jaxprune.methods._apt_export import save_pruned as save_pruned
from jaxprune.methods._apt_export import uniform_config as uniform_config
from jaxprune.methods._apt_train import AptMethod as AptMethod
from jaxprune.methods._apt_train import AptTrainState as AptTrainState
from jaxprune.methods._ast import ast as ast
from jaxprune.methods._ast import ast_forward_params as ast_forward_params
from jaxprune.methods._ast import slorb_apply as slorb_apply
from jaxprune.methods._ast import slorb_dense as slorb_dense
from jaxprune.methods._ast import slorb_init as slorb_init
from jaxprune.methods._ast import slorb_init_tree as slorb_init_tree
from jaxprune.methods._ast_infer import compress_model as compress_model
from jaxprune.methods._ast_infer import eval_perplexity as eval_perplexity
from jaxprune.methods._ast_infer import export_sparse24 as export_sparse24
from jaxprune.methods._ast_infer import generate as generate
from jaxprune.methods._ast_infer import load_sparse24 as load_sparse24
from jaxprune.methods._ast_infer import mask_dict as mask_dict
from jaxprune.methods._ast_infer import weight_bytes as weight_bytes
from jaxprune.methods._ast_train import AstCfg as AstCfg
from jaxprune.methods._ast_train import AstMethod as AstMethod
from jaxprune.methods._ast_train import add_slorb as add_slorb
from jaxprune.methods._ast_train import ast_train_transform as ast_train_transform
from jaxprune.methods._ast_train import final_masks as final_masks
from jaxprune.methods._atp import atp_export_masks as atp_export_masks
from jaxprune.methods._atp import atp_lora_tx as atp_lora_tx
from jaxprune.methods._atp import atp_surgery_keep as atp_surgery_keep
from jaxprune.methods._atp import atp_surgery_plan as atp_surgery_plan
from jaxprune.methods._atp import causal_lm_loss as causal_lm_loss
from jaxprune.methods._atp import generator_loss as generator_loss
from jaxprune.methods._atp import generator_step as generator_step
from jaxprune.methods._atp import llm_step as llm_step
from jaxprune.methods._atp import sample_step_masks as sample_step_masks
from jaxprune.methods._atp import taylor_prior as taylor_prior
from jaxprune.methods._atp import warm_start_generator as warm_start_generator
from jaxprune.methods._atp_cfg import AtpCfg as AtpCfg
from jaxprune.methods._atp_train import atp_export as atp_export
from jaxprune.methods._atp_train import run_atp as run_atp
from jaxprune.methods._atp_train import train_atp as train_atp
from jaxprune.methods._calibrate import calibration_batches as calibration_batches
from jaxprune.methods._calibrate import collect_input_grams as collect_input_grams
from jaxprune.methods._calibrate import collect_input_norms as collect_input_norms
from jaxprune.methods._calibrate import norms_from_grams as norms_from_grams
from jaxprune.methods._calibrate import sparsegpt_sequential as sparsegpt_sequential
from jaxprune.methods._distill import ast_loss as ast_loss
from jaxprune.methods._distill import cross_entropy as cross_entropy
from jaxprune.methods._distill import hidden_mse as hidden_mse
from jaxprune.methods._distill import kl_distill as kl_distill
from jaxprune.methods._distill import kl_per_token as kl_per_token
from jaxprune.methods._oneshot import input_hessian as input_hessian
from jaxprune.methods._oneshot import magnitude_prune as magnitude_prune
from jaxprune.methods._oneshot import sparsegpt_prune as sparsegpt_prune
from jaxprune.methods._oneshot import sparsegpt_prune_params as sparsegpt_prune_params
from jaxprune.methods._oneshot import wanda_prune as wanda_prune
