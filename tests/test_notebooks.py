"""Notebooks: stored clean and paired (fast), and executed end to end in smoke mode (slow).

Each ``notebooks/NAME.ipynb`` is the jupytext pair of ``notebooks/NAME.md`` (MyST, the reviewed
text form). The fast test needs only the standard library: no outputs or execution counts are
stored, there is a Colab badge for the notebook's own path and a guarded install cell, the
notebook has a smoke mode, and the code cells equal the ``.md`` pair's. The slow test executes
each notebook with ``nbclient`` on a ``python3`` kernel with ``JAXPRUNE_NOTEBOOK_SMOKE=1``
(tiny models, synthetic data, nothing downloaded) in a temporary working directory.
"""

import json
import os
import pathlib
import re
import sys

import pytest

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parent.parent / 'notebooks'
NOTEBOOKS = (
    'quickstart_lora',
    'apt_quickstart',
    'atp_quickstart',
    'ast_quickstart',
    'write_your_own_method',
)
COLAB = 'https://colab.research.google.com/github/jaxprune/jaxprune/blob/main/notebooks/{}.ipynb'
INSTALL = 'jaxprune @ git+https://github.com/jaxprune/jaxprune'
SMOKE_VAR = 'JAXPRUNE_NOTEBOOK_SMOKE'
CELL_TIMEOUT_S = 900  # a cell that trains (smoke mode) takes < 1 min alone, minutes on a busy CPU
_CODE_CELL = re.compile(r'^```\{code-cell\}[^\n]*\n(.*?)^```[ \t]*$', re.DOTALL | re.MULTILINE)


def _source(cell) -> str:
    src = cell['source']
    return ''.join(src) if isinstance(src, list) else src


def _ipynb(name: str) -> dict:
    return json.loads((NOTEBOOK_DIR / f'{name}.ipynb').read_text())


def _md_code_cells(name: str) -> list[str]:
    """Code cells of a MyST notebook (cell options lines ``:key: value`` dropped)."""
    cells = []
    for body in _CODE_CELL.findall((NOTEBOOK_DIR / f'{name}.md').read_text()):
        lines = body.split('\n')
        while lines and re.match(r'^:\w[\w-]*:', lines[0]):
            lines.pop(0)
        cells.append('\n'.join(lines).strip('\n'))
    return cells


def test_notebook_set_is_complete():
    found = {p.stem for p in NOTEBOOK_DIR.glob('*.ipynb')}
    assert found == set(NOTEBOOKS), f'{sorted(found)=} differs from {sorted(NOTEBOOKS)=}'
    assert {p.stem for p in NOTEBOOK_DIR.glob('*.md')} == set(NOTEBOOKS)


@pytest.mark.parametrize('name', NOTEBOOKS)
def test_notebook_stored_without_outputs(name):
    nb = _ipynb(name)
    code = [c for c in nb['cells'] if c['cell_type'] == 'code']
    assert code, f'{name}.ipynb has no code cells'
    for i, cell in enumerate(code):
        assert cell.get('outputs') == [], f'{name}.ipynb code cell {i} stores outputs'
        assert cell.get('execution_count') is None, f'{name}.ipynb code cell {i} has a count'
    assert nb['metadata']['kernelspec']['name'] == 'python3'
    assert nb['metadata']['jupytext']['formats'] == 'ipynb,md:myst'


@pytest.mark.parametrize('name', NOTEBOOKS)
def test_notebook_has_colab_badge_install_cell_and_smoke_mode(name):
    nb = _ipynb(name)
    first_md = next(_source(c) for c in nb['cells'] if c['cell_type'] == 'markdown')
    assert COLAB.format(name) in first_md, f'{name}: Colab badge for its own path missing'
    assert 'colab-badge.svg' in first_md
    code = [_source(c) for c in nb['cells'] if c['cell_type'] == 'code']
    install = code[0]  # the install cell runs before anything imports jaxprune
    assert INSTALL in install, f'{name}: first code cell must pip install {INSTALL!r}'
    assert "find_spec('jaxprune') is None" in install, f'{name}: install must be guarded'
    assert 'import jaxprune' not in install
    assert any(SMOKE_VAR in c for c in code), f'{name}: no {SMOKE_VAR} smoke mode'


@pytest.mark.parametrize('name', NOTEBOOKS)
def test_notebook_ipynb_matches_md_pair(name):
    ipynb_code = [_source(c).strip('\n') for c in _ipynb(name)['cells'] if c['cell_type'] == 'code']
    md_code = _md_code_cells(name)
    assert len(md_code) == len(ipynb_code), f'{name}: {len(md_code)=} != {len(ipynb_code)=}'
    for i, (a, b) in enumerate(zip(md_code, ipynb_code, strict=True)):
        assert a == b, f'{name}: code cell {i} differs between .md and .ipynb (run jupytext --sync)'


def test_md_code_cell_parser_reads_options_and_bodies(tmp_path, monkeypatch):
    # Guards the pairing test against a parser that silently finds nothing.
    (tmp_path / 'x.md').write_text(
        '# t\n\n```{code-cell} ipython3\n:tags: [hide]\na = 1\n\nb = 2\n```\n\ntext\n\n'
        '```python\nnot a cell\n```\n\n```{code-cell} ipython3\nprint(a)\n```\n'
    )
    monkeypatch.setattr(sys.modules[__name__], 'NOTEBOOK_DIR', tmp_path)
    assert _md_code_cells('x') == ['a = 1\n\nb = 2', 'print(a)']


@pytest.mark.slow
@pytest.mark.parametrize('name', NOTEBOOKS)
def test_notebook_executes_in_smoke_mode(name, tmp_path, monkeypatch):
    nbformat = pytest.importorskip('nbformat')
    nbclient = pytest.importorskip('nbclient')
    pytest.importorskip('ipykernel')
    monkeypatch.setenv(SMOKE_VAR, '1')
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('HF_DATASETS_OFFLINE', '1')
    monkeypatch.setenv('JAXPRUNE_CACHE', str(tmp_path / 'cache'))  # smoke mode fetches nothing
    monkeypatch.delenv('XLA_FLAGS', raising=False)  # one device, as on Colab
    monkeypatch.delenv('JAXPRUNE_NOTEBOOK_STEPS', raising=False)  # each notebook's smoke default
    monkeypatch.setenv(
        'PYTHONPATH',
        os.pathsep.join(
            [str(NOTEBOOK_DIR.parent)]
            + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]
        ),
    )
    nb = nbformat.read(NOTEBOOK_DIR / f'{name}.ipynb', as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name='python3',
        resources={'metadata': {'path': str(tmp_path)}},
    )
    client.execute()  # raises CellExecutionError naming the failing cell
    errors = [
        o for c in nb.cells if c.cell_type == 'code' for o in c.outputs if o.output_type == 'error'
    ]
    assert not errors
    assert not (tmp_path / 'cache').exists(), 'smoke mode must not download assets'
