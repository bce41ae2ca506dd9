"""Data: asset/local data sets and deterministic, resumable numpy batch iterators.

Design: ``load_dataset`` always returns a ``datasets.DatasetDict`` with train/validation/test
(classification: ``text``, ``label``; LM: ``text``). Batch iterators are pure functions of
``(split, tokenizer, options, seed, start)``: epoch ``e`` is ordered by
``np.random.default_rng((seed, e))``, so a resumed run at batch ``start`` rebuilds only the
current epoch's order and yields exactly the tail of an uninterrupted run. Classification batches
are padded to a length bucket (multiple of 16) to bound ``jit`` recompilations; LM batches are
packed fixed-length windows. ``*_eval_batches`` cover a split once with a ``weight`` field so
metrics over padded final batches stay exact.
"""

from jaxprune.data._batches import bucket_length as bucket_length
from jaxprune.data._batches import classification_batches as classification_batches
from jaxprune.data._batches import classification_eval_batches as classification_eval_batches
from jaxprune.data._batches import lm_batches as lm_batches
from jaxprune.data._batches import lm_eval_batches as lm_eval_batches
from jaxprune.data._batches import pack as pack
from jaxprune.data._batches import pad_length as pad_length
from jaxprune.data._load import load_dataset as load_dataset
