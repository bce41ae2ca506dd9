"""The training loop: metrics, checkpoints, NaN handling, exact eval and kill-and-resume."""

import dataclasses
import gc
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import checkpoint, cli, config, train, transforms
from jaxprune.train import _data, _method

REPO = pathlib.Path(__file__).resolve().parents[2]


def _events(run_dir, kind):
    return [e for e in train.read_metrics(run_dir) if e['event'] == kind]


def test_train_writes_metrics_config_and_checkpoints(tiny, capsys):
    cfg = tiny('train.steps=6', 'checkpoint.every=3', 'train.log_every=2', 'train.eval_every=3')
    final = train.train(cfg, progress=False)
    run = pathlib.Path(cfg.run_dir)
    assert config.load_config(run / 'config.yaml') == cfg
    logs = _events(run, 'train')
    assert [e['step'] for e in logs] == [2, 4, 6]
    for e in logs:
        assert {'loss', 'lr', 'tokens_per_s', 'examples_per_s', 'skipped_nonfinite'} <= set(e)
        assert np.isfinite(e['loss'])
    assert all(e['tokens_per_s'] > 0 and e['examples_per_s'] > 0 for e in logs[1:])
    evals = _events(run, 'eval')
    assert [e['step'] for e in evals] == [3, 6]
    assert final == evals[-1] and final['count'] == 100 and 0 <= final['accuracy'] <= 1
    with checkpoint.Checkpointer(cfg.checkpoint_dir) as ckpt:
        assert ckpt.all_steps() == [3, 6]
    # `jaxprune eval RUN_DIR` restores the last checkpoint and reproduces the final eval exactly.
    assert cli.main(['eval', str(run)]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again['step'] == 6
    assert again['loss'] == final['loss'] and again['accuracy'] == final['accuracy']


@config.register_prune('_nan_test')
@dataclasses.dataclass(frozen=True, kw_only=True)
class _NanCfg(config.PruneCfg):
    pass


class _NanOnOddLabel(_method.NoMethod):
    """A NaN loss whenever the batch's first label is 1 (about every other step)."""

    def loss_extras(self, trainable, out, batch):
        return jnp.where(batch['labels'][0] == 1, jnp.nan, 0.0), {}


_method.register_method('_nan_test')(lambda cfg, **kw: _NanOnOddLabel())


def test_nonfinite_steps_are_skipped_counted_and_never_checkpointed(tiny):
    cfg = tiny('train.steps=8', 'checkpoint.every=2', 'train.log_every=4',
               'prune.method=_nan_test')
    final = train.train(cfg, progress=False)
    assert final['skipped_nonfinite'] > 0 and np.isfinite(final['loss'])
    assert _events(cfg.run_dir, 'train')[-1]['skipped_nonfinite'] == final['skipped_nonfinite']
    s = train.setup(cfg)
    with checkpoint.Checkpointer(cfg.checkpoint_dir) as ckpt:
        for step in ckpt.all_steps():
            state, meta = ckpt.restore(step, target=jax.eval_shape(lambda: s.state))
            assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state.trainable))
            assert meta['data_position'] == step


@pytest.mark.parametrize('task,dataset,tok_len', [
    ('classification', 'tiny-sentiment', 'max_len'), ('causal_lm', 'tiny-text', 'seq_len')])
def test_eval_batches_cover_the_split_exactly_once(task, dataset, tok_len):
    dcfg = config.DataCfg(dataset=dataset, eval_batch_size=16, max_len=32, seq_len=32)
    split = _data.load_splits(dcfg)['validation']
    tok = train.tiny_tokenizer()
    batches = _data.eval_batches(split, tok, dcfg, task=task)
    assert len({b['input_ids'].shape for b in batches}) == 1  # static shapes: one compile
    labels = np.concatenate([b['labels'].reshape(-1) for b in batches])
    if task == 'classification':
        np.testing.assert_array_equal(labels[labels >= 0], np.asarray(split['label']))
        assert (labels < 0).sum() == (-len(split)) % 16
    else:
        ids = []
        for t in tok(list(split['text']), add_special_tokens=False)['input_ids']:
            ids += t + [tok.eos_token_id]
        np.testing.assert_array_equal(labels[labels >= 0], ids[1:])  # every next token once


def _cli(run_dir, *extra):
    return [sys.executable, '-m', 'jaxprune.cli', 'train', str(REPO / 'configs' / 'tiny.yaml'),
            f'run_dir={run_dir}', 'mesh.data=1', 'train.steps=20', 'checkpoint.every=5',
            'checkpoint.keep=3', 'train.log_every=1', *extra]


def _final(run_dir):
    evals = _events(run_dir, 'eval')
    losses = {e['step']: e['loss'] for e in _events(run_dir, 'train')}  # last write wins
    return evals[-1], losses


def test_kill_and_resume_equals_uninterrupted_run(tmp_path):
    env = {**os.environ, 'JAXPRUNE_DEBUG': '1'}
    ref_dir, run_dir = tmp_path / 'ref', tmp_path / 'run'
    subprocess.run(_cli(ref_dir), check=True, env=env, cwd=REPO, timeout=300,
                   capture_output=True)
    proc = subprocess.Popen(_cli(run_dir), env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpt_dir = run_dir / 'checkpoints'
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if ckpt_dir.is_dir() and any(p.name.isdigit() for p in ckpt_dir.iterdir()):
                break
            time.sleep(0.02)
        assert proc.poll() is None, 'the run ended before it could be killed'
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    killed_at = max(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())
    assert killed_at < 20 and not _events(run_dir, 'eval')
    subprocess.run(_cli(run_dir), check=True, env=env, cwd=REPO, timeout=300,
                   capture_output=True)
    resumes = _events(run_dir, 'resume')
    assert len(resumes) == 1 and 5 <= resumes[0]['step'] < 20
    ref_eval, ref_losses = _final(ref_dir)
    got_eval, got_losses = _final(run_dir)
    assert got_eval['step'] == ref_eval['step'] == 20
    for k in ('loss', 'accuracy', 'count', 'skipped_nonfinite'):
        assert got_eval[k] == ref_eval[k], k  # bit-exact on one CPU device
    assert got_losses == ref_losses
    lines = (run_dir / 'metrics.jsonl').read_text().splitlines()
    assert all(json.loads(line) for line in lines)  # no torn line from the kill


def test_causal_lm_loop_with_lora_reports_perplexity(tiny):
    cfg = tiny('model.name_or_path=tiny-llama', 'model.task=causal_lm', 'data.dataset=tiny-text',
               'lora.enabled=true', 'lora.rank=4', 'train.steps=4', 'checkpoint.every=0',
               'train.log_every=2')
    final = train.train(cfg, progress=False)
    assert final['perplexity'] == pytest.approx(np.exp(final['loss']), rel=1e-5)
    assert final['count'] > 0 and np.isfinite(final['loss'])
    with checkpoint.Checkpointer(cfg.checkpoint_dir) as ckpt:
        assert ckpt.all_steps() == [4]  # saved at the end


@config.register_prune('_driver_test')
@dataclasses.dataclass(frozen=True, kw_only=True)
class _DriverCfg(config.PruneCfg):
    pass


def test_registered_driver_takes_over_train(tiny):
    calls = []
    train.register_driver('_driver_test')(lambda cfg, progress=None: calls.append(cfg) or {'x': 1})
    cfg = tiny('prune.method=_driver_test')
    assert train.train(cfg, progress=False) == {'x': 1}
    assert calls == [cfg] and not pathlib.Path(cfg.run_dir).exists()
    assert train.driver_for('none') is None


@config.register_prune('_meta_test')
@dataclasses.dataclass(frozen=True, kw_only=True)
class _MetaCfg(config.PruneCfg):
    pass


_BUILT = []  # every _HostStateMethod, newest last


class _HostStateMethod:
    """Plain fine-tuning with host-side state saved through checkpoint_meta / restore."""

    def __init__(self):
        self.seen, self.restored = 0, []
        _BUILT.append(self)

    def transforms(self, trainable):
        del trainable
        return ()

    def loss_extras(self, trainable, out, batch):
        del trainable, out, batch
        return jnp.zeros((), jnp.float32), {}

    def on_step_end(self, step, state):
        self.seen = step
        return state

    def checkpoint_meta(self):
        return {'seen': self.seen}

    def restore(self, meta, state):
        self.restored.append((meta, state))
        self.seen = meta['seen']
        return state


_method.register_method('_meta_test')(lambda cfg, **kw: _HostStateMethod())


@config.register_prune('_eval_hook_test')
@dataclasses.dataclass(frozen=True, kw_only=True)
class _EvalHookCfg(config.PruneCfg):
    regraph: bool = False  # on_eval returns another graphdef (not allowed)


class _EvalHookMethod(_HostStateMethod):
    """Records every ``on_eval`` call; optionally returns a different graph from it."""

    def __init__(self, regraph):
        super().__init__()
        self.regraph, self.evals = regraph, []

    def on_eval(self, step, metrics, state):
        self.evals.append((step, metrics))
        return dataclasses.replace(state, graphdef=object()) if self.regraph else state


_method.register_method('_eval_hook_test')(lambda cfg, **kw: _EvalHookMethod(cfg.regraph))


def test_on_eval_sees_every_periodic_eval_and_may_not_change_the_graph(tiny, tmp_path):
    cfg = tiny('prune.method=_eval_hook_test', 'train.steps=6', 'train.eval_every=2')
    train.train(cfg, progress=False)
    evals = _events(cfg.run_dir, 'eval')
    assert [e['step'] for e in evals] == [2, 4, 6]  # 6 is the final eval, not a periodic one
    got = _BUILT[-1].evals
    assert [step for step, _ in got] == [2, 4]
    for (_, metrics), e in zip(got, evals, strict=False):
        assert metrics['accuracy'] == e['accuracy'] and metrics['loss'] == e['loss']
    bad = tiny('prune.method=_eval_hook_test', 'prune.regraph=true', 'train.steps=4',
               'train.eval_every=2', f'run_dir={tmp_path / "regraph"}')
    with pytest.raises(RuntimeError, match='on_eval changed the model graph'):
        train.train(bad, progress=False)


# Reading the deliberately corrupted step makes orbax's async tensorstore reads fail; their
# callbacks then reach an event loop orbax has already closed ("Event loop is closed", raised in
# orbax's threads, not ours). The fallback itself is what this test checks.
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_method_meta_is_checkpointed_and_restored_per_step_tried(tiny):
    cfg = tiny('prune.method=_meta_test', 'train.steps=4', 'checkpoint.every=2',
               'train.log_every=2')
    train.train(cfg, progress=False)
    with checkpoint.Checkpointer(cfg.checkpoint_dir) as ckpt:  # closed: no stray async threads
        assert [ckpt.read_meta(step)['method'] for step in ckpt.all_steps()] == [{'seen': 2},
                                                                                   {'seen': 4}]
    for f in (pathlib.Path(cfg.checkpoint_dir) / '4' / 'state').rglob('*'):
        if f.is_file() and f.parent.name == 'd':
            f.write_bytes(b'')  # step 4 corrupt: resume falls back to 2
    train.train(tiny('prune.method=_meta_test', 'train.steps=6', 'checkpoint.every=2',
                     'train.log_every=2'), progress=False)
    method = _BUILT[-1]
    # Asked again for the older step, always with the same freshly built state.
    assert [meta for meta, _ in method.restored] == [{'seen': 4}, {'seen': 2}]
    assert method.restored[0][1] is method.restored[1][1]
    assert [e['step'] for e in _events(cfg.run_dir, 'resume')] == [2]
    with checkpoint.Checkpointer(cfg.checkpoint_dir) as ckpt:
        assert method.seen == 6 and ckpt.read_meta(6)['method'] == {'seen': 6}
    # The failed reads' futures are garbage now: collect them here, inside the test, so asyncio's
    # "Future exception was never retrieved" goes to the captured log, not to stderr at exit.
    gc.collect()


def test_param_ema_evaluates_and_finishes_on_the_average_of_the_iterates(tiny, tmp_path):
    steps, decay = 5, 0.6
    common = (f'train.steps={steps}', 'checkpoint.every=1', f'checkpoint.keep={steps}',
              'train.log_every=1', 'train.eval_every=2')
    plain = tiny(*common, f'run_dir={tmp_path / "plain"}')
    avg = tiny(*common, f'run_dir={tmp_path / "avg"}', f'train.param_ema={decay}')
    train.train(plain, progress=False)
    final = train.train(avg, progress=False)

    def restored(cfg):
        s = train.setup(cfg)
        with checkpoint.Checkpointer(cfg.checkpoint_dir) as ckpt:
            return s, [ckpt.restore(t, target=jax.eval_shape(lambda: s.state))[0].trainable
                       for t in range(1, steps + 1)]

    _, iterates = restored(plain)
    s, got = restored(avg)
    leaves = lambda tree: [np.asarray(x) for x in jax.tree.leaves(tree)]
    for a, b in zip(leaves(got[steps - 2]), leaves(iterates[steps - 2])):
        np.testing.assert_array_equal(a, b)  # averaging does not change the training iterates
    weights = [(1 - decay) * decay ** (steps - 1 - i) for i in range(steps)]
    norm = 1 - decay ** steps
    ref = [sum(w * x for w, x in zip(weights, xs)) / norm
           for xs in zip(*(leaves(it) for it in iterates))]
    changed = False
    for a, b, last in zip(leaves(got[-1]), ref, leaves(iterates[-1])):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)  # the last state holds the average
        changed |= not np.allclose(a, last)
    assert changed, 'the average equals the last iterate: the test cannot tell them apart'
    # Periodic evals use the average: the logged step-2 eval is an eval of the average then, and
    # differs from an eval of the live params.
    with checkpoint.Checkpointer(avg.checkpoint_dir) as ckpt:
        state, _ = ckpt.restore(2, target=jax.eval_shape(lambda: s.state))
    live = train.setup(plain)  # same model, no averaging: evaluates state.trainable as is
    live.state = state
    live_loss = train.evaluate_state(live)['loss']
    live.state = state._replace(trainable=transforms.averaged_params(
        state.trainable, state.opt_state))
    logged = _events(avg.run_dir, 'eval')[0]
    assert logged['step'] == 2
    assert logged['loss'] == pytest.approx(train.evaluate_state(live)['loss'], rel=1e-6)
    assert logged['loss'] != pytest.approx(live_loss, rel=1e-6)
    assert final['step'] == steps


def test_resume_with_a_state_changing_setting_is_refused_and_keeps_the_run(tiny):
    cfg = tiny('train.steps=3', 'checkpoint.every=3')
    train.train(cfg, progress=False)
    saved = (pathlib.Path(cfg.run_dir) / 'config.yaml').read_text()
    changed = tiny('train.steps=6', 'checkpoint.every=3', 'train.param_ema=0.9')
    with pytest.raises(checkpoint.StateMismatchError, match='train.param_ema settings') as e:
        train.train(changed, progress=False)
    assert 'fresh run_dir' in str(e.value)
    assert (pathlib.Path(cfg.run_dir) / 'config.yaml').read_text() == saved
    with checkpoint.Checkpointer(cfg.checkpoint_dir) as ckpt:
        assert ckpt.all_steps() == [3]
