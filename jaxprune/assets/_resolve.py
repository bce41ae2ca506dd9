"""Resolve a model reference (asset name, HF folder, .gguf file, hub id) to a local HF folder."""

from __future__ import annotations

import difflib
import hashlib
import os
import pathlib
import re

from jaxprune.assets import _cache, _gguf, _registry

_HUB_ID = re.compile(r'^[\w.-]+/[\w.-]+$')
_TRUE = ('1', 'true', 'yes', 'on')


def _offline() -> bool:
    return any(
        os.environ.get(k, '').lower() in _TRUE for k in ('HF_HUB_OFFLINE', 'TRANSFORMERS_OFFLINE')
    )


def _gguf_key(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    stat = path.stat()
    h.update(f'{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}'.encode())
    return f'{path.stem}-{h.hexdigest()[:12]}'


def resolve_model(
    name_or_path: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None
) -> pathlib.Path:
    """Returns a local HF-style model folder for an asset name, folder, ``.gguf`` or hub id.

    Resolution order:

    1. a registered model asset (``minilm-l6``, ``smollm2-135m``): :func:`fetch` it;
    2. an existing folder containing ``config.json``: returned as is;
    3. an existing ``.gguf`` file: converted once with :func:`gguf_to_hf` into
       ``<cache>/gguf/<stem>-<hash of path, size, mtime>/`` (atomically);
    4. a hub id ``org/name``: ``huggingface_hub.snapshot_download`` unless ``HF_HUB_OFFLINE``
       (or ``TRANSFORMERS_OFFLINE``) is set.

    Raises:
      FileNotFoundError: a folder without ``config.json``, or nothing matched.
      ValueError: a dataset asset name was given.
      RuntimeError: a hub id while offline, or the hub download failed.
    """
    ref = os.fspath(name_or_path)
    if ref in _registry.REGISTRY:
        spec = _registry.REGISTRY[ref]
        if spec.kind != 'model':
            raise ValueError(f'{ref=} is a {spec.kind} dataset asset, not a model; use '
                             'jaxprune.data.load_dataset for it')  # fmt: skip
        return _registry.fetch(ref, cache_dir=cache_dir)
    path = pathlib.Path(ref).expanduser()
    if path.is_dir():
        if not (path / 'config.json').is_file():
            raise FileNotFoundError(
                f'{path=} has no config.json; pass an HF model folder (config.json + '
                '*.safetensors + tokenizer files) or a .gguf file'
            )
        return path
    if path.is_file():
        if path.suffix != '.gguf':
            raise ValueError(f'{path=} is a file but not .gguf; pass its HF folder instead')
        folder = _cache.cache_root(cache_dir) / 'gguf' / _gguf_key(path)
        meta = {'gguf': str(path.resolve()), 'format': 1}
        return _cache.build_atomic(folder, meta, lambda _, out: _gguf.gguf_to_hf(path, out))
    models = [n for n, s in _registry.REGISTRY.items() if s.kind == 'model']
    if _HUB_ID.match(ref) and not ref.startswith(('.', '/', '~')):
        if _offline():
            raise RuntimeError(
                f'{ref=} looks like a Hugging Face hub id but HF_HUB_OFFLINE is set. Pass a local '
                f'HF folder (config.json + *.safetensors), a .gguf file, or an asset name from '
                f'{models}; or unset HF_HUB_OFFLINE to download it.'
            )
        return _snapshot(ref)
    close = difflib.get_close_matches(ref, models, n=1, cutoff=0.5)
    hint = f' Did you mean {close[0]!r}?' if close else ''
    raise FileNotFoundError(
        f'{ref=} is neither a model asset ({models}), an existing folder/.gguf file, nor a hub '
        f'id (org/name).{hint}'
    )


def _snapshot(repo_id: str) -> pathlib.Path:
    import huggingface_hub

    patterns = ['*.json', '*.safetensors', '*.txt', '*.model', 'tokenizer*', '*.jinja']
    try:
        return pathlib.Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # re-raised with the fix
        raise RuntimeError(
            f'downloading {repo_id=} from the Hugging Face hub failed ({e}). Without hub access '
            'pass a local HF folder, a .gguf file or an asset name such as smollm2-135m.'
        ) from e
