"""Metrics sink: one JSON object per event in ``run_dir/metrics.jsonl`` plus a rich progress bar."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import sys
import time
from typing import Any

import jax

logger = logging.getLogger(__name__)


def _plain(v: Any) -> Any:
    if hasattr(v, 'item'):
        return v.item()
    return v


class MetricsLogger:
    """Appends events to ``metrics.jsonl`` and drives a console progress bar.

    Events are ``{'event': 'train'|'eval'|..., 'step': int, 'time': float, ...}``. The file is
    appended to (a resumed run continues the same file); each line is flushed immediately.
    """

    def __init__(self, run_dir: str | pathlib.Path, *, total_steps: int, start_step: int = 0,
                 progress: bool | None = None):
        self.path = pathlib.Path(run_dir) / 'metrics.jsonl'
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # In a multi-process run only process 0 writes; the others log to nowhere.
        # Open for the logger's lifetime (closed in close()), so no context manager.
        self._file = (self.path.open('a') if jax.process_index() == 0
                      else open(os.devnull, 'w'))  # noqa: SIM115
        if jax.process_index() != 0:
            progress = False
        self._progress = None
        self._task = None
        if progress is None:
            progress = sys.stderr.isatty()
        if progress:
            from rich import progress as rp

            self._progress = rp.Progress(
                rp.TextColumn('[bold]train'), rp.BarColumn(), rp.MofNCompleteColumn(),
                rp.TextColumn('{task.fields[info]}'), rp.TimeElapsedColumn(),
                rp.TimeRemainingColumn(), transient=False)
            self._progress.start()
            self._task = self._progress.add_task(
                'train', total=total_steps, completed=start_step, info='')

    def log(self, event: str, step: int, **metrics: Any) -> dict[str, Any]:
        """Writes one event line; returns the record."""
        rec = {'event': event, 'step': int(step), 'time': time.time()}
        rec.update({k: _plain(v) for k, v in metrics.items()})
        self._file.write(json.dumps(rec) + '\n')
        self._file.flush()
        if self._progress is None:
            shown = ' '.join(f'{k}={v:.4g}' if isinstance(v, float) else f'{k}={v}'
                             for k, v in rec.items() if k not in ('event', 'time'))
            print(f'[{event}] {shown}', file=sys.stderr, flush=True)
        elif event == 'eval':
            self._progress.console.print(
                f'[eval] step={step} ' + ' '.join(
                    f'{k}={v:.4g}' for k, v in rec.items() if isinstance(v, float)
                    and k != 'time'))
        return rec

    def advance(self, step: int, *, loss: float | None = None,
                tokens_per_s: float | None = None) -> None:
        """Moves the progress bar to ``step`` with the latest loss and throughput."""
        if self._progress is None:
            return
        info = []
        if loss is not None:
            info.append(f'loss {loss:.4f}')
        if tokens_per_s:
            info.append(f'{tokens_per_s:,.0f} tok/s')
        self._progress.update(self._task, completed=step, info='  '.join(info))

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        self._file.close()


def read_metrics(run_dir: str | pathlib.Path) -> list[dict[str, Any]]:
    """All events of ``run_dir/metrics.jsonl``."""
    path = pathlib.Path(run_dir) / 'metrics.jsonl'
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
