"""jaxprune.plot: which PNGs a metrics.jsonl yields, and that they are valid images."""

from __future__ import annotations

import json
import pathlib
import struct

import pytest

pytest.importorskip('matplotlib')

from jaxprune.plot import _plots

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'
ALL_FILES = ['loss.png', 'eval.png', 'density.png', 'kept_heads.png', 'kept_mlp.png',
             'lora_ranks.png', 'flip_rate.png']


def _png_size(path: pathlib.Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert data[12:16] == b'IHDR', path
    return struct.unpack('>II', data[16:24])


def _write(run_dir: pathlib.Path, events: list[dict], *, tail: str = '') -> pathlib.Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    text = ''.join(json.dumps(e) + '\n' for e in events) + tail
    (run_dir / 'metrics.jsonl').write_text(text)
    return run_dir


def _all_events(n: int = 12) -> list[dict]:
    events = [{'event': 'compile', 'step': 1, 'time': 0.0, 'seconds': 3.0}]
    for step in range(1, n + 1):
        density = 1.0 - 0.5 * step / n
        events.append({
            'event': 'train', 'step': step, 'time': float(step), 'loss': 2.0 / step,
            'accuracy': 0.5, 'lr': 1e-3, 'density': density + 0.01,
            'target_density': density, 'kept_heads': [4 - step // 6, 4 - step // 4],
            'kept_mlp': [64 - 2 * step, 64 - 3 * step],
            'lora_ranks': {'layers.0.attn.q_proj': 8, 'layers.1.attn.q_proj': 4 + step % 3},
            'flip_rate': 0.1 / step,
        })
        if step % 4 == 0:
            events.append({'event': 'eval', 'step': step, 'time': float(step),
                           'loss': 2.5 / step, 'accuracy': 0.5 + step / 50,
                           'perplexity': 10.0 / step})
    return events


def test_plot_run_all_keys_writes_every_plot(tmp_path):
    run = _write(tmp_path / 'run', _all_events(), tail='{"event": "train", "st')  # killed mid-line
    paths = _plots.plot_run(run)
    assert [p.name for p in paths] == ALL_FILES
    assert sorted(p.name for p in (run / 'plots').iterdir()) == sorted(ALL_FILES)
    for p in paths:
        assert p.stat().st_size > 1000, p
        width, height = _png_size(p)
        assert height == 400, p  # figsize height 4 in at 100 dpi
        assert width == (1280 if p.name == 'eval.png' else 640), p  # two eval panels


def test_plot_run_only_loss_writes_only_loss_plot(tmp_path):
    events = [{'event': 'train', 'step': s, 'loss': 1.0 / s} for s in range(1, 6)]
    out = tmp_path / 'pictures'
    paths = _plots.plot_run(_write(tmp_path / 'run', events), out_dir=out)
    assert paths == [out / 'loss.png']
    assert [p.name for p in out.iterdir()] == ['loss.png']
    _png_size(paths[0])


@pytest.mark.parametrize(
    ('key', 'value', 'expected'),
    [
        ('target_density', 0.5, ['density.png']),
        ('density', 0.5, ['density.png']),
        ('sampled_density', 0.7, ['density.png']),  # ATP's control phase
        ('kept_heads', [4, 3], ['kept_heads.png']),
        ('kept_mlp', [64, 60, 12], ['kept_mlp.png']),
        ('lora_ranks', [[4, 4], [8, 2]], ['lora_ranks.png']),  # several adapters per layer
        ('flip_rate', 0.01, ['flip_rate.png']),
        ('flip_rate', None, []),  # present but null: nothing to draw
        ('kept_heads', [], []),
    ],
)
def test_plot_run_each_key_alone(tmp_path, key, value, expected):
    events = [{'event': 'prune', 'step': s, key: value} for s in range(3)]
    paths = _plots.plot_run(_write(tmp_path / 'run', events))
    assert [p.name for p in paths] == expected


def test_plot_run_reads_what_the_trainer_logger_writes(tmp_path):
    from jaxprune.train import _metrics

    log = _metrics.MetricsLogger(tmp_path, total_steps=4, progress=False)
    for step in range(1, 5):
        log.log('train', step, loss=1.0 / step, accuracy=0.5, grad_norm=1.0, lr=1e-3)
    log.log('eval', 4, loss=0.3, accuracy=0.9, count=10)
    log.close()
    assert [p.name for p in _plots.plot_run(tmp_path)] == ['loss.png', 'eval.png']


def test_plot_run_missing_metrics_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match='metrics.jsonl'):
        _plots.plot_run(tmp_path)


def test_main_prints_paths_and_exit_codes(tmp_path, capsys):
    run = _write(tmp_path / 'run', [{'event': 'train', 'step': 1, 'loss': 1.0},
                                    {'event': 'train', 'step': 2, 'loss': 0.5}])
    assert _plots.main([str(run)]) == 0
    assert capsys.readouterr().out.split() == [str(run / 'plots' / 'loss.png')]
    assert _plots.main([str(tmp_path / 'nope')]) == 2
    assert 'metrics.jsonl' in capsys.readouterr().err
