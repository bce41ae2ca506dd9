"""Command line: ``jaxprune train|eval|plot|assets``. Thin by design; the work lives in the library.

  jaxprune train CONFIG [key.sub=value ...]      train (resumes from run_dir checkpoints)
  jaxprune eval CONFIG|RUN_DIR [key=value ...]   exact validation metrics of the latest checkpoint
  jaxprune plot RUN_DIR                          PNGs of a run's metrics into RUN_DIR/plots
  jaxprune assets list                           known asset names
  jaxprune assets fetch NAME [NAME ...]          download + cache assets, print their paths

Multi-host: ``JAXPRUNE_DISTRIBUTED``/``JAXPRUNE_COORDINATOR`` start ``jax.distributed`` before
anything else touches JAX (see launch/README.md). Config errors exit with status 2 and one line on
stderr (no traceback; set JAXPRUNE_DEBUG=1 for one).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import sys
from collections.abc import Sequence


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='jaxprune', description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest='command', required=True)
    for name, what in (('train', 'a yaml config'), ('eval', 'a yaml config or a run directory')):
        sp = sub.add_parser(name, help=f'{name} from {what}')
        sp.add_argument('config', help=what)
        sp.add_argument('overrides', nargs='*', help='dotted overrides, e.g. train.steps=200')
        if name == 'eval':
            sp.add_argument('--split', default='validation')
    plot = sub.add_parser('plot', help="write PNGs from a run's metrics.jsonl")
    plot.add_argument('run_dir')
    assets = sub.add_parser('assets', help='list or fetch cached assets')
    asub = assets.add_subparsers(dest='assets_command', required=True)
    asub.add_parser('list', help='known asset names')
    fetch = asub.add_parser('fetch', help='download assets into the cache')
    fetch.add_argument('names', nargs='+')
    return p


def _load(path: str, overrides: Sequence[str]):
    from jaxprune import config

    p = pathlib.Path(path)
    if p.is_dir():
        if not (p / 'config.yaml').is_file():
            raise FileNotFoundError(f'{path=} is a directory without config.yaml; pass a run dir')
        # A run directory evaluates its own checkpoints wherever it now lives.
        overrides = [f'run_dir={p}', *overrides]
        p = p / 'config.yaml'
    return config.load_config(p, overrides)


def _run(args: argparse.Namespace) -> int:
    if args.command == 'plot':
        from jaxprune import plot

        return plot.main([args.run_dir])
    if args.command == 'assets':
        from jaxprune import assets

        if args.assets_command == 'list':
            for name in assets.list_assets():
                print(name)
        else:
            for name in args.names:
                print(f'{name}\t{assets.fetch(name)}')
        return 0
    from jaxprune import distributed

    distributed.maybe_initialize()  # before anything starts a JAX backend
    cfg = _load(args.config, args.overrides)
    from jaxprune import train

    if args.command == 'train':
        result = train.train(cfg)
    else:
        result = train.evaluate(cfg, split=args.split)
    print(json.dumps(result))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``jaxprune`` script; returns the exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')
    logging.getLogger('jaxprune').setLevel(logging.INFO)
    try:
        return _run(args)
    except (ValueError, FileNotFoundError, KeyError) as e:
        if os.environ.get('JAXPRUNE_DEBUG'):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f'jaxprune: error: {msg}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
