"""load_dataset on tiny local csv/jsonl/txt/parquet fixtures (offline)."""

import json

import datasets
import pytest

from jaxprune import data


def _rows(n: int) -> list[dict]:
    return [{'text': f'review number {i} ' + 'good ' * (i % 5), 'label': i % 2} for i in range(n)]


def _write_jsonl(path, rows):
    path.write_text(''.join(json.dumps(r) + '\n' for r in rows))


def _write_csv(path, rows):
    lines = ['text,label'] + [f'"{r["text"]}",{r["label"]}' for r in rows]
    path.write_text('\n'.join(lines) + '\n')


@pytest.mark.parametrize('ext', ['jsonl', 'csv', 'parquet'])
def test_single_file_gets_seeded_disjoint_split(tmp_path, ext):
    rows = _rows(50)
    path = tmp_path / f'd.{ext}'
    if ext == 'jsonl':
        _write_jsonl(path, rows)
    elif ext == 'csv':
        _write_csv(path, rows)
    else:
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    dd = data.load_dataset(path, seed=1)
    assert list(dd) == ['train', 'validation', 'test']
    assert [len(dd[s]) for s in dd] == [40, 5, 5]
    texts = [set(dd[s]['text']) for s in dd]
    assert texts[0].isdisjoint(texts[1]) and texts[0].isdisjoint(texts[2])
    assert texts[1].isdisjoint(texts[2])
    assert set().union(*texts) == {r['text'] for r in rows}
    label_of = {r['text']: r['label'] for r in rows}
    assert all(label_of[t] == lab for t, lab in zip(dd['test']['text'], dd['test']['label'],
                                                     strict=True))  # fmt: skip


def test_split_is_stable_for_a_seed_and_changes_with_it(tmp_path):
    _write_jsonl(tmp_path / 'd.jsonl', _rows(60))
    a = data.load_dataset(tmp_path / 'd.jsonl', seed=0)
    b = data.load_dataset(str(tmp_path / 'd.jsonl'), seed=0)
    c = data.load_dataset(tmp_path / 'd.jsonl', seed=1)
    assert a['validation']['text'] == b['validation']['text']
    assert a['validation']['text'] != c['validation']['text']


def test_folder_with_named_splits_keeps_them(tmp_path):
    rows = _rows(30)
    _write_jsonl(tmp_path / 'train.jsonl', rows[:20])
    _write_jsonl(tmp_path / 'dev.jsonl', rows[20:25])
    _write_jsonl(tmp_path / 'test.jsonl', rows[25:])
    dd = data.load_dataset(tmp_path)
    assert dd['train']['text'] == [r['text'] for r in rows[:20]]
    assert dd['validation']['text'] == [r['text'] for r in rows[20:25]]
    assert dd['test']['text'] == [r['text'] for r in rows[25:]]


def test_string_labels_become_sorted_class_ids(tmp_path):
    rows = [{'text': f't{i}', 'label': ['pos', 'neg'][i % 2]} for i in range(20)]
    _write_jsonl(tmp_path / 'd.jsonl', rows)
    dd = data.load_dataset(tmp_path / 'd.jsonl')
    assert dd['train'].features['label'].names == ['neg', 'pos']
    want = {r['text']: ['neg', 'pos'].index(r['label']) for r in rows}
    assert [want[t] for t in dd['train']['text']] == dd['train']['label']


def test_text_file_one_example_per_paragraph(tmp_path):
    paragraphs = [f'Paragraph {i} line one.\nline two.' for i in range(20)]
    (tmp_path / 'corpus.txt').write_text('\n\n'.join(paragraphs) + '\n')
    dd = data.load_dataset(tmp_path / 'corpus.txt')
    got = sorted(t.strip() for s in dd for t in dd[s]['text'])
    assert got == sorted(paragraphs)
    assert dd['train'].column_names == ['text']


def test_errors_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="Did you mean 'rotten-tomatoes'"):
        data.load_dataset('rotten-tomatos')
    (tmp_path / 'd.xml').write_text('<a/>')
    with pytest.raises(ValueError, match='unsupported'):
        data.load_dataset(tmp_path / 'd.xml')
    _write_jsonl(tmp_path / 'bad.jsonl', [{'sentence': 'x', 'label': 0}] * 10)
    with pytest.raises(ValueError, match='no "text"'):
        data.load_dataset(tmp_path / 'bad.jsonl')
    with pytest.raises(ValueError, match='model asset'):
        data.load_dataset('smollm2-135m')
    only = tmp_path / 'only'
    only.mkdir()
    _write_jsonl(only / 'train.jsonl', _rows(5))
    with pytest.raises(ValueError, match=r"lacks \['validation', 'test'\]"):
        data.load_dataset(only)
