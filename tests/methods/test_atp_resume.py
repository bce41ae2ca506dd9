"""ATP driver resume: a run cut after a checkpoint and restarted ends like an uninterrupted one."""

import json
import pathlib
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from jaxprune import config, lora
from jaxprune.methods import _atp_train

ROOT = pathlib.Path(__file__).resolve().parents[2]
STEPS, CONTROL = 8, 4  # control_fraction 0.5 in atp_tiny.yaml


def _cfg(run_dir, *extra):
    return config.load_config(ROOT / 'configs' / 'atp_tiny.yaml', [
        f'run_dir={run_dir}', f'train.steps={STEPS}', 'train.log_every=2', 'checkpoint.every=2',
        'checkpoint.keep=10', 'data.eval_max_examples=20', *extra])


def _events(run_dir, kind):
    lines = (run_dir / 'metrics.jsonl').read_text().splitlines()
    return [e for e in map(json.loads, lines) if e['event'] == kind]


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
    """One uninterrupted run; its checkpoint folder is the source of the cut runs."""
    run_dir = tmp_path_factory.mktemp('atp_ref')
    run = _atp_train.run_atp(_cfg(run_dir), progress=False)
    return run_dir, run


def _cut_copy(ref_dir, run_dir, cut):
    """The run directory as a run killed right after checkpoint ``cut`` would have left it."""
    shutil.copytree(ref_dir, run_dir)
    shutil.rmtree(run_dir / 'pruned')
    steps = [int(p.name) for p in (run_dir / 'checkpoints').iterdir() if p.name.isdigit()]
    assert sorted(steps) == [2, 4, 6, 8]  # every=2; the freeze (4) and the end coincide
    for s in steps:
        if s > cut:
            shutil.rmtree(run_dir / 'checkpoints' / str(s))
    lines = (run_dir / 'metrics.jsonl').read_text().splitlines()
    kept = [x for x in lines if json.loads(x)['event'] != 'eval'
            and json.loads(x).get('step', 0) <= cut]
    (run_dir / 'metrics.jsonl').write_text(''.join(x + '\n' for x in kept))


@pytest.mark.parametrize('cut', [2, 6], ids=['control_phase', 'after_freeze'])
def test_resume_equals_uninterrupted_run(reference, tmp_path, cut):
    """Final LoRA factors, generator, masks, export and eval match (atol 1e-6; exact on CPU)."""
    ref_dir, ref = reference
    run_dir = tmp_path / 'run'
    _cut_copy(ref_dir, run_dir, cut)
    run = _atp_train.run_atp(_cfg(run_dir), progress=False)
    (resume,) = _events(run_dir, 'resume')
    assert resume['step'] == cut and resume['frozen'] == (cut >= CONTROL)
    assert resume['data_position'] == cut
    assert resume['generator_data_position'] == min(cut, CONTROL)
    lora_params = [nnx.state(r.model, lora.trainable_filter()) for r in (run, ref)]
    assert jax.tree.leaves(lora_params[1])  # LoRA factors exist
    trees = [lora_params, (run.gen_params, ref.gen_params), (run.masks, ref.masks),
             (run.compact, ref.compact)]
    for got, want in trees:
        got, want = jax.tree.leaves(got), jax.tree.leaves(want)
        assert len(got) == len(want)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)
    rec, want = run.record, ref.record
    for k in ('eval_masked', 'eval_lora_aware', 'eval_export'):
        for m in ('loss', 'perplexity', 'accuracy', 'count'):
            np.testing.assert_allclose(rec[k][m], want[k][m], atol=1e-6, rtol=0)
    assert rec['tokens'] == want['tokens'] and rec['params'] == want['params']
    losses = {e['step']: e['loss'] for e in _events(run_dir, 'train')}
    ref_losses = {e['step']: e['loss'] for e in _events(ref_dir, 'train')}
    assert losses.keys() == ref_losses.keys() == {2, 4, 6, 8}
    np.testing.assert_allclose([losses[s] for s in (2, 4, 6, 8)],
                               [ref_losses[s] for s in (2, 4, 6, 8)], atol=1e-6, rtol=0)


def test_resume_of_a_finished_run_only_exports(reference, tmp_path):
    """Restarting a finished run trains nothing and rewrites the same export."""
    ref_dir, ref = reference
    run_dir = tmp_path / 'run'
    _cut_copy(ref_dir, run_dir, STEPS)
    run = _atp_train.run_atp(_cfg(run_dir), progress=False)
    assert _events(run_dir, 'resume')[0]['step'] == STEPS
    assert len(_events(run_dir, 'train')) == len(_events(ref_dir, 'train'))
    for a, b in zip(jax.tree.leaves(run.compact), jax.tree.leaves(ref.compact), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert run.record['eval_export'] == ref.record['eval_export']


def test_resume_false_refuses_a_run_dir_with_checkpoints(reference, tmp_path):
    ref_dir, _ = reference
    shutil.copytree(ref_dir / 'checkpoints', tmp_path / 'checkpoints')
    with pytest.raises(ValueError, match='checkpoint.resume=true'):
        _atp_train.run_atp(_cfg(tmp_path, 'checkpoint.resume=false'), progress=False)


def test_resume_refuses_a_changed_config(reference, tmp_path):
    """Schedules depend on train.steps and prune.*: resuming with other values is an error."""
    ref_dir, _ = reference
    _cut_copy(ref_dir, tmp_path / 'run', 2)
    with pytest.raises(ValueError, match=r'train.steps: 8 -> 10.*fresh run_dir'):
        _atp_train.run_atp(_cfg(tmp_path / 'run', 'train.steps=10'), progress=False)
