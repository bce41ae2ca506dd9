"""Docs stay honest: API.md matches the docstrings, every ``>>>`` example runs, the README runs."""

import doctest
import importlib
import pathlib
import re
import runpy

import numpy as np
import pytest

from jaxprune import _apidoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / 'jaxprune'


def _doctest_modules() -> list[str]:
    """Dotted names of the modules under jaxprune/ whose source contains a ``>>>`` example."""
    names = []
    for path in sorted(PACKAGE.rglob('*.py')):
        if re.search(r'^\s*>>> ', path.read_text(), re.MULTILINE):
            parts = path.relative_to(ROOT).with_suffix('').parts
            names.append('.'.join(parts[:-1] if parts[-1] == '__init__' else parts))
    return names


MODULES = _doctest_modules()


def test_api_page_is_up_to_date():
    page = ROOT / 'jaxprune' / 'API.md'
    assert page.read_text() == _apidoc.generate(), _apidoc.STALE


def test_api_page_check_flags_a_stale_page(tmp_path, monkeypatch, capsys):
    stale = tmp_path / 'API.md'
    stale.write_text('# an old page\n')
    monkeypatch.setattr(_apidoc, 'PAGE', stale)
    assert _apidoc.main(['--check']) == 1
    assert _apidoc.STALE in capsys.readouterr().err
    monkeypatch.setattr(_apidoc, 'PAGE', ROOT / 'jaxprune' / 'API.md')
    assert _apidoc.main(['--check']) == 0


def test_api_page_signatures_are_sanitised():
    def f(x, *, fn=print, g=lambda y: y, dtype=np.float32):
        del x, fn, g, dtype

    sig = _apidoc.signature(f)
    assert ' at 0x' not in sig
    want = '(x, *, fn=print, g=test_api_page_signatures_are_sanitised.<locals>.<lambda>, '
    assert sig == want + 'dtype=numpy.float32)'
    assert _apidoc.format_signature('h', '(a, b=(1, 2), *, c="x, y") -> int', width=10) == (
        'h(\n    a,\n    b=(1, 2),\n    *,\n    c="x, y",\n) -> int'
    )


def test_doctest_modules_are_found():
    # The modules with examples that this issue added or first ran; a rename must not hide them.
    for name in ('jaxprune.masks._nm', 'jaxprune.kernels.sparse24.format', 'jaxprune.distributed'):
        assert name in MODULES


@pytest.mark.parametrize('name', MODULES)
def test_doctests(name):
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(
        optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS, verbose=False
    )
    report = []
    for test in finder.find(module, name):
        runner.run(test, out=report.append)
    result = runner.summarize(verbose=False)
    assert result.attempted > 0, f'{name} contains ">>>" but no doctest was found in a docstring'
    assert result.failed == 0, ''.join(report)


def _library_tour() -> str:
    readme = (ROOT / 'README.md').read_text()
    section = readme[readme.index('## Library tour') :]
    match = re.search(r'```python\n(.*?)```', section, re.DOTALL)
    assert match, 'README.md "Library tour" has no ```python block'
    return match.group(1)


def test_readme_library_tour_runs(tmp_path):
    script = tmp_path / 'readme_library_tour.py'  # a file, so a traceback shows the failing line
    script.write_text(_library_tour())
    namespace = runpy.run_path(str(script))
    # It builds a dense and a head-masked forward and a 2:4 optimizer: check they mean something.
    dense, masked, masks = namespace['dense'], namespace['masked'], namespace['masks']
    assert dense.shape == masked.shape
    assert not np.allclose(dense, masked)
    layer0 = masks['layers'][0]['attn']['q_proj']['kernel']
    assert layer0.dtype == bool and layer0.shape[0] % 4 == 0
    assert (np.asarray(layer0).reshape(-1, 4, layer0.shape[1]).sum(1) == 2).all()
