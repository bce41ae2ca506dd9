"""Deterministic, resumable numpy batch iterators for classification and causal LM data.

Every iterator is a pure function of ``(data, tokenizer, options, seed, start)``: epoch ``e``
uses the permutation drawn from ``np.random.default_rng((seed, e))``, so resuming at batch
``start`` recomputes only the current epoch's order (cheap) instead of replaying batches.
Tokenisation happens once per split through ``datasets.map`` (cached on disk for file-backed
datasets).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from typing import Any

import datasets
import numpy as np

Batch = dict[str, np.ndarray]


def bucket_length(longest: int, *, max_len: int, bucket: int | str = 16) -> int:
    """Padded length: the smallest multiple of ``bucket`` (or power of two) >= ``longest``.

    Capped at ``max_len``; a handful of distinct lengths keeps ``jit`` recompilations few.

    Args:
      longest: longest sequence in the batch.
      max_len: upper bound (sequences were truncated to it).
      bucket: an int multiple, or ``'pow2'`` for the next power of two.
    """
    longest = max(int(longest), 1)
    if bucket == 'pow2':
        length = 1 << (longest - 1).bit_length()
    elif isinstance(bucket, int) and bucket > 0:
        length = -(-longest // bucket) * bucket
    else:
        raise ValueError(f"{bucket=} must be a positive int or 'pow2'")
    return min(length, max_len)


def pad_length(batch: Batch, length: int, *, pad_id: int) -> Batch:
    """``batch`` with its ``[B, T]`` token arrays right-padded to ``length`` (a classification
    batch from :func:`classification_batches`: ``input_ids`` with ``pad_id``, ``attention_mask``
    with 0, so the padded positions are masked out). A batch already that long is returned as is.

    Raises:
      ValueError: if the batch is longer than ``length``.
    """
    t = batch['input_ids'].shape[1]
    if t > length:
        raise ValueError(f'batch length {t} exceeds {length=}; pad to at least the longest row')
    if t == length:
        return batch
    fill = {'input_ids': pad_id, 'attention_mask': 0}
    out = dict(batch)
    for k, v in fill.items():
        if k in batch:
            x = batch[k]
            out[k] = np.concatenate([x, np.full((x.shape[0], length - t), v, x.dtype)], axis=1)
    return out


def _pad_id(tokenizer: Any) -> int:
    for attr in ('pad_token_id', 'eos_token_id'):
        if (i := getattr(tokenizer, attr, None)) is not None:
            return int(i)
    return 0


def _eos_id(tokenizer: Any) -> int:
    for attr in ('eos_token_id', 'sep_token_id'):
        if (i := getattr(tokenizer, attr, None)) is not None:
            return int(i)
    raise ValueError('the tokenizer has no eos_token (nor sep_token) to separate documents; '
                     'set tokenizer.eos_token before calling lm_batches')  # fmt: skip


def _check_text(ds: datasets.Dataset, needed: tuple[str, ...]) -> None:
    missing = [c for c in needed if c not in ds.column_names]
    if missing:
        raise ValueError(f'dataset columns {ds.column_names} lack {missing}; see load_dataset')


def tokenize(
    ds: datasets.Dataset,
    tokenizer: Any,
    *,
    max_len: int | None = None,
    add_special_tokens: bool = True,
) -> list[np.ndarray]:
    """Token ids per row (int32 arrays), truncated to ``max_len`` when given."""
    _check_text(ds, ('text',))

    def encode(batch: dict) -> dict:
        enc = tokenizer(
            batch['text'],
            add_special_tokens=add_special_tokens,
            truncation=max_len is not None,
            max_length=max_len,
            verbose=False,  # whole documents may exceed model_max_length; packing splits them
        )
        return {'input_ids': enc['input_ids']}

    drop = [c for c in ds.column_names if c != 'input_ids']
    out = ds.map(encode, batched=True, remove_columns=drop, desc='tokenize')
    return [np.asarray(ids, np.int32) for ids in out['input_ids']]


def _epoch_order(n: int, *, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng((seed, epoch)).permutation(n)


def _pad_rows(rows: list[np.ndarray], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for r, row in enumerate(rows):
        ids[r, : len(row)] = row[:length]
        mask[r, : len(row)] = 1
    return ids, mask


def classification_batches(
    ds: datasets.Dataset,
    tokenizer: Any,
    *,
    batch_size: int,
    max_len: int,
    seed: int,
    start: int = 0,
    shuffle: bool = True,
    drop_remainder: bool = True,
    bucket: int | str = 16,
    num_epochs: int | None = None,
) -> Iterator[Batch]:
    """Endless (or ``num_epochs``) stream of padded classification batches.

    Args:
      ds: a split with columns ``text`` and ``label``.
      tokenizer: an HF tokenizer (``AutoTokenizer.from_pretrained(folder)``).
      batch_size: rows per batch ``B``.
      max_len: truncation length (special tokens included) and padding cap.
      seed: epoch ``e`` is ordered by ``default_rng((seed, e)).permutation``.
      start: batches already consumed; they are skipped without being built (resume).
      shuffle: reshuffle every epoch (else file order).
      drop_remainder: drop each epoch's final partial batch (keeps ``B`` static).
      bucket: padding granularity, see :func:`bucket_length`.
      num_epochs: stop after this many epochs (``None``: never stop).

    Returns:
      Iterator of ``{'input_ids': int32[B, T], 'attention_mask': int32[B, T],
      'labels': int32[B]}`` with ``T = bucket_length(longest row in batch)``.

    Raises:
      ValueError: missing columns, or fewer rows than ``batch_size`` with ``drop_remainder``.
    """
    _check_text(ds, ('text', 'label'))
    if batch_size < 1 or max_len < 1 or start < 0:
        raise ValueError(f'{batch_size=} and {max_len=} must be >= 1 and {start=} >= 0')
    rows = tokenize(ds, tokenizer, max_len=max_len)
    labels = np.asarray(ds['label'], np.int32)
    n = len(rows)
    per_epoch = n // batch_size if drop_remainder else math.ceil(n / batch_size)
    if per_epoch == 0:
        raise ValueError(f'{batch_size=} exceeds the {n} rows of the split; lower batch_size '
                         'or pass drop_remainder=False')  # fmt: skip
    pad_id = _pad_id(tokenizer)
    epoch, offset = divmod(start, per_epoch)
    while num_epochs is None or epoch < num_epochs:
        order = _epoch_order(n, seed=seed, epoch=epoch, shuffle=shuffle)
        for b in range(offset, per_epoch):
            idx = order[b * batch_size : (b + 1) * batch_size]
            batch_rows = [rows[i] for i in idx]
            length = bucket_length(max(map(len, batch_rows)), max_len=max_len, bucket=bucket)
            ids, mask = _pad_rows(batch_rows, length, pad_id)
            yield {'input_ids': ids, 'attention_mask': mask, 'labels': labels[idx]}
        epoch, offset = epoch + 1, 0


def classification_eval_batches(
    ds: datasets.Dataset,
    tokenizer: Any,
    *,
    batch_size: int,
    max_len: int,
    bucket: int | str = 16,
) -> Iterator[Batch]:
    """One ordered pass over a split; the last batch is padded to ``batch_size`` rows.

    Returns:
      Iterator of classification batches plus ``weight: float32[B]`` (1 for real rows, 0 for
      padding rows, whose ``attention_mask`` keeps only the first position so attention stays
      finite). Weighted metrics over all batches are exact.
    """
    _check_text(ds, ('text', 'label'))
    rows = tokenize(ds, tokenizer, max_len=max_len)
    labels = np.asarray(ds['label'], np.int32)
    pad_id = _pad_id(tokenizer)
    for s in range(0, len(rows), batch_size):
        batch_rows = rows[s : s + batch_size]
        real = len(batch_rows)
        length = bucket_length(max(map(len, batch_rows)), max_len=max_len, bucket=bucket)
        ids, mask = _pad_rows(batch_rows + [np.array([pad_id], np.int32)] * (batch_size - real),
                              length, pad_id)  # fmt: skip
        weight = (np.arange(batch_size) < real).astype(np.float32)
        batch_labels = np.zeros(batch_size, np.int32)
        batch_labels[:real] = labels[s : s + real]
        yield {'input_ids': ids, 'attention_mask': mask, 'labels': batch_labels, 'weight': weight}


def _documents(ds: datasets.Dataset, tokenizer: Any) -> list[np.ndarray]:
    eos = np.array([_eos_id(tokenizer)], np.int32)
    return [np.concatenate([d, eos]) for d in tokenize(ds, tokenizer, add_special_tokens=False)]


def pack(docs: list[np.ndarray], order: np.ndarray, seq_len: int) -> np.ndarray:
    """Concatenates ``docs[order]`` and cuts ``[N, seq_len + 1]`` windows with stride ``seq_len``.

    Consecutive windows share one token, so every token after the first is a next-token target
    exactly once; the tail shorter than a window is dropped.
    """
    stream = np.concatenate([docs[i] for i in order]) if len(order) else np.zeros(0, np.int32)
    n = max((len(stream) - 1) // seq_len, 0)
    starts = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return stream[starts] if n else np.zeros((0, seq_len + 1), np.int32)


def lm_batches(
    ds: datasets.Dataset,
    tokenizer: Any,
    *,
    batch_size: int,
    seq_len: int,
    seed: int,
    start: int = 0,
    shuffle: bool = True,
) -> Iterator[Batch]:
    r"""Endless stream of packed causal-LM batches.

    Documents are tokenised without special tokens and each is followed by EOS. Epoch ``e``
    permutes the documents, packs them (:func:`pack`) and permutes the windows, both with
    ``default_rng((seed, e))``. ``input_ids = w[:, :-1]``, ``labels = w[:, 1:]``.

    Args:
      ds: a split with column ``text``.
      tokenizer: an HF tokenizer with an ``eos_token``.
      batch_size: windows per batch ``B``.
      seq_len: tokens per row ``T``.
      seed: base seed of the per-epoch permutations.
      start: batches already consumed (resume); skipped without being built.
      shuffle: permute documents and windows each epoch (else document order every epoch).

    Returns:
      Iterator of ``{'input_ids': int32[B, T], 'labels': int32[B, T]}``.

    Raises:
      ValueError: the split holds fewer than ``B * T + 1`` tokens.
    """
    if batch_size < 1 or seq_len < 1 or start < 0:
        raise ValueError(f'{batch_size=} and {seq_len=} must be >= 1 and {start=} >= 0')
    docs = _documents(ds, tokenizer)
    total = sum(map(len, docs))
    if (total - 1) // seq_len < batch_size:
        raise ValueError(f'the split has {total} tokens, fewer than {batch_size=} windows of '
                         f'{seq_len=}; lower them or use more text')  # fmt: skip
    per_epoch = ((total - 1) // seq_len) // batch_size
    first_epoch, offset = divmod(start, per_epoch)
    for epoch in itertools.count(first_epoch):
        rng = np.random.default_rng((seed, epoch))
        order = rng.permutation(len(docs)) if shuffle else np.arange(len(docs))
        windows = pack(docs, order, seq_len)
        if shuffle:
            windows = windows[rng.permutation(len(windows))]
        for b in range(offset, per_epoch):
            w = windows[b * batch_size : (b + 1) * batch_size]
            yield {'input_ids': w[:, :-1], 'labels': w[:, 1:]}
        offset = 0


def lm_eval_batches(
    ds: datasets.Dataset, tokenizer: Any, *, batch_size: int, seq_len: int
) -> Iterator[Batch]:
    """One ordered pass scoring every token of the split exactly once.

    Like :func:`lm_batches` without shuffling, but the final partial window and the final
    partial batch are padded, with ``weight: float32[B, T]`` = 1 on real targets and 0 on
    padding, so ``sum(weight * nll) / sum(weight)`` is the exact per-token loss.
    """
    docs = _documents(ds, tokenizer)
    stream = np.concatenate(docs) if docs else np.zeros(0, np.int32)
    targets = len(stream) - 1
    n_win = max(math.ceil(targets / seq_len), 0)
    pad_id = _pad_id(tokenizer)
    padded = np.full(n_win * seq_len + 1, pad_id, np.int32)
    padded[: len(stream)] = stream
    valid = np.zeros(n_win * seq_len, np.float32)
    valid[:targets] = 1.0
    for s in range(0, n_win, batch_size):
        rows = np.arange(s, s + batch_size)
        real = rows < n_win
        starts = np.where(real, rows, 0)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
        w = padded[starts]
        weight = valid[np.minimum(starts[:, 1:] - 1, len(valid) - 1)] * real[:, None]
        labels = np.where(weight > 0, w[:, 1:], 0).astype(np.int32)
        inputs = np.where(real[:, None], w[:, :-1], pad_id).astype(np.int32)
        yield {'input_ids': inputs, 'labels': labels, 'weight': weight.astype(np.float32)}
