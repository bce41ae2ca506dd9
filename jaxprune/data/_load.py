"""Load asset or local data sets as ``datasets.DatasetDict`` with train/validation/test splits."""

from __future__ import annotations

import difflib
import os
import pathlib

import datasets

from jaxprune.assets import _registry

SPLITS = ('train', 'validation', 'test')
_BUILDERS = {
    '.json': 'json',
    '.jsonl': 'json',
    '.csv': 'csv',
    '.parquet': 'parquet',
    '.txt': 'text',
}
_SPLIT_ALIASES = {
    'train': ('train', 'training'),
    'validation': ('validation', 'valid', 'val', 'dev'),
    'test': ('test', 'testing'),
}


def _builder(files: list[pathlib.Path]) -> tuple[str, dict]:
    exts = {p.suffix.lower() for p in files}
    builders = {_BUILDERS.get(e) for e in exts}
    if None in builders or len(builders) != 1:
        raise ValueError(
            f'cannot load {[p.name for p in files]}: mixed or unsupported extensions {exts}; '
            f'use one of {sorted(_BUILDERS)}'
        )
    builder = builders.pop()
    # Text files: one example per paragraph (blank-line separated), not per line.
    return builder, ({'sample_by': 'paragraph'} if builder == 'text' else {})


def _split_files(folder: pathlib.Path) -> dict[str, list[pathlib.Path]]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _BUILDERS)
    found: dict[str, list[pathlib.Path]] = {}
    for split, aliases in _SPLIT_ALIASES.items():
        hits = [p for p in files if p.stem.lower().split('.')[0] in aliases]
        if hits:
            found[split] = hits
    return found if found else {'unsplit': files}


def seeded_split(ds: datasets.Dataset, *, seed: int) -> datasets.DatasetDict:
    """Splits one table 80/10/10 into train/validation/test with a seeded permutation."""
    idx = _registry.split_indices(len(ds), seed=seed)
    return datasets.DatasetDict({s: ds.select(i) for s, i in zip(SPLITS, idx, strict=True)})


def _normalise(dd: datasets.DatasetDict, source: str) -> datasets.DatasetDict:
    for split, ds in dd.items():
        if 'text' not in ds.column_names:
            raise ValueError(
                f'{split=} of {source} has columns {ds.column_names} but no "text"; rename the '
                'text column to "text" (and the class column to "label" for classification)'
            )
    first = next(iter(dd.values()))
    if 'label' in first.column_names and first.features['label'].dtype == 'string':
        names = sorted({v for ds in dd.values() for v in ds['label']})
        class_label = datasets.ClassLabel(names=names)
        dd = datasets.DatasetDict(
            {s: ds.cast_column('label', class_label) for s, ds in dd.items()}
        )
    return dd


def load_dataset(name_or_path: str | os.PathLike, *, seed: int = 0) -> datasets.DatasetDict:
    """Loads an asset or local data set with ``train``, ``validation`` and ``test`` splits.

    Classification data has columns ``text`` and ``label`` (int; string labels are encoded as
    sorted class names); language-modelling data has ``text``.

    Args:
      name_or_path: a dataset asset (``rotten-tomatoes``, ``shakespeare``), a local
        ``.json/.jsonl/.csv/.parquet/.txt`` file, or a folder of such files. A folder whose
        files are named ``train.*``, ``validation.*`` (or ``valid``/``val``/``dev``) and
        ``test.*`` keeps those splits; any other folder or single file is one table that is
        split 80/10/10 with ``seed``. ``.txt`` files give one example per paragraph.
      seed: seed of that split (ignored for asset and pre-split data, whose splits are fixed).

    Returns:
      A ``datasets.DatasetDict`` with exactly the keys train, validation and test.

    Raises:
      FileNotFoundError: neither an asset name nor an existing path (with a did-you-mean).
      ValueError: unsupported file type, missing ``text`` column or missing splits.
    """
    ref = os.fspath(name_or_path)
    spec = _registry.REGISTRY.get(ref)
    if spec is not None:
        if spec.kind == 'model':
            raise ValueError(f'{ref=} is a model asset; pass a dataset asset or a data file')
        folder = _registry.fetch(ref)
        files = {s: [folder / f'{s}.jsonl'] for s in SPLITS}
    else:
        path = pathlib.Path(ref).expanduser()
        if not path.exists():
            names = [n for n, s in _registry.REGISTRY.items() if s.kind != 'model']
            close = difflib.get_close_matches(ref, names, n=1, cutoff=0.5)
            hint = f' Did you mean {close[0]!r}?' if close else ''
            raise FileNotFoundError(
                f'{ref=} is neither a dataset asset ({names}) nor an existing file or folder.{hint}'
            )
        files = _split_files(path) if path.is_dir() else {'unsplit': [path]}
        if not any(files.values()):
            raise ValueError(f'{path=} holds no file with extension in {sorted(_BUILDERS)}')
    builder, kwargs = _builder([p for ps in files.values() for p in ps])
    data_files = {s: [str(p) for p in ps] for s, ps in files.items()}
    dd = datasets.load_dataset(builder, data_files=data_files, **kwargs)
    if 'unsplit' in dd:
        dd = seeded_split(dd['unsplit'], seed=seed)
    missing = [s for s in SPLITS if s not in dd]
    if missing:
        raise ValueError(
            f'{ref} has splits {sorted(dd)} but lacks {missing}; provide train/validation/test '
            'files, or a single file to be split with the seed'
        )
    return _normalise(datasets.DatasetDict({s: dd[s] for s in SPLITS}), ref)
