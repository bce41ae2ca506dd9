"""The thin CLI: argument parsing and one-line config errors with a non-zero exit status."""

import pathlib
import subprocess
import sys

import pytest

from jaxprune import cli

REPO = pathlib.Path(__file__).resolve().parent.parent
TINY = str(REPO / 'configs' / 'tiny.yaml')


@pytest.mark.parametrize('argv,needle', [
    (['train', TINY, 'train.stpes=3'], "did you mean 'train.steps'"),
    (['train', TINY, 'train.learning_rate=-1'], 'train.learning_rate=-1.0 must be'),
    (['train', str(REPO / 'configs' / 'does_not_exist.yaml')], 'does_not_exist.yaml'),
    (['eval', TINY, 'steps=3'], "unknown config key 'steps'"),
    (['train', TINY, 'train.steps'], 'key.sub=value'),
])
def test_config_errors_exit_2_with_one_line(argv, needle, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith('jaxprune: error: ')
    assert needle in err
    assert '\n' not in err and 'Traceback' not in err


def test_eval_run_dir_without_config(tmp_path, capsys):
    assert cli.main(['eval', str(tmp_path)]) == 2
    assert 'without config.yaml' in capsys.readouterr().err


def test_usage_error_exits_nonzero():
    with pytest.raises(SystemExit) as e:
        cli.main(['frobnicate'])
    assert e.value.code == 2


def test_module_entry_point_subprocess():
    proc = subprocess.run(
        [sys.executable, '-m', 'jaxprune.cli', 'train', TINY, 'lora.rnak=2'],
        capture_output=True, text=True, timeout=120, cwd=REPO, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "jaxprune: error: unknown config key 'lora.rnak'; did you mean 'lora.rank'?")
