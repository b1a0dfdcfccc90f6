"""Pre-emption and kills: SIGTERM saves and exits 75, SIGKILL (mid-step or mid-save) loses only
the steps since the last complete checkpoint, and every resumed run equals the uninterrupted
one parameter for parameter. Runs are real processes, as a scheduler would start them."""

import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from mr2ct_jax import checkpointing
from mr2ct_jax import preemption
from mr2ct_jax.data import writer
from mr2ct_jax.inference import generators

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_STEPS = 6
# Every run: the test config without evaluation, on one shared prepared phantom.
OVERRIDES = ('--config.eval.after_training=False', f'--config.train.num_steps={NUM_STEPS}',
             '--config.train.log_every=1', '--config.train.checkpoint_every=2')
_ENV = {**os.environ, 'PYTHONPATH': str(REPO)}

# A training process that kills itself with SIGKILL: during the step that produces step KILL_AT
# (computed, not saved) or right after the save of step KILL_AT started (Orbax writes it in the
# background), the way a node failure or the OOM killer would.
_KILLED_RUN = '''
import os, signal, sys
sys.path.insert(0, {repo!r})
from configs import gc
from mr2ct_jax import checkpointing
from mr2ct_jax.training import loop, step as step_lib
mode, kill_at, workdir, data_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
config = gc.get_config('test')
config.eval.after_training = False
config.data.dir = data_dir
config.train.num_steps = {num_steps}
config.train.checkpoint_every = 2
if mode == 'step':
  real_make = step_lib.make_train_step
  def make(gan, config, mesh):
    step_fn = real_make(gan, config, mesh)
    def step(state, batch):
      state, metrics = step_fn(state, batch)
      if int(state.step) == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
      return state, metrics
    return step
  step_lib.make_train_step = make
else:
  real_save = checkpointing.save
  def save(manager, step, state, iterator_state):
    real_save(manager, step, state, iterator_state)
    if step == kill_at:
      os.kill(os.getpid(), signal.SIGKILL)
  checkpointing.save = save
loop.train(config, workdir)
'''


def _main(workdir, data_dir, *extra, **popen):
  cmd = [sys.executable, '-m', 'mr2ct_jax.main', '--config=configs/gc.py:test',
         f'--workdir={workdir}', f'--config.data.dir={data_dir}', *OVERRIDES, *extra]
  return subprocess.Popen(cmd, cwd=REPO, env=_ENV, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, encoding='utf-8', **popen)


def _finish(process, timeout=600):
  out, err = process.communicate(timeout=timeout)
  return process.returncode, out, err


def _params(workdir):
  params, step = generators.restore_all_params(str(workdir))
  return params, step


def _assert_same_params(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory, test_config):
  return writer.prepare_phantom(str(tmp_path_factory.mktemp('phantom')), test_config)


@pytest.fixture(scope='module')
def straight(tmp_path_factory, data_dir):
  """The uninterrupted run's parameters after NUM_STEPS steps."""
  workdir = tmp_path_factory.mktemp('straight') / 'run'
  code, out, err = _finish(_main(workdir, data_dir))
  assert code == 0, out + err
  params, step = _params(workdir)
  assert step == NUM_STEPS
  return params


def test_same_config_and_seed_give_identical_parameters(straight, data_dir, tmp_path):
  code, out, err = _finish(_main(tmp_path / 'again', data_dir))
  assert code == 0, out + err
  _assert_same_params(straight, _params(tmp_path / 'again')[0])


def test_sigterm_saves_exits_75_and_the_rerun_continues_the_same_run(straight, data_dir,
                                                                     tmp_path):
  workdir = tmp_path / 'run'
  # Long enough to be caught mid-run; the schedule is that of NUM_STEPS, the stop is ours.
  process = _main(workdir, data_dir, '--config.train.num_steps=400')
  seen = ''
  deadline = time.time() + 300
  while 'step 2/' not in seen and time.time() < deadline:
    line = process.stdout.readline()
    assert line, process.stderr.read()
    seen += line
  process.send_signal(signal.SIGTERM)
  process.send_signal(signal.SIGTERM)  # a second signal while it stops and saves
  code, out, err = _finish(process)
  assert code == preemption.EXIT_PREEMPTED, out + err
  (last,) = [line for line in err.splitlines() if 'stopped at step' in line]
  stopped = int(last.split('stopped at step ')[1].split(',')[0])
  assert last == (f'training stopped at step {stopped}, checkpoint saved; run the same command '
                  'to resume')
  assert 'Traceback' not in err and stopped >= 2
  manager = checkpointing.make_manager(str(workdir), read_only=True)
  assert manager.latest_step() == stopped
  manager.close()


def test_a_signal_mid_run_then_the_same_command_equals_the_uninterrupted_run(
    straight, data_dir, tmp_path, monkeypatch, test_config):
  """In this process (the same 8 devices and compiled step as the runs above): SIGTERM after
  step 3 stops with step 3 saved, and training again finishes the same run."""
  from mr2ct_jax.training import loop  # pylint: disable=g-import-not-at-top  (heavy; only here)
  from mr2ct_jax.training import step as step_lib  # pylint: disable=g-import-not-at-top
  config = test_config.copy_and_resolve_references()
  config.eval.after_training = False
  config.data.dir = data_dir
  config.train.num_steps = NUM_STEPS
  config.train.log_every = 1
  config.train.checkpoint_every = 2
  real_make = step_lib.make_train_step

  def make_signalling(gan, config, mesh):
    step_fn = real_make(gan, config, mesh)

    def step(state, batch):
      state, metrics = step_fn(state, batch)
      if int(state.step) == 3:
        os.kill(os.getpid(), signal.SIGTERM)
      return state, metrics
    return step

  monkeypatch.setattr(step_lib, 'make_train_step', make_signalling)
  workdir = str(tmp_path / 'run')
  with pytest.raises(preemption.Preempted, match='^training stopped at step 3, checkpoint saved'):
    loop.train(config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2', '3']
  monkeypatch.undo()
  loop.train(config, workdir)
  _assert_same_params(straight, _params(workdir)[0])


# Checkpoints are written in the background, one at a time: when the save of step 4 starts,
# step 2's is complete, and step 4's may or may not be when the kill comes (mid-step 5, or
# right after the save of 4 was started). Either way a half-written one is never taken.
@pytest.mark.parametrize('mode,kill_at', [('step', 5), ('save', 4)])
def test_sigkill_loses_only_the_unsaved_steps_and_resume_is_bit_exact(
    straight, data_dir, tmp_path, mode, kill_at):
  workdir = tmp_path / 'run'
  script = _KILLED_RUN.format(repo=str(REPO), num_steps=NUM_STEPS)
  killed = subprocess.run([sys.executable, '-c', script, mode, str(kill_at), str(workdir),
                           data_dir], cwd=REPO, env=_ENV, capture_output=True,
                          encoding='utf-8', timeout=600)
  assert killed.returncode == -signal.SIGKILL, killed.stderr
  # The newest complete checkpoint is the one before the kill; a half-written one is ignored.
  manager = checkpointing.make_manager(str(workdir), read_only=True)
  survivor = manager.latest_step()
  manager.close()
  assert survivor in (2, 4), os.listdir(workdir / 'checkpoints')
  result = _finish(_main(workdir, data_dir))
  assert result[0] == 0, result[1] + result[2]
  assert f'Resumed from {workdir} at step {survivor}' in result[1]
  _assert_same_params(straight, _params(workdir)[0])


def test_signal_handlers_only_in_the_main_thread_and_restored():
  before = signal.getsignal(signal.SIGTERM)
  with preemption.StopSignals() as stop:
    assert signal.getsignal(signal.SIGTERM) != before
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.01)
    assert stop.requested and stop.should_stop()
  assert signal.getsignal(signal.SIGTERM) == before


def test_processes_agree_to_stop_when_any_of_them_got_the_signal(monkeypatch):
  """On several processes the flag is all-gathered every step: a process that got no signal
  stops at the same step as the one that did."""
  gathered = []
  monkeypatch.setattr(preemption.jax, 'process_count', lambda: 2)
  monkeypatch.setattr(preemption.multihost_utils, 'process_allgather',
                      lambda x: gathered.append(int(x)) or np.asarray([int(x), 1]))
  stop = preemption.StopSignals()
  assert not stop.requested and stop.should_stop()
  assert gathered == [0]  # this process's own flag went into the gather
  monkeypatch.setattr(preemption.multihost_utils, 'process_allgather',
                      lambda x: np.asarray([int(x), 0]))
  assert not stop.should_stop()
