"""PNG pictures of a run from its ``metrics.jsonl`` (see ``jaxprune.train.MetricsLogger``)."""

from __future__ import annotations

import argparse
import json
import logging
import math
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

logger = logging.getLogger(__name__)

METRICS_FILE = 'metrics.jsonl'
# Per-layer keys drawn as step x layer heatmaps, with their colour-bar label.
LAYER_KEYS = {
    'kept_heads': 'kept attention heads',
    'kept_mlp': 'kept MLP neurons',
    'lora_ranks': 'adapter rank',
}


def read_events(run_dir: str | pathlib.Path) -> list[dict[str, Any]]:
    """The events of ``run_dir/metrics.jsonl``; unreadable lines are skipped with a warning.

    A run killed while writing can leave a truncated last line, so a bad line is not an error.

    Raises:
      FileNotFoundError: if the file does not exist.
    """
    path = pathlib.Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f'{str(path)!r} not found; pass the run_dir of a training run (it holds '
            f'{METRICS_FILE})')
    events = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            logger.warning('skipping unreadable line %d of %s', n, path)
            continue
        if isinstance(rec, dict):
            events.append(rec)
    return events


def _number(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    return float(x) if math.isfinite(x) else None


def _series(events, key: str, *, event: str | None = None) -> tuple[list[int], list[float]]:
    """``(steps, values)`` of a scalar ``key`` over events (optionally of one event type)."""
    steps, values = [], []
    for e in events:
        if event is not None and e.get('event') != event:
            continue
        v, step = _number(e.get(key)), _number(e.get('step'))
        if v is not None and step is not None:
            steps.append(int(step))
            values.append(v)
    return steps, values


def _per_layer(x: Any) -> list[float] | None:
    if isinstance(x, dict):  # e.g. {'layers.0.attn.q_proj': 8, ...}: one column per key
        x = [x[k] for k in sorted(x)]
    if not isinstance(x, list | tuple) or not x:
        return None
    out = []
    for v in x:
        if isinstance(v, list | tuple):  # several adapters in a layer: total rank
            nums = [n for n in (_number(u) for u in v) if n is not None]
            v = sum(nums) if nums else None
        n = _number(v)
        out.append(math.nan if n is None else n)
    return out


def _layer_series(events, key: str) -> tuple[list[int], list[list[float]]]:
    steps, rows = [], []
    for e in events:
        row, step = _per_layer(e.get(key)), _number(e.get('step'))
        if row is not None and step is not None:
            steps.append(int(step))
            rows.append(row)
    return steps, rows


def _figure(ncols: int = 1):
    try:
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError('plotting needs matplotlib: pip install "matplotlib>=3.8"') from e
    # A bare Figure renders with Agg and never touches pyplot's global state or a display.
    fig = Figure(figsize=(6.4 * ncols, 4.0), layout='constrained')
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def _save(fig, path: pathlib.Path) -> pathlib.Path:
    fig.savefig(path, format='png', dpi=100)
    return path


def _plot_lines(path, title, ylabel, lines, *, log_y=False):
    fig, (ax,) = _figure()
    for label, (xs, ys), style in lines:
        ax.plot(xs, ys, style, label=label)
    ax.set(title=title, xlabel='step', ylabel=ylabel)
    if log_y and all(y > 0 for _, (_, ys), _ in lines for y in ys):
        ax.set_yscale('log')
    ax.grid(alpha=0.3)
    if len(lines) > 1:
        ax.legend()
    return _save(fig, path)


def _plot_heatmap(path, title, cbar_label, steps, rows):
    import numpy as np

    width = max(len(r) for r in rows)
    data = np.full((len(rows), width), np.nan)
    for i, r in enumerate(rows):
        data[i, :len(r)] = r
    fig, (ax,) = _figure()
    # Rows are events (not evenly spaced steps), so label them with their step numbers.
    im = ax.imshow(data.T, aspect='auto', origin='lower', interpolation='nearest',
                   cmap='viridis')
    ticks = np.unique(np.linspace(0, len(steps) - 1, min(len(steps), 8)).astype(int))
    ax.set_xticks(ticks, [str(steps[i]) for i in ticks])
    ax.set(title=title, xlabel='step', ylabel='layer')
    from matplotlib import ticker

    ax.yaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    fig.colorbar(im, ax=ax, label=cbar_label)
    return _save(fig, path)


def plot_run(
    run_dir: str | pathlib.Path, *, out_dir: str | pathlib.Path | None = None
) -> list[pathlib.Path]:
    """Writes PNG plots of a run's metrics; only plots whose data exist are drawn.

    Reads ``run_dir/metrics.jsonl`` (one JSON event per line: ``event``, ``step`` and metric
    keys; any key may be missing) and writes, into ``out_dir`` (default ``run_dir/plots``):

    * ``loss.png``: train ``loss`` and eval ``loss`` against the step;
    * ``eval.png``: eval ``accuracy`` and ``perplexity`` (one panel each present);
    * ``density.png``: actual ``density`` against ``target_density`` (and ATP's
      ``sampled_density`` during its control phase);
    * ``kept_heads.png`` / ``kept_mlp.png`` / ``lora_ranks.png``: step x layer heatmaps of
      per-layer lists (a dict is read as one column per sorted key);
    * ``flip_rate.png``: the AST mask flip rate.

    Args:
      run_dir: a run directory written by ``jaxprune train``.
      out_dir: where to write the PNGs (created if missing).

    Returns:
      The written files, in the order above.

    Raises:
      FileNotFoundError: if ``run_dir/metrics.jsonl`` does not exist.
      ImportError: if matplotlib is not installed.
    """
    events = read_events(run_dir)
    out = pathlib.Path(run_dir) / 'plots' if out_dir is None else pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[pathlib.Path] = []

    # Train loss comes from 'train' events; eval from 'eval' events; any other event with a
    # loss (older or custom loggers) counts as train.
    train_loss = _series([e for e in events if e.get('event') != 'eval'], 'loss')
    eval_loss = _series(events, 'loss', event='eval')
    lines = [(name, s, style) for name, s, style in
             (('train', train_loss, '-'), ('eval', eval_loss, 'o-')) if s[0]]
    if lines:
        written.append(_plot_lines(out / 'loss.png', 'loss', 'cross-entropy', lines, log_y=True))

    panels = [(k, _series(events, k, event='eval')) for k in ('accuracy', 'perplexity')]
    panels = [(k, s) for k, s in panels if s[0]]
    if panels:
        fig, axes = _figure(len(panels))
        for ax, (k, (xs, ys)) in zip(axes, panels):
            ax.plot(xs, ys, 'o-')
            ax.set(title=f'eval {k}', xlabel='step', ylabel=k)
            ax.grid(alpha=0.3)
        written.append(_save(fig, out / 'eval.png'))

    density = [(label, _series(events, key), style) for label, key, style in
               (('actual', 'density', '-'), ('target', 'target_density', '--'),
                ('sampled (ATP generator)', 'sampled_density', ':'))]
    density = [d for d in density if d[1][0]]
    if density:
        written.append(_plot_lines(out / 'density.png', 'density', 'kept fraction', density))

    for key, label in LAYER_KEYS.items():
        steps, rows = _layer_series(events, key)
        if rows:
            title = f'{label} per layer'
            written.append(_plot_heatmap(out / f'{key}.png', title, label, steps, rows))

    flips = _series(events, 'flip_rate')
    if flips[0]:
        written.append(_plot_lines(
            out / 'flip_rate.png', 'AST mask flip rate', 'fraction of mask entries flipped',
            [('flip rate', flips, '-')]))
    logger.info('wrote %d plots to %s', len(written), out)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """``jaxprune plot RUN_DIR [--out DIR]``: writes the plots and prints their paths.

    Returns:
      0 on success, 2 when the run directory has no ``metrics.jsonl``.
    """
    p = argparse.ArgumentParser(prog='jaxprune plot', description='PNG plots of a run')
    p.add_argument('run_dir', help='run directory holding metrics.jsonl')
    p.add_argument('--out', default=None, help='output directory (default: RUN_DIR/plots)')
    args = p.parse_args(argv)
    try:
        paths = plot_run(args.run_dir, out_dir=args.out)
    except FileNotFoundError as e:
        print(f'jaxprune plot: error: {e}', file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0
