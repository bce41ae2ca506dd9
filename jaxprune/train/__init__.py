"""Training: a functional step, exact evaluation, and a resumable loop.

Design note (flax gemma style): the NNX model is split once into ``graphdef, trainable, rest``;
the jitted step is a pure function of the ``TrainState`` (trainable params, optax state, step,
RNG, skipped count) and never sees config objects. Masks live in the optimizer state (field
``masks``) and are passed to the model explicitly. Non-finite steps are skipped and counted, so a
NaN is never checkpointed. Pruning methods plug in through the small ``Method`` hook
(``transforms`` / ``loss_extras`` / ``on_step_end``); ``prune.method: none`` is plain fine-tuning.
"""

from jaxprune.train._data import eval_batches as eval_batches
from jaxprune.train._data import load_splits as load_splits
from jaxprune.train._factory import TINY_MODELS as TINY_MODELS
from jaxprune.train._factory import build_model as build_model
from jaxprune.train._factory import tiny_tokenizer as tiny_tokenizer
from jaxprune.train._loop import Setup as Setup
from jaxprune.train._loop import evaluate as evaluate
from jaxprune.train._loop import evaluate_state as evaluate_state
from jaxprune.train._loop import setup as setup
from jaxprune.train._loop import train as train
from jaxprune.train._loop import trainable_filter as trainable_filter
from jaxprune.train._method import LoopState as LoopState
from jaxprune.train._method import Method as Method
from jaxprune.train._method import NoMethod as NoMethod
from jaxprune.train._method import build_method as build_method
from jaxprune.train._method import driver_for as driver_for
from jaxprune.train._method import register_driver as register_driver
from jaxprune.train._method import register_method as register_method
from jaxprune.train._metrics import MetricsLogger as MetricsLogger
from jaxprune.train._metrics import read_metrics as read_metrics
from jaxprune.train._step import TrainState as TrainState
from jaxprune.train._step import init_state as init_state
from jaxprune.train._step import loss_sums as loss_sums
from jaxprune.train._step import make_eval_step as make_eval_step
from jaxprune.train._step import make_train_step as make_train_step
from jaxprune.train._step import summarize as summarize
from jaxprune.train._step import train_step as train_step
