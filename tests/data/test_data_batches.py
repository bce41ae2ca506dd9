"""Batch iterators vs plain-python references: determinism, resume, packing, padding, eval."""

import itertools

import datasets
import numpy as np
import pytest
from tiny_tokenizer import WORDS, make_tokenizer

from jaxprune import data


@pytest.fixture(scope='module')
def tok():
    return make_tokenizer()


def _cls_ds(n: int = 53, seed: int = 0) -> datasets.Dataset:
    rng = np.random.default_rng(seed)
    texts = [' '.join(rng.choice(WORDS, size=int(rng.integers(1, 40)))) for _ in range(n)]
    return datasets.Dataset.from_dict({'text': texts, 'label': [i % 3 for i in range(n)]})


def _lm_ds(n: int = 9, seed: int = 1) -> datasets.Dataset:
    rng = np.random.default_rng(seed)
    texts = [' '.join(rng.choice(WORDS, size=int(rng.integers(5, 60)))) for _ in range(n)]
    return datasets.Dataset.from_dict({'text': texts})


def _take(it, n):
    return list(itertools.islice(it, n))


def _equal(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
        for x, y in zip(a, b, strict=True)
    )


@pytest.mark.parametrize(
    ('longest', 'max_len', 'bucket', 'want'),
    [(1, 128, 16, 16), (16, 128, 16, 16), (17, 128, 16, 32), (100, 64, 16, 64), (0, 8, 16, 8),
     (33, 128, 'pow2', 64), (64, 128, 'pow2', 64), (5, 512, 8, 8)],
)
def test_bucket_length(longest, max_len, bucket, want):
    assert data.bucket_length(longest, max_len=max_len, bucket=bucket) == want


def test_classification_batches_match_reference(tok):
    ds = _cls_ds()
    got = _take(data.classification_batches(ds, tok, batch_size=4, max_len=24, seed=3), 13)
    # Reference: the documented permutation and tokenizer output, padded by hand.
    order = np.random.default_rng((3, 0)).permutation(len(ds))
    for b, batch in enumerate(got):
        idx = order[b * 4 : (b + 1) * 4]
        ref = [tok(ds[int(i)]['text'], truncation=True, max_length=24)['input_ids'] for i in idx]
        length = batch['input_ids'].shape[1]
        assert length % 16 == 0 or length == 24
        assert max(map(len, ref)) <= length <= 24
        for r, ids in enumerate(ref):
            np.testing.assert_array_equal(batch['input_ids'][r, : len(ids)], ids)
            assert (batch['input_ids'][r, len(ids) :] == tok.pad_token_id).all()
            assert batch['attention_mask'][r].tolist() == [1] * len(ids) + [0] * (length - len(ids))
        np.testing.assert_array_equal(batch['labels'], np.asarray(ds['label'])[idx])
        assert {v.dtype for v in batch.values()} == {np.dtype(np.int32)}
        assert batch['labels'].shape == (4,)


def test_pad_length_equals_a_stream_padded_to_that_length(tok):
    """Reference: the same stream with one bucket the size of ``max_len`` (every batch full)."""
    ds = _cls_ds()
    bucketed = _take(data.classification_batches(ds, tok, batch_size=4, max_len=48, seed=2), 12)
    full = _take(
        data.classification_batches(ds, tok, batch_size=4, max_len=48, seed=2, bucket=48), 12)
    assert {b['input_ids'].shape[1] for b in bucketed} != {48}  # some batches really are shorter
    for b, want in zip(bucketed, full, strict=True):
        got = data.pad_length(b, 48, pad_id=tok.pad_token_id)
        assert got.keys() == want.keys()
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
            assert got[k].dtype == want[k].dtype
    same = data.pad_length(full[0], 48, pad_id=0)
    assert same is full[0]
    with pytest.raises(ValueError, match='batch length 48 exceeds length=32'):
        data.pad_length(full[0], 32, pad_id=0)


def test_classification_epochs_cover_rows_and_reshuffle(tok):
    ds = _cls_ds(n=48)
    batches = _take(data.classification_batches(ds, tok, batch_size=8, max_len=64, seed=0), 12)
    first = np.concatenate([b['input_ids'][:, 1] for b in batches[:6]])  # first word id per row
    second = np.concatenate([b['input_ids'][:, 1] for b in batches[6:]])
    assert sorted(first) == sorted(second)  # each epoch is a permutation of the same rows
    assert not np.array_equal(first, second)  # ...in a different order


def test_classification_deterministic_and_seeded(tok):
    ds = _cls_ds()

    def run(seed):
        it = data.classification_batches(ds, tok, batch_size=5, max_len=32, seed=seed)
        return _take(it, 25)

    assert _equal(run(7), run(7))
    assert not _equal(run(7), run(8))


@pytest.mark.parametrize('start', [0, 1, 9, 10, 11, 23])
def test_classification_resume_equals_tail(tok, start):
    ds = _cls_ds()  # 53 rows, batch 5 -> 10 batches per epoch
    full = _take(data.classification_batches(ds, tok, batch_size=5, max_len=32, seed=1), 30)
    tail = _take(
        data.classification_batches(ds, tok, batch_size=5, max_len=32, seed=1, start=start),
        30 - start,
    )
    assert _equal(full[start:], tail)


def test_classification_no_shuffle_no_drop(tok):
    ds = _cls_ds(n=11)
    it = data.classification_batches(
        ds, tok, batch_size=4, max_len=64, seed=0, shuffle=False, drop_remainder=False,
        num_epochs=2,
    )
    got = list(it)
    assert [len(b['labels']) for b in got] == [4, 4, 3, 4, 4, 3]
    np.testing.assert_array_equal(np.concatenate([b['labels'] for b in got[:3]]), ds['label'])


def test_classification_errors(tok):
    with pytest.raises(ValueError, match='batch_size=64 exceeds'):
        next(data.classification_batches(_cls_ds(n=10), tok, batch_size=64, max_len=8, seed=0))
    with pytest.raises(ValueError, match=r"lack \['label'\]"):
        next(data.classification_batches(_lm_ds(), tok, batch_size=2, max_len=8, seed=0))


def test_classification_eval_covers_split_once(tok):
    ds = _cls_ds(n=23)
    got = list(data.classification_eval_batches(ds, tok, batch_size=5, max_len=32))
    assert len(got) == 5 and all(b['input_ids'].shape[0] == 5 for b in got)
    weight = np.concatenate([b['weight'] for b in got])
    assert weight.tolist() == [1.0] * 23 + [0.0] * 2
    labels = np.concatenate([b['labels'] for b in got])[:23]
    np.testing.assert_array_equal(labels, ds['label'])
    pad_rows = got[-1]['attention_mask'][3:]
    assert pad_rows.sum(1).tolist() == [1, 1]  # finite attention for padding rows


def reference_lm(docs: list[list[int]], eos: int, *, batch_size, seq_len, seed, epochs):
    """Plain-python packing: concat docs+EOS in the epoch's order, stride-T windows of T+1."""
    out = []
    for epoch in range(epochs):
        rng = np.random.default_rng((seed, epoch))
        order = rng.permutation(len(docs))
        stream = []
        for i in order:
            stream += list(docs[i]) + [eos]
        windows = [stream[k * seq_len : k * seq_len + seq_len + 1]
                   for k in range((len(stream) - 1) // seq_len)]  # fmt: skip
        windows = [windows[i] for i in rng.permutation(len(windows))]
        for b in range(len(windows) // batch_size):
            rows = windows[b * batch_size : (b + 1) * batch_size]
            out.append({'input_ids': np.array([w[:-1] for w in rows], np.int32),
                        'labels': np.array([w[1:] for w in rows], np.int32)})  # fmt: skip
    return out


def test_lm_batches_match_reference(tok):
    ds = _lm_ds()
    docs = [tok(t, add_special_tokens=False)['input_ids'] for t in ds['text']]
    ref = reference_lm(docs, tok.eos_token_id, batch_size=3, seq_len=8, seed=5, epochs=3)
    got = _take(data.lm_batches(ds, tok, batch_size=3, seq_len=8, seed=5), len(ref))
    assert _equal(got, ref)
    assert all(v.dtype == np.int32 and v.shape == (3, 8) for b in got for v in b.values())
    assert any((b['input_ids'] == tok.eos_token_id).any() for b in got)  # separators present


def test_lm_labels_are_next_tokens(tok):
    batch = next(data.lm_batches(_lm_ds(), tok, batch_size=4, seq_len=16, seed=0))
    np.testing.assert_array_equal(batch['input_ids'][:, 1:], batch['labels'][:, :-1])


@pytest.mark.parametrize('start', [1, 7, 30])
def test_lm_resume_equals_tail(tok, start):
    ds = _lm_ds()
    full = _take(data.lm_batches(ds, tok, batch_size=2, seq_len=8, seed=2), 45)
    tail = _take(data.lm_batches(ds, tok, batch_size=2, seq_len=8, seed=2, start=start), 45 - start)
    assert _equal(full[start:], tail)


def test_lm_deterministic_and_seeded(tok):
    ds = _lm_ds()

    def run(s):
        return _take(data.lm_batches(ds, tok, batch_size=2, seq_len=8, seed=s), 20)

    assert _equal(run(0), run(0)) and not _equal(run(0), run(1))


def test_pack_matches_reference():
    docs = [np.arange(5, dtype=np.int32), np.arange(10, 13, dtype=np.int32)]
    windows = data.pack(docs, np.array([1, 0]), 3)
    np.testing.assert_array_equal(windows, [[10, 11, 12, 0], [0, 1, 2, 3]])  # tail [3, 4] dropped


def test_lm_batches_too_little_text(tok):
    ds = datasets.Dataset.from_dict({'text': ['good film']})
    with pytest.raises(ValueError, match='fewer than batch_size=4 windows'):
        next(data.lm_batches(ds, tok, batch_size=4, seq_len=8, seed=0))


@pytest.mark.parametrize(('batch_size', 'seq_len'), [(2, 8), (3, 5), (1, 1000)])
def test_lm_eval_scores_every_token_once(tok, batch_size, seq_len):
    ds = _lm_ds()
    stream = []
    for t in ds['text']:
        stream += tok(t, add_special_tokens=False)['input_ids'] + [tok.eos_token_id]
    got = list(data.lm_eval_batches(ds, tok, batch_size=batch_size, seq_len=seq_len))
    inputs = np.concatenate([b['input_ids'] for b in got]).reshape(-1)
    labels = np.concatenate([b['labels'] for b in got]).reshape(-1)
    weight = np.concatenate([b['weight'] for b in got]).reshape(-1)
    assert weight.sum() == len(stream) - 1
    kept = weight > 0
    np.testing.assert_array_equal(labels[kept], stream[1:])  # every target once, in order
    np.testing.assert_array_equal(inputs[kept], stream[:-1])  # with its own context token
    assert all(b['input_ids'].shape == (batch_size, seq_len) for b in got)
    assert got[-1]['weight'].dtype == np.float32
