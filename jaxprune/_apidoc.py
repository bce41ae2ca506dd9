"""Generate ``jaxprune/API.md``, the API reference, from the public packages' docstrings.

Design: the public API is what each public package re-exports in its ``__init__`` (its
``__all__`` when it has one, otherwise the names its top-level statements bind, read from the
source with ``ast`` so that submodules imported as a side effect never leak in). Per package the
page shows the ``__init__`` docstring; per name its signature, the first paragraph of its
docstring and its source file. The output is deterministic (sorted, memory addresses removed),
so ``--check`` (and ``tests/test_docs.py``) can fail when the committed page is stale.

Usage::

  python -m jaxprune._apidoc           # rewrite jaxprune/API.md
  python -m jaxprune._apidoc --check   # exit 1 if jaxprune/API.md is stale
"""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import logging
import pathlib
import re
import sys
import textwrap
import types
from collections.abc import Mapping
from typing import Any

PACKAGES = (
    'jaxprune',
    'jaxprune.models',
    'jaxprune.lora',
    'jaxprune.masks',
    'jaxprune.scores',
    'jaxprune.transforms',
    'jaxprune.schedules',
    'jaxprune.methods',
    'jaxprune.surgery',
    'jaxprune.kernels.sparse24',
    'jaxprune.assets',
    'jaxprune.data',
    'jaxprune.train',
    'jaxprune.checkpoint',
    'jaxprune.sharding',
    'jaxprune.distributed',
)
ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGE = ROOT / 'jaxprune' / 'API.md'
STALE = 'jaxprune/API.md is stale: run python -m jaxprune._apidoc'

_ADDRESS = re.compile(r' at 0x[0-9a-fA-F]+')
_TYPING = re.compile(r'(?<![\w.])typing\.')
_SIMPLE_TABLE = re.compile(r'^=+( +=+)+$')


class _Raw:
    """Formats as the given text inside ``inspect.Signature.__str__`` (which uses ``repr``)."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text


def sanitize(text: str) -> str:
    """Drops memory addresses (``<function f at 0x7f..>`` -> ``<function f>``) and ``typing.``."""
    return _TYPING.sub('', _ADDRESS.sub('', text))


def public_names(module: types.ModuleType) -> list[str]:
    """The sorted public names a package re-exports (or a plain module defines)."""
    if hasattr(module, '__all__'):
        return sorted(n for n in module.__all__ if not n.startswith('_'))
    tree = ast.parse(pathlib.Path(module.__file__).read_text())
    is_package = pathlib.Path(module.__file__).name == '__init__.py'
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            if is_package:  # a plain module's imports are its dependencies, not its API
                names.update((a.asname or a.name).split('.')[0] for a in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    names.discard('annotations')  # from __future__ import annotations
    return sorted(n for n in names if not n.startswith('_'))


def _source_annotations(obj: Any) -> dict[str, str]:
    """Annotations as written in the source (``optax.Params``, not its expansion), by name.

    Functions give their parameters and ``'return'``; classes their ``__init__`` parameters or
    their annotated fields (dataclasses, NamedTuples). Empty when the source is unavailable.
    """
    try:
        node = ast.parse(textwrap.dedent(inspect.getsource(obj))).body[0]
    except (OSError, TypeError, SyntaxError, IndexError):
        return {}
    if isinstance(node, ast.ClassDef):
        inits = [n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == '__init__']
        if not inits:
            return {
                n.target.id: ast.unparse(n.annotation)
                for n in node.body
                if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
            }
        node = inits[0]
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return {}
    a = node.args
    args = [*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg]
    out = {x.arg: ast.unparse(x.annotation) for x in args if x is not None and x.annotation}
    if node.returns is not None:
        out['return'] = ast.unparse(node.returns)
    return out


def _default(value: Any) -> str:
    text = sanitize(repr(value))
    text = re.sub(r"<class '([\w.]+)'>", r'\1', text)
    return re.sub(r'<(?:function|built-in function|cyfunction) ([\w.<>]+)>', r'\1', text)


def signature(obj: Any) -> str | None:
    """``(args) -> ret`` with annotations as written and defaults sanitised; None if unknown."""
    try:
        sig = inspect.signature(obj)
        if inspect.isclass(obj) and all(
            p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in sig.parameters.values()
        ):  # a metaclass __call__ (NNX modules) hides __init__
            init = inspect.signature(obj.__init__)
            sig = init.replace(parameters=list(init.parameters.values())[1:])
    except (TypeError, ValueError):
        return None
    written = _source_annotations(obj)

    def annotation(name, x):
        if name in written:
            return _Raw(written[name])
        if x is inspect.Parameter.empty:
            return x
        return _Raw(x if isinstance(x, str) else inspect.formatannotation(x))

    params = []
    for p in sig.parameters.values():
        default = p.default
        if default is not inspect.Parameter.empty:
            default = _Raw(_default(default))
        params.append(p.replace(annotation=annotation(p.name, p.annotation), default=default))
    ret = inspect.Signature.empty
    if not inspect.isclass(obj):
        ret = annotation('return', sig.return_annotation)
    sig = sig.replace(parameters=params, return_annotation=ret)
    return sanitize(str(sig))


def _split_top(text: str) -> list[str]:
    """Splits at commas outside brackets and quotes."""
    parts, depth, quote, start = [], 0, '', 0
    for i, c in enumerate(text):
        if quote:
            quote = '' if c == quote and text[i - 1] != '\\' else quote
        elif c in '\'"':
            quote = c
        elif c in '([{':
            depth += 1
        elif c in ')]}':
            depth -= 1
        elif c == ',' and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    tail = text[start:].strip()
    return parts + [tail] if tail else parts


def format_signature(name: str, sig: str, width: int = 100) -> str:
    """``name(sig)`` on one line, or one parameter per line (black style) if longer than width."""
    line = f'{name}{sig}'
    if len(line) <= width or not sig.startswith('('):
        return line
    depth = 0
    for end, c in enumerate(sig):
        depth += (c in '([{') - (c in ')]}')
        if depth == 0:
            break
    params = _split_top(sig[1:end])
    body = ''.join(f'    {p},\n' for p in params)
    return f'{name}(\n{body}){sig[end + 1 :]}'


def first_paragraph(doc: str | None) -> str:
    """The first paragraph of a docstring, on one line."""
    if not doc:
        return ''
    para = inspect.cleandoc(doc).strip().split('\n\n')[0]
    return sanitize(' '.join(line.strip() for line in para.splitlines()))


def rst_to_md(doc: str) -> str:
    """Light conversion of a package docstring: ``::`` blocks and simple tables become fences."""
    lines = inspect.cleandoc(doc).splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if _SIMPLE_TABLE.match(line.strip()):
            end = i + 1  # a simple table ends at a rule line followed by a blank line
            while end < len(lines):
                end += 1
                if _SIMPLE_TABLE.match(lines[end - 1].strip()) and (
                    end == len(lines) or not lines[end].strip()
                ):
                    break
            out += ['```text', *lines[i:end], '```']
            i = end
            continue
        if line.rstrip().endswith('::'):
            out.append(line.rstrip()[:-1] if line.rstrip() != '::' else '')
            j = i + 1
            while j < len(lines) and not lines[j].strip():
                j += 1
            block = []
            while j < len(lines) and (not lines[j].strip() or lines[j].startswith(' ')):
                block.append(lines[j])
                j += 1
            while block and not block[-1].strip():
                block.pop()
            if block:
                indent = min(len(b) - len(b.lstrip()) for b in block if b.strip())
                out += ['', '```', *(b[indent:] for b in block), '```', '']
                i = j
                continue
        out.append(line)
        i += 1
    return sanitize('\n'.join(out).strip())


def source_path(obj: Any) -> str | None:
    """The source file of ``obj`` relative to the repository, or None outside it."""
    try:
        path = inspect.getsourcefile(obj)
    except TypeError:
        return None
    if path is None:
        return None
    path = pathlib.Path(path).resolve()
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else None


def _anchor(title: str) -> str:
    """GitHub's heading anchor for a heading made of ``title`` in backticks."""
    return re.sub(r'[^a-z0-9_ -]', '', title.lower()).replace(' ', '-')


def _methods(cls: type) -> list[str]:
    return sorted(
        n
        for n, v in vars(cls).items()
        if not n.startswith('_')
        and (inspect.isfunction(v) or isinstance(v, (property, classmethod, staticmethod)))
    )


def _own_doc(obj: Any) -> str | None:
    """The object's own docstring (a class does not inherit its base's, unlike inspect.getdoc)."""
    doc = vars(obj).get('__doc__') if inspect.isclass(obj) else getattr(obj, '__doc__', None)
    return doc if isinstance(doc, str) else None


def _entry(qualname: str, obj: Any) -> list[str]:
    lines = [f'### `{qualname}`']
    text = []
    is_alias = isinstance(obj, (types.GenericAlias, types.UnionType))
    if is_alias or (not inspect.isclass(obj) and type(obj).__module__ == 'typing'):
        text.append(f'Type alias: `{sanitize(repr(obj))}`.')
    elif inspect.isclass(obj) or callable(obj):
        protocol = getattr(obj, '_is_protocol', False)
        sig = '(Protocol)' if protocol else signature(obj)
        short = ('class ' if inspect.isclass(obj) else '') + qualname.rsplit('.', 1)[-1]
        lines += ['```python', short if sig is None else format_signature(short, sig), '```']
        para = first_paragraph(_own_doc(obj))
        if para:
            text.append(para)
        if inspect.isclass(obj) and _methods(obj):
            text.append('Members: ' + ', '.join(f'`{m}`' for m in _methods(obj)) + '.')
    else:
        value = sanitize(repr(obj)) if isinstance(obj, (str, int, float, bool, tuple)) else ''
        value = f' = `{value}`' if value and len(value) <= 90 and '`' not in value else ''
        text.append(f'Constant of type `{type(obj).__name__}`{value}.')
        if isinstance(obj, Mapping) and all(isinstance(k, str) for k in obj):
            text.append('Keys: ' + ', '.join(f'`{k}`' for k in sorted(obj)) + '.')
    src = source_path(obj)
    if src:
        text.append(f'Source: `{src}`')
    return [*lines, *text, '']


def generate() -> str:
    """The whole page, as a string (deterministic)."""
    modules = {name: importlib.import_module(name) for name in PACKAGES}
    out = [
        '# jaxprune API reference',
        '',
        '<!-- Generated by `python -m jaxprune._apidoc` from the docstrings; do not edit. -->',
        '',
        'The public API is what each package below re-exports. Each entry shows the signature, the',
        'first paragraph of the docstring (`help(obj)` has the rest: Args, Returns, Raises, math',
        'and references) and the source file. Examples in docstrings (`>>>`) run in',
        '`tests/test_docs.py`.',
        '',
        '## Contents',
        '',
    ]
    out += [f'- [`{name}`](#{_anchor(name)})' for name in PACKAGES]
    out.append('')
    for pkg_name, module in modules.items():
        out += [f'## `{pkg_name}`', '']
        if module.__doc__:
            out += [rst_to_md(module.__doc__), '']
        aliases, entries, submodules = [], [], []
        for name in public_names(module):
            obj = getattr(module, name)
            if isinstance(obj, logging.Logger):  # a module's logger is not API
                continue
            qualname = f'{pkg_name}.{name}'
            if isinstance(obj, types.ModuleType):
                target = obj.__name__
                link = f'[`{target}`](#{_anchor(target)})' if target in modules else f'`{target}`'
                submodules.append(f'- `{name}`: module {link}')
                continue
            home = next(
                (
                    f'{p}.{name}'
                    for p in PACKAGES
                    if p != pkg_name
                    and p.startswith(pkg_name + '.')
                    and getattr(modules[p], name, None) is obj
                    and name in public_names(modules[p])
                ),
                None,
            )
            if home is not None:  # a curated re-export of a subpackage's name
                aliases.append(f'- `{name}`: [`{home}`](#{_anchor(home)})')
            else:
                entries += _entry(qualname, obj)
        if submodules:
            out += ['Subpackages:', '', *submodules, '']
        if aliases:
            out += ['Re-exports:', '', *aliases, '']
        out += entries
    return '\n'.join(out).rstrip() + '\n'


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m jaxprune._apidoc', description=__doc__)
    parser.add_argument('--check', action='store_true', help='exit 1 if API.md is stale')
    args = parser.parse_args(argv)
    text = generate()
    if args.check:
        if not PAGE.exists() or PAGE.read_text() != text:
            print(STALE, file=sys.stderr)
            return 1
        print('jaxprune/API.md is up to date')
        return 0
    PAGE.write_text(text)
    print(f'wrote {PAGE.relative_to(ROOT)} ({text.count(chr(10))} lines)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
