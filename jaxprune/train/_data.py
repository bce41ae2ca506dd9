"""Datasets for the loop: split loading, the resumable train stream and exact eval batches.

Train batches come from ``jaxprune.data`` (deterministic given the seed, resumable by ``start`` =
batches already consumed). Eval batches are built here so that evaluation covers the whole
validation split exactly: the last batch is padded with label ``-1`` rows/tokens, which every
metric ignores, keeping shapes static under ``jit``.

Two synthetic datasets need no files, for tests and smoke runs: ``tiny-sentiment``
(classification, label 1 iff the sentence holds a positive word) and ``tiny-text`` (causal LM).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

SYNTHETIC = ('tiny-sentiment', 'tiny-text')
_POS = ('good', 'great', 'fun', 'lovely', 'superb', 'moving')
_NEG = ('bad', 'dull', 'awful', 'boring', 'weak', 'messy')
_FILL = ('the', 'film', 'was', 'a', 'plot', 'and', 'cast', 'very', 'story', 'quite', 'it')


def _synthetic(name: str):
    import datasets

    rng = np.random.default_rng(1234)  # fixed: the splits never depend on the run seed

    def sentiment(n):
        texts, labels = [], []
        for _ in range(n):
            label = int(rng.integers(2))
            words = list(rng.choice(_FILL, size=int(rng.integers(3, 8))))
            words.insert(int(rng.integers(len(words) + 1)), str(rng.choice((_NEG, _POS)[label])))
            texts.append(' '.join(words))
            labels.append(label)
        return datasets.Dataset.from_dict({'text': texts, 'label': labels})

    def text(n):
        lines = [' '.join(rng.choice(_FILL + _POS, size=int(rng.integers(5, 12)))) + '.'
                 for _ in range(n)]
        return datasets.Dataset.from_dict({'text': lines})

    make = sentiment if name == 'tiny-sentiment' else text
    return datasets.DatasetDict(train=make(512), validation=make(100), test=make(100))


def load_splits(data_cfg: Any):
    """``DatasetDict`` with train/validation(/test) splits for ``data.dataset``."""
    if data_cfg.dataset in SYNTHETIC:
        return _synthetic(data_cfg.dataset)
    from jaxprune import data

    return data.load_dataset(data_cfg.dataset, seed=data_cfg.seed)


def train_batches(
    split: Any, tokenizer: Any, data_cfg: Any, *, task: str, start: int = 0
) -> Iterator[dict[str, np.ndarray]]:
    """The train stream from ``jaxprune.data``, skipping ``start`` already consumed batches."""
    from jaxprune import data

    if task == 'classification':
        return data.classification_batches(
            split, tokenizer, batch_size=data_cfg.batch_size, max_len=data_cfg.max_len,
            seed=data_cfg.seed, start=start)
    return data.lm_batches(
        split, tokenizer, batch_size=data_cfg.batch_size, seq_len=data_cfg.seq_len,
        seed=data_cfg.seed, start=start)


def pad_train_batch(batch: dict[str, np.ndarray], tokenizer: Any,
                    length: int) -> dict[str, np.ndarray]:
    """A :func:`train_batches` classification batch right-padded to ``length`` tokens with the
    stream's own pad token (``jaxprune.data.pad_length``)."""
    from jaxprune import data
    from jaxprune.data._batches import _pad_id

    return data.pad_length(batch, length, pad_id=_pad_id(tokenizer))


def _pad_rows(arrays: dict[str, np.ndarray], multiple: int, fill: dict[str, int]):
    n = len(arrays['labels'])
    extra = (-n) % multiple
    if not extra:
        return arrays
    out = {}
    for k, v in arrays.items():
        pad = np.full((extra,) + v.shape[1:], fill[k], v.dtype)
        out[k] = np.concatenate([v, pad])
    return out


def eval_batches(
    split: Any, tokenizer: Any, data_cfg: Any, *, task: str
) -> list[dict[str, np.ndarray]]:
    """Every validation example (or token) exactly once, padded with ignored ``-1`` labels.

    Classification rows are tokenized like the train stream (truncate to ``max_len``, pad).
    Causal LM texts are joined with the eos token, tokenized and cut into consecutive rows of
    ``seq_len + 1`` tokens (inputs ``row[:-1]``, labels ``row[1:]``).
    """
    n = len(split)
    if data_cfg.eval_max_examples is not None:
        n = min(n, data_cfg.eval_max_examples)
    texts = list(split['text'][:n])
    bs = data_cfg.eval_batch_size
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if task == 'classification':
        enc = tokenizer(texts, truncation=True, max_length=data_cfg.max_len,
                        padding='max_length', return_tensors='np')
        arrays = {
            'input_ids': enc['input_ids'].astype(np.int32),
            'attention_mask': enc['attention_mask'].astype(np.int32),
            'labels': np.asarray(split['label'][:n], np.int32),
        }
        # Padding rows attend to their first token so no softmax row is fully masked.
        arrays = _pad_rows(arrays, bs, {'input_ids': pad_id, 'attention_mask': 1, 'labels': -1})
    else:
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else pad_id
        ids: list[int] = []
        for t in tokenizer(texts, add_special_tokens=False, verbose=False)['input_ids']:
            ids.extend(t)
            ids.append(eos)
        t = data_cfg.seq_len
        rows = max(1, -(-(len(ids) - 1) // t))
        flat = np.full(rows * t + 1, pad_id, np.int64)
        flat[:len(ids)] = ids
        labels = np.full(rows * t + 1, -1, np.int64)
        labels[:len(ids)] = ids
        arrays = {
            'input_ids': np.stack([flat[i * t:(i + 1) * t] for i in range(rows)]).astype(np.int32),
            'labels': np.stack([labels[i * t + 1:(i + 1) * t + 1]
                                for i in range(rows)]).astype(np.int32),
        }
        arrays = _pad_rows(arrays, bs, {'input_ids': pad_id, 'labels': -1})
    total = len(arrays['labels'])
    return [{k: v[i:i + bs] for k, v in arrays.items()} for i in range(0, total, bs)]
